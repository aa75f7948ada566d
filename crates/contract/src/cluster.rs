//! What the cluster store holds: nodes, VMs (spec, owner, state) and migration records. The
//! agent's REST API returns these same types.

use crate::migration::{MigrationParams, Phase, Summary};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;

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
    /// The CPU profile the node limits its offer to (`ferry agent --cpu-limit`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit: Option<String>,
    /// vCPUs it may run (its CPUs times the overcommit ratio).
    pub cores: u32,
    /// RAM it gives to VMs, in MiB.
    pub memory_mib: u64,
    /// Shared storage paths it reaches; a VM's disk images must lie under one of them.
    pub storage: Vec<String>,
    /// Directories a VM's kernel and initrd may be read from on this node.
    #[serde(default)]
    pub boot: Vec<String>,
    /// Networks (bridges) it is attached to.
    pub networks: Vec<String>,
    /// False while the node is drained: no VM is placed or migrated onto it.
    pub schedulable: bool,
    /// When the agent (re)started, ms since the epoch.
    pub started_ms: u64,
    /// Whether its agent takes part in a handover ([`VmRecord::handover_to`]): as a
    /// destination it commits a VM whose source vanished once the VM is complete here, and it
    /// hands a VM it lost back. False for agents from before the handover (or started with
    /// `--store-commit`): migrations to them keep the store's swap at the commit point.
    #[serde(default)]
    pub handover: bool,
}

/// A node and whether its lease is alive.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct NodeStatus {
    pub info: NodeInfo,
    pub alive: bool,
}

/// A VM's description (the TOML spec users write). Parsing and full validation (which needs
/// the VMM's limits) live in the `cluster` crate (`SpecExt`).
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
    /// An initrd (initramfs) path on the nodes, for a Linux kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
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

/// A name usable for VMs and nodes (also safe as a file name: no `/`, no `..`).
pub fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.starts_with(|c: char| c.is_ascii_lowercase())
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// A migration id as agents make them (`<vm>-<ms>-<hex>`): the characters of a name, at most
/// 100 of them (ids appear in URLs, logs and worker arguments).
pub fn valid_migration_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 100
        && id.starts_with(|c: char| c.is_ascii_lowercase())
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

impl VmSpec {
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

/// A VM's life-cycle state.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Stopped,
    Running,
    /// A migration holds the VM (no other operation may start).
    Migrating,
    /// The worker died unexpectedly.
    Crashed,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
    /// Set (to the destination node) while `migration` has *handed its commit over* to the
    /// migration stream: the source worker's `Commit` message is then the commit point, not
    /// a store swap in the downtime; the source resumes only after a compare-and-swap back
    /// to `running` here, and the destination commits on its own (compare-and-swap to owner
    /// = itself) if its source vanished after the VM was complete there, or hands the VM
    /// back (clears this) once its receiver is gone. Whoever learns the outcome first
    /// records the new owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover_to: Option<String>,
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
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum MigrationOutcome {
    Running,
    Succeeded,
    Failed,
    /// Cancelled by request before the commit point (the VM stayed on its source).
    Cancelled,
}

impl fmt::Display for MigrationOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MigrationOutcome::Running => "running",
            MigrationOutcome::Succeeded => "succeeded",
            MigrationOutcome::Failed => "failed",
            MigrationOutcome::Cancelled => "cancelled",
        })
    }
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
    pub phase: Phase,
    pub reason: Option<String>,
    /// The engine's summary (downtime, bytes, passes) when it succeeded.
    pub summary: Option<Summary>,
    /// The parameters it ran with.
    #[serde(default)]
    pub params: MigrationParams,
    /// Who settled it when its agent could not (reconciliation after a fault).
    #[serde(default)]
    pub settled_by: Option<String>,
}

impl MigrationRecord {
    /// Whether it ended.
    pub fn finished(&self) -> bool {
        self.outcome != MigrationOutcome::Running
    }
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
