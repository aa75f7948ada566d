//! Ferry on two ordinary KVM hosts: two nested SVM L1 hosts (`tests/nested/mod.rs`), each a
//! QEMU TCG machine with its own clock, TSC and address, joined by a QEMU datagram link
//! (virtio-net). Host B's clock is set to host A's over that link (`ferry clock`, as NTP would
//! on real hosts); the hosts' TSCs are left as they are (they differ: each L1's TSC counts from
//! its own QEMU's start) and measured.
//!
//! The test guest goes A -> B -> A between bare workers: heartbeats continue, the verifier stays
//! clean, its TSC never goes backwards, and the pause it measures with its own TSC matches the
//! downtime the engine reports.

mod common;
mod nested;

use common::{switchover_gaps_ms, Log};
use nested::{L1Opts, Link, L1};
use std::time::Duration;

/// Shared by both hosts: addresses, the clock server, the binaries' sibling `ferry`.
const COMMON: &str = r#"
A=10.99.0.1; B=10.99.0.2
FILES="/tmp/a.log /tmp/l.log /tmp/b.log /tmp/c.log /tmp/a.out /tmp/l.out /tmp/b.out /tmp/c.out /tmp/m0.json /tmp/m1.json /tmp/m2.json /tmp/clock.txt"
tsc_line() { result tsc-$1 "$(ferry-vmm host-info | sed -n 's/^tsc now: \([0-9]*\) at realtime \([0-9]*\) ns/\1 \2/p')"; result tsc-khz "$(ferry-vmm host-info | sed -n 's/^tsc: \([0-9]*\) kHz.*/\1/p')"; }
G="ferry.workload=verify ferry.wss_mib=16 ferry.hb_ms=50"
GUEST="--kernel test-guest --vcpus 1 --memory-mib 128"
# What runs in L2 (nested::host_failure reads a page fault in the test guest as the emulator's).
result l2 test-guest
"#;

const HOST_A: &str = r#"
PEER=$B
net_up $A || stop_here net
ferry clock serve --listen $A:8123 &
signal up
await $B synced 180 || stop_here clock
tsc_line a
ferry-vmm run $GUEST --cmdline "$G" \
    --serial-log /tmp/a.log --api-socket /tmp/a.sock > /tmp/a.out 2>&1 &
wait_for /tmp/a.log "^verify ok" 2 600 $! && result boot ok || stop_here boot
ferry-vmm ctl --api-socket /tmp/a.sock status > /tmp/sa.json
# First a move inside host A (the same-host comparison), then across.
ferry-vmm receive --insecure --verify-state --listen 127.0.0.1:7001 --serial-log /tmp/l.log --api-socket /tmp/l.sock > /tmp/l.out 2>&1 &
L=$!
sleep 1
ferry-vmm ctl --api-socket /tmp/a.sock migrate --to 127.0.0.1:7001 --insecure --output json > /tmp/m0.json 2>&1 && result migrate0 ok || stop_here migrate0
wait_for /tmp/l.log "^verify ok" 2 240 $L && result after0 ok || stop_here after0
ferry-vmm ctl --api-socket /tmp/l.sock status > /tmp/sl.json
await $B ready1 120 || stop_here ready1
ferry-vmm ctl --api-socket /tmp/l.sock migrate --to $B:7000 --insecure --output json > /tmp/m1.json 2>&1 && result migrate1 ok || stop_here migrate1
ferry-vmm receive --insecure --verify-state --listen $A:7000 --serial-log /tmp/c.log --api-socket /tmp/c.sock > /tmp/c.out 2>&1 &
C=$!
sleep 1
signal ready2
await $B sent2 300 || stop_here sent2
wait_for /tmp/c.log "^verify ok" 2 240 $C && result after2 ok || stop_here after2
ferry-vmm ctl --api-socket /tmp/c.sock status > /tmp/sc.json
ferry-vmm ctl --api-socket /tmp/c.sock shutdown > /dev/null
for f in /tmp/a.log /tmp/l.log /tmp/c.log /tmp/m0.json /tmp/m1.json /tmp/l.out /tmp/c.out /tmp/sa.json /tmp/sl.json /tmp/sc.json; do dump $f; done
"#;

const HOST_B: &str = r#"
PEER=$A
net_up $B || stop_here net
await $A up 180 || stop_here peer
ferry clock offset $A:8123 --set > /tmp/clock.txt 2>&1 || stop_here clock
ferry clock offset $A:8123 >> /tmp/clock.txt 2>&1
result clock "$(tail -1 /tmp/clock.txt)"
tsc_line b
signal synced
ferry-vmm receive --insecure --verify-state --listen $B:7000 --serial-log /tmp/b.log --api-socket /tmp/b.sock > /tmp/b.out 2>&1 &
R=$!
sleep 1
signal ready1
wait_for /tmp/b.log "^verify ok" 2 300 $R && result after1 ok || stop_here after1
ferry-vmm ctl --api-socket /tmp/b.sock status > /tmp/sb.json
await $A ready2 120 || stop_here ready2
ferry-vmm ctl --api-socket /tmp/b.sock migrate --to $A:7000 --insecure --output json > /tmp/m2.json 2>&1 && result migrate2 ok || stop_here migrate2
signal sent2
sleep 3
for f in /tmp/b.log /tmp/m2.json /tmp/clock.txt /tmp/b.out /tmp/sb.json; do dump $f; done
"#;

/// Boots host A, then (2 s later, so that its TSC is behind A's) host B, each with one CPU,
/// 1.5 GiB, `bins` and the scenario after [`COMMON`]; waits for both.
fn two_hosts(
    a: &str,
    b: &str,
    bins: &[std::path::PathBuf],
) -> (nested::L1Output, nested::L1Output) {
    two_hosts_with_files(a, b, bins, &[])
}

/// [`two_hosts`] with `files` (path inside → file here) in both hosts.
fn two_hosts_with_files(
    a: &str,
    b: &str,
    bins: &[std::path::PathBuf],
    files: &[(&str, &std::path::Path)],
) -> (nested::L1Output, nested::L1Output) {
    // One pair of L1 hosts at a time: each takes a core of these 2-core machines.
    static ONE_BED: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _bed = ONE_BED.lock().unwrap_or_else(|e| e.into_inner());
    let dir = common::tempdir();
    let (sa, sb) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let opts = |local: &std::path::Path, remote: &std::path::Path, mac: &str| L1Opts {
        smp: 1,
        memory_mib: 1536,
        bins: bins.to_vec(),
        link: Some(Link {
            local: local.to_path_buf(),
            remote: remote.to_path_buf(),
            mac: mac.into(),
        }),
        append: String::new(),
    };
    // A pair in which a test host failed (nested::host_failure) runs again (nested::HOST_ATTEMPTS).
    let mut attempt = 1;
    let t0 = std::time::Instant::now();
    loop {
        let _ = std::fs::remove_file(&sa);
        let _ = std::fs::remove_file(&sb);
        let ha = L1::boot(
            &format!("{COMMON}{a}"),
            files,
            &opts(&sa, &sb, "52:54:00:99:00:01"),
        );
        std::thread::sleep(Duration::from_secs(2));
        let hb = L1::boot(
            &format!("{COMMON}{b}"),
            files,
            &opts(&sb, &sa, "52:54:00:99:00:02"),
        );
        let timeout = Duration::from_secs(1500);
        // A host that failed ends its peer's wait too (the peer would wait for it until its
        // own timeout: a killed host cannot say it failed).
        let stop = std::sync::atomic::AtomicBool::new(false);
        let run = |h: L1| {
            let o = h.wait_or_stop(timeout, &stop);
            if o.host_failure.is_some() {
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            o
        };
        let (oa, ob) = std::thread::scope(|s| {
            let ta = s.spawn(|| run(ha));
            let tb = s.spawn(|| run(hb));
            (ta.join().unwrap(), tb.join().unwrap())
        });
        let failed = [&oa, &ob]
            .into_iter()
            .find_map(|o| o.host_failure.clone().map(|w| (o, w)));
        match failed {
            Some((o, why))
                if attempt < nested::HOST_ATTEMPTS && t0.elapsed() < nested::HOST_RETRY_BUDGET =>
            {
                nested::report_host_failure(attempt, &why, o);
                attempt += 1;
            }
            _ => return (oa, ob),
        }
    }
}

fn assert_steps(oa: &nested::L1Output, ob: &nested::L1Output, a: &[&str], b: &[&str]) {
    for (name, o, steps) in [("A", oa, a), ("B", ob, b)] {
        assert!(o.done, "host {name} did not finish:\n{}", o.tail(60));
        assert_eq!(o.result("kvm"), "present");
        for st in steps {
            assert_eq!(
                o.results.get(*st).map(|s| s.as_str()),
                Some("ok"),
                "host {name}: {st}:\nA:\n{}\nB:\n{}\nfiles A {:?}\nfiles B {:?}",
                oa.tail(30),
                ob.tail(30),
                oa.files,
                ob.files
            );
        }
    }
}

fn summary(out: &nested::L1Output, file: &str) -> serde_json::Value {
    let last = out
        .file(file)
        .lines()
        .rfind(|l| l.starts_with('{'))
        .unwrap_or("");
    serde_json::from_str(last).unwrap_or_default()
}

/// About 70 s of two L1 hosts (`cargo test --release -p worker --test nested_two_hosts`).
#[test]
fn test_guest_moves_between_two_hosts_and_keeps_its_time() {
    let (oa, ob) = two_hosts(HOST_A, HOST_B, &[nested::ferry_bin()]);
    println!(
        "A ran {:.0} s {:?}\nB ran {:.0} s {:?}",
        oa.seconds, oa.results, ob.seconds, ob.results
    );
    assert_steps(
        &oa,
        &ob,
        &["boot", "migrate0", "after0", "migrate1", "after2"],
        &["after1", "migrate2"],
    );
    check_moves(&oa, &ob, 50.0, false);
}

/// The checks of a guest moved A -> A -> B -> A by [`HOST_A`] and [`HOST_B`] (heartbeats every
/// `hb_ms`): heartbeats continuous, verifier clean and running on every stay, the pause the
/// guest saw bounded by the downtime, and its TSC lead over the host exact. With `jitter` the
/// bound on the pause also allows the longest heartbeat gap the guest saw while it was not
/// moving (beyond one period): a Linux guest's heartbeat thread waits for its scheduler and
/// timer, which a single-CPU TCG host delays by hundreds of milliseconds at any time; and the
/// lead back on A is compared with the lead after the move inside A (see below).
fn check_moves(oa: &nested::L1Output, ob: &nested::L1Output, hb_ms: f64, jitter: bool) {
    // The hosts' TSCs at the same wall-clock instant (B's clock set to A's).
    let pair = |o: &nested::L1Output, k: &str| -> (f64, f64) {
        let v: Vec<f64> = o
            .result(k)
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        (v[0], v[1])
    };
    let khz: f64 = oa.result("tsc-khz").parse().unwrap();
    let (ta, ra) = pair(oa, "tsc-a");
    let (tb, rb) = pair(ob, "tsc-b");
    let skew_s = ((tb - ta) - (rb - ra) / 1e6 * khz) / khz / 1e3;
    println!(
        "host clocks: {}; TSC of B minus A at the same instant: {skew_s:.3} s (A {} kHz, B {} kHz)",
        ob.result("clock"),
        khz,
        ob.result("tsc-khz")
    );
    assert!(
        skew_s.abs() > 0.5,
        "the two hosts' TSCs do not differ ({skew_s:.3} s): the bed does not test time across hosts"
    );

    let (la, ll, lb, lc) = (
        oa.file("/tmp/a.log"),
        oa.file("/tmp/l.log"),
        ob.file("/tmp/b.log"),
        oa.file("/tmp/c.log"),
    );
    let all = Log::parse(&format!("{la}{ll}{lb}{lc}"));
    all.assert_no_corruption();
    // Counters continue by one and the guest's TSC only goes forward across both moves.
    all.assert_hb_continuous(1);
    for (n, l) in [("A, moved inside A", ll), ("B", lb), ("A again", lc)] {
        assert_eq!(
            Log::parse(l).verify_ok_cpus().len(),
            1,
            "on {n} the verifier did not run"
        );
    }
    let guest_khz: f64 = Log::parse(la).boot.expect("boot line")["tsc_khz"]
        .parse()
        .unwrap();
    for (m, before, after, o) in [
        ("/tmp/m0.json", la, ll, oa),
        ("/tmp/m1.json", ll, lb, oa),
        ("/tmp/m2.json", lb, lc, ob),
    ] {
        let s = summary(o, m);
        assert_eq!(s["reply"], "done", "{m}: {}", o.file(m));
        let downtime = s["downtime_ms"].as_f64().unwrap();
        let gaps = switchover_gaps_ms(before, after, 1, guest_khz);
        let hb = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| l.starts_with("hb "))
                .map(String::from)
                .collect()
        };
        let (hb_b, hb_a) = (hb(before), hb(after));
        let out = if m.ends_with("m2.json") {
            oa.file("/tmp/c.out")
        } else if m.ends_with("m1.json") {
            ob.file("/tmp/b.out")
        } else {
            oa.file("/tmp/l.out")
        };
        println!("{m}: destination said: {}", out.replace('\n', " | "));
        println!(
            "{m}: heartbeats around the switchover: {:?} | {:?}; downtime by phase {}; max throttle {}%",
            &hb_b[hb_b.len().saturating_sub(3)..],
            &hb_a[..hb_a.len().min(3)],
            s["downtime"],
            s["max_throttle_pct"]
        );
        println!(
            "{m}: total {:.0} ms, downtime {downtime:.1} ms, {} passes; guest-seen heartbeat gaps {gaps:.1?} ms (interval {hb_ms} ms)",
            s["total_ms"].as_f64().unwrap_or(0.0),
            s["passes"]
        );
        // The pause the guest measured with its own TSC: at least the gap minus the heartbeat
        // interval. It also holds what the engine cannot see: a line being printed when the
        // pause came (each character is an exit to L1 under TCG) and the destination's KVM
        // mapping the guest's memory again on first touch (thousands of nested page faults at
        // TCG speed): 100-300 ms here, once 665 ms (a run of 2026-12-02 whose bound was 400 ms
        // over downtime and the stand-still jitter), never seconds like the hosts' TSC
        // difference (2.2-2.7 s in this bed), which is what the bound is for: 1 s over them.
        // The longest gap between two heartbeats within one stay (by the guest's TSC).
        let still_ms = if jitter {
            [la, ll, lb, lc]
                .iter()
                .flat_map(|t| {
                    Log::parse(t)
                        .hb_of(0)
                        .windows(2)
                        .map(|w| (w[1].tsc - w[0].tsc) as f64 / guest_khz)
                        .collect::<Vec<f64>>()
                })
                .fold(0.0, f64::max)
                - hb_ms
        } else {
            0.0
        };
        for (c, g) in gaps.iter().enumerate() {
            let seen = g - hb_ms;
            println!(
                "{m}: cpu {c}: the guest saw a {seen:.1} ms pause; downtime {downtime:.1} ms; \
                 longest extra gap while not moving {still_ms:.1} ms"
            );
            assert!(
                seen < downtime + 1000.0 + still_ms,
                "{m}: cpu {c}: the guest saw a {seen:.1} ms pause, the engine reported {downtime:.1} ms \
                 (and {still_ms:.1} ms while not moving)"
            );
        }
    }
    // Exactly: vCPU 0's TSC minus the host's, read when each worker loaded the VM. Back on
    // the same host it is what it was (the guest lost and gained no time over two moves
    // across hosts and one inside A); on B it differs from A's by the hosts' TSC difference.
    let lead = |o: &nested::L1Output, f: &str| -> f64 {
        let v: serde_json::Value = serde_json::from_str(o.file(f).trim()).unwrap_or_default();
        v["vm"]["guest_tsc_lead"]
            .as_i64()
            .unwrap_or_else(|| panic!("{f}: no guest_tsc_lead: {}", o.file(f))) as f64
    };
    let ms = |ticks: f64| ticks / khz;
    let (a0, l0, b0, c0) = (
        lead(oa, "/tmp/sa.json"),
        lead(oa, "/tmp/sl.json"),
        lead(ob, "/tmp/sb.json"),
        lead(oa, "/tmp/sc.json"),
    );
    println!(
        "guest TSC lead over its host: A {:.3} ms, A after a move inside A {:+.3} ms, B {:+.3} ms (hosts' TSC difference {:+.3} ms), A again {:+.3} ms",
        ms(a0),
        ms(l0 - a0),
        ms(b0 - a0),
        -skew_s * 1e3,
        ms(c0 - a0)
    );
    // A Linux guest's lead read when its first worker started it is no baseline: measured
    // 0.4-18 ms off the lead after the move inside A, while the moves after it agree within
    // 1 ms (cause not established: Linux's boot-time TSC handling, or KVM's TSC sync at
    // vCPU creation). Its A -> B -> A is then checked from the lead on A before it left.
    let base = if jitter { l0 } else { a0 };
    if !jitter {
        assert!(
            ms(l0 - a0).abs() < 5.0,
            "a move inside host A changed the guest's time by {:.3} ms",
            ms(l0 - a0)
        );
    }
    assert!(
        ms(c0 - base).abs() < 5.0,
        "after A -> B -> A the guest's time is off by {:.3} ms",
        ms(c0 - base)
    );
    assert!(
        (ms(b0 - a0) + skew_s * 1e3).abs() < 10.0,
        "on B the guest's TSC is {:.3} ms ahead of where it was on A, the hosts differ by {:.3} ms",
        ms(b0 - a0),
        -skew_s * 1e3
    );
}

/// The Linux guest for [`HOST_A`]: Debian's kernel and the Linux guest initramfs (files
/// `/l2/vmlinuz`, `/l2/initrd.cpio`), one vCPU (each L1 has one CPU), 256 MiB, `console=ttyS0
/// quiet` and ferry.* options only; the kernel log and `date +%s` every 2 s (`kmsg check`).
const LINUX_GUEST: &str = r#"
G="console=ttyS0 quiet ferry.workload=verify ferry.wss_mib=16 ferry.rate_mibs=8 ferry.hb_ms=200 ferry.kmsg_check=2"
GUEST="--kernel /l2/vmlinuz --initrd /l2/initrd.cpio --vcpus 1 --memory-mib 256"
result l2 linux
"#;

/// About 90 s of two L1 hosts (`cargo test --release -p worker --test nested_two_hosts --
/// --nocapture linux`; needs `cargo build --release -p cli` for `ferry`).
#[test]
fn linux_guest_moves_between_two_hosts_and_keeps_its_time() {
    let c = nested::cache();
    let dir = common::tempdir();
    let order = std::fs::read_to_string(c.join("l2mods/order")).unwrap();
    let mods: Vec<_> = order
        .split_whitespace()
        .map(|m| c.join("l2mods").join(format!("{m}.ko")))
        .collect();
    let initrd = dir.path().join("initrd.cpio");
    let image = testbed::initramfs::linux_guest(
        &testbed::initramfs::LinuxGuest::new(c.join("busybox")).modules(mods),
    )
    .unwrap();
    std::fs::write(&initrd, image).unwrap();
    let kernel = c.join("vmlinuz");
    let (oa, ob) = two_hosts_with_files(
        &format!("{LINUX_GUEST}{HOST_A}"),
        &format!("{LINUX_GUEST}{HOST_B}"),
        &[nested::ferry_bin()],
        &[("/l2/vmlinuz", &kernel), ("/l2/initrd.cpio", &initrd)],
    );
    println!(
        "A ran {:.0} s {:?}\nB ran {:.0} s {:?}",
        oa.seconds, oa.results, ob.seconds, ob.results
    );
    assert_steps(
        &oa,
        &ob,
        &["boot", "migrate0", "after0", "migrate1", "after2"],
        &["after1", "migrate2"],
    );
    let boot = Log::parse(oa.file("/tmp/a.log")).boot.expect("boot line");
    assert_eq!((boot["os"].as_str(), boot["cpus"].as_str()), ("linux", "1"));
    check_moves(&oa, &ob, 200.0, true);
    // The guest's wall clock (`date +%s` every 2 s, with the kernel log's warnings so far)
    // across all four stays, against the guest's TSC (which the checks above show exact):
    // date minus the TSC of the heartbeat before it stays the same, within the date's
    // 1 s resolution plus how late the line came after that heartbeat (up to a second on
    // this bed). A clock that jumped at a move (by the hosts' 2.3 s TSC difference, say)
    // would show.
    let khz: f64 = Log::parse(oa.file("/tmp/a.log")).boot.unwrap()["tsc_khz"]
        .parse()
        .unwrap();
    let mut offsets = Vec::new();
    for (name, o, f) in [
        ("A", &oa, "/tmp/a.log"),
        ("A, moved inside A", &oa, "/tmp/l.log"),
        ("B", &ob, "/tmp/b.log"),
        ("A again", &oa, "/tmp/c.log"),
    ] {
        let l = Log::parse(o.file(f));
        let bad: Vec<&String> = l
            .other
            .iter()
            .filter(|x| x.starts_with("kmsg bad:"))
            .collect();
        assert!(bad.is_empty(), "on {name} the kernel said {bad:?}");
        let mut checks = 0;
        let mut last_tsc = None;
        // Complete lines only: the last one may have been cut by the move (it ends in the next
        // host's log) or by the collection (a `date=17963106` of a cut `1796310687` once).
        let text = o.file(f);
        let complete = &text[..text.rfind('\n').map(|i| i + 1).unwrap_or(0)];
        for line in complete.lines() {
            let w: Vec<&str> = line.split_whitespace().collect();
            if w.len() == 4 && w[0] == "hb" {
                last_tsc = w[3].parse::<u64>().ok();
            } else if line.starts_with("kmsg check=") {
                let m = common::kv(line);
                assert_eq!(m["bad"], "0", "on {name}: kernel warnings: {line}");
                checks += 1;
                if let (Some(t), Ok(d)) = (last_tsc, m["date"].parse::<i64>()) {
                    offsets.push(d as f64 - t as f64 / khz / 1e3);
                }
            }
        }
        assert!(checks > 0, "on {name}: no kmsg check:\n{}", o.file(f));
    }
    let (lo, hi) = offsets
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
    println!(
        "guest date +%s minus its TSC over {} readings on A, A, B, A: spread {:.2} s",
        offsets.len(),
        hi - lo
    );
    assert!(
        offsets.len() >= 8 && hi - lo <= 2.5,
        "the guest's wall clock moved against its TSC: {offsets:.2?}"
    );
}

/// A real cluster across the two hosts: etcd and an agent on A, an agent on B, `ferry vm
/// migrate` through the agents A -> B -> A, then A -> B again while B's agent is killed -9
/// (and restarted 2 s later) in the middle.
const CLUSTER_A: &str = r#"
FILES="/tmp/agent-a.log /tmp/etcd.out /tmp/create.out /tmp/m1.json /tmp/m2.json /tmp/m3.json /tmp/show.txt /tmp/nodes.txt"
PEER=$B
net_up $A || stop_here net
ferry clock serve --listen $A:8123 &
etcd --data-dir /tmp/etcd --name a --listen-client-urls http://$A:2379 --advertise-client-urls http://$A:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster a=http://127.0.0.1:2380 > /tmp/etcd.out 2>&1 &
w=0; until wget -q -O /dev/null http://$A:2379/health; do w=$((w+1)); [ $w -gt 240 ] && stop_here etcd; sleep 0.5; done
ferry agent --node host-a --listen $A:7100 --store etcd://$A:2379 --data-dir /tmp/fa > /tmp/agent-a.log 2>&1 &
F="ferry --agent $A:7100"
w=0; until $F node list > /dev/null 2>&1; do w=$((w+1)); [ $w -gt 240 ] && stop_here agent; sleep 0.5; done
signal up
await $B agent 300 || stop_here peer-agent
printf 'name = "alpha"\nvcpus = 1\nmemory_mib = 128\ncmdline = "%s"\n' "$G" > /tmp/alpha.toml
$F vm create /tmp/alpha.toml > /tmp/create.out 2>&1 && $F vm start alpha >> /tmp/create.out 2>&1 || stop_here start
S=/tmp/fa/vms/alpha/console/serial.log
wait_for $S "^verify ok" 2 240 && result boot ok || stop_here boot
$F node list > /tmp/nodes.txt 2>&1
$F --output json vm migrate alpha --to host-b > /tmp/m1.json 2>&1 && result migrate1 ok || stop_here migrate1
cp $S /tmp/a1.log
await $B after1 300 || stop_here after1
$F --output json vm migrate alpha --to host-a > /tmp/m2.json 2>&1 && result migrate2 ok || stop_here migrate2
wait_for $S "^verify ok" 2 240 && result after2 ok || stop_here after2
signal back
signal kill3
$F --output json vm migrate alpha --to host-b > /tmp/m3.json 2>&1; result migrate3-rc $?
cp $S /tmp/a2.log
await $B restarted 300 || stop_here restarted
# Converged: the store names one owner, the VM runs, no migration in flight.
w=0
until $F vm show alpha > /tmp/show.txt 2>&1 && grep -q "state running on" /tmp/show.txt && ! grep -q "migration in progress" /tmp/show.txt; do
  w=$((w+1)); [ $w -gt 240 ] && stop_here converge; sleep 0.5
done
OWNER=$(sed -n 's/.*state running on \([a-z-]*\).*/\1/p' /tmp/show.txt | head -1)
result owner "$OWNER"
signal owner "$OWNER"
[ "$OWNER" = host-a ] && { wait_for $S "^verify ok" 2 240 && cp $S /tmp/a3.log && result after3 ok || stop_here after3; }
result workers-a "$(grep -l 'vms/alph[a]/api.sock' /proc/[0-9]*/cmdline 2>/dev/null | wc -l)"
await $B counted 300 || stop_here counted
result workers-b "$(cat /tmp/await.counted)"
for f in /tmp/a1.log /tmp/a2.log /tmp/a3.log /tmp/m1.json /tmp/m2.json /tmp/m3.json /tmp/show.txt /tmp/nodes.txt; do [ -e $f ] && dump $f; done
signal done
sleep 5
"#;

const CLUSTER_B: &str = r#"
FILES="/tmp/agent-b.log /tmp/clock.txt"
PEER=$A
net_up $B || stop_here net
await $A up 300 || stop_here peer
ferry clock offset $A:8123 --set > /tmp/clock.txt 2>&1 || stop_here clock
result clock "$(ferry clock offset $A:8123)"
AGENT="ferry agent --node host-b --listen $B:7100 --store etcd://$A:2379 --data-dir /tmp/fb"
$AGENT > /tmp/agent-b.log 2>&1 &
AG=$!
F="ferry --agent $B:7100"
w=0; until $F node list > /dev/null 2>&1; do w=$((w+1)); [ $w -gt 240 ] && stop_here agent; sleep 0.5; done
signal agent
S=/tmp/fb/vms/alpha/console/serial.log
w=0; until [ -e $S ]; do w=$((w+1)); [ $w -gt 600 ] && stop_here arrive1; sleep 0.5; done
wait_for $S "^verify ok" 2 300 && result after1 ok || stop_here after1
signal after1
await $A back 600 || stop_here back
cp $S /tmp/b1.log
await $A kill3 600 || stop_here kill3
# Kill the destination agent while the migration runs, restart it 2 s later.
sleep 1.5
kill -9 $AG; result killed-at "$(cat /proc/uptime)"
sleep 2
$AGENT >> /tmp/agent-b.log 2>&1 &
signal restarted
await $A owner 400 || stop_here owner
OWNER=$(cat /tmp/await.owner)
[ "$OWNER" = host-b ] && { wait_for $S "^verify ok" 2 240 && cp $S /tmp/b3.log && result after3 ok || stop_here after3; }
# Give a receiver that lost its migration time to go (reconciliation), then count.
sleep 5
signal counted "$(grep -l 'vms/alph[a]/api.sock' /proc/[0-9]*/cmdline 2>/dev/null | wc -l)"
await $A done 300
for f in /tmp/b1.log /tmp/b3.log /tmp/agent-b.log; do [ -e $f ] && dump $f; done
"#;

/// About 100 s of two L1 hosts.
#[test]
fn cluster_across_two_hosts_with_etcd_survives_a_destination_agent_kill() {
    let etcd = std::path::PathBuf::from("/usr/bin/etcd");
    assert!(
        etcd.is_file(),
        "etcd is missing: scripts/install-deps.sh installs it"
    );
    let (oa, ob) = two_hosts(CLUSTER_A, CLUSTER_B, &[nested::ferry_bin(), etcd]);
    println!(
        "A ran {:.0} s {:?}\nB ran {:.0} s {:?}",
        oa.seconds, oa.results, ob.seconds, ob.results
    );
    assert_steps(
        &oa,
        &ob,
        &["boot", "migrate1", "migrate2", "after2"],
        &["after1"],
    );
    let nodes = oa.file("/tmp/nodes.txt");
    assert!(
        nodes.contains("host-a") && nodes.contains("host-b"),
        "{nodes}"
    );
    // After the kill: one owner, the VM runs there (verifier going), and exactly one worker
    // for it on the two hosts together.
    let owner = oa.result("owner").to_string();
    let o = if owner == "host-a" { &oa } else { &ob };
    assert_eq!(
        o.result("after3"),
        "ok",
        "the VM does not run on its owner {owner}"
    );
    let workers: u32 = oa.result("workers-a").parse::<u32>().unwrap()
        + oa.result("workers-b").parse::<u32>().unwrap();
    assert_eq!(
        workers,
        1,
        "workers for the VM: A {}, B {} (owner {owner})",
        oa.result("workers-a"),
        oa.result("workers-b")
    );
    println!(
        "migration 3 with B's agent killed: exit {} , owner {owner}",
        oa.result("migrate3-rc")
    );
    // The guest ran on through every move: one heartbeat sequence, no corruption.
    // The serial logs in the order the guest wrote them: A, B, A (a3 holds all of A's second
    // stay if the VM stayed there, a2 its part up to the third move otherwise), B.
    let logs = if owner == "host-a" {
        [
            oa.file("/tmp/a1.log"),
            ob.file("/tmp/b1.log"),
            oa.file("/tmp/a3.log"),
        ]
        .concat()
    } else {
        [
            oa.file("/tmp/a1.log"),
            ob.file("/tmp/b1.log"),
            oa.file("/tmp/a2.log"),
            ob.file("/tmp/b3.log"),
        ]
        .concat()
    };
    let all = Log::parse(&logs);
    all.assert_no_corruption();
    all.assert_hb_continuous(1);
    for m in ["/tmp/m1.json", "/tmp/m2.json"] {
        println!("{m}: {}", oa.file(m).lines().last().unwrap_or(""));
    }
}
