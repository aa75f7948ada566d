//! A minimal QMP (QEMU Machine Protocol) client over a unix socket, for the benchmarks that
//! measure QEMU next to Ferry (`ferry-vmm bench`, `ferry bench-net`). The socket is a file, so
//! it works across network namespaces.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long to wait for QEMU to create its QMP socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one reply may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// What went wrong talking to QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("QEMU is gone while connecting to QMP: {0}")]
    Gone(String),
    #[error("QMP {cmd}: {source}")]
    Io { cmd: String, source: std::io::Error },
    #[error("QMP connection closed during {0}")]
    Closed(String),
    #[error("QMP {cmd}: unreadable reply {line:?}")]
    Reply { cmd: String, line: String },
    #[error("QMP {cmd}: {error}")]
    Command { cmd: String, error: Value },
}

/// One QMP session (capabilities negotiated).
pub struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    /// Connects, retrying while QEMU starts (`alive` says why not if QEMU died meanwhile), and
    /// negotiates capabilities.
    pub fn connect(
        path: &Path,
        mut alive: impl FnMut() -> Result<(), String>,
    ) -> Result<Qmp, QmpError> {
        let t0 = Instant::now();
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if t0.elapsed() > CONNECT_TIMEOUT => {
                    return Err(QmpError::Connect {
                        path: path.display().to_string(),
                        source: e,
                    })
                }
                Err(_) => {
                    alive().map_err(QmpError::Gone)?;
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        let io = |source| QmpError::Io {
            cmd: "connect".into(),
            source,
        };
        s.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
        let mut q = Qmp {
            r: BufReader::new(s.try_clone().map_err(io)?),
            w: s,
        };
        let mut greeting = String::new();
        q.r.read_line(&mut greeting).map_err(io)?;
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    /// Runs one command and returns its `return` value (events in between are skipped).
    pub fn cmd(&mut self, name: &str, args: Value) -> Result<Value, QmpError> {
        let io = |source| QmpError::Io {
            cmd: name.to_string(),
            source,
        };
        let mut m = json!({ "execute": name });
        if args.as_object().is_some_and(|o| !o.is_empty()) {
            m["arguments"] = args;
        }
        writeln!(self.w, "{m}").map_err(io)?;
        loop {
            let mut l = String::new();
            if self.r.read_line(&mut l).map_err(io)? == 0 {
                return Err(QmpError::Closed(name.to_string()));
            }
            let v: Value = serde_json::from_str(&l).map_err(|_| QmpError::Reply {
                cmd: name.to_string(),
                line: l.trim().to_string(),
            })?;
            if let Some(e) = v.get("error") {
                return Err(QmpError::Command {
                    cmd: name.to_string(),
                    error: e.clone(),
                });
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
        }
    }
}
