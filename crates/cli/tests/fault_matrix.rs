//! The fault matrix: a real two-node cluster migrates a running VM, and at an exact phase of
//! the migration (a typed fault point: the process that reaches it stops itself) one process is
//! SIGKILLed — the source worker, the destination worker, the source agent or the destination
//! agent — and a killed agent is restarted. A last row stops the store (etcd) across the commit
//! point for longer than the commit retry window. Every row must end in exactly one of: the VM
//! running on the node the store names as owner (one copy, verifier ok or every disk record
//! there, heartbeats continuous), or the VM crashed with a recorded reason and its disk intact
//! (it boots again and finds every acknowledged record). Never two running copies (sampled all
//! along), never `migrating` for long after the faults end.
//!
//! Needs the test build's fault points (`--features contract/fault-injection`, as
//! scripts/test.sh builds).

mod common;
use common::*;
use contract::faults::FaultPoint;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    SourceWorker,
    DestinationWorker,
    SourceAgent,
    DestinationAgent,
    /// The store is stopped (SIGSTOP) for longer than the commit retry window, then resumed.
    Store,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::SourceWorker => "source worker",
            Target::DestinationWorker => "destination worker",
            Target::SourceAgent => "source agent",
            Target::DestinationAgent => "destination agent",
            Target::Store => "store (etcd) stopped 5 s",
        }
    }
}

/// What a row ended in.
#[derive(Debug, Clone, PartialEq)]
enum End {
    Moved,
    Stayed,
    Crashed(String),
}

impl End {
    fn text(&self) -> String {
        match self {
            End::Moved => "runs on node2 (moved)".into(),
            End::Stayed => "runs on node1 (stayed)".into(),
            End::Crashed(r) => format!("crashed, disk intact: {r}"),
        }
    }
}

/// How the migration's commit is decided.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Protocol {
    /// The default: before the pause the store hands the commit over to the migration
    /// stream (the source worker's Commit decides; a destination whose source vanished after
    /// Ready commits on its own).
    Handover,
    /// `--store-commit`: the source agent's store swap at Ready is the commit point.
    StoreCommit,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::Handover => "handover",
            Protocol::StoreCommit => "store-commit",
        }
    }
}

/// The outcomes a row may have: the invariant allows either "runs on its owner" or "crashed
/// with a reason"; which one follows from where the commit point is. Two where the fault
/// races a step the row cannot hold still (both are correct ends).
fn expected(protocol: Protocol, target: Target, point: FaultPoint) -> Vec<End> {
    match protocol {
        Protocol::StoreCommit => vec![expected_store_commit(target, point)],
        Protocol::Handover => expected_handover(target, point),
    }
}

/// With the handover the commit point is the source worker's Commit; the destination takes a
/// VM that is complete there whenever its source vanished, and the source worker needs its
/// agent only until the handover is answered.
fn expected_handover(target: Target, point: FaultPoint) -> Vec<End> {
    use FaultPoint::*;
    let crashed = End::Crashed(String::new());
    match (target, point) {
        // The only copy dies with the source worker until the destination holds all of it.
        (Target::SourceWorker, WorkerReady | WorkerCommitSent) => vec![End::Moved],
        (Target::SourceWorker, _) => vec![crashed],
        // No receiver exists yet when the source agent has only locked the VM.
        (Target::DestinationWorker, AgentLocked) => vec![End::Moved],
        // The destination may have resumed on the Commit: the source never runs it again.
        (Target::DestinationWorker, WorkerCommitSent) => vec![crashed],
        (Target::DestinationWorker, _) => vec![End::Stayed],
        // Until the worker has the handover's answer its migration needs the agent (in pass 0
        // the answer may or may not be out when the agent dies); after it the worker finishes
        // on its own and the restarted agent lets it.
        (Target::SourceAgent, AgentLocked | AgentHandover) => vec![End::Stayed],
        (Target::SourceAgent, WorkerPass0) => vec![End::Stayed, End::Moved],
        (Target::SourceAgent, _) => vec![End::Moved],
        (Target::DestinationAgent, AgentLocked) => vec![End::Stayed],
        (Target::DestinationAgent, _) => vec![End::Moved],
        // The store is not asked between the handover and the resume.
        (Target::Store, _) => vec![End::Moved],
    }
}

fn expected_store_commit(target: Target, point: FaultPoint) -> End {
    use FaultPoint::*;
    let committed = matches!(point, AgentAfterCas | WorkerCommitSent);
    match target {
        // Before the commit point the VM exists only on its source.
        Target::SourceWorker if committed => End::Moved,
        Target::SourceWorker => End::Crashed(String::new()),
        // After it, only on the destination.
        Target::DestinationWorker if committed => End::Crashed(String::new()),
        // No receiver exists yet when the source agent has only locked the VM: nothing to kill.
        Target::DestinationWorker if point == AgentLocked => End::Moved,
        Target::DestinationWorker => End::Stayed,
        Target::SourceAgent if committed => End::Moved,
        Target::SourceAgent => End::Stayed,
        // The destination's receiver outlives its agent and finishes the migration, except
        // before the receiver exists (the source agent then cannot start one).
        Target::DestinationAgent if point == AgentLocked => End::Stayed,
        Target::DestinationAgent => End::Moved,
        Target::Store => End::Stayed,
    }
}

/// Points at which the VM's memory is still being copied: a verifying guest (flipped or stale
/// pages would show); the later points touch the disk hand-over: a disk-log guest.
fn uses_disk(point: FaultPoint) -> bool {
    !matches!(
        point,
        FaultPoint::AgentLocked
            | FaultPoint::AgentHandover
            | FaultPoint::WorkerPass0
            | FaultPoint::WorkerPass2
    )
}

const VERIFY_VM: &str = "vcpus = 2\nmemory_mib = 256\ncmdline = \"ferry.workload=verify ferry.wss_mib=48 ferry.hb_ms=20\"\n";

fn disk_vm(img: &Path) -> String {
    format!(
        "vcpus = 2\nmemory_mib = 128\ncmdline = \"ferry.workload=disk-log ferry.disk_rate=200 ferry.disk_flush=4 ferry.load_mib=16 ferry.hb_ms=20\"\n[[disks]]\npath = \"{}\"\n",
        img.display()
    )
}

/// What the first `sectors` sectors of a disk-log image hold, as runs: zero sectors, records
/// (`FERRYLOG` + their seq word) and anything else (evidence for a failed disk check).
fn image_map(img: &std::path::Path, sectors: u64) -> String {
    let data = match std::fs::read(img) {
        Ok(d) => d,
        Err(e) => return format!("image {}: {e}", img.display()),
    };
    let mut runs: Vec<(u64, u64, String)> = Vec::new();
    for (i, sec) in data.chunks(512).take(sectors as usize).enumerate() {
        let what = if sec.iter().all(|&b| b == 0) {
            "zero".to_string()
        } else if sec.starts_with(b"FERRYLOG") && sec.len() >= 16 {
            let seq = u64::from_le_bytes(sec[8..16].try_into().unwrap());
            if seq == i as u64 + 1 {
                "records".to_string()
            } else {
                format!("record seq {seq}")
            }
        } else {
            format!("other ({:02x?}...)", &sec[..8.min(sec.len())])
        };
        match runs.last_mut() {
            Some((_, end, w)) if *w == what => *end = i as u64,
            _ => runs.push((i as u64, i as u64, what)),
        }
    }
    let runs: Vec<String> = runs
        .iter()
        .map(|(a, b, w)| format!("sectors {a}-{b}: {w}"))
        .collect();
    format!(
        "image {} ({} bytes): {}",
        img.display(),
        data.len(),
        runs.join("; ")
    )
}

use testbed::disk_seqs;

fn sigcont(pid: i32) {
    // SAFETY: kill(2) of one of the test's own (grand)children.
    unsafe { libc::kill(pid, libc::SIGCONT) };
}

fn sigkill(pid: i32) {
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// Waits until `pid` has exited (gone, or a zombie), and a little more: the kernel tears a
/// killed process's sockets down asynchronously, a few ms after it became a zombie, and only
/// then do its peers see the connection close.
fn wait_dead(pid: i32) {
    let t0 = Instant::now();
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next());
        if matches!(state, None | Some('Z') | Some('X')) {
            std::thread::sleep(Duration::from_millis(50));
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{pid} does not die");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

struct Report {
    protocol: Protocol,
    target: Target,
    point: FaultPoint,
    end: End,
    settle_s: f64,
    note: String,
}

fn tail(s: &str, n: usize) -> String {
    let l: Vec<&str> = s.lines().collect();
    l[l.len().saturating_sub(n)..].join("\n")
}

fn run_row(protocol: Protocol, target: Target, point: FaultPoint) -> Result<Report, String> {
    let mut c = Cluster::new(target == Target::Store);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_row_in(&mut c, protocol, target, point)
    }))
    .unwrap_or_else(|p| {
        Err(p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".into()))
    });
    r.map_err(|e| {
        format!(
            "{e}\n--- node1 agent:\n{}\n--- node2 agent:\n{}\n--- node1 worker:\n{}",
            tail(&c.agent_log("node1"), 25),
            tail(&c.agent_log("node2"), 25),
            tail(
                &std::fs::read_to_string(c.agent("node1").data_dir.join("vms/vm/worker.log"))
                    .unwrap_or_default(),
                10
            ),
        ) + &format!(
            "\n--- node2 worker:\n{}\n--- serial node1:\n{}\n--- serial node2:\n{}",
            tail(
                &std::fs::read_to_string(c.agent("node2").data_dir.join("vms/vm/worker.log"))
                    .unwrap_or_default(),
                10
            ),
            tail(
                &std::fs::read_to_string(c.serial("node1", "vm")).unwrap_or_default(),
                5
            ),
            tail(
                &std::fs::read_to_string(c.serial("node2", "vm")).unwrap_or_default(),
                5
            ),
        )
    })
}

fn run_row_in(
    c: &mut Cluster,
    protocol: Protocol,
    target: Target,
    point: FaultPoint,
) -> Result<Report, String> {
    let faults = c.dir.path().join("faults");
    let shared = c.dir.path().join("shared");
    std::fs::create_dir_all(&faults).unwrap();
    // Workers run as their own users: they write their fault markers here (through the
    // directory they opened before dropping root), like into /tmp.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&faults, std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::create_dir_all(&shared).unwrap();
    let storage = shared.to_str().unwrap().to_string();
    let retry: &[&str] = if target == Target::Store {
        &["--commit-retry-s", "2"]
    } else {
        &[]
    };
    let mut args1 = vec!["--storage", storage.as_str()];
    args1.extend_from_slice(retry);
    if protocol == Protocol::StoreCommit {
        args1.push("--store-commit");
    }
    c.add_env(
        "node1",
        &args1,
        &[
            ("FERRY_FAULT", point.as_str()),
            ("FERRY_FAULT_DIR", faults.to_str().unwrap()),
        ],
    );
    c.add("node2", &args1);
    let disk = uses_disk(point);
    let img = shared.join("vm.img");
    if disk {
        std::fs::File::create(&img)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        c.vm("node1", "vm", &disk_vm(&img));
        wait_until("disk records", Duration::from_secs(30), || {
            disk_seqs(&std::fs::read_to_string(c.serial("node1", "vm")).unwrap_or_default()).len()
                > 20
        });
    } else {
        c.vm("node1", "vm", VERIFY_VM);
        c.assert_verify("node1", "vm", 1);
    }
    // A bandwidth cap keeps pre-copy going for a few passes (the guest keeps dirtying).
    let params = if disk {
        json!({})
    } else {
        json!({ "max_bandwidth_mibs": 80 })
    };
    // Asked from a thread of its own: the answer may never come (the agent may stop at its
    // fault point before answering, or be killed).
    let a1 = c.addr("node1");
    let mut request = Some(std::thread::spawn(move || {
        post(
            &a1,
            "/v1/vms/vm/migrate",
            &json!({ "to": "node2", "params": params }),
            Some(Duration::from_secs(60)),
        )
    }));
    // The process that reaches the point stops itself and says so.
    let marker = faults.join(point.as_str());
    let t0 = Instant::now();
    while !marker.exists() {
        if request.as_ref().is_some_and(|h| h.is_finished()) {
            // A refusal ends the request before any fault point: report it.
            if let Some(Ok(Err(e))) = request.take().map(|h| h.join()) {
                return Err(format!("migrate: {e}"));
            }
        }
        if t0.elapsed() > Duration::from_secs(90) {
            return Err(format!(
                "fault point {} never reached\nnode1: {}",
                point.as_str(),
                c.agent_log("node1")
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let stopped: i32 = std::fs::read_to_string(&marker)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let agent_pid = |c: &Cluster, n: &str| c.agent(n).child.as_ref().map(|ch| ch.id() as i32);
    let sock = |c: &Cluster, n: &str| c.agent(n).data_dir.join("vms/vm/api.sock");
    let mut note = String::new();
    let mut restart = None;
    match target {
        Target::SourceWorker => {
            let pid = if agent_pid(c, "node1") == Some(stopped) {
                worker_pid(&sock(c, "node1"))
            } else {
                stopped
            };
            sigkill(pid);
            wait_dead(pid);
        }
        Target::DestinationWorker => {
            match contract::worker::status(&sock(c, "node2"), Some(Duration::from_secs(5))) {
                Ok(st) => {
                    sigkill(st.pid as i32);
                    wait_dead(st.pid as i32);
                }
                Err(_) => note = "no destination worker exists yet: nothing killed".into(),
            }
        }
        Target::SourceAgent => {
            c.kill("node1");
            restart = Some("node1");
        }
        Target::DestinationAgent => {
            c.kill("node2");
            restart = Some("node2");
        }
        Target::Store => {
            c.etcd().pause();
            sigcont(stopped);
            std::thread::sleep(Duration::from_secs(5));
            c.etcd().resume();
        }
    }
    if pid_alive(stopped) {
        sigcont(stopped);
    }
    if let Some(n) = restart {
        std::thread::sleep(Duration::from_millis(500));
        if std::env::var_os("FERRY_FAULT_DEBUG").is_some() {
            eprintln!(
                "DEBUG before restart: stopped pid {stopped} alive {} status {:?}",
                pid_alive(stopped),
                contract::worker::status(&sock(c, "node1"), Some(Duration::from_secs(2)))
            );
        }
        c.restart(n);
    }
    // Faults are over: the cluster must settle, never with two running copies.
    let t_faults = Instant::now();
    let store = c.store();
    let settled = loop {
        let ws = c.workers_of("vm");
        let running: Vec<_> = ws.iter().filter(|(_, s)| s == "running").collect();
        if running.len() > 1 {
            return Err(format!("two running copies: {ws:?}"));
        }
        let rec = store.vm("vm").unwrap().unwrap().value;
        let done = match rec.state {
            cluster::VmState::Running => {
                running.len() == 1 && running[0].0 == rec.owner && ws.len() == 1
            }
            cluster::VmState::Crashed | cluster::VmState::Stopped => running.is_empty(),
            cluster::VmState::Migrating => false,
        };
        if done {
            break rec;
        }
        if t_faults.elapsed() > Duration::from_secs(60) {
            return Err(format!(
                "not settled 60 s after the faults: {rec:?}, workers {ws:?}\nnode1: {}\nnode2: {}",
                c.agent_log("node1"),
                c.agent_log("node2")
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let settle_s = t_faults.elapsed().as_secs_f64();
    // The guest's own account.
    let logs = |c: &Cluster| -> String {
        ["node1", "node2"]
            .iter()
            .map(|n| std::fs::read_to_string(c.serial(n, "vm")).unwrap_or_default())
            .collect()
    };
    let end = match settled.state {
        cluster::VmState::Running => {
            let owner = settled.owner.clone();
            if disk {
                let n =
                    disk_seqs(&std::fs::read_to_string(c.serial(&owner, "vm")).unwrap_or_default())
                        .len();
                wait_until(
                    "disk records after the faults",
                    Duration::from_secs(30),
                    || {
                        disk_seqs(
                            &std::fs::read_to_string(c.serial(&owner, "vm")).unwrap_or_default(),
                        )
                        .len()
                            > n + 20
                    },
                );
                let s = disk_seqs(&logs(c));
                for w in s.windows(2) {
                    if w[1] != w[0] + 1 {
                        return Err(format!(
                            "disk records lost or repeated: {} then {}",
                            w[0], w[1]
                        ));
                    }
                }
            } else {
                c.assert_verify(&owner, "vm", 2);
            }
            c.assert_heartbeats_continuous("vm", &["node1", "node2"]);
            if owner == "node2" {
                End::Moved
            } else {
                End::Stayed
            }
        }
        _ => End::Crashed(settled.last_error.clone().unwrap_or_default()),
    };
    if let End::Crashed(r) = &end {
        if r.is_empty() {
            return Err("crashed without a recorded reason".into());
        }
    }
    // Whatever happened, the disk holds every acknowledged record: stop the VM (if it runs),
    // boot it again from its disk and let its boot check count.
    if disk {
        // Stopped first, then counted: a VM still running keeps writing (and acknowledging)
        // records between a count and its stop.
        let owner = settled.owner.clone();
        if settled.state == cluster::VmState::Running {
            c.post(&owner, "/v1/vms/vm/stop", json!({}));
        }
        let acked = disk_seqs(&logs(c)).last().copied().unwrap_or(0);
        // The image as the check boot will find it (that boot appends at once).
        let before = image_map(&img, acked + 8);
        let _ = std::fs::remove_file(c.serial(&owner, "vm"));
        c.post(&owner, "/v1/vms/vm/start", json!({}));
        let path = c.serial(&owner, "vm");
        wait_until("the boot check", Duration::from_secs(30), || {
            let s = std::fs::read_to_string(&path).unwrap_or_default();
            s.contains("disk ok") || s.contains("disk CORRUPT")
        });
        let s = std::fs::read_to_string(&path).unwrap();
        let last: u64 = s
            .lines()
            .find_map(|l| l.strip_prefix("disk ok last="))
            .ok_or_else(|| format!("disk check failed: {s}"))?
            .trim()
            .parse()
            .unwrap();
        if !(acked..=acked + 2).contains(&last) {
            return Err(format!(
                "the disk holds {last} records, {acked} were acknowledged\n{}\n--- serial node1 (whole):\n{}",
                before,
                std::fs::read_to_string(c.serial("node1", "vm")).unwrap_or_default()
            ));
        }
        note = format!(
            "{note}{}disk: {last} records, {acked} acknowledged",
            if note.is_empty() { "" } else { "; " }
        );
    } else if settled.state != cluster::VmState::Running {
        // A crashed VM can be started again.
        c.post(&settled.owner, "/v1/vms/vm/start", json!({}));
        c.assert_verify(&settled.owner, "vm", 1);
    }
    let want = expected(protocol, target, point);
    let same = want.iter().any(|w| match (w, &end) {
        (End::Crashed(_), End::Crashed(_)) => true,
        // Whether the commit's store write was applied before the store stopped answering is
        // the store's to know: the VM may end on either node, never on both or on none.
        (End::Stayed, End::Moved) if target == Target::Store => true,
        (a, b) => a == b,
    });
    if !same {
        let w: Vec<String> = want.iter().map(End::text).collect();
        return Err(format!(
            "ended as {} but {} was expected",
            end.text(),
            w.join(" or ")
        ));
    }
    Ok(Report {
        protocol,
        target,
        point,
        end,
        settle_s,
        note,
    })
}

/// Where the latest table goes: the build's target directory (`CARGO_TARGET_DIR` when the
/// build put it elsewhere, as `.ci/run` in a clean clone may), created if need be.
fn docs_path() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let _ = std::fs::create_dir_all(&dir);
    dir.join("fault-matrix.md")
}

#[test]
fn every_single_fault_converges() {
    let mut rows = Vec::new();
    let targets = [
        Target::SourceWorker,
        Target::DestinationWorker,
        Target::SourceAgent,
        Target::DestinationAgent,
    ];
    // Every point with the handover (the default protocol) except the store swap at Ready,
    // which it does not have.
    for target in targets {
        for point in FaultPoint::ALL {
            if point != FaultPoint::AgentAfterCas {
                rows.push((Protocol::Handover, target, point));
            }
        }
    }
    rows.push((Protocol::Handover, Target::Store, FaultPoint::WorkerReady));
    // `--store-commit`: the points around its commit point (the earlier ones behave as with
    // the handover before it is made).
    for target in targets {
        for point in [
            FaultPoint::WorkerReady,
            FaultPoint::AgentAfterCas,
            FaultPoint::WorkerCommitSent,
        ] {
            rows.push((Protocol::StoreCommit, target, point));
        }
    }
    rows.push((
        Protocol::StoreCommit,
        Target::Store,
        FaultPoint::WorkerReady,
    ));
    if let Ok(only) = std::env::var("FERRY_FAULT_ROWS") {
        // e.g. FERRY_FAULT_ROWS="handover/source agent/worker-pass-2" to rerun one row.
        rows.retain(|(pr, t, p)| {
            only.split(',')
                .any(|o| o == format!("{}/{}/{}", pr.name(), t.name(), p.as_str()))
        });
    }
    let mut table = String::from(
        "| commit | fault | phase (fault point) | outcome | settled after faults | notes |\n|---|---|---|---|---|---|\n",
    );
    let mut failures = Vec::new();
    for (protocol, target, point) in rows {
        let t0 = Instant::now();
        let r = std::panic::catch_unwind(|| run_row(protocol, target, point)).unwrap_or_else(|p| {
            Err(p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panicked".into()))
        });
        match r {
            Ok(rep) => {
                println!(
                    "ROW {} {} at {}: {} (settled {:.1} s, row {:.0} s) {}",
                    rep.protocol.name(),
                    rep.target.name(),
                    rep.point.as_str(),
                    rep.end.text(),
                    rep.settle_s,
                    t0.elapsed().as_secs_f64(),
                    rep.note
                );
                table.push_str(&format!(
                    "| {} | kill -9 {} | {} | {} | {:.1} s | {} |\n",
                    rep.protocol.name(),
                    rep.target.name(),
                    rep.point.as_str(),
                    rep.end.text(),
                    rep.settle_s,
                    rep.note
                ));
            }
            Err(e) => {
                println!(
                    "ROW {} {} at {}: FAILED: {e}",
                    protocol.name(),
                    target.name(),
                    point.as_str()
                );
                table.push_str(&format!(
                    "| {} | kill -9 {} | {} | **FAILED** | | {} |\n",
                    protocol.name(),
                    target.name(),
                    point.as_str(),
                    e.lines().next().unwrap_or("")
                ));
                failures.push(format!(
                    "{} {} at {}: {e}",
                    protocol.name(),
                    target.name(),
                    point.as_str()
                ));
            }
        }
    }
    let table = table.replace("kill -9 store", "store");
    println!("\n{table}");
    let _ = std::fs::write(docs_path(), &table);
    assert!(
        failures.is_empty(),
        "{} rows failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
