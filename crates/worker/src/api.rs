//! The control API: the contract crate's worker protocol ([`contract::worker`]), re-exported
//! here for the worker's own users.

pub use contract::worker::{
    call, status, ClientError, CommitDecision, DecisionLine, Direction, MigrateCommand,
    MigrateSession, MigrationStatus, Reply, Request, SnapshotReply, WorkerState, WorkerStatus,
    WorkerVm, MAX_LINE,
};
