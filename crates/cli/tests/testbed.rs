//! End to end in the network-namespace test bed (see `agent::testbed`): three nodes, each with
//! its agent, bridge and TAPs, joined by a switch; a client on the switch pings and UDP-echoes a
//! VM while it is live-migrated between nodes; a disk-log VM on shared storage keeps every
//! acknowledged record across moves; a node that lost its storage link is refused by preflight.

use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use testbed::bed::{vm_ip, Testbed};

fn ferry_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferry"))
}

fn testbed(dir: &Path, nodes: usize) -> Testbed {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: these tests need KVM"
    );
    let mut tb = Testbed::create(dir, nodes).expect("test bed");
    for i in 1..=nodes {
        tb.start_agent(&format!("n{i}"), &ferry_bin(), &[])
            .expect("agent");
    }
    tb
}

fn create_vm(tb: &Testbed, node: &str, toml: &str) {
    tb.post(node, "/v1/vms", json!({ "toml": toml, "node": node }))
        .unwrap();
    let name = toml
        .lines()
        .find_map(|l| l.strip_prefix("name = "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    tb.post(node, &format!("/v1/vms/{name}/start"), json!({}))
        .unwrap();
}

fn wait_serial(tb: &Testbed, node: &str, vm: &str, what: &str, pred: impl Fn(&str) -> bool) {
    let t0 = Instant::now();
    loop {
        let s = std::fs::read_to_string(tb.serial(node, vm)).unwrap_or_default();
        if pred(&s) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{vm} on {node}: no {what}:\n{}",
            s.lines().rev().take(8).collect::<Vec<_>>().join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

use testbed::disk_seqs;

fn owner(tb: &Testbed, vm: &str) -> String {
    let v = tb.get("n1", &format!("/v1/vms/{vm}")).unwrap();
    v["vm"]["owner"]
        .as_str()
        .or_else(|| v["owner"].as_str())
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_client_keeps_talking_to_a_vm_while_it_moves_between_nodes() {
    let dir = tempfile::Builder::new()
        .prefix("ferry-testbed-")
        .tempdir()
        .unwrap();
    let tb = testbed(dir.path(), 3);
    let ip = vm_ip(0);
    create_vm(
        &tb,
        "n1",
        &format!(
            "name = \"web\"\nmemory_mib = 64\ncmdline = \"ferry.workload=net-echo ferry.ip={ip}\"\n[[nics]]\nnetwork = \"lan\"\n"
        ),
    );
    wait_serial(&tb, "n1", "web", "net up", |s| s.contains("net up"));
    let stop = dir.path().join("probe.stop");
    let probe = tb.start_probe(&ferry_bin(), &ip, 10, &stop).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let mut moves = Vec::new();
    for (from, to) in [("n1", "n2"), ("n2", "n3"), ("n3", "n1")] {
        let t = Instant::now();
        let m = tb
            .migrate(from, "web", to)
            .unwrap_or_else(|e| panic!("web {from} -> {to}: {e}\n{}", tb.agent_log(from)));
        moves.push((from, to, t.elapsed(), m.summary.map(|s| s.downtime_ms)));
        assert_eq!(owner(&tb, "web"), to);
        std::thread::sleep(Duration::from_millis(1500));
    }
    let r = tb.stop_probe(probe, &stop).unwrap();
    let udp = r.udp.clone().unwrap();
    println!("moves: {moves:?}");
    println!(
        "icmp: sent {} lost {} longest gap {:.1} ms; udp: sent {} lost {} longest gap {:.1} ms; gaps icmp {:?} udp {:?}",
        r.icmp.sent, r.icmp.lost, r.icmp.max_gap_ms, udp.sent, udp.lost, udp.max_gap_ms, r.icmp.gaps, udp.gaps
    );
    // Every reply the client got is byte-for-byte what it sent (the guest's receive buffers,
    // written by the VMM, moved with the VM).
    assert_eq!(r.icmp.corrupt, 0);
    assert_eq!(udp.corrupt, 0);
    assert!(r.icmp.sent > 400 && udp.sent > 400, "{r:?}");
    // The VM answered throughout: a move costs at most a few probes, never the connection
    // (generous bound: this asserts reachability, not speed; the numbers are benchmarked).
    assert!(
        r.icmp.max_consecutive_lost < 100 && udp.max_consecutive_lost < 100,
        "{r:?}"
    );
    assert!(
        r.icmp.received + 300 > r.icmp.sent && udp.received + 300 > udp.sent,
        "{r:?}"
    );
    // And it still answers on n1 after coming back: the last probes were answered.
    let s = std::fs::read_to_string(tb.serial("n1", "web")).unwrap();
    assert!(!s.contains("PANIC"), "{s}");
}

#[test]
fn a_disk_log_vm_keeps_every_record_and_storage_loss_is_refused() {
    let dir = tempfile::Builder::new()
        .prefix("ferry-testbed-")
        .tempdir()
        .unwrap();
    let mut tb = testbed(dir.path(), 3);
    let backing = tb.shared_backing.join("db.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let disk = tb.shared.join("db.img");
    create_vm(
        &tb,
        "n1",
        &format!(
            "name = \"db\"\nmemory_mib = 64\ncmdline = \"ferry.workload=disk-log ferry.disk_rate=300 ferry.disk_flush=4\"\n[[disks]]\npath = \"{}\"\n",
            disk.display()
        ),
    );
    wait_serial(&tb, "n1", "db", "records", |s| disk_seqs(s).len() > 30);
    let mut path = vec!["n1"];
    for (from, to) in [("n1", "n2"), ("n2", "n3")] {
        tb.migrate(from, "db", to)
            .unwrap_or_else(|e| panic!("db {from} -> {to}: {e}\n{}", tb.agent_log(from)));
        path.push(to);
        assert_eq!(owner(&tb, "db"), to);
        let before =
            disk_seqs(&std::fs::read_to_string(tb.serial(to, "db")).unwrap_or_default()).len();
        wait_serial(&tb, to, "db", "records after the move", |s| {
            disk_seqs(s).len() > before + 30
        });
        // After each move: one continuous, intact log of acknowledged records.
        let text: String = path
            .iter()
            .map(|n| std::fs::read_to_string(tb.serial(n, "db")).unwrap())
            .collect();
        for bad in ["disk CORRUPT", "disk ERROR", "PANIC"] {
            assert!(!text.contains(bad), "{bad} after {from} -> {to}");
        }
        let s = disk_seqs(&text);
        for w in s.windows(2) {
            assert_eq!(
                w[1],
                w[0] + 1,
                "records lost or repeated after {from} -> {to}"
            );
        }
    }

    // n1 loses its link to the shared storage: preflight refuses, the VM stays on n3.
    tb.cut_storage("n1").unwrap();
    let e = tb.migrate("n3", "db", "n1").unwrap_err();
    assert!(
        e.contains("shared storage not reachable") && e.contains("db.img"),
        "{e}"
    );
    assert_eq!(owner(&tb, "db"), "n3");
    let n = disk_seqs(&std::fs::read_to_string(tb.serial("n3", "db")).unwrap()).len();
    wait_serial(&tb, "n3", "db", "records after the refusal", |s| {
        disk_seqs(s).len() > n + 20
    });
    // Link back: the move works.
    tb.restore_storage("n1").unwrap();
    tb.migrate("n3", "db", "n1")
        .unwrap_or_else(|e| panic!("db n3 -> n1 after the link came back: {e}"));
    assert_eq!(owner(&tb, "db"), "n1");

    wait_serial(&tb, "n1", "db", "records back on n1", |s| {
        disk_seqs(s).len() > 20
    });
    // Stop the VM and boot it again from its disk: the log holds every acknowledged record.
    tb.post("n1", "/v1/vms/db/stop", json!({})).unwrap();
    let acked = *disk_seqs(&std::fs::read_to_string(tb.serial("n1", "db")).unwrap())
        .last()
        .unwrap();
    tb.post("n1", "/v1/vms/db/start", json!({})).unwrap();
    wait_serial(&tb, "n1", "db", "the boot check", |s| {
        s.contains("disk ok") || s.contains("disk CORRUPT")
    });
    let s = std::fs::read_to_string(tb.serial("n1", "db")).unwrap();
    let last: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("disk ok last="))
        .unwrap_or_else(|| panic!("{s}"))
        .parse()
        .unwrap();
    assert!(
        (acked..=acked + 2).contains(&last),
        "the disk holds {last} records, {acked} were acknowledged"
    );
    tb.stop_all();
}

/// `ferry bench-net` end to end, one migration per scenario: it runs, every scenario and both
/// systems have a row, and no reply came back garbled (the numbers themselves are benchmarked,
/// not asserted).
#[test]
fn bench_net_runs_and_reports_every_scenario() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.md");
    let out = std::process::Command::new(ferry_bin())
        .args(["bench-net", "--migrations", "1", "--report"])
        .arg(&report)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let r = std::fs::read_to_string(&report).unwrap();
    let rows: Vec<Vec<&str>> = r
        .lines()
        .filter(|l| l.starts_with("| Ferry |") || l.starts_with("| QEMU |"))
        .filter(|l| l.contains('→'))
        .map(|l| l.split('|').map(str::trim).collect())
        .collect();
    assert_eq!(rows.iter().filter(|c| c[1] == "Ferry").count(), 3, "{r}");
    assert_eq!(rows.iter().filter(|c| c[1] == "QEMU").count(), 2, "{r}");
    assert!(r.contains("outage Ferry / QEMU"), "{r}");
    // Summary rows: no corrupt replies anywhere.
    for l in r
        .lines()
        .filter(|l| (l.starts_with("| Ferry |") || l.starts_with("| QEMU |")) && !l.contains('→'))
    {
        let c: Vec<&str> = l.split('|').map(str::trim).collect();
        assert_eq!(c[7], "0", "corrupt replies: {l}");
    }
}
