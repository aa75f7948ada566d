//! Guest CPUID: named features, CPU profiles and per-vCPU fix-ups.
//!
//! The guest CPUID starts from what the host's KVM says it can virtualize
//! (`KVM_GET_SUPPORTED_CPUID`) and is filtered through a named profile:
//!
//! * `host` — everything KVM reports, unchanged. On this project's PVM hosts KVM reports a heavily
//!   trimmed leaf 1 (no SSE3+, AVX or XSAVE bits) although guest ring 3 executes those
//!   instructions; `host` deliberately does not OR host bits back in, because a guest that sees
//!   XSAVE/AVX would use them in (emulated) ring 0 and die there.
//! * `baseline` — a fixed, conservative x86-64 set (the x86-64 v1 level plus cx16, x2apic,
//!   tsc-deadline and the kvmclock paravirt clock) that every KVM host offers, so a VM with this
//!   profile can move to any node. XSAVE state is limited to x87+SSE.
//!
//! Features are named (the names Linux uses in /proc/cpuinfo) so that a refusal can say exactly
//! which features a destination lacks.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// The profiles a VM may name.
pub const PROFILE_NAMES: &[&str] = &["host", "baseline"];

/// CPUID register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// One named feature bit.
#[derive(Clone, Copy, Debug)]
pub struct Feature {
    pub name: &'static str,
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub bit: u8,
}

const fn f(name: &'static str, leaf: u32, subleaf: u32, reg: Reg, bit: u8) -> Feature {
    Feature {
        name,
        leaf,
        subleaf,
        reg,
        bit,
    }
}

use Reg::*;

/// Every feature bit Ferry knows by name. Registers listed here are "feature registers": the
/// `baseline` profile clears every bit of them that is not in its set.
pub const FEATURES: &[Feature] = &[
    // leaf 1 EDX
    f("fpu", 1, 0, Edx, 0),
    f("vme", 1, 0, Edx, 1),
    f("de", 1, 0, Edx, 2),
    f("pse", 1, 0, Edx, 3),
    f("tsc", 1, 0, Edx, 4),
    f("msr", 1, 0, Edx, 5),
    f("pae", 1, 0, Edx, 6),
    f("mce", 1, 0, Edx, 7),
    f("cx8", 1, 0, Edx, 8),
    f("apic", 1, 0, Edx, 9),
    f("sep", 1, 0, Edx, 11),
    f("mtrr", 1, 0, Edx, 12),
    f("pge", 1, 0, Edx, 13),
    f("mca", 1, 0, Edx, 14),
    f("cmov", 1, 0, Edx, 15),
    f("pat", 1, 0, Edx, 16),
    f("pse36", 1, 0, Edx, 17),
    f("clflush", 1, 0, Edx, 19),
    f("mmx", 1, 0, Edx, 23),
    f("fxsr", 1, 0, Edx, 24),
    f("sse", 1, 0, Edx, 25),
    f("sse2", 1, 0, Edx, 26),
    f("ss", 1, 0, Edx, 27),
    f("ht", 1, 0, Edx, 28),
    // leaf 1 ECX
    f("pni", 1, 0, Ecx, 0),
    f("pclmulqdq", 1, 0, Ecx, 1),
    f("monitor", 1, 0, Ecx, 3),
    f("ssse3", 1, 0, Ecx, 9),
    f("fma", 1, 0, Ecx, 12),
    f("cx16", 1, 0, Ecx, 13),
    f("pdcm", 1, 0, Ecx, 15),
    f("pcid", 1, 0, Ecx, 17),
    f("sse4_1", 1, 0, Ecx, 19),
    f("sse4_2", 1, 0, Ecx, 20),
    f("x2apic", 1, 0, Ecx, 21),
    f("movbe", 1, 0, Ecx, 22),
    f("popcnt", 1, 0, Ecx, 23),
    f("tsc_deadline_timer", 1, 0, Ecx, 24),
    f("aes", 1, 0, Ecx, 25),
    f("xsave", 1, 0, Ecx, 26),
    f("avx", 1, 0, Ecx, 28),
    f("f16c", 1, 0, Ecx, 29),
    f("rdrand", 1, 0, Ecx, 30),
    f("hypervisor", 1, 0, Ecx, 31),
    // leaf 7.0 EBX
    f("fsgsbase", 7, 0, Ebx, 0),
    f("tsc_adjust", 7, 0, Ebx, 1),
    f("bmi1", 7, 0, Ebx, 3),
    f("hle", 7, 0, Ebx, 4),
    f("avx2", 7, 0, Ebx, 5),
    f("smep", 7, 0, Ebx, 7),
    f("bmi2", 7, 0, Ebx, 8),
    f("erms", 7, 0, Ebx, 9),
    f("invpcid", 7, 0, Ebx, 10),
    f("rtm", 7, 0, Ebx, 11),
    f("avx512f", 7, 0, Ebx, 16),
    f("avx512dq", 7, 0, Ebx, 17),
    f("rdseed", 7, 0, Ebx, 18),
    f("adx", 7, 0, Ebx, 19),
    f("smap", 7, 0, Ebx, 20),
    f("avx512ifma", 7, 0, Ebx, 21),
    f("clflushopt", 7, 0, Ebx, 23),
    f("clwb", 7, 0, Ebx, 24),
    f("avx512cd", 7, 0, Ebx, 28),
    f("sha_ni", 7, 0, Ebx, 29),
    f("avx512bw", 7, 0, Ebx, 30),
    f("avx512vl", 7, 0, Ebx, 31),
    // leaf 7.0 ECX
    f("avx512vbmi", 7, 0, Ecx, 1),
    f("umip", 7, 0, Ecx, 2),
    f("pku", 7, 0, Ecx, 3),
    f("waitpkg", 7, 0, Ecx, 5),
    f("avx512_vbmi2", 7, 0, Ecx, 6),
    f("gfni", 7, 0, Ecx, 8),
    f("vaes", 7, 0, Ecx, 9),
    f("vpclmulqdq", 7, 0, Ecx, 10),
    f("avx512_vnni", 7, 0, Ecx, 11),
    f("avx512_bitalg", 7, 0, Ecx, 12),
    f("avx512_vpopcntdq", 7, 0, Ecx, 14),
    f("la57", 7, 0, Ecx, 16),
    f("rdpid", 7, 0, Ecx, 22),
    f("movdiri", 7, 0, Ecx, 27),
    f("movdir64b", 7, 0, Ecx, 28),
    // leaf 7.0 EDX
    f("avx512_4vnniw", 7, 0, Edx, 2),
    f("fsrm", 7, 0, Edx, 4),
    f("avx512_vp2intersect", 7, 0, Edx, 8),
    f("md_clear", 7, 0, Edx, 10),
    f("serialize", 7, 0, Edx, 14),
    f("tsxldtrk", 7, 0, Edx, 16),
    f("amx_bf16", 7, 0, Edx, 22),
    f("avx512_fp16", 7, 0, Edx, 23),
    f("amx_tile", 7, 0, Edx, 24),
    f("amx_int8", 7, 0, Edx, 25),
    f("spec_ctrl", 7, 0, Edx, 26),
    f("stibp", 7, 0, Edx, 27),
    f("flush_l1d", 7, 0, Edx, 28),
    f("arch_capabilities", 7, 0, Edx, 29),
    f("ssbd", 7, 0, Edx, 31),
    // leaf 0xD.1 EAX
    f("xsaveopt", 0xd, 1, Eax, 0),
    f("xsavec", 0xd, 1, Eax, 1),
    f("xgetbv1", 0xd, 1, Eax, 2),
    f("xsaves", 0xd, 1, Eax, 3),
    // leaf 0x80000001 ECX / EDX
    f("lahf_lm", 0x8000_0001, 0, Ecx, 0),
    f("abm", 0x8000_0001, 0, Ecx, 5),
    f("sse4a", 0x8000_0001, 0, Ecx, 6),
    f("3dnowprefetch", 0x8000_0001, 0, Ecx, 8),
    f("syscall", 0x8000_0001, 0, Edx, 11),
    f("nx", 0x8000_0001, 0, Edx, 20),
    f("pdpe1gb", 0x8000_0001, 0, Edx, 26),
    f("rdtscp", 0x8000_0001, 0, Edx, 27),
    f("lm", 0x8000_0001, 0, Edx, 29),
    // leaf 0x80000007 EDX
    f("invtsc", 0x8000_0007, 0, Edx, 8),
    // KVM paravirt features, leaf 0x40000001 EAX
    f("kvmclock", 0x4000_0001, 0, Eax, 0),
    f("kvm_nopiodelay", 0x4000_0001, 0, Eax, 1),
    f("kvmclock2", 0x4000_0001, 0, Eax, 3),
    f("kvm_async_pf", 0x4000_0001, 0, Eax, 4),
    f("kvm_steal_time", 0x4000_0001, 0, Eax, 5),
    f("kvm_pv_eoi", 0x4000_0001, 0, Eax, 6),
    f("kvm_pv_unhalt", 0x4000_0001, 0, Eax, 7),
    f("kvm_pv_tlb_flush", 0x4000_0001, 0, Eax, 9),
    f("kvm_async_pf_vmexit", 0x4000_0001, 0, Eax, 10),
    f("kvm_pv_send_ipi", 0x4000_0001, 0, Eax, 11),
    f("kvm_poll_control", 0x4000_0001, 0, Eax, 12),
    f("kvm_pv_sched_yield", 0x4000_0001, 0, Eax, 13),
    f("kvm_async_pf_int", 0x4000_0001, 0, Eax, 14),
    f("kvm_msi_ext_dest_id", 0x4000_0001, 0, Eax, 15),
    f("kvmclock_stable", 0x4000_0001, 0, Eax, 24),
];

/// The `baseline` profile: features every x86-64 KVM host offers.
pub const BASELINE: &[&str] = &[
    "fpu",
    "vme",
    "de",
    "pse",
    "tsc",
    "msr",
    "pae",
    "mce",
    "cx8",
    "apic",
    "sep",
    "mtrr",
    "pge",
    "mca",
    "cmov",
    "pat",
    "pse36",
    "clflush",
    "mmx",
    "fxsr",
    "sse",
    "sse2",
    "cx16",
    "x2apic",
    "tsc_deadline_timer",
    "hypervisor",
    "lahf_lm",
    "syscall",
    "nx",
    "lm",
    "kvmclock",
    "kvm_nopiodelay",
    "kvmclock2",
    "kvmclock_stable",
];

/// CPUID problems.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    Supported(kvm_ioctls::Error),
    #[error("unknown CPU profile {0:?}")]
    UnknownProfile(String),
    #[error("this host lacks features of CPU profile {profile:?}: {}", missing.join(", "))]
    HostLacks {
        profile: String,
        missing: Vec<String>,
    },
    #[error("CPUID has {0} entries, more than KVM accepts ({KVM_MAX_CPUID_ENTRIES})")]
    TooManyEntries(usize),
}

/// One CPUID entry in a form that is stable on disk and on the wire.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

impl CpuidEntry {
    fn reg(&self, r: Reg) -> u32 {
        match r {
            Eax => self.eax,
            Ebx => self.ebx,
            Ecx => self.ecx,
            Edx => self.edx,
        }
    }
    fn reg_mut(&mut self, r: Reg) -> &mut u32 {
        match r {
            Eax => &mut self.eax,
            Ebx => &mut self.ebx,
            Ecx => &mut self.ecx,
            Edx => &mut self.edx,
        }
    }
}

/// A whole CPUID table (VM-wide template; per-vCPU fields are patched by [`for_vcpu`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct CpuidTable {
    pub entries: Vec<CpuidEntry>,
}

impl CpuidTable {
    /// Converts from KVM's FAM wrapper.
    pub fn from_kvm(c: &CpuId) -> Self {
        CpuidTable {
            entries: c
                .as_slice()
                .iter()
                .map(|e| CpuidEntry {
                    function: e.function,
                    index: e.index,
                    flags: e.flags,
                    eax: e.eax,
                    ebx: e.ebx,
                    ecx: e.ecx,
                    edx: e.edx,
                })
                .collect(),
        }
    }

    /// Converts to KVM's FAM wrapper.
    pub fn to_kvm(&self) -> Result<CpuId, CpuidError> {
        let v: Vec<kvm_cpuid_entry2> = self
            .entries
            .iter()
            .map(|e| kvm_cpuid_entry2 {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
                ..Default::default()
            })
            .collect();
        CpuId::from_entries(&v).map_err(|_| CpuidError::TooManyEntries(v.len()))
    }

    fn find(&self, leaf: u32, subleaf: u32) -> Option<&CpuidEntry> {
        self.entries
            .iter()
            .find(|e| e.function == leaf && (e.index == subleaf || !significant_index(e)))
    }

    fn find_mut(&mut self, leaf: u32, subleaf: u32) -> Option<&mut CpuidEntry> {
        self.entries
            .iter_mut()
            .find(|e| e.function == leaf && (e.index == subleaf || !significant_index(e)))
    }

    /// The TSC frequency the table announces to the guest (KVM's timing leaf 0x40000010,
    /// EAX = TSC kHz), if it has one.
    pub fn tsc_khz(&self) -> Option<u32> {
        self.find(0x4000_0010, 0).map(|e| e.eax).filter(|&k| k != 0)
    }

    /// The named features this table exposes.
    pub fn features(&self) -> BTreeSet<String> {
        FEATURES
            .iter()
            .filter(|ft| {
                self.find(ft.leaf, ft.subleaf)
                    .map(|e| e.reg(ft.reg) & (1 << ft.bit) != 0)
                    .unwrap_or(false)
            })
            .map(|ft| ft.name.to_string())
            .collect()
    }

    /// CPU vendor string from leaf 0 ("GenuineIntel", "AuthenticAMD", ...).
    pub fn vendor(&self) -> String {
        match self.find(0, 0) {
            Some(e) => vendor_string(e.ebx, e.edx, e.ecx),
            None => String::from("unknown"),
        }
    }
}

fn significant_index(e: &CpuidEntry) -> bool {
    e.flags & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0
}

fn vendor_string(ebx: u32, edx: u32, ecx: u32) -> String {
    let mut b = Vec::with_capacity(12);
    for r in [ebx, edx, ecx] {
        b.extend_from_slice(&r.to_le_bytes());
    }
    String::from_utf8_lossy(&b)
        .trim_end_matches('\0')
        .to_string()
}

/// What KVM on this host can virtualize, plus what the VMM itself provides on top: the
/// `hypervisor` bit (KVM_GET_SUPPORTED_CPUID leaves it to the VMM; without it Linux never looks
/// at the KVM leaves, so it finds no kvmclock and must calibrate the TSC against the PIT) and
/// the hypervisor timing leaf 0x40000010 (EAX = TSC kHz, EBX = LAPIC bus kHz) with the host's
/// TSC frequency, and `invtsc` (see [`add_vmm_leaves`]). The `baseline` profile does not keep
/// `invtsc` (builds before this one did not offer it everywhere).
pub fn supported(kvm: &kvm_ioctls::Kvm) -> Result<CpuidTable, CpuidError> {
    let c = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::Supported)?;
    let mut t = CpuidTable::from_kvm(&c);
    add_vmm_leaves(&mut t, host_tsc_khz(kvm));
    Ok(t)
}

/// KVM's signature leaf and the timing leaf.
pub const KVM_SIGNATURE_LEAF: u32 = 0x4000_0000;
/// The hypervisor timing leaf (the VMware-defined layout QEMU and others also offer).
pub const TIMING_LEAF: u32 = 0x4000_0010;
/// The LAPIC timer frequency KVM emulates: 1 GHz (APIC_BUS_CYCLE_NS = 1).
pub const LAPIC_BUS_KHZ: u32 = 1_000_000;

/// Sets the `hypervisor` bit and, if KVM's signature leaf is there and `tsc_khz` is known,
/// sets `invtsc`, adds the timing leaf and raises the signature leaf's maximum to cover it.
pub fn add_vmm_leaves(t: &mut CpuidTable, tsc_khz: Option<u32>) {
    if let Some(e) = t.find_mut(1, 0) {
        e.ecx |= 1 << 31;
    }
    let Some(khz) = tsc_khz.filter(|k| *k > 0) else {
        return;
    };
    if t.find(KVM_SIGNATURE_LEAF, 0).is_none() {
        return;
    }
    // Invariant TSC: KVM runs every vCPU's TSC at the fixed rate KVM_GET/SET_TSC_KHZ names
    // (Ferry carries it across snapshots and migrations and sets it on the destination), and
    // keeps the vCPUs' TSCs synchronized. Without the bit an AMD guest with more than one CPU
    // assumes unsynchronized TSCs ("Marking TSC unstable due to TSCs unsynchronized").
    if let Some(e) = t.find_mut(0x8000_0007, 0) {
        e.edx |= 1 << 8;
    } else if t.find(0x8000_0000, 0).is_some_and(|e| e.eax >= 0x8000_0007) {
        t.entries.push(CpuidEntry {
            function: 0x8000_0007,
            index: 0,
            flags: 0,
            eax: 0,
            ebx: 0,
            ecx: 0,
            edx: 1 << 8,
        });
    }
    let Some(sig) = t.find_mut(KVM_SIGNATURE_LEAF, 0) else {
        return;
    };
    sig.eax = sig.eax.max(TIMING_LEAF);
    t.entries.retain(|e| e.function != TIMING_LEAF);
    t.entries.push(CpuidEntry {
        function: TIMING_LEAF,
        index: 0,
        flags: 0,
        eax: khz,
        ebx: LAPIC_BUS_KHZ,
        ecx: 0,
        edx: 0,
    });
}

/// The TSC frequency KVM gives a new vCPU on this host ([`crate::host::HostTsc`]), measured
/// once per process.
pub fn host_tsc_khz(kvm: &kvm_ioctls::Kvm) -> Option<u32> {
    static KHZ: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *KHZ.get_or_init(|| {
        crate::host::HostTsc::read(kvm)
            .ok()
            .map(|h| h.khz)
            .filter(|k| *k > 0)
    })
}

/// The host CPU's own vendor and brand string (from the CPUID instruction, not from KVM).
pub fn host_cpu_model() -> (String, String) {
    use std::arch::x86_64::__cpuid_count;
    let l0 = __cpuid_count(0, 0);
    let vendor = vendor_string(l0.ebx, l0.edx, l0.ecx);
    let mut brand = Vec::with_capacity(48);
    for leaf in 0x8000_0002u32..=0x8000_0004 {
        let r = __cpuid_count(leaf, 0);
        for v in [r.eax, r.ebx, r.ecx, r.edx] {
            brand.extend_from_slice(&v.to_le_bytes());
        }
    }
    let brand = String::from_utf8_lossy(&brand)
        .trim_matches(|c: char| c == '\0' || c.is_whitespace())
        .to_string();
    (vendor, brand)
}

/// Checks a profile name: `host`, `baseline`, or `features=<name>,<name>,...` (an explicit
/// feature set, e.g. what every node of a cluster offers).
pub fn validate_profile(profile: &str) -> Result<(), CpuidError> {
    match profile {
        "host" | "baseline" => Ok(()),
        p => match p.strip_prefix("features=") {
            Some(list) => {
                let unknown: Vec<&str> = list
                    .split(',')
                    .filter(|n| !n.is_empty() && !FEATURES.iter().any(|f| f.name == *n))
                    .collect();
                if unknown.is_empty() {
                    Ok(())
                } else {
                    Err(CpuidError::UnknownProfile(format!(
                        "{p} (unknown features: {})",
                        unknown.join(", ")
                    )))
                }
            }
            None => Err(CpuidError::UnknownProfile(p.into())),
        },
    }
}

/// Builds the VM-wide CPUID for `profile` from what KVM supports.
pub fn build(supported: &CpuidTable, profile: &str) -> Result<CpuidTable, CpuidError> {
    validate_profile(profile)?;
    match profile {
        "host" => Ok(supported.clone()),
        "baseline" => mask_to(supported, profile, BASELINE),
        p => {
            let list: Vec<&str> = p
                .trim_start_matches("features=")
                .split(',')
                .filter(|n| !n.is_empty())
                .collect();
            mask_to(supported, profile, &list)
        }
    }
}

/// Clears every bit of every named-feature register that `keep` does not name; fails if the
/// host lacks one of `keep`.
fn mask_to(supported: &CpuidTable, profile: &str, keep: &[&str]) -> Result<CpuidTable, CpuidError> {
    let have = supported.features();
    let missing: Vec<String> = keep
        .iter()
        .filter(|n| !have.contains(**n))
        .map(|n| n.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(CpuidError::HostLacks {
            profile: profile.into(),
            missing,
        });
    }
    let mut t = supported.clone();
    let mut regs: Vec<(u32, u32, Reg)> = Vec::new();
    for ft in FEATURES {
        if !regs.contains(&(ft.leaf, ft.subleaf, ft.reg)) {
            regs.push((ft.leaf, ft.subleaf, ft.reg));
        }
    }
    for (leaf, sub, reg) in regs {
        let mask: u32 = FEATURES
            .iter()
            .filter(|ft| {
                ft.leaf == leaf && ft.subleaf == sub && ft.reg == reg && keep.contains(&ft.name)
            })
            .fold(0, |m, ft| m | (1 << ft.bit));
        if let Some(e) = t.find_mut(leaf, sub) {
            *e.reg_mut(reg) &= mask;
        }
    }
    if !keep.contains(&"xsave") {
        // XSAVE components: x87 and SSE only.
        if let Some(e) = t.find_mut(0xd, 0) {
            e.eax &= 0x3;
            e.edx = 0;
        }
    }
    Ok(t)
}

/// Features of `vm` that `host` does not offer, by name (empty: compatible).
pub fn missing_features(vm: &CpuidTable, host: &CpuidTable) -> Vec<String> {
    let have = host.features();
    vm.features()
        .into_iter()
        .filter(|f| !have.contains(f))
        .collect()
}

/// Patches the per-vCPU fields (APIC IDs, logical CPU count) of the VM template.
pub fn for_vcpu(template: &CpuidTable, id: u8, nr_vcpus: u8) -> CpuidTable {
    let mut t = template.clone();
    for e in t.entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | ((id as u32) << 24) | ((nr_vcpus as u32) << 16);
                if nr_vcpus > 1 {
                    e.edx |= 1 << 28; // HTT: more than one logical processor
                }
            }
            0xb | 0x1f => e.edx = id as u32,
            _ => {}
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> CpuidTable {
        CpuidTable {
            entries: vec![
                CpuidEntry {
                    function: 0,
                    index: 0,
                    flags: 0,
                    eax: 0xd,
                    ebx: 0x756e_6547,
                    edx: 0x4965_6e69,
                    ecx: 0x6c65_746e,
                },
                CpuidEntry {
                    function: 1,
                    index: 0,
                    flags: 0,
                    eax: 0,
                    ebx: 0,
                    ecx: (1 << 13) | (1 << 28) | (1 << 31),
                    edx: 0xffff_ffff,
                },
            ],
        }
    }

    #[test]
    fn names_vendor_and_missing_features() {
        let t = table();
        assert_eq!(t.vendor(), "GenuineIntel");
        let f = t.features();
        assert!(f.contains("avx") && f.contains("cx16") && f.contains("sse2"));
        let mut small = t.clone();
        small.entries[1].ecx &= !(1 << 28);
        assert_eq!(missing_features(&t, &small), vec!["avx".to_string()]);
        assert!(missing_features(&small, &t).is_empty());
    }

    #[test]
    fn vmm_leaves_hypervisor_bit_and_timing_leaf() {
        let mut t = table();
        t.entries[1].ecx &= !(1 << 31);
        t.entries.push(CpuidEntry {
            function: KVM_SIGNATURE_LEAF,
            index: 0,
            flags: 0,
            eax: 0x4000_0001,
            ebx: 0x4b4d_564b,
            ecx: 0x564b_4d56,
            edx: 0x4d,
        });
        t.entries.push(CpuidEntry {
            function: 0x8000_0000,
            index: 0,
            flags: 0,
            eax: 0x8000_0008,
            ebx: 0,
            ecx: 0,
            edx: 0,
        });
        add_vmm_leaves(&mut t, Some(2_445_405));
        assert!(t.features().contains("hypervisor"));
        assert!(t.features().contains("invtsc"));
        assert_eq!(t.find(KVM_SIGNATURE_LEAF, 0).unwrap().eax, TIMING_LEAF);
        let timing = t.find(TIMING_LEAF, 0).unwrap();
        assert_eq!((timing.eax, timing.ebx), (2_445_405, LAPIC_BUS_KHZ));
        assert_eq!(t.tsc_khz(), Some(2_445_405));
        // Idempotent: one timing leaf, the signature maximum unchanged.
        add_vmm_leaves(&mut t, Some(2_445_405));
        assert_eq!(
            t.entries
                .iter()
                .filter(|e| e.function == TIMING_LEAF)
                .count(),
            1
        );
        // Profiles keep it.
        let b = mask_to(&t, "x", &["fpu", "hypervisor"]).unwrap();
        assert_eq!(b.tsc_khz(), Some(2_445_405));
        // No KVM signature leaf (not KVM): no timing leaf either.
        let mut bare = table();
        add_vmm_leaves(&mut bare, Some(1000));
        assert_eq!(bare.tsc_khz(), None);
    }

    #[test]
    fn per_vcpu_apic_id() {
        let t = for_vcpu(&table(), 3, 4);
        assert_eq!(t.entries[1].ebx >> 24, 3);
        assert_eq!((t.entries[1].ebx >> 16) & 0xff, 4);
    }
}
