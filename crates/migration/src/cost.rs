//! The fixed cost of a switchover on this host, measured rather than assumed: pausing a VM and
//! capturing + encoding its state (the source's share, [`save_cost`]) and loading a state into a
//! prepared VM and starting it (the destination's share, [`restore_cost`]), each on a scratch VM
//! of the migrating VM's shape. The engine adds both (and the Ready/Commit/Resumed round trips)
//! to the memory part of its downtime estimate.
//!
//! Measurements are kept per process and in the host's cost cache (per kernel and binary), so a
//! fresh worker never makes a migration wait for one unless the host has none yet.

use std::time::{Duration, Instant};
use vmm::{KernelSource, Vm, VmConfig};

static RESTORE_COSTS: CostMemo = std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Costs measured by this process: vCPUs -> µs.
pub(crate) type CostMemo = std::sync::Mutex<std::collections::BTreeMap<u8, u64>>;

/// This host's switchover share for a VM with `vcpus` vCPUs, in µs (see
/// [`measure_restore_cost`]); see [`host_cost`] for how it is kept.
pub fn restore_cost(vcpus: u8) -> Result<u64, String> {
    host_cost("restore", vcpus, &RESTORE_COSTS, measure_best_of_three)
}

/// A fixed cost of this host (`kind`: "restore", "save") for `vcpus` vCPUs, in µs: measured
/// once per process and remembered; a fresh process (a `receive` worker started for one
/// migration, which later becomes a source) takes the value this host measured last from the
/// host's cost cache (same kernel, same binary) and measures again in the background when
/// that value is old, so a migration never waits for a measurement unless the host has none.
/// Concurrent callers share one measurement.
pub(crate) fn host_cost(
    kind: &'static str,
    vcpus: u8,
    memo: &'static CostMemo,
    measure: fn(u8) -> Result<u64, String>,
) -> Result<u64, String> {
    static MEASURING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let cached = |memo: &CostMemo| {
        memo.lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&vcpus)
            .copied()
    };
    let remember = move |us: u64| {
        memo.lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(vcpus, us);
        cost_file::store(kind, vcpus, us);
    };
    if let Some(us) = cached(memo) {
        return Ok(us);
    }
    if let Some((us, age)) = cost_file::load(kind, vcpus) {
        memo.lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(vcpus, us);
        if age >= cost_file::REFRESH_AFTER {
            // Refresh later, off the migration that needs the value now: measuring competes
            // for the CPUs a switchover uses.
            let _ = std::thread::Builder::new()
                .name("cost-refresh".into())
                .spawn(move || {
                    std::thread::sleep(std::time::Duration::from_secs(5));
                    let _g = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
                    if let Ok(us) = measure(vcpus) {
                        remember(us);
                    }
                });
        }
        return Ok(us);
    }
    let _g = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(us) = cached(memo) {
        return Ok(us); // measured by another thread meanwhile
    }
    let us = measure(vcpus)?;
    remember(us);
    Ok(us)
}

/// The best of three measurements: the machine may be busy at the moment of one.
fn measure_best_of_three(vcpus: u8) -> Result<u64, String> {
    let kvm = vmm::open_kvm().map_err(|e| e.to_string())?;
    let mut us = u64::MAX;
    for _ in 0..3 {
        us = us.min(measure_restore_cost(&kvm, vcpus)?);
    }
    Ok(us)
}

/// The host's cost cache: a small JSON file (see `path()`: a runtime directory only this
/// user can write) holding the last measurement per kind and vCPU count, valid only
/// for the kernel and the `ferry-vmm` binary that measured it. Anything unreadable, foreign
/// or implausible is ignored (and replaced by the next measurement).
mod cost_file {
    use std::collections::BTreeMap;
    use std::path::PathBuf;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    /// A stored value older than this is measured again (in the background).
    pub(super) const REFRESH_AFTER: Duration = Duration::from_secs(600);

    /// Largest plausible value (1 s): anything above is not a measurement of ours.
    const MAX_US: u64 = 1_000_000;

    #[derive(serde::Serialize, serde::Deserialize, Default)]
    struct CostFile {
        key: String,
        /// "kind/vCPUs" -> (µs, measured at: seconds since the epoch).
        costs: BTreeMap<String, (u64, u64)>,
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    /// `$FERRY_COST_CACHE`, else `$XDG_RUNTIME_DIR/ferry-costs.json`, else (root)
    /// `/run/ferry/costs.json` in a directory only root can write; otherwise no cache. Never a
    /// predictable name in a world-writable directory: workers run as root.
    fn path() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("FERRY_COST_CACHE") {
            return Some(PathBuf::from(p));
        }
        if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
            return Some(PathBuf::from(d).join("ferry-costs.json"));
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            use std::os::unix::fs::DirBuilderExt;
            let d = PathBuf::from("/run/ferry");
            let _ = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d);
            return Some(d.join("costs.json"));
        }
        None
    }

    /// Kernel release + this binary (path, size, modification time) + format version.
    fn key() -> String {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let exe = std::env::current_exe().ok();
        let meta = exe.as_ref().and_then(|e| std::fs::metadata(e).ok());
        let mtime = meta
            .as_ref()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!(
            "v2|{}|{}|{}|{mtime}",
            release.trim(),
            exe.map(|e| e.display().to_string()).unwrap_or_default(),
            meta.map(|m| m.len()).unwrap_or(0)
        )
    }

    fn read() -> Option<CostFile> {
        let f: CostFile = serde_json::from_slice(&std::fs::read(path()?).ok()?).ok()?;
        (f.key == key()).then_some(f)
    }

    /// The stored value and its age.
    pub(super) fn load(kind: &str, vcpus: u8) -> Option<(u64, Duration)> {
        let (us, at) = read()?.costs.get(&format!("{kind}/{vcpus}")).copied()?;
        (us > 0 && us <= MAX_US).then(|| (us, Duration::from_secs(now().saturating_sub(at))))
    }

    /// Best effort: a host whose temp dir is not writable just measures in every process.
    pub(super) fn store(kind: &str, vcpus: u8, us: u64) {
        let mut f = read().unwrap_or_else(|| CostFile {
            key: key(),
            ..Default::default()
        });
        f.costs.insert(format!("{kind}/{vcpus}"), (us, now()));
        let Some(p) = path() else { return };
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        let Ok(bytes) = serde_json::to_vec(&f) else {
            return;
        };
        // A fresh file (O_EXCL: never through a link someone left there), then an atomic rename.
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt;
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut t| t.write_all(&bytes));
        if written.is_err() || std::fs::rename(&tmp, &p).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

/// Measures the restore cost for these vCPU counts in the background (a `receive` worker does
/// this at start, off the migration's critical path).
pub fn warm_restore_costs(vcpus: Vec<u8>) {
    let _ = std::thread::Builder::new()
        .name("cost-probe".into())
        .spawn(move || {
            for v in vcpus {
                let _ = restore_cost(v);
            }
        });
}

/// This host's fixed share of a switchover, measured: a scratch VM with `vcpus` vCPUs is saved,
/// a second one is prepared (not timed, a destination does that during pre-copy), and loading
/// the state into it and starting it is timed.
pub fn measure_restore_cost(kvm: &kvm_ioctls::Kvm, vcpus: u8) -> Result<u64, String> {
    let cfg = VmConfig {
        vcpus,
        memory_mib: vmm::config::MIN_MEMORY_MIB,
        kernel: KernelSource::TestGuest,
        initrd: None,
        cmdline: "ferry.workload=idle".into(),
        cpu_profile: "host".into(),
        disks: vec![],
        nics: vec![],
    };
    let devnull = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .map_err(|e| e.to_string())
    };
    let a = Vm::create(kvm, cfg, &Default::default(), devnull()?).map_err(|e| e.to_string())?;
    let state = a.save_state().map_err(|e| e.to_string())?;
    drop(a);
    let ram = std::sync::Arc::new(
        vmm::memory::GuestRam::new(state.layout.clone()).map_err(|e| e.to_string())?,
    );
    let prepared = Vm::prepare(kvm, &state.config, &state.cpuid, ram, &Default::default())
        .map_err(|e| e.to_string())?;
    let out = devnull()?;
    let t0 = Instant::now();
    let b = prepared
        .finish(&state, out, vmm::vm::GuestTime::Elapsed)
        .map_err(|e| e.to_string())?;
    b.start().map_err(|e| e.to_string())?;
    let us = t0.elapsed().as_micros() as u64;
    b.stop();
    Ok(us)
}

static SAVE_COSTS: CostMemo = std::sync::Mutex::new(std::collections::BTreeMap::new());

/// This host's cost of pausing a VM with `vcpus` vCPUs and capturing + encoding its state,
/// measured on a scratch VM (best of three) and kept like the restore cost
/// ([`host_cost`]).
pub fn save_cost(vcpus: u8) -> Duration {
    let measure = |vcpus: u8| -> Result<u64, String> {
        let kvm = vmm::open_kvm().map_err(|e| e.to_string())?;
        Ok((0..3)
            .map(|_| measure_save_cost(&kvm, vcpus))
            .min()
            .unwrap_or_default()
            .as_micros() as u64)
    };
    host_cost("save", vcpus, &SAVE_COSTS, measure)
        .map(Duration::from_micros)
        .unwrap_or(Duration::from_millis(1))
}

/// Measures [`save_cost`] in the background (a worker does this at start, off the critical
/// path of a later migration).
pub fn warm_save_cost(vcpus: u8) {
    warm_save_cost_after(vcpus, Duration::ZERO);
}

/// Like [`warm_save_cost`], after `delay` (a VM that just resumed here should not compete with
/// a measurement in its first moments).
pub fn warm_save_cost_after(vcpus: u8, delay: Duration) {
    let _ = std::thread::Builder::new()
        .name("cost-probe".into())
        .spawn(move || {
            std::thread::sleep(delay);
            save_cost(vcpus);
        });
}

/// Time to pause a VM of this shape and capture + encode its state, measured on a scratch VM.
fn measure_save_cost(kvm: &kvm_ioctls::Kvm, vcpus: u8) -> Duration {
    let cfg = vmm::VmConfig {
        vcpus,
        memory_mib: vmm::config::MIN_MEMORY_MIB,
        kernel: vmm::KernelSource::TestGuest,
        initrd: None,
        cmdline: "ferry.workload=idle".into(),
        cpu_profile: "host".into(),
        disks: vec![],
        nics: vec![],
    };
    let Ok(devnull) = std::fs::OpenOptions::new().write(true).open("/dev/null") else {
        return Duration::from_millis(1);
    };
    let Ok(vm) = Vm::create(kvm, cfg, &Default::default(), devnull) else {
        return Duration::from_millis(1);
    };
    if vm.start().is_err() {
        return Duration::from_millis(1);
    }
    // Measure a VM whose vCPUs are really running, as the migrating one's are.
    let deadline = Instant::now() + Duration::from_millis(200);
    while vm.running_vcpus() < vcpus as usize && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
    std::thread::sleep(Duration::from_millis(1));
    let t = Instant::now();
    let ok = vm.pause().is_ok()
        && vm
            .save_state()
            .ok()
            .and_then(|s| vmm::snapshot::encode_state(&s).ok())
            .is_some();
    let d = t.elapsed();
    vm.stop();
    if ok {
        d
    } else {
        Duration::from_millis(1)
    }
}
