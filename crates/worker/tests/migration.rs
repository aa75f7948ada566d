//! Live migration between two real worker processes over loopback TCP: the guest keeps
//! running and verifying its memory, heartbeats continue without reset, byte counts add up, the
//! pause the guest saw matches the reported downtime, and every failure before the commit
//! leaves the VM running on the source. The migrations here run over mutual TLS (a CA made
//! for each test) with the receiver's one-time secret.

mod common;
use common::*;
use std::time::{Duration, Instant};

const PAGE: u64 = 4096;

/// The tests of this binary run one at a time even under a plain `cargo test` (the suite
/// passes `--test-threads=1` anyway): several compare the pause the guest saw with the
/// reported downtime, and on 2 cores a second migration in parallel (two more workers' vCPU
/// and stream threads) makes the host run vCPU threads up to tens of ms late, which the
/// heartbeats show as pause.
fn alone() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

fn tsc_khz(log: &str) -> f64 {
    Log::parse(log).boot.expect("boot line")["tsc_khz"]
        .parse()
        .unwrap()
}

/// Waits for the destination to run a while, then checks the combined guest output.
fn check_after_move(src_log: &str, dst: &Worker, cpus: u32, verify: bool) -> Log {
    let before = Log::parse(src_log);
    let need: Vec<u64> = (0..cpus)
        .map(|c| before.hb_of(c).last().map(|h| h.counter).unwrap_or(0) + 3)
        .collect();
    let t0 = Instant::now();
    loop {
        let all = Log::parse(&format!("{src_log}{}", dst.log()));
        let progressed = (0..cpus)
            .all(|c| all.hb_of(c).last().map(|h| h.counter).unwrap_or(0) >= need[c as usize]);
        let swept = !verify || {
            let d = Log::parse(&dst.log());
            (0..cpus).all(|c| d.verify_ok.iter().any(|m| m["cpu"] == c.to_string()))
        };
        if progressed && swept {
            all.assert_hb_continuous(cpus);
            all.assert_no_corruption();
            return all;
        }
        all.assert_no_corruption();
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "destination made no progress:\n{}",
            tail(&dst.log(), 20)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn f(v: &serde_json::Value, k: &str) -> f64 {
    v[k].as_f64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

fn migrate_once(workload: &str, vcpus: u32, extra: &[&str]) -> serde_json::Value {
    let _alone = alone();
    let dir = tempdir();
    let d = dir.path();
    let cmdline = format!("ferry.workload={workload} ferry.wss_mib=32 ferry.hb_ms=5");
    let src = Worker::run_guest(d, "src", vcpus as u8, 128, &cmdline);
    src.wait_log(Duration::from_secs(30), "the workload", |l| {
        l.min_hb_per_cpu(vcpus) >= 3
            && match workload {
                "verify" => l.verify_ok_cpus().len() == vcpus as usize,
                // the whole working set written at least once
                _ => (0..vcpus).all(|c| {
                    l.dirty
                        .iter()
                        .any(|m| m["cpu"] == c.to_string() && m["rounds"] != "0")
                }),
            }
    });
    let pki = TestPki::new(d);
    let (dst, secret) = Receiver::spawn_tls(d, "dst", &pki, &[]);
    let r = src.migrate_tls(&dst.addr, &pki, &secret, extra);
    let s = r.summary().clone();
    // The source ends by itself once the destination owns the VM.
    let out = src.shutdown();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("migrated to"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let src_log = std::fs::read_to_string(dir.path().join("src.serial")).unwrap();
    check_after_move(&src_log, &dst.w, vcpus, workload == "verify");

    // Byte accounting: every page went at least once; pages = data + zero markers; the wire
    // carried at least the data pages and the state; the state is what the destination loaded.
    let total_pages = 128 * 256;
    let (pages, data, zero) = (
        f(&s, "pages_sent") as u64,
        f(&s, "data_pages") as u64,
        f(&s, "zero_pages") as u64,
    );
    assert_eq!(pages, data + zero);
    assert!(
        pages >= total_pages,
        "only {pages} of {total_pages} pages sent"
    );
    assert!(
        data >= 32 * 256,
        "the 32 MiB working set was not sent: {data} data pages"
    );
    let bytes = f(&s, "bytes_sent") as u64;
    let compressed = extra.contains(&"--compress");
    if !compressed {
        assert!(bytes >= data * PAGE + f(&s, "state_bytes") as u64);
        assert!(
            bytes < (data * PAGE + zero * 8) * 11 / 10 + (2 << 20),
            "overhead too large: {bytes} bytes for {data} pages"
        );
    }
    assert!(f(&s, "passes") >= 2.0);
    // The pause the guest saw: the heartbeat gap across the switchover, minus the interval, is
    // at most the downtime the engine reports (which also counts the final round trip), plus
    // what auto-converge took just before the pause (a throttled vCPU sleeps up to pct % of
    // each 10 ms period), plus how late the host schedules a vCPU thread: 2 cores shared by
    // both workers (the source tearing down its 128 MiB) and the dirtying guest. That
    // lateness is measured in the same run: the worst gap between two other heartbeats of the
    // CPU, past the interval, and at least 12 ms. Clean-clone CI runs (one test at a time)
    // saw 15.55 ms against 6.37 ms reported + 5 ms of throttle, 11.42 ms against 4.89 ms,
    // and once, on a machine so loaded that pass 0 ran at 17 MiB/s, 21.15 ms against 2.16 ms. The dedicated `guest_pause_matches_reported_downtime`
    // keeps the tight bound. This one still catches a pause the engine does not count at
    // all: with the destination reading the state back (--verify-state, not used here) the
    // guest saw 23-27 ms against 7.7 ms reported.
    let gaps = heartbeat_gaps_ms(&src_log, &dst.w.log(), vcpus, tsc_khz(&src_log));
    let downtime = f(&s, "downtime_ms");
    let throttle_ms = f(&s, "max_throttle_pct") / 100.0 * 10.0;
    for (c, g) in gaps.iter().enumerate() {
        let seen = (g.switchover - 5.0).max(0.0);
        let late = (g.worst_other - 5.0).max(12.0);
        eprintln!(
            "cpu {c}: guest saw {seen:.2} ms, engine {downtime:.2} ms, worst other gap {:.2} ms",
            g.worst_other
        );
        assert!(
            seen <= downtime + throttle_ms + late,
            "cpu {c}: guest saw a {seen:.2} ms pause, engine reported {downtime:.2} ms, \
             the host scheduled it up to {late:.2} ms late elsewhere ({s})"
        );
    }
    let d = &s["downtime"];
    let parts = f(d, "final_memory_ms") + f(d, "state_ms") + f(d, "commit_ms");
    assert!(
        (parts - downtime).abs() < 0.5,
        "phases {parts} != downtime {downtime}"
    );
    dst.w.shutdown();
    s
}

#[test]
fn verify_1_vcpu() {
    migrate_once("verify", 1, &[]);
}

#[test]
fn verify_2_vcpus() {
    migrate_once("verify", 2, &[]);
}

#[test]
fn dirty_1_vcpu() {
    migrate_once("dirty", 1, &[]);
}

#[test]
fn dirty_2_vcpus_4_streams_lz4() {
    let s = migrate_once("dirty", 2, &["--streams", "4", "--compress", "lz4"]);
    assert_eq!(s["streams"], 4);
}

#[test]
fn verify_zstd() {
    migrate_once("verify", 1, &["--compress", "zstd"]);
}

#[test]
fn guest_pause_matches_reported_downtime() {
    let _alone = alone();
    // A downtime large enough to measure: the whole dirty working set goes in the final pass.
    let dir = tempdir();
    let d = dir.path();
    let src = Worker::run_guest(
        d,
        "src",
        1,
        128,
        "ferry.workload=dirty ferry.wss_mib=64 ferry.rate_mibs=100 ferry.hb_ms=2",
    );
    src.wait_log(Duration::from_secs(30), "heartbeats", |l| l.hb.len() >= 10);
    let pki = TestPki::new(d);
    let (dst, secret) = Receiver::spawn_tls(d, "dst", &pki, &[]);
    let r = src.migrate_tls(
        &dst.addr,
        &pki,
        &secret,
        &["--max-downtime-ms", "60", "--max-bandwidth-mibs", "800"],
    );
    let s = r.summary().clone();
    src.shutdown();
    let src_log = std::fs::read_to_string(d.join("src.serial")).unwrap();
    check_after_move(&src_log, &dst.w, 1, false);
    let g = heartbeat_gaps_ms(&src_log, &dst.w.log(), 1, tsc_khz(&src_log))[0];
    let gap = g.switchover;
    let downtime = f(&s, "downtime_ms");
    let seen = gap - 2.0;
    // How late the host scheduled this vCPU when nothing paused it, in the same run: the worst
    // gap between two other heartbeats past the interval, and at least 3 ms.
    let late = (g.worst_other - 2.0).max(3.0);
    eprintln!(
        "guest saw {seen:.2} ms (gap {gap:.2}), engine reported {downtime:.2} ms, late up to \
         {late:.2} ms: {}",
        s["downtime"]
    );
    // Upper bound: the heartbeat granularity (2 ms) plus how late the host runs a vCPU thread
    // (2 CPUs shared by both workers and the dirtying guest): a destination vCPU that entered
    // KVM_RUN counts as running from then on. With other tests of this binary in parallel,
    // local runs saw 8.02 ms against 2.48 ms reported (other gaps of the vCPU under 5 ms);
    // one at a time, 6 runs stayed within 0.4 ms of the reported downtime.
    assert!(
        seen <= downtime + 2.0 + late,
        "guest saw {seen:.2} ms, engine said {downtime:.2} ms, the vCPU ran up to {late:.2} ms \
         late elsewhere"
    );
    // Lower bound: the guest certainly did not run while the last pages and the state moved;
    // the commit and resume phases also contain message latencies the guest need not see.
    let paused_for_sure = f(&s["downtime"], "final_memory_ms") + f(&s["downtime"], "state_ms");
    assert!(
        seen >= paused_for_sure - 2.0,
        "guest saw {seen:.2} ms, but the last pages and the state alone took {paused_for_sure:.2} ms"
    );
    dst.w.shutdown();
}

#[test]
fn a_to_b_to_a_to_b() {
    let _alone = alone();
    let dir = tempdir();
    let d = dir.path();
    let mut cur = Worker::run_guest(
        d,
        "hop0",
        2,
        128,
        "ferry.workload=verify ferry.wss_mib=32 ferry.hb_ms=10",
    );
    cur.wait_log(Duration::from_secs(30), "verify", |l| {
        l.verify_ok_cpus().len() == 2
    });
    let mut history = String::new();
    let pki = TestPki::new(d);
    for hop in 1..=3 {
        // Each hop's receiver has its own secret (both ends use the node certificates of
        // `src` and `dst`, whichever host they model).
        let (dst, secret) = Receiver::spawn_tls(d, &format!("hop{hop}"), &pki, &[]);
        cur.migrate_tls(&dst.addr, &pki, &secret, &[]).summary();
        cur.shutdown();
        history
            .push_str(&std::fs::read_to_string(d.join(format!("hop{}.serial", hop - 1))).unwrap());
        check_after_move(&history, &dst.w, 2, true);
        cur = dst.w;
    }
    let all = Log::parse(&format!("{history}{}", cur.log()));
    all.assert_hb_continuous(2);
    cur.shutdown();
}

#[test]
fn auto_converge_beats_a_bandwidth_cap() {
    let _alone = alone();
    // The guest dirties 64 MiB as fast as it can; the link is capped at 60 MiB/s.
    let dir = tempdir();
    let d = dir.path();
    let src = Worker::run_guest(
        d,
        "src",
        1,
        128,
        "ferry.workload=dirty ferry.wss_mib=64 ferry.rate_mibs=0 ferry.hb_ms=20",
    );
    src.wait_log(Duration::from_secs(30), "dirtying", |l| !l.dirty.is_empty());
    let dst = Receiver::spawn(d, "dst", &[]);
    let r = src.migrate(
        &dst.addr,
        &["--max-bandwidth-mibs", "60", "--max-downtime-ms", "100"],
    );
    let s = r.summary().clone();
    assert!(
        f(&s, "max_throttle_pct") > 0.0,
        "converged without throttling? {s}"
    );
    assert!(
        r.lines
            .iter()
            .any(|l| l["throttle_pct"].as_f64().unwrap_or(0.0) > 0.0),
        "progress never showed the throttle"
    );
    assert!(
        f(&s, "downtime_ms") < 300.0,
        "downtime {} ms for a 100 ms budget",
        f(&s, "downtime_ms")
    );
    src.shutdown();
    let src_log = std::fs::read_to_string(d.join("src.serial")).unwrap();
    check_after_move(&src_log, &dst.w, 1, false);
    dst.w.shutdown();
}
