//! Every workload of the test guest boots on Ferry with 1, 2 and 4 vCPUs and prints what it
//! should: a boot line, per-vCPU heartbeats with strictly increasing counters, and the
//! workload's own lines.

mod common;
use common::*;
use std::time::Duration;

fn boot_and_check(workload: &str, vcpus: u8) {
    let dir = tempdir();
    let cmdline =
        format!("ferry.workload={workload} ferry.wss_mib=16 ferry.rate_mibs=0 ferry.hb_ms=50");
    let w = Worker::run_guest(
        dir.path(),
        &format!("{workload}{vcpus}"),
        vcpus,
        128,
        &cmdline,
    );
    let n = vcpus as u32;
    let log = w.wait_log(
        Duration::from_secs(60),
        "4 heartbeats per vCPU and workload output",
        |l| {
            l.min_hb_per_cpu(n) >= 4
                && match workload {
                    "verify" => l.verify_ok_cpus().len() == vcpus as usize,
                    "dirty" => {
                        (0..n).all(|c| l.dirty.iter().any(|d| d.get("cpu") == Some(&c.to_string())))
                    }
                    _ => true,
                }
        },
    );
    let boot = log.boot.clone().expect("boot line");
    assert_eq!(
        boot["cpus"],
        vcpus.to_string(),
        "guest saw the wrong number of CPUs"
    );
    assert_eq!(boot["workload"], workload);
    let mem: u64 = boot["mem_mib"].parse().unwrap();
    assert!(
        (126..=128).contains(&mem),
        "guest saw {mem} MiB of a 128 MiB VM"
    );
    log.assert_hb_continuous(n);
    log.assert_no_corruption();
    for c in 0..n {
        assert_eq!(
            log.hb_of(c)[0].counter,
            1,
            "cpu {c}: first heartbeat counter is not 1"
        );
    }
    if workload == "dirty" || workload == "verify" {
        let (_, pages) = log.wss.expect("wss line");
        assert_eq!(pages, 16 * 256);
    }
    let out = w.shutdown();
    assert!(
        out.status.success(),
        "worker exit: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn idle_1_2_4_vcpus() {
    for n in [1, 2, 4] {
        boot_and_check("idle", n);
    }
}

#[test]
fn dirty_1_2_4_vcpus() {
    for n in [1, 2, 4] {
        boot_and_check("dirty", n);
    }
}

#[test]
fn verify_1_2_4_vcpus() {
    for n in [1, 2, 4] {
        boot_and_check("verify", n);
    }
}

#[test]
fn heartbeat_interval_follows_hb_ms() {
    let dir = tempdir();
    let w = Worker::run_guest(
        dir.path(),
        "hb",
        1,
        64,
        "ferry.workload=idle ferry.hb_ms=20",
    );
    let log = w.wait_log(Duration::from_secs(30), "20 heartbeats", |l| {
        l.hb.len() >= 20
    });
    let boot = log.boot.clone().unwrap();
    let khz: f64 = boot["tsc_khz"].parse().unwrap();
    let hb = log.hb_of(0);
    let span_ms = (hb[hb.len() - 1].tsc - hb[1].tsc) as f64 / khz;
    let per = span_ms / (hb.len() - 2) as f64;
    // Generous bounds: this checks the unit (ms, not µs or s), not the timing precision.
    assert!(
        per > 15.0 && per < 60.0,
        "heartbeat interval {per:.1} ms for hb_ms=20"
    );
    w.shutdown();
}
