//! virtio devices under live migration, worker to worker: a disk-log guest keeps every
//! acknowledged record and its sequence across repeated moves, the image lock follows the VM
//! (source releases, destination takes it before it runs, a late failure returns it to the
//! source), and a second VM can never open a disk that is in use.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmm::devices::virtio::block::probe_image;
use worker::api::{CommitDecision, MigrateCommand, MigrateSession, Reply};

fn image(dir: &Path, mib: u64) -> PathBuf {
    let p = dir.join("disk.img");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(mib << 20).unwrap();
    p
}

fn disk_guest(dir: &Path, name: &str, img: &Path, rate: u32) -> Worker {
    let cmdline = format!("ferry.workload=disk-log ferry.disk_rate={rate} ferry.disk_flush=8");
    Worker::spawn(
        dir,
        name,
        &[
            "run",
            "--kernel",
            "test-guest",
            "--memory-mib",
            "64",
            "--cmdline",
            &cmdline,
            "--disk",
            img.to_str().unwrap(),
        ],
    )
}

fn assert_disk_healthy(log: &str) {
    for bad in ["disk CORRUPT", "disk ERROR", "PANIC", "disk full"] {
        assert!(!log.contains(bad), "{bad} in:\n{}", tail(log, 20));
    }
}

/// Waits until the worker's guest acknowledged `n` more records than now.
fn wait_records(w: &Worker, n: usize) -> u64 {
    let before = disk_seqs(&w.log()).len();
    w.wait_log(Duration::from_secs(30), "disk records", |_| {
        disk_seqs(&w.log()).len() >= before + n
    });
    disk_seqs(&w.log()).last().copied().unwrap_or(0)
}

#[test]
fn disk_log_keeps_every_acknowledged_record_across_migrations() {
    let dir = tempdir();
    let d = dir.path();
    let img = image(d, 8);
    let src = disk_guest(d, "src", &img, 400);
    src.wait_log(Duration::from_secs(30), "the boot check", |l| {
        l.other.iter().any(|x| x == "disk ok last=0")
    });
    wait_records(&src, 50);
    // Nobody else can open the image for writing while the VM runs.
    assert!(probe_image(&img, false).unwrap().locked_elsewhere);
    let (_, e) = run_fail(&[
        "run",
        "--kernel",
        "test-guest",
        "--cmdline",
        "ferry.workload=disk-log",
        "--disk",
        img.to_str().unwrap(),
        "--serial-log",
        d.join("intruder.serial").to_str().unwrap(),
        "--api-socket",
        d.join("intruder.sock").to_str().unwrap(),
    ]);
    assert!(e.contains("is in use by another VM"), "{e}");

    let mut logs = vec![];
    let mut cur = src;
    for hop in 0..3 {
        let dst = Receiver::spawn(d, &format!("hop{hop}"), &[]);
        let r = cur.migrate(&dst.addr, &[]);
        let sum = r.summary().clone();
        assert!(sum["downtime_ms"].as_f64().unwrap() > 0.0);
        // The source stopped; its last acknowledged record is in its log.
        let serial = cur.serial.clone();
        cur.shutdown();
        logs.push(std::fs::read_to_string(serial).unwrap());
        let next = dst.w;
        // The destination holds the image now and keeps appending.
        wait_records(&next, 40);
        assert!(probe_image(&img, false).unwrap().locked_elsewhere);
        cur = next;
    }
    let serial = cur.serial.clone();
    cur.shutdown();
    logs.push(std::fs::read_to_string(serial).unwrap());
    // Sequence numbers continue across every move: no record repeated, none skipped. (The
    // serial stream itself continues too: a line cut by the pause ends on the next host.)
    let all: Vec<u64> = disk_seqs(&logs.concat());
    for l in &logs {
        assert_disk_healthy(l);
    }
    for w in all.windows(2) {
        assert_eq!(w[1], w[0] + 1, "sequence broken across migrations");
    }
    let acked = *all.last().unwrap();
    assert!(!probe_image(&img, false).unwrap().locked_elsewhere);

    // A fresh VM checks the log: every acknowledged record is there, intact.
    let check = disk_guest(d, "check", &img, 0);
    let l = check.wait_log(Duration::from_secs(30), "the boot check", |l| {
        l.other
            .iter()
            .any(|x| x.starts_with("disk ok") || x.starts_with("disk CORRUPT"))
    });
    let line = l
        .other
        .iter()
        .find(|x| x.starts_with("disk ok") || x.starts_with("disk CORRUPT"))
        .unwrap();
    let last: u64 = line
        .strip_prefix("disk ok last=")
        .unwrap_or_else(|| panic!("{line}"))
        .parse()
        .unwrap();
    // Never fewer. At most two more: the stop may cut the line of the last acknowledged record
    // (which then is not counted above), and one more record may have reached the disk
    // without its acknowledgement reaching the guest.
    assert!(
        (acked..=acked + 2).contains(&last),
        "log holds {last} records, {acked} were acknowledged"
    );
    check.shutdown();
}

fn commit_args(to: &str) -> MigrateCommand {
    MigrateCommand {
        to: to.into(),
        params: Default::default(),
        dry_run: false,
        external_commit: true,
        handover: false,
        max_protocol: None,
        transport: contract::trust::Transport::Insecure,
        secret: None,
    }
}

#[test]
fn a_late_failure_returns_the_disk_lock_to_the_source() {
    let dir = tempdir();
    let d = dir.path();
    let img = image(d, 8);
    let src = disk_guest(d, "src", &img, 400);
    wait_records(&src, 30);
    let mut dst = Receiver::spawn(d, "dst", &["--external-commit"]);
    // Run up to the point where the destination holds everything, the lock included.
    let mut s = MigrateSession::start(&src.socket, commit_args(&dst.addr)).unwrap();
    loop {
        match s.next_reply().unwrap() {
            Reply::Progress(_) => continue,
            Reply::CommitReady => break,
            other => panic!("expected commit-ready, got {other:?}"),
        }
    }
    assert_eq!(src.ctl(&["status"])["state"], "paused");
    let before = disk_seqs(&src.log());
    // The destination took the image: the source cannot have it now.
    assert!(probe_image(&img, false).unwrap().locked_elsewhere);
    // The commit fails late (the owner did not change): the source takes the disk back and runs.
    s.decide(CommitDecision::Abort).unwrap();
    let last = loop {
        let r = s.next_reply().unwrap();
        if !matches!(r, Reply::Progress(_)) {
            break r;
        }
    };
    let Reply::Failed(f) = last else {
        panic!("the migration must fail: {last:?}")
    };
    assert!(f.source_running, "{f:?}");
    let out = wait_with_timeout(dst.w.child.take().unwrap(), Duration::from_secs(20));
    assert!(!out.status.success(), "the destination must discard the VM");
    assert_eq!(src.ctl(&["status"])["state"], "running");
    wait_records(&src, 30);
    let after = disk_seqs(&src.log());
    assert_eq!(
        after[before.len()],
        before.last().unwrap() + 1,
        "the guest continued where it paused"
    );
    assert_disk_healthy(&src.log());
    // The running source holds the lock again.
    assert!(probe_image(&img, false).unwrap().locked_elsewhere);
    src.shutdown();
}

#[test]
fn a_destination_that_cannot_open_the_disk_refuses_in_preflight() {
    let dir = tempdir();
    let d = dir.path();
    let img = image(d, 4);
    let src = disk_guest(d, "src", &img, 100);
    wait_records(&src, 5);
    // The destination sees another file at the same path: the source's lock is not visible
    // there, so the storage is not shared. Model it with a destination in its own mount
    // namespace where the image's directory is an empty tmpfs.
    let serial = d.join("dst.serial");
    let sock = d.join("dst.sock");
    let script = format!(
        "mount -t tmpfs none '{}' && exec '{}' receive --listen 127.0.0.1:0 --insecure --serial-log '{}' --api-socket '{}'",
        d.display(),
        bin().display(),
        serial.display(),
        sock.display()
    );
    // The serial log and socket live in the tmpfs too; the test talks to the worker only
    // through the migration, so that is fine.
    let mut child = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr = line
        .trim()
        .strip_prefix("receiving on ")
        .unwrap()
        .to_string();
    let r = src.migrate(&addr, &[]);
    assert!(!r.ok);
    let reason = reason(r.last());
    assert!(
        reason.contains("shared storage not reachable from here")
            && reason.contains(img.to_str().unwrap()),
        "{reason}"
    );
    assert_eq!(r.last()["source_running"], true);
    assert_eq!(src.ctl(&["status"])["state"], "running");
    wait_records(&src, 5);
    let _ = child.kill();
    let _ = child.wait();
    src.shutdown();
}
