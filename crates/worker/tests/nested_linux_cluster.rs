//! A stock Linux guest as a cluster VM on an ordinary KVM (the nested SVM test host,
//! `tests/nested/mod.rs`, docs/NESTED.md): one L1 runs two node agents on one SQLite store
//! (`/tmp/shared` is the storage both reach), and the VM spec names Debian's kernel, the Linux
//! guest initramfs (`initrd`) and a raw disk image on the shared storage. `ferry vm create`,
//! `vm start`, then `ferry vm migrate` node1 -> node2 -> node1 through the agents while the
//! guest's disk log writes records (O_DIRECT|O_DSYNC on /dev/vda) and its heartbeats run on
//! both vCPUs. Checked: each move succeeds, records acknowledged in order across the three
//! workers, heartbeats exact, no clock/TSC/lockup/RCU warning in the kernel log of any worker,
//! the store names node1 with one worker for the VM in L1; then `vm stop` + `vm start` boots
//! the disk again and its boot check finds every acknowledged record.

mod common;
mod nested;

use common::Log;
use nested::linux::{
    assert_disk_log_in_order, assert_kmsg_clean, assert_reboot_found, disk_seqs, migration_line,
};
use std::time::Duration;

const SCENARIO: &str = r#"
FILES="/tmp/n1/vms/linux/console/serial.log /tmp/n2/vms/linux/console/serial.log /tmp/n1.log /tmp/n2.log /tmp/create.out /tmp/m1.json /tmp/m2.json /tmp/show.txt /tmp/stop.out /tmp/l1.log /tmp/l2.log /tmp/l3.log /tmp/l4.log"
mkdir -p /tmp/shared
dd if=/dev/zero of=/tmp/shared/disk.img bs=1M count=8 2>/dev/null
for n in 1 2; do
  ferry agent --node node$n --listen 127.0.0.1:710$n --store sqlite:///tmp/cluster.db \
      --data-dir /tmp/n$n --storage /tmp/shared --boot-root /l2 > /tmp/n$n.log 2>&1 &
done
F="ferry --agent 127.0.0.1:7101"
w=0; until $F node list 2>/dev/null | grep -q node2; do w=$((w+1)); [ $w -gt 240 ] && stop_here agents; sleep 0.5; done
D="console=ttyS0 quiet ferry.workload=disk-log ferry.disk_rate=20 ferry.hb_ms=200 ferry.kmsg_check=5"
printf 'name = "linux"\nvcpus = 2\nmemory_mib = 256\nkernel = "/l2/vmlinuz"\ninitrd = "/l2/initrd.cpio"\ncmdline = "%s"\n[[disks]]\npath = "/tmp/shared/disk.img"\n' "$D" > /tmp/linux.toml
timeout 60 $F vm create /tmp/linux.toml > /tmp/create.out 2>&1 && timeout 60 $F vm start linux >> /tmp/create.out 2>&1 || stop_here start
S1=/tmp/n1/vms/linux/console/serial.log; S2=/tmp/n2/vms/linux/console/serial.log
# The PID of the VM's worker on node N (the agent starts it): a wait ends when it exits.
wpid() { for p in /proc/[0-9]*; do grep -q "/tmp/n$1/vms/linu[x]/api.sock" $p/cmdline 2>/dev/null && { echo ${p#/proc/}; return; }; done; }
W=$(wpid 1)
wait_for $S1 "^disk seq=" 20 600 $W && wait_for $S1 "^kmsg check" 2 120 $W && result boot ok || stop_here boot
timeout 300 $F --output json vm migrate linux --to node2 > /tmp/m1.json 2>&1 && result migrate1 ok || stop_here migrate1
cp $S1 /tmp/l1.log
W=$(wpid 2)
wait_for $S2 "^disk seq=" 20 300 $W && wait_for $S2 "^kmsg check" 2 120 $W && result after1 ok || stop_here after1
timeout 300 $F --output json vm migrate linux --to node1 > /tmp/m2.json 2>&1 && result migrate2 ok || stop_here migrate2
cp $S2 /tmp/l2.log
W=$(wpid 1)
wait_for $S1 "^disk seq=" 20 300 $W && wait_for $S1 "^kmsg check" 2 120 $W && result after2 ok || stop_here after2
timeout 30 $F vm show linux > /tmp/show.txt 2>&1
result workers "$(grep -l 'vms/linu[x]/api.sock' /proc/[0-9]*/cmdline 2>/dev/null | wc -l)"
# Stop (the guest gets no warning: as a crash would, no flush asked) and boot the disk again.
timeout 60 $F vm stop linux > /tmp/stop.out 2>&1 || stop_here stop
cp $S1 /tmp/l3.log
timeout 60 $F vm start linux >> /tmp/stop.out 2>&1 || stop_here restart
wait_for $S1 "^disk seq=" 5 600 $(wpid 1) && result reboot ok || stop_here reboot
cp $S1 /tmp/l4.log
timeout 60 $F vm stop linux >> /tmp/stop.out 2>&1
for f in $FILES; do dump $f; done
"#;

/// About 4 minutes of L1 (`cargo test --release -p worker --test nested_linux_cluster --
/// --nocapture`; needs target/release/ferry, which the workspace test build makes).
#[test]
fn stock_linux_from_a_vm_spec_migrates_through_two_agents_and_keeps_its_disk() {
    let dir = common::tempdir();
    let (kernel, initrd) = nested::linux::guest(dir.path());
    let out = nested::run_l1_with(
        SCENARIO,
        &[("/l2/vmlinuz", &kernel), ("/l2/initrd.cpio", &initrd)],
        &nested::L1Opts {
            bins: vec![nested::ferry_bin()],
            ..Default::default()
        },
        Duration::from_secs(1800),
    );
    println!("L1 ran {:.0} s; results {:?}", out.seconds, out.results);
    assert!(out.done, "L1 did not finish:\n{}", out.tail(80));
    assert_eq!(out.result("kvm"), "present", "{}", out.tail(80));
    let f = |p: &str| out.files.get(p).map(String::as_str).unwrap_or("");
    let tails = || {
        let mut s = String::new();
        for (name, body) in &out.files {
            let l: Vec<&str> = body.lines().collect();
            s += &format!(
                "--- {name}\n{}\n",
                l[l.len().saturating_sub(15)..].join("\n")
            );
        }
        s
    };
    for step in ["boot", "migrate1", "after1", "migrate2", "after2", "reboot"] {
        assert_eq!(
            out.result(step),
            "ok",
            "step {step} failed in L1 ({:?}):\n{}",
            out.results,
            tails()
        );
    }
    // (`vm migrate` exits 0 only for a migration whose record says it succeeded.)
    for m in ["/tmp/m1.json", "/tmp/m2.json"] {
        let v = migration_line(f(m));
        assert!(v.is_object(), "{m}: {}", f(m));
        println!("{m}: {v}");
    }
    // The store: node1 owns the VM, it runs there, nothing in flight; one worker in L1.
    let show = f("/tmp/show.txt");
    assert!(show.contains("state running on node1"), "{show}");
    assert!(!show.contains("migration in progress"), "{show}");
    assert_eq!(out.result("workers"), "1", "{show}");

    // One guest across three workers: the kernel booted once, heartbeats exact on both vCPUs,
    // records acknowledged in order, no disk error, kernel logs clean in each worker.
    let (l1, l2, l3, l4) = (
        f("/tmp/l1.log"),
        f("/tmp/l2.log"),
        f("/tmp/l3.log"),
        f("/tmp/l4.log"),
    );
    let boot = Log::parse(l1).boot.expect("no boot line");
    assert_eq!(
        (boot["os"].as_str(), boot["cpus"].as_str()),
        ("linux", "2"),
        "{l1}"
    );
    let text = format!("{l1}{l2}{l3}");
    let all = Log::parse(&text);
    all.assert_hb_continuous(2);
    let acked = assert_disk_log_in_order(&text);
    for (name, l) in [("node1", l1), ("node2", l2), ("node1 again", l3)] {
        assert!(
            !disk_seqs(l).is_empty(),
            "{name}: no record acknowledged:\n{l}"
        );
    }
    let said = assert_kmsg_clean("linux", &[l1, l2, l3], false);
    println!("kernel log notes {said:?}");
    // The next boot of the disk finds every acknowledged record (and at most the one in
    // flight when the VM was stopped), and carries on after it.
    let on_disk = assert_reboot_found(acked, l4);
    println!(
        "{acked} records acknowledged over two migrations, the next boot found {on_disk}; {} heartbeats, pauses {:?}",
        all.hb.len(),
        all.pauses
    );
}
