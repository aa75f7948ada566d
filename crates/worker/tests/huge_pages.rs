//! Guest RAM on 2 MiB huge pages (the hugetlb pool `scripts/install-deps.sh` reserves) and the
//! fallback to 4 KiB pages: a VM the pool holds reports `huge_pages` and takes its pages from
//! the pool; a receiver started while another process holds the whole pool runs the VM on
//! 4 KiB pages; migrations between the two kinds, both ways, keep the guest's memory verifier
//! clean and its heartbeats continuous; `FERRY_HUGEPAGES=never` turns them off.

mod common;
use common::*;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::process::{Command, Stdio};
use std::time::Duration;

fn meminfo(field: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Pool pages neither allocated nor reserved (a VM reserves all of its RAM's pages at start
/// and allocates them as the guest touches them).
fn pool_free() -> u64 {
    meminfo("HugePages_Free:") - meminfo("HugePages_Rsvd:")
}

/// Takes every free page of the pool (a hugetlb memfd, allocated) until dropped.
fn hold_pool() -> File {
    let n = pool_free();
    // SAFETY: a fresh memfd; the result is checked.
    let fd = unsafe {
        libc::memfd_create(
            c"test-hold".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
        )
    };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: `fd` is ours.
    let f = unsafe { File::from_raw_fd(fd) };
    let size = n << 21;
    f.set_len(size).unwrap();
    // SAFETY: fallocate on our descriptor; checked.
    let r = unsafe { libc::fallocate(fd, 0, 0, size as libc::off_t) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    assert_eq!(pool_free(), 0);
    f
}

fn huge(w: &Worker) -> bool {
    w.ctl(&["status"])["vm"]["huge_pages"].as_bool().unwrap()
}

fn moved(src: Worker, dst: &Receiver, pki: &TestPki, secret: &std::path::Path) -> String {
    src.migrate_tls(&dst.addr, pki, secret, &[]).summary();
    let log = std::fs::read_to_string(&src.serial).unwrap();
    let out = src.shutdown();
    assert!(String::from_utf8_lossy(&out.stderr).contains("migrated to"));
    log
}

fn swept_clean(before: &str, w: &Worker) {
    let n = Log::parse(&w.log()).verify_ok.len();
    let l = w.wait_log(Duration::from_secs(60), "two more sweeps", |l| {
        l.verify_ok.len() >= n + 2
    });
    l.assert_no_corruption();
    let all = Log::parse(&format!("{before}{}", w.log()));
    all.assert_hb_continuous(1);
    all.assert_no_corruption();
}

#[test]
fn guest_ram_takes_huge_pages_when_the_pool_holds_it_and_migrates_across_page_kinds() {
    let free = pool_free();
    assert!(
        free >= 128,
        "the hugetlb pool has {free} free 2 MiB pages: scripts/install-deps.sh reserves them"
    );
    let dir = tempdir();
    let d = dir.path();
    let src = Worker::run_guest(
        d,
        "src",
        1,
        128,
        "ferry.workload=verify ferry.wss_mib=48 ferry.hb_ms=5",
    );
    src.wait_log(Duration::from_secs(30), "the verifier", |l| {
        !l.verify_ok.is_empty()
    });
    assert!(huge(&src), "a 128 MiB VM with {free} free pool pages");
    assert_eq!(pool_free(), free - 64, "its RAM is reserved in the pool");

    // The pool held elsewhere: the receiver's RAM is 4 KiB pages; the VM moves and verifies.
    let pki = TestPki::new(d);
    let hold = hold_pool();
    let (dst, secret) = Receiver::spawn_tls(d, "dst", &pki, &[]);
    let log = moved(src, &dst, &pki, &secret);
    assert!(!huge(&dst.w), "no pool pages were free");
    swept_clean(&log, &dst.w);
    drop(hold);

    // And back onto huge pages.
    let free = pool_free();
    let (dst2, secret2) = Receiver::spawn_tls(d, "dst2", &pki, &[]);
    let Receiver { w: dst_w, .. } = dst;
    let log_mid = moved(dst_w, &dst2, &pki, &secret2);
    assert!(huge(&dst2.w));
    assert_eq!(pool_free(), free - 64);
    swept_clean(&format!("{log}{log_mid}"), &dst2.w);
    dst2.w.shutdown();
    assert_eq!(pool_free(), free, "the VM's pages went back to the pool");

    // Turned off by the environment.
    let sock = d.join("never.sock");
    let mut child = Command::new(bin())
        .env("FERRY_HUGEPAGES", "never")
        .args(["run", "--kernel", "test-guest", "--memory-mib", "64"])
        .arg("--api-socket")
        .arg(&sock)
        .arg("--serial-log")
        .arg(d.join("never.serial"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let w = Worker {
        child: None,
        dir: d.to_path_buf(),
        serial: d.join("never.serial"),
        socket: sock.clone(),
        name: "never".into(),
    };
    let t0 = std::time::Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed() < Duration::from_secs(20), "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(!huge(&w));
    assert_eq!(pool_free(), free);
    let _ = child.kill();
    let _ = child.wait();
}
