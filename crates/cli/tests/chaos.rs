//! `ferry chaos` with a fixed seed and a few trials (a couple of minutes): random SIGKILLs and
//! SIGSTOPs of workers and agents during migrations, drains and cancels on a real 3-node
//! cluster, every invariant checked after each trial, then a short soak of back-to-back
//! migrations without a single refusal. A failing trial prints its seed for replay
//! (`ferry chaos --seed N --trials 1 --keep`).

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn seeded_chaos_trials_and_a_short_soak_hold_every_invariant() {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: this test needs KVM"
    );
    let ferry = std::path::PathBuf::from(env!("CARGO_BIN_EXE_ferry"));
    assert!(
        ferry.with_file_name("ferry-vmm").is_file(),
        "build the worker too (cargo build -p worker, or cargo test --workspace)"
    );
    let report = tempfile::NamedTempFile::new().unwrap();
    let (seed, trials, soak) = (
        std::env::var("FERRY_CHAOS_SEED").unwrap_or_else(|_| "1000".into()),
        std::env::var("FERRY_CHAOS_TRIALS").unwrap_or_else(|_| "12".into()),
        "20",
    );
    let t0 = Instant::now();
    let out = Command::new(&ferry)
        .args([
            "chaos", "--seed", &seed, "--trials", &trials, "--soak", soak,
        ])
        .arg("--report")
        .arg(report.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "ferry chaos failed ({:.0} s): {stderr}\n{stdout}",
        t0.elapsed().as_secs_f64()
    );
    let table = std::fs::read_to_string(report.path()).unwrap();
    assert!(
        table.contains(&format!("--trials {trials}: {trials} passed, 0 failed")),
        "{table}"
    );
    assert!(table.contains("| fault | phase at the fault |"), "{table}");
    assert!(
        table.contains(" 0 refused or failed, ") && table.contains("; verifier after: ok"),
        "{table}"
    );
    assert!(t0.elapsed() < Duration::from_secs(600));
}
