//! The VM configuration: what a worker needs to build a VM (and what a snapshot or a migration
//! carries so that the other side can build the same VM).

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Largest number of vCPUs a Ferry VM may have.
pub const MAX_VCPUS: u8 = 8;
/// Smallest guest RAM size in MiB (the test guest needs its image, stacks and page tables).
pub const MIN_MEMORY_MIB: u64 = 32;
/// Largest guest RAM size in MiB (1 TiB); the host's free memory is checked separately.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Longest kernel command line, in bytes.
pub const MAX_CMDLINE_LEN: usize = 4096;

/// Where the guest kernel comes from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum KernelSource {
    /// Ferry's own test guest, embedded in the binary (see the `guest` crate).
    TestGuest,
    /// A kernel file on the host: a PVH ELF, or a Linux bzImage.
    Path(PathBuf),
}

impl KernelSource {
    /// Parses the `--kernel` argument: `test-guest` names the built-in guest.
    pub fn parse(s: &str) -> KernelSource {
        if s == "test-guest" {
            KernelSource::TestGuest
        } else {
            KernelSource::Path(PathBuf::from(s))
        }
    }
}

impl std::fmt::Display for KernelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelSource::TestGuest => write!(f, "test-guest"),
            KernelSource::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Everything needed to create a VM.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Number of vCPUs (1..=8).
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// The kernel to boot.
    pub kernel: KernelSource,
    /// Optional initrd (bzImage boot only).
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Named CPU profile the guest CPUID is filtered through (`host`, `baseline`).
    pub cpu_profile: String,
    /// virtio-blk disks, in order.
    pub disks: Vec<DiskConfig>,
    /// virtio-net NICs, in order (their host backends are host-local: see
    /// [`crate::devices::virtio::HostDevices`]).
    pub nics: Vec<NicConfig>,
}

/// A virtio-blk disk: a raw image, normally on storage every node reaches.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

impl std::str::FromStr for DiskConfig {
    type Err = String;
    /// `PATH` or `PATH,ro`.
    fn from_str(s: &str) -> Result<DiskConfig, String> {
        let (path, ro) = match s.rsplit_once(',') {
            Some((p, "ro")) => (p, true),
            Some((p, "rw")) => (p, false),
            _ => (s, false),
        };
        if path.is_empty() {
            return Err("a disk needs a path (PATH or PATH,ro)".into());
        }
        Ok(DiskConfig {
            path: PathBuf::from(path),
            read_only: ro,
        })
    }
}

/// A MAC address.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl std::str::FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<MacAddr, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let bad =
            || format!("invalid MAC address {s:?} (expected six hex bytes like 52:54:00:12:34:56)");
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut m = [0u8; 6];
        for (o, p) in m.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(bad());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        Ok(MacAddr(m))
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", crate::devices::virtio::net::fmt_mac(self.0))
    }
}

/// A virtio-net NIC as the guest sees it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NicConfig {
    pub mac: MacAddr,
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("vcpus must be between 1 and {MAX_VCPUS}, got {0}")]
    Vcpus(u64),
    #[error("memory must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB, got {0} MiB")]
    Memory(u64),
    #[error("kernel command line is {0} bytes, longer than the {MAX_CMDLINE_LEN}-byte limit")]
    CmdlineTooLong(usize),
    #[error("kernel command line contains a NUL or non-ASCII byte")]
    CmdlineBadChar,
    #[error("unknown CPU profile {0:?} (known: {known}, or features=<name>,...)", known = crate::cpuid::PROFILE_NAMES.join(", "))]
    Profile(String),
    #[error("an initrd can only be used with a bzImage kernel, not with the built-in test guest")]
    InitrdWithTestGuest,
    #[error("{0} virtio devices (disks + NICs) requested, at most {max} are supported", max = crate::devices::virtio::MAX_DEVICES)]
    TooManyDevices(usize),
    #[error("disk path {0:?} must be absolute")]
    DiskPath(String),
    #[error("MAC address {0} is not a unicast address (the low bit of its first byte is set) or is all zeroes")]
    Mac(MacAddr),
    #[error("MAC address {0} is used by two NICs")]
    DuplicateMac(MacAddr),
}

impl VmConfig {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus as u64));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::Memory(self.memory_mib));
        }
        if self.cmdline.len() > MAX_CMDLINE_LEN {
            return Err(ConfigError::CmdlineTooLong(self.cmdline.len()));
        }
        if self.cmdline.bytes().any(|b| b == 0 || !b.is_ascii()) {
            return Err(ConfigError::CmdlineBadChar);
        }
        if crate::cpuid::validate_profile(&self.cpu_profile).is_err() {
            return Err(ConfigError::Profile(self.cpu_profile.clone()));
        }
        if self.initrd.is_some() && self.kernel == KernelSource::TestGuest {
            return Err(ConfigError::InitrdWithTestGuest);
        }
        let n = self.disks.len() + self.nics.len();
        if n > crate::devices::virtio::MAX_DEVICES {
            return Err(ConfigError::TooManyDevices(n));
        }
        for d in &self.disks {
            if !d.path.is_absolute() {
                return Err(ConfigError::DiskPath(d.path.display().to_string()));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for nic in &self.nics {
            if nic.mac.0[0] & 1 != 0 || nic.mac.0 == [0; 6] {
                return Err(ConfigError::Mac(nic.mac));
            }
            if !seen.insert(nic.mac) {
                return Err(ConfigError::DuplicateMac(nic.mac));
            }
        }
        Ok(())
    }

    /// Guest RAM in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> VmConfig {
        VmConfig {
            vcpus: 2,
            memory_mib: 256,
            kernel: KernelSource::TestGuest,
            initrd: None,
            cmdline: "ferry.workload=idle".into(),
            cpu_profile: "host".into(),
            disks: vec![],
            nics: vec![],
        }
    }

    #[test]
    fn validation_names_the_bad_field() {
        assert_eq!(good().validate(), Ok(()));
        let mut c = good();
        c.vcpus = 0;
        assert_eq!(c.validate(), Err(ConfigError::Vcpus(0)));
        c.vcpus = 9;
        assert_eq!(c.validate(), Err(ConfigError::Vcpus(9)));
        let mut c = good();
        c.memory_mib = 4;
        assert!(c.validate().unwrap_err().to_string().contains("got 4 MiB"));
        let mut c = good();
        c.cpu_profile = "skylake".into();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("\"skylake\""));
        let mut c = good();
        c.cmdline = "a\0b".into();
        assert_eq!(c.validate(), Err(ConfigError::CmdlineBadChar));
        let mut c = good();
        c.disks = vec!["rel/disk.img".parse().unwrap()];
        assert_eq!(
            c.validate(),
            Err(ConfigError::DiskPath("rel/disk.img".into()))
        );
        let mut c = good();
        let mac: MacAddr = "52:54:00:00:00:01".parse().unwrap();
        c.nics = vec![NicConfig { mac }, NicConfig { mac }];
        assert_eq!(c.validate(), Err(ConfigError::DuplicateMac(mac)));
        c.nics = vec![NicConfig {
            mac: "01:00:5e:00:00:01".parse().unwrap(),
        }];
        assert!(matches!(c.validate(), Err(ConfigError::Mac(_))));
        c.nics = vec![];
        c.disks = (0..9).map(|i| format!("/d{i}").parse().unwrap()).collect();
        assert_eq!(c.validate(), Err(ConfigError::TooManyDevices(9)));
    }

    #[test]
    fn parses_disks_and_macs() {
        let d: DiskConfig = "/srv/a.img,ro".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("/srv/a.img"));
        assert!(d.read_only);
        let d: DiskConfig = "/srv/a,b.img".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("/srv/a,b.img"));
        assert!(!d.read_only);
        let m: MacAddr = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:0f");
        assert!("52:54:00:ab:cd".parse::<MacAddr>().is_err());
        assert!("52:54:00:ab:cd:zz".parse::<MacAddr>().is_err());
    }
}
