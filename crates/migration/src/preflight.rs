//! Preflight: before any memory moves, the destination checks it can take the VM.
//!
//! Checks: same protocol version, a state version the destination reads (its own or the
//! previous one), same CPU vendor, every CPU feature the VM's CPUID exposes is supported by the
//! destination (the refusal names the missing ones), enough free RAM and cores, a configuration
//! it accepts. The destination also measures what its part of the
//! switchover costs (restoring and resuming a scratch VM of the same shape), so the source's
//! downtime estimate is measured, not assumed.

use serde::{Deserialize, Serialize};
use vmm::cpuid::{self, CpuidTable};
use vmm::memory::MemoryLayout;
use vmm::VmConfig;

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

pub use contract::{HostSummary, PreflightReport};

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
    /// The only VM configuration this destination takes (its agent's plan, from the cluster
    /// store); `None`: any the source offers (a standalone receiver).
    pub expected: Option<VmConfig>,
}

pub use vmm::host::{free_memory_mib, online_cpus};

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
    if let Some(e) = &limits.expected {
        // Not the planned VM: refused before anything on this host is opened for it.
        let p = binding_problems(e, &req.config);
        if !p.is_empty() {
            return PreflightReport {
                ok: false,
                problems: p,
                missing_features,
                destination: dest,
                restore_cost_us: 0,
            };
        }
    }
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
                    "destination CPU lacks features the VM uses: {} (to move it here, stop the VM and start it again with a CPU profile both hosts offer: `baseline`, or `cluster` in a Ferry cluster)",
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
    check_tsc(kvm, req, &mut problems);
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

/// Where the configuration a source offers differs from the one this destination's agent
/// planned (`expected`, from the cluster store): each difference by name. Empty: bound.
///
/// The CPU profile's *name* is not compared (a node resolves `cluster` or a limited `host` to
/// its own feature list); what the VM's CPU exposes is checked feature by feature against this
/// host in [`check`] either way.
pub fn binding_problems(expected: &VmConfig, offered: &VmConfig) -> Vec<String> {
    let mut p: Vec<String> = config_differences(expected, offered)
        .into_iter()
        .map(|(what, e, o)| format!("the source offers {what} {o}, this node's plan says {e}"))
        .collect();
    if !p.is_empty() {
        p.insert(
            0,
            "the offered VM is not the one this node's agent planned to receive".into(),
        );
    }
    p
}

/// Where two VM configurations differ in what a host opens and runs for them (vCPUs, memory,
/// kernel, initrd, command line, disks, NICs; not the CPU profile's name): `(what, expected,
/// found)` for each.
pub fn config_differences(
    expected: &VmConfig,
    offered: &VmConfig,
) -> Vec<(&'static str, String, String)> {
    let mut p = Vec::new();
    let mut differs = |what: &'static str, e: String, o: String| {
        if e != o {
            p.push((what, e, o));
        }
    };
    differs(
        "vCPUs",
        expected.vcpus.to_string(),
        offered.vcpus.to_string(),
    );
    differs(
        "memory (MiB)",
        expected.memory_mib.to_string(),
        offered.memory_mib.to_string(),
    );
    differs(
        "kernel",
        format!("{:?}", expected.kernel),
        format!("{:?}", offered.kernel),
    );
    differs(
        "initrd",
        format!("{:?}", expected.initrd),
        format!("{:?}", offered.initrd),
    );
    differs(
        "kernel command line",
        format!("{:?}", expected.cmdline),
        format!("{:?}", offered.cmdline),
    );
    let disks = |c: &VmConfig| {
        c.disks
            .iter()
            .map(|d| {
                format!(
                    "{}{}",
                    d.path.display(),
                    if d.read_only { ",ro" } else { "" }
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    differs(
        "disks",
        format!("[{}]", disks(expected)),
        format!("[{}]", disks(offered)),
    );
    let nics = |c: &VmConfig| {
        c.nics
            .iter()
            .map(|n| n.mac.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    differs(
        "NICs",
        format!("[{}]", nics(expected)),
        format!("[{}]", nics(offered)),
    );
    p
}

/// The guest's TSC frequency (announced in its CPUID timing leaf) must be one this host can
/// run its vCPUs at: the same within KVM's tolerance, or scaled by the hardware. A VM whose
/// CPUID has no timing leaf is checked when its state is loaded (KVM_SET_TSC_KHZ).
fn check_tsc(kvm: &kvm_ioctls::Kvm, req: &PreflightRequest, problems: &mut Vec<String>) {
    let Some(khz) = req.cpuid.tsc_khz() else {
        return;
    };
    match vmm::host::HostTsc::read(kvm) {
        Ok(h) => {
            if let Err(e) = h.can_run_at(khz) {
                problems.push(e);
            }
        }
        Err(e) => problems.push(format!("cannot read this host's TSC frequency: {e}")),
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
