//! A real cluster on loopback (agents, workers, KVM), with each store backend: VMs created,
//! started and migrated around; ownership is always exactly one node, in the store and in the
//! running workers; the guest's verifier stays ok after every move.

mod common;
use common::*;
use serde_json::json;
use std::time::Duration;

fn lifecycle_and_migrations(etcd: bool) {
    let mut c = Cluster::new(etcd);
    c.add("node1", &[]);
    c.add("node2", &[]);
    c.add("node3", &[]);
    // Nodes register and are alive.
    let out = c.ferry_ok("node1", &["node", "list"]);
    for n in ["node1", "node2", "node3"] {
        assert!(
            out.lines().any(|l| l.starts_with(n) && l.contains(" up ")),
            "{out}"
        );
    }
    // Two VMs through the CLI (TOML specs), on two nodes.
    let spec = c.dir.path().join("alpha.toml");
    std::fs::write(
        &spec,
        format!("name = \"alpha\"\ncpu_profile = \"cluster\"\n{GUEST}"),
    )
    .unwrap();
    assert!(c
        .ferry_ok("node1", &["vm", "create", spec.to_str().unwrap()])
        .contains("created VM alpha on node1"));
    assert!(c
        .ferry_ok("node1", &["vm", "start", "alpha"])
        .contains("running on node1"));
    c.vm("node2", "beta", GUEST);
    let list = c.ferry_ok("node3", &["vm", "list"]);
    assert!(
        list.contains("alpha") && list.contains("beta") && list.contains("running"),
        "{list}"
    );
    assert_eq!(c.assert_one_owner("alpha"), "node1");
    assert_eq!(c.assert_one_owner("beta"), "node2");
    c.assert_verify("node1", "alpha", 2);
    // alpha: node1 -> node2 -> node3 (the last one through the CLI with its progress bar), beta: node2 -> node1.
    c.migrate("node3", "alpha", "node2", json!({})).unwrap();
    assert_eq!(c.assert_one_owner("alpha"), "node2");
    c.assert_verify("node2", "alpha", 2);
    let out = c.ferry_ok(
        "node1",
        &[
            "vm",
            "migrate",
            "alpha",
            "--to",
            "node3",
            "--streams",
            "2",
            "--compress",
            "lz4",
        ],
    );
    assert!(out.contains("migrated alpha node2 -> node3"), "{out}");
    assert_eq!(c.assert_one_owner("alpha"), "node3");
    c.assert_verify("node3", "alpha", 2);
    c.assert_heartbeats_continuous("alpha", &["node1", "node2", "node3"]);
    c.migrate("node1", "beta", "node1", json!({})).unwrap();
    assert_eq!(c.assert_one_owner("beta"), "node1");
    c.assert_verify("node1", "beta", 2);
    c.assert_heartbeats_continuous("beta", &["node2", "node1"]);
    // The records: show lists the migrations; JSON output works everywhere.
    let show = c.ferry_ok("node2", &["vm", "show", "alpha"]);
    assert!(
        show.contains("state running on node3") && show.contains("node1 -> node2: succeeded"),
        "{show}"
    );
    let j: serde_json::Value =
        serde_json::from_str(&c.ferry_ok("node2", &["--output", "json", "vm", "list"])).unwrap();
    assert_eq!(j.as_array().unwrap().len(), 2);
    // Metrics count the migrations and their downtime.
    let m = ureq::get(&format!("http://{}/metrics", c.addr("node1")))
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    assert!(
        m.contains("ferry_migrations_succeeded_total")
            && m.contains("ferry_migration_downtime_seconds_count"),
        "{m}"
    );
    // Stop and delete through any agent.
    c.ferry_ok("node1", &["vm", "stop", "alpha"]);
    assert!(c.workers_of("alpha").is_empty());
    c.ferry_ok("node2", &["vm", "delete", "alpha"]);
    assert!(c.store().vm("alpha").unwrap().is_none());
    // A node whose agent stops is reported down once its lease expires.
    c.kill("node2");
    wait_until("node2 to be reported down", Duration::from_secs(15), || {
        c.ferry_ok("node1", &["node", "list"])
            .lines()
            .any(|l| l.starts_with("node2") && l.contains(" down "))
    });
}

#[test]
fn cluster_with_embedded_store() {
    lifecycle_and_migrations(false);
}

#[test]
fn cluster_with_etcd() {
    lifecycle_and_migrations(true);
}
