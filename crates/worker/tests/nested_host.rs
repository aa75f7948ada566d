//! Ferry on an ordinary KVM: the nested SVM test host (`tests/nested/mod.rs`, ../shared/NESTED.md).
//! One L1 boot runs the test guest through everything that restores a VM there: pause +
//! snapshot + `ferry-vmm restore` in a new process (and, in the opt-in test, twenty more
//! generations paused at random moments), then live migrations between workers (one stream;
//! four streams with lz4). Each step continues the guest exactly: heartbeat counters
//! continuous across every serial log, the
//! memory verifier clean, no PANIC, and every restore reads the loaded state back
//! (`--verify-state`). Every step inside L1 is bounded (`timeout`, wall-clock waits) and a
//! failed one is named with its files.

mod common;
mod nested;

use common::Log;
use std::time::Duration;

const SCENARIO: &str = r#"
GENS="$(seq 1 $NGENS)"
FILES="/tmp/a.log /tmp/b.log $(for g in $GENS; do echo /tmp/g$g.log /tmp/g$g.out; done) /tmp/c.log /tmp/d.log /tmp/a.out /tmp/b.out /tmp/c.out /tmp/d.out /tmp/snap.json /tmp/m1.json /tmp/m2.json /tmp/gen.out"
# A failed step ends the scenario: what happened is in the files. Only Ferry's test guest runs
# here (the harness reads a page fault in it as the emulator's: nested::test_guest_page_fault).
result l2 test-guest
G="ferry.workload=verify ferry.wss_mib=16 ferry.hb_ms=50"
ferry-vmm run --kernel test-guest --vcpus 2 --memory-mib 128 --cmdline "$G" \
    --serial-log /tmp/a.log --api-socket /tmp/a.sock > /tmp/a.out 2>&1 &
wait_for /tmp/a.log "^verify ok" 4 120 $! && result boot ok || stop_here boot
ferry-vmm ctl --api-socket /tmp/a.sock pause > /dev/null
ferry-vmm ctl --api-socket /tmp/a.sock snapshot /tmp/a.snap > /tmp/snap.json 2>&1 && result snapshot ok || stop_here snapshot
ferry-vmm ctl --api-socket /tmp/a.sock shutdown > /dev/null
sleep 0.5
ferry-vmm restore --verify-state --snapshot /tmp/a.snap --serial-log /tmp/b.log --api-socket /tmp/b.sock > /tmp/b.out 2>&1 &
B=$!
wait_for /tmp/b.log "^verify ok" 4 120 $B && result restore ok || stop_here restore
# Twenty more generations, each paused at a random moment (0-1.9 s after the last one
# verified), snapshotted and restored in a new worker with the state read back. Every step
# is bounded and says which one failed (its output and the worker's are in the files).
P=b; PID=$B
for g in $GENS; do
  sleep $((RANDOM % 2)).$((RANDOM % 10))
  kill -0 $PID 2>/dev/null || { wait $PID; result gen$g-worker-exit "$P status $?"; stop_here gen$g-worker-gone; }
  timeout 60 ferry-vmm ctl --api-socket /tmp/$P.sock pause >> /tmp/gen.out 2>&1 || stop_here gen$g-pause
  timeout 120 ferry-vmm ctl --api-socket /tmp/$P.sock snapshot /tmp/g$g.snap >> /tmp/gen.out 2>&1 || stop_here gen$g-snapshot
  timeout 60 ferry-vmm ctl --api-socket /tmp/$P.sock shutdown >> /tmp/gen.out 2>&1 || stop_here gen$g-shutdown
  gone $PID 30 || stop_here gen$g-exit
  ferry-vmm restore --verify-state --snapshot /tmp/g$g.snap --serial-log /tmp/g$g.log --api-socket /tmp/g$g.sock > /tmp/g$g.out 2>&1 &
  PID=$!
  wait_for /tmp/g$g.log "^verify ok" 4 120 $PID || { dump /tmp/g$g.out; stop_here gen$g-restore; }
  rm -f /tmp/g$g.snap
  echo "generation $g ok" >> /tmp/gen.out
  P=g$g
done
result generations ok
ferry-vmm receive --insecure --verify-state --listen 127.0.0.1:7001 --serial-log /tmp/c.log --api-socket /tmp/c.sock > /tmp/c.out 2>&1 &
C=$!
sleep 1
timeout 300 ferry-vmm ctl --api-socket /tmp/$P.sock migrate --to 127.0.0.1:7001 --insecure --output json > /tmp/m1.json 2>&1 && result migrate1 ok || stop_here migrate1
wait_for /tmp/c.log "^verify ok" 4 120 $C && result after1 ok || stop_here after1
ferry-vmm receive --insecure --verify-state --listen 127.0.0.1:7002 --serial-log /tmp/d.log --api-socket /tmp/d.sock > /tmp/d.out 2>&1 &
D=$!
sleep 1
timeout 300 ferry-vmm ctl --api-socket /tmp/c.sock migrate --to 127.0.0.1:7002 --insecure --streams 4 --compress lz4 --output json > /tmp/m2.json 2>&1 && result migrate2 ok || stop_here migrate2
wait_for /tmp/d.log "^verify ok" 4 120 $D && result after2 ok || stop_here after2
ferry-vmm ctl --api-socket /tmp/d.sock shutdown > /dev/null
sleep 0.5
for f in $FILES; do dump $f; done
"#;

/// About 40 s of L1 (`cargo test --release -p worker --test nested_host -- --nocapture`).
/// Every restore runs with `--verify-state`: the state read back equals the state saved.
/// Before the test guest's ring 3 got IOPL 3 every restored guest died at its first port
/// write here (docs/NESTED.md); the "triple fault" once seen in a fresh boot was an AP that
/// checked in too late under a busy TCG (the guest now waits for every CPU CPUID announces).
#[test]
fn the_test_guest_survives_restore_and_migration_on_svm_kvm() {
    run(0);
}

/// The same with twenty snapshot generations at random moments between the restore and the
/// migrations (about 90 s). It was out of the suite until 2026-12-02, blamed on the emulator;
/// most of its failures were Ferry's: a restored vCPU whose TSC had been saved up to a
/// millisecond after vCPU 0's got vCPU 0's TSC, went backwards, and `--verify-state` refused
/// it (`vCPU 1 TSC: 0x10 went backwards`; fixed in `vcpu::tsc_targets`). Since: 3 of 3 runs
/// passed, one after a recognised test-host failure (docs/NESTED.md).
#[test]
fn twenty_random_moment_generations_on_svm_kvm() {
    run(20);
}

fn run(generations: u32) {
    let scenario = format!("NGENS={generations}\n{SCENARIO}");
    let out = nested::run_l1(&scenario, &[], Duration::from_secs(900));
    println!("L1 ran {:.0} s; results {:?}", out.seconds, out.results);
    assert!(out.done, "L1 did not finish:\n{}", out.tail(80));
    assert_eq!(out.result("kvm"), "present", "{}", out.tail(80));
    for step in [
        "boot",
        "snapshot",
        "restore",
        "generations",
        "migrate1",
        "after1",
        "migrate2",
        "after2",
    ] {
        assert_eq!(
            out.results
                .get(step)
                .map(String::as_str)
                .unwrap_or("not reached"),
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
    let gens: Vec<String> = (1..=generations).map(|g| format!("g{g}")).collect();
    let names: Vec<&str> = ["a", "b"]
        .into_iter()
        .chain(gens.iter().map(String::as_str))
        .chain(["c", "d"])
        .collect();
    let logs: Vec<&str> = names
        .iter()
        .map(|n| format!("/tmp/{n}.log"))
        .map(|f| out.file(&f))
        .collect();
    for (i, l) in logs.iter().enumerate() {
        assert!(!l.contains("PANIC"), "log {i} has a PANIC:\n{l}");
    }
    for (name, l) in names.iter().zip(&logs) {
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

/// The shutdown watcher in L1 and the harness's early stop, end to end in a real L1: a
/// shutdown exit of a guest at L1's own `kvm_amd` entry code is written into L1's trace ring
/// (`trace_marker` takes the line as the emulator's failure would leave it) and the trace
/// stopped as the trigger would; the scenario then sleeps for ten minutes. The watcher must
/// send the trace and `L1::wait` must end this L1 on the signature within a minute or so. A
/// shutdown at a guest's own RIP (no signature) is sent and read too, tracing goes on, and
/// that L1 runs its scenario to the end.
#[test]
fn a_signature_in_the_trace_ends_the_l1_at_once() {
    let inject = r#"
T=/sys/kernel/tracing
[ -n "$TRIGGER" ] && result trigger ok || result trigger failed
B=$(cat /sys/module/kvm_amd/sections/.noinstr.text)
[ "$AT" = kvm ] && RIP=$B || RIP=0x100c91
echo "kvm_exit: vcpu 0 reason shutdown rip $RIP info1 0x0 info2 0x0 intr_info 0x00000000 error_code 0x00000000" > $T/trace_marker
echo 0 > $T/tracing_on
w=0; until grep -q 1 $T/tracing_on; do w=$((w+1)); [ $w -gt 600 ] && break; sleep 0.1; done
result tracing-again "$(cat $T/tracing_on)"
sleep $SLEEP
"#;
    // The host's failure: stopped at once, long before the scenario's 600 s are up.
    let l1 = nested::L1::boot(
        &format!("AT=kvm SLEEP=600\n{inject}"),
        &[],
        &nested::L1Opts::default(),
    );
    let out = l1.wait(Duration::from_secs(900));
    println!("L1 ran {:.0} s; results {:?}", out.seconds, out.results);
    assert_eq!(out.result("trigger"), "ok");
    assert_eq!(out.result("kvm-shutdown-seen"), "1");
    let why = out.host_failure.as_deref().unwrap_or_else(|| {
        panic!("no host failure seen:\n{}", out.tail(60));
    });
    assert!(
        why.contains("inside L1's kvm_amd entry code") && why.contains("while the scenario ran"),
        "{why}"
    );
    assert!(
        out.seconds < 300.0,
        "stopped only after {:.0} s",
        out.seconds
    );
    // A shutdown at a guest's own RIP is no signature: sent, read, and the scenario runs on.
    let l1 = nested::L1::boot(
        &format!("AT=guest SLEEP=1\n{inject}"),
        &[],
        &nested::L1Opts::default(),
    );
    let out = l1.wait(Duration::from_secs(600));
    println!("L1 ran {:.0} s; results {:?}", out.seconds, out.results);
    assert!(out.done, "{}", out.tail(60));
    assert_eq!(out.result("kvm-shutdown-seen"), "1");
    assert_eq!(out.result("tracing-again"), "1");
    assert!(out.host_failure.is_none(), "{:?}", out.host_failure);
}
