//! `ferry vm set` and `ferry vm targets`, the API behind the web console's edit form and its
//! per-node verdicts.

mod common;

use common::{Cluster, GUEST};

/// The API behind the console's edit and verdicts, through the CLI: `ferry vm set` changes
/// only a stopped VM (a running one: one-line error, nothing changed), `ferry vm targets`
/// names each node's blockers, and the CPU-profile remedy really lets the VM onto the
/// baseline node.
#[test]
fn vm_set_changes_only_a_stopped_vm_and_targets_explain_every_node() {
    let mut c = Cluster::new(false);
    c.add("node1", &[]);
    c.add("node2", &["--cpu-limit", "baseline"]);
    c.vm("node1", "a", GUEST);
    c.assert_verify("node1", "a", 1);
    let t = c.ferry_ok("node1", &["vm", "targets", "a"]);
    assert!(
        t.contains("node2: blocked: node node2 lacks CPU features the VM uses: "),
        "{t}"
    );
    let e = c.ferry_err("node1", &["vm", "set", "a", "--cpu-profile", "cluster"]);
    assert!(
        e.contains("VM a is running: only a stopped VM can be changed"),
        "{e}"
    );
    let e = c.ferry_err("node1", &["vm", "set", "a"]);
    assert!(e.contains("nothing to change"), "{e}");
    let rec = |c: &Cluster| c.store().vm("a").unwrap().unwrap().value;
    assert_eq!(
        rec(&c).spec.cpu_profile,
        "host",
        "a refused edit changed the VM"
    );
    c.ferry_ok("node1", &["vm", "stop", "a"]);
    let e = c.ferry_err("node1", &["vm", "set", "a", "--cpu-profile", "fastest"]);
    assert!(e.contains("unknown cpu_profile"), "{e}");
    let e = c.ferry_err("node1", &["vm", "set", "a", "--vcpus", "0"]);
    assert!(e.contains("vcpus must be between 1 and"), "{e}");
    let t = c.ferry_ok("node1", &["vm", "targets", "a"]);
    assert!(t.contains("the VM is stopped: only a running VM"), "{t}");
    let out = c.ferry_ok(
        "node2",
        &[
            "vm",
            "set",
            "a",
            "--cpu-profile",
            "cluster",
            "--vcpus",
            "2",
            "--memory-mib",
            "96",
        ],
    );
    assert!(
        out.contains("2 vCPUs, 96 MiB, cpu profile cluster"),
        "{out}"
    );
    let r = rec(&c);
    assert_eq!(
        (r.spec.vcpus, r.spec.memory_mib, r.spec.cpu_profile.as_str()),
        (2, 96, "cluster")
    );
    c.ferry_ok("node1", &["vm", "start", "a"]);
    let t = c.ferry_ok("node1", &["vm", "targets", "a"]);
    assert!(t.contains("node2: ok"), "{t}");
    c.ferry_ok("node1", &["vm", "migrate", "a", "--to", "node2"]);
    assert_eq!(c.assert_one_owner("a"), "node2");
    c.assert_verify("node2", "a", 1);
    // The serial tail the console shows comes from the owner, whichever agent is asked.
    let tail = c.get("node1", "/v1/vms/a/serial");
    assert_eq!(tail["node"], "node2", "{tail}");
    assert!(
        tail["text"].as_str().unwrap().contains("verify ok"),
        "{tail}"
    );
}
