//! `ferry-linux-guest` (crates/linux-guest), the test guest's workloads for stock Linux
//! guests, checked with the same parser and checks as the test guest (`common::Log`), without a
//! VM: it runs here as an ordinary process (process mode: options from `FERRY_CMDLINE`, console
//! = its standard output, a file here). Each test also shows that its check can fail: a byte
//! flipped in the working set from outside, a SIGSTOP, a SIGKILL mid-write, a damaged record.
//! Every run is rate limited and short: the machine's two cores are shared.

mod common;
mod nested;

use common::{kv, tail, Log};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../../guest/kernel/disklog.rs"]
#[allow(dead_code)]
mod disklog;

/// A running `ferry-linux-guest` process; its console is `out`.
struct Guest {
    child: Option<Child>,
    out: PathBuf,
}

impl Guest {
    fn start(dir: &Path, name: &str, cmdline: &str) -> Guest {
        let out = dir.join(format!("{name}.console"));
        let child = Command::new(linux_guest::PATH)
            .env(linux_guest::CMDLINE_ENV, cmdline)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start ferry-linux-guest");
        Guest {
            child: Some(child),
            out,
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn log(&self) -> Log {
        Log::parse(&self.text())
    }

    /// Waits until `pred(log)` holds (fails on a PANIC line, an exit, or after `timeout`).
    fn wait(&mut self, timeout: Duration, what: &str, pred: impl Fn(&Log) -> bool) -> Log {
        let t0 = Instant::now();
        loop {
            let log = self.log();
            if pred(&log) {
                return log;
            }
            assert!(
                log.panics.is_empty(),
                "PANIC while waiting for {what}:\n{}",
                tail(&self.text(), 30)
            );
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "ferry-linux-guest exited ({st}) while waiting for {what}:\n{}",
                    tail(&self.text(), 30)
                );
            }
            assert!(
                t0.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}:\n{}",
                tail(&self.text(), 30)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child process, which has not been reaped yet.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    /// SIGKILL and reap; returns the console text.
    fn kill(mut self) -> String {
        let mut c = self.child.take().unwrap();
        let _ = c.kill();
        let _ = c.wait();
        self.text()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn boot(log: &Log) -> std::collections::BTreeMap<String, String> {
    log.boot.clone().expect("no boot line")
}

fn cpus(log: &Log) -> u32 {
    boot(log)["cpus"].parse().unwrap()
}

/// The `linux-wss` line: (virtual address, pages).
fn wss(log: &Log) -> (u64, u64) {
    let line = log
        .other
        .iter()
        .find(|l| l.starts_with("linux-wss "))
        .expect("no linux-wss line");
    let m = kv(line);
    let va = u64::from_str_radix(m["va"].trim_start_matches("0x"), 16).unwrap();
    (va, m["pages"].parse().unwrap())
}

fn verify_ok_count(log: &Log, cpu: u32) -> usize {
    let c = cpu.to_string();
    log.verify_ok.iter().filter(|m| m["cpu"] == c).count()
}

#[test]
fn heartbeats_and_the_verifier_run_on_every_cpu_each_thread_pinned() {
    let dir = common::tempdir();
    let mut g = Guest::start(
        dir.path(),
        "verify",
        "console=ttyS0 ferry.workload=verify ferry.wss_mib=8 ferry.rate_mibs=64 ferry.hb_ms=50",
    );
    let log = g.wait(Duration::from_secs(30), "3 verify ok on every CPU", |l| {
        l.boot.is_some() && (0..cpus(l)).all(|c| verify_ok_count(l, c) >= 3)
    });
    let n = cpus(&log);
    let want = std::thread::available_parallelism().unwrap().get() as u32;
    assert_eq!(n, want, "one CPU per CPU of the affinity mask");
    let b = boot(&log);
    assert_eq!(
        (
            b["workload"].as_str(),
            b["wss_mib"].as_str(),
            b["os"].as_str()
        ),
        ("verify", "8", "linux")
    );
    // Each CPU's thread is pinned to exactly one CPU, a different one each.
    let mut pinned = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{}/task", g.pid())).unwrap() {
        let t = t.unwrap().path();
        let name = std::fs::read_to_string(t.join("comm")).unwrap();
        if name.trim().starts_with("cpu") {
            let st = std::fs::read_to_string(t.join("status")).unwrap();
            let allowed = st
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap()
                .trim()
                .to_string();
            assert!(
                allowed.parse::<u32>().is_ok(),
                "{name}: {allowed} is not one CPU"
            );
            pinned.push(allowed);
        }
    }
    pinned.sort();
    pinned.dedup();
    assert_eq!(pinned.len(), n as usize, "threads pinned: {pinned:?}");

    std::thread::sleep(Duration::from_millis(500));
    let text = g.kill();
    let log = Log::parse(&text);
    log.assert_hb_continuous(n);
    log.assert_no_corruption();
    let all: std::collections::BTreeSet<String> = (0..n).map(|c| c.to_string()).collect();
    assert_eq!(log.verify_ok_cpus(), all);
    // The heartbeat period, by the TSC and the frequency the boot line gives.
    let khz: f64 = b["tsc_khz"].parse().unwrap();
    for c in 0..n {
        let hb = log.hb_of(c);
        assert!(hb.len() >= 10, "cpu {c}: {} heartbeats", hb.len());
        let mut gaps: Vec<f64> = hb
            .windows(2)
            .map(|w| (w[1].tsc - w[0].tsc) as f64 / khz)
            .collect();
        gaps.sort_by(f64::total_cmp);
        let median = gaps[gaps.len() / 2];
        assert!(
            (45.0..60.0).contains(&median),
            "cpu {c}: median heartbeat gap {median} ms, want 50"
        );
    }
    // The partitions cover the working set.
    let (_, pages) = wss(&log);
    let sum: u64 = (0..n)
        .map(|c| {
            let c = c.to_string();
            log.verify_ok.iter().find(|m| m["cpu"] == c).unwrap()["pages"]
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(sum, pages);
}

#[test]
fn a_byte_flipped_from_outside_is_reported_for_exactly_that_page() {
    let dir = common::tempdir();
    let mut g = Guest::start(
        dir.path(),
        "flip",
        "ferry.workload=verify ferry.wss_mib=8 ferry.rate_mibs=64 ferry.hb_ms=50",
    );
    let log = g.wait(Duration::from_secs(30), "verify ok on every CPU", |l| {
        l.boot.is_some() && (0..cpus(l)).all(|c| verify_ok_count(l, c) >= 1)
    });
    let n = cpus(&log) as u64;
    let (va, pages) = wss(&log);
    // A page in the middle of the last CPU's partition, a byte in its pattern words.
    let owner = n - 1;
    let page = (owner * pages / n + (owner + 1) * pages / n) / 2 + 3;
    let addr = va + page * 4096 + 1234;
    let byte = peek(g.pid(), addr, 1)[0];
    poke(g.pid(), addr, &[byte ^ 0x40]);

    let before = verify_ok_count(&g.log(), owner as u32);
    g.wait(
        Duration::from_secs(20),
        "the corruption report and two clean sweeps after it",
        |l| !l.corrupt.is_empty() && verify_ok_count(l, owner as u32) >= before + 2,
    );
    let text = g.kill();
    let log = Log::parse(&text);
    assert_eq!(log.corrupt.len(), 1, "{:?}", log.corrupt);
    let c = &log.corrupt[0];
    assert_eq!(c["page"], page.to_string());
    assert_eq!(c["cpu"], owner.to_string());
    assert_eq!(c["found_index"], page.to_string());
    assert_eq!(c["checksum"], "bad");
    assert_eq!(log.verify_bad.len(), 1, "{:?}", log.verify_bad);
    assert!(log.verify_bad[0].contains(&format!("cpu={owner} errors=1")));
    log.assert_hb_continuous(n as u32);
    assert!(log.panics.is_empty());
}

/// Reads `len` bytes at `addr` of process `pid`.
fn peek(pid: i32, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: reads `len` bytes of the child into `buf` (the iovecs describe valid memory).
    let r = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    assert_eq!(
        r,
        len as isize,
        "process_vm_readv: {}",
        std::io::Error::last_os_error()
    );
    buf
}

/// Writes `data` at `addr` of process `pid`.
fn poke(pid: i32, addr: u64, data: &[u8]) {
    let local = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: writes `data` into the child's memory; process_vm_writev only reads `data`.
    let r = unsafe { libc::process_vm_writev(pid, &local, 1, &remote, 1, 0) };
    assert_eq!(
        r,
        data.len() as isize,
        "process_vm_writev: {}",
        std::io::Error::last_os_error()
    );
}

/// What a page a migration failed to copy looks like: an older, self-consistent version.
#[test]
fn a_stale_page_put_back_from_outside_is_reported_as_stale() {
    let dir = common::tempdir();
    let mut g = Guest::start(
        dir.path(),
        "stale",
        "ferry.workload=verify ferry.wss_mib=4 ferry.rate_mibs=32 ferry.hb_ms=50",
    );
    let log = g.wait(Duration::from_secs(30), "verify ok on every CPU", |l| {
        l.boot.is_some() && (0..cpus(l)).all(|c| verify_ok_count(l, c) >= 1)
    });
    let (va, pages) = wss(&log);
    let page = pages / 3;
    let owner = (0..cpus(&log) as u64)
        .find(|&k| {
            let n = cpus(&log) as u64;
            (k * pages / n..(k + 1) * pages / n).contains(&page)
        })
        .unwrap();
    let old = peek(g.pid(), va + page * 4096, 4096);
    let old_gen = u64::from_le_bytes(old[8..16].try_into().unwrap());
    assert_eq!(u64::from_le_bytes(old[0..8].try_into().unwrap()), page);
    // Two sweeps later the writer has rewritten the page with a newer generation.
    let seen = verify_ok_count(&g.log(), owner as u32);
    g.wait(Duration::from_secs(30), "two more sweeps", |l| {
        verify_ok_count(l, owner as u32) >= seen + 2
    });
    assert_ne!(peek(g.pid(), va + page * 4096, 4096), old);
    poke(g.pid(), va + page * 4096, &old);
    g.wait(Duration::from_secs(20), "the stale page report", |l| {
        !l.corrupt.is_empty()
    });
    std::thread::sleep(Duration::from_millis(300));
    let log = Log::parse(&g.kill());
    assert_eq!(log.corrupt.len(), 1, "{:?}", log.corrupt);
    let c = &log.corrupt[0];
    assert_eq!(c["page"], page.to_string());
    assert_eq!(c["cpu"], owner.to_string());
    assert_eq!(c["checksum"], "ok", "a stale page is self-consistent");
    assert_eq!(c["found_gen"], old_gen.to_string());
    assert!(c["expected_gen"].parse::<u64>().unwrap() > old_gen);
}

#[test]
fn dirty_writes_the_round_number_into_every_page_on_every_cpu() {
    let dir = common::tempdir();
    let mut g = Guest::start(
        dir.path(),
        "dirty",
        "ferry.workload=dirty ferry.wss_mib=4 ferry.rate_mibs=32 ferry.hb_ms=50",
    );
    let log = g.wait(
        Duration::from_secs(30),
        "dirty reports with rounds on every CPU",
        |l| {
            l.boot.is_some()
                && (0..cpus(l)).all(|c| {
                    l.dirty
                        .iter()
                        .any(|m| m["cpu"] == c.to_string() && m["rounds"] != "0")
                })
        },
    );
    let n = cpus(&log) as u64;
    let (va, pages) = wss(&log);
    for k in 0..n {
        let first = k * pages / n;
        let round = u64::from_le_bytes(peek(g.pid(), va + first * 4096, 8).try_into().unwrap());
        assert!(round >= 1, "cpu {k}: page {first} holds round {round}");
    }
    let log = Log::parse(&g.kill());
    log.assert_hb_continuous(n as u32);
    assert!(log.panics.is_empty());
}

#[test]
fn a_sigstop_shows_up_as_the_reported_pause_on_every_cpu() {
    let dir = common::tempdir();
    let mut g = Guest::start(dir.path(), "pause", "ferry.workload=idle ferry.hb_ms=50");
    let log = g.wait(Duration::from_secs(30), "10 heartbeats per CPU", |l| {
        l.boot.is_some() && l.min_hb_per_cpu(cpus(l)) >= 10
    });
    let n = cpus(&log);
    let khz: f64 = boot(&log)["tsc_khz"].parse().unwrap();
    g.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(300));
    g.signal(libc::SIGCONT);
    let seen = log.min_hb_per_cpu(n);
    g.wait(Duration::from_secs(30), "10 more heartbeats per CPU", |l| {
        l.min_hb_per_cpu(n) >= seen + 10
    });
    let log = Log::parse(&g.kill());
    log.assert_hb_continuous(n);
    for c in 0..n {
        let long: Vec<(u64, u64)> = log
            .pauses_of(c)
            .into_iter()
            .filter(|p| p.0 >= 250)
            .collect();
        assert_eq!(long.len(), 1, "cpu {c}: pauses {:?}", log.pauses_of(c));
        let (ms, tsc_ms) = long[0];
        assert!((290..1000).contains(&ms), "cpu {c}: pause of {ms} ms");
        assert!(
            ms.abs_diff(tsc_ms) <= 20,
            "cpu {c}: {ms} ms vs {tsc_ms} by TSC"
        );
        // ... and it is the longest gap between two of the CPU's heartbeats.
        let hb = log.hb_of(c);
        let gap = hb
            .windows(2)
            .map(|w| (w[1].tsc - w[0].tsc) as f64 / khz)
            .fold(0.0, f64::max);
        assert!(
            (gap - tsc_ms as f64).abs() <= 2.0,
            "cpu {c}: {gap} vs {tsc_ms}"
        );
    }
}

/// `disk seq=N` values of the complete lines, in order.
fn seqs(text: &str) -> Vec<u64> {
    let complete = &text[..text.rfind('\n').map(|i| i + 1).unwrap_or(0)];
    complete
        .lines()
        .filter_map(|l| l.strip_prefix("disk seq="))
        .map(|n| n.parse().unwrap())
        .collect()
}

fn boot_check(log: &Log) -> Option<String> {
    log.other
        .iter()
        .find(|x| x.starts_with("disk ok") || x.starts_with("disk CORRUPT"))
        .cloned()
}

/// The log on `img` as this host reads it with the test guest's record format.
fn scan_image(img: &Path) -> disklog::Scan {
    let data = std::fs::read(img).unwrap();
    let recs: Vec<[u8; 512]> = data
        .chunks_exact(512)
        .map(|r| r.try_into().unwrap())
        .collect();
    disklog::Scan::START.feed(0, &recs, recs.len() as u64)
}

#[test]
fn disk_log_keeps_every_acknowledged_record_across_a_sigkill() {
    let dir = common::tempdir();
    let img = dir.path().join("vda.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let opts = format!(
        "ferry.workload=disk-log ferry.disk_rate=0 ferry.disk={} ferry.hb_ms=50",
        img.display()
    );
    let mut g = Guest::start(dir.path(), "first", &opts);
    let log = g.wait(Duration::from_secs(30), "200 records", |l| {
        l.other
            .iter()
            .filter(|x| x.starts_with("disk seq="))
            .count()
            >= 200
    });
    assert_eq!(boot_check(&log).as_deref(), Some("disk ok last=0"));
    let info = format!("linux-disk path={} sectors=2048 direct=1", img.display());
    assert!(log.other.contains(&info), "no {info}");
    let text = g.kill();
    let acked = seqs(&text);
    for (i, s) in acked.iter().enumerate() {
        assert_eq!(*s, i as u64 + 1, "records acknowledged out of order");
    }
    let acked = *acked.last().unwrap();
    // What is on the disk: every acknowledged record; at most one more (written, killed before
    // it was printed).
    let disklog::Scan::End { last: on_disk } = scan_image(&img) else {
        panic!("the image is damaged: {:?}", scan_image(&img));
    };
    assert!(
        (acked..=acked + 1).contains(&on_disk),
        "{on_disk} records on disk, {acked} acknowledged"
    );

    // The boot check of the next run finds exactly what is on the disk, and appends after it.
    let mut g = Guest::start(dir.path(), "second", &opts);
    let log = g.wait(
        Duration::from_secs(30),
        "the boot check and 10 records",
        |l| {
            boot_check(l).is_some()
                && l.other
                    .iter()
                    .filter(|x| x.starts_with("disk seq="))
                    .count()
                    >= 10
        },
    );
    assert_eq!(boot_check(&log).unwrap(), format!("disk ok last={on_disk}"));
    let text = g.kill();
    assert_eq!(seqs(&text)[0], on_disk + 1);
    assert!(!text.contains("disk ERROR") && !text.contains("PANIC"));

    // A damaged record (one flipped byte in record 5) is found by the boot check, and then
    // nothing is appended.
    let mut data = std::fs::read(&img).unwrap();
    data[4 * 512 + 100] ^= 1;
    std::fs::write(&img, &data).unwrap();
    let mut g = Guest::start(dir.path(), "third", &opts);
    let log = g.wait(Duration::from_secs(30), "the boot check", |l| {
        boot_check(l).is_some()
    });
    assert_eq!(boot_check(&log).unwrap(), "disk CORRUPT at=4");
    std::thread::sleep(Duration::from_millis(300));
    let text = g.kill();
    assert!(seqs(&text).is_empty(), "appended after CORRUPT");
    assert_eq!(std::fs::read(&img).unwrap(), data, "the image changed");

    // A full disk: 8 records fit.
    let small = dir.path().join("small.img");
    std::fs::write(&small, vec![0u8; 8 * 512]).unwrap();
    let mut g = Guest::start(
        dir.path(),
        "full",
        &format!(
            "ferry.workload=disk-log ferry.disk_rate=0 ferry.disk={}",
            small.display()
        ),
    );
    g.wait(Duration::from_secs(30), "disk full", |l| {
        l.other.iter().any(|x| x == "disk full last=8")
    });
    let text = g.kill();
    assert_eq!(seqs(&text), (1..=8).collect::<Vec<u64>>());
    assert_eq!(scan_image(&small), disklog::Scan::End { last: 8 });
}

/// A loop device over a file (detached on drop).
struct Loop {
    dev: String,
}

impl Loop {
    fn attach(file: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .expect("losetup (util-linux; root needed)");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop {
            dev: String::from_utf8(out.stdout).unwrap().trim().to_string(),
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// The same on a block device (a loop device standing in for /dev/vda): its size comes from
/// BLKGETSIZE64, the writes are O_DIRECT.
#[test]
fn disk_log_on_a_block_device_keeps_every_acknowledged_record_across_a_sigkill() {
    let dir = common::tempdir();
    let img = dir.path().join("loop.img");
    std::fs::write(&img, vec![0u8; 512 << 10]).unwrap();
    let lo = Loop::attach(&img);
    let opts = format!(
        "ferry.workload=disk-log ferry.disk_rate=0 ferry.disk={} ferry.hb_ms=50",
        lo.dev
    );
    let mut g = Guest::start(dir.path(), "first", &opts);
    let log = g.wait(Duration::from_secs(30), "100 records", |l| {
        l.other
            .iter()
            .filter(|x| x.starts_with("disk seq="))
            .count()
            >= 100
    });
    let info = format!("linux-disk path={} sectors=1024 direct=1", lo.dev);
    assert!(log.other.contains(&info), "no {info}: {:?}", log.other);
    let acked = *seqs(&g.kill()).last().unwrap();
    let mut g = Guest::start(dir.path(), "second", &opts);
    let log = g.wait(Duration::from_secs(30), "the boot check", |l| {
        boot_check(l).is_some()
    });
    let check = boot_check(&log).unwrap();
    let last: u64 = check
        .strip_prefix("disk ok last=")
        .unwrap_or_else(|| panic!("{check}"))
        .parse()
        .unwrap();
    assert!(
        (acked..=acked + 1).contains(&last),
        "{last} records found, {acked} acknowledged"
    );
    drop(g.kill());
    drop(lo);
    // Through the backing file, with the test guest's record format.
    let disklog::Scan::End { last: in_file } = scan_image(&img) else {
        panic!("the image is damaged: {:?}", scan_image(&img));
    };
    assert!(
        in_file >= last,
        "{in_file} records in the file, the boot check found {last}"
    );
}

#[test]
fn udp_echo_answers_byte_for_byte_from_the_port_it_was_sent_to() {
    let dir = common::tempdir();
    let port = {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let mut g = Guest::start(
        dir.path(),
        "net",
        &format!("ferry.workload=net-echo ferry.ip=10.77.0.5 ferry.udp_port={port} ferry.hb_ms=50"),
    );
    let log = g.wait(Duration::from_secs(30), "net up", |l| {
        l.other.iter().any(|x| x.starts_with("net up "))
    });
    let up = kv(log.other.iter().find(|x| x.starts_with("net up ")).unwrap());
    assert_eq!(up["ip"], "10.77.0.5");
    assert_eq!(up["udp_port"], port.to_string());
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = vec![0u8; 65536];
    let mut x: u32 = 0x1234_5678;
    let count = 200u64;
    for i in 0..count {
        let len = 1 + (i as usize * 37) % 1472;
        let msg: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        client.send_to(&msg, ("127.0.0.1", port)).unwrap();
        let (n, from) = client.recv_from(&mut buf).expect("no echo");
        assert_eq!(from.port(), port, "reply from another port");
        assert_eq!(&buf[..n], &msg[..], "echo {i} differs");
    }
    // The counters reach the console (once a second).
    g.wait(Duration::from_secs(10), "the net counters", |l| {
        l.other
            .iter()
            .any(|x| x.starts_with("net rx=") && kv(x)["udp"] == count.to_string())
    });
    let log = Log::parse(&g.kill());
    log.assert_hb_continuous(cpus(&log));
    assert!(log.panics.is_empty());
}

#[test]
fn bad_options_are_a_boot_panic_like_the_test_guest() {
    for (opts, want) in [
        (
            "ferry.workload=busy",
            "PANIC bad cmdline: ferry.workload=busy (unknown workload; expected idle, dirty, verify, disk-log or net-echo)",
        ),
        (
            "ferry.workload=net-echo",
            "PANIC bad cmdline: ferry.workload=net-echo (net-echo requires ferry.ip=<a.b.c.d>)",
        ),
        (
            "ferry.udp_port=70000",
            "PANIC bad cmdline: ferry.udp_port=70000 (expected a port 1..=65535)",
        ),
        (
            "ferry.workload=disk-log ferry.disk=/nonexistent/vda",
            "PANIC cannot open disk /nonexistent/vda: No such file or directory (os error 2)",
        ),
    ] {
        let out = Command::new(linux_guest::PATH)
            .env(linux_guest::CMDLINE_ENV, opts)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{opts}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(text, format!("{want}\n"), "{opts}");
        let log = Log::parse(&text);
        assert!(log.boot.is_none() && log.hb.is_empty() && log.panics.len() == 1);
    }
}

#[test]
fn reset_after_ms_ends_the_process_in_process_mode() {
    let out = Command::new(linux_guest::PATH)
        .env(
            linux_guest::CMDLINE_ENV,
            "ferry.workload=idle ferry.hb_ms=20 ferry.reset_after_ms=300",
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(100));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.ends_with("reset requested\n"), "{text}");
    let log = Log::parse(&text);
    assert!(log.min_hb_per_cpu(cpus(&log)) >= 5, "{text}");
}

/// TSC kHz of this machine (QEMU's TCG gives L1, and so L2, the host's TSC).
fn host_tsc_khz() -> u64 {
    // SAFETY: rdtsc has no preconditions on x86-64.
    let tsc = || unsafe { core::arch::x86_64::_rdtsc() };
    let (t0, c0) = (Instant::now(), tsc());
    std::thread::sleep(Duration::from_millis(100));
    let (c1, ns) = (tsc(), t0.elapsed().as_nanos() as u64);
    ((c1 - c0) as u128 * 1_000_000 / u128::from(ns)) as u64
}

/// The L2 scenario: Debian's kernel with the Linux guest initramfs under `ferry-vmm run` in L1.
/// `@CMDLINE@` is the L2 kernel command line.
const L2_SCENARIO: &str = r#"
ferry-vmm run --kernel /l2/vmlinuz --initrd /l2/initrd.cpio --vcpus 1 --memory-mib 256 \
    --cmdline "@CMDLINE@" --serial-log /tmp/g.log --api-socket /tmp/g.sock > /tmp/g.out 2>&1 &
wait_for /tmp/g.log "^verify ok" 4 400 $! && result l2 ok || result l2 failed
ferry-vmm ctl --api-socket /tmp/g.sock shutdown > /dev/null 2>&1
sleep 0.5
dump /tmp/g.log
dump /tmp/g.out
"#;

/// Run with `cargo test --release -p worker --test linux_workload -- --ignored` (QEMU TCG,
/// both cores, a few minutes). In the nested SVM test host (`nested::run_l1`), Debian's stock
/// kernel boots as an L2 guest under `ferry-vmm run --kernel vmlinuz --initrd <the Linux guest
/// initramfs>` and runs `ferry-linux-guest` (verify workload): its serial log passes the same
/// checks as the test guest's. One vCPU and the TSC arguments of NESTED.md, until Ferry gives
/// Linux ACPI tables and a TSC frequency (in progress elsewhere); no modules (Debian's kernel
/// finds virtio-mmio devices only through ACPI).
#[test]
#[ignore = "nested: QEMU TCG, minutes of both cores; run with --ignored"]
fn stock_linux_in_the_nested_host_runs_the_linux_workload() {
    let c = nested::cache();
    let dir = common::tempdir();
    let initrd = dir.path().join("initrd.cpio");
    let image =
        testbed::initramfs::linux_guest(&testbed::initramfs::LinuxGuest::new(c.join("busybox")))
            .unwrap();
    std::fs::write(&initrd, image).unwrap();
    let khz = host_tsc_khz();
    let cmdline = format!(
        "console=ttyS0 quiet panic=-1 tsc_early_khz={khz} lpj={khz} no_timer_check tsc=reliable \
         mitigations=off nokaslr ferry.workload=verify ferry.wss_mib=16 ferry.hb_ms=200 \
         ferry.tsc_khz={khz}"
    );
    let scenario = L2_SCENARIO.replace("@CMDLINE@", &cmdline);
    let kernel = c.join("vmlinuz");
    let out = nested::run_l1(
        &scenario,
        &[("/l2/vmlinuz", &kernel), ("/l2/initrd.cpio", &initrd)],
        Duration::from_secs(900),
    );
    println!("L1 ran {:.0} s; results {:?}", out.seconds, out.results);
    assert!(out.done, "L1 did not finish:\n{}", out.tail(80));
    assert_eq!(out.result("kvm"), "present", "{}", out.tail(80));
    let serial = out.file("/tmp/g.log").to_string();
    assert_eq!(
        out.result("l2"),
        "ok",
        "L2 serial log:\n{}\nferry-vmm:\n{}",
        tail(&serial, 60),
        tail(out.file("/tmp/g.out"), 30)
    );
    let log = Log::parse(&serial);
    let b = boot(&log);
    assert_eq!(
        (b["os"].as_str(), b["cpus"].as_str(), b["workload"].as_str()),
        ("linux", "1", "verify"),
        "{serial}"
    );
    log.assert_hb_continuous(1);
    log.assert_no_corruption();
    assert!(log.hb_of(0).len() >= 3, "{serial}");
    assert!(verify_ok_count(&log, 0) >= 4, "{serial}");
    println!("L2 serial log (end):\n{}", tail(&serial, 25));
    assert!(
        log.other
            .iter()
            .any(|l| l == "ferry-init: starting ferry-linux-guest"),
        "{serial}"
    );
}

/// Live migration of the L2 Linux between two workers in L1 (loopback).
const L2_MIGRATION_SCENARIO: &str = r#"
FILES="/tmp/a.log /tmp/b.log /tmp/a.out /tmp/b.out /tmp/m.json"
ferry-vmm run --kernel /l2/vmlinuz --initrd /l2/initrd.cpio --vcpus 1 --memory-mib 256 \
    --cmdline "@CMDLINE@" --serial-log /tmp/a.log --api-socket /tmp/a.sock > /tmp/a.out 2>&1 &
wait_for /tmp/a.log "^verify ok" 4 400 $! && result boot ok || stop_here boot
ferry-vmm receive --listen 127.0.0.1:7001 --insecure --serial-log /tmp/b.log --api-socket /tmp/b.sock > /tmp/b.out 2>&1 &
B=$!
sleep 1
ferry-vmm ctl --api-socket /tmp/a.sock migrate --to 127.0.0.1:7001 --insecure --output json > /tmp/m.json 2>&1 && result migrate ok || stop_here migrate
wait_for /tmp/b.log "^verify ok" 4 300 $B && result after ok || stop_here after
ferry-vmm ctl --api-socket /tmp/b.sock shutdown > /dev/null 2>&1
sleep 0.5
for f in $FILES; do dump $f; done
"#;

/// Run with `cargo test --release -p worker --test linux_workload -- --ignored`. The same L2
/// Linux, live migrated between two `ferry-vmm` in L1: the checks the migration tests make on
/// the test guest hold across both serial logs (heartbeats continuous, verifier clean on both
/// sides, the switchover gap in the heartbeats).
#[test]
#[ignore = "nested: QEMU TCG, minutes of both cores; run with --ignored"]
fn stock_linux_in_the_nested_host_keeps_the_contract_across_a_live_migration() {
    let c = nested::cache();
    let dir = common::tempdir();
    let initrd = dir.path().join("initrd.cpio");
    let image =
        testbed::initramfs::linux_guest(&testbed::initramfs::LinuxGuest::new(c.join("busybox")))
            .unwrap();
    std::fs::write(&initrd, image).unwrap();
    let khz = host_tsc_khz();
    let cmdline = format!(
        "console=ttyS0 quiet panic=-1 tsc_early_khz={khz} lpj={khz} no_timer_check tsc=reliable \
         mitigations=off nokaslr ferry.workload=verify ferry.wss_mib=16 ferry.rate_mibs=8 \
         ferry.hb_ms=200 ferry.tsc_khz={khz}"
    );
    let scenario = L2_MIGRATION_SCENARIO.replace("@CMDLINE@", &cmdline);
    let kernel = c.join("vmlinuz");
    let out = nested::run_l1(
        &scenario,
        &[("/l2/vmlinuz", &kernel), ("/l2/initrd.cpio", &initrd)],
        Duration::from_secs(900),
    );
    println!("L1 ran {:.0} s; results {:?}", out.seconds, out.results);
    assert!(out.done, "L1 did not finish:\n{}", out.tail(80));
    for step in ["boot", "migrate", "after"] {
        assert_eq!(
            out.result(step),
            "ok",
            "{step} failed in L1:\n{}\nsource: {}\ndestination: {}\nmigrate: {}",
            out.tail(40),
            tail(
                out.files
                    .get("/tmp/a.log")
                    .map(|s| s.as_str())
                    .unwrap_or(""),
                20
            ),
            tail(
                out.files
                    .get("/tmp/b.log")
                    .map(|s| s.as_str())
                    .unwrap_or(""),
                20
            ),
            tail(
                out.files
                    .get("/tmp/m.json")
                    .map(|s| s.as_str())
                    .unwrap_or(""),
                5
            ),
        );
    }
    let (a, b) = (out.file("/tmp/a.log"), out.file("/tmp/b.log"));
    let all = Log::parse(&format!("{a}{b}"));
    all.assert_hb_continuous(1);
    all.assert_no_corruption();
    let before = Log::parse(a);
    let after = Log::parse(b);
    assert!(verify_ok_count(&before, 0) >= 4 && verify_ok_count(&after, 0) >= 4);
    assert!(
        after.hb_of(0).len() >= 3,
        "no heartbeats on the destination:\n{b}"
    );
    let last = out
        .file("/tmp/m.json")
        .lines()
        .rfind(|l| l.starts_with('{'))
        .unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(last).unwrap_or_default();
    assert_eq!(v["reply"], "done", "{}", out.file("/tmp/m.json"));
    let downtime = v["downtime_ms"].as_f64().unwrap();
    let gap = common::switchover_gaps_ms(a, b, 1, khz as f64)[0];
    println!(
        "migration: total {:.0} ms, downtime {downtime:.2} ms, {} passes; heartbeat gap across \
         the switchover {gap:.1} ms (hb_ms 200); pause lines {:?}",
        v["total_ms"].as_f64().unwrap_or(0.0),
        v["passes"],
        all.pauses
    );
    assert!(gap > 0.0 && gap < 10_000.0, "switchover gap {gap} ms");
}
