//! Stock Linux guests in the nested host: the L2 initramfs with `ferry-linux-guest`, and what
//! their serial logs say (disk records, kernel-log checks, migration summaries).
#![allow(dead_code)]

use crate::common::{kv, Log};
use std::path::{Path, PathBuf};

/// Debian's kernel (from the nested cache) and an initramfs with busybox `/init`, the virtio
/// modules and `ferry-linux-guest` (`testbed::initramfs::linux_guest`), written into `dir`.
pub fn guest(dir: &Path) -> (PathBuf, PathBuf) {
    let c = super::cache();
    let order = std::fs::read_to_string(c.join("l2mods/order")).unwrap();
    let mods: Vec<_> = order
        .split_whitespace()
        .map(|m| c.join("l2mods").join(format!("{m}.ko")))
        .collect();
    let initrd = dir.join("initrd.cpio");
    let image = testbed::initramfs::linux_guest(
        &testbed::initramfs::LinuxGuest::new(c.join("busybox")).modules(mods),
    )
    .unwrap();
    std::fs::write(&initrd, image).unwrap();
    (c.join("vmlinuz"), initrd)
}

#[allow(unused_imports)] // (not every test binary reads disk logs)
pub use testbed::disk_seqs;

/// The `kmsg check=<n> bad=<k> date=<s>` lines of a log as (bad, date), and its `kmsg bad:`
/// lines.
pub fn kmsg(log: &Log) -> (Vec<(u64, i64)>, Vec<String>) {
    let checks = log
        .other
        .iter()
        .filter(|l| l.starts_with("kmsg check="))
        .map(|l| {
            let m = kv(l);
            (m["bad"].parse().unwrap(), m["date"].parse().unwrap())
        })
        .collect();
    let bad = log
        .other
        .iter()
        .filter(|l| l.starts_with("kmsg bad:"))
        .cloned()
        .collect();
    (checks, bad)
}

/// One known note at boot: Linux's tracing picks its "global" clock when sched_clock is not
/// marked stable, which kvm-clock does when the host's KVM does not flag its clock
/// PVCLOCK_TSC_STABLE_BIT (no master clock: L1's clocksource under QEMU TCG). It is printed,
/// not hidden.
pub const KMSG_NOTE: &str = "Unstable clock detected, switching default tracing clock";

/// The kernel log of one guest across its workers' serial logs (in order): no clock, TSC,
/// lockup or RCU warning, checked in each worker (`ferry.kmsg_check`), and (unless `may_lack`)
/// at least one check per worker. Returns the notes it saw.
pub fn assert_kmsg_clean(guest: &str, logs: &[&str], may_lack: bool) -> Vec<String> {
    let mut said = Vec::new();
    for (i, text) in logs.iter().enumerate() {
        let (checks, bad) = kmsg(&Log::parse(text));
        said.extend(bad);
        let notes = said.iter().filter(|l| l.contains(KMSG_NOTE)).count() as u64;
        let real: Vec<&String> = said.iter().filter(|l| !l.contains(KMSG_NOTE)).collect();
        assert!(
            real.is_empty(),
            "{guest} (worker {}): kernel said {real:?}",
            i + 1
        );
        assert!(
            checks.iter().all(|(b, _)| *b <= notes),
            "{guest} (worker {}): kernel warnings {checks:?}, said {said:?}",
            i + 1
        );
        assert!(
            may_lack || !checks.is_empty(),
            "{guest} (worker {}): no kmsg check line:\n{text}",
            i + 1
        );
    }
    said
}

/// The last JSON line of a `--output json` migration.
pub fn migration_line(json: &str) -> serde_json::Value {
    let last = json.lines().rfind(|l| l.starts_with('{')).unwrap_or("");
    serde_json::from_str(last).unwrap_or_default()
}

/// `verify ok` lines of one CPU.
pub fn verify_ok_on(log: &Log, cpu: &str) -> usize {
    log.verify_ok.iter().filter(|m| m["cpu"] == cpu).count()
}

/// The disk log across a guest's workers (`text`, their serial logs in order): no panic, no
/// disk error, records acknowledged 1, 2, 3, ... Returns the last one acknowledged.
pub fn assert_disk_log_in_order(text: &str) -> u64 {
    let l = Log::parse(text);
    assert!(l.panics.is_empty(), "{:?}", l.panics);
    assert!(!text.contains("disk ERROR"), "{text}");
    let acked = disk_seqs(text);
    for (i, s) in acked.iter().enumerate() {
        assert_eq!(*s, i as u64 + 1, "records acknowledged out of order");
    }
    *acked.last().expect("no record acknowledged")
}

/// The next boot of the disk (`reboot`, its serial log) found every acknowledged record (and
/// at most the one in flight when the VM stopped) and carries on after it. Returns how many
/// it found.
pub fn assert_reboot_found(acked: u64, reboot: &str) -> u64 {
    let l = Log::parse(reboot);
    let check = l
        .other
        .iter()
        .find(|x| x.starts_with("disk ok") || x.starts_with("disk CORRUPT"))
        .unwrap_or_else(|| panic!("no boot check in the new boot:\n{reboot}"));
    let on_disk: u64 = check
        .strip_prefix("disk ok last=")
        .unwrap_or_else(|| panic!("boot check: {check}"))
        .parse()
        .unwrap();
    assert!(
        (acked..=acked + 1).contains(&on_disk),
        "{on_disk} records on disk, {acked} acknowledged"
    );
    assert_eq!(disk_seqs(reboot).first(), Some(&(on_disk + 1)), "{reboot}");
    on_disk
}
