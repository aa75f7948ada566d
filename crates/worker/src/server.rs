//! The worker's side of the control API.

use crate::api::{Request, Response};
use serde_json::json;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use vmm::Vm;

/// Maximum request line length; longer lines are refused.
const MAX_REQUEST: usize = 64 * 1024;

/// Fails if a live process serves `path` already.
pub fn check_free(path: &Path) -> anyhow::Result<()> {
    if path.exists() && UnixStream::connect(path).is_ok() {
        anyhow::bail!("API socket {} is in use by another process", path.display());
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            anyhow::bail!("cannot create API socket {}: directory {} does not exist", path.display(), dir.display());
        }
    }
    Ok(())
}

/// Binds `path`, refusing if another live worker owns it, replacing a stale socket file.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    check_free(path)?;
    if path.exists() {
        std::fs::remove_file(path)
            .map_err(|e| anyhow::anyhow!("cannot remove stale API socket {}: {e}", path.display()))?;
    }
    UnixListener::bind(path).map_err(|e| anyhow::anyhow!("cannot bind API socket {}: {e}", path.display()))
}

/// What the control server serves.
pub struct Ctx {
    pub vm: Arc<Vm>,
    pub started: Instant,
    pub socket: PathBuf,
}

/// Serves connections until the process exits (one thread per client).
pub fn serve(listener: UnixListener, ctx: Arc<Ctx>) {
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let ctx = ctx.clone();
                let _ = std::thread::Builder::new().name("api-client".into()).spawn(move || client(conn, &ctx));
            }
        })
        .expect("cannot start the API thread");
}

fn client(conn: UnixStream, ctx: &Ctx) {
    let Ok(write_half) = conn.try_clone() else { return };
    let mut w = write_half;
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        match (&mut r).take(MAX_REQUEST as u64 + 1).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(n) if n > MAX_REQUEST => {
                let _ = reply(&mut w, &Response::err(format!("request longer than {MAX_REQUEST} bytes")));
                return;
            }
            Ok(_) => {}
        }
        let resp = match serde_json::from_str::<Request>(line.trim()) {
            Ok(Request::Shutdown) => {
                let _ = reply(&mut w, &Response::ok(json!({"state": "stopping"})));
                ctx.vm.request_stop();
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

/// Status fields of a VM.
pub fn status(ctx: &Ctx) -> serde_json::Value {
    let vm = &ctx.vm;
    let c = vm.config();
    json!({
        "state": vm.run_state(),
        "pid": std::process::id(),
        "vcpus": c.vcpus,
        "memory_mib": c.memory_mib,
        "kernel": c.kernel.to_string(),
        "cmdline": c.cmdline,
        "cpu_profile": c.cpu_profile,
        "uptime_s": ctx.started.elapsed().as_secs_f64(),
        "stop_reason": vm.event().map(|e| e.to_string()),
    })
}

fn handle(req: Request, ctx: &Ctx) -> Response {
    let vm = &ctx.vm;
    match req {
        Request::Status => Response::ok(status(ctx)),
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
            match vmm::snapshot::take(vm, &path) {
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
        Request::Shutdown => unreachable!("handled by the caller"),
    }
}
