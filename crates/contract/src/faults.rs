//! Typed fault-injection points for the fault-matrix tests. Compiled in only with the
//! `fault-injection` feature (the test suite's builds); in every other build [`hit`] is empty.
//!
//! A process started with `FERRY_FAULT=<point>` (and `FERRY_FAULT_DIR=<dir>`) that reaches
//! that point writes `<dir>/<point>` holding its pid and stops itself (SIGSTOP), once. The test
//! then kills whichever process the row names and continues (SIGCONT) or kills the stopped
//! one: a kill at an exact phase of a real migration, without timing guesses.

use serde::{Deserialize, Serialize};

/// Where a fault can be injected.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum FaultPoint {
    /// Source agent: preflight passed and the VM is locked for the migration in the store.
    AgentLocked,
    /// Source agent: the store hands the commit over to the migration stream (the handover
    /// swap is done), the worker not yet told.
    AgentHandover,
    /// Source worker: pre-copy pass 0 is under way (its first pages are sent).
    WorkerPass0,
    /// Source worker: pre-copy pass 2 is under way.
    WorkerPass2,
    /// Source worker: the VM is paused (downtime started), nothing of the switchover sent yet.
    WorkerPaused,
    /// Source worker: the destination holds the complete VM (Ready), the commit not decided.
    WorkerReady,
    /// Source agent: the store names the destination owner (the commit point), nobody told.
    AgentAfterCas,
    /// Source worker: `Commit` sent to the destination, `Resumed` not yet received.
    WorkerCommitSent,
}

impl FaultPoint {
    pub const ALL: [FaultPoint; 8] = [
        FaultPoint::AgentLocked,
        FaultPoint::AgentHandover,
        FaultPoint::WorkerPass0,
        FaultPoint::WorkerPass2,
        FaultPoint::WorkerPaused,
        FaultPoint::WorkerReady,
        FaultPoint::AgentAfterCas,
        FaultPoint::WorkerCommitSent,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FaultPoint::AgentLocked => "agent-locked",
            FaultPoint::AgentHandover => "agent-handover",
            FaultPoint::WorkerPass0 => "worker-pass-0",
            FaultPoint::WorkerPass2 => "worker-pass-2",
            FaultPoint::WorkerPaused => "worker-paused",
            FaultPoint::WorkerReady => "worker-ready",
            FaultPoint::AgentAfterCas => "agent-after-cas",
            FaultPoint::WorkerCommitSent => "worker-commit-sent",
        }
    }

    pub fn parse(s: &str) -> Option<FaultPoint> {
        FaultPoint::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// Reached `point`: stops here if the process was started to (only with `fault-injection`).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn hit(_point: FaultPoint) {}

/// Opens `FERRY_FAULT_DIR` now (a worker calls this before it drops root): the marker of
/// [`hit`] is then written through this descriptor, whatever the process can still reach by
/// path (the directory itself must be writable by the worker's user: the tests make it
/// world-writable and sticky, like /tmp).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn hold_dir() {}

#[cfg(feature = "fault-injection")]
static HELD_DIR: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();

/// See the other [`hold_dir`].
#[cfg(feature = "fault-injection")]
pub fn hold_dir() {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = std::env::var_os("FERRY_FAULT_DIR") {
        if let Ok(f) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(dir)
        {
            let _ = HELD_DIR.set(f);
        }
    }
}

/// Reached `point`: stops here if the process was started to (only with `fault-injection`).
#[cfg(feature = "fault-injection")]
pub fn hit(point: FaultPoint) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static FIRED: AtomicBool = AtomicBool::new(false);
    let armed = std::env::var("FERRY_FAULT")
        .ok()
        .and_then(|s| FaultPoint::parse(&s))
        == Some(point);
    if !armed || FIRED.swap(true, Ordering::SeqCst) {
        return;
    }
    // Through the held descriptor if there is one (/proc/self/fd/N leads into it directly).
    let held = HELD_DIR.get().map(|f| {
        use std::os::fd::AsRawFd;
        std::ffi::OsString::from(format!("/proc/self/fd/{}", f.as_raw_fd()))
    });
    if let Some(dir) = held.or_else(|| std::env::var_os("FERRY_FAULT_DIR")) {
        // Written whole under another name, then renamed: whoever sees the marker reads the pid.
        let path = std::path::Path::new(&dir).join(point.as_str());
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, std::process::id().to_string()).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    eprintln!("ferry: fault point {} reached: stopping", point.as_str());
    // SAFETY: raise(2) with a valid signal number has no memory-safety preconditions.
    unsafe {
        libc::raise(libc::SIGSTOP);
    }
}

/// The environment variable that arms [`flip_page`]: `FERRY_FAULT_FLIP=0x<gpa>` (or decimal).
pub const FLIP_ENV: &str = "FERRY_FAULT_FLIP";

/// A migration source started with `FERRY_FAULT_FLIP=<guest-physical address>` flips one bit
/// (byte 2048, mask 0x40) of the guest page at that address in every copy of it that it sends,
/// leaving its own guest memory alone: the destination runs with a corrupt page, which the
/// test guest's memory verifier must report. `None` unless armed, and always `None` without
/// the `fault-injection` feature.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn flip_page() -> Option<u64> {
    None
}

/// See the other [`flip_page`].
#[cfg(feature = "fault-injection")]
pub fn flip_page() -> Option<u64> {
    let v = std::env::var(FLIP_ENV).ok()?;
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

/// Byte and mask of a page that [`flip_page`] flips.
pub const FLIP_BYTE: usize = 2048;
pub const FLIP_MASK: u8 = 0x40;

/// A forbidden system call a worker makes on purpose, to prove its seccomp filters are on
/// (`FERRY_SANDBOX_PROBE=<probe>`; only with `fault-injection`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxProbe {
    /// The worker's main thread, once its VM runs, executes a program.
    Exec,
    /// A vCPU thread, as it starts, opens a network socket.
    VcpuSocket,
    /// A vCPU thread, as it starts, opens an existing file (it may only create new ones).
    VcpuOpen,
    /// The main thread, once its VM runs, opens a netlink socket (only Unix, IPv4 and IPv6
    /// sockets are allowed).
    Netlink,
    /// The main thread, once its VM runs, makes a `TIOCSTI` ioctl (typing into a terminal:
    /// not one of the requests the filter allows).
    Tiocsti,
}

impl SandboxProbe {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxProbe::Exec => "exec",
            SandboxProbe::VcpuSocket => "vcpu-socket",
            SandboxProbe::VcpuOpen => "vcpu-open",
            SandboxProbe::Netlink => "netlink",
            SandboxProbe::Tiocsti => "tiocsti",
        }
    }
}

/// Whether the worker's seccomp filters only log what is off their lists (`FERRY_SECCOMP_LEARN`,
/// to learn the lists over the test suite; never without `fault-injection`).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn seccomp_learning() -> bool {
    false
}

/// Whether the worker's seccomp filters only log what is off their lists (`FERRY_SECCOMP_LEARN`,
/// to learn the lists over the test suite; never without `fault-injection`).
#[cfg(feature = "fault-injection")]
pub fn seccomp_learning() -> bool {
    std::env::var_os("FERRY_SECCOMP_LEARN").is_some()
}

/// Whether this process was started to run `probe` (never without `fault-injection`).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn sandbox_probe(_probe: SandboxProbe) -> bool {
    false
}

/// Whether this process was started to run `probe` (never without `fault-injection`).
#[cfg(feature = "fault-injection")]
pub fn sandbox_probe(probe: SandboxProbe) -> bool {
    std::env::var("FERRY_SANDBOX_PROBE").is_ok_and(|s| s == probe.as_str())
}
