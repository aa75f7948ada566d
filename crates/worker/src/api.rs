//! Control API: one JSON object per line in each direction over a unix stream socket.
//!
//! Request: `{"cmd":"status"}`, `{"cmd":"pause"}`, `{"cmd":"resume"}`, `{"cmd":"shutdown"}`,
//! `{"cmd":"snapshot","path":"/x.snap"}`. Response: `{"ok":true, ...fields}` or
//! `{"ok":false,"error":"..."}`.

use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A control request.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status,
    Pause,
    Resume,
    Shutdown,
    Snapshot {
        path: PathBuf,
    },
    /// Live-migrate the VM; the connection receives progress lines until a final line.
    Migrate(MigrateArgs),
    /// Cancel the running outgoing migration.
    Cancel,
    /// Receive mode with an external commit: the VM's owner moved here; resume it.
    Commit,
    /// Receive mode with an external commit: the migration failed; discard the received VM.
    Abort,
}

/// Arguments of a live migration.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MigrateArgs {
    /// Destination `host:port` (a `ferry-vmm receive` worker).
    pub to: String,
    #[serde(default = "default_downtime")]
    pub max_downtime_ms: u64,
    #[serde(default = "default_streams")]
    pub streams: u16,
    /// none, lz4 or zstd.
    #[serde(default = "default_compress")]
    pub compress: String,
    #[serde(default)]
    pub max_bandwidth_mibs: Option<u64>,
    #[serde(default)]
    pub timeout_s: Option<f64>,
    #[serde(default)]
    pub dry_run: bool,
    /// The commit is decided by the client: once the destination is ready the worker sends
    /// `{"event":"commit-ready"}` and waits for a line `{"decision":"commit"}` or
    /// `{"decision":"abort"}` (a cluster agent answers after its store compare-and-swap).
    #[serde(default)]
    pub external_commit: bool,
}

/// The client's answer to `commit-ready`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CommitDecision {
    Commit,
    Abort,
}

#[derive(Serialize, Deserialize)]
struct DecisionLine {
    decision: CommitDecision,
}

/// A running `migrate` request whose commit the caller decides.
pub struct MigrateSession {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl MigrateSession {
    /// Sends the request (with `external_commit` set by the caller as wanted).
    pub fn start(socket: &Path, args: MigrateArgs) -> Result<MigrateSession, ClientError> {
        let s = UnixStream::connect(socket).map_err(|err| ClientError::Connect {
            path: socket.display().to_string(),
            err,
        })?;
        let mut w = s.try_clone()?;
        let mut line =
            serde_json::to_string(&Request::Migrate(args)).expect("requests always serialize");
        line.push('\n');
        w.write_all(line.as_bytes())?;
        Ok(MigrateSession {
            r: BufReader::new(s),
            w,
        })
    }

    /// The next line: progress, `commit-ready`, or the final `done`/`failed`.
    pub fn next_line(&mut self) -> Result<Response, ClientError> {
        let mut answer = String::new();
        if self.r.read_line(&mut answer)? == 0 {
            return Err(ClientError::NoAnswer);
        }
        serde_json::from_str(&answer).map_err(|e| ClientError::BadAnswer(e.to_string()))
    }

    /// Answers `commit-ready`.
    pub fn decide(&mut self, decision: CommitDecision) -> Result<(), ClientError> {
        let mut line = serde_json::to_string(&DecisionLine { decision }).expect("serializes");
        line.push('\n');
        self.w.write_all(line.as_bytes())?;
        Ok(())
    }
}

fn default_downtime() -> u64 {
    50
}
fn default_streams() -> u16 {
    1
}
fn default_compress() -> String {
    "none".into()
}

/// A control response: `ok`, an error message, or command-specific fields.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    #[serde(flatten)]
    pub data: serde_json::Map<String, serde_json::Value>,
}

impl Response {
    /// A success with fields.
    pub fn ok(data: serde_json::Value) -> Response {
        let data = match data {
            serde_json::Value::Object(m) => m,
            serde_json::Value::Null => serde_json::Map::new(),
            other => {
                let mut m = serde_json::Map::new();
                m.insert("result".into(), other);
                m
            }
        };
        Response {
            ok: true,
            error: None,
            data,
        }
    }

    /// A failure.
    pub fn err(msg: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(msg.into()),
            data: serde_json::Map::new(),
        }
    }
}

/// Client-side errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the worker's API socket {path}: {err}")]
    Connect { path: String, err: std::io::Error },
    #[error("API socket I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the worker closed the connection without answering")]
    NoAnswer,
    #[error("the worker sent an unreadable answer: {0}")]
    BadAnswer(String),
}

/// Sends one request and hands every response line to `on_line` until one has `final` set
/// (or, for requests that answer once, the first line).
pub fn call_stream(
    socket: &Path,
    req: &Request,
    mut on_line: impl FnMut(&Response) -> bool,
) -> Result<Response, ClientError> {
    let mut s = UnixStream::connect(socket).map_err(|err| ClientError::Connect {
        path: socket.display().to_string(),
        err,
    })?;
    let mut line = serde_json::to_string(req).expect("requests always serialize");
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut r = BufReader::new(s);
    loop {
        let mut answer = String::new();
        if r.read_line(&mut answer)? == 0 {
            return Err(ClientError::NoAnswer);
        }
        let resp: Response =
            serde_json::from_str(&answer).map_err(|e| ClientError::BadAnswer(e.to_string()))?;
        if !on_line(&resp) {
            return Ok(resp);
        }
    }
}

/// Sends one request and waits for its response.
pub fn call(
    socket: &Path,
    req: &Request,
    timeout: Option<Duration>,
) -> Result<Response, ClientError> {
    let mut s = UnixStream::connect(socket).map_err(|err| ClientError::Connect {
        path: socket.display().to_string(),
        err,
    })?;
    s.set_read_timeout(timeout)?;
    let mut line = serde_json::to_string(req).expect("requests always serialize");
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut r = BufReader::new(s);
    let mut answer = String::new();
    if r.read_line(&mut answer)? == 0 {
        return Err(ClientError::NoAnswer);
    }
    serde_json::from_str(&answer).map_err(|e| ClientError::BadAnswer(e.to_string()))
}
