//! The worker's control protocol: one JSON object per line in each direction over the
//! worker's unix socket (`ferry-vmm … --api-socket PATH`).
//!
//! ```text
//! client                                worker
//!   {"cmd":"status"}              ──▶
//!                                 ◀──   {"reply":"status", "pid":…, "state":"running", …}
//!   {"cmd":"migrate","to":…,
//!    "params":{…},
//!    "external_commit":true}      ──▶
//!                                 ◀──   {"reply":"progress", "phase":"precopy", …}   (every 100 ms)
//!                                 ◀──   {"reply":"commit-ready"}                     (external commit)
//!   {"decision":"commit"}         ──▶
//!                                 ◀──   {"reply":"done", …summary}  or  {"reply":"failed", …failure}
//! ```
//! Every reply is a [`Reply`]; errors are `{"reply":"error","error":"…"}`.

use crate::migration::{MigrationFailure, MigrationParams, Progress, Summary};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest request line a worker accepts.
pub const MAX_LINE: usize = 64 * 1024;

/// A control request.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status,
    Pause,
    Resume,
    Shutdown,
    Snapshot {
        path: PathBuf,
    },
    /// Live-migrate the VM; the connection then carries progress lines until a final one.
    Migrate(MigrateCommand),
    /// Cancel the running outgoing migration.
    Cancel,
    /// Receive mode with an external commit: the VM's owner moved here; resume it.
    Commit,
    /// Receive mode with an external commit: the migration failed; discard the received VM.
    Abort,
}

/// Arguments of a live migration.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MigrateCommand {
    /// Destination `host:port` (a `ferry-vmm receive` worker).
    pub to: String,
    #[serde(default)]
    pub params: MigrationParams,
    /// Only run the preflight.
    #[serde(default)]
    pub dry_run: bool,
    /// The commit is decided by the client: once the destination is ready the worker sends
    /// [`Reply::CommitReady`] and waits for a [`DecisionLine`] (a cluster agent answers after
    /// its store compare-and-swap).
    #[serde(default)]
    pub external_commit: bool,
    /// (with `external_commit`) Hand the commit over to the migration stream: once setup is
    /// done the worker answers [`Reply::HandoverReady`] and waits, before it pauses the VM,
    /// for a [`DecisionLine`] (`commit`: the store now names the handover; `abort`: it does
    /// not, the migration fails with the VM running). At Ready it then sends `Commit` without
    /// asking, and from the pause on it never resumes the VM on its own after a failure: it
    /// stays paused until the client (who swaps the store back first) sends `resume`.
    /// (Not written when false, so a worker from before the handover still understands
    /// every other command.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub handover: bool,
    /// Offer at most this wire protocol version (default: the newest this worker speaks;
    /// versions are negotiated down anyway, this only pins an older one).
    #[serde(default)]
    pub max_protocol: Option<u32>,
    /// How the migration's connections are secured: mutual TLS naming the destination node,
    /// or (explicitly) plaintext.
    pub transport: crate::trust::Transport,
    /// The one-time secret the destination was created with.
    #[serde(default)]
    pub secret: Option<crate::trust::MigrationSecret>,
}

/// The client's answer to [`Reply::CommitReady`].
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum CommitDecision {
    Commit,
    Abort,
}

/// The line that carries a [`CommitDecision`].
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DecisionLine {
    pub decision: CommitDecision,
}

/// What a worker answers.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Reply {
    /// `status`.
    Status(WorkerStatus),
    /// `pause` / `resume`: the state now.
    State { state: WorkerState },
    /// `snapshot`.
    Snapshot(SnapshotReply),
    /// `shutdown` accepted: the worker stops.
    Stopping,
    /// `cancel` accepted: the migration stops at its next check.
    Cancelling,
    /// `commit` / `abort`: the decision in force (the first one made wins).
    Decided { decision: CommitDecision },
    /// A running migration's progress.
    Progress(Progress),
    /// The destination holds the complete VM: decide (external commit only).
    CommitReady,
    /// Setup is done: hand the commit over (store swap) and answer (handover only).
    HandoverReady,
    /// The migration completed (or the dry run passed).
    Done(Summary),
    /// The migration failed.
    Failed(MigrationFailure),
    /// The request was refused or failed.
    Error { error: String },
}

impl Reply {
    pub fn error(msg: impl Into<String>) -> Reply {
        Reply::Error { error: msg.into() }
    }

    /// The error text of an `Error` or `Failed` reply.
    pub fn error_text(&self) -> Option<String> {
        match self {
            Reply::Error { error } => Some(error.clone()),
            Reply::Failed(f) => Some(f.to_string()),
            _ => None,
        }
    }
}

/// What a worker is doing.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    /// `receive`: waiting for (or in the middle of) an incoming migration; no VM runs here.
    Receiving,
    /// VM built, not started.
    Created,
    Running,
    Paused,
    Stopped,
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WorkerState::Receiving => "receiving",
            WorkerState::Created => "created",
            WorkerState::Running => "running",
            WorkerState::Paused => "paused",
            WorkerState::Stopped => "stopped",
        })
    }
}

/// The VM a worker runs.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct WorkerVm {
    pub vcpus: u8,
    pub memory_mib: u64,
    pub kernel: String,
    pub cmdline: String,
    pub cpu_profile: String,
    pub throttle_pct: u8,
    /// Why the VM stopped, once it did.
    pub stop_reason: Option<String>,
    /// vCPU 0's TSC minus this host's TSC (ticks), read when the VM was started or loaded:
    /// unchanged by a migration that brings the VM back to the same host if its time travelled
    /// exactly.
    #[serde(default)]
    pub guest_tsc_lead: Option<i64>,
    /// Whether its RAM is on 2 MiB huge pages (the node's hugetlb pool), else 4 KiB pages.
    #[serde(default)]
    pub huge_pages: bool,
}

/// Which way a migration goes, seen from this worker.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outgoing,
    Incoming,
}

/// A worker's migration, as its status shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct MigrationStatus {
    pub direction: Direction,
    /// An outgoing migration is running (it may be paused at the commit decision).
    pub active: bool,
    pub progress: Progress,
    /// (incoming) The VM is complete here and waits for the commit decision; with an
    /// external commit only the agent's `commit`/`abort` can settle it.
    pub awaiting_decision: bool,
    /// (incoming) The source's control connection is still open.
    pub source_connected: bool,
    /// How the last migration failed, if it did.
    pub failure: Option<MigrationFailure>,
}

/// `status` of a worker.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct WorkerStatus {
    pub pid: u32,
    pub uptime_s: f64,
    pub state: WorkerState,
    /// The VM (none while a receiver waits).
    pub vm: Option<WorkerVm>,
    /// (receive mode) Where the receiver listens for the source.
    pub listen: Option<String>,
    /// (receive mode) Whether commit decisions come from the agent.
    pub external_commit: bool,
    /// (receive mode) The cluster migration this receiver was started for
    /// (`receive --migration-id`), so that an agent that restarted can settle it.
    #[serde(default)]
    pub migration_id: Option<String>,
    pub migration: Option<MigrationStatus>,
}

impl WorkerStatus {
    /// An incoming VM waiting for the commit decision.
    pub fn awaiting_decision(&self) -> bool {
        self.migration
            .as_ref()
            .is_some_and(|m| m.direction == Direction::Incoming && m.awaiting_decision)
    }
}

/// `snapshot`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SnapshotReply {
    pub path: PathBuf,
    pub file_bytes: u64,
    pub data_pages: u64,
    pub total_pages: u64,
    pub state_bytes: u64,
    pub write_seconds: f64,
    pub paused_seconds: f64,
    pub state: WorkerState,
}

// ---------------------------------------------------------------------------------------------
// Client

/// Client-side errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the worker's API socket {path}: {err}")]
    Connect { path: String, err: std::io::Error },
    #[error("API socket I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the worker closed the connection without answering")]
    NoAnswer,
    #[error("the worker sent an unreadable answer: {0}")]
    BadAnswer(String),
    #[error("{0}")]
    Refused(String),
    #[error("unexpected answer from the worker: {0}")]
    Unexpected(String),
}

fn connect(socket: &Path, timeout: Option<Duration>) -> Result<UnixStream, ClientError> {
    let s = UnixStream::connect(socket).map_err(|err| ClientError::Connect {
        path: socket.display().to_string(),
        err,
    })?;
    s.set_read_timeout(timeout)?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

fn send_line<T: Serialize>(w: &mut impl Write, v: &T) -> Result<(), ClientError> {
    let mut line = serde_json::to_string(v).expect("contract types always serialize");
    line.push('\n');
    w.write_all(line.as_bytes())?;
    Ok(())
}

fn read_reply(r: &mut impl BufRead) -> Result<Reply, ClientError> {
    let mut answer = String::new();
    if r.read_line(&mut answer)? == 0 {
        return Err(ClientError::NoAnswer);
    }
    serde_json::from_str(&answer)
        .map_err(|e| ClientError::BadAnswer(format!("{e}: {}", answer.trim())))
}

/// Sends one request and returns its reply (an `Error` reply becomes [`ClientError::Refused`]).
pub fn call(socket: &Path, req: &Request, timeout: Option<Duration>) -> Result<Reply, ClientError> {
    let mut s = connect(socket, timeout)?;
    // A worker that refuses a client (peer credentials) answers and closes before reading the
    // request, so the write can fail with EPIPE while its answer waits in our receive buffer:
    // the answer is the better error.
    let sent = send_line(&mut s, req);
    let r = match (sent, read_reply(&mut BufReader::new(s))) {
        (_, Ok(r)) => r,
        (Err(e), Err(_)) | (Ok(()), Err(e)) => return Err(e),
    };
    match r {
        Reply::Error { error } => Err(ClientError::Refused(error)),
        r => Ok(r),
    }
}

/// `status`, typed.
pub fn status(socket: &Path, timeout: Option<Duration>) -> Result<WorkerStatus, ClientError> {
    match call(socket, &Request::Status, timeout)? {
        Reply::Status(s) => Ok(s),
        other => Err(ClientError::Unexpected(format!("{other:?}"))),
    }
}

/// Waits until the receiver behind `socket` answers and says where it listens.
pub fn receiver_address(socket: &Path, timeout: Duration) -> Result<String, ClientError> {
    let t0 = std::time::Instant::now();
    loop {
        match status(socket, Some(Duration::from_secs(2))) {
            Ok(WorkerStatus {
                listen: Some(a), ..
            }) => return Ok(a),
            Ok(s) if s.state != WorkerState::Receiving => {
                return Err(ClientError::Unexpected(format!(
                    "the worker is {} and not receiving",
                    s.state
                )))
            }
            Ok(_) | Err(ClientError::Connect { .. }) if t0.elapsed() < timeout => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Ok(_) => return Err(ClientError::NoAnswer),
            Err(e) => return Err(e),
        }
    }
}

/// A running `migrate` request: progress lines, then (external commit) a decision, then the
/// outcome.
pub struct MigrateSession {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl MigrateSession {
    /// Sends the request.
    pub fn start(socket: &Path, cmd: MigrateCommand) -> Result<MigrateSession, ClientError> {
        let s = connect(socket, None)?;
        let mut w = s.try_clone()?;
        send_line(&mut w, &Request::Migrate(cmd))?;
        Ok(MigrateSession {
            r: BufReader::new(s),
            w,
        })
    }

    /// The next line: `Progress`, `CommitReady`, or the final `Done`/`Failed`/`Error`.
    pub fn next_reply(&mut self) -> Result<Reply, ClientError> {
        read_reply(&mut self.r)
    }

    /// Answers `CommitReady`.
    pub fn decide(&mut self, decision: CommitDecision) -> Result<(), ClientError> {
        send_line(&mut self.w, &DecisionLine { decision })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::Phase;

    #[test]
    fn lines_have_the_documented_shape() {
        let r = serde_json::to_value(Request::Migrate(MigrateCommand {
            to: "10.0.0.2:4000".into(),
            params: Default::default(),
            dry_run: false,
            external_commit: true,
            handover: false,
            max_protocol: None,
            transport: crate::trust::Transport::Insecure,
            secret: None,
        }))
        .unwrap();
        assert_eq!(r["cmd"], "migrate");
        assert_eq!(r["transport"]["mode"], "insecure");
        assert_eq!(r["params"]["max_downtime_ms"], 50);
        let p = serde_json::to_value(Reply::Progress(Progress {
            phase: Phase::Precopy,
            pass: 2,
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(p["reply"], "progress");
        assert_eq!(p["phase"], "precopy");
        assert_eq!(p["pass"], 2);
        let c: Reply = serde_json::from_str(r#"{"reply":"commit-ready"}"#).unwrap();
        assert_eq!(c, Reply::CommitReady);
        let d: DecisionLine = serde_json::from_str(r#"{"decision":"abort"}"#).unwrap();
        assert_eq!(d.decision, CommitDecision::Abort);
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
    }
}
