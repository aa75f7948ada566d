//! The `ferry-vmm` worker processes this agent runs, one per VM, and their supervision.
//!
//! Workers are separate processes in their own process group: an agent that dies or restarts
//! does not take running VMs with it. A restarted agent adopts the workers it finds (by their
//! API sockets) for the VMs its node owns.

use contract::worker::{self as api, Reply, Request, WorkerStatus};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One worker.
pub struct Worker {
    pub vm: String,
    pub socket: PathBuf,
    pub serial: PathBuf,
    pub pid: Option<u32>,
    /// The unprivileged user the worker runs as (held for it while this record lives).
    pub uid: Option<UidLease>,
    /// Set before the agent stops the worker or when the VM moved away: its exit is expected.
    pub expected_exit: AtomicBool,
    /// Set by the supervision thread when the process is gone.
    pub exited: AtomicBool,
    pub exit_reason: Mutex<Option<String>>,
}

/// Workers by VM name.
#[derive(Default)]
pub struct Workers {
    map: Mutex<HashMap<String, Arc<Worker>>>,
    /// User IDs given to workers (each VM's worker its own: workers cannot signal or trace
    /// each other, nor touch each other's files).
    uids: Arc<Mutex<HashSet<u32>>>,
}

/// The user IDs an agent gives its workers (`--worker-uids START-END`): each worker runs as
/// its own UID (and the GID of the same number), unprivileged, from this range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    pub start: u32,
    pub end: u32,
}

/// What `ferry agent` uses unless told otherwise: 65536 IDs above the ranges systemd and
/// container runtimes hand out (systemd's container range ends at 1879048191), below 2^31.
pub const DEFAULT_WORKER_UIDS: &str = "2000000000-2000065535";

impl std::str::FromStr for UidRange {
    type Err = String;
    fn from_str(s: &str) -> Result<UidRange, String> {
        let bad = || format!("invalid UID range {s:?}: use START-END (e.g. {DEFAULT_WORKER_UIDS})");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let (start, end): (u32, u32) =
            (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
        if start == 0 || start > end || end >= i32::MAX as u32 {
            return Err(format!(
                "invalid UID range {s:?}: START must be above 0 (root), END at least START and below 2^31-1"
            ));
        }
        Ok(UidRange { start, end })
    }
}

/// A worker's UID, reserved until dropped.
pub struct UidLease {
    pub uid: u32,
    set: Arc<Mutex<HashSet<u32>>>,
}

impl Drop for UidLease {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.uid);
    }
}

/// The effective UID in `/proc/<pid>/status`.
fn uid_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The directory the worker of a VM writes its serial logs to (it owns it; the VM's own
/// directory stays the agent's, so the worker cannot replace its socket or its agent's files).
pub fn console_dir(vm_dir: &Path) -> PathBuf {
    vm_dir.join("console")
}

/// Creates (or takes over) `dir` for `uid`: mode 0700, owned by it. Opened without following
/// a symlink: whatever a worker left in its VM directory is not followed by the agent.
fn prepare_console_dir(dir: &Path, uid: Option<u32>) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let d = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir)?;
    let (u, g) = uid.map(|u| (u, u)).unwrap_or((0, 0));
    // SAFETY: fchown/fchmod on a descriptor this function owns.
    unsafe {
        if libc::fchown(d.as_raw_fd(), u, g) < 0 || libc::fchmod(d.as_raw_fd(), 0o700) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    remove_stale_temp_logs(&d);
    Ok(())
}

/// Removes the temporary serial logs (`vmm::confine::DirHandle::create_temp`) that
/// workers killed before their VM existed left in their console directory `d`: a worker
/// renames its log into place once the VM runs, and removes it when it fails on its own, so
/// a file whose process is gone is nobody's. Names only, removed inside `d` (no path is
/// followed); best effort.
fn remove_stale_temp_logs(d: &std::fs::File) {
    use std::os::fd::AsRawFd;
    let Ok(entries) = std::fs::read_dir(format!("/proc/self/fd/{}", d.as_raw_fd())) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(n) = name.to_str() else { continue };
        let Some(pid) = vmm::confine::temp_creator_pid(n) else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let Ok(c) = std::ffi::CString::new(n) else {
            continue;
        };
        // SAFETY: unlinkat of a plain name (no '/') relative to a directory descriptor this
        // function's caller owns; the result is ignored (best effort).
        unsafe { libc::unlinkat(d.as_raw_fd(), c.as_ptr(), 0) };
    }
}

/// Paths of a VM's files under the agent's data directory.
pub fn vm_dir(data_dir: &Path, vm: &str) -> PathBuf {
    data_dir.join("vms").join(vm)
}

/// Creates a VM's directory (and `vms/` above it) private to the agent's user (0700): its
/// worker's socket, serial log, secrets and planned config live there.
pub fn create_vm_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    // An existing directory (from an older agent) gets the mode too.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

impl Workers {
    pub fn get(&self, vm: &str) -> Option<Arc<Worker>> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(vm)
            .cloned()
    }

    pub fn remove(&self, vm: &str) -> Option<Arc<Worker>> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(vm)
    }

    pub fn all(&self) -> Vec<Arc<Worker>> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn insert(&self, w: Arc<Worker>) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(w.vm.clone(), w);
    }

    /// A free UID of `range` for a new worker, reserved.
    fn lease_uid(&self, range: UidRange) -> anyhow::Result<UidLease> {
        let mut set = self.uids.lock().unwrap_or_else(|e| e.into_inner());
        let uid = (range.start..=range.end)
            .find(|u| !set.contains(u))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no free worker UID left in {}-{} (--worker-uids)",
                    range.start,
                    range.end
                )
            })?;
        set.insert(uid);
        Ok(UidLease {
            uid,
            set: self.uids.clone(),
        })
    }

    /// Starts a worker with `args` (a `run` or `receive` command line), as its own user from
    /// `uids` (`None`: as this agent's user, root); returns it once its API answers.
    pub fn spawn(
        &self,
        bin: &Path,
        data_dir: &Path,
        vm: &str,
        args: &[String],
        uids: Option<UidRange>,
    ) -> anyhow::Result<Arc<Worker>> {
        let dir = vm_dir(data_dir, vm);
        create_vm_dir(&dir)?;
        let socket = dir.join("api.sock");
        let console = console_dir(&dir);
        let serial = console.join("serial.log");
        if socket.exists()
            && api::call(&socket, &Request::Status, Some(Duration::from_secs(2))).is_ok()
        {
            anyhow::bail!("a worker for VM {vm} is already running on this node");
        }
        let lease = uids.map(|r| self.lease_uid(r)).transpose()?;
        prepare_console_dir(&console, lease.as_ref().map(|l| l.uid))
            .map_err(|e| anyhow::anyhow!("{}: {e}", console.display()))?;
        let log = {
            use std::os::unix::fs::OpenOptionsExt;
            let p = dir.join("worker.log");
            let _ = std::fs::remove_file(&p);
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&p)?
        };
        let mut cmd = Command::new(bin);
        cmd.args(args);
        if let Some(l) = &lease {
            cmd.arg("--user").arg(format!("{0}:{0}", l.uid));
        }
        cmd.arg("--serial-log")
            .arg(&serial)
            .arg("--api-socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        // Own process group: a signal to the agent's group does not reach the VM.
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", bin.display()))?;
        // Started once its API answers (an unprivileged worker binds its socket before it
        // drops root, then builds the VM, then serves).
        let t0 = Instant::now();
        loop {
            if let Some(st) = child.try_wait()? {
                let log = std::fs::read_to_string(dir.join("worker.log")).unwrap_or_default();
                anyhow::bail!("worker for {vm} exited ({st}): {}", log.trim());
            }
            if t0.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("worker for {vm} did not start within 30 s");
            }
            if socket.exists()
                && api::call(&socket, &Request::Status, Some(Duration::from_millis(500))).is_ok()
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let w = Arc::new(Worker {
            vm: vm.into(),
            socket,
            serial,
            uid: lease,
            pid: Some(child.id()),
            expected_exit: AtomicBool::new(false),
            exited: AtomicBool::new(false),
            exit_reason: Mutex::new(None),
        });
        let w2 = w.clone();
        std::thread::spawn(move || supervise(child, w2));
        Ok(w)
    }

    /// Adopts a worker that is already running (found after an agent restart).
    pub fn adopt(&self, data_dir: &Path, vm: &str) -> Option<Arc<Worker>> {
        let dir = vm_dir(data_dir, vm);
        let socket = dir.join("api.sock");
        let st = api::status(&socket, Some(Duration::from_secs(2))).ok()?;
        let pid = Some(st.pid);
        // Its UID stays reserved while this agent knows the worker.
        let uid = uid_of(st.pid).filter(|u| *u != 0).map(|uid| {
            self.uids
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(uid);
            UidLease {
                uid,
                set: self.uids.clone(),
            }
        });
        let w = Arc::new(Worker {
            vm: vm.into(),
            socket,
            serial: console_dir(&dir).join("serial.log"),
            uid,
            pid,
            expected_exit: AtomicBool::new(false),
            exited: AtomicBool::new(false),
            exit_reason: Mutex::new(None),
        });
        self.insert(w.clone());
        Some(w)
    }
}

fn supervise(mut child: Child, w: Arc<Worker>) {
    let status = child.wait();
    let log = std::fs::read_to_string(w.socket.with_file_name("worker.log")).unwrap_or_default();
    let last = log.lines().last().unwrap_or("").trim().to_string();
    let reason = match status {
        Ok(s) => format!(
            "worker exited ({s}){}",
            if last.is_empty() {
                String::new()
            } else {
                format!(": {last}")
            }
        ),
        Err(e) => format!("worker lost: {e}"),
    };
    *w.exit_reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
    w.exited.store(true, Ordering::SeqCst);
}

impl Worker {
    /// Calls the worker's control API (an error reply is an error).
    pub fn call(&self, req: &Request) -> Result<Reply, api::ClientError> {
        api::call(&self.socket, req, Some(Duration::from_secs(30)))
    }

    /// Whether the process is alive (for adopted workers: whether its API answers).
    pub fn alive(&self) -> bool {
        if self.exited.load(Ordering::SeqCst) {
            return false;
        }
        match self.pid {
            // SAFETY: kill with signal 0 only checks for existence.
            Some(pid) => unsafe { libc::kill(pid as i32, 0) == 0 },
            None => api::call(&self.socket, &Request::Status, Some(Duration::from_secs(2))).is_ok(),
        }
    }

    /// Stops the worker (and its VM) and waits for it to go.
    pub fn stop(&self) {
        self.expected_exit.store(true, Ordering::SeqCst);
        let _ = api::call(
            &self.socket,
            &Request::Shutdown,
            Some(Duration::from_secs(5)),
        );
        let t0 = Instant::now();
        while self.alive() && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.alive() {
            if let Some(pid) = self.pid {
                // SAFETY: plain kill(2) of our own child.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }

    /// What the worker says about itself.
    pub fn state(&self) -> Option<WorkerStatus> {
        api::status(&self.socket, Some(Duration::from_secs(5))).ok()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_logs_of_gone_workers_are_removed() {
        let dir = std::env::temp_dir().join(format!("ferry-console-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // A PID above any pid_max: no such process.
        let gone = dir.join(".serial.log.4294967.0123456789abcdef.tmp");
        let mine = dir.join(format!(
            ".serial.log.{}.0123456789abcdef.tmp",
            std::process::id()
        ));
        let log = dir.join("serial.log");
        for f in [&gone, &mine, &log] {
            std::fs::write(f, b"x").unwrap();
        }
        super::remove_stale_temp_logs(&std::fs::File::open(&dir).unwrap());
        assert!(!gone.exists());
        assert!(mine.exists() && log.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
