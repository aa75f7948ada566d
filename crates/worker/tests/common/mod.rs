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

    /// `ferry-vmm restore --snapshot ...`
    pub fn restore(dir: &Path, name: &str, snapshot: &Path) -> Worker {
        Worker::spawn(
            dir,
            name,
            &["restore", "--snapshot", snapshot.to_str().unwrap()],
        )
    }

    fn wait_socket(&mut self) {
        let t0 = Instant::now();
        while !self.socket.exists() {
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
