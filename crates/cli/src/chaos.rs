//! `ferry chaos`: seeded random faults against a real local cluster.
//!
//! Every trial builds a fresh 3-node cluster on loopback (three `ferry agent` processes, the
//! embedded SQLite store, shared storage in a directory) running two VMs of the test guest on
//! node1: `v` rewrites and verifies its memory, `d` writes sequence-numbered records to a disk
//! on the shared storage. One operation runs — a migration of either VM, a drain of node1, or a
//! migration that is cancelled at a random moment — and at a random moment one process is
//! SIGKILLed (a killed agent is restarted after a random delay; a killed worker is not: its VM
//! crashed) or SIGSTOPped and continued later: a worker or the agent of the migration's source or
//! destination, or a bystander agent. Everything random comes from the trial's seed
//! (`--seed S` runs trials S, S+1, ...; `--seed N --trials 1` replays trial N's plan exactly).
//!
//! Once the faults are over the cluster must settle, and then:
//! - never two running copies of a VM (sampled every 50 ms from the operation's start);
//! - each VM running on exactly the node the store names, or crashed with a reason;
//! - no VM `migrating` and no migration record `running` later than the bound;
//! - a running `v`: the verifier finds nothing corrupt and keeps sweeping; every VM's heartbeat
//!   counters continue across the nodes' serial logs;
//! - `d`: stopped and booted again, its disk holds every acknowledged record;
//! - every operation was accepted or refused, and what it said was true (a migration that
//!   succeeded ended on its destination, one that failed or was cancelled on its source, a
//!   drain's items likewise, a cancel refused for having passed the commit point did move);
//! - afterwards the cluster still works: a crashed `v` starts again, and `v` migrates there and
//!   back again back-to-back.
//!
//! `--soak M` then runs M back-to-back migrations of `v` between node1 and node2 (a drain of its
//! node every tenth step) without faults: every refusal is counted (and fails the soak), and
//! the agents' RSS and open file descriptors are reported at the start and the end.

use anyhow::{anyhow, bail, Context, Result};
use cluster::{MigrationOutcome, MigrationRecord, Phase, Store, VmRecord, VmState};
use contract::api::{
    CancelReply, CreateVm, DrainReport, DrainRequest, MigrateRequest, MigrationStarted,
    MigrationView, Schedulable,
};
use contract::worker::{self as wapi, WorkerState};
use contract::MigrationParams;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What `ferry chaos` does.
pub struct Options {
    pub seed: u64,
    pub trials: usize,
    pub soak: usize,
    /// Keep the directories of failed trials.
    pub keep: bool,
    /// Also write the Markdown report here.
    pub report: Option<PathBuf>,
}

/// How long the cluster may take to settle after the last fault.
const SETTLE_BOUND: Duration = Duration::from_secs(60);
const NODES: [&str; 3] = ["node1", "node2", "node3"];
/// Bandwidth cap of the faulted migrations: pre-copy of `v` lasts a few seconds, so faults
/// land in every phase.
const CAP_MIBS: u64 = 16;

fn verify_vm() -> String {
    "vcpus = 1\nmemory_mib = 96\ncmdline = \"ferry.workload=verify ferry.wss_mib=24 ferry.hb_ms=20\"\n"
        .into()
}

fn disk_vm(img: &Path) -> String {
    format!(
        "vcpus = 2\nmemory_mib = 64\ncmdline = \"ferry.workload=disk-log ferry.disk_rate=200 ferry.disk_flush=4 ferry.load_mib=8 ferry.hb_ms=20\"\n[[disks]]\npath = \"{}\"\n",
        img.display()
    )
}

/// SplitMix64: small, seedable, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn range_ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) of a process this harness started (an agent) or that one of its agents
    // started (a worker), by its pid; no memory is involved.
    unsafe { libc::kill(pid, sig) };
}

/// Waits until `pid` is gone or a zombie, and a little more (its sockets close after that).
fn wait_dead(pid: i32) {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next());
        if matches!(state, None | Some('Z') | Some('X')) {
            std::thread::sleep(Duration::from_millis(50));
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

// ---------------------------------------------------------------------------------------------
// The local cluster.

struct AgentProc {
    name: String,
    addr: String,
    data_dir: PathBuf,
    child: Option<Child>,
}

struct LocalCluster {
    dir: PathBuf,
    store_url: String,
    exe: PathBuf,
    agents: Vec<AgentProc>,
    /// The agents' current addresses, shared with operation threads (restarts change them).
    addrs: Arc<Mutex<Vec<String>>>,
    /// Processes stopped by a fault: continued before teardown whatever happens.
    stopped: Vec<i32>,
    keep: bool,
}

impl LocalCluster {
    fn new(dir: PathBuf) -> Result<LocalCluster> {
        std::fs::create_dir_all(dir.join("shared"))?;
        let exe = std::env::current_exe()?;
        if !exe.with_file_name("ferry-vmm").is_file() {
            bail!("ferry-vmm is not next to {}", exe.display());
        }
        let mut c = LocalCluster {
            store_url: format!("sqlite://{}", dir.join("cluster.db").display()),
            dir,
            exe,
            agents: Vec::new(),
            addrs: Arc::new(Mutex::new(Vec::new())),
            stopped: Vec::new(),
            keep: false,
        };
        for n in NODES {
            c.agents.push(AgentProc {
                name: n.into(),
                addr: String::new(),
                data_dir: c.dir.join(n),
                child: None,
            });
        }
        for i in 0..c.agents.len() {
            c.spawn(i)?;
        }
        Ok(c)
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let name = self.agents[i].name.clone();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))?;
        let addr_file = self.dir.join(format!("{name}.addr"));
        let _ = std::fs::remove_file(&addr_file);
        let shared = self.dir.join("shared");
        let mut child = Command::new(&self.exe)
            .args(["agent", "--node", &name, "--listen", "127.0.0.1:0"])
            .args(["--store", &self.store_url, "--data-dir"])
            .arg(&self.agents[i].data_dir)
            .arg("--storage")
            .arg(&shared)
            .args(["--lease-ttl-s", "3", "--address-file"])
            .arg(&addr_file)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .context("cannot start an agent")?;
        let Some(addr) = crate::wait_for_agent(&name, &addr_file, &mut child) else {
            bail!(
                "agent {name} did not come up: {}",
                self.agent_log_tail(&name, 3)
            );
        };
        self.agents[i].addr = addr;
        self.agents[i].child = Some(child);
        *self.addrs.lock().unwrap_or_else(|e| e.into_inner()) =
            self.agents.iter().map(|a| a.addr.clone()).collect();
        Ok(())
    }

    fn idx(&self, node: &str) -> usize {
        self.agents.iter().position(|a| a.name == node).unwrap_or(0)
    }

    fn addr(&self, node: &str) -> String {
        self.agents[self.idx(node)].addr.clone()
    }

    fn agent_pid(&self, node: &str) -> Option<i32> {
        self.agents[self.idx(node)]
            .child
            .as_ref()
            .map(|c| c.id() as i32)
    }

    fn kill_agent(&mut self, node: &str) {
        let i = self.idx(node);
        if let Some(mut c) = self.agents[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn agent_log_tail(&self, node: &str, n: usize) -> String {
        let s = std::fs::read_to_string(self.dir.join(format!("{node}.log"))).unwrap_or_default();
        let l: Vec<&str> = s.lines().collect();
        l[l.len().saturating_sub(n)..].join("\n")
    }

    fn store(&self) -> Result<Box<dyn Store>> {
        Ok(cluster::open(&self.store_url)?)
    }

    fn sock(&self, node: &str, vm: &str) -> PathBuf {
        self.agents[self.idx(node)]
            .data_dir
            .join("vms")
            .join(vm)
            .join("api.sock")
    }

    fn serial(&self, node: &str, vm: &str) -> PathBuf {
        self.agents[self.idx(node)]
            .data_dir
            .join("vms")
            .join(vm)
            .join("console")
            .join("serial.log")
    }

    fn data_dirs(&self) -> Vec<(String, PathBuf)> {
        self.agents
            .iter()
            .map(|a| (a.name.clone(), a.data_dir.clone()))
            .collect()
    }

    fn create_vm(&self, name: &str, toml: &str) -> Result<()> {
        let body = CreateVm {
            spec: None,
            toml: Some(format!("name = \"{name}\"\n{toml}")),
            node: Some("node1".into()),
        };
        let a = self.addr("node1");
        api(agent::client::post::<_, VmRecord>(
            &a,
            "/v1/vms",
            &body,
            Some(Duration::from_secs(30)),
        ))?;
        api(agent::client::post::<_, VmRecord>(
            &a,
            &format!("/v1/vms/{name}/start"),
            &json!({}),
            Some(Duration::from_secs(60)),
        ))?;
        Ok(())
    }

    fn vm(&self, name: &str) -> Result<VmRecord> {
        self.store()?
            .vm(name)?
            .map(|v| v.value)
            .ok_or_else(|| anyhow!("VM {name} has no record"))
    }

    fn logs(&self, vm: &str) -> String {
        NODES
            .iter()
            .map(|n| std::fs::read_to_string(self.serial(n, vm)).unwrap_or_default())
            .collect()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for pid in &self.stopped {
            signal(*pid, libc::SIGCONT);
        }
        for a in &self.agents {
            testbed::bed::shutdown_workers(&a.data_dir);
        }
        for a in &mut self.agents {
            if let Some(mut c) = a.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // Workers that did not answer the shutdown (their agents started them; their command
        // lines name this cluster's directory): by pid.
        let dir = self.dir.to_string_lossy().to_string();
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                let cmd = String::from_utf8_lossy(&cmd);
                if cmd.starts_with(&*self.exe.with_file_name("ferry-vmm").to_string_lossy())
                    && cmd.contains(&dir)
                {
                    signal(pid, libc::SIGKILL);
                }
            }
        }
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn api<T>(r: Result<T, agent::AgentError>) -> Result<T> {
    r.map_err(|e| anyhow!("{e}"))
}

/// The first address of `addrs` that answers `path`.
fn get_any<T: serde::de::DeserializeOwned>(addrs: &Mutex<Vec<String>>, path: &str) -> Result<T> {
    let list = addrs.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut last = anyhow!("no agent");
    for a in list {
        match agent::client::get::<T>(&a, path) {
            Ok(v) => return Ok(v),
            Err(e) => last = anyhow!("{e}"),
        }
    }
    Err(last)
}

/// Waits for migration `id` to end, asking any agent; None after `bound`.
fn wait_record(addrs: &Mutex<Vec<String>>, id: &str, bound: Duration) -> Option<MigrationRecord> {
    let t0 = Instant::now();
    while t0.elapsed() < bound {
        if let Ok(v) = get_any::<MigrationView>(addrs, &format!("/v1/migrations/{id}")) {
            if v.done {
                return Some(v.migration);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// Workers that hold `vm` (running or paused), by node; a stopped (SIGSTOP) worker does not
/// answer and is not counted.
fn holders(dirs: &[(String, PathBuf)], vm: &str, timeout: Duration) -> Vec<(String, WorkerState)> {
    let mut out = Vec::new();
    for (node, dir) in dirs {
        let sock = dir.join("vms").join(vm).join("api.sock");
        if !sock.exists() {
            continue;
        }
        if let Ok(st) = wapi::status(&sock, Some(timeout)) {
            if matches!(st.state, WorkerState::Running | WorkerState::Paused) {
                out.push((node.clone(), st.state));
            }
        }
    }
    out
}

/// The complete lines of a serial stream (the last one may still be being written).
fn complete_lines(log: &str) -> &str {
    &log[..log.rfind('\n').map(|i| i + 1).unwrap_or(0)]
}

/// `disk seq=N` values of the complete lines of a serial stream.
fn seqs(log: &str) -> Vec<u64> {
    complete_lines(log)
        .lines()
        .filter_map(|l| l.strip_prefix("disk seq="))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

fn wait_for(what: &str, bound: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let t0 = Instant::now();
    while !f() {
        if t0.elapsed() > bound {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Heartbeat counters of `vm` continue across the serial logs of the nodes (node1 first: every
/// VM starts there and moves at most once a trial).
fn heartbeats_continuous(c: &LocalCluster, vm: &str) -> Result<()> {
    let mut last: BTreeMap<u32, u64> = BTreeMap::new();
    for l in c.logs(vm).lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() == 4 && f[0] == "hb" {
            if let (Ok(cpu), Ok(n)) = (f[1].parse::<u32>(), f[2].parse::<u64>()) {
                let want = last.get(&cpu).map(|p| p + 1).unwrap_or(1);
                if n != want {
                    bail!("VM {vm}: vCPU {cpu} heartbeat {n} follows {}", want - 1);
                }
                last.insert(cpu, n);
            }
        }
    }
    if last.is_empty() {
        bail!("no heartbeats from VM {vm}");
    }
    Ok(())
}

/// The verifier of `v` on `node` completes `n` more sweeps, and no log shows corruption.
fn verifier_ok(c: &LocalCluster, node: &str, n: usize) -> Result<()> {
    let path = c.serial(node, "v");
    let count = |s: &str| s.lines().filter(|l| l.starts_with("verify ok")).count();
    let start = count(&std::fs::read_to_string(&path).unwrap_or_default());
    let t0 = Instant::now();
    loop {
        let all = c.logs("v");
        if all.contains("verify CORRUPT") || all.contains("verify bad") {
            bail!("VM v reports corrupt memory");
        }
        if count(&std::fs::read_to_string(&path).unwrap_or_default()) >= start + n {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("VM v on {node}: no verifier progress for 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// A trial.

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    MigrateV,
    MigrateD,
    Drain,
    CancelV,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::MigrateV => "migrate v",
            Op::MigrateD => "migrate d",
            Op::Drain => "drain node1",
            Op::CancelV => "migrate v + cancel",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Target {
    SourceWorker,
    DestinationWorker,
    SourceAgent,
    DestinationAgent,
    BystanderAgent,
}

impl Target {
    const ALL: [Target; 5] = [
        Target::SourceWorker,
        Target::DestinationWorker,
        Target::SourceAgent,
        Target::DestinationAgent,
        Target::BystanderAgent,
    ];
    fn name(self) -> &'static str {
        match self {
            Target::SourceWorker => "source worker",
            Target::DestinationWorker => "destination worker",
            Target::SourceAgent => "source agent",
            Target::DestinationAgent => "destination agent",
            Target::BystanderAgent => "bystander agent",
        }
    }
}

/// What the operation said.
#[derive(Debug, Default)]
struct OpResult {
    /// (VM, migration id, from, to, final record) of each migration it started.
    migrations: Vec<(String, String, String, String, Option<MigrationRecord>)>,
    /// Refusals and errors, as said.
    errors: Vec<String>,
    /// Items of a drain: (VM, moved to).
    drained: Vec<(String, Option<String>)>,
    /// What the cancel request said.
    cancel: Option<Result<CancelReply, String>>,
}

/// One trial's result.
struct Trial {
    seed: u64,
    op: Op,
    fault: String,
    phase: String,
    outcome: String,
    /// What the VM the fault aimed at ended as: moved, stayed, crashed.
    end: &'static str,
    failure: Option<String>,
    settle_s: f64,
}

fn run_op(
    op: Op,
    via: String,
    dest: String,
    addrs: Arc<Mutex<Vec<String>>>,
    cancel_after: Duration,
    started: Arc<Mutex<Vec<String>>>,
) -> OpResult {
    let mut r = OpResult::default();
    let migrate = |vm: &str, r: &mut OpResult| -> Option<String> {
        let req = MigrateRequest {
            to: dest.clone(),
            dry_run: false,
            params: MigrationParams {
                max_bandwidth_mibs: Some(CAP_MIBS),
                ..Default::default()
            },
        };
        match agent::client::post::<_, MigrationStarted>(
            &via,
            &format!("/v1/vms/{vm}/migrate"),
            &req,
            Some(Duration::from_secs(60)),
        ) {
            Ok(s) => {
                let id = s.migration.id.clone();
                started
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(id.clone());
                r.migrations.push((
                    vm.to_string(),
                    id.clone(),
                    s.migration.from,
                    dest.clone(),
                    None,
                ));
                Some(id)
            }
            Err(e) => {
                r.errors.push(format!("migrate {vm}: {e}"));
                None
            }
        }
    };
    match op {
        Op::MigrateV | Op::MigrateD | Op::CancelV => {
            let vm = if op == Op::MigrateD { "d" } else { "v" };
            if let Some(id) = migrate(vm, &mut r) {
                if op == Op::CancelV {
                    std::thread::sleep(cancel_after);
                    r.cancel = Some(cancel_any(&addrs, &id));
                }
            }
        }
        Op::Drain => {
            match agent::client::post::<_, DrainReport>(
                &via,
                "/v1/nodes/node1/drain",
                &DrainRequest {
                    concurrency: Some(2),
                },
                Some(Duration::from_secs(300)),
            ) {
                Ok(rep) => {
                    for i in rep.vms {
                        if let Some(e) = &i.error {
                            r.errors.push(format!("drain {}: {e}", i.vm));
                        }
                        if let (Some(id), Some(to)) = (&i.migration, &i.to) {
                            r.migrations.push((
                                i.vm.clone(),
                                id.clone(),
                                "node1".into(),
                                to.clone(),
                                None,
                            ));
                        }
                        r.drained.push((i.vm, if i.ok { i.to } else { None }));
                    }
                }
                Err(e) => r.errors.push(format!("drain: {e}")),
            }
        }
    }
    for m in &mut r.migrations {
        m.4 = wait_record(&addrs, &m.1, Duration::from_secs(180));
    }
    r
}

/// Cancels migration `id` through the first agent that answers; what it said.
fn cancel_any(addrs: &Mutex<Vec<String>>, id: &str) -> Result<CancelReply, String> {
    let list = addrs.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut last = String::from("no agent answered");
    for a in list {
        match agent::client::post::<_, CancelReply>(
            &a,
            &format!("/v1/migrations/{id}/cancel"),
            &json!({}),
            Some(Duration::from_secs(30)),
        ) {
            Ok(c) => return Ok(c),
            Err(agent::AgentError::Unavailable(e)) => last = e,
            Err(e) => return Err(e.to_string()),
        }
    }
    Err(last)
}

fn run_trial(seed: u64, base: &Path, keep: bool) -> Trial {
    let mut rng = Rng(seed);
    let op = [Op::MigrateV, Op::MigrateD, Op::Drain, Op::CancelV][rng.below(4) as usize];
    let target = Target::ALL[rng.below(Target::ALL.len() as u64) as usize];
    let kill = rng.below(2) == 0;
    let fault = format!(
        "{} {}",
        if kill { "SIGKILL" } else { "SIGSTOP" },
        target.name()
    );
    let mut t = Trial {
        seed,
        op,
        fault,
        phase: "-".into(),
        outcome: String::new(),
        end: "",
        failure: None,
        settle_s: 0.0,
    };
    let dir = base.join(format!("trial-{seed}"));
    let _ = std::fs::remove_dir_all(&dir);
    let mut c = match LocalCluster::new(dir.clone()) {
        Ok(c) => c,
        Err(e) => {
            t.failure = Some(format!("cluster setup: {e:#}"));
            return t;
        }
    };
    let r = trial_in(&mut c, &mut rng, &mut t, op, target, kill);
    if let Err(e) = r {
        let mut msg = format!("{e:#}");
        for n in NODES {
            msg.push_str(&format!("\n    {n}: {}", c.agent_log_tail(n, 4)));
        }
        t.failure = Some(msg);
        c.keep = keep;
        if keep {
            eprintln!("trial {seed}: directory kept: {}", dir.display());
        }
    }
    t
}

fn trial_in(
    c: &mut LocalCluster,
    rng: &mut Rng,
    t: &mut Trial,
    op: Op,
    target: Target,
    kill: bool,
) -> Result<()> {
    let img = c.dir.join("shared").join("d.img");
    std::fs::File::create(&img)?.set_len(16 << 20)?;
    c.create_vm("v", &verify_vm())?;
    c.create_vm("d", &disk_vm(&img))?;
    verifier_ok(c, "node1", 1)?;
    wait_for("disk records", Duration::from_secs(30), || {
        seqs(&std::fs::read_to_string(c.serial("node1", "d")).unwrap_or_default()).len() > 10
    })?;
    // The plan, all from the seed.
    let dest = ["node2", "node3"][rng.below(2) as usize].to_string();
    let via = NODES[rng.below(3) as usize];
    let fault_at = rng.range_ms(0, if op == Op::Drain { 5000 } else { 3500 });
    let hold = rng.range_ms(300, 5000);
    let restart_after = rng.range_ms(100, 3000);
    let cancel_after = rng.range_ms(0, 3000);
    let which_vm = rng.below(2);
    // Half the trials aim at a phase (the fault comes once the store shows the migration there,
    // plus up to 100 ms), the others at a moment.
    let aim = [
        None,
        Some(Phase::Setup),
        Some(Phase::Precopy),
        Some(Phase::Pause),
        Some(Phase::DeviceState),
        Some(Phase::Ready),
        Some(Phase::Commit),
    ][rng.below(7) as usize]
        .filter(|_| rng.below(2) == 0);
    let aim_extra = rng.range_ms(0, 100);
    // Never two running copies, sampled from the operation's start until the checks end.
    let stop_sampler = Arc::new(AtomicBool::new(false));
    // Stops the sampler however this trial ends.
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let _stop_guard = StopOnDrop(stop_sampler.clone());
    let doubles: Arc<Mutex<Vec<String>>> = Arc::default();
    let sampler = {
        let (stop, doubles, dirs) = (stop_sampler.clone(), doubles.clone(), c.data_dirs());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                for vm in ["v", "d"] {
                    let h = holders(&dirs, vm, Duration::from_millis(300));
                    let running: Vec<_> = h
                        .iter()
                        .filter(|(_, s)| *s == WorkerState::Running)
                        .collect();
                    if running.len() > 1 {
                        doubles
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(format!("two running copies of {vm}: {h:?}"));
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let started: Arc<Mutex<Vec<String>>> = Arc::default();
    let op_thread = {
        let (via, dest2, addrs, started) =
            (c.addr(via), dest.clone(), c.addrs.clone(), started.clone());
        std::thread::spawn(move || run_op(op, via, dest2, addrs, cancel_after, started))
    };
    // Where the fault lands: the running migration of the VM concerned (a drain: either VM).
    let store = c.store()?;
    let vm_name = match op {
        Op::MigrateD => "d",
        Op::Drain if which_vm == 1 => "d",
        _ => "v",
    };
    match aim {
        None => std::thread::sleep(fault_at),
        Some(phase) => {
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(30) && !op_thread.is_finished() {
                let reached = store
                    .migrations_of(vm_name, 1)
                    .ok()
                    .and_then(|m| m.into_iter().next())
                    .is_some_and(|m| m.finished() || m.phase >= phase);
                if reached {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(aim_extra);
        }
    }
    let rec = store.migrations_of(vm_name, 1)?.into_iter().next();
    let (src, dst) = match &rec {
        Some(m) => (m.from.clone(), m.to.clone()),
        None => ("node1".to_string(), dest.clone()),
    };
    t.phase = match &rec {
        Some(m) if !m.finished() => m.phase.to_string(),
        Some(m) => format!("after it ended ({})", m.outcome),
        None => "before the lock".into(),
    };
    let bystander = NODES
        .iter()
        .find(|n| **n != src && **n != dst)
        .map(|n| n.to_string())
        .unwrap_or_default();
    let mut notes = Vec::new();
    match target {
        Target::SourceWorker | Target::DestinationWorker => {
            let node = if target == Target::SourceWorker {
                &src
            } else {
                &dst
            };
            match wapi::status(&c.sock(node, vm_name), Some(Duration::from_secs(2))) {
                Ok(st) => {
                    let pid = st.pid as i32;
                    if kill {
                        signal(pid, libc::SIGKILL);
                        wait_dead(pid);
                    } else {
                        signal(pid, libc::SIGSTOP);
                        c.stopped.push(pid);
                        std::thread::sleep(hold);
                        signal(pid, libc::SIGCONT);
                    }
                }
                Err(_) => {
                    notes.push("no such worker at that moment".to_string());
                    t.phase = format!("{} (no worker)", t.phase);
                }
            }
        }
        Target::SourceAgent | Target::DestinationAgent | Target::BystanderAgent => {
            let node = match target {
                Target::SourceAgent => src.clone(),
                Target::DestinationAgent => dst.clone(),
                _ => bystander.clone(),
            };
            if kill {
                c.kill_agent(&node);
                std::thread::sleep(restart_after);
                let i = c.idx(&node);
                c.spawn(i)?;
            } else if let Some(pid) = c.agent_pid(&node) {
                signal(pid, libc::SIGSTOP);
                c.stopped.push(pid);
                std::thread::sleep(hold);
                signal(pid, libc::SIGCONT);
            }
        }
    }
    // The faults are over.
    let t_end = Instant::now();
    let res = loop {
        if op_thread.is_finished() {
            break op_thread
                .join()
                .map_err(|_| anyhow!("the operation thread panicked"))?;
        }
        if t_end.elapsed() > Duration::from_secs(240) {
            bail!("the operation never answered");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Settled: no VM migrating, every VM running on its owner only (or not running at all), no
    // migration record left running.
    let dirs = c.data_dirs();
    loop {
        let mut pending = Vec::new();
        for vm in ["v", "d"] {
            let r = c.vm(vm)?;
            let h = holders(&dirs, vm, Duration::from_secs(2));
            let ok = match r.state {
                VmState::Running => {
                    h.len() == 1 && h[0].0 == r.owner && h[0].1 == WorkerState::Running
                }
                VmState::Crashed | VmState::Stopped => h.is_empty(),
                VmState::Migrating => false,
            };
            if !ok {
                pending.push(format!(
                    "{vm}: {} on {} with workers {h:?}",
                    r.state, r.owner
                ));
            }
        }
        for m in store.running_migrations()? {
            pending.push(format!("migration {} still running in {}", m.id, m.phase));
        }
        if pending.is_empty() {
            break;
        }
        if t_end.elapsed() > SETTLE_BOUND {
            bail!(
                "not settled {} s after the faults: {}",
                SETTLE_BOUND.as_secs(),
                pending.join("; ")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    t.settle_s = t_end.elapsed().as_secs_f64();
    let fault_vm = c.vm(vm_name)?;
    // What each VM ended as.
    let mut ends = Vec::new();
    for vm in ["v", "d"] {
        let r = c.vm(vm)?;
        match r.state {
            VmState::Running => ends.push(format!("{vm} on {}", r.owner)),
            VmState::Crashed => {
                if r.last_error.as_deref().unwrap_or("").is_empty() {
                    bail!("VM {vm} crashed without a reason");
                }
                ends.push(format!("{vm} crashed"));
            }
            VmState::Stopped => ends.push(format!("{vm} stopped")),
            VmState::Migrating => unreachable!("settled above"),
        }
    }
    // What the operation said is true.
    check_op(c, &res)?;
    // Running copies are healthy.
    let v = c.vm("v")?;
    if v.state == VmState::Running {
        verifier_ok(c, &v.owner, 2)?;
    }
    for vm in ["v", "d"] {
        heartbeats_continuous(c, vm)?;
    }
    // d's disk holds every acknowledged record.
    let d = c.vm("d")?;
    let a = c.addr(&d.owner);
    if d.state == VmState::Running {
        api(agent::client::post::<_, VmRecord>(
            &a,
            "/v1/vms/d/stop",
            &json!({}),
            Some(Duration::from_secs(60)),
        ))?;
    }
    let logs = c.logs("d");
    let s = seqs(&logs);
    for w in s.windows(2) {
        if w[1] != w[0] + 1 {
            bail!("d's disk records lost or repeated: {} then {}", w[0], w[1]);
        }
    }
    let acked = s.last().copied().unwrap_or(0);
    let _ = std::fs::remove_file(c.serial(&d.owner, "d"));
    api(agent::client::post::<_, VmRecord>(
        &a,
        "/v1/vms/d/start",
        &json!({}),
        Some(Duration::from_secs(60)),
    ))
    .context("starting d again")?;
    let path = c.serial(&d.owner, "d");
    // A complete line: the number may still be on its way.
    wait_for("d's boot check", Duration::from_secs(30), || {
        let s = std::fs::read_to_string(&path).unwrap_or_default();
        complete_lines(&s).lines().any(|l| {
            l.starts_with("disk ok last=")
                || l.starts_with("disk CORRUPT")
                || l.starts_with("disk ERROR")
        })
    })?;
    let boot = complete_lines(&std::fs::read_to_string(&path)?).to_string();
    let last: u64 = boot
        .lines()
        .find_map(|l| l.strip_prefix("disk ok last="))
        .ok_or_else(|| {
            anyhow!(
                "d's disk check failed: {}",
                boot.lines().last().unwrap_or("")
            )
        })?
        .trim()
        .parse()?;
    if !(acked..=acked + 2).contains(&last) {
        bail!("d's disk holds {last} records, {acked} were acknowledged");
    }
    notes.push(format!("d: {last} records, {acked} acknowledged"));
    // The cluster still works: a crashed v starts, then moves away and straight back. A fault
    // may have let leases lapse (a stopped agent; one stopped inside a store write holds every
    // agent's writes up): every node must be alive again first.
    undrain_all(c)?;
    all_alive(store.as_ref())?;
    let v = c.vm("v")?;
    let va = c.addr(&v.owner);
    if v.state != VmState::Running {
        api(agent::client::post::<_, VmRecord>(
            &va,
            "/v1/vms/v/start",
            &json!({}),
            Some(Duration::from_secs(60)),
        ))
        .context("starting v again after the trial")?;
        verifier_ok(c, &v.owner, 1)?;
    }
    let home = v.owner.clone();
    let away = NODES
        .iter()
        .find(|n| **n != home)
        .copied()
        .unwrap_or("node2");
    let mut lapsed = 0;
    migrate_retrying_lapsed_leases(c, store.as_ref(), "v", away, &mut lapsed)
        .context("migrating v after the trial")?;
    migrate_retrying_lapsed_leases(c, store.as_ref(), "v", &home, &mut lapsed)
        .context("migrating v straight back after the trial")?;
    if lapsed > 0 {
        notes.push(format!(
            "{lapsed} after-trial migration(s) refused first: a node's lease had lapsed"
        ));
    }
    verifier_ok(c, &home, 1)?;
    stop_sampler.store(true, Ordering::SeqCst);
    let _ = sampler.join();
    if let Some(d) = doubles.lock().unwrap_or_else(|e| e.into_inner()).first() {
        bail!("{d}");
    }
    t.end = match (&fault_vm.state, fault_vm.owner.as_str()) {
        (VmState::Crashed, _) => "crashed",
        (_, "node1") => "stayed",
        _ => "moved",
    };
    t.outcome = ends.join(", ");
    if !notes.is_empty() {
        t.outcome = format!("{} ({})", t.outcome, notes.join("; "));
    }
    Ok(())
}

/// Every answer of the operation was true of what the store ended with.
fn check_op(c: &LocalCluster, res: &OpResult) -> Result<()> {
    for (vm, id, from, to, rec) in &res.migrations {
        let now = c.vm(vm)?;
        let Some(m) = rec else {
            bail!("migration {id} never ended");
        };
        match m.outcome {
            MigrationOutcome::Succeeded if now.owner != *to => {
                bail!(
                    "migration {id} succeeded, but {vm} is owned by {}",
                    now.owner
                )
            }
            MigrationOutcome::Failed | MigrationOutcome::Cancelled if now.owner != *from => {
                bail!(
                    "migration {id} {} ({}), but {vm} is owned by {}",
                    m.outcome,
                    m.reason.as_deref().unwrap_or(""),
                    now.owner
                )
            }
            MigrationOutcome::Failed | MigrationOutcome::Cancelled
                if m.reason.as_deref().unwrap_or("").is_empty() =>
            {
                bail!("migration {id} {} without a reason", m.outcome)
            }
            _ => {}
        }
    }
    for (vm, to) in &res.drained {
        if let Some(to) = to {
            let now = c.vm(vm)?;
            if now.owner != *to {
                bail!(
                    "the drain moved {vm} to {to}, but it is owned by {}",
                    now.owner
                );
            }
        }
    }
    for e in &res.errors {
        // "<what>: <reason>": the reason must say something.
        if e.split_once(": ")
            .is_none_or(|(_, why)| why.trim().is_empty())
        {
            bail!("a refusal without a reason: {e:?}");
        }
    }
    if let Some(Err(e)) = &res.cancel {
        if e.contains("passed its commit point") {
            if let Some((vm, _, _, to, _)) = res.migrations.first() {
                if c.vm(vm)?.owner != *to {
                    bail!("cancel refused after the commit point, but {vm} did not move: {e}");
                }
            }
        } else if e.contains("already ended")
            && res.migrations.first().and_then(|m| m.4.as_ref()).is_none()
        {
            bail!("cancel said the migration ended, but it never did: {e}");
        }
    }
    Ok(())
}

fn undrain_all(c: &LocalCluster) -> Result<()> {
    let a = c.addr("node1");
    for n in NODES {
        api(agent::client::post::<_, Schedulable>(
            &a,
            &format!("/v1/nodes/{n}/undrain"),
            &json!({}),
            Some(Duration::from_secs(30)),
        ))?;
    }
    Ok(())
}

/// Migrates `vm` to `to` (uncapped, asked through node1's agent) and waits; Err on refusal.
fn migrate_now(c: &LocalCluster, vm: &str, to: &str) -> Result<MigrationRecord> {
    let req = MigrateRequest {
        to: to.into(),
        dry_run: false,
        params: MigrationParams::default(),
    };
    let s: MigrationStarted = api(agent::client::post(
        &c.addr("node1"),
        &format!("/v1/vms/{vm}/migrate"),
        &req,
        Some(Duration::from_secs(60)),
    ))?;
    let m = wait_record(&c.addrs, &s.migration.id, Duration::from_secs(120))
        .ok_or_else(|| anyhow!("migration {} never ended", s.migration.id))?;
    if m.outcome != MigrationOutcome::Succeeded {
        bail!(
            "migration of {vm} to {to} {}: {}",
            m.outcome,
            m.reason.as_deref().unwrap_or("")
        );
    }
    Ok(m)
}

/// Whether a refusal says a node's lease lapsed (true at that moment: the store says so; seen
/// under heavy host load, when a keepalive waits longer than the lease's margin).
fn lease_lapsed(e: &anyhow::Error) -> bool {
    format!("{e:#}").contains("(its lease expired)")
}

/// Waits until every node of the cluster is alive in the store.
fn all_alive(store: &dyn Store) -> Result<()> {
    wait_for("every node alive again", Duration::from_secs(30), || {
        store
            .nodes()
            .is_ok_and(|n| n.len() == NODES.len() && n.iter().all(|n| n.alive))
    })
}

/// [`migrate_now`], asked again (up to 3 times, once every node is alive) when refused because
/// a node's lease had lapsed; `lapsed` counts those refusals.
fn migrate_retrying_lapsed_leases(
    c: &LocalCluster,
    store: &dyn Store,
    vm: &str,
    to: &str,
    lapsed: &mut usize,
) -> Result<MigrationRecord> {
    let mut tries = 0;
    loop {
        match migrate_now(c, vm, to) {
            Err(e) if lease_lapsed(&e) && tries < 3 => {
                tries += 1;
                *lapsed += 1;
                all_alive(store)?;
            }
            r => return r,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Soak.

/// (RSS KiB, open fds) of a process.
fn usage_of(pid: i32) -> (u64, usize) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (rss, fds)
}

fn soak(base: &Path, n: usize, out: &mut String) -> Result<bool> {
    let c = LocalCluster::new(base.join("soak"))?;
    c.create_vm("v", &verify_vm())?;
    verifier_ok(&c, "node1", 1)?;
    let before: Vec<(u64, usize)> = NODES
        .iter()
        .map(|n| usage_of(c.agent_pid(n).unwrap_or(0)))
        .collect();
    let mut refusals: BTreeMap<String, usize> = BTreeMap::new();
    let (mut moved, mut drains, mut lapsed) = (0usize, 0usize, 0usize);
    let t0 = Instant::now();
    for i in 0..n {
        let owner = c.vm("v")?.owner;
        let r = if i % 10 == 9 {
            // A drain of the VM's node, then the node back in service.
            drains += 1;
            let rep: Result<DrainReport> = api(agent::client::post(
                &c.addr(&owner),
                &format!("/v1/nodes/{owner}/drain"),
                &DrainRequest { concurrency: None },
                Some(Duration::from_secs(300)),
            ));
            let r = match rep {
                Ok(rep) if rep.failed == 0 => Ok(()),
                Ok(rep) => Err(anyhow!(
                    "{}",
                    rep.vms
                        .iter()
                        .filter_map(|i| i.error.clone())
                        .collect::<Vec<_>>()
                        .join("; ")
                )),
                Err(e) => Err(e),
            };
            undrain_all(&c)?;
            r
        } else {
            let to = if owner == "node1" { "node2" } else { "node1" };
            migrate_now(&c, "v", to).map(|_| ())
        };
        match r {
            Ok(()) => moved += 1,
            Err(e) if lease_lapsed(&e) => {
                lapsed += 1;
                all_alive(c.store()?.as_ref())?;
            }
            Err(e) => {
                // The reason without the ids that differ every time.
                let text = format!("{e:#}");
                let key: String = text
                    .split_whitespace()
                    .map(|w| if w.contains("v-1") { "<id>" } else { w })
                    .collect::<Vec<_>>()
                    .join(" ");
                *refusals.entry(key).or_default() += 1;
            }
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let v = c.vm("v")?;
    let healthy = verifier_ok(&c, &v.owner, 1);
    let after: Vec<(u64, usize)> = NODES
        .iter()
        .map(|n| usage_of(c.agent_pid(n).unwrap_or(0)))
        .collect();
    out.push_str(&format!(
        "\n## Soak: {n} back-to-back steps (a drain every tenth), {elapsed:.0} s\n\n{moved} succeeded, {} refused or failed, {lapsed} refused because a node's lease had lapsed; verifier after: {}\n\n| agent | RSS start | RSS end | fds start | fds end |\n|---|---|---|---|---|\n",
        n - moved - lapsed,
        match &healthy {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("{e:#}"),
        }
    ));
    for (i, node) in NODES.iter().enumerate() {
        out.push_str(&format!(
            "| {node} | {:.1} MiB | {:.1} MiB | {} | {} |\n",
            before[i].0 as f64 / 1024.0,
            after[i].0 as f64 / 1024.0,
            before[i].1,
            after[i].1
        ));
    }
    if !refusals.is_empty() {
        out.push_str("\nRefusals:\n");
        for (r, k) in &refusals {
            out.push_str(&format!("- {k} x {r}\n"));
        }
    }
    let _ = drains;
    Ok(refusals.is_empty() && healthy.is_ok())
}

// ---------------------------------------------------------------------------------------------

/// Runs the trials (and the soak); prints the table; Err if any trial or the soak failed.
pub fn run(o: &Options) -> Result<()> {
    if !Path::new("/dev/kvm").exists() {
        bail!("/dev/kvm is missing: the chaos harness runs real VMs");
    }
    let base = std::env::temp_dir().join(format!("ferry-chaos-{}", std::process::id()));
    std::fs::create_dir_all(&base)?;
    let t0 = Instant::now();
    let mut trials = Vec::new();
    for i in 0..o.trials {
        let seed = o.seed.wrapping_add(i as u64);
        let tt = Instant::now();
        let t = run_trial(seed, &base, o.keep);
        match &t.failure {
            None => println!(
                "trial {seed}: {} / {} at {}: {} (settled {:.1} s, trial {:.0} s)",
                t.op.name(),
                t.fault,
                t.phase,
                t.outcome,
                t.settle_s,
                tt.elapsed().as_secs_f64()
            ),
            Some(f) => println!(
                "trial {seed}: {} / {} at {}: FAILED: {f}\n  replay: ferry chaos --seed {seed} --trials 1",
                t.op.name(),
                t.fault,
                t.phase
            ),
        }
        trials.push(t);
    }
    let mut report = table(o, &trials, t0.elapsed().as_secs_f64());
    let soak_ok = if o.soak > 0 {
        match soak(&base, o.soak, &mut report) {
            Ok(ok) => ok,
            Err(e) => {
                report.push_str(&format!("\nSoak could not run: {e:#}\n"));
                false
            }
        }
    } else {
        true
    };
    println!("\n{report}");
    if let Some(p) = &o.report {
        std::fs::write(p, &report).with_context(|| format!("cannot write {}", p.display()))?;
    }
    if !o.keep {
        let _ = std::fs::remove_dir_all(&base);
    }
    let failed: Vec<u64> = trials
        .iter()
        .filter(|t| t.failure.is_some())
        .map(|t| t.seed)
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} trials failed; replay with --seed N --trials 1 for N in {failed:?}",
            failed.len(),
            trials.len()
        );
    }
    if !soak_ok {
        bail!("the soak had refusals or an unhealthy VM (see the report)");
    }
    Ok(())
}

/// Outcomes per fault and phase.
fn table(o: &Options, trials: &[Trial], secs: f64) -> String {
    #[derive(Default)]
    struct Row {
        n: usize,
        ok: usize,
        moved: usize,
        stayed: usize,
        crashed: usize,
        settle_max: f64,
        failed: Vec<u64>,
    }
    let mut rows: BTreeMap<(String, String), Row> = BTreeMap::new();
    for t in trials {
        let r = rows.entry((t.fault.clone(), t.phase.clone())).or_default();
        r.n += 1;
        match &t.failure {
            None => {
                r.ok += 1;
                match t.end {
                    "moved" => r.moved += 1,
                    "stayed" => r.stayed += 1,
                    _ => r.crashed += 1,
                }
                r.settle_max = r.settle_max.max(t.settle_s);
            }
            Some(_) => r.failed.push(t.seed),
        }
    }
    let failed = trials.iter().filter(|t| t.failure.is_some()).count();
    let mut s = format!(
        "# ferry chaos --seed {} --trials {}: {} passed, {failed} failed ({secs:.0} s)\n\n| fault | phase at the fault | trials | invariants held | moved | stayed | crashed (with reason) | slowest settle | failing seeds |\n|---|---|---|---|---|---|---|---|---|\n",
        o.seed,
        o.trials,
        trials.len() - failed
    );
    for ((fault, phase), r) in &rows {
        s.push_str(&format!(
            "| {fault} | {phase} | {} | {} | {} | {} | {} | {:.1} s | {} |\n",
            r.n,
            r.ok,
            r.moved,
            r.stayed,
            r.crashed,
            r.settle_max,
            r.failed
                .iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        ));
    }
    let mut ops: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for t in trials {
        let e = ops.entry(t.op.name()).or_default();
        e.0 += 1;
        if t.failure.is_none() {
            e.1 += 1;
        }
    }
    s.push_str("\n| operation | trials | invariants held |\n|---|---|---|\n");
    for (op, (n, ok)) in ops {
        s.push_str(&format!("| {op} | {n} | {ok} |\n"));
    }
    s
}
