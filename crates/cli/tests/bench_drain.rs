//! `ferry bench-drain` runs its drains on real clusters and reports every concurrency: each
//! row moved every VM, none failed, and no drain ran more migrations at once than it was given.

mod common;
use common::ferry_report;

#[test]
fn bench_drain_moves_every_vm_at_each_concurrency_and_reports_it() {
    let text = ferry_report(&[
        "bench-drain",
        "--vms",
        "3",
        "--memory-mib",
        "64",
        "--concurrency",
        "1,2",
    ]);
    for c in [1, 2] {
        let row = text
            .lines()
            .find(|l| l.starts_with(&format!("| {c} | ")))
            .unwrap_or_else(|| panic!("no row for concurrency {c}: {text}"));
        let f: Vec<&str> = row.split('|').map(str::trim).collect();
        assert_eq!((f[3], f[4]), ("3", "0"), "moved, failed: {row}");
        let at_once: usize = f[5].parse().unwrap();
        assert!((1..=c).contains(&at_once), "{row}");
        let worst: f64 = f[6].trim_end_matches(" ms").parse().unwrap();
        assert!(worst > 0.0, "{row}");
    }
}
