//! The worker's side of the control API.

use crate::api::{
    CommitDecision, DecisionLine, Direction, MigrateCommand, MigrationStatus, Reply, Request,
    SnapshotReply, WorkerState, WorkerStatus, WorkerVm, MAX_LINE,
};
use contract::{FailureKind, MigrationFailure, Phase};
use migration::recv::{Decision, ReceiveControl};
use migration::send::{CommitGate, MigrationControl, SendOptions, SourceDecides};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::vm::VmEvent;
use vmm::Vm;

/// How often a running migration reports progress to its `ctl migrate` client.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// Fails if a live process serves `path` already.
pub fn check_free(path: &Path) -> anyhow::Result<()> {
    if path.exists() && UnixStream::connect(path).is_ok() {
        anyhow::bail!("API socket {} is in use by another process", path.display());
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            anyhow::bail!(
                "cannot create API socket {}: directory {} does not exist",
                path.display(),
                dir.display()
            );
        }
    }
    Ok(())
}

/// Binds `path`, refusing if another live worker owns it, replacing a stale socket file.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    check_free(path)?;
    if path.exists() {
        std::fs::remove_file(path).map_err(|e| {
            anyhow::anyhow!("cannot remove stale API socket {}: {e}", path.display())
        })?;
    }
    let l = UnixListener::bind(path)
        .map_err(|e| anyhow::anyhow!("cannot bind API socket {}: {e}", path.display()))?;
    // Only the worker's own user (and root) may connect: the mode says so to the kernel,
    // and every connection's peer credentials are checked again ([`peer_allowed`]).
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|e| anyhow::anyhow!("cannot restrict API socket {}: {e}", path.display()))?;
    Ok(l)
}

/// The uid of the process at the other end of `conn` (SO_PEERCRED: what the kernel recorded
/// when it connected, not anything the peer says).
fn peer_uid(conn: &UnixStream) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes and `len` is the size of `cred`, which is
    // what SO_PEERCRED writes; the descriptor is the open socket `conn` owns.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Whether a client may use this worker's API: its own user or root.
fn peer_allowed(conn: &UnixStream) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    match peer_uid(conn) {
        Ok(uid) if uid == me || uid == 0 => Ok(()),
        Ok(uid) => Err(format!(
            "API socket: uid {uid} may not use this worker (only uid {me} and root)"
        )),
        Err(e) => Err(format!(
            "API socket: cannot read the peer's credentials: {e}"
        )),
    }
}

/// What the control server serves.
pub struct Ctx {
    /// The VM (none yet while a `receive` worker waits for one).
    pub vm: Mutex<Option<Arc<Vm>>>,
    pub started: Instant,
    pub socket: PathBuf,
    /// The outgoing migration, if one ran or runs.
    pub outgoing: Mutex<Option<Arc<MigrationControl>>>,
    /// True while an outgoing migration runs.
    pub migrating: std::sync::atomic::AtomicBool,
    /// Progress of the incoming migration (receive mode).
    pub incoming: Option<Arc<ReceiveControl>>,
    /// Receive mode with an external commit: where `commit`/`abort` requests go.
    pub decision: Option<Arc<Decision>>,
    /// Receive mode: where the receiver listens for the source.
    pub listen: Option<String>,
    /// Receive mode: the cluster migration this receiver serves.
    pub migration_id: Option<String>,
}

impl Ctx {
    pub fn new(vm: Option<Arc<Vm>>, socket: PathBuf, incoming: Option<Arc<ReceiveControl>>) -> Ctx {
        Ctx {
            vm: Mutex::new(vm),
            started: Instant::now(),
            socket,
            outgoing: Mutex::new(None),
            migrating: false.into(),
            incoming,
            decision: None,
            listen: None,
            migration_id: None,
        }
    }

    fn vm(&self) -> Option<Arc<Vm>> {
        self.vm.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Serves connections until the process exits (one thread per client).
pub fn serve(listener: UnixListener, ctx: Arc<Ctx>) {
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let ctx = ctx.clone();
                let _ = std::thread::Builder::new()
                    .name("api-client".into())
                    .spawn(move || client(conn, &ctx));
            }
        })
        .expect("cannot start the API thread");
}

fn client(conn: UnixStream, ctx: &Arc<Ctx>) {
    let Ok(write_half) = conn.try_clone() else {
        return;
    };
    let mut w = write_half;
    if let Err(e) = peer_allowed(&conn) {
        eprintln!("ferry-vmm: {e}");
        let _ = reply(&mut w, &Reply::error(e));
        return;
    }
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        match (&mut r).take(MAX_LINE as u64 + 1).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(n) if n > MAX_LINE => {
                let _ = reply(
                    &mut w,
                    &Reply::error(format!("request longer than {MAX_LINE} bytes")),
                );
                return;
            }
            Ok(_) => {}
        }
        let resp = match serde_json::from_str::<Request>(line.trim()) {
            Ok(Request::Shutdown) => {
                let _ = reply(&mut w, &Reply::Stopping);
                match ctx.vm() {
                    Some(vm) => vm.request_stop(),
                    None => {
                        let _ = std::fs::remove_file(&ctx.socket);
                        eprintln!("ferry-vmm: stopped by request while waiting for a migration");
                        std::process::exit(0);
                    }
                }
                return;
            }
            Ok(Request::Migrate(args)) => {
                migrate(args, ctx, &mut w, &mut r);
                return;
            }
            Ok(req) => handle(req, ctx),
            Err(e) => Reply::error(format!("bad request: {e}")),
        };
        if reply(&mut w, &resp).is_err() {
            return;
        }
    }
}

fn reply(w: &mut UnixStream, resp: &Reply) -> std::io::Result<()> {
    let mut s = serde_json::to_string(resp).expect("responses always serialize");
    s.push('\n');
    w.write_all(s.as_bytes())
}

fn worker_state(s: vmm::VmRunState) -> WorkerState {
    match s {
        vmm::VmRunState::Created => WorkerState::Created,
        vmm::VmRunState::Running => WorkerState::Running,
        vmm::VmRunState::Paused => WorkerState::Paused,
        vmm::VmRunState::Stopped => WorkerState::Stopped,
    }
}

/// The worker's status.
pub fn status(ctx: &Ctx) -> WorkerStatus {
    let vm = ctx.vm();
    let state = vm
        .as_ref()
        .map(|v| worker_state(v.run_state()))
        .unwrap_or(WorkerState::Receiving);
    let vm_info = vm.as_ref().map(|vm| {
        let c = vm.config();
        WorkerVm {
            vcpus: c.vcpus,
            memory_mib: c.memory_mib,
            kernel: c.kernel.to_string(),
            cmdline: c.cmdline.clone(),
            cpu_profile: c.cpu_profile.clone(),
            throttle_pct: vm.throttle(),
            stop_reason: vm.event().map(|e| e.to_string()),
            guest_tsc_lead: vm.tsc_lead(),
            huge_pages: vm.ram().huge_pages(),
        }
    });
    let outgoing = ctx
        .outgoing
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let migration = if let Some(out) = outgoing {
        Some(MigrationStatus {
            direction: Direction::Outgoing,
            active: ctx.migrating.load(Ordering::SeqCst),
            progress: out.snapshot(),
            awaiting_decision: false,
            source_connected: false,
            failure: out
                .failure
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        })
    } else {
        ctx.incoming.as_ref().map(|inc| MigrationStatus {
            direction: Direction::Incoming,
            active: vm.is_none(),
            progress: inc.snapshot(),
            awaiting_decision: inc.awaiting_decision.load(Ordering::SeqCst),
            source_connected: inc.source_connected.load(Ordering::SeqCst),
            failure: inc
                .failure
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        })
    };
    WorkerStatus {
        pid: std::process::id(),
        uptime_s: ctx.started.elapsed().as_secs_f64(),
        state,
        vm: vm_info,
        listen: if vm.is_none() {
            ctx.listen.clone()
        } else {
            None
        },
        external_commit: ctx.decision.is_some(),
        migration_id: ctx.migration_id.clone(),
        migration,
    }
}

fn handle(req: Request, ctx: &Ctx) -> Reply {
    match req {
        Request::Status => return Reply::Status(status(ctx)),
        Request::Commit | Request::Abort => {
            return match &ctx.decision {
                Some(d) => {
                    let commit = d.set(matches!(req, Request::Commit));
                    Reply::Decided {
                        decision: if commit {
                            CommitDecision::Commit
                        } else {
                            CommitDecision::Abort
                        },
                    }
                }
                None => Reply::error("this worker does not take commit decisions (not a receive --external-commit worker)"),
            }
        }
        Request::Cancel => {
            return match ctx
                .outgoing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
            {
                Some(m) if ctx.migrating.load(Ordering::SeqCst) => {
                    m.cancel.store(true, Ordering::SeqCst);
                    Reply::Cancelling
                }
                _ => Reply::error("no migration is running"),
            }
        }
        _ => {}
    }
    let Some(vm) = ctx.vm() else {
        return Reply::error("no VM here yet: this worker is waiting for an incoming migration");
    };
    if ctx.migrating.load(Ordering::SeqCst) {
        return Reply::error("a migration is running: cancel it first");
    }
    let state = |vm: &Vm| Reply::State {
        state: worker_state(vm.run_state()),
    };
    match req {
        Request::Pause => match vm.pause() {
            Ok(()) => state(&vm),
            Err(e) => Reply::error(e.to_string()),
        },
        Request::Resume => match vm.resume() {
            Ok(()) => {
                // After a failed migration the destination may have announced the VM's MACs
                // (it does once the source pauses): claim the traffic back.
                vm.virtio().announce();
                state(&vm)
            }
            Err(e) => Reply::error(e.to_string()),
        },
        Request::Snapshot { path } => {
            let t0 = Instant::now();
            match vmm::snapshot::take(&vm, &path) {
                Ok(s) => Reply::Snapshot(SnapshotReply {
                    path,
                    file_bytes: s.file_bytes,
                    data_pages: s.data_pages,
                    total_pages: s.total_pages,
                    state_bytes: s.state_bytes,
                    write_seconds: s.seconds,
                    paused_seconds: t0.elapsed().as_secs_f64(),
                    state: worker_state(vm.run_state()),
                }),
                Err(e) => Reply::error(e.to_string()),
            }
        }
        Request::Status
        | Request::Cancel
        | Request::Shutdown
        | Request::Migrate(_)
        | Request::Commit
        | Request::Abort => Reply::error("internal error: request handled elsewhere"),
    }
}

/// What the migration thread tells the API handler.
enum MigEvent {
    Done(Box<Result<contract::Summary, MigrationFailure>>),
    /// Ask the client (`CommitReady` for the commit, `HandoverReady` for the handover).
    Ask(Question, std::sync::mpsc::Sender<Result<bool, String>>),
}

/// What the migration thread asks the client.
#[derive(Clone, Copy)]
enum Question {
    Commit,
    Handover,
}

/// A commit gate answered by the API client (the cluster agent): its decision follows the
/// store's compare-and-swap, which is the commit point; or, handed over, the store records
/// once that the stream's `Commit` decides.
struct ClientGate {
    events: Mutex<std::sync::mpsc::Sender<MigEvent>>,
    handover: bool,
}

impl ClientGate {
    fn ask(
        &self,
        question: Question,
    ) -> Result<std::sync::mpsc::Receiver<Result<bool, String>>, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(MigEvent::Ask(question, tx))
            .map_err(|_| "the API handler is gone".to_string())?;
        Ok(rx)
    }
}

impl CommitGate for ClientGate {
    fn decide(&self) -> Result<bool, String> {
        self.ask(Question::Commit)?
            .recv()
            .map_err(|_| "the API handler is gone".to_string())?
    }

    fn decision_is_commit_point(&self) -> bool {
        true
    }

    fn hand_over(&self) -> Option<std::sync::mpsc::Receiver<Result<bool, String>>> {
        if !self.handover {
            return None;
        }
        Some(self.ask(Question::Handover).unwrap_or_else(|e| {
            let (tx, rx) = std::sync::mpsc::channel();
            let _ = tx.send(Err(e));
            rx
        }))
    }
}

/// Asks the client `question` on its connection and reads its decision.
fn ask_client(
    question: Question,
    w: &mut UnixStream,
    r: &mut BufReader<UnixStream>,
) -> Result<bool, String> {
    let question = match question {
        Question::Commit => Reply::CommitReady,
        Question::Handover => Reply::HandoverReady,
    };
    reply(w, &question).map_err(|e| format!("cannot ask the client: {e}"))?;
    let mut line = String::new();
    match (&mut *r).take(MAX_LINE as u64).read_line(&mut line) {
        Ok(0) => Err("the client disconnected before deciding".into()),
        Ok(_) => match serde_json::from_str::<DecisionLine>(&line) {
            Ok(DecisionLine {
                decision: CommitDecision::Commit,
            }) => Ok(true),
            Ok(DecisionLine {
                decision: CommitDecision::Abort,
            }) => Ok(false),
            Err(e) => Err(format!(
                "the client sent no decision ({e}): {}",
                line.trim()
            )),
        },
        Err(e) => Err(format!("cannot read the client's decision: {e}")),
    }
}

fn refuse(w: &mut UnixStream, msg: impl Into<String>) {
    let f = MigrationFailure::before(Phase::Connect, FailureKind::BadRequest, msg);
    let _ = reply(w, &Reply::Failed(f));
}

/// Runs an outgoing migration, streaming progress lines to the client; the last line is the
/// outcome. The migration belongs to the worker: it goes on if the client disconnects.
fn migrate(cmd: MigrateCommand, ctx: &Arc<Ctx>, w: &mut UnixStream, r: &mut BufReader<UnixStream>) {
    let Some(vm) = ctx.vm() else {
        return refuse(w, "no VM here to migrate");
    };
    if let Err(e) = cmd.params.validate() {
        return refuse(w, e.to_string());
    }
    if vm.run_state() != vmm::VmRunState::Running {
        return refuse(
            w,
            format!(
                "the VM is {}; only a running VM can be live-migrated",
                worker_state(vm.run_state())
            ),
        );
    }
    let tls = match crate::security::client_tls(&cmd.transport) {
        Ok(t) => t,
        Err(e) => return refuse(w, format!("{e:#}")),
    };
    if tls.is_none() {
        eprintln!("{}", crate::security::INSECURE_WARNING);
    }
    if ctx.migrating.swap(true, Ordering::SeqCst) {
        return refuse(w, "a migration is already running");
    }
    let opts = SendOptions {
        to: cmd.to.clone(),
        params: cmd.params.clone(),
        dry_run: cmd.dry_run,
        max_protocol: cmd
            .max_protocol
            .unwrap_or(migration::wire::PROTOCOL_VERSION),
        state_version: migration::wire::STATE_VERSION,
        tls,
        secret: cmd.secret.clone(),
    };
    let mctl = Arc::new(MigrationControl::default());
    *ctx.outgoing.lock().unwrap_or_else(|e| e.into_inner()) = Some(mctl.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let (vm, mctl, ctx2) = (vm.clone(), mctl.clone(), ctx.clone());
        let external = cmd.external_commit;
        let handover = cmd.external_commit && cmd.handover;
        std::thread::Builder::new()
            .name("migrate".into())
            .spawn(move || {
                let result = if external {
                    let gate = ClientGate {
                        events: Mutex::new(tx.clone()),
                        handover,
                    };
                    migration::send::migrate_gated(&vm, &opts, &mctl, &gate)
                } else {
                    migration::send::migrate_gated(&vm, &opts, &mctl, &SourceDecides)
                };
                ctx2.migrating.store(false, Ordering::SeqCst);
                let _ = tx.send(MigEvent::Done(Box::new(result)));
            })
            .expect("cannot start the migration thread");
    }
    let mut client_gone = false;
    let mut moved = false;
    let final_reply = loop {
        match rx.recv_timeout(PROGRESS_EVERY) {
            Ok(MigEvent::Ask(question, answer)) => {
                let d = if client_gone {
                    Err("the client is gone".to_string())
                } else {
                    ask_client(question, w, r)
                };
                client_gone |= d.is_err();
                let _ = answer.send(d);
            }
            Ok(MigEvent::Done(res)) => match *res {
                Ok(summary) => {
                    moved = !summary.dry_run;
                    break Reply::Done(summary);
                }
                Err(f) => break Reply::Failed(f),
            },
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if !client_gone {
                    client_gone = reply(w, &Reply::Progress(mctl.snapshot())).is_err();
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                break Reply::error("the migration thread ended without a result");
            }
        }
    };
    if !client_gone {
        let _ = reply(w, &final_reply);
    }
    if moved {
        // The destination owns the VM now; this worker ends (after the client got its answer).
        vm.request_stop_with(VmEvent::Migrated { to: cmd.to });
    }
}
