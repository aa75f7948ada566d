//! Ferry's contract: the one place that defines what the `ferry` CLI, the node agents and the
//! `ferry-vmm` workers say to each other. Everything that crosses a process boundary is a type
//! here; nothing across processes is matched as human-readable text.
//!
//! * [`migration`] — migration parameters (one struct, its defaults, validated once), phases,
//!   progress, summaries, the downtime breakdown and typed failures.
//! * [`worker`] — the worker's control protocol (JSON lines on a unix socket): requests,
//!   replies, migration events, the typed worker status, and a small client.
//! * [`cluster`] — what the cluster store holds: nodes, VM specs and records, migration records.
//! * [`api`] — the agent's REST bodies.
//! * [`trust`] — user roles, TLS identity files, how a migration channel is secured and the
//!   one-time migration secret.
//!
//! This crate depends on serde only (no KVM), so every process can use it.

pub mod api;
pub mod auth;
pub mod cluster;
pub mod faults;
pub mod migration;
pub mod trust;
pub mod worker;

pub use migration::{
    CommitPoint, Compression, DowntimeBreakdown, FailureKind, HostSummary, MigrationFailure,
    MigrationParams, ParamError, Phase, PreflightReport, Progress, Summary,
};
