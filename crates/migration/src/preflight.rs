//! Preflight: before any memory moves, the destination checks it can take the VM.
//!
//! Checks: same protocol version, a state version the destination reads (its own or the
//! previous one), same CPU vendor, every CPU feature the VM's CPUID exposes is supported by the
//! destination (the refusal names the missing ones), enough free RAM and cores, a configuration
//! it accepts. The destination also measures what its part of the
//! switchover costs (restoring and resuming a scratch VM of the same shape), so the source's
//! downtime estimate is measured, not assumed.

use serde::{Deserialize, Serialize};
use std::time::Instant;
use vmm::cpuid::{self, CpuidTable};
use vmm::memory::MemoryLayout;
use vmm::{KernelSource, Vm, VmConfig};

/// What the source tells the destination about the VM.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PreflightRequest {
    /// The format of the `STATE` frame the source will send (the destination decodes it in
    /// this version).
    pub state_version: u32,
    pub config: VmConfig,
    pub layout: MemoryLayout,
    /// The VM's CPUID (VM-wide template).
    pub cpuid: CpuidTable,
    /// Source host description, for the report.
    pub source: HostSummary,
    /// What the source sees of each disk image (same order as `config.disks`).
    pub disks: Vec<DiskView>,
}

/// A disk image as the source sees it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DiskView {
    pub bytes: u64,
    /// The VM holds the image's lock (it runs): the destination must see that lock too.
    pub locked_by_vm: bool,
}

/// A host, as preflight reports show it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct HostSummary {
    pub vendor: String,
    pub model: String,
    pub cpus: u32,
    pub free_memory_mib: u64,
    /// Name of the CPU profile the host's offer is restricted to, if any.
    pub cpu_limit_profile: Option<String>,
}

/// The destination's answer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct PreflightReport {
    pub ok: bool,
    /// Every reason the VM cannot come here (empty when ok).
    pub problems: Vec<String>,
    /// CPU features the VM uses that the destination lacks.
    pub missing_features: Vec<String>,
    pub destination: HostSummary,
    /// Measured on a scratch VM of the same vCPU count: restore of state + resume.
    pub restore_cost_us: u64,
}

/// Limits and the CPU offer of a destination.
#[derive(Debug, Clone, Default)]
pub struct DestinationLimits {
    /// Restrict what this host claims to support to a CPU profile (e.g. `baseline`), to model a
    /// host with fewer CPU features.
    pub cpu_profile: Option<String>,
    /// RAM this destination may give to the VM (default: MemAvailable).
    pub max_memory_mib: Option<u64>,
    /// vCPUs this destination may run (default: online CPUs).
    pub max_vcpus: Option<u32>,
    /// Where this host attaches a VM's NICs.
    pub net_backends: Vec<vmm::devices::virtio::NetBackend>,
}

/// Free memory (MemAvailable) in MiB.
pub fn free_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}

/// Online CPUs.
pub fn online_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

/// What this host's KVM offers, restricted to `limits.cpu_profile` if set.
pub fn host_offer(kvm: &kvm_ioctls::Kvm, limits: &DestinationLimits) -> Result<CpuidTable, String> {
    let supported = cpuid::supported(kvm).map_err(|e| e.to_string())?;
    match &limits.cpu_profile {
        Some(p) => cpuid::build(&supported, p).map_err(|e| e.to_string()),
        None => Ok(supported),
    }
}

/// This host's summary.
pub fn host_summary(kvm: &kvm_ioctls::Kvm, limits: &DestinationLimits) -> HostSummary {
    let (vendor, model) = cpuid::host_cpu_model();
    let vendor = cpuid::supported(kvm).map(|t| t.vendor()).unwrap_or(vendor);
    HostSummary {
        vendor,
        model,
        cpus: limits.max_vcpus.unwrap_or_else(online_cpus),
        free_memory_mib: limits.max_memory_mib.unwrap_or_else(free_memory_mib),
        cpu_limit_profile: limits.cpu_profile.clone(),
    }
}

/// Runs every destination check. Never fails: problems go into the report.
pub fn check(
    kvm: &kvm_ioctls::Kvm,
    req: &PreflightRequest,
    limits: &DestinationLimits,
) -> PreflightReport {
    let mut problems = Vec::new();
    let mut missing_features = Vec::new();
    let dest = host_summary(kvm, limits);
    if !vmm::snapshot::reads_version(req.state_version) {
        problems.push(format!(
            "VM state version {} is not supported here (this destination reads versions {}-{})",
            req.state_version,
            crate::wire::MIN_STATE_VERSION,
            crate::wire::STATE_VERSION
        ));
    }
    if let Err(e) = req.config.validate() {
        problems.push(format!("VM configuration refused: {e}"));
    }
    if let Err(e) = req.layout.validate(req.config.memory_bytes().max(1)) {
        problems.push(format!("VM memory layout refused: {e}"));
    } else if req.layout.total_bytes() != req.config.memory_bytes() {
        problems.push("VM memory layout does not match its configured size".into());
    }
    match host_offer(kvm, limits) {
        Ok(offer) => {
            if req.cpuid.vendor() != offer.vendor() {
                problems.push(format!(
                    "CPU vendor differs: the VM runs on {}, this destination is {}",
                    req.cpuid.vendor(),
                    offer.vendor()
                ));
            }
            missing_features = cpuid::missing_features(&req.cpuid, &offer);
            if !missing_features.is_empty() {
                problems.push(format!(
                    "destination CPU lacks features the VM uses: {}",
                    missing_features.join(", ")
                ));
            }
        }
        Err(e) => problems.push(format!("cannot read this host's CPU features: {e}")),
    }
    if req.config.memory_mib > dest.free_memory_mib {
        problems.push(format!(
            "not enough memory: the VM needs {} MiB, the destination has {} MiB free",
            req.config.memory_mib, dest.free_memory_mib
        ));
    }
    if req.config.vcpus as u32 > dest.cpus {
        problems.push(format!(
            "not enough cores: the VM has {} vCPUs, the destination offers {}",
            req.config.vcpus, dest.cpus
        ));
    }
    check_storage(req, &mut problems);
    check_network(req, limits, &mut problems);
    PreflightReport {
        ok: problems.is_empty(),
        problems,
        missing_features,
        destination: dest,
        restore_cost_us: 0,
    }
}

/// Every disk must be reachable here, as the same file the source uses: same size, and the lock
/// the running VM holds on it must be visible from here (otherwise this host sees a different
/// file, or locks do not reach across hosts and exclusive ownership could not be enforced).
fn check_storage(req: &PreflightRequest, problems: &mut Vec<String>) {
    if req.disks.len() != req.config.disks.len() {
        problems.push(format!(
            "the source described {} disks for a VM with {}",
            req.disks.len(),
            req.config.disks.len()
        ));
        return;
    }
    for (d, view) in req.config.disks.iter().zip(&req.disks) {
        match vmm::devices::virtio::block::probe_image(&d.path, d.read_only) {
            Err(e) => problems.push(format!("shared storage not reachable from here: {e}")),
            Ok(p) if p.size != view.bytes => problems.push(format!(
                "disk {}: the source sees {} bytes, this host {} bytes (not the same file?)",
                d.path.display(),
                view.bytes,
                p.size
            )),
            Ok(p) if view.locked_by_vm && !d.read_only && !p.locked_elsewhere => {
                problems.push(format!(
                    "disk {}: the source VM's lock on the image is not visible from here (not the same shared storage, or its locks do not reach this host)",
                    d.path.display()
                ))
            }
            Ok(_) => {}
        }
    }
}

/// Every NIC needs a backend here, and a bridge backend's bridge must exist.
fn check_network(req: &PreflightRequest, limits: &DestinationLimits, problems: &mut Vec<String>) {
    use vmm::devices::virtio::{HostDevices, NetBackend};
    if req.config.nics.is_empty() {
        return;
    }
    match HostDevices::for_nics(&limits.net_backends, req.config.nics.len()) {
        Err(e) => problems.push(format!("network: {e}")),
        Ok(h) => {
            for b in &h.nets {
                if let NetBackend::Bridge(br) = b {
                    if !vmm::devices::tap::interface_exists(br) {
                        problems.push(format!("network: bridge {br} does not exist on this host"));
                    }
                }
            }
        }
    }
}

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
    let b = prepared.finish(&state, out).map_err(|e| e.to_string())?;
    b.start().map_err(|e| e.to_string())?;
    let us = t0.elapsed().as_micros() as u64;
    b.stop();
    Ok(us)
}
