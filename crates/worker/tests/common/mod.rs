//! Test harness: real `ferry-vmm` processes, real KVM, serial logs parsed line by line.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferry-vmm"))
}

/// Every machine of this project has /dev/kvm; a missing one is a failure, not a skip.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: Ferry's tests need KVM (they are not skipped)"
    );
}

/// A running worker process with its files in a temp dir.
pub struct Worker {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub serial: PathBuf,
    pub socket: PathBuf,
    pub name: String,
}

impl Worker {
    pub fn spawn(dir: &Path, name: &str, args: &[&str]) -> Worker {
        require_kvm();
        let serial = dir.join(format!("{name}.serial"));
        let socket = dir.join(format!("{name}.sock"));
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .arg("--serial-log")
            .arg(&serial)
            .arg("--api-socket")
            .arg(&socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn().expect("spawn ferry-vmm");
        let mut w = Worker {
            child: Some(child),
            dir: dir.to_path_buf(),
            serial,
            socket,
            name: name.to_string(),
        };
        w.wait_socket();
        if matches!(args.first(), Some(&("run" | "restore" | "receive")))
            && !args.contains(&"--no-seccomp")
        {
            let pid = w.child.as_ref().unwrap().id() as i32;
            assert_eq!(
                seccomp_mode(pid, pid),
                Some(2),
                "worker {name} runs without its seccomp filter"
            );
        }
        w
    }

    /// `ferry-vmm run --kernel test-guest ...`
    pub fn run_guest(dir: &Path, name: &str, vcpus: u8, mem_mib: u64, cmdline: &str) -> Worker {
        let v = vcpus.to_string();
        let m = mem_mib.to_string();
        Worker::spawn(
            dir,
            name,
            &[
                "run",
                "--kernel",
                "test-guest",
                "--vcpus",
                &v,
                "--memory-mib",
                &m,
                "--cmdline",
                cmdline,
            ],
        )
    }

    /// `ferry-vmm restore --snapshot ... --verify-state`: every restore in the tests reads the
    /// loaded machine back and fails on any difference from the saved one.
    pub fn restore(dir: &Path, name: &str, snapshot: &Path) -> Worker {
        Worker::spawn(
            dir,
            name,
            &[
                "restore",
                "--snapshot",
                snapshot.to_str().unwrap(),
                "--verify-state",
            ],
        )
    }

    /// Waits until the worker's API answers (an unprivileged worker binds its socket before
    /// it drops root and installs its filters, and answers only after).
    fn wait_socket(&mut self) {
        let t0 = Instant::now();
        while !(self.socket.exists()
            && contract::worker::status(&self.socket, Some(Duration::from_millis(500))).is_ok())
        {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let out = self.child.take().unwrap().wait_with_output().unwrap();
                panic!(
                    "worker {} exited early ({st}): {}",
                    self.name,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "worker {} did not open its API socket",
                self.name
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn ctl(&self, args: &[&str]) -> serde_json::Value {
        let out = Command::new(bin())
            .arg("ctl")
            .arg("--api-socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Waits until `pred(log)` holds; panics with the log after `timeout`.
    pub fn wait_log(&self, timeout: Duration, what: &str, pred: impl Fn(&Log) -> bool) -> Log {
        let t0 = Instant::now();
        loop {
            let log = Log::parse(&self.log());
            if pred(&log) {
                return log;
            }
            if let Some(p) = log.panics.first() {
                panic!(
                    "guest panicked while waiting for {what}: {p}\n{}",
                    self.log()
                );
            }
            assert!(
                t0.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}; serial log of {}:\n{}",
                self.name,
                tail(&self.log(), 40)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the worker through the API and waits for the process.
    pub fn shutdown(mut self) -> Output {
        let _ = Command::new(bin())
            .arg("ctl")
            .arg("--api-socket")
            .arg(&self.socket)
            .arg("shutdown")
            .output();
        let child = self.child.take().unwrap();
        wait_with_timeout(child, Duration::from_secs(20))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn wait_with_timeout(mut child: Child, timeout: Duration) -> Output {
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "process did not exit within {timeout:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One heartbeat line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hb {
    pub cpu: u32,
    pub counter: u64,
    pub tsc: u64,
}

/// A parsed serial log.
#[derive(Debug, Default, Clone)]
pub struct Log {
    pub boot: Option<BTreeMap<String, String>>,
    pub hb: Vec<Hb>,
    pub verify_ok: Vec<BTreeMap<String, String>>,
    pub verify_bad: Vec<String>,
    pub corrupt: Vec<BTreeMap<String, String>>,
    pub dirty: Vec<BTreeMap<String, String>>,
    pub wss: Option<(u64, u64)>,
    pub panics: Vec<String>,
    /// `pause cpu=<k> ms=<ms> tsc_ms=<ms> hb=<counter>` lines: a gap of more than two heartbeat
    /// periods a CPU saw (printed by ferry-linux-guest; the test guest prints none).
    pub pauses: Vec<BTreeMap<String, String>>,
    /// Lines that are none of the above (e.g. partial lines around a pause).
    pub other: Vec<String>,
}

pub fn kv(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|t| {
            t.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

impl Log {
    pub fn parse(text: &str) -> Log {
        let mut l = Log::default();
        // Only complete lines count.
        let complete = match text.rfind('\n') {
            Some(i) => &text[..=i],
            None => "",
        };
        for line in complete.lines() {
            let line = line.trim_end_matches('\r');
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.first() == Some(&"hb") && f.len() == 4 {
                if let (Ok(cpu), Ok(counter), Ok(tsc)) = (f[1].parse(), f[2].parse(), f[3].parse())
                {
                    l.hb.push(Hb { cpu, counter, tsc });
                    continue;
                }
            }
            if line.starts_with("ferry-guest boot ") {
                l.boot = Some(kv(line));
            } else if line.starts_with("verify ok ") {
                l.verify_ok.push(kv(line));
            } else if line.starts_with("verify CORRUPT ") {
                l.corrupt.push(kv(line));
            } else if line.starts_with("verify bad ") {
                l.verify_bad.push(line.to_string());
            } else if line.starts_with("pause ") {
                l.pauses.push(kv(line));
            } else if line.starts_with("dirty ") {
                l.dirty.push(kv(line));
            } else if line.starts_with("wss ") {
                let m = kv(line);
                let gpa = u64::from_str_radix(m["gpa"].trim_start_matches("0x"), 16).unwrap();
                l.wss = Some((gpa, m["pages"].parse().unwrap()));
            } else if line.contains("PANIC") {
                l.panics.push(line.to_string());
            } else {
                l.other.push(line.to_string());
            }
        }
        l
    }

    pub fn hb_of(&self, cpu: u32) -> Vec<Hb> {
        self.hb.iter().copied().filter(|h| h.cpu == cpu).collect()
    }

    /// The `pause` lines of CPU `cpu` as (ms by CLOCK_MONOTONIC, ms by TSC).
    pub fn pauses_of(&self, cpu: u32) -> Vec<(u64, u64)> {
        self.pauses
            .iter()
            .filter(|m| m.get("cpu").and_then(|c| c.parse().ok()) == Some(cpu))
            .filter_map(|m| Some((m.get("ms")?.parse().ok()?, m.get("tsc_ms")?.parse().ok()?)))
            .collect()
    }

    pub fn min_hb_per_cpu(&self, cpus: u32) -> usize {
        (0..cpus).map(|c| self.hb_of(c).len()).min().unwrap_or(0)
    }

    pub fn verify_ok_cpus(&self) -> std::collections::BTreeSet<String> {
        self.verify_ok
            .iter()
            .filter_map(|m| m.get("cpu").cloned())
            .collect()
    }

    /// Heartbeat counters of every CPU go up by exactly one per line, TSCs increase.
    pub fn assert_hb_continuous(&self, cpus: u32) {
        for c in 0..cpus {
            let hb = self.hb_of(c);
            assert!(!hb.is_empty(), "no heartbeats from cpu {c}");
            for w in hb.windows(2) {
                assert_eq!(
                    w[1].counter,
                    w[0].counter + 1,
                    "cpu {c}: heartbeat counter jumped {:?} -> {:?}",
                    w[0],
                    w[1]
                );
                assert!(
                    w[1].tsc > w[0].tsc,
                    "cpu {c}: TSC went backwards {:?} -> {:?}",
                    w[0],
                    w[1]
                );
            }
        }
    }

    pub fn assert_no_corruption(&self) {
        assert!(
            self.corrupt.is_empty(),
            "verifier found corruption: {:?}",
            self.corrupt
        );
        assert!(
            self.verify_bad.is_empty(),
            "verifier reported bad sweeps: {:?}",
            self.verify_bad
        );
        assert!(self.panics.is_empty(), "guest panicked: {:?}", self.panics);
    }
}

/// Runs `ferry-vmm` with `args`, expecting failure; returns (exit code, stderr).
pub fn run_fail(args: &[&str]) -> (i32, String) {
    let out = Command::new(bin()).args(args).output().unwrap();
    assert!(
        !out.status.success(),
        "ferry-vmm {args:?} should fail but succeeded"
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !err.contains("panicked"),
        "ferry-vmm {args:?} panicked: {err}"
    );
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "ferry-vmm {args:?}: error is not one line:\n{err}"
    );
    (out.status.code().unwrap_or(-1), err.trim_end().to_string())
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ferry-test-")
        .tempdir()
        .unwrap()
}

/// A `ferry-vmm receive` worker.
pub struct Receiver {
    pub w: Worker,
    pub addr: String,
}

/// Security options are explicit: without TLS options, a test's worker runs `--insecure`.
fn with_security<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut v = args.to_vec();
    if !args
        .iter()
        .any(|a| *a == "--insecure" || *a == "--tls-cert")
    {
        v.push("--insecure");
    }
    v
}

/// A cluster PKI made for one test: a CA with nodes `src`, `dst` and `intruder`, and
/// another CA with a node `src` of its own.
pub struct TestPki {
    pub dir: PathBuf,
    pub other: PathBuf,
}

impl TestPki {
    pub fn new(dir: &Path) -> TestPki {
        let (d, other) = (dir.join("pki"), dir.join("pki-other"));
        trust::pki::init(&d, false).unwrap();
        trust::pki::init(&other, false).unwrap();
        for n in ["src", "dst", "intruder"] {
            trust::pki::issue(
                &d,
                &trust::Identity::node(n).unwrap(),
                &["127.0.0.1".into()],
                1,
            )
            .unwrap();
        }
        trust::pki::issue(&other, &trust::Identity::node("src").unwrap(), &[], 1).unwrap();
        TestPki { dir: d, other }
    }

    /// `--tls-cert/--tls-key/--tls-ca/--peer-node` for node `me` (of `pki_dir`, trusting
    /// `ca_dir`'s CA) expecting `peer`.
    pub fn args_from(pki_dir: &Path, ca_dir: &Path, me: &str, peer: &str) -> Vec<String> {
        let f = trust::pki::node_files(pki_dir, me);
        vec![
            "--tls-cert".into(),
            f.cert.to_str().unwrap().into(),
            "--tls-key".into(),
            f.key.to_str().unwrap().into(),
            "--tls-ca".into(),
            ca_dir.join(trust::pki::CA_CERT).to_str().unwrap().into(),
            "--peer-node".into(),
            peer.into(),
        ]
    }

    /// TLS options for node `me` of this CA, expecting `peer`.
    pub fn args(&self, me: &str, peer: &str) -> Vec<String> {
        TestPki::args_from(&self.dir, &self.dir, me, peer)
    }

    /// A fresh one-time secret in a file.
    pub fn secret(&self, name: &str) -> PathBuf {
        let p = self.dir.join(format!("{name}.secret"));
        std::fs::write(&p, trust::secret::generate().unwrap().to_hex()).unwrap();
        p
    }
}

/// Borrowed views of owned argument lists.
pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(|s| s.as_str()).collect()
}

impl Receiver {
    /// A TLS receiver (node `dst`, accepting node `src`) with a one-time secret; returns it
    /// and its secret file.
    pub fn spawn_tls(dir: &Path, name: &str, pki: &TestPki, extra: &[&str]) -> (Receiver, PathBuf) {
        let secret = pki.secret(name);
        let mut args = pki.args("dst", "src");
        args.extend(["--secret-file".into(), secret.to_str().unwrap().into()]);
        let mut all = strs(&args);
        all.extend_from_slice(extra);
        (Receiver::spawn(dir, name, &all), secret)
    }

    pub fn spawn(dir: &Path, name: &str, extra: &[&str]) -> Receiver {
        require_kvm();
        let extra = with_security(extra);
        let extra = &extra[..];
        let serial = dir.join(format!("{name}.serial"));
        let socket = dir.join(format!("{name}.sock"));
        let child = Command::new(bin())
            // Not `--verify-state` here: the read-back of a received machine adds ~10-20 ms of
            // pause the guest sees but the engine's downtime does not count (measured
            // 2026-12-02: dirty_1_vcpu saw 23-27 ms against 7.7 ms reported, 2 of 4 runs), and
            // these tests bound the guest's pause by the reported downtime. Restores (below)
            // and the nested hosts' receivers do read back.
            .args(["receive", "--listen", "127.0.0.1:0"])
            .args(extra)
            .arg("--serial-log")
            .arg(&serial)
            .arg("--api-socket")
            .arg(&socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry-vmm receive");
        // Where it listens comes from its typed status, not from what it prints.
        let addr = contract::worker::receiver_address(&socket, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("the receiver did not come up: {e}"));
        let w = Worker {
            child: Some(child),
            dir: dir.to_path_buf(),
            serial,
            socket,
            name: name.to_string(),
        };
        Receiver { w, addr }
    }
}

/// Outcome of `ctl migrate --output json`.
#[derive(Debug)]
pub struct MigrateResult {
    pub ok: bool,
    pub stderr: String,
    pub lines: Vec<serde_json::Value>,
}

impl MigrateResult {
    pub fn last(&self) -> &serde_json::Value {
        self.lines.last().expect("no output from ctl migrate")
    }
    pub fn summary(&self) -> &serde_json::Value {
        assert!(
            self.ok,
            "migration failed: {} {:?}",
            self.stderr,
            self.lines.last()
        );
        let last = self.last();
        assert_eq!(last["reply"], "done", "{last}");
        last
    }
    pub fn phases(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for l in &self.lines {
            if let Some(p) = (l["reply"] == "progress")
                .then(|| l["phase"].as_str())
                .flatten()
            {
                if v.last().map(|x| x.as_str()) != Some(p) {
                    v.push(p.to_string());
                }
            }
        }
        v
    }
}

impl Worker {
    /// Starts `ctl migrate --output json` and returns the child (for tests that act meanwhile).
    pub fn migrate_spawn(&self, to: &str, args: &[&str]) -> Child {
        let args = with_security(args);
        Command::new(bin())
            .arg("ctl")
            .arg("--api-socket")
            .arg(&self.socket)
            .args(["migrate", "--to", to, "--output", "json"])
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Migrates over mutual TLS as node `src` to `dst`'s receiver with its secret.
    pub fn migrate_tls(
        &self,
        to: &str,
        pki: &TestPki,
        secret: &Path,
        args: &[&str],
    ) -> MigrateResult {
        let mut all = pki.args("src", "dst");
        all.extend(["--secret-file".into(), secret.to_str().unwrap().into()]);
        let mut v = strs(&all);
        v.extend_from_slice(args);
        self.migrate(to, &v)
    }

    /// Runs a migration to completion.
    pub fn migrate(&self, to: &str, args: &[&str]) -> MigrateResult {
        let child = self.migrate_spawn(to, args);
        finish_migrate(child)
    }
}

pub fn finish_migrate(child: Child) -> MigrateResult {
    let out = wait_with_timeout(child, Duration::from_secs(180));
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    MigrateResult {
        ok: out.status.success(),
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
        lines,
    }
}

/// How the proxy misbehaves on the source → destination direction of every connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward faithfully.
    None,
    /// Flip one bit of the byte at this offset of the N-th connection's stream.
    FlipAt { conn: usize, offset: u64 },
    /// Close every connection once the N-th connection carried this many bytes (mid-frame).
    CutAt { conn: usize, offset: u64 },
}

/// A TCP proxy between source and destination that can corrupt or cut the stream.
pub struct Proxy {
    pub addr: String,
    pub conns: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub tripped: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    pub fn start(target: &str, fault: Fault) -> Proxy {
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::{Arc, Mutex};
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let target = target.to_string();
        let conns = Arc::new(AtomicUsize::new(0));
        let tripped = Arc::new(AtomicBool::new(false));
        // Destination-side sockets: a cut closes them all (the destination sees the stream end
        // mid-frame); the source then sees its connections closed by the peer.
        let servers: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let cut = Arc::new(AtomicBool::new(false));
        let (c2, t2) = (conns.clone(), tripped.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(client) = s else { return };
                let idx = c2.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = TcpStream::connect(&target) else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                servers.lock().unwrap().push(server.try_clone().unwrap());
                if cut.load(Ordering::SeqCst) {
                    let _ = server.shutdown(Shutdown::Both);
                }
                // destination -> source: faithful; when the destination side ends, the source
                // gets a FIN.
                let (mut sr, mut cw) = (server.try_clone().unwrap(), client.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut sr, &mut cw);
                    let _ = cw.shutdown(Shutdown::Write);
                });
                // source -> destination, with the fault. Once the connection is dead, what the
                // source still sends is read and dropped, as a closed peer's kernel would.
                let (mut cr, mut sw) = (client, server);
                let (servers, tripped, cut) = (servers.clone(), t2.clone(), cut.clone());
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    let mut buf = vec![0u8; 64 << 10];
                    let mut pos = 0u64;
                    let mut dead = false;
                    loop {
                        let n = match cr.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if dead || cut.load(Ordering::SeqCst) {
                            continue;
                        }
                        let chunk = &mut buf[..n];
                        match fault {
                            Fault::FlipAt { conn, offset }
                                if conn == idx && offset >= pos && offset < pos + n as u64 =>
                            {
                                chunk[(offset - pos) as usize] ^= 0x04;
                                tripped.store(true, Ordering::SeqCst);
                            }
                            Fault::CutAt { conn, offset }
                                if conn == idx && pos + n as u64 > offset =>
                            {
                                let keep = (offset - pos) as usize;
                                let _ = sw.write_all(&chunk[..keep]);
                                tripped.store(true, Ordering::SeqCst);
                                cut.store(true, Ordering::SeqCst);
                                for s in servers.lock().unwrap().iter() {
                                    let _ = s.shutdown(Shutdown::Both);
                                }
                                continue;
                            }
                            _ => {}
                        }
                        if sw.write_all(chunk).is_err() {
                            dead = true;
                            let _ = sw.shutdown(Shutdown::Both);
                        }
                        pos += n as u64;
                    }
                    let _ = sw.shutdown(Shutdown::Both);
                });
            }
        });
        Proxy {
            addr,
            conns,
            tripped,
        }
    }
}

/// Each CPU's heartbeats in `before` + `after`: (line start, line end, TSC) in text order.
fn heartbeats_by_cpu(text: &str, cpus: u32) -> Vec<Vec<(usize, usize, u64)>> {
    let mut per_cpu: Vec<Vec<(usize, usize, u64)>> = vec![Vec::new(); cpus as usize];
    let mut start = 0;
    for line in text.split_inclusive('\n') {
        let end = start + line.len();
        if line.ends_with('\n') {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() == 4 && f[0] == "hb" {
                if let (Ok(c), Ok(t)) = (f[1].parse::<usize>(), f[3].parse::<u64>()) {
                    if c < per_cpu.len() {
                        per_cpu[c].push((start, end, t));
                    }
                }
            }
        }
        start = end;
    }
    per_cpu
}

/// The heartbeat gaps around the switchover of one CPU (ms of guest TSC).
#[derive(Debug, Clone, Copy)]
pub struct HeartbeatGaps {
    /// The gap between the two consecutive heartbeats that span the switchover.
    pub switchover: f64,
    /// The largest gap between any other two consecutive heartbeats of the same CPU, in the
    /// same run: how late the host scheduled this vCPU when nothing paused it.
    pub worst_other: f64,
}

/// For each CPU, the gap (ms of guest TSC, which is the host TSC here) between the two
/// consecutive heartbeats that span the switchover: `before` is the source's serial output,
/// `after` the destination's (a line cut by the pause continues in `after`).
pub fn switchover_gaps_ms(before: &str, after: &str, cpus: u32, tsc_khz: f64) -> Vec<f64> {
    heartbeat_gaps_ms(before, after, cpus, tsc_khz)
        .iter()
        .map(|g| g.switchover)
        .collect()
}

/// [`switchover_gaps_ms`] with, for each CPU, the worst gap elsewhere in the same run.
pub fn heartbeat_gaps_ms(before: &str, after: &str, cpus: u32, tsc_khz: f64) -> Vec<HeartbeatGaps> {
    let text = format!("{before}{after}");
    let boundary = before.len();
    heartbeats_by_cpu(&text, cpus)
        .iter()
        .enumerate()
        .map(|(c, hb)| {
            // The first heartbeat printed (at least partly) after the pause...
            let i = hb
                .iter()
                .position(|h| h.1 > boundary)
                .unwrap_or_else(|| panic!("cpu {c}: no heartbeat after the switchover"));
            assert!(i > 0, "cpu {c}: no heartbeat before the switchover");
            // ...may still carry a TSC read before it (the pause can fall between reading the
            // TSC and printing the line): the pause is the largest gap of the pairs around it.
            let around = i.saturating_sub(1)..(i + 1).min(hb.len() - 1);
            let gap = |j: usize| hb[j + 1].2.saturating_sub(hb[j].2) as f64 / tsc_khz;
            HeartbeatGaps {
                switchover: around.clone().map(gap).fold(0.0, f64::max),
                worst_other: (0..hb.len() - 1)
                    .filter(|j| !around.contains(j))
                    .map(gap)
                    .fold(0.0, f64::max),
            }
        })
        .collect()
}

/// The reason of a failure line of `ctl migrate --output json` (message and cause).
pub fn reason(f: &serde_json::Value) -> String {
    match f["cause"].as_str() {
        Some(c) => format!("{}: {c}", f["message"].as_str().unwrap_or("")),
        None => f["message"].as_str().unwrap_or("").to_string(),
    }
}

/// `Seccomp:` of thread `tid` of process `pid` (2: filter mode), from /proc.
pub fn seccomp_mode(pid: i32, tid: i32) -> Option<u32> {
    proc_status_field(pid, tid, "Seccomp")
}

/// A numeric field of /proc/PID/task/TID/status.
pub fn proc_status_field(pid: i32, tid: i32, field: &str) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
}

#[allow(unused_imports)] // (not every test binary reads disk logs)
pub use testbed::disk_seqs;
