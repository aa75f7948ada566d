//! Every way a migration can fail before the commit leaves the VM running on the source (its
//! verifier still ok, its heartbeats still continuous) and the destination gone, and both sides
//! say in which phase and why. Preflight refusals happen before any memory moves.

mod common;
use common::*;
use migration::wire::{self, Msg, Role};
use std::io::BufRead;
use std::net::{TcpListener, TcpStream};
use std::process::Child;
use std::time::{Duration, Instant};

/// A 2-vCPU source with a busy verifier over 64 MiB.
fn source(d: &std::path::Path) -> Worker {
    let w = Worker::run_guest(
        d,
        "src",
        2,
        256,
        "ferry.workload=verify ferry.wss_mib=64 ferry.hb_ms=10",
    );
    w.wait_log(Duration::from_secs(30), "verify", |l| {
        l.verify_ok_cpus().len() == 2
    });
    w
}

/// The source VM runs on: state running, two more clean sweeps per vCPU, continuous heartbeats.
fn assert_source_alive(src: &Worker) {
    assert_eq!(
        src.ctl(&["status"])["state"],
        "running",
        "the source VM is not running"
    );
    let seen = Log::parse(&src.log()).verify_ok.len();
    let l = src.wait_log(Duration::from_secs(30), "more sweeps on the source", |l| {
        l.verify_ok.len() >= seen + 4
    });
    l.assert_no_corruption();
    l.assert_hb_continuous(2);
}

/// Reads `ctl migrate --output json` lines until `pred` holds for a progress line.
fn wait_progress(
    child: &mut Child,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Vec<serde_json::Value> {
    let out = child.stdout.as_mut().unwrap();
    let mut r = std::io::BufReader::new(out);
    let mut lines = Vec::new();
    let t0 = Instant::now();
    loop {
        let mut s = String::new();
        assert!(
            r.read_line(&mut s).unwrap() > 0,
            "migration ended before {what}: {lines:?}"
        );
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        lines.push(v.clone());
        if v["reply"] == "progress" && pred(&v) {
            return lines;
        }
        assert!(
            v["reply"] == "progress",
            "migration ended before {what}: {v}"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no {what} within 60 s"
        );
    }
}

fn kill(w: &mut Worker) {
    let mut c = w.child.take().unwrap();
    c.kill().unwrap();
    c.wait().unwrap();
}

/// The failure line of a migration that failed.
fn failure(child: Child) -> serde_json::Value {
    let r = finish_migrate(child);
    assert!(
        !r.ok,
        "the migration should have failed: {:?}",
        r.lines.last()
    );
    let last = r.last().clone();
    assert_eq!(last["reply"], "failed", "{last}");
    assert_eq!(last["source_running"], true, "{last}");
    assert_eq!(last["commit"], "before", "{last}");
    assert_eq!(
        r.stderr.trim_end().lines().count(),
        1,
        "error is not one line: {}",
        r.stderr
    );
    last
}

fn phase_of(p: &serde_json::Value) -> String {
    p["phase"].as_str().unwrap_or("").to_string()
}

#[test]
fn destination_killed_during_pass_0() {
    let dir = tempdir();
    let d = dir.path();
    let src = source(d);
    let mut dst = Receiver::spawn(d, "dst", &[]);
    let mut m = src.migrate_spawn(&dst.addr, &["--max-bandwidth-mibs", "40"]);
    wait_progress(&mut m, "pass 0 data", |p| {
        phase_of(p) == "precopy" && p["pass"] == 0 && p["bytes_sent"].as_u64() > Some(0)
    });
    kill(&mut dst.w);
    let f = failure(m);
    assert_eq!(f["phase"], "precopy", "{f}");
    assert_source_alive(&src);
    src.shutdown();
}

#[test]
fn destination_killed_during_a_later_pass() {
    let dir = tempdir();
    let d = dir.path();
    let src = source(d);
    let mut dst = Receiver::spawn(d, "dst", &[]);
    let mut m = src.migrate_spawn(
        &dst.addr,
        &["--max-bandwidth-mibs", "120", "--max-downtime-ms", "1"],
    );
    wait_progress(&mut m, "pass 2", |p| {
        phase_of(p) == "precopy" && p["pass"].as_u64() >= Some(2)
    });
    kill(&mut dst.w);
    let f = failure(m);
    assert_eq!(f["phase"], "precopy", "{f}");
    assert_source_alive(&src);
    assert_eq!(
        src.ctl(&["status"])["vm"]["throttle_pct"],
        0,
        "throttling was not lifted"
    );
    src.shutdown();
}

#[test]
fn destination_killed_during_switchover() {
    let dir = tempdir();
    let d = dir.path();
    let src = source(d);
    let mut dst = Receiver::spawn(d, "dst", &[]);
    // A huge downtime budget switches over right after pass 0; the slow link makes the final
    // pass (the whole dirtied working set) take seconds, with the VM paused.
    let mut m = src.migrate_spawn(
        &dst.addr,
        &["--max-bandwidth-mibs", "20", "--max-downtime-ms", "100000"],
    );
    wait_progress(&mut m, "the switchover", |p| {
        ["pause", "final-pages", "device-state"].contains(&phase_of(p).as_str())
    });
    assert_eq!(src.ctl(&["status"])["state"], "paused");
    kill(&mut dst.w);
    let f = failure(m);
    assert_eq!(f["phase"], "final-pages", "{f}");
    assert_source_alive(&src);
    src.shutdown();
}

#[test]
fn connection_cut_mid_frame() {
    let dir = tempdir();
    let d = dir.path();
    let src = source(d);
    let mut dst = Receiver::spawn(d, "dst", &[]);
    // Connection 0 is control, 1 the data stream: cut it 20 MiB in, inside a page batch.
    let proxy = Proxy::start(
        &dst.addr,
        Fault::CutAt {
            conn: 1,
            offset: 20 << 20,
        },
    );
    let f = failure(src.migrate_spawn(&proxy.addr, &[]));
    assert!(proxy.tripped.load(std::sync::atomic::Ordering::SeqCst));
    let reason = reason(&f);
    assert!(
        reason.contains("destination")
            || reason.contains("stream")
            || reason.contains("connection"),
        "{f}"
    );
    assert_source_alive(&src);
    let out = wait_with_timeout(dst.w.child.take().unwrap(), Duration::from_secs(20));
    assert!(!out.status.success(), "the destination should give up");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("migration failed in"), "{err}");
    src.shutdown();
}

#[test]
fn corrupted_page_data_is_refused() {
    let dir = tempdir();
    let d = dir.path();
    let src = source(d);
    let mut dst = Receiver::spawn(d, "dst", &[]);
    let proxy = Proxy::start(
        &dst.addr,
        Fault::FlipAt {
            conn: 1,
            offset: 10 << 20,
        },
    );
    let f = failure(src.migrate_spawn(&proxy.addr, &[]));
    assert!(proxy.tripped.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(f["phase"], "precopy", "{f}");
    assert_source_alive(&src);
    let out = wait_with_timeout(dst.w.child.take().unwrap(), Duration::from_secs(20));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("checksum mismatch"),
        "destination should name the corruption: {err}"
    );
    src.shutdown();
}

#[test]
fn corrupted_and_truncated_control_stream() {
    let dir = tempdir();
    let d = dir.path();
    let src = source(d);
    // A flipped bit in the preflight request: the destination refuses that session (nothing
    // moved yet) and keeps waiting; the source reports it.
    let dst = Receiver::spawn(d, "dst", &[]);
    let proxy = Proxy::start(
        &dst.addr,
        Fault::FlipAt {
            conn: 0,
            offset: 100,
        },
    );
    let f = failure(src.migrate_spawn(&proxy.addr, &[]));
    assert!(
        ["preflight", "handshake"].contains(&f["phase"].as_str().unwrap()),
        "{f}"
    );
    assert_source_alive(&src);
    // A control stream cut inside the preflight request.
    let proxy = Proxy::start(
        &dst.addr,
        Fault::CutAt {
            conn: 0,
            offset: 90,
        },
    );
    let f = failure(src.migrate_spawn(&proxy.addr, &[]));
    assert!(
        ["preflight", "handshake"].contains(&f["phase"].as_str().unwrap()),
        "{f}"
    );
    assert_source_alive(&src);
    // The destination survived both broken sessions and takes the VM now.
    src.migrate(&dst.addr, &[]).summary();
    src.shutdown();
    let l = dst
        .w
        .wait_log(Duration::from_secs(30), "verify on the destination", |l| {
            l.verify_ok_cpus().len() == 2
        });
    l.assert_no_corruption();
    dst.w.shutdown();
}

#[test]
fn wrong_protocol_version_both_ways() {
    let dir = tempdir();
    let d = dir.path();
    // A source speaking version 99 is refused by a real destination, with the reason.
    let dst = Receiver::spawn(d, "dst", &[]);
    let mut s = TcpStream::connect(&dst.addr).unwrap();
    wire::send_msg(
        &mut s,
        &Msg::Hello {
            protocol: 99,
            session: 1,
            role: Role::Control,
        },
    )
    .unwrap();
    match wire::recv_msg(&mut s).unwrap() {
        Msg::Refuse { reason } => assert!(
            reason.contains("protocol version 99 is not supported"),
            "{reason}"
        ),
        m => panic!("expected Refuse, got {m:?}"),
    }
    drop(s);
    // A destination answering with version 99: the real source refuses to go on.
    let src = source(d);
    let fake = TcpListener::bind("127.0.0.1:0").unwrap();
    let fake_addr = fake.local_addr().unwrap().to_string();
    let t = std::thread::spawn(move || {
        let (mut c, _) = fake.accept().unwrap();
        let _ = wire::recv_msg(&mut c).unwrap();
        wire::send_msg(&mut c, &Msg::HelloAck { protocol: 99 }).unwrap();
        let _ = wire::recv_msg(&mut c);
    });
    let f = failure(src.migrate_spawn(&fake_addr, &[]));
    assert_eq!(f["phase"], "handshake", "{f}");
    assert!(reason(&f).contains("protocol version 99"), "{f}");
    t.join().unwrap();
    assert_source_alive(&src);
    // The real destination still waits and takes the VM.
    src.migrate(&dst.addr, &[]).summary();
    src.shutdown();
    dst.w
        .wait_log(Duration::from_secs(30), "verify", |l| {
            !l.verify_ok.is_empty()
        })
        .assert_no_corruption();
    dst.w.shutdown();
}

/// A mixed-version cluster during an upgrade: a destination that speaks only the previous
/// protocol version (as the previous build did: it refuses version 3 by name) still takes a VM
/// from this source, which retries with version 2; and a source pinned to version 2 migrates to
/// a current destination. Memory verified and heartbeats continuous each time.
#[test]
fn previous_protocol_version_interoperates_both_ways() {
    let dir = tempdir();
    let d = dir.path();
    let src = source(d);
    let old_dst = Receiver::spawn(d, "olddst", &["--max-protocol", "2"]);
    let r = src.migrate(&old_dst.addr, &[]);
    assert_eq!(r.summary()["protocol"], 2, "{:?}", r.last());
    src.shutdown();
    old_dst
        .w
        .wait_log(
            Duration::from_secs(30),
            "verify on the v2 destination",
            |l| l.verify_ok_cpus().len() == 2,
        )
        .assert_no_corruption();
    // From the v2-only worker (now running the VM), pinned to v2 as a source, to a current one.
    let new_dst = Receiver::spawn(d, "newdst", &[]);
    let r = old_dst.w.migrate(&new_dst.addr, &["--max-protocol", "2"]);
    assert_eq!(r.summary()["protocol"], 2, "{:?}", r.last());
    old_dst.w.shutdown();
    let l = new_dst.w.wait_log(
        Duration::from_secs(30),
        "verify on the current destination",
        |l| l.verify_ok_cpus().len() == 2,
    );
    l.assert_no_corruption();
    let all = Log::parse(&format!(
        "{}{}{}",
        std::fs::read_to_string(d.join("src.serial")).unwrap(),
        std::fs::read_to_string(d.join("olddst.serial")).unwrap(),
        new_dst.w.log()
    ));
    all.assert_hb_continuous(2);
    new_dst.w.shutdown();
}

#[test]
fn preflight_refusals_and_dry_run() {
    let dir = tempdir();
    let d = dir.path();
    let src = source(d);
    let before = Log::parse(&src.log()).hb.len();
    // A destination that only offers the baseline CPU profile lacks features of `host`.
    let dst = Receiver::spawn(
        d,
        "dst",
        &[
            "--host-profile",
            "baseline",
            "--max-memory-mib",
            "128",
            "--max-vcpus",
            "1",
        ],
    );
    let r = src.migrate(&dst.addr, &[]);
    assert!(!r.ok);
    let reason = reason(r.last());
    assert_eq!(r.last()["phase"], "preflight");
    assert!(
        reason.contains("destination CPU lacks features the VM uses: "),
        "{reason}"
    );
    assert!(
        reason
            .contains("not enough memory: the VM needs 256 MiB, the destination has 128 MiB free"),
        "{reason}"
    );
    assert!(
        reason.contains("not enough cores: the VM has 2 vCPUs, the destination offers 1"),
        "{reason}"
    );
    // The missing features are exactly host minus baseline, by name.
    let info = String::from_utf8(
        std::process::Command::new(bin())
            .arg("host-info")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let feats = |p: &str| -> std::collections::BTreeSet<String> {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("profile {p}: ")))
            .unwrap()
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    let missing: Vec<String> = feats("host")
        .difference(&feats("baseline"))
        .cloned()
        .collect();
    assert!(!missing.is_empty());
    assert!(
        reason.contains(&missing.join(", ")),
        "{reason} should list {missing:?}"
    );
    // Nothing moved: no progress beyond preflight, the VM never paused.
    assert!(r
        .lines
        .iter()
        .all(|l| l["bytes_sent"].as_u64().unwrap_or(0) == 0));
    assert_source_alive(&src);
    assert!(Log::parse(&src.log()).hb.len() > before);
    // A dry run against an able destination reports OK and moves nothing.
    let ok_dst = Receiver::spawn(d, "dst2", &[]);
    let r = src.migrate(&ok_dst.addr, &["--dry-run"]);
    let s = r.summary();
    assert_eq!(s["dry_run"], true);
    assert_eq!(s["preflight"]["ok"], true);
    assert_eq!(s["bytes_sent"], 0);
    assert_source_alive(&src);
    // ...and the destination still takes the real migration afterwards.
    src.migrate(&ok_dst.addr, &[]).summary();
    src.shutdown();
    ok_dst
        .w
        .wait_log(Duration::from_secs(30), "verify", |l| {
            !l.verify_ok.is_empty()
        })
        .assert_no_corruption();
    ok_dst.w.shutdown();
    dst.w.shutdown();
}

#[test]
fn baseline_profile_vm_moves_to_a_baseline_destination() {
    let dir = tempdir();
    let d = dir.path();
    let src = Worker::spawn(
        d,
        "src",
        &[
            "run",
            "--kernel",
            "test-guest",
            "--vcpus",
            "1",
            "--memory-mib",
            "128",
            "--cpu-profile",
            "baseline",
            "--cmdline",
            "ferry.workload=verify ferry.wss_mib=16",
        ],
    );
    src.wait_log(Duration::from_secs(30), "verify", |l| {
        !l.verify_ok.is_empty()
    });
    let dst = Receiver::spawn(d, "dst", &["--host-profile", "baseline"]);
    src.migrate(&dst.addr, &[]).summary();
    src.shutdown();
    dst.w
        .wait_log(Duration::from_secs(30), "verify", |l| {
            !l.verify_ok.is_empty()
        })
        .assert_no_corruption();
    dst.w.shutdown();
}

#[test]
fn cancel_and_timeout_keep_the_vm() {
    let dir = tempdir();
    let d = dir.path();
    let src = source(d);
    let mut dst = Receiver::spawn(d, "dst", &[]);
    let mut m = src.migrate_spawn(&dst.addr, &["--max-bandwidth-mibs", "20"]);
    wait_progress(&mut m, "pass 0", |p| phase_of(p) == "precopy");
    let c = src.ctl(&["cancel"]);
    assert_eq!(c["reply"], "cancelling");
    let f = failure(m);
    assert!(reason(&f).contains("cancelled"), "{f}");
    assert_eq!(f["kind"], "cancelled", "{f}");
    assert_source_alive(&src);
    // The destination gave up (memory had started to move).
    let out = wait_with_timeout(dst.w.child.take().unwrap(), Duration::from_secs(20));
    assert!(!out.status.success());
    // A timeout behaves the same.
    let dst = Receiver::spawn(d, "dst2", &[]);
    let f = failure(src.migrate_spawn(
        &dst.addr,
        &["--max-bandwidth-mibs", "20", "--timeout-s", "1"],
    ));
    assert!(reason(&f).contains("timed out after 1.0 s"), "{f}");
    assert_source_alive(&src);
    src.shutdown();
}

#[test]
fn killing_the_source_after_the_commit_leaves_the_destination_running() {
    let dir = tempdir();
    let d = dir.path();
    let mut src = source(d);
    let dst = Receiver::spawn(d, "dst", &[]);
    let mut m = src.migrate_spawn(&dst.addr, &[]);
    // As soon as the source reports the commit phase (or done), kill it hard.
    let t0 = Instant::now();
    loop {
        let st = dst.w.ctl(&["status"]);
        if st["state"] == "running" || st["migration"]["progress"]["phase"] == "commit" {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(1));
    }
    if let Some(mut c) = src.child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = m.kill();
    let _ = m.wait();
    let l = dst
        .w
        .wait_log(Duration::from_secs(30), "verify on the destination", |l| {
            l.verify_ok_cpus().len() == 2
        });
    l.assert_no_corruption();
    assert_eq!(dst.w.ctl(&["status"])["state"], "running");
    dst.w.shutdown();
}
