//! Ferry's network test bed and prober — support for tests and benchmarks, kept out of the
//! agent's production code.
//!
//! * [`bed`] — a multi-node test bed of real network and mount namespaces: nodes with their
//!   agents, bridges and TAPs, a switch, a client, shared storage one node can lose.
//! * [`netprobe`] — an ICMP + UDP echo prober at a fixed interval with verified replies, losses
//!   and the longest gap between replies (`ferry netprobe`).
//! * [`clock`] — wall-clock agreement between test hosts that have no NTP (`ferry clock`).
//! * [`initramfs`] — a newc cpio writer and the initramfs of a stock Linux guest running
//!   `ferry-linux-guest` (busybox /init, kernel modules, network from the command line).
//! * [`disk_seqs`] — the acknowledged records of a disk-log guest's serial log.

pub mod bed;
pub mod clock;
pub mod initramfs;
pub mod netprobe;

pub use bed::{in_netns, shutdown_workers, Testbed};

/// The `disk seq=N` records of a disk-log guest's serial log (the test guest and
/// `ferry-linux-guest` print the same lines), in order, from complete lines only: a line cut
/// by a pause or a move is not counted (it ends in the next log).
pub fn disk_seqs(log: &str) -> Vec<u64> {
    let complete = &log[..log.rfind('\n').map(|i| i + 1).unwrap_or(0)];
    complete
        .lines()
        .filter_map(|l| l.strip_prefix("disk seq="))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}
