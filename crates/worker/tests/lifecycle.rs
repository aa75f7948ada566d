//! Guest-driven lifecycle: an i8042 reset stops the VM and the worker reports it; the same
//! test guest ELF boots unchanged under QEMU (the comparison baseline).

mod common;
use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn guest_reset_through_the_i8042_stops_the_worker() {
    let dir = tempdir();
    let mut w = Worker::run_guest(
        dir.path(),
        "reset",
        2,
        64,
        "ferry.workload=idle ferry.reset_after_ms=300",
    );
    let child = w.child.take().unwrap();
    let out = wait_with_timeout(child, Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "worker exit {:?}: {err}", out.status);
    assert!(err.contains("guest requested a reset"), "{err}");
    let log = w.log();
    assert!(log.contains("reset requested"), "{log}");
    assert!(Log::parse(&log).hb_of(0).len() >= 2);
    assert!(!w.socket.exists(), "the API socket was left behind");
}

#[test]
fn test_guest_boots_unchanged_under_qemu() {
    let qemu = "qemu-system-x86_64";
    assert!(
        Command::new(qemu).arg("--version").output().is_ok(),
        "{qemu} is missing: scripts/install-deps.sh installs it (Debian qemu-system-x86)"
    );
    require_kvm();
    let dir = tempdir();
    let elf = dir.path().join("ferry-guest.elf");
    std::fs::write(&elf, guest::ELF).unwrap();
    let serial = dir.path().join("qemu.serial");
    // `-cpu host` minus arch-capabilities: QEMU 7.2 cannot set that MSR on this host's KVM.
    let mut child = Command::new(qemu)
        .args([
            "-accel",
            "kvm",
            "-M",
            "microvm",
            "-cpu",
            "host,-arch-capabilities",
            "-smp",
            "2",
            "-m",
            "128M",
        ])
        .args([
            "-no-user-config",
            "-nodefaults",
            "-nographic",
            "-display",
            "none",
            "-monitor",
            "none",
        ])
        .arg("-kernel")
        .arg(&elf)
        .args([
            "-append",
            "ferry.workload=verify ferry.wss_mib=16 ferry.hb_ms=50",
            "-serial",
        ])
        .arg(format!("file:{}", serial.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let log = loop {
        let l = Log::parse(&std::fs::read_to_string(&serial).unwrap_or_default());
        if l.min_hb_per_cpu(2) >= 5 && l.verify_ok_cpus().len() == 2 {
            break l;
        }
        if let Some(st) = child.try_wait().unwrap() {
            let mut e = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut e).unwrap();
            panic!("QEMU exited ({st}): {e}");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "QEMU guest made no progress"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(log.boot.as_ref().unwrap()["cpus"], "2");
    log.assert_hb_continuous(2);
    log.assert_no_corruption();
}
