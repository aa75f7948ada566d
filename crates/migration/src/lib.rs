//! Ferry live migration: pre-copy of a running VM from one worker process to another over TCP.
//!
//! * [`wire`] — framing (length + CRC-32C per frame), control messages, page batches, and the
//!   protocol versions this build speaks (current and previous).
//! * [`preflight`] — destination checks before anything moves.
//! * [`cost`] — the measured fixed cost of a switchover on this host (and its cache).
//! * [`policy`] — the convergence policy: a pure function of the pass history.
//! * [`send`] — the source: one method per phase, from handshake to the commit.
//! * [`recv`] — the destination's mirror image, ending with a resumed VM.
//!
//! Types that cross process boundaries (parameters, phases, progress, summaries, failures)
//! are the [`contract`] crate's.
//!
//! Safety rule: until the commit point (the source's `Commit` message, or in a cluster the
//! store's compare-and-swap of the VM's owner) any failure leaves the VM running on the source
//! and the destination discards what it received. After it, the destination owns the VM and the
//! source never resumes it.

pub mod cost;
pub mod policy;
pub mod preflight;
pub mod recv;
pub mod send;
pub mod wire;

pub use contract::{
    CommitPoint, DowntimeBreakdown, FailureKind, MigrationFailure, MigrationParams, Phase,
    Progress, Summary,
};
