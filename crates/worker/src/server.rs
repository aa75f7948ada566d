//! The worker's side of the control API.

use crate::api::{CommitDecision, MigrateArgs, Request, Response};
use migration::recv::{Decision, ReceiveControl};
use migration::send::{CommitGate, MigrateOptions, MigrationControl, SourceDecides};
use serde_json::json;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::vm::VmEvent;
use vmm::Vm;

/// Maximum request line length; longer lines are refused.
const MAX_REQUEST: usize = 64 * 1024;
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
    UnixListener::bind(path)
        .map_err(|e| anyhow::anyhow!("cannot bind API socket {}: {e}", path.display()))
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
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        match (&mut r).take(MAX_REQUEST as u64 + 1).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(n) if n > MAX_REQUEST => {
                let _ = reply(
                    &mut w,
                    &Response::err(format!("request longer than {MAX_REQUEST} bytes")),
                );
                return;
            }
            Ok(_) => {}
        }
        let resp = match serde_json::from_str::<Request>(line.trim()) {
            Ok(Request::Shutdown) => {
                let _ = reply(&mut w, &Response::ok(json!({"state": "stopping"})));
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
            Err(e) => Response::err(format!("bad request: {e}")),
        };
        if reply(&mut w, &resp).is_err() {
            return;
        }
    }
}

fn reply(w: &mut UnixStream, resp: &Response) -> std::io::Result<()> {
    let mut s = serde_json::to_string(resp).expect("responses always serialize");
    s.push('\n');
    w.write_all(s.as_bytes())
}

/// Status fields.
pub fn status(ctx: &Ctx) -> serde_json::Value {
    let mut v = match ctx.vm() {
        Some(vm) => {
            let c = vm.config();
            json!({
                "state": vm.run_state(),
                "vcpus": c.vcpus,
                "memory_mib": c.memory_mib,
                "kernel": c.kernel.to_string(),
                "cmdline": c.cmdline,
                "cpu_profile": c.cpu_profile,
                "throttle_pct": vm.throttle(),
                "stop_reason": vm.event().map(|e| e.to_string()),
            })
        }
        None => json!({"state": "receiving"}),
    };
    let m = v.as_object_mut().expect("object");
    m.insert("pid".into(), json!(std::process::id()));
    m.insert(
        "uptime_s".into(),
        json!(ctx.started.elapsed().as_secs_f64()),
    );
    if let Some(out) = ctx
        .outgoing
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
    {
        let p = out
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        m.insert("migration".into(), json!({"direction": "outgoing", "active": ctx.migrating.load(Ordering::SeqCst), "progress": p}));
    }
    if let Some(inc) = &ctx.incoming {
        let p = inc
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        m.insert(
            "migration".into(),
            json!({"direction": "incoming", "progress": p}),
        );
    }
    v
}

fn handle(req: Request, ctx: &Ctx) -> Response {
    if let Request::Status = req {
        return Response::ok(status(ctx));
    }
    if let Request::Commit | Request::Abort = req {
        return match &ctx.decision {
            Some(d) => {
                let commit = d.set(matches!(req, Request::Commit));
                Response::ok(json!({"decision": if commit { "commit" } else { "abort" }}))
            }
            None => Response::err("this worker does not take commit decisions (not a receive --external-commit worker)"),
        };
    }
    if let Request::Cancel = req {
        return match ctx
            .outgoing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            Some(m) if ctx.migrating.load(Ordering::SeqCst) => {
                m.cancel.store(true, Ordering::SeqCst);
                Response::ok(json!({"cancelling": true}))
            }
            _ => Response::err("no migration is running"),
        };
    }
    let Some(vm) = ctx.vm() else {
        return Response::err("no VM here yet: this worker is waiting for an incoming migration");
    };
    if ctx.migrating.load(Ordering::SeqCst) {
        return Response::err("a migration is running: cancel it first");
    }
    match req {
        Request::Pause => match vm.pause() {
            Ok(()) => Response::ok(json!({"state": vm.run_state()})),
            Err(e) => Response::err(e.to_string()),
        },
        Request::Resume => match vm.resume() {
            Ok(()) => Response::ok(json!({"state": vm.run_state()})),
            Err(e) => Response::err(e.to_string()),
        },
        Request::Snapshot { path } => {
            let t0 = Instant::now();
            match vmm::snapshot::take(&vm, &path) {
                Ok(s) => Response::ok(json!({
                    "path": path,
                    "file_bytes": s.file_bytes,
                    "data_pages": s.data_pages,
                    "total_pages": s.total_pages,
                    "state_bytes": s.state_bytes,
                    "write_seconds": s.seconds,
                    "paused_seconds": t0.elapsed().as_secs_f64(),
                    "state": vm.run_state(),
                })),
                Err(e) => Response::err(e.to_string()),
            }
        }
        Request::Status
        | Request::Cancel
        | Request::Shutdown
        | Request::Migrate(_)
        | Request::Commit
        | Request::Abort => {
            unreachable!("handled above")
        }
    }
}

/// Runs an outgoing migration, streaming progress lines to the client; the last line is the
/// outcome. The migration belongs to the worker: it goes on if the client disconnects.
enum MigEvent {
    Done(Box<Result<migration::Summary, migration::MigrationError>>),
    Ask(std::sync::mpsc::Sender<Result<bool, String>>),
}

/// A commit gate answered by the API client (the cluster agent).
struct ClientGate(Mutex<std::sync::mpsc::Sender<MigEvent>>);

impl CommitGate for ClientGate {
    fn decide(&self) -> Result<bool, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(MigEvent::Ask(tx))
            .map_err(|_| "the API handler is gone".to_string())?;
        rx.recv()
            .map_err(|_| "the API handler is gone".to_string())?
    }
}

/// Asks the client for the commit decision on its connection.
fn ask_client(w: &mut UnixStream, r: &mut BufReader<UnixStream>) -> Result<bool, String> {
    reply(w, &Response::ok(json!({"event": "commit-ready"})))
        .map_err(|e| format!("cannot ask the client: {e}"))?;
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(0) => Err("the client disconnected before deciding".into()),
        Ok(_) => match serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| serde_json::from_value::<CommitDecision>(v["decision"].clone()).ok())
        {
            Some(CommitDecision::Commit) => Ok(true),
            Some(CommitDecision::Abort) => Ok(false),
            None => Err(format!("the client sent no decision: {}", line.trim())),
        },
        Err(e) => Err(format!("cannot read the client's decision: {e}")),
    }
}

fn migrate(args: MigrateArgs, ctx: &Arc<Ctx>, w: &mut UnixStream, r: &mut BufReader<UnixStream>) {
    let Some(vm) = ctx.vm() else {
        let _ = reply(w, &Response::err("no VM here to migrate"));
        return;
    };
    let compression = match args.compress.parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = reply(w, &Response::err(e));
            return;
        }
    };
    if args.streams == 0 || args.streams > 16 {
        let _ = reply(
            w,
            &Response::err(format!(
                "streams must be between 1 and 16, got {}",
                args.streams
            )),
        );
        return;
    }
    if args.max_bandwidth_mibs == Some(0) {
        let _ = reply(w, &Response::err("max bandwidth must be at least 1 MiB/s"));
        return;
    }
    if let Some(t) = args.timeout_s {
        if !(t > 0.0 && t.is_finite()) {
            let _ = reply(
                w,
                &Response::err(format!(
                    "timeout must be a positive number of seconds, got {t}"
                )),
            );
            return;
        }
    }
    if vm.run_state() != vmm::VmRunState::Running {
        let _ = reply(
            w,
            &Response::err(format!(
                "the VM is {:?}; only a running VM can be live-migrated",
                vm.run_state()
            )),
        );
        return;
    }
    if ctx.migrating.swap(true, Ordering::SeqCst) {
        let _ = reply(w, &Response::err("a migration is already running"));
        return;
    }
    let opts = MigrateOptions {
        to: args.to.clone(),
        max_downtime: Duration::from_millis(args.max_downtime_ms),
        streams: args.streams,
        compression,
        max_bandwidth: args.max_bandwidth_mibs.map(|m| m << 20),
        timeout: args.timeout_s.map(Duration::from_secs_f64),
        dry_run: args.dry_run,
        ..Default::default()
    };
    let mctl = Arc::new(MigrationControl::default());
    *ctx.outgoing.lock().unwrap_or_else(|e| e.into_inner()) = Some(mctl.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let (vm, mctl, ctx2) = (vm.clone(), mctl.clone(), ctx.clone());
        let external = args.external_commit;
        std::thread::Builder::new()
            .name("migrate".into())
            .spawn(move || {
                let result = if external {
                    let gate = ClientGate(Mutex::new(tx.clone()));
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
    let final_resp = loop {
        match rx.recv_timeout(PROGRESS_EVERY) {
            Ok(MigEvent::Ask(answer)) => {
                let d = if client_gone {
                    Err("the client is gone".to_string())
                } else {
                    ask_client(w, r)
                };
                client_gone |= d.is_err();
                let _ = answer.send(d);
            }
            Ok(MigEvent::Done(res)) if res.is_ok() => {
                let summary = res.expect("checked ok");
                moved = !summary.dry_run;
                break Response::ok(json!({"event": "done", "summary": summary}));
            }
            Ok(MigEvent::Done(res)) => {
                let e = res.expect_err("checked err");
                let mut r = Response::err(e.to_string());
                r.data.insert("event".into(), json!("failed"));
                r.data.insert("phase".into(), json!(e.phase));
                r.data.insert("reason".into(), json!(e.reason));
                r.data.insert("vm_on_source".into(), json!(e.vm_on_source));
                break r;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if !client_gone {
                    let p = mctl
                        .progress
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone();
                    let line = Response::ok(json!({"event": "progress", "progress": p}));
                    client_gone = reply(w, &line).is_err();
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                break Response::err("the migration thread ended without a result");
            }
        }
    };
    if !client_gone {
        let _ = reply(w, &final_resp);
    }
    if moved {
        // The destination owns the VM now; this worker ends (after the client got its answer).
        vm.request_stop_with(VmEvent::Migrated { to: args.to });
    }
}
