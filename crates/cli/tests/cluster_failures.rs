//! Refusals, failures and drains on a real cluster: whatever happens, exactly one worker runs
//! each VM, on the node the store names as its owner.

mod common;
use common::*;
use serde_json::json;
use std::time::Duration;

#[test]
fn preflight_refusals_through_the_cli() {
    let mut c = Cluster::new(false);
    // A real shared directory with a real image: the worker opens and locks it.
    let shared = c.dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let image = shared.join("disky.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let shared = shared.to_str().unwrap().to_string();
    c.add("node1", &["--storage", &shared]);
    c.add("small", &["--memory-mib", "128", "--storage", &shared]);
    c.add("old", &["--cpu-limit", "baseline", "--storage", &shared]);
    c.add("nostore", &[]);
    c.vm(
        "node1",
        "big",
        "memory_mib = 256\ncmdline = \"ferry.workload=verify ferry.wss_mib=8 ferry.hb_ms=20\"\n",
    );
    c.vm(
        "node1",
        "hosty",
        &format!("cpu_profile = \"host\"\n{GUEST}"),
    );
    c.vm(
        "node1",
        "disky",
        &format!("{GUEST}[[disks]]\npath = \"{}\"\n", image.display()),
    );
    // Not enough memory.
    let e = c.ferry_err("node1", &["vm", "migrate", "big", "--to", "small"]);
    assert!(
        e.contains("not enough memory on small: 128 MiB free, the VM needs 256 MiB"),
        "{e}"
    );
    // A CPU feature the VM's `host` profile uses is missing on a baseline-only node; the
    // message lists exactly the missing features.
    let e = c.ferry_err("node1", &["vm", "migrate", "hosty", "--to", "old"]);
    let nodes = c.get("node1", "/v1/nodes");
    let feats = |n: &str| -> std::collections::BTreeSet<String> {
        nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == n)
            .unwrap()["cpu_features"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap().to_string())
            .collect()
    };
    let missing: Vec<String> = feats("node1").difference(&feats("old")).cloned().collect();
    assert!(!missing.is_empty());
    assert!(
        e.contains(&format!(
            "node old lacks CPU features the VM uses: {}",
            missing.join(", ")
        )),
        "{e}"
    );
    // Storage the destination does not reach.
    let e = c.ferry_err("node1", &["vm", "migrate", "disky", "--to", "nostore"]);
    assert!(
        e.contains(&format!("node nostore does not reach storage {shared}")),
        "{e}"
    );
    // Dry run of a possible move: OK, nothing moves.
    let out = c.ferry_ok(
        "node1",
        &["vm", "migrate", "disky", "--to", "small", "--dry-run"],
    );
    assert!(out.contains("preflight OK"), "{out}");
    // Every VM untouched: running on node1, verifying, and the refusals are recorded.
    for vm in ["big", "hosty", "disky"] {
        assert_eq!(c.assert_one_owner(vm), "node1");
        assert_eq!(
            c.store().vm(vm).unwrap().unwrap().value.state,
            cluster::VmState::Running
        );
    }
    c.assert_verify("node1", "hosty", 2);
    let refused = c
        .store()
        .migrations()
        .unwrap()
        .into_iter()
        .filter(|m| m.outcome == cluster::MigrationOutcome::Failed)
        .count();
    assert_eq!(refused, 3);
    // Processor compatibility: with the `cluster` profile the same VM can go to the old node.
    c.vm(
        "node1",
        "compat",
        &format!("cpu_profile = \"cluster\"\n{GUEST}"),
    );
    c.migrate("node1", "compat", "old", json!({})).unwrap();
    assert_eq!(c.assert_one_owner("compat"), "old");
    c.assert_verify("old", "compat", 2);
}

#[test]
fn destination_worker_killed_mid_migration() {
    let mut c = Cluster::new(false);
    c.add("node1", &[]);
    c.add("node2", &[]);
    c.vm(
        "node1",
        "vm",
        "memory_mib = 256\ncmdline = \"ferry.workload=verify ferry.wss_mib=64 ferry.hb_ms=20\"\n",
    );
    c.assert_verify("node1", "vm", 1);
    let a1 = c.addr("node1");
    let started = post(
        &a1,
        "/v1/vms/vm/migrate",
        &json!({ "to": "node2", "params": { "max_bandwidth_mibs": 40 } }),
        None,
    )
    .unwrap();
    let id = started["migration"]["id"].as_str().unwrap().to_string();
    // Wait for the destination worker, then kill it.
    let sock = c.agent("node2").data_dir.join("vms/vm/api.sock");
    wait_until("the destination worker", Duration::from_secs(20), || {
        sock.exists()
    });
    std::thread::sleep(Duration::from_millis(500));
    let pid = worker_pid(&sock);
    // SAFETY: kill(2) of the test's own grandchild process.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let m = wait_migration(&a1, &id);
    assert_eq!(m["outcome"], "failed", "{m}");
    assert_eq!(c.assert_one_owner("vm"), "node1");
    assert_eq!(
        c.store().vm("vm").unwrap().unwrap().value.state,
        cluster::VmState::Running
    );
    c.assert_verify("node1", "vm", 2);
    // The VM can still move afterwards.
    c.migrate("node1", "vm", "node2", json!({})).unwrap();
    assert_eq!(c.assert_one_owner("vm"), "node2");
}

#[test]
fn destination_agent_killed_mid_migration() {
    let mut c = Cluster::new(false);
    c.add("node1", &[]);
    c.add("node2", &[]);
    c.vm(
        "node1",
        "vm",
        "memory_mib = 256\ncmdline = \"ferry.workload=verify ferry.wss_mib=64 ferry.hb_ms=20\"\n",
    );
    c.assert_verify("node1", "vm", 1);
    let a1 = c.addr("node1");
    let started = post(
        &a1,
        "/v1/vms/vm/migrate",
        &json!({ "to": "node2", "params": { "max_bandwidth_mibs": 60 } }),
        None,
    )
    .unwrap();
    let id = started["migration"]["id"].as_str().unwrap().to_string();
    wait_until("the destination worker", Duration::from_secs(20), || {
        c.agent("node2").data_dir.join("vms/vm/api.sock").exists()
    });
    c.kill("node2");
    let m = wait_migration(&a1, &id);
    // The destination's worker outlives its agent: the migration may complete (the VM then
    // runs on node2) or fail (it stays on node1). Either way exactly one copy runs, and the
    // store agrees; a restarted agent adopts what runs on its node.
    let owner = c.store().vm("vm").unwrap().unwrap().value.owner;
    assert_eq!(
        owner,
        if m["outcome"] == "succeeded" {
            "node2"
        } else {
            "node1"
        },
        "{m}"
    );
    c.restart("node2");
    assert_eq!(c.assert_one_owner("vm"), owner);
    c.assert_verify(&owner, "vm", 2);
    let show = c.get("node1", "/v1/vms/vm");
    assert_eq!(show["vm"]["state"], "running", "{show}");
}

#[test]
fn source_agent_dies_right_after_the_commit_point() {
    let mut c = Cluster::new(false);
    let faults = c.dir.path().join("faults");
    std::fs::create_dir_all(&faults).unwrap();
    // The store's swap at Ready is this protocol's commit point (the handover has none).
    c.add_env(
        "node1",
        &["--store-commit"],
        &[
            ("FERRY_FAULT", "agent-after-cas"),
            ("FERRY_FAULT_DIR", faults.to_str().unwrap()),
        ],
    );
    c.add("node2", &["--store-commit"]);
    c.vm("node1", "vm", &format!("vcpus = 2\n{GUEST}"));
    c.assert_verify("node1", "vm", 1);
    let a1 = c.addr("node1");
    let _ = post(&a1, "/v1/vms/vm/migrate", &json!({ "to": "node2" }), None).unwrap();
    // The source agent stops right after the store CAS, before telling its worker anything,
    // and is killed there: the store says node2, so node2's agent resumes the VM; the source
    // stays paused.
    let marker = faults.join("agent-after-cas");
    wait_until(
        "the source agent at the commit point",
        Duration::from_secs(30),
        || marker.exists(),
    );
    c.kill("node1");
    wait_until("the VM to run on node2", Duration::from_secs(30), || {
        c.workers_of("vm")
            .contains(&("node2".to_string(), "running".to_string()))
    });
    assert_eq!(c.store().vm("vm").unwrap().unwrap().value.owner, "node2");
    let ws = c.workers_of("vm");
    assert!(
        !ws.contains(&("node1".to_string(), "running".to_string())),
        "two running copies: {ws:?}"
    );
    c.assert_verify("node2", "vm", 2);
    c.assert_heartbeats_continuous("vm", &["node1", "node2"]);
    // The restarted source agent retires its paused worker: the store is the truth.
    c.restart("node1");
    assert_eq!(c.assert_one_owner("vm"), "node2");
}

#[test]
fn etcd_stopped_briefly_during_a_migration() {
    let mut c = Cluster::new(true);
    c.add("node1", &[]);
    c.add("node2", &[]);
    c.vm(
        "node1",
        "vm",
        "memory_mib = 256\ncmdline = \"ferry.workload=verify ferry.wss_mib=32 ferry.hb_ms=20\"\n",
    );
    c.assert_verify("node1", "vm", 1);
    let a1 = c.addr("node1");
    let started = post(
        &a1,
        "/v1/vms/vm/migrate",
        &json!({ "to": "node2", "params": { "max_bandwidth_mibs": 100 } }),
        None,
    )
    .unwrap();
    let id = started["migration"]["id"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(600));
    c.etcd().pause();
    std::thread::sleep(Duration::from_millis(2500));
    c.etcd().resume();
    let m = wait_migration(&a1, &id);
    let owner = c.store().vm("vm").unwrap().unwrap().value.owner;
    assert_eq!(
        owner,
        if m["outcome"] == "succeeded" {
            "node2"
        } else {
            "node1"
        },
        "{m}"
    );
    assert_eq!(c.assert_one_owner("vm"), owner);
    c.assert_verify(&owner, "vm", 2);
}

#[test]
fn drain_a_node_with_four_vms() {
    let mut c = Cluster::new(false);
    c.add("node1", &[]);
    c.add("node2", &[]);
    c.add("node3", &[]);
    for i in 0..4 {
        c.vm(
            "node1",
            &format!("vm{i}"),
            "memory_mib = 48\ncmdline = \"ferry.workload=verify ferry.wss_mib=4 ferry.hb_ms=50\"\n",
        );
    }
    let out = c.ferry_ok(
        "node2",
        &[
            "--output",
            "json",
            "node",
            "drain",
            "node1",
            "--concurrency",
            "2",
        ],
    );
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["moved"], 4, "{r}");
    assert_eq!(r["failed"], 0, "{r}");
    assert!(r["max_concurrent"].as_u64().unwrap() <= 2, "{r}");
    assert!(r["max_concurrent"].as_u64().unwrap() >= 1);
    let nodes = c.get("node1", "/v1/nodes");
    let n1 = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "node1")
        .unwrap()
        .clone();
    assert_eq!(n1["vms"], 0, "node1 still owns VMs: {n1}");
    assert_eq!(n1["schedulable"], false);
    for i in 0..4 {
        let vm = format!("vm{i}");
        let owner = c.assert_one_owner(&vm);
        assert_ne!(owner, "node1");
        c.assert_verify(&owner, &vm, 1);
    }
    // Nothing moves onto a drained node; undrain returns it to service.
    let e = c.ferry_err("node1", &["vm", "migrate", "vm0", "--to", "node1"]);
    assert!(e.contains("node1 is drained"), "{e}");
    c.ferry_ok("node1", &["node", "undrain", "node1"]);
    c.migrate("node1", "vm0", "node1", json!({})).unwrap();
    assert_eq!(c.assert_one_owner("vm0"), "node1");
}

#[test]
fn bad_input_gets_clear_errors_and_4xx() {
    let mut c = Cluster::new(false);
    c.add("node1", &[]);
    let bad = c.dir.path().join("bad.toml");
    for (toml, expect) in [
        ("name = \"x\"\nmemory_mib = \"lots\"", "invalid VM spec"),
        ("memory_mib = 64", "missing field `name`"),
        ("name = \"UPPER\"\nmemory_mib = 64", "invalid VM name"),
        (
            "name = \"x\"\nmemory_mib = 64\nvcpus = 99",
            "vcpus must be between 1 and 8",
        ),
        (
            "name = \"x\"\nmemory_mib = 64\ncolour = \"red\"",
            "unknown field `colour`",
        ),
    ] {
        std::fs::write(&bad, toml).unwrap();
        let e = c.ferry_err("node1", &["vm", "create", bad.to_str().unwrap()]);
        assert!(e.contains(expect), "{toml:?}: {e}");
    }
    assert!(c
        .ferry_err("node1", &["vm", "start", "ghost"])
        .contains("unknown VM \"ghost\""));
    assert!(c
        .ferry_err("node1", &["vm", "show", "ghost"])
        .contains("unknown VM \"ghost\""));
    assert!(c
        .ferry_err("node1", &["node", "drain", "nowhere"])
        .contains("unknown node \"nowhere\""));
    c.vm("node1", "real", GUEST);
    assert!(c
        .ferry_err("node1", &["vm", "migrate", "real", "--to", "nowhere"])
        .contains("unknown node \"nowhere\""));
    assert!(c
        .ferry_err("node1", &["vm", "delete", "real"])
        .contains("stop it first"));
    assert!(c
        .ferry_err("node1", &["vm", "create", "/nonexistent.toml"])
        .contains("cannot read"));
    assert!(c
        .ferry_err("node1", &["vm", "frobnicate"])
        .contains("unrecognized subcommand"));
    // The REST API answers bad JSON and unknown paths with 4xx and a JSON error.
    let base = format!("http://{}", c.addr("node1"));
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    for (path, body, code) in [
        ("/v1/vms", "{not json", 400),
        ("/v1/vms", "{\"spec\": 5}", 400),
        ("/v1/vms", "{\"toml\": \"name = 1\"}", 400),
        ("/v1/vms/real/migrate", "{\"too\": \"node1\"}", 400),
        ("/v1/vms/ghost/migrate", "{\"to\": \"node1\"}", 404),
        ("/v1/vms/real/migrate", "{\"to\": \"node1\"}", 400),
    ] {
        let mut r = agent
            .post(&format!("{base}{path}"))
            .header("content-type", "application/json")
            .send(body)
            .unwrap();
        assert_eq!(r.status().as_u16(), code, "{path} {body}");
        let v: serde_json::Value =
            serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    }
    // A name with `/` or `..` is refused with 400 on every entry point, before anything runs.
    let expect_400 = |r: Result<ureq::http::Response<ureq::Body>, ureq::Error>, what: &str| {
        let mut r = r.unwrap();
        assert_eq!(r.status().as_u16(), 400, "{what}");
        let v: serde_json::Value =
            serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
        let e = v["error"].as_str().unwrap_or_default().to_string();
        assert!(e.contains("invalid"), "{what}: {v}");
    };
    let post = |path: &str, body: &str| {
        agent
            .post(&format!("{base}{path}"))
            .header("content-type", "application/json")
            .send(body)
    };
    for bad in [
        "%2E%2E",
        "a%2Fb",
        "..%2Fetc",
        "%2Fetc%2Fshadow",
        "real%2F..%2F..",
    ] {
        for path in [
            format!("/v1/vms/{bad}"),
            format!("/v1/migrations/{bad}"),
            format!("/v1/migrations/{bad}/events"),
        ] {
            expect_400(agent.get(&format!("{base}{path}")).call(), &path);
        }
        let path = format!("/v1/vms/{bad}");
        expect_400(agent.delete(&format!("{base}{path}")).call(), &path);
        for path in [
            format!("/v1/vms/{bad}/start"),
            format!("/v1/vms/{bad}/stop"),
            format!("/v1/nodes/{bad}/drain"),
            format!("/v1/nodes/{bad}/undrain"),
            format!("/v1/migrations/{bad}/cancel"),
        ] {
            expect_400(post(&path, "{}"), &path);
        }
        let path = format!("/v1/vms/{bad}/migrate");
        expect_400(post(&path, "{\"to\": \"node1\"}"), &path);
    }
    let real = serde_json::to_value(c.store().vm("real").unwrap().unwrap().value).unwrap();
    for bad in ["..", "a/b", "../etc", "/etc/shadow", "."] {
        let body = json!({ "toml": format!("name = {bad:?}\nmemory_mib = 64") }).to_string();
        expect_400(post("/v1/vms", &body), &format!("create toml {bad}"));
        let mut spec = real["spec"].clone();
        spec["name"] = json!(bad);
        let body = json!({ "spec": spec }).to_string();
        expect_400(post("/v1/vms", &body), &format!("create spec {bad}"));
        let body = json!({ "toml": "name = \"fine\"\nmemory_mib = 64", "node": bad });
        expect_400(
            post("/v1/vms", &body.to_string()),
            &format!("create on {bad}"),
        );
        let body = json!({ "to": bad }).to_string();
        expect_400(
            post("/v1/vms/real/migrate", &body),
            &format!("migrate to {bad}"),
        );
        // The agent-to-agent entry point: the VM, the source node and the migration id.
        let mut rec = real.clone();
        rec["spec"]["name"] = json!(bad);
        for body in [
            json!({ "migration": "real-1-00000000", "vm": rec, "from": "node1" }),
            json!({ "migration": "real-1-00000000", "vm": real, "from": bad }),
            json!({ "migration": bad, "vm": real, "from": "node1" }),
        ] {
            expect_400(
                post("/v1/internal/receive", &body.to_string()),
                &format!("receive {bad}: {body}"),
            );
        }
    }
    // Nothing was created, and nothing under the data directory has a name from above.
    let names: Vec<String> = c
        .store()
        .vms()
        .unwrap()
        .into_iter()
        .map(|v| v.value.spec.name)
        .collect();
    assert_eq!(names, ["real"]);
    let vms_dir = c.agent("node1").data_dir.join("vms");
    let entries: Vec<String> = std::fs::read_dir(&vms_dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(entries.iter().all(|e| e == "real"), "{entries:?}");
    let r = agent.get(&format!("{base}/v1/nothing")).call().unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let doc = c.get("node1", "/openapi.json");
    assert_eq!(doc["openapi"], "3.0.3");
    assert!(doc["paths"]["/v1/vms/{name}/migrate"]["post"].is_object());
    // Nothing above touched the running VM.
    assert_eq!(c.assert_one_owner("real"), "node1");
}

#[test]
fn crashed_worker_is_reported_and_cancel_keeps_the_vm() {
    let mut c = Cluster::new(false);
    c.add("node1", &[]);
    c.add("node2", &[]);
    c.vm(
        "node1",
        "vm",
        "memory_mib = 256\ncmdline = \"ferry.workload=verify ferry.wss_mib=64 ferry.hb_ms=20\"\n",
    );
    c.assert_verify("node1", "vm", 1);
    // Cancel a slow migration through the CLI: the VM stays on node1.
    let a1 = c.addr("node1");
    let started = post(
        &a1,
        "/v1/vms/vm/migrate",
        &json!({ "to": "node2", "params": { "max_bandwidth_mibs": 20 } }),
        None,
    )
    .unwrap();
    let id = started["migration"]["id"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(700));
    assert!(c
        .ferry_ok("node2", &["vm", "migrate", "vm", "--cancel"])
        .contains(&id));
    let m = wait_migration(&a1, &id);
    assert_eq!(m["outcome"], "cancelled", "{m}");
    assert!(m["reason"].as_str().unwrap().contains("cancelled"), "{m}");
    assert_eq!(c.assert_one_owner("vm"), "node1");
    c.assert_verify("node1", "vm", 1);
    // A worker that dies is reported: state crashed with the reason; start brings it back.
    let sock = c.agent("node1").data_dir.join("vms/vm/api.sock");
    let pid = worker_pid(&sock);
    // SAFETY: kill(2) of the test's own grandchild process.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_until("the crash to be reported", Duration::from_secs(10), || {
        c.store().vm("vm").unwrap().unwrap().value.state == cluster::VmState::Crashed
    });
    let show = c.ferry_ok("node2", &["vm", "show", "vm"]);
    assert!(
        show.contains("state crashed on node1") && show.contains("last error: worker exited"),
        "{show}"
    );
    c.ferry_ok("node2", &["vm", "start", "vm"]);
    assert_eq!(c.assert_one_owner("vm"), "node1");
}

#[test]
fn an_undrained_node_takes_vms_again_after_its_agent_restarted_while_drained() {
    let mut c = Cluster::new(false);
    c.add("node1", &[]);
    c.add("node2", &[]);
    c.vm("node1", "vm", GUEST);
    c.assert_verify("node1", "vm", 1);
    // node2 drained (it owns nothing), its agent restarted meanwhile, then undrained through
    // another agent: node2 must take VMs again.
    c.ferry_ok("node1", &["node", "drain", "node2"]);
    c.kill("node2");
    c.restart("node2");
    c.ferry_ok("node1", &["node", "undrain", "node2"]);
    c.migrate("node1", "vm", "node2", json!({}))
        .expect("migration to the undrained node");
    assert_eq!(c.assert_one_owner("vm"), "node2");
    c.assert_verify("node2", "vm", 1);
}

#[test]
fn the_cli_follows_a_migration_whose_agent_died_through_the_others() {
    let mut c = Cluster::new(false);
    c.add("node1", &[]);
    c.add("node2", &[]);
    c.vm(
        "node1",
        "vm",
        "memory_mib = 128\ncmdline = \"ferry.workload=verify ferry.wss_mib=32 ferry.hb_ms=20\"\n",
    );
    c.assert_verify("node1", "vm", 1);
    // `ferry vm migrate` talks to node1's agent, which runs the migration and is then killed
    // and restarted (on a new port): the CLI must still report the migration's real outcome,
    // read from the other agent.
    let cli = std::process::Command::new(ferry_bin())
        .args(["--agent", &c.addr("node1"), "vm", "migrate", "vm"])
        .args(["--to", "node2", "--max-bandwidth-mibs", "8"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the destination worker", Duration::from_secs(20), || {
        c.agent("node2").data_dir.join("vms/vm/api.sock").exists()
    });
    std::thread::sleep(Duration::from_millis(500));
    c.kill("node1");
    std::thread::sleep(Duration::from_millis(500));
    c.restart("node1");
    let out = cli.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("lost track"), "{err}");
    let owner = c.assert_one_owner("vm");
    if out.status.success() {
        assert_eq!(owner, "node2", "{err}");
    } else {
        // Rolled back by the restarted agent's reconciliation: said so, and true.
        assert_eq!(owner, "node1", "{err}");
        assert!(err.contains("migration of vm to node2 failed"), "{err}");
    }
}

/// A VM's host files stay beneath its nodes' roots: a disk outside `--storage`, a path with
/// `..` and a kernel on a node without `--boot-root` are refused when the VM is defined; a
/// disk that is a symlink out of the storage is refused when the VM starts (the worker opens
/// beneath the root); a disk swapped for such a symlink while the VM runs stops its
/// migration with the VM still running on its source; the file outside is never written.
#[test]
fn host_paths_stay_beneath_the_nodes_roots() {
    let mut c = Cluster::new(false);
    let shared = c.dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let outside = c.dir.path().join("outside.img");
    std::fs::write(&outside, vec![0xa5u8; 1 << 20]).unwrap();
    let img = |n: &str| {
        let p = shared.join(n);
        std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
        p
    };
    let sh = shared.to_str().unwrap().to_string();
    c.add("node1", &["--storage", &sh]);
    c.add("node2", &["--storage", &sh]);
    let create = |name: &str, extra: &str| {
        let toml = c.dir.path().join(format!("{name}.toml"));
        std::fs::write(&toml, format!("name = \"{name}\"\n{GUEST}{extra}")).unwrap();
        c.ferry(
            "node1",
            &["vm", "create", toml.to_str().unwrap(), "--node", "node1"],
        )
    };
    let disk = |p: &str| format!("[[disks]]\npath = \"{p}\"\n");
    let refused = |name: &str, extra: &str| {
        let o = create(name, extra);
        assert!(!o.status.success(), "{name} was created");
        String::from_utf8_lossy(&o.stderr).to_string()
    };

    let e = refused("shadow", &disk("/etc/shadow"));
    assert!(
        e.contains(&format!(
            "node node1: disk image /etc/shadow is not under this host's storage roots ({sh})"
        )),
        "{e}"
    );
    let e = refused("dots", &disk(&format!("{sh}/../outside.img")));
    assert!(e.contains("must not contain `..`"), "{e}");
    let e = refused("linux", "kernel = \"/boot/vmlinuz\"\n");
    assert!(
        e.contains("kernel /boot/vmlinuz: this host was given no roots for it (--boot-root)"),
        "{e}"
    );
    for n in ["shadow", "dots", "linux"] {
        assert!(c.store().vm(n).unwrap().is_none(), "{n} is in the store");
    }

    // A symlink inside the storage that leads out of it: defined (its path is fine as
    // written), refused when the worker opens it.
    std::os::unix::fs::symlink(&outside, shared.join("evil.img")).unwrap();
    let o = create("evil", &disk(&format!("{sh}/evil.img")));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e = c.ferry_err("node1", &["vm", "start", "evil"]);
    assert!(
        e.contains(&format!(
            "disk image {sh}/evil.img leads out of storage root {sh}"
        )),
        "{e}"
    );
    assert!(c.workers_of("evil").is_empty());

    // A running VM whose image is swapped for such a symlink: its migration is refused, it
    // runs on; with its image back, it moves.
    let good = img("good.img");
    let o = create("good", &disk(good.to_str().unwrap()));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    c.ferry_ok("node1", &["vm", "start", "good"]);
    c.assert_verify("node1", "good", 2);
    std::fs::rename(&good, shared.join("moved.img")).unwrap();
    std::os::unix::fs::symlink(&outside, &good).unwrap();
    let e = c.ferry_err("node1", &["vm", "migrate", "good", "--to", "node2"]);
    assert!(e.contains("leads out of storage root"), "{e}");
    assert_eq!(c.assert_one_owner("good"), "node1");
    std::fs::remove_file(&good).unwrap();
    std::fs::rename(shared.join("moved.img"), &good).unwrap();
    c.ferry_ok("node1", &["vm", "migrate", "good", "--to", "node2"]);
    assert_eq!(c.assert_one_owner("good"), "node2");
    c.assert_verify("node2", "good", 2);
    assert_eq!(std::fs::read(&outside).unwrap(), vec![0xa5u8; 1 << 20]);
}

/// Per-node limits: a node sends at most `--max-outgoing` and receives at most
/// `--max-incoming` migrations at once; one more is refused with a reason before anything
/// moves, the VM stays running where it was, and the slot is free again once the migration
/// holding it ended.
#[test]
fn per_node_migration_limits() {
    let mut c = Cluster::new(false);
    c.add("node1", &["--max-outgoing", "1"]);
    c.add("node2", &["--max-incoming", "1"]);
    c.add("node3", &[]);
    c.vm(
        "node1",
        "big",
        "memory_mib = 256\ncmdline = \"ferry.workload=verify ferry.wss_mib=64 ferry.hb_ms=20\"\n",
    );
    c.vm("node1", "small", GUEST);
    c.vm("node3", "other", GUEST);
    let a1 = c.addr("node1");
    let started = post(
        &a1,
        "/v1/vms/big/migrate",
        &json!({ "to": "node2", "params": { "max_bandwidth_mibs": 40 } }),
        None,
    )
    .unwrap();
    let id = started["migration"]["id"].as_str().unwrap().to_string();
    // Its receiver holds node2's slot once memory moves (the request above returns at the
    // lock; the receiver is asked for after it, and a loaded machine can take a while).
    wait_until("big's pre-copy", Duration::from_secs(30), || {
        get(&a1, &format!("/v1/migrations/{id}"))
            .is_ok_and(|v| v["migration"]["phase"] == "precopy")
    });
    // node1 sends one migration already.
    let e = c.migrate("node1", "small", "node3", json!({})).unwrap_err();
    assert!(
        e.contains("already sends 1 migrations (--max-outgoing 1)"),
        "{e}"
    );
    // node2 receives one already: node3's migration to it is refused by node2.
    let e = c.migrate("node3", "other", "node2", json!({})).unwrap_err();
    assert!(e.contains("--max-incoming 1"), "{e}");
    let m = wait_migration(&a1, &id);
    assert_eq!(m["outcome"], "succeeded", "{m}");
    for (vm, node) in [("small", "node1"), ("other", "node3"), ("big", "node2")] {
        assert_eq!(c.assert_one_owner(vm), node);
        assert_eq!(
            c.store().vm(vm).unwrap().unwrap().value.state,
            cluster::VmState::Running
        );
    }
    // The slots are free again.
    c.migrate("node1", "small", "node3", json!({})).unwrap();
    c.migrate("node3", "other", "node2", json!({})).unwrap();
    assert_eq!(c.assert_one_owner("small"), "node3");
    assert_eq!(c.assert_one_owner("other"), "node2");
    c.assert_verify("node2", "big", 2);
}
