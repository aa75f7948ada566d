//! The handover of a migration's commit to its stream, through real agents and the store:
//! between two agents that both take part, the VM's record names the destination in
//! `handover_to` while the migration runs (recorded before the pause, so the stream's Commit
//! decides and no store swap sits in the downtime), and the destination is the owner
//! afterwards; to an agent started with `--store-commit` (whose node says it does not take
//! part) the record never names a handover, and the store's swap at Ready decides as before.
//! The guest's memory and heartbeats are checked after each move. `ferry bench-commit` runs too.

mod common;
use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

/// Migrates `vm` to `to` (asked through `via`) while sampling the store every few ms; returns
/// the destinations `handover_to` named while the migration held the VM.
fn migrate_watching(c: &Cluster, via: &str, to: &str) -> Vec<String> {
    let started = c.post(
        via,
        "/v1/vms/vm/migrate",
        // Capped so that pre-copy takes a while: the samples see the migration's states.
        json!({ "to": to, "params": { "max_bandwidth_mibs": 40 } }),
    );
    let id = started["migration"]["id"].as_str().unwrap().to_string();
    let store = c.store();
    let mut named = Vec::new();
    let t0 = Instant::now();
    loop {
        let rec = store.vm("vm").unwrap().unwrap().value;
        if rec.migration.as_deref() == Some(id.as_str()) {
            if let Some(h) = &rec.handover_to {
                if !named.contains(h) {
                    named.push(h.clone());
                }
            }
        } else if rec.migration.is_none() && rec.owner == to {
            assert!(rec.handover_to.is_none(), "{rec:?}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "migration {id} did not end: {rec:?}"
        );
        std::thread::sleep(Duration::from_millis(3));
    }
    let m = wait_migration(started["agent"].as_str().unwrap(), &id);
    assert_eq!(m["outcome"], "succeeded", "{m}");
    named
}

#[test]
fn the_commit_is_handed_over_only_between_agents_that_take_part() {
    let mut c = Cluster::new(false);
    c.add("node1", &[]);
    c.add("node2", &[]);
    c.add("node3", &["--store-commit"]);
    let nodes = c.store().nodes().unwrap();
    for n in &nodes {
        assert_eq!(n.info.handover, n.info.name != "node3", "{:?}", n.info);
    }
    c.vm(
        "node1",
        "vm",
        "vcpus = 2\nmemory_mib = 128\ncmdline = \"ferry.workload=verify ferry.wss_mib=32 ferry.hb_ms=20\"\n",
    );
    c.assert_verify("node1", "vm", 1);

    // Both take part: the store names the handover to node2 during the migration.
    let named = migrate_watching(&c, "node1", "node2");
    assert_eq!(named, vec!["node2".to_string()]);
    c.assert_verify("node2", "vm", 2);

    // To a --store-commit node: never handed over.
    let named = migrate_watching(&c, "node1", "node3");
    assert!(named.is_empty(), "handed over to {named:?}");
    c.assert_verify("node3", "vm", 2);
    // (Checked now: node1's log is replaced when the VM comes back to it.)
    c.assert_heartbeats_continuous("vm", &["node1", "node2", "node3"]);

    // From a --store-commit node: not either (it does not hand over).
    let named = migrate_watching(&c, "node3", "node1");
    assert!(named.is_empty(), "handed over to {named:?}");
    c.assert_verify("node1", "vm", 2);
    assert_eq!(c.assert_one_owner("vm"), "node1");
}

#[test]
fn bench_commit_reports_both_protocols() {
    let text = ferry_report(&[
        "bench-commit",
        "--migrations",
        "2",
        "--stores",
        "sqlite",
        "--memory-mib",
        "64",
    ]);
    for protocol in ["handover (default)", "--store-commit"] {
        let row = text
            .lines()
            .find(|l| l.starts_with(&format!("| sqlite | {protocol} |")))
            .unwrap_or_else(|| panic!("no row for {protocol}: {text}"));
        let f: Vec<&str> = row.split('|').map(str::trim).collect();
        let downtime: f64 = f[3].trim_end_matches(" ms").parse().unwrap();
        assert!(downtime > 0.0, "{row}");
    }
    assert!(text.contains("\nsqlite: the store adds "), "{text}");
}
