//! What the cluster store holds: nodes, VMs (spec, owner, state) and migration records.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// A node as it registers itself.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct NodeInfo {
    pub name: String,
    /// Where its agent's HTTP API listens (`host:port`).
    pub address: String,
    pub cpu_vendor: String,
    pub cpu_model: String,
    /// CPU features this node's KVM offers (names as in `vmm::cpuid::FEATURES`).
    pub cpu_features: Vec<String>,
    /// vCPUs it may run (its CPUs times the overcommit ratio).
    pub cores: u32,
    /// RAM it gives to VMs, in MiB.
    pub memory_mib: u64,
    /// Shared storage paths it reaches.
    pub storage: Vec<String>,
    /// Networks (bridges) it is attached to.
    pub networks: Vec<String>,
    /// False while the node is drained: no VM is placed or migrated onto it.
    pub schedulable: bool,
    /// When the agent (re)started, ms since the epoch.
    pub started_ms: u64,
}

/// A node and whether its lease is alive.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct NodeStatus {
    pub info: NodeInfo,
    pub alive: bool,
}

/// A VM's description (the TOML spec users write).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub name: String,
    #[serde(default = "one")]
    pub vcpus: u8,
    pub memory_mib: u64,
    /// `test-guest` or a kernel path on the nodes.
    #[serde(default = "test_guest")]
    pub kernel: String,
    #[serde(default)]
    pub cmdline: String,
    /// `host` (this node's CPU), `baseline`, or `cluster` (what every node offers).
    #[serde(default = "host")]
    pub cpu_profile: String,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    #[serde(default)]
    pub nics: Vec<NicSpec>,
}

fn one() -> u8 {
    1
}
fn test_guest() -> String {
    "test-guest".into()
}
fn host() -> String {
    "host".into()
}

/// A disk image on shared storage.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    pub path: String,
    /// Attach the image read-only (several VMs may then share it).
    #[serde(default)]
    pub read_only: bool,
}

/// A network interface on a node network.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    pub network: String,
    #[serde(default)]
    pub mac: Option<String>,
}

/// CPU profiles a VM spec may name.
pub const VM_PROFILES: &[&str] = &["host", "baseline", "cluster"];

/// Why a spec is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("invalid VM spec: {0}")]
    Parse(String),
    #[error(
        "invalid VM name {0:?}: use 1-63 characters of a-z, 0-9 and '-', starting with a letter"
    )]
    Name(String),
    #[error("invalid VM spec: {0}")]
    Field(String),
}

/// A name usable for VMs and nodes.
pub fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.starts_with(|c: char| c.is_ascii_lowercase())
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

impl VmSpec {
    /// Parses and validates a TOML spec.
    pub fn from_toml(text: &str) -> Result<VmSpec, SpecError> {
        let spec: VmSpec = toml_parse(text)?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<(), SpecError> {
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

    /// The worker configuration for this spec, with the CPU profile resolved by the caller.
    pub fn vm_config(&self, profile: &str) -> vmm::VmConfig {
        vmm::VmConfig {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            kernel: vmm::KernelSource::parse(&self.kernel),
            initrd: None,
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

    /// Storage paths this VM needs a node to reach (the directories of its disks).
    pub fn storage_needed(&self) -> BTreeSet<String> {
        self.disks
            .iter()
            .map(|d| {
                std::path::Path::new(&d.path)
                    .parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "/".into())
            })
            .collect()
    }

    /// Networks this VM needs a node to be attached to.
    pub fn networks_needed(&self) -> BTreeSet<String> {
        self.nics.iter().map(|n| n.network.clone()).collect()
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

/// A VM's life-cycle state.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Stopped,
    Running,
    /// A migration holds the VM (no other operation may start).
    Migrating,
    /// The worker died unexpectedly.
    Crashed,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::Stopped => "stopped",
            VmState::Running => "running",
            VmState::Migrating => "migrating",
            VmState::Crashed => "crashed",
        })
    }
}

/// A VM in the store. `owner` is the one node that may run it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct VmRecord {
    pub spec: VmSpec,
    pub owner: String,
    pub state: VmState,
    /// The CPU profile actually applied at the last start (`host`/`baseline` for the worker,
    /// plus the feature list a `cluster` profile resolved to).
    #[serde(default)]
    pub cpu_features: Vec<String>,
    /// The migration that holds the VM, if any.
    #[serde(default)]
    pub migration: Option<String>,
    /// Last failure, for `vm show`.
    #[serde(default)]
    pub last_error: Option<String>,
    pub updated_ms: u64,
}

/// A value read from the store with the version its compare-and-swap must present.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    pub value: T,
    pub version: u64,
}

/// Outcome of a migration.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MigrationOutcome {
    Running,
    Succeeded,
    Failed,
}

/// A migration attempt, kept for `vm show` and the API.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct MigrationRecord {
    pub id: String,
    pub vm: String,
    pub from: String,
    pub to: String,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
    pub outcome: MigrationOutcome,
    /// Phase reached (or where it failed).
    pub phase: String,
    pub reason: Option<String>,
    /// The engine's summary (downtime, bytes, passes) when it succeeded.
    pub summary: Option<serde_json::Value>,
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
