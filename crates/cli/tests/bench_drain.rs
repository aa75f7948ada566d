//! `ferry bench-drain` runs its drains on real clusters and reports every concurrency: each
//! row moved every VM, none failed, and no drain ran more migrations at once than it was given.

use std::process::Command;

#[test]
fn bench_drain_moves_every_vm_at_each_concurrency_and_reports_it() {
    let report = tempfile::NamedTempFile::new().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["bench-drain", "--vms", "3", "--memory-mib", "64"])
        .args(["--concurrency", "1,2", "--report"])
        .arg(report.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(report.path()).unwrap().trim(),
        text.trim()
    );
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
