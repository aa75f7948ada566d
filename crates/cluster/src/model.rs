//! What the cluster store holds. The types are the contract crate's ([`contract::cluster`]);
//! this module adds what needs the VMM: parsing and full validation of VM specs and their
//! worker configuration.

pub use contract::cluster::*;

/// VM spec operations that need the VMM's limits and types.
pub trait SpecExt: Sized {
    /// Parses and validates a TOML spec.
    fn from_toml(text: &str) -> Result<Self, SpecError>;
    /// Checks every field (the VMM's limits included).
    fn validate(&self) -> Result<(), SpecError>;
    /// The worker configuration for this spec, with the CPU profile resolved by the caller.
    fn vm_config(&self, profile: &str) -> vmm::VmConfig;
}

impl SpecExt for VmSpec {
    fn from_toml(text: &str) -> Result<VmSpec, SpecError> {
        let spec: VmSpec = toml_parse(text)?;
        spec.validate()?;
        Ok(spec)
    }

    fn validate(&self) -> Result<(), SpecError> {
        if !valid_name(&self.name) {
            return Err(SpecError::Name(self.name.clone()));
        }
        if !VM_PROFILES.contains(&self.cpu_profile.as_str()) {
            return Err(SpecError::Field(format!(
                "unknown cpu_profile {:?} (host, baseline, cluster)",
                self.cpu_profile
            )));
        }
        self.vm_config("host")
            .validate()
            .map_err(|e| SpecError::Field(e.to_string()))?;
        if let Some(i) = &self.initrd {
            if !i.starts_with('/') {
                return Err(SpecError::Field(format!(
                    "initrd path {i:?} must be absolute"
                )));
            }
        }
        for d in &self.disks {
            if !d.path.starts_with('/') {
                return Err(SpecError::Field(format!(
                    "disk path {:?} must be absolute",
                    d.path
                )));
            }
        }
        for n in &self.nics {
            if n.network.is_empty() {
                return Err(SpecError::Field("a NIC needs a network".into()));
            }
            if let Some(m) = &n.mac {
                m.parse::<vmm::config::MacAddr>()
                    .map_err(SpecError::Field)?;
            }
        }
        Ok(())
    }

    fn vm_config(&self, profile: &str) -> vmm::VmConfig {
        vmm::VmConfig {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            kernel: vmm::KernelSource::parse(&self.kernel),
            initrd: self.initrd.as_ref().map(Into::into),
            cmdline: self.cmdline.clone(),
            cpu_profile: profile.to_string(),
            disks: self
                .disks
                .iter()
                .map(|d| vmm::config::DiskConfig {
                    path: d.path.clone().into(),
                    read_only: d.read_only,
                })
                .collect(),
            nics: self
                .nics
                .iter()
                .enumerate()
                .map(|(i, n)| vmm::config::NicConfig {
                    mac: n
                        .mac
                        .as_deref()
                        .and_then(|m| m.parse().ok())
                        .unwrap_or_else(|| default_mac(&self.name, i)),
                })
                .collect(),
        }
    }
}

/// The MAC a NIC gets when its spec names none: locally administered (02:...), derived from the
/// VM name and the NIC's index, so it is the same on every node and across restarts.
pub fn default_mac(vm: &str, index: usize) -> vmm::config::MacAddr {
    // FNV-1a over the name and index.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in vm.bytes().chain((index as u32).to_le_bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_le_bytes();
    vmm::config::MacAddr([0x02, 0xf5, b[0], b[1], b[2], b[3]])
}

fn toml_parse(text: &str) -> Result<VmSpec, SpecError> {
    toml::from_str(text).map_err(|e| SpecError::Parse(e.to_string().trim().replace('\n', " ")))
}
