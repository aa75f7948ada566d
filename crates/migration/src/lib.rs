//! Ferry live migration: pre-copy of a running VM from one worker process to another over TCP.
//!
//! * [`wire`] — framing (length + CRC-32C per frame), control messages, page batches.
//! * [`preflight`] — destination checks before anything moves, and measured switchover costs.
//! * [`send`] — the source's state machine: handshake → preflight → pre-copy passes driven by
//!   KVM dirty logging (with auto-converge throttling) → switchover → commit.
//! * [`recv`] — the destination's mirror image, ending with a resumed VM.
//!
//! Safety rule: until the source sends `Commit`, any failure leaves the VM running on the source
//! and the destination discards what it received. After `Commit`, the destination owns the VM
//! and the source never resumes it.

pub mod preflight;
pub mod recv;
pub mod send;
pub mod wire;

use serde::{Deserialize, Serialize};

/// Where a migration is (for progress and for failure reports).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Connect,
    Handshake,
    Preflight,
    Setup,
    Precopy,
    /// VM paused on the source; last dirty pages.
    FinalMemory,
    /// vCPU and device state to the destination, restored there.
    State,
    /// Source gave the word; destination resuming.
    Commit,
    Done,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Connect => "connect",
            Phase::Handshake => "handshake",
            Phase::Preflight => "preflight",
            Phase::Setup => "setup",
            Phase::Precopy => "pre-copy",
            Phase::FinalMemory => "switchover (final memory)",
            Phase::State => "switchover (device state)",
            Phase::Commit => "commit",
            Phase::Done => "done",
        })
    }
}

/// A failed migration: the phase, why, and where the VM is now.
#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize)]
#[error("migration failed in {phase}: {reason}")]
pub struct MigrationError {
    pub phase: Phase,
    pub reason: String,
    /// True when the VM is running on the source (always, unless the failure came after the
    /// commit was sent).
    pub vm_on_source: bool,
}

/// Live progress, as `ctl status` and the progress stream show it (like QEMU's query-migrate).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub phase: String,
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
pub struct DowntimeBreakdown {
    /// Pause → last dirty pages applied on the destination.
    pub final_memory_ms: f64,
    /// State saved, sent, restored on the destination (until it says Ready).
    pub state_ms: f64,
    /// Commit sent → destination reports resumed (includes resume).
    pub commit_ms: f64,
    /// Of which the destination spent starting the vCPUs.
    pub resume_ms: f64,
}

/// The result of a completed migration (or of a dry run).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub dry_run: bool,
    pub preflight: preflight::PreflightReport,
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
    pub compression: wire::Compression,
    /// Bandwidth of the first (full) pass.
    pub pass0_mibs: f64,
    /// Estimated fixed switchover cost used for the downtime estimate.
    pub fixed_cost_ms: f64,
}
