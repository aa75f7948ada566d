//! Ferry on an ordinary KVM: the nested SVM test host (`tests/nested/mod.rs`, ../shared/NESTED.md).
//! One L1 boot runs the test guest through everything that restores a VM there: pause +
//! snapshot + `ferry-vmm restore` in a new process, then live migrations between workers (one
//! stream; four streams with lz4). Each step continues the guest exactly: heartbeat counters
//! continuous across all four serial logs, the memory verifier clean, no PANIC.

mod common;
mod nested;

use common::Log;
use std::time::Duration;

const SCENARIO: &str = r#"
G="ferry.workload=verify ferry.wss_mib=16 ferry.hb_ms=50"
ferry-vmm run --kernel test-guest --vcpus 2 --memory-mib 128 --cmdline "$G" \
    --serial-log /tmp/a.log --api-socket /tmp/a.sock > /tmp/a.out 2>&1 &
if wait_for /tmp/a.log "^verify ok" 4 120; then result boot ok; else result boot failed; fi
ferry-vmm ctl --api-socket /tmp/a.sock pause > /dev/null
ferry-vmm ctl --api-socket /tmp/a.sock snapshot /tmp/a.snap > /tmp/snap.json 2>&1 && result snapshot ok || result snapshot failed
ferry-vmm ctl --api-socket /tmp/a.sock shutdown > /dev/null
sleep 0.5
ferry-vmm restore --snapshot /tmp/a.snap --serial-log /tmp/b.log --api-socket /tmp/b.sock > /tmp/b.out 2>&1 &
if wait_for /tmp/b.log "^verify ok" 4 120; then result restore ok; else result restore failed; fi
ferry-vmm receive --listen 127.0.0.1:7001 --serial-log /tmp/c.log --api-socket /tmp/c.sock > /tmp/c.out 2>&1 &
sleep 1
ferry-vmm ctl --api-socket /tmp/b.sock migrate --to 127.0.0.1:7001 --output json > /tmp/m1.json 2>&1 && result migrate1 ok || result migrate1 failed
if wait_for /tmp/c.log "^verify ok" 4 120; then result after1 ok; else result after1 failed; fi
ferry-vmm receive --listen 127.0.0.1:7002 --serial-log /tmp/d.log --api-socket /tmp/d.sock > /tmp/d.out 2>&1 &
sleep 1
ferry-vmm ctl --api-socket /tmp/c.sock migrate --to 127.0.0.1:7002 --streams 4 --compress lz4 --output json > /tmp/m2.json 2>&1 && result migrate2 ok || result migrate2 failed
if wait_for /tmp/d.log "^verify ok" 4 120; then result after2 ok; else result after2 failed; fi
ferry-vmm ctl --api-socket /tmp/d.sock shutdown > /dev/null
sleep 0.5
for f in /tmp/a.log /tmp/b.log /tmp/c.log /tmp/d.log /tmp/a.out /tmp/b.out /tmp/c.out /tmp/d.out /tmp/snap.json /tmp/m1.json /tmp/m2.json; do dump $f; done
"#;

/// Run with `cargo test --release -p worker --test nested_host -- --ignored` (about 25 s).
/// Not yet in the default suite: in about 1 run of 5 the restored guest triple-faults (or stops)
/// some seconds after a restore on the nested SVM KVM (issue 14: the state read back after a
/// restore is to be compared with the state saved, to find which piece differs); the other
/// runs pass every step.
#[test]
#[ignore = "flaky on nested SVM (a restored guest triple-faults ~1 in 5): issue 14"]
fn the_test_guest_survives_restore_and_migration_on_svm_kvm() {
    let out = nested::run_l1(SCENARIO, &[], Duration::from_secs(900));
    println!("L1 ran {:.0} s; results {:?}", out.seconds, out.results);
    assert!(out.done, "L1 did not finish:\n{}", out.tail(80));
    assert_eq!(out.result("kvm"), "present", "{}", out.tail(80));
    for step in [
        "boot", "snapshot", "restore", "migrate1", "after1", "migrate2", "after2",
    ] {
        assert_eq!(
            out.result(step),
            "ok",
            "{step} failed in L1:\n{}\n{:?}",
            out.tail(60),
            out.files
                .iter()
                .filter(|(k, _)| k.ends_with(".out") || k.ends_with(".json"))
                .map(|(k, v)| format!(
                    "{k}: {}",
                    v.lines().rev().take(3).collect::<Vec<_>>().join(" | ")
                ))
                .collect::<Vec<_>>()
        );
    }
    let logs: Vec<&str> = ["/tmp/a.log", "/tmp/b.log", "/tmp/c.log", "/tmp/d.log"]
        .iter()
        .map(|f| out.file(f))
        .collect();
    for (i, l) in logs.iter().enumerate() {
        assert!(!l.contains("PANIC"), "log {i} has a PANIC:\n{l}");
    }
    for (name, l) in ["a", "b", "c", "d"].iter().zip(&logs) {
        let p = Log::parse(l);
        for c in 0..2 {
            let h = p.hb_of(c);
            println!(
                "{name}: cpu {c}: {} heartbeats, first {:?}, last {:?}",
                h.len(),
                h.first(),
                h.last()
            );
        }
    }
    let all = Log::parse(&logs.concat());
    all.assert_hb_continuous(2);
    all.assert_no_corruption();
    for (i, l) in logs.iter().enumerate().skip(1) {
        assert_eq!(
            Log::parse(l).verify_ok_cpus().len(),
            2,
            "copy {i} did not verify on both CPUs"
        );
    }
    for m in ["/tmp/m1.json", "/tmp/m2.json"] {
        let last = out
            .file(m)
            .lines()
            .rfind(|l| l.starts_with('{'))
            .unwrap_or("");
        let v: serde_json::Value = serde_json::from_str(last).unwrap_or_default();
        assert_eq!(v["reply"], "done", "{m}: {}", out.file(m));
        println!(
            "{m}: total {:.0} ms, downtime {:.2} ms, {} passes",
            v["total_ms"].as_f64().unwrap_or(0.0),
            v["downtime_ms"].as_f64().unwrap_or(0.0),
            v["passes"]
        );
    }
}
