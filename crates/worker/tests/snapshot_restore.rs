//! Snapshots taken at random moments restore in a fresh process and the guest just continues:
//! the verifier stays ok and every heartbeat counter carries on by exactly one. And the check can
//! fail: a flipped byte or a stale page spliced into a snapshot is reported by the guest for
//! exactly that page.

mod common;
use common::*;
use rand::Rng;
use std::path::Path;
use std::time::Duration;
use vmm::memory::PAGE_SIZE;

#[test]
fn twenty_random_snapshot_restores_keep_verify_ok_and_heartbeats_continuous() {
    let dir = tempdir();
    let d = dir.path();
    let mut rng = rand::thread_rng();
    let vcpus = 2u32;
    let mut w = Worker::run_guest(
        d,
        "gen0",
        vcpus as u8,
        128,
        "ferry.workload=verify ferry.wss_mib=32 ferry.hb_ms=20",
    );
    w.wait_log(Duration::from_secs(60), "first sweep", |l| {
        l.verify_ok_cpus().len() == vcpus as usize
    });
    // The guest's serial output across all generations, in order.
    let mut history = String::new();
    let mut last_gen = 0u64;
    for i in 1..=20 {
        std::thread::sleep(Duration::from_millis(rng.gen_range(30..400)));
        w.ctl(&["pause"]);
        let snap = d.join(format!("s{i}.snap"));
        let r = w.ctl(&["snapshot", snap.to_str().unwrap()]);
        assert_eq!(r["state"], "paused");
        history.push_str(&w.log());
        let out = w.shutdown();
        assert!(out.status.success());
        w = Worker::restore(d, &format!("gen{i}"), &snap);
        std::fs::remove_file(&snap).unwrap();
        // Wait until every vCPU made progress in the new process.
        let before = Log::parse(&history);
        let need: Vec<u64> = (0..vcpus)
            .map(|c| before.hb_of(c).last().unwrap().counter + 2)
            .collect();
        let combined_ok = |extra: &str| {
            let l = Log::parse(&(history.clone() + extra));
            (0..vcpus)
                .all(|c| l.hb_of(c).last().map(|h| h.counter).unwrap_or(0) >= need[c as usize])
        };
        let t0 = std::time::Instant::now();
        while !combined_ok(&w.log()) {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "restore {i}: guest made no progress:\n{}",
                tail(&w.log(), 20)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let l = Log::parse(&(history.clone() + &w.log()));
        l.assert_hb_continuous(vcpus);
        l.assert_no_corruption();
        let g = l
            .verify_ok
            .iter()
            .filter_map(|m| m["gen"].parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        assert!(g >= last_gen, "verify generation went backwards");
        last_gen = g;
    }
    // Let the last generation complete a few more sweeps.
    let sweeps = Log::parse(&w.log()).verify_ok.len();
    let l = w.wait_log(Duration::from_secs(60), "more sweeps", |l| {
        l.verify_ok.len() >= sweeps + 2 * vcpus as usize
    });
    l.assert_no_corruption();
    let all = Log::parse(&(history + &w.log()));
    all.assert_hb_continuous(vcpus);
    assert!(
        all.verify_ok.len() > 40,
        "expected many verify sweeps, got {}",
        all.verify_ok.len()
    );
    w.shutdown();
}

/// Pauses `w`, snapshots it to `path`, returns the log so far.
fn paused_snapshot(w: &Worker, path: &Path) -> Log {
    w.ctl(&["pause"]);
    w.ctl(&["snapshot", path.to_str().unwrap()]);
    Log::parse(&w.log())
}

fn ram_page_of(state: &vmm::vm::MachineState, gpa: u64) -> u64 {
    state.layout.page_index(gpa).expect("WSS page is in RAM")
}

/// Restores `snap` and waits until the guest has checked its whole working set (every CPU
/// completed two more sweeps), returning the log.
fn restore_and_sweep(d: &Path, name: &str, snap: &Path) -> Log {
    let w = Worker::restore(d, name, snap);
    let first = w.wait_log(Duration::from_secs(60), "a CORRUPT report", |l| {
        !l.corrupt.is_empty()
    });
    let seen = first.verify_ok.len() + first.verify_bad.len();
    // Three more sweep reports: the whole working set was checked again after the report.
    let log = w.wait_log(Duration::from_secs(60), "three more sweeps", |l| {
        l.verify_ok.len() + l.verify_bad.len() >= seen + 3
    });
    w.shutdown();
    log
}

#[test]
fn flipped_byte_is_reported_for_exactly_that_page() {
    let dir = tempdir();
    let d = dir.path();
    let w = Worker::run_guest(
        d,
        "src",
        1,
        64,
        "ferry.workload=verify ferry.wss_mib=8 ferry.hb_ms=20",
    );
    w.wait_log(Duration::from_secs(30), "a sweep", |l| {
        l.verify_ok.len() >= 2
    });
    let snap = d.join("a.snap");
    let log = paused_snapshot(&w, &snap);
    log.assert_no_corruption();
    w.shutdown();
    let (gpa, pages) = log.wss.unwrap();
    let (state, mut sparse) = vmm::snapshot::load_sparse(&snap).unwrap();
    let mut rng = rand::thread_rng();
    let victim = rng.gen_range(0..pages);
    let byte = rng.gen_range(0..PAGE_SIZE as usize);
    let idx = ram_page_of(&state, gpa + victim * PAGE_SIZE);
    let page = sparse
        .pages
        .iter_mut()
        .find(|(i, _)| *i == idx)
        .expect("WSS page is non-zero");
    page.1[byte] ^= 0x40;
    let edited = d.join("edited.snap");
    vmm::snapshot::write(&edited, &state, &sparse).unwrap();

    let log = restore_and_sweep(d, "edited", &edited);
    assert_eq!(
        log.corrupt.len(),
        1,
        "expected exactly one CORRUPT line: {:?}",
        log.corrupt
    );
    assert_eq!(
        log.corrupt[0]["page"],
        victim.to_string(),
        "flipped byte {byte} of page {victim}: {:?}",
        log.corrupt[0]
    );
}

#[test]
fn stale_page_from_an_older_snapshot_is_reported() {
    let dir = tempdir();
    let d = dir.path();
    let w = Worker::run_guest(
        d,
        "src",
        1,
        64,
        "ferry.workload=verify ferry.wss_mib=8 ferry.hb_ms=20",
    );
    w.wait_log(Duration::from_secs(30), "a sweep", |l| {
        l.verify_ok.len() >= 2
    });
    let old = d.join("old.snap");
    let log_old = paused_snapshot(&w, &old);
    let (gpa, pages) = log_old.wss.unwrap();
    let (state_old, old_pages) = vmm::snapshot::load_sparse(&old).unwrap();
    // The newest generation any WSS page holds in the old snapshot, read from the pages
    // themselves: the log lags the guest ("verify ok" is printed at most once per heartbeat
    // interval, and a CPU can finish several generations in between).
    let gen_of = |data: &[u8]| u64::from_le_bytes(data[8..16].try_into().unwrap());
    let old_page = |i: u64| {
        let idx = ram_page_of(&state_old, gpa + i * PAGE_SIZE);
        let p = old_pages.pages.iter().find(|(j, _)| *j == idx);
        p.expect("WSS page is in the snapshot").1.clone()
    };
    let gen_old = (0..pages).map(|i| gen_of(&old_page(i))).max().unwrap();
    w.ctl(&["resume"]);
    // Run until the writer is two generations past the newest old page: every page rewritten.
    w.wait_log(Duration::from_secs(60), "two more generations", |l| {
        l.verify_ok
            .last()
            .map(|m| m["gen"].parse::<u64>().unwrap() >= gen_old + 2)
            .unwrap_or(false)
    });
    let new = d.join("new.snap");
    paused_snapshot(&w, &new);
    w.shutdown();
    let (state, mut sparse) = vmm::snapshot::load_sparse(&new).unwrap();
    let victim = rand::thread_rng().gen_range(0..pages);
    let idx = ram_page_of(&state, gpa + victim * PAGE_SIZE);
    let stale = old_page(victim);
    let page = sparse.pages.iter_mut().find(|(i, _)| *i == idx).unwrap();
    assert_ne!(
        page.1, stale,
        "page {victim} was not rewritten between the snapshots"
    );
    page.1 = stale; // an older, self-consistent version: exactly what a missed dirty page looks like
    let spliced = d.join("spliced.snap");
    vmm::snapshot::write(&spliced, &state, &sparse).unwrap();

    let log = restore_and_sweep(d, "spliced", &spliced);
    assert_eq!(
        log.corrupt.len(),
        1,
        "expected exactly one CORRUPT line: {:?}",
        log.corrupt
    );
    let c = &log.corrupt[0];
    assert_eq!(c["page"], victim.to_string());
    assert!(
        c["found_gen"].parse::<u64>().unwrap() < c["expected_gen"].parse::<u64>().unwrap(),
        "{c:?}"
    );
    assert_eq!(
        c["checksum"], "ok",
        "a stale page is self-consistent: {c:?}"
    );
}

#[test]
fn a_version_2_snapshot_restores_in_a_fresh_process_and_the_guest_carries_on() {
    let dir = tempdir();
    let d = dir.path();
    let vcpus = 2u32;
    let w = Worker::run_guest(
        d,
        "src",
        vcpus as u8,
        64,
        "ferry.workload=verify ferry.wss_mib=8 ferry.hb_ms=20",
    );
    w.wait_log(Duration::from_secs(60), "a sweep on every vCPU", |l| {
        l.verify_ok_cpus().len() == vcpus as usize
    });
    let snap = d.join("v3.snap");
    let before = paused_snapshot(&w, &snap);
    let history = w.log();
    w.shutdown();
    // The same VM as the previous build (state format 2) would have saved it.
    let (state, sparse) = vmm::snapshot::load_sparse(&snap).unwrap();
    let v2 = d.join("v2.snap");
    vmm::snapshot::write_versioned(&v2, 2, &state, &sparse).unwrap();
    assert_eq!(vmm::snapshot::Reader::open(&v2).unwrap().version(), 2);

    let w = Worker::restore(d, "restored", &v2);
    let need: Vec<u64> = (0..vcpus)
        .map(|c| before.hb_of(c).last().unwrap().counter + 3)
        .collect();
    let sweeps = before.verify_ok.len();
    w.wait_log(Duration::from_secs(60), "the guest to go on", |l| {
        l.verify_ok.len() >= 2 * vcpus as usize
            && (0..vcpus)
                .all(|c| l.hb_of(c).last().map(|h| h.counter).unwrap_or(0) >= need[c as usize])
    });
    let all = Log::parse(&(history + &w.log()));
    all.assert_hb_continuous(vcpus);
    all.assert_no_corruption();
    assert!(all.verify_ok.len() >= sweeps + 2 * vcpus as usize);
    let out = w.shutdown();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("(format v2)"), "{stdout}");
}
