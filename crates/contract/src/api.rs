//! The agent's REST API bodies (`/v1/...`). Records themselves are the store's types
//! ([`crate::cluster`]). Errors are [`ErrorBody`] with 400, 404, 409, 503 or 500.

use crate::cluster::{MigrationRecord, VmRecord, VmSpec};
use crate::migration::{MigrationParams, Phase, Progress, Summary};
use crate::worker::WorkerStatus;
use serde::{Deserialize, Serialize};

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
