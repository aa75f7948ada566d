//! Facts about this host that placement and preflight need.

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
