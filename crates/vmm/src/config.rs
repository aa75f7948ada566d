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
    }
}
