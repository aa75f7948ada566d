//! Test harness: a real cluster of `ferry agent` processes on loopback, with either store
//! backend, talking to real `ferry-vmm` workers on real KVM.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn ferry_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferry"))
}

/// Runs a `ferry` benchmark command with `--report FILE`: it must succeed and write exactly
/// what it printed. Returns the report.
pub fn ferry_report(args: &[&str]) -> String {
    let report = tempfile::NamedTempFile::new().unwrap();
    let out = Command::new(ferry_bin())
        .args(args)
        .arg("--report")
        .arg(report.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(report.path()).unwrap().trim(),
        text.trim()
    );
    text
}

fn worker_bin() -> PathBuf {
    let p = ferry_bin().with_file_name("ferry-vmm");
    assert!(
        p.is_file(),
        "{} is missing: build the worker too (cargo build -p worker, or cargo test --workspace)",
        p.display()
    );
    p
}

pub enum Backend {
    Sqlite,
    Etcd(cluster::testing::Etcd),
}

pub struct AgentProc {
    pub name: String,
    pub addr: String,
    pub data_dir: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub child: Option<Child>,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub store: String,
    pub backend: Backend,
    pub agents: Vec<AgentProc>,
}

impl Cluster {
    pub fn new(etcd: bool) -> Cluster {
        assert!(
            Path::new("/dev/kvm").exists(),
            "/dev/kvm is missing: these tests need KVM"
        );
        let _ = worker_bin();
        let dir = tempfile::Builder::new()
            .prefix("ferry-cluster-")
            .tempdir()
            .unwrap();
        let (store, backend) = if etcd {
            let e = cluster::testing::Etcd::start();
            (e.url.clone(), Backend::Etcd(e))
        } else {
            (
                format!("sqlite://{}", dir.path().join("cluster.db").display()),
                Backend::Sqlite,
            )
        };
        Cluster {
            dir,
            store,
            backend,
            agents: Vec::new(),
        }
    }

    pub fn etcd(&mut self) -> &mut cluster::testing::Etcd {
        match &mut self.backend {
            Backend::Etcd(e) => e,
            Backend::Sqlite => panic!("not an etcd cluster"),
        }
    }

    /// Starts agent `name` with extra `ferry agent` flags.
    pub fn add(&mut self, name: &str, extra: &[&str]) -> &AgentProc {
        self.add_env(name, extra, &[])
    }

    pub fn add_env(&mut self, name: &str, extra: &[&str], env: &[(&str, &str)]) -> &AgentProc {
        let data_dir = self.dir.path().join(name);
        let mut a = AgentProc {
            name: name.into(),
            addr: String::new(),
            data_dir,
            args: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
        };
        self.spawn(&mut a);
        self.agents.push(a);
        self.agents.last().unwrap()
    }

    fn spawn(&self, a: &mut AgentProc) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", a.name)))
            .unwrap();
        // The agent binds a free port itself and says which (no port picked here and raced
        // for); a restarted agent gets a new one and registers it.
        let addr_file = self.dir.path().join(format!("{}.addr", a.name));
        let _ = std::fs::remove_file(&addr_file);
        let mut cmd = Command::new(ferry_bin());
        cmd.args([
            "agent",
            "--node",
            &a.name,
            "--listen",
            "127.0.0.1:0",
            "--store",
            &self.store,
            "--data-dir",
        ])
        .arg(&a.data_dir)
        .args(["--lease-ttl-s", "3", "--address-file"])
        .arg(&addr_file)
        .args(&a.args)
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
        for (k, v) in &a.env {
            cmd.env(k, v);
        }
        a.child = Some(cmd.spawn().expect("spawn ferry agent"));
        let t0 = Instant::now();
        loop {
            if let Ok(addr) = std::fs::read_to_string(&addr_file) {
                if get(&addr, "/v1/health").is_ok_and(|h| h["node"] == a.name.as_str()) {
                    a.addr = addr;
                    break;
                }
            }
            if let Some(st) = a.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "agent {} exited ({st}): {}",
                    a.name,
                    self.agent_log(&a.name)
                );
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "agent {} did not come up",
                a.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn agent_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    pub fn agent(&self, name: &str) -> &AgentProc {
        self.agents.iter().find(|a| a.name == name).unwrap()
    }

    pub fn addr(&self, name: &str) -> String {
        self.agent(name).addr.clone()
    }

    /// SIGKILLs an agent (its workers keep running, as they would on a real crash).
    pub fn kill(&mut self, name: &str) {
        let a = self.agents.iter_mut().find(|a| a.name == name).unwrap();
        if let Some(mut c) = a.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a killed agent again with the same configuration.
    pub fn restart(&mut self, name: &str) {
        let i = self.agents.iter().position(|a| a.name == name).unwrap();
        let mut a = std::mem::replace(
            &mut self.agents[i],
            AgentProc {
                name: String::new(),
                addr: String::new(),
                data_dir: PathBuf::new(),
                args: vec![],
                env: vec![],
                child: None,
            },
        );
        a.env.clear();
        self.spawn(&mut a);
        self.agents[i] = a;
    }

    /// Runs the `ferry` CLI against agent `via`.
    pub fn ferry(&self, via: &str, args: &[&str]) -> Output {
        Command::new(ferry_bin())
            .args(["--agent", &self.addr(via)])
            .args(args)
            .output()
            .unwrap()
    }

    pub fn ferry_ok(&self, via: &str, args: &[&str]) -> String {
        let o = self.ferry(via, args);
        assert!(
            o.status.success(),
            "ferry {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stdout).to_string()
    }

    /// Runs `ferry` expecting failure; returns the one-line error.
    pub fn ferry_err(&self, via: &str, args: &[&str]) -> String {
        let o = self.ferry(via, args);
        assert!(
            !o.status.success(),
            "ferry {args:?} should fail: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        let e = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!e.contains("panicked"), "{e}");
        assert_eq!(e.trim_end().lines().count(), 1, "not one line: {e}");
        e.trim_end().to_string()
    }

    pub fn get(&self, via: &str, path: &str) -> Value {
        get(&self.addr(via), path).unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    pub fn post(&self, via: &str, path: &str, body: Value) -> Value {
        post(&self.addr(via), path, &body, Some(Duration::from_secs(300)))
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    pub fn store(&self) -> Box<dyn cluster::Store> {
        cluster::open(&self.store).unwrap()
    }

    /// Creates and starts a test-guest VM from TOML lines.
    pub fn vm(&self, node: &str, name: &str, extra: &str) {
        let toml = format!("name = \"{name}\"\n{extra}");
        self.post(node, "/v1/vms", json!({ "toml": toml, "node": node }));
        self.post(node, &format!("/v1/vms/{name}/start"), json!({}));
    }

    pub fn serial(&self, node: &str, vm: &str) -> PathBuf {
        self.agent(node)
            .data_dir
            .join("vms")
            .join(vm)
            .join("console")
            .join("serial.log")
    }

    /// Nodes on which a worker for `vm` runs the VM (state running or paused).
    pub fn workers_of(&self, vm: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for a in &self.agents {
            let sock = a.data_dir.join("vms").join(vm).join("api.sock");
            if sock.exists() {
                if let Ok(st) = contract::worker::status(&sock, Some(Duration::from_secs(5))) {
                    let st = st.state.to_string();
                    if st == "running" || st == "paused" {
                        out.push((a.name.clone(), st));
                    }
                }
            }
        }
        out
    }

    /// Exactly one worker runs `vm`, on the node the store names as owner; returns it.
    pub fn assert_one_owner(&self, vm: &str) -> String {
        let t0 = Instant::now();
        loop {
            let owner = self.store().vm(vm).unwrap().expect("VM record").value.owner;
            let ws = self.workers_of(vm);
            if ws.len() == 1 && ws[0].0 == owner && ws[0].1 == "running" {
                return owner;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "VM {vm}: store owner {owner}, running workers {ws:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the guest on `node` completed `n` more verifier sweeps without corruption.
    pub fn assert_verify(&self, node: &str, vm: &str, n: usize) {
        let path = self.serial(node, vm);
        let count = |s: &str| s.lines().filter(|l| l.starts_with("verify ok")).count();
        let start = count(&std::fs::read_to_string(&path).unwrap_or_default());
        let t0 = Instant::now();
        loop {
            let s = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                !s.contains("verify CORRUPT") && !s.contains("verify bad"),
                "{vm} on {node} reports corruption:\n{s}"
            );
            if count(&s) >= start + n {
                self.assert_sandboxed(node, vm);
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "{vm} on {node}: no verifier progress:\n{}",
                s.lines().rev().take(5).collect::<Vec<_>>().join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every worker process of `vm` on `node` (found by its API socket in /proc, without
    /// asking it: it may be stopped at a fault point) runs under its seccomp filter
    /// (vmm::sandbox), and there is one.
    pub fn assert_sandboxed(&self, node: &str, vm: &str) {
        let sock = self
            .agent(node)
            .data_dir
            .join("vms")
            .join(vm)
            .join("api.sock");
        let needle = sock.display().to_string();
        let mut found = 0;
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if !cmd.split(|b| *b == 0).any(|a| a == needle.as_bytes()) {
                continue;
            }
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            if status.is_empty() {
                continue; // exited meanwhile
            }
            found += 1;
            assert!(
                status.lines().any(|l| l == "Seccomp:\t2"),
                "worker {pid} of {vm} on {node} runs without its seccomp filter"
            );
            // Its own unprivileged user (real, effective, saved, fs), no capabilities.
            let field = |k: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(k))
                    .unwrap_or("")
                    .split_whitespace()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            };
            let uids = field("Uid:");
            assert!(
                uids.len() == 4 && uids.iter().all(|u| u == &uids[0] && u != "0"),
                "worker {pid} of {vm} on {node} runs with uids {uids:?}"
            );
            assert_eq!(
                field("CapEff:"),
                ["0000000000000000"],
                "worker {pid} of {vm} on {node} has capabilities"
            );
        }
        assert!(found > 0, "no worker of {vm} on {node}");
    }

    /// Migrates through the API (with `params`, the migration parameters) and waits for the
    /// outcome record.
    pub fn migrate(&self, via: &str, vm: &str, to: &str, params: Value) -> Result<Value, String> {
        let body = json!({ "to": to, "params": params });
        let started = post(
            &self.addr(via),
            &format!("/v1/vms/{vm}/migrate"),
            &body,
            Some(Duration::from_secs(60)),
        )
        .map_err(|e| e.to_string())?;
        let runner = started["agent"].as_str().unwrap().to_string();
        let id = started["migration"]["id"].as_str().unwrap().to_string();
        let m = agent::ops::source::wait_migration(&runner, &id).map_err(|e| e.to_string())?;
        let m = serde_json::to_value(m).unwrap();
        if m["outcome"] == "succeeded" {
            Ok(m)
        } else {
            Err(format!("{}: {}", m["phase"], m["reason"]))
        }
    }

    /// Every heartbeat counter of `vm` continues across the serial logs of `nodes` (in order).
    pub fn assert_heartbeats_continuous(&self, vm: &str, nodes: &[&str]) {
        let text: String = nodes
            .iter()
            .map(|n| std::fs::read_to_string(self.serial(n, vm)).unwrap_or_default())
            .collect();
        let mut last: std::collections::BTreeMap<u32, u64> = Default::default();
        for l in text.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() == 4 && f[0] == "hb" {
                if let (Ok(c), Ok(n)) = (f[1].parse::<u32>(), f[2].parse::<u64>()) {
                    let want = last.get(&c).map(|p| p + 1).unwrap_or(1);
                    assert_eq!(
                        n, want,
                        "{vm}: cpu {c} heartbeat counter jumped across {nodes:?}"
                    );
                    last.insert(c, n);
                }
            }
        }
        assert!(!last.is_empty(), "no heartbeats from {vm}");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Stop every worker, then every agent.
        for a in &self.agents {
            testbed::bed::shutdown_workers(&a.data_dir);
        }
        for a in &mut self.agents {
            if let Some(mut c) = a.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub const GUEST: &str =
    "memory_mib = 64\ncmdline = \"ferry.workload=verify ferry.wss_mib=8 ferry.hb_ms=20\"\n";

/// GET a JSON body from an agent.
pub fn get(addr: &str, path: &str) -> Result<Value, agent::AgentError> {
    agent::client::get::<Value>(addr, path)
}

/// POST a JSON body to an agent.
pub fn post(
    addr: &str,
    path: &str,
    body: &Value,
    timeout: Option<Duration>,
) -> Result<Value, agent::AgentError> {
    agent::client::post::<Value, Value>(addr, path, body, timeout)
}

/// Waits for migration `id` to end (through the agent at `addr`); its final record.
pub fn wait_migration(addr: &str, id: &str) -> Value {
    serde_json::to_value(agent::ops::source::wait_migration(addr, id).unwrap()).unwrap()
}

/// The pid of the worker behind `sock`.
pub fn worker_pid(sock: &std::path::Path) -> i32 {
    contract::worker::status(sock, Some(Duration::from_secs(5)))
        .unwrap()
        .pid as i32
}
