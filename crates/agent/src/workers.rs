//! The `ferry-vmm` worker processes this agent runs, one per VM, and their supervision.
//!
//! Workers are separate processes in their own process group: an agent that dies or restarts
//! does not take running VMs with it. A restarted agent adopts the workers it finds (by their
//! API sockets) for the VMs its node owns.

use contract::worker::{self as api, Reply, Request, WorkerStatus};
use std::collections::HashMap;
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

    /// Starts a worker with `args` (a `run` or `receive` command line); returns it once its API
    /// socket exists.
    pub fn spawn(
        &self,
        bin: &Path,
        data_dir: &Path,
        vm: &str,
        args: &[String],
    ) -> anyhow::Result<Arc<Worker>> {
        let dir = vm_dir(data_dir, vm);
        create_vm_dir(&dir)?;
        let socket = dir.join("api.sock");
        let serial = dir.join("serial.log");
        if socket.exists()
            && api::call(&socket, &Request::Status, Some(Duration::from_secs(2))).is_ok()
        {
            anyhow::bail!("a worker for VM {vm} is already running on this node");
        }
        let log = std::fs::File::create(dir.join("worker.log"))?;
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .arg("--serial-log")
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
        let t0 = Instant::now();
        while !socket.exists() {
            if let Some(st) = child.try_wait()? {
                let log = std::fs::read_to_string(dir.join("worker.log")).unwrap_or_default();
                anyhow::bail!("worker for {vm} exited ({st}): {}", log.trim());
            }
            if t0.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                anyhow::bail!("worker for {vm} did not start within 30 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let w = Arc::new(Worker {
            vm: vm.into(),
            socket,
            serial,
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
        let w = Arc::new(Worker {
            vm: vm.into(),
            socket,
            serial: dir.join("serial.log"),
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
