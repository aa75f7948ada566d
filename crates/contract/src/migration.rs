//! Live-migration types shared by the worker (engine), the agent (orchestration) and the CLI.

use serde::{Deserialize, Serialize};
use std::fmt;

// ---------------------------------------------------------------------------------------------
// Parameters

/// Default switchover budget: the downtime the engine aims to stay under.
pub const DEFAULT_MAX_DOWNTIME_MS: u64 = 50;
/// Largest downtime budget accepted (10 minutes: anything above is not a live migration).
pub const MAX_DOWNTIME_MS: u64 = 600_000;
/// Default number of parallel data connections.
pub const DEFAULT_STREAMS: u16 = 1;
/// Most parallel data connections.
pub const MAX_STREAMS: u16 = 16;

/// Page compression on the data streams.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    None,
    Lz4,
    Zstd,
}

impl Compression {
    /// Every value, in wire order.
    pub const ALL: [Compression; 3] = [Compression::None, Compression::Lz4, Compression::Zstd];

    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = ParamError;
    fn from_str(s: &str) -> Result<Self, ParamError> {
        Compression::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| ParamError::Compression(s.to_string()))
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How to migrate: the one definition of the tunables and their defaults, used by the CLI,
/// the agent's REST API and the worker's control API alike. Validate with
/// [`MigrationParams::validate`] where the parameters enter (the engine then trusts them).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MigrationParams {
    /// Switch over once the expected downtime fits this budget (ms).
    pub max_downtime_ms: u64,
    /// Parallel data connections (1-16).
    pub streams: u16,
    #[serde(alias = "compress")]
    pub compression: Compression,
    /// Bandwidth cap for the memory copy, MiB/s (none: as fast as the link goes).
    pub max_bandwidth_mibs: Option<u64>,
    /// Give up (the VM stays on its source) after this many seconds.
    pub timeout_s: Option<f64>,
}

impl Default for MigrationParams {
    fn default() -> Self {
        MigrationParams {
            max_downtime_ms: DEFAULT_MAX_DOWNTIME_MS,
            streams: DEFAULT_STREAMS,
            compression: Compression::None,
            max_bandwidth_mibs: None,
            timeout_s: None,
        }
    }
}

/// Why migration parameters are refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParamError {
    #[error("streams must be between 1 and {MAX_STREAMS}, got {0}")]
    Streams(u16),
    #[error("the downtime budget must be between 1 and {MAX_DOWNTIME_MS} ms, got {0}")]
    Downtime(u64),
    #[error("unknown compression {0:?} (none, lz4, zstd)")]
    Compression(String),
    #[error("the bandwidth cap must be at least 1 MiB/s")]
    Bandwidth,
    #[error("the timeout must be a positive number of seconds, got {0}")]
    Timeout(f64),
}

impl MigrationParams {
    /// Checks every field.
    pub fn validate(&self) -> Result<(), ParamError> {
        if !(1..=MAX_STREAMS).contains(&self.streams) {
            return Err(ParamError::Streams(self.streams));
        }
        if !(1..=MAX_DOWNTIME_MS).contains(&self.max_downtime_ms) {
            return Err(ParamError::Downtime(self.max_downtime_ms));
        }
        if self.max_bandwidth_mibs == Some(0) {
            return Err(ParamError::Bandwidth);
        }
        if let Some(t) = self.timeout_s {
            if !(t > 0.0 && t.is_finite()) {
                return Err(ParamError::Timeout(t));
            }
        }
        Ok(())
    }

    /// The cap in bytes per second.
    pub fn max_bandwidth_bytes(&self) -> Option<u64> {
        self.max_bandwidth_mibs.map(|m| m.saturating_mul(1 << 20))
    }
}

// ---------------------------------------------------------------------------------------------
// Phases

/// Where a migration is. Both ends run these phases in this order (the destination skips
/// `Pause`, which is the source's act); the agent records the phase a migration reached or
/// failed in.
///
/// ```text
/// Connect → Handshake → Preflight → Setup → Precopy(pass n)… → Pause → FinalPages →
/// DeviceState → Ready → Commit → Resumed
/// ```
/// Before `Commit` any failure leaves the VM running on its source; from `Commit` on the
/// destination owns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Phase {
    /// Opening the control connection (or, in a cluster, asking the destination agent).
    #[default]
    Connect,
    /// Protocol versions and session.
    Handshake,
    /// Checks before anything moves (agent level and worker level).
    Preflight,
    /// Data connections, destination memory and VM objects.
    Setup,
    /// Copying memory while the VM runs, pass after pass.
    Precopy,
    /// The source pauses the VM: downtime starts.
    Pause,
    /// The last dirty pages.
    FinalPages,
    /// vCPU and device state sent and loaded on the destination.
    DeviceState,
    /// The destination holds the complete VM and can resume it; the commit is being decided.
    Ready,
    /// The commit point passed: the destination owns the VM and resumes it.
    Commit,
    /// The VM runs on the destination: done.
    Resumed,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 11] = [
        Phase::Connect,
        Phase::Handshake,
        Phase::Preflight,
        Phase::Setup,
        Phase::Precopy,
        Phase::Pause,
        Phase::FinalPages,
        Phase::DeviceState,
        Phase::Ready,
        Phase::Commit,
        Phase::Resumed,
    ];

    /// The name on the wire and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Connect => "connect",
            Phase::Handshake => "handshake",
            Phase::Preflight => "preflight",
            Phase::Setup => "setup",
            Phase::Precopy => "precopy",
            Phase::Pause => "pause",
            Phase::FinalPages => "final-pages",
            Phase::DeviceState => "device-state",
            Phase::Ready => "ready",
            Phase::Commit => "commit",
            Phase::Resumed => "resumed",
        }
    }

    /// Whether the VM is paused on its source in this phase (the downtime runs).
    pub fn in_downtime(self) -> bool {
        matches!(
            self,
            Phase::Pause | Phase::FinalPages | Phase::DeviceState | Phase::Ready | Phase::Commit
        )
    }

    /// Parses a name; also the names earlier versions wrote into the store
    /// ("pre-copy", "switchover (final memory)", "failed in X", ...).
    pub fn parse(s: &str) -> Option<Phase> {
        let s = s.strip_prefix("failed in ").unwrap_or(s);
        Phase::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .or(match s {
                "pre-copy" | "transfer" => Some(Phase::Precopy),
                "final-memory" | "switchover (final memory)" => Some(Phase::FinalPages),
                "state" | "switchover (device state)" => Some(Phase::DeviceState),
                "awaiting commit decision" => Some(Phase::Ready),
                "done" => Some(Phase::Resumed),
                _ => None,
            })
    }
}

/// A phase is its name in every format (JSON and the migration stream's bincode alike), so
/// that the deserializer, which also accepts older names, reads what was written.
impl Serialize for Phase {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Phase {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Phase, D::Error> {
        let s = String::deserialize(d)?;
        Phase::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown migration phase {s:?} (known: {})",
                Phase::ALL.map(|p| p.as_str()).join(", ")
            ))
        })
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Connect => "connect",
            Phase::Handshake => "handshake",
            Phase::Preflight => "preflight",
            Phase::Setup => "setup",
            Phase::Precopy => "pre-copy",
            Phase::Pause => "switchover (pause)",
            Phase::FinalPages => "switchover (final pages)",
            Phase::DeviceState => "switchover (device state)",
            Phase::Ready => "switchover (ready, commit pending)",
            Phase::Commit => "commit",
            Phase::Resumed => "resumed",
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Progress and results

/// Live progress (like QEMU's query-migrate), streamed by the worker and the agent.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(default)]
pub struct Progress {
    pub phase: Phase,
    pub pass: u32,
    /// Bytes written to the data streams (headers included), all passes.
    pub bytes_sent: u64,
    /// Pages sent (data + zero markers), all passes.
    pub pages_sent: u64,
    pub zero_pages: u64,
    /// Pages dirty and not yet sent.
    pub remaining_pages: u64,
    pub remaining_bytes: u64,
    /// Rate at which the guest dirtied memory during the last pass.
    pub dirty_rate_mibs: f64,
    /// Measured rate at which guest data pages reach the destination (before compression).
    pub bandwidth_mibs: f64,
    /// remaining bytes / bandwidth + measured fixed switchover cost.
    pub expected_downtime_ms: f64,
    /// Auto-converge throttle of the guest's vCPUs, in percent.
    pub throttle_pct: u8,
    pub elapsed_s: f64,
}

/// Downtime by phase.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(default)]
pub struct DowntimeBreakdown {
    /// Pause → last dirty pages applied on the destination.
    pub final_memory_ms: f64,
    /// State saved, sent, restored on the destination (until it says Ready).
    pub state_ms: f64,
    /// Ready → destination reports resumed: the commit decision (in a cluster the store's
    /// compare-and-swap), the Commit message and the resume.
    pub commit_ms: f64,
    /// Of `commit_ms`, the time the commit decision took (the store's swap in a cluster).
    pub decision_ms: f64,
    /// Of `commit_ms`, the time the destination spent starting the vCPUs.
    pub resume_ms: f64,
}

/// A host, as preflight reports show it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(default)]
pub struct HostSummary {
    pub vendor: String,
    pub model: String,
    pub cpus: u32,
    pub free_memory_mib: u64,
    /// Name of the CPU profile the host's offer is restricted to, if any.
    pub cpu_limit_profile: Option<String>,
}

/// The destination's preflight answer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(default)]
pub struct PreflightReport {
    pub ok: bool,
    /// Every reason the VM cannot come here (empty when ok).
    pub problems: Vec<String>,
    /// CPU features the VM uses that the destination lacks.
    pub missing_features: Vec<String>,
    pub destination: HostSummary,
    /// Measured on a scratch VM of the same vCPU count: restore of state + resume.
    pub restore_cost_us: u64,
}

/// The result of a completed migration (or of a dry run).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(default)]
pub struct Summary {
    pub dry_run: bool,
    pub preflight: PreflightReport,
    pub total_ms: f64,
    pub downtime_ms: f64,
    pub downtime: DowntimeBreakdown,
    /// Pre-copy passes plus the final pass.
    pub passes: u32,
    pub bytes_sent: u64,
    pub pages_sent: u64,
    pub zero_pages: u64,
    pub data_pages: u64,
    pub state_bytes: u64,
    pub max_throttle_pct: u8,
    pub streams: u16,
    pub compression: Compression,
    /// Bandwidth of the first (full) pass.
    pub pass0_mibs: f64,
    /// Estimated fixed switchover cost used for the downtime estimate.
    pub fixed_cost_ms: f64,
    /// Wire protocol version the two workers spoke.
    pub protocol: u32,
}

// ---------------------------------------------------------------------------------------------
// Failures

/// What kind of failure ended a migration.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// The request itself was invalid (bad parameters, VM not running, already migrating).
    BadRequest,
    /// A preflight check refused the destination (CPU, memory, storage, network, versions).
    Refused,
    /// Cancelled by request.
    Cancelled,
    /// The migration's time limit passed.
    TimedOut,
    /// Pre-copy did not converge.
    NotConverging,
    /// The peer (worker or agent) disappeared or the network failed.
    PeerLost,
    /// The peer said something that breaks the protocol (corrupt, out of order, lying).
    Protocol,
    /// The peer could not be authenticated: TLS (certificate, node identity) or the
    /// migration's one-time secret.
    Unauthenticated,
    /// The peer gave up and said why.
    PeerAborted,
    /// Something failed on this host (KVM, memory, disks).
    Local,
    /// The commit was refused: the VM's owner did not change.
    CommitRefused,
    /// Whether the commit happened is not known (e.g. the store did not answer); the VM is
    /// left paused until its owner is settled.
    CommitUnknown,
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailureKind::BadRequest => "bad request",
            FailureKind::Refused => "refused",
            FailureKind::Cancelled => "cancelled",
            FailureKind::TimedOut => "timed out",
            FailureKind::NotConverging => "not converging",
            FailureKind::PeerLost => "peer lost",
            FailureKind::Protocol => "protocol violation",
            FailureKind::Unauthenticated => "not authenticated",
            FailureKind::PeerAborted => "aborted by the peer",
            FailureKind::Local => "local error",
            FailureKind::CommitRefused => "commit refused",
            FailureKind::CommitUnknown => "commit outcome unknown",
        })
    }
}

/// Where a failure happened relative to the commit point.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CommitPoint {
    /// Before it: the destination never owned the VM.
    #[default]
    Before,
    /// After it: the destination owns the VM (the source never runs it again).
    After,
    /// Not known: the source holds the VM paused until someone who knows settles it.
    Unknown,
}

/// A failed migration: where, what kind, why (with the underlying cause), and where the VM is.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, thiserror::Error)]
#[error("migration failed in {phase}: {}", self.reason())]
pub struct MigrationFailure {
    pub phase: Phase,
    pub kind: FailureKind,
    /// What went wrong, in words.
    pub message: String,
    /// The underlying error (OS error, decoder message), if any.
    #[serde(default)]
    pub cause: Option<String>,
    #[serde(default)]
    pub commit: CommitPoint,
    /// The VM runs on the source (true for every failure before the commit point, unless the
    /// source could not take its disks back).
    pub source_running: bool,
}

impl MigrationFailure {
    /// A failure before the commit point; the VM runs on the source.
    pub fn before(phase: Phase, kind: FailureKind, message: impl Into<String>) -> Self {
        MigrationFailure {
            phase,
            kind,
            message: message.into(),
            cause: None,
            commit: CommitPoint::Before,
            source_running: true,
        }
    }

    /// With the underlying cause.
    pub fn caused_by(mut self, cause: impl fmt::Display) -> Self {
        self.cause = Some(cause.to_string());
        self
    }

    /// Message and cause as one line.
    pub fn reason(&self) -> String {
        match &self.cause {
            Some(c) if !c.is_empty() => format!("{}: {c}", self.message),
            _ => self.message.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_defaults_and_validation() {
        let p: MigrationParams = serde_json::from_str("{}").unwrap();
        assert_eq!(p, MigrationParams::default());
        assert_eq!(p.max_downtime_ms, 50);
        p.validate().unwrap();
        let p: MigrationParams = serde_json::from_str(r#"{"compress":"lz4","streams":4}"#).unwrap();
        assert_eq!(p.compression, Compression::Lz4);
        assert_eq!(p.streams, 4);
        for (json, err) in [
            (r#"{"streams":0}"#, ParamError::Streams(0)),
            (r#"{"streams":17}"#, ParamError::Streams(17)),
            (r#"{"max_downtime_ms":0}"#, ParamError::Downtime(0)),
            (r#"{"max_bandwidth_mibs":0}"#, ParamError::Bandwidth),
            (r#"{"timeout_s":-1.0}"#, ParamError::Timeout(-1.0)),
        ] {
            let p: MigrationParams = serde_json::from_str(json).unwrap();
            assert_eq!(p.validate(), Err(err), "{json}");
        }
        assert!(serde_json::from_str::<MigrationParams>(r#"{"compression":"gzip"}"#).is_err());
        assert!(serde_json::from_str::<MigrationParams>(r#"{"max_downtme_ms":5}"#).is_err());
        assert_eq!(
            "gzip".parse::<Compression>(),
            Err(ParamError::Compression("gzip".into()))
        );
    }

    #[test]
    fn phases_round_trip_and_accept_legacy_names() {
        for p in Phase::ALL {
            let s = serde_json::to_string(&p).unwrap();
            assert_eq!(s, format!("\"{}\"", p.as_str()));
            assert_eq!(serde_json::from_str::<Phase>(&s).unwrap(), p);
        }
        for (old, p) in [
            ("pre-copy", Phase::Precopy),
            ("failed in pre-copy", Phase::Precopy),
            ("switchover (final memory)", Phase::FinalPages),
            ("switchover (device state)", Phase::DeviceState),
            ("awaiting commit decision", Phase::Ready),
            ("done", Phase::Resumed),
            ("transfer", Phase::Precopy),
        ] {
            assert_eq!(Phase::parse(old), Some(p), "{old}");
        }
        assert!(serde_json::from_str::<Phase>("\"warp\"").is_err());
        let mut sorted = Phase::ALL;
        sorted.sort();
        assert_eq!(sorted, Phase::ALL, "phases are declared in protocol order");
    }

    #[test]
    fn failure_keeps_its_cause() {
        let f = MigrationFailure::before(
            Phase::Precopy,
            FailureKind::PeerLost,
            "lost the destination",
        )
        .caused_by("Connection reset by peer (os error 104)");
        assert_eq!(
            f.to_string(),
            "migration failed in pre-copy: lost the destination: Connection reset by peer (os error 104)"
        );
        let j = serde_json::to_value(&f).unwrap();
        assert_eq!(j["kind"], "peer-lost");
        assert_eq!(j["commit"], "before");
        let back: MigrationFailure = serde_json::from_value(j).unwrap();
        assert_eq!(back, f);
    }
}
