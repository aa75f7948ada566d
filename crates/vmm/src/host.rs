//! Facts about this host that placement and preflight need.

/// Free memory in MiB: MemAvailable plus what the hugetlb pool can still give
/// ([`huge_pages_free_mib`]).
pub fn free_memory_mib() -> u64 {
    meminfo_kb("MemAvailable:") / 1024 + huge_pages_free_mib()
}

/// MiB of the hugetlb pool neither allocated nor reserved: what a new VM's RAM can take
/// (a VM on huge pages reserves all of its pages at start, allocating them as they are touched).
pub fn huge_pages_free_mib() -> u64 {
    let pages = meminfo_kb("HugePages_Free:").saturating_sub(meminfo_kb("HugePages_Rsvd:"));
    pages * meminfo_kb("Hugepagesize:") / 1024
}

/// A `/proc/meminfo` field's number (kB for sizes, a count for `HugePages_*`); 0 if absent.
fn meminfo_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Online CPUs.
pub fn online_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

/// Whether this host's CPU offers hardware virtualization (VMX or SVM in its CPUID).
pub fn hardware_virtualization() -> bool {
    use std::arch::x86_64::__cpuid_count;
    let vmx = __cpuid_count(1, 0).ecx & (1 << 5) != 0;
    let max_ext = __cpuid_count(0x8000_0000, 0).eax;
    let svm = max_ext >= 0x8000_0001 && __cpuid_count(0x8000_0001, 0).ecx & (1 << 2) != 0;
    vmx || svm
}

/// Whether the loaded KVM is `kvm_pvm` (pagetable-based virtualization: guest ring 0 emulated).
pub fn kvm_is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// Refuses, with a one-line reason, a host whose KVM cannot run a stock Linux kernel: one
/// without VMX/SVM (KVM there is PVM, which emulates guest ring 0, where Linux dies after
/// minutes of emulation failures instead of booting).
pub fn check_runs_linux() -> Result<(), String> {
    if kvm_is_pvm() || !hardware_virtualization() {
        let what = if kvm_is_pvm() {
            "this host's KVM is kvm_pvm (no VMX/SVM; guest ring 0 is emulated)"
        } else {
            "this host's CPU has no VMX/SVM"
        };
        return Err(format!(
            "cannot boot a Linux bzImage here: {what}, and a stock Linux kernel cannot run on it (use a host with hardware virtualization, e.g. the nested SVM test host)"
        ));
    }
    Ok(())
}

/// This host's TSC as KVM offers it to guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostTsc {
    /// The frequency a new vCPU's TSC runs at (KVM_GET_TSC_KHZ of a scratch vCPU).
    pub khz: u32,
    /// KVM can run a vCPU's TSC at another frequency (KVM_CAP_TSC_CONTROL: VMX TSC scaling,
    /// SVM TscRateMsr).
    pub scaling: bool,
}

/// KVM accepts a requested TSC frequency within this many parts per million of the host's
/// without scaling (its `tsc_tolerance_ppm` default).
pub const TSC_TOLERANCE_PPM: u64 = 250;

impl HostTsc {
    /// Reads it from a scratch VM with one vCPU.
    pub fn read(kvm: &kvm_ioctls::Kvm) -> Result<HostTsc, kvm_ioctls::Error> {
        let vm = kvm.create_vm()?;
        let vcpu = vm.create_vcpu(0)?;
        Ok(HostTsc {
            khz: vcpu.get_tsc_khz()?,
            scaling: kvm.check_extension(kvm_ioctls::Cap::TscControl),
        })
    }

    /// Whether a guest whose TSC runs at `khz` can keep that frequency here; otherwise why not.
    pub fn can_run_at(&self, khz: u32) -> Result<(), String> {
        let diff = (self.khz as i64 - khz as i64).unsigned_abs();
        if self.scaling || diff * 1_000_000 <= TSC_TOLERANCE_PPM * khz as u64 {
            return Ok(());
        }
        Err(format!(
            "TSC frequency differs: the VM's TSC runs at {khz} kHz, this host's at {} kHz, and its KVM cannot scale a guest TSC (no TSC scaling)",
            self.khz
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::HostTsc;

    #[test]
    fn tsc_frequency_within_tolerance_or_scaled() {
        let h = HostTsc {
            khz: 3_000_000,
            scaling: false,
        };
        assert!(h.can_run_at(3_000_000).is_ok());
        assert!(
            h.can_run_at(3_000_700).is_ok(),
            "233 ppm is within KVM's tolerance"
        );
        let e = h.can_run_at(2_990_000).unwrap_err();
        assert!(
            e.contains("2990000 kHz") && e.contains("3000000 kHz"),
            "{e}"
        );
        let s = HostTsc { scaling: true, ..h };
        assert!(s.can_run_at(2_000_000).is_ok());
    }
}
