//! The agent's REST API bodies (`/v1/...`). Records themselves are the store's types
//! ([`crate::cluster`]). Errors are [`ErrorBody`] with 400, 404, 409, 503 or 500.

use crate::cluster::{MigrationRecord, VmRecord, VmSpec, VmState};
use crate::migration::{MigrationParams, Phase, Progress, Summary};
use crate::worker::WorkerStatus;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Every error answer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ErrorBody {
    pub error: String,
}

/// `GET /v1/health`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Health {
    pub node: String,
    pub ok: bool,
    /// The address the agent really listens on.
    #[serde(default)]
    pub listen: String,
}

/// `GET /v1/nodes`: one node with its liveness and use.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct NodeView {
    pub name: String,
    pub address: String,
    pub alive: bool,
    pub schedulable: bool,
    pub cpu_vendor: String,
    pub cpu_model: String,
    pub cpu_features: Vec<String>,
    /// The CPU profile the node limits its offer to (none: all its KVM offers).
    #[serde(default)]
    pub cpu_limit: Option<String>,
    pub cores: u32,
    pub memory_mib: u64,
    pub cores_used: u32,
    pub memory_used_mib: u64,
    /// VMs it owns.
    pub vms: usize,
    pub storage: Vec<String>,
    pub networks: Vec<String>,
}

/// `POST /v1/nodes/{name}/drain` body.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    /// How many VMs move at once (default: the agent's `--drain-concurrency`).
    #[serde(default)]
    pub concurrency: Option<usize>,
}

/// What a drain did with one VM.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DrainItem {
    pub vm: String,
    pub ok: bool,
    /// The node it moved to.
    pub to: Option<String>,
    pub migration: Option<String>,
    /// Why it was not moved although nothing failed (e.g. it is stopped).
    pub note: Option<String>,
    pub error: Option<String>,
    pub summary: Option<Summary>,
}

/// `POST /v1/nodes/{name}/drain` answer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DrainReport {
    pub node: String,
    pub moved: usize,
    pub failed: usize,
    pub max_concurrent: usize,
    pub concurrency_limit: usize,
    pub vms: Vec<DrainItem>,
}

/// `POST /v1/nodes/{name}/undrain` answer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Schedulable {
    pub node: String,
    pub schedulable: bool,
}

/// `POST /v1/vms` body: a spec as JSON (`spec`) or TOML (`toml`), optional owner node.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    #[serde(default)]
    pub spec: Option<VmSpec>,
    #[serde(default)]
    pub toml: Option<String>,
    #[serde(default)]
    pub node: Option<String>,
}

/// `GET /v1/vms/{name}`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct VmView {
    pub vm: VmRecord,
    pub version: u64,
    /// What the VM's worker on its owner node says (none: no worker answers).
    pub worker: Option<WorkerStatus>,
    /// Recent migrations of the VM, newest first.
    pub migrations: Vec<MigrationRecord>,
}

/// `DELETE /v1/vms/{name}` answer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Deleted {
    pub deleted: String,
}

/// `POST /v1/vms/{name}/migrate` body.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// Destination node.
    pub to: String,
    /// Only run the preflight checks (agent level; nothing moves).
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub params: MigrationParams,
}

/// `POST /v1/vms/{name}/migrate` answer: the migration's record and the agent that runs it
/// (follow it there: `GET /v1/migrations/{id}/events`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct MigrationStarted {
    pub migration: MigrationRecord,
    pub agent: String,
    #[serde(default)]
    pub dry_run: bool,
}

/// `GET /v1/migrations/{id}`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct MigrationView {
    pub migration: MigrationRecord,
    /// Live progress (only on the agent that runs it, while it runs).
    pub progress: Option<Progress>,
    pub done: bool,
}

/// One server-sent event of `GET /v1/migrations/{id}/events`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum MigrationEvent {
    /// Every 100 ms while it runs.
    Progress { phase: Phase, progress: Progress },
    /// Once, at the end, with the final record.
    Done { migration: Box<MigrationRecord> },
    /// The record cannot be read.
    Error { error: String },
}

/// `POST /v1/migrations/{id}/cancel` answer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct CancelReply {
    pub migration: String,
    /// What the cancel did.
    pub outcome: CancelOutcome,
}

/// What a cancel request achieved.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum CancelOutcome {
    /// The running migration was told to stop; it ends before its commit point.
    Cancelling,
}

/// `POST /v1/internal/receive` body (agent to agent): start a receiver for an incoming VM.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReceiveRequest {
    pub migration: String,
    pub vm: VmRecord,
    pub from: String,
}

/// `POST /v1/internal/receive` answer: where the source's worker connects.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ReceiveReply {
    pub address: String,
    /// The receiver's one-time secret, for the source's worker to present (agents with TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<crate::trust::MigrationSecret>,
}

/// Why a node cannot take a VM: the agent-level preflight's findings, typed so that a console
/// can show each one (missing CPU features by name, the remedy) and a refused migration's
/// reason is the same text ([`Blocker::describe`]).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Blocker {
    /// The VM already runs there.
    SameNode,
    /// Only a running VM can be live-migrated.
    NotRunning {
        state: VmState,
    },
    /// The node's lease expired.
    Down,
    /// The node is drained.
    Drained,
    CpuVendor {
        here: String,
        there: String,
    },
    /// CPU features the VM uses that the node's KVM does not offer.
    CpuFeatures {
        missing: Vec<String>,
    },
    Cores {
        free: u32,
        need: u32,
    },
    Memory {
        free_mib: u64,
        need_mib: u64,
    },
    /// A disk's directory the node does not reach.
    Storage {
        path: String,
    },
    /// A network (bridge) the node is not attached to.
    Network {
        network: String,
    },
}

impl Blocker {
    /// The finding as one sentence about `node`.
    pub fn describe(&self, node: &str) -> String {
        match self {
            Blocker::SameNode => format!("the VM already runs on {node}"),
            Blocker::NotRunning { state } => {
                format!("the VM is {state}: only a running VM can be live-migrated")
            }
            Blocker::Down => format!("node {node} is down (its lease expired)"),
            Blocker::Drained => format!("node {node} is drained"),
            Blocker::CpuVendor { here, there } => {
                format!("CPU vendor differs: {here} here, {there} on {node}")
            }
            Blocker::CpuFeatures { missing } => format!(
                "node {node} lacks CPU features the VM uses: {} (to move it there, {})",
                missing.join(", "),
                CPU_REMEDY
            ),
            Blocker::Cores { free, need } => {
                format!("not enough cores on {node}: {free} free, the VM needs {need}")
            }
            Blocker::Memory { free_mib, need_mib } => format!(
                "not enough memory on {node}: {free_mib} MiB free, the VM needs {need_mib} MiB"
            ),
            Blocker::Storage { path } => format!("node {node} does not reach storage {path}"),
            Blocker::Network { network } => {
                format!("node {node} is not attached to network {network}")
            }
        }
    }

    /// What an administrator can do about it, if anything but choosing another node.
    pub fn remedy(&self) -> Option<&'static str> {
        match self {
            Blocker::CpuFeatures { .. } => Some(CPU_REMEDY),
            Blocker::Drained => Some("undrain the node (ferry node undrain NODE)"),
            Blocker::NotRunning { .. } => Some("start the VM first"),
            Blocker::Down => Some("start the node's agent again"),
            Blocker::Storage { .. } => {
                Some("give the node access to the storage (ferry agent --storage DIR)")
            }
            Blocker::Network { .. } => {
                Some("attach the node to the network (ferry agent --network BRIDGE)")
            }
            _ => None,
        }
    }
}

/// The remedy for a CPU-feature refusal: the processor-compatibility setting.
pub const CPU_REMEDY: &str =
    "stop the VM, set its cpu_profile to `cluster` or `baseline`, and start it again";

/// One node's verdict in `GET /v1/vms/{name}/targets`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TargetVerdict {
    pub node: String,
    /// No blocker: a migration there may start.
    pub ok: bool,
    pub blockers: Vec<Blocker>,
    /// Each blocker as a sentence, in the same order.
    pub reasons: Vec<String>,
    /// Each blocker's remedy, in the same order (empty where there is none).
    pub remedies: Vec<String>,
    /// Things that do not block the move but an administrator should know.
    pub warnings: Vec<String>,
}

impl TargetVerdict {
    /// The verdict made of `blockers` and `warnings` for `node`.
    pub fn new(node: &str, blockers: Vec<Blocker>, warnings: Vec<String>) -> TargetVerdict {
        TargetVerdict {
            node: node.into(),
            ok: blockers.is_empty(),
            reasons: blockers.iter().map(|b| b.describe(node)).collect(),
            remedies: blockers
                .iter()
                .map(|b| b.remedy().unwrap_or_default().to_string())
                .collect(),
            blockers,
            warnings,
        }
    }
}

/// `GET /v1/vms/{name}/targets`: every other node's preflight verdict for the VM, computed by
/// its owner's agent before anything moves (nothing is recorded).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Targets {
    pub vm: String,
    /// The node the VM is on.
    pub from: String,
    pub targets: Vec<TargetVerdict>,
}

/// `PUT /v1/vms/{name}` body: changes to a stopped VM (what is absent stays).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmEdit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// Processor compatibility: `host`, `baseline` or `cluster`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_profile: Option<String>,
}

impl VmEdit {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.vcpus.is_none() && self.memory_mib.is_none() && self.cpu_profile.is_none()
    }
}

/// `GET /v1/vms/{name}/serial`: the end of the VM's serial console log on its owner node.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SerialTail {
    pub vm: String,
    pub node: String,
    /// The last bytes of the log (at most [`SERIAL_TAIL_MAX`]), lossily decoded as UTF-8.
    pub text: String,
    /// Whether the log holds more than `text`.
    pub truncated: bool,
}

/// How much of a serial log `GET /v1/vms/{name}/serial` returns.
pub const SERIAL_TAIL_MAX: u64 = 16 * 1024;

impl fmt::Display for TargetVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ok {
            write!(f, "{}: ok", self.node)?;
        } else {
            write!(f, "{}: blocked: {}", self.node, self.reasons.join("; "))?;
        }
        for w in &self.warnings {
            write!(f, " (warning: {w})")?;
        }
        Ok(())
    }
}
