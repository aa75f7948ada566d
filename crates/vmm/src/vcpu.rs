//! One virtual CPU: creation, boot setup and its complete typed state.

use crate::cpuid::CpuidTable;
use crate::persist::{kvm_bytes, Persist};
use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{Cap, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// vCPU errors; each names the KVM call that failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {id}: {op} failed: {err}")]
    Kvm {
        id: u8,
        op: &'static str,
        err: kvm_ioctls::Error,
    },
    #[error("vCPU {id}: KVM accepted only {done} of {total} MSRs (first refused: {first:#x})")]
    Msrs {
        id: u8,
        done: usize,
        total: usize,
        first: u32,
    },
    #[error("vCPU {id}: invalid state: {msg}")]
    BadState { id: u8, msg: String },
    #[error("vCPU {id}: {0}", id = .1)]
    Cpuid(crate::cpuid::CpuidError, u8),
}

/// Everything KVM holds for one vCPU.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: CpuidTable,
    #[serde(with = "kvm_bytes")]
    pub mp_state: kvm_mp_state,
    #[serde(with = "kvm_bytes")]
    pub regs: kvm_regs,
    #[serde(with = "kvm_bytes")]
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    /// The XSAVE area as KVM returns it (4096 bytes, or more with KVM_CAP_XSAVE2), as u32 words.
    pub xsave: Vec<u32>,
    #[serde(with = "kvm_bytes")]
    pub xcrs: kvm_xcrs,
    #[serde(with = "kvm_bytes")]
    pub debugregs: kvm_debugregs,
    #[serde(with = "kvm_bytes")]
    pub lapic: kvm_lapic_state,
    /// Every MSR of KVM_GET_MSR_INDEX_LIST that KVM lets us read: (index, value).
    pub msrs: Vec<(u32, u64)>,
    #[serde(with = "kvm_bytes")]
    pub events: kvm_vcpu_events,
    /// TSC frequency the vCPU ran with.
    pub tsc_khz: Option<u32>,
}

#[cfg(test)]
impl VcpuState {
    /// An all-zero state (unit tests of code that compares states).
    pub fn default_for_tests(id: u8) -> VcpuState {
        VcpuState {
            id,
            cpuid: Default::default(),
            mp_state: Default::default(),
            regs: Default::default(),
            sregs: Default::default(),
            fpu: Default::default(),
            xsave: vec![0; 1024],
            xcrs: Default::default(),
            debugregs: Default::default(),
            lapic: Default::default(),
            msrs: vec![],
            events: Default::default(),
            tsc_khz: None,
        }
    }
}

/// Legacy FPU/SSE state (KVM_GET_FPU); the XSAVE area supersedes it where KVM has XSAVE.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FpuState {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// A vCPU file descriptor and what Ferry knows about it.
pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
    msr_list: Vec<u32>,
    xsave_size: usize,
    cpuid: CpuidTable,
}

/// What [`Vcpu::restore`] needs.
pub struct VcpuArgs {
    pub vm: std::sync::Arc<VmFd>,
    pub msr_list: Vec<u32>,
}

fn kvm_err(id: u8, op: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuError {
    move |err| VcpuError::Kvm { id, op, err }
}

impl Vcpu {
    /// Creates vCPU `id` in `vm` and gives it `cpuid` (already patched for this vCPU).
    pub fn create(
        vm: &VmFd,
        id: u8,
        cpuid: &CpuidTable,
        msr_list: Vec<u32>,
    ) -> Result<Vcpu, VcpuError> {
        let fd = vm
            .create_vcpu(id as u64)
            .map_err(kvm_err(id, "KVM_CREATE_VCPU"))?;
        let kvm_cpuid = cpuid.to_kvm().map_err(|e| VcpuError::Cpuid(e, id))?;
        fd.set_cpuid2(&kvm_cpuid)
            .map_err(kvm_err(id, "KVM_SET_CPUID2"))?;
        let xsave_size = (vm.check_extension_int(Cap::Xsave2).max(0) as usize)
            .max(std::mem::size_of::<kvm_xsave>());
        Ok(Vcpu {
            id,
            fd,
            msr_list,
            xsave_size,
            cpuid: cpuid.clone(),
        })
    }

    /// The MSRs of `candidates` this vCPU can read (call once on a fresh vCPU).
    pub fn readable_msrs(&self, candidates: &[u32]) -> Vec<u32> {
        candidates
            .iter()
            .copied()
            .filter(|&i| {
                let Ok(mut m) = Msrs::from_entries(&[kvm_msr_entry {
                    index: i,
                    ..Default::default()
                }]) else {
                    return false;
                };
                matches!(self.fd.get_msrs(&mut m), Ok(1))
            })
            .collect()
    }

    /// Sets the list of MSRs saved with the state.
    pub fn set_msr_list(&mut self, list: Vec<u32>) {
        self.msr_list = list;
    }

    /// Puts the boot vCPU at the kernel entry, and gives every vCPU the LAPIC LINT0/LINT1
    /// wiring a PC BIOS sets up (LINT0 = ExtINT, LINT1 = NMI).
    pub fn setup_boot(&self, entry: Option<&crate::boot::BootEntry>) -> Result<(), VcpuError> {
        let id = self.id;
        let mut lapic = self.fd.get_lapic().map_err(kvm_err(id, "KVM_GET_LAPIC"))?;
        let lint0 = (get_lapic_reg(&lapic, 0x350) & !0x700) | 0x700; // ExtINT
        let lint1 = (get_lapic_reg(&lapic, 0x360) & !0x700) | 0x400; // NMI
        set_lapic_reg(&mut lapic, 0x350, lint0);
        set_lapic_reg(&mut lapic, 0x360, lint1);
        self.fd
            .set_lapic(&lapic)
            .map_err(kvm_err(id, "KVM_SET_LAPIC"))?;
        if let Some(entry) = entry {
            let mut sregs = self.fd.get_sregs().map_err(kvm_err(id, "KVM_GET_SREGS"))?;
            crate::boot::patch_sregs(&mut sregs, entry.sregs_patch);
            self.fd
                .set_sregs(&sregs)
                .map_err(kvm_err(id, "KVM_SET_SREGS"))?;
            self.fd
                .set_regs(&entry.regs)
                .map_err(kvm_err(id, "KVM_SET_REGS"))?;
            let fpu = kvm_fpu {
                fcw: 0x37f,
                mxcsr: 0x1f80,
                ..Default::default()
            };
            self.fd.set_fpu(&fpu).map_err(kvm_err(id, "KVM_SET_FPU"))?;
        }
        Ok(())
    }

    fn get_xsave(&self) -> Result<Vec<u32>, VcpuError> {
        if self.xsave_size > std::mem::size_of::<kvm_xsave>() {
            let extra = (self.xsave_size - std::mem::size_of::<kvm_xsave>()).div_ceil(4);
            let mut x = kvm_bindings::Xsave::new(extra).map_err(|e| VcpuError::BadState {
                id: self.id,
                msg: format!("{e:?}"),
            })?;
            // SAFETY: `x` was allocated with room for KVM_CAP_XSAVE2 bytes, as the ioctl requires.
            unsafe { self.fd.get_xsave2(&mut x) }.map_err(kvm_err(self.id, "KVM_GET_XSAVE2"))?;
            let mut v = x.as_fam_struct_ref().xsave.region.to_vec();
            v.extend_from_slice(x.as_slice());
            Ok(v)
        } else {
            let x = self
                .fd
                .get_xsave()
                .map_err(kvm_err(self.id, "KVM_GET_XSAVE"))?;
            Ok(x.region.to_vec())
        }
    }

    fn set_xsave(&self, words: &[u32]) -> Result<(), VcpuError> {
        let base = std::mem::size_of::<kvm_xsave>() / 4;
        if words.len() < base {
            return Err(VcpuError::BadState {
                id: self.id,
                msg: format!("XSAVE area has {} words, need {base}", words.len()),
            });
        }
        if words.len() > base {
            if words.len() * 4 > self.xsave_size {
                return Err(VcpuError::BadState {
                    id: self.id,
                    msg: format!(
                        "XSAVE area of {} bytes does not fit this host's {} bytes",
                        words.len() * 4,
                        self.xsave_size
                    ),
                });
            }
            let mut x =
                kvm_bindings::Xsave::new(words.len() - base).map_err(|e| VcpuError::BadState {
                    id: self.id,
                    msg: format!("{e:?}"),
                })?;
            // SAFETY: the FAM struct holds `words.len() - base` extra words, exactly what we copy.
            unsafe {
                x.as_mut_fam_struct()
                    .xsave
                    .region
                    .copy_from_slice(&words[..base]);
                x.as_mut_slice().copy_from_slice(&words[base..]);
                self.fd.set_xsave2(&x)
            }
            .map_err(kvm_err(self.id, "KVM_SET_XSAVE2"))
        } else {
            let mut x = kvm_xsave::default();
            x.region.copy_from_slice(words);
            // SAFETY: a plain kvm_xsave (4096 bytes) is what KVM_SET_XSAVE reads.
            unsafe { self.fd.set_xsave(&x) }.map_err(kvm_err(self.id, "KVM_SET_XSAVE"))
        }
    }
}

/// Reads a 32-bit LAPIC register from KVM's LAPIC page.
pub fn get_lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b: Vec<u8> = l.regs[off..off + 4].iter().map(|&c| c as u8).collect();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn set_lapic_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        l.regs[off + i] = *b as _;
    }
}

impl Persist for Vcpu {
    type State = VcpuState;
    type ConstructorArgs = VcpuArgs;
    type Error = VcpuError;

    fn save(&self) -> Result<VcpuState, VcpuError> {
        let id = self.id;
        // Order matters: KVM_GET_MP_STATE may process pending LAPIC events, so it goes first;
        // MSRs after the LAPIC (the TSC deadline depends on the LAPIC timer mode).
        let mp_state = self
            .fd
            .get_mp_state()
            .map_err(kvm_err(id, "KVM_GET_MP_STATE"))?;
        let regs = self.fd.get_regs().map_err(kvm_err(id, "KVM_GET_REGS"))?;
        let sregs = self.fd.get_sregs().map_err(kvm_err(id, "KVM_GET_SREGS"))?;
        let fpu = FpuState::from(&self.fd.get_fpu().map_err(kvm_err(id, "KVM_GET_FPU"))?);
        let xsave = self.get_xsave()?;
        let xcrs = self.fd.get_xcrs().map_err(kvm_err(id, "KVM_GET_XCRS"))?;
        let debugregs = self
            .fd
            .get_debug_regs()
            .map_err(kvm_err(id, "KVM_GET_DEBUGREGS"))?;
        let lapic = self.fd.get_lapic().map_err(kvm_err(id, "KVM_GET_LAPIC"))?;
        let entries: Vec<kvm_msr_entry> = self
            .msr_list
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut m = Msrs::from_entries(&entries).map_err(|e| VcpuError::BadState {
            id,
            msg: format!("{e:?}"),
        })?;
        let n = self
            .fd
            .get_msrs(&mut m)
            .map_err(kvm_err(id, "KVM_GET_MSRS"))?;
        if n != entries.len() {
            return Err(VcpuError::Msrs {
                id,
                done: n,
                total: entries.len(),
                first: entries[n].index,
            });
        }
        let msrs = m.as_slice().iter().map(|e| (e.index, e.data)).collect();
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(kvm_err(id, "KVM_GET_VCPU_EVENTS"))?;
        let tsc_khz = self.fd.get_tsc_khz().ok();
        Ok(VcpuState {
            id,
            cpuid: self.cpuid.clone(),
            mp_state,
            regs,
            sregs,
            fpu,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            events,
            tsc_khz,
        })
    }

    fn restore(args: VcpuArgs, state: &VcpuState) -> Result<Vcpu, VcpuError> {
        let v = Vcpu::create(&args.vm, state.id, &state.cpuid, args.msr_list)?;
        v.apply(state)?;
        Ok(v)
    }
}

/// MSR_IA32_TSC.
const MSR_IA32_TSC: u32 = 0x10;
/// MSR_IA32_TSC_DEADLINE.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

const KVMIO: u32 = 0xae;
vmm_sys_util::ioctl_iow_nr!(
    KVM_SET_DEVICE_ATTR,
    KVMIO,
    0xe1,
    kvm_bindings::kvm_device_attr
);
vmm_sys_util::ioctl_iow_nr!(
    KVM_GET_DEVICE_ATTR,
    KVMIO,
    0xe2,
    kvm_bindings::kvm_device_attr
);
vmm_sys_util::ioctl_iow_nr!(
    KVM_HAS_DEVICE_ATTR,
    KVMIO,
    0xe3,
    kvm_bindings::kvm_device_attr
);

/// The guest TSC as a saved state says it was, for placing it on a new host.
impl VcpuState {
    /// The saved IA32_TSC.
    pub fn tsc(&self) -> Option<u64> {
        self.msrs
            .iter()
            .find(|(i, _)| *i == MSR_IA32_TSC)
            .map(|&(_, v)| v)
    }
}

impl Vcpu {
    fn tsc_attr(addr: u64) -> kvm_bindings::kvm_device_attr {
        kvm_bindings::kvm_device_attr {
            flags: 0,
            group: kvm_bindings::KVM_VCPU_TSC_CTRL,
            attr: kvm_bindings::KVM_VCPU_TSC_OFFSET as u64,
            addr,
        }
    }

    /// Whether KVM lets this vCPU's TSC offset be read and set (KVM_VCPU_TSC_CTRL, Linux 5.16+).
    pub fn has_tsc_offset_control(&self) -> bool {
        let a = Self::tsc_attr(0);
        // SAFETY: KVM_HAS_DEVICE_ATTR only reads the attribute struct we pass by reference.
        let rc =
            unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.fd, KVM_HAS_DEVICE_ATTR(), &a) };
        rc == 0
    }

    /// The vCPU's TSC offset (guest TSC = scaled host TSC + offset).
    pub fn tsc_offset(&self) -> Result<u64, VcpuError> {
        let mut v: u64 = 0;
        let a = Self::tsc_attr(&mut v as *mut u64 as u64);
        // SAFETY: KVM_GET_DEVICE_ATTR writes 8 bytes to `addr`, which points at `v`, alive and
        // writable for the whole call.
        let rc =
            unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.fd, KVM_GET_DEVICE_ATTR(), &a) };
        if rc != 0 {
            return Err(VcpuError::Kvm {
                id: self.id,
                op: "KVM_GET_DEVICE_ATTR(TSC offset)",
                err: kvm_ioctls::Error::last(),
            });
        }
        Ok(v)
    }

    /// Sets the vCPU's TSC offset.
    pub fn set_tsc_offset(&self, offset: u64) -> Result<(), VcpuError> {
        let v = offset;
        let a = Self::tsc_attr(&v as *const u64 as u64);
        // SAFETY: KVM_SET_DEVICE_ATTR reads 8 bytes from `addr`, which points at `v`, alive for
        // the whole call.
        let rc =
            unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.fd, KVM_SET_DEVICE_ATTR(), &a) };
        if rc != 0 {
            return Err(VcpuError::Kvm {
                id: self.id,
                op: "KVM_SET_DEVICE_ATTR(TSC offset)",
                err: kvm_ioctls::Error::last(),
            });
        }
        Ok(())
    }

    fn msr(&self, index: u32) -> Result<u64, VcpuError> {
        let mut m = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .map_err(|e| VcpuError::BadState {
            id: self.id,
            msg: format!("{e:?}"),
        })?;
        match self.fd.get_msrs(&mut m) {
            Ok(1) => Ok(m.as_slice()[0].data),
            Ok(_) => Err(VcpuError::Msrs {
                id: self.id,
                done: 0,
                total: 1,
                first: index,
            }),
            Err(err) => Err(VcpuError::Kvm {
                id: self.id,
                op: "KVM_GET_MSRS",
                err,
            }),
        }
    }

    fn set_msr(&self, index: u32, data: u64) -> Result<(), VcpuError> {
        let m = Msrs::from_entries(&[kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }])
        .map_err(|e| VcpuError::BadState {
            id: self.id,
            msg: format!("{e:?}"),
        })?;
        match self.fd.set_msrs(&m) {
            Ok(1) => Ok(()),
            Ok(_) => Err(VcpuError::Msrs {
                id: self.id,
                done: 0,
                total: 1,
                first: index,
            }),
            Err(err) => Err(VcpuError::Kvm {
                id: self.id,
                op: "KVM_SET_MSRS",
                err,
            }),
        }
    }

    /// The guest's TSC now.
    pub fn guest_tsc(&self) -> Result<u64, VcpuError> {
        self.msr(MSR_IA32_TSC)
    }
}

/// Puts the guest TSCs of freshly loaded `vcpus` exactly where `states` say they were, moved on
/// by `advance_ns()` (evaluated at the moment of placing, see [`crate::vm::GuestTime`]).
///
/// Writing IA32_TSC is not enough: KVM takes a host write within one second of the value it
/// expects (a new VM's TSC starts at 0) as an attempt to keep vCPUs in step and keeps its own
/// value, so a VM saved less than a second after it started would restore with a TSC that went
/// backwards. Where KVM offers the vCPU TSC offset (KVM_VCPU_TSC_CTRL), the offset is set
/// directly, as KVM's documentation describes for migration, to the TSCs [`tsc_targets`]
/// chooses. An armed TSC-deadline timer is written again afterwards, so it fires at its
/// deadline on the new TSC. Without the offset control (PVM, older kernels) the IA32_TSC
/// writes stand. Returns whether the offsets were set.
pub fn place_tsc(
    vcpus: &[Vcpu],
    states: &[VcpuState],
    advance_ns: impl Fn() -> u64,
) -> Result<bool, VcpuError> {
    let (Some(v0), Some(s0)) = (vcpus.first(), states.first()) else {
        return Ok(false);
    };
    let Some(saved0) = s0.tsc() else {
        return Ok(false);
    };
    if !v0.has_tsc_offset_control() {
        return Ok(false);
    }
    let khz = s0.tsc_khz.or_else(|| v0.fd.get_tsc_khz().ok()).unwrap_or(0);
    let saved: Vec<u64> = states.iter().map(|s| s.tsc().unwrap_or(saved0)).collect();
    let offset0 = v0.tsc_offset()?;
    let now = v0.guest_tsc()?;
    let targets = tsc_targets(&saved, khz, tsc_ticks(advance_ns(), khz));
    for ((v, s), target) in vcpus.iter().zip(states).zip(targets) {
        // vCPU 0's guest TSC is `now` with `offset0`: each offset is that plus the distance
        // from `now` to the vCPU's target.
        v.set_tsc_offset(offset0.wrapping_add(target.wrapping_sub(now)))?;
        if let Some(&(_, deadline)) = s.msrs.iter().find(|(i, _)| *i == MSR_IA32_TSC_DEADLINE) {
            if deadline != 0 {
                v.set_msr(MSR_IA32_TSC_DEADLINE, deadline)?;
            }
        }
    }
    Ok(true)
}

/// The guest TSC each vCPU gets when its state is loaded, from the TSCs `saved` (vCPU 0 first)
/// at `khz`, moved on by `advance` ticks. vCPUs whose saved TSCs agree with vCPU 0's within a
/// millisecond share one value (one offset, so KVM's master clock stays usable); as the vCPUs
/// were saved one after the other, that value starts from the latest of their TSCs, so no vCPU's
/// TSC goes backwards (the others move on by at most a millisecond, as in a short pause). A
/// vCPU further apart keeps its saved distance from that group.
pub fn tsc_targets(saved: &[u64], khz: u32, advance: u64) -> Vec<u64> {
    let Some(&saved0) = saved.first() else {
        return Vec::new();
    };
    let ms = (khz as u64).max(1);
    let from0 = |t: u64| t.wrapping_sub(saved0) as i64;
    let agrees = |t: u64| from0(t).unsigned_abs() <= ms;
    let reference = saved
        .iter()
        .copied()
        .filter(|&t| agrees(t))
        .max_by_key(|&t| from0(t))
        .unwrap_or(saved0);
    let group = reference.wrapping_add(advance);
    saved
        .iter()
        .map(|&t| {
            if agrees(t) {
                group
            } else {
                t.wrapping_add(advance)
            }
        })
        .collect()
}

impl Vcpu {
    /// Tells a guest that uses kvmclock that it was stopped (KVM_KVMCLOCK_CTRL sets
    /// PVCLOCK_GUEST_STOPPED), so that its watchdogs do not count the pause as a soft lockup.
    /// A guest that has not enabled kvmclock makes KVM answer EINVAL: nothing to tell it.
    pub fn mark_stopped(&self) -> Result<(), VcpuError> {
        match self.fd.kvmclock_ctrl() {
            Ok(()) => Ok(()),
            Err(e) if e.errno() == libc::EINVAL => Ok(()),
            Err(err) => Err(VcpuError::Kvm {
                id: self.id,
                op: "KVM_KVMCLOCK_CTRL",
                err,
            }),
        }
    }
}

/// TSC ticks in `ns` nanoseconds at `khz`.
pub fn tsc_ticks(ns: u64, khz: u32) -> u64 {
    (ns as u128 * khz as u128 / 1_000_000) as u64
}

impl Vcpu {
    /// Loads `state` into this (fresh, never run) vCPU.
    pub fn apply(&self, state: &VcpuState) -> Result<(), VcpuError> {
        self.apply_advanced(state, 0)
    }

    /// Loads `state` with the guest's TSC moved on by `advance_ns` of its own frequency: the
    /// time that passed since the state was saved (a migration), so that the guest's TSC runs
    /// on from its value at the pause plus the real pause, on any host. The TSC is written as a
    /// value (KVM derives this host's offset from it), so a destination whose own TSC differs
    /// from the source's changes nothing for the guest.
    pub fn apply_advanced(&self, state: &VcpuState, advance_ns: u64) -> Result<(), VcpuError> {
        let id = self.id;
        if state.id != id {
            return Err(VcpuError::BadState {
                id,
                msg: format!("state belongs to vCPU {}", state.id),
            });
        }
        if let Some(khz) = state.tsc_khz {
            if self.fd.get_tsc_khz().ok() != Some(khz) {
                self.fd
                    .set_tsc_khz(khz)
                    .map_err(kvm_err(id, "KVM_SET_TSC_KHZ"))?;
            }
        }
        self.fd
            .set_mp_state(state.mp_state)
            .map_err(kvm_err(id, "KVM_SET_MP_STATE"))?;
        self.fd
            .set_regs(&state.regs)
            .map_err(kvm_err(id, "KVM_SET_REGS"))?;
        self.fd
            .set_sregs(&state.sregs)
            .map_err(kvm_err(id, "KVM_SET_SREGS"))?;
        self.fd
            .set_fpu(&kvm_fpu::from(&state.fpu))
            .map_err(kvm_err(id, "KVM_SET_FPU"))?;
        self.set_xsave(&state.xsave)?;
        self.fd
            .set_xcrs(&state.xcrs)
            .map_err(kvm_err(id, "KVM_SET_XCRS"))?;
        self.fd
            .set_debug_regs(&state.debugregs)
            .map_err(kvm_err(id, "KVM_SET_DEBUGREGS"))?;
        self.fd
            .set_lapic(&state.lapic)
            .map_err(kvm_err(id, "KVM_SET_LAPIC"))?;
        let khz = state.tsc_khz.or_else(|| self.fd.get_tsc_khz().ok());
        let advance = match khz {
            Some(khz) if advance_ns > 0 => tsc_ticks(advance_ns, khz),
            _ => 0,
        };
        // The MSRs go in the order KVM listed them: IA32_TSC (0x10) before TSC_DEADLINE
        // (0x6e0), so that an armed deadline is compared with the guest's new TSC.
        let entries: Vec<kvm_msr_entry> = state
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data: if index == MSR_IA32_TSC {
                    data.wrapping_add(advance)
                } else {
                    data
                },
                ..Default::default()
            })
            .collect();
        let m = Msrs::from_entries(&entries).map_err(|e| VcpuError::BadState {
            id,
            msg: format!("{e:?}"),
        })?;
        let n = self.fd.set_msrs(&m).map_err(kvm_err(id, "KVM_SET_MSRS"))?;
        if n != entries.len() {
            return Err(VcpuError::Msrs {
                id,
                done: n,
                total: entries.len(),
                first: entries[n].index,
            });
        }
        self.fd
            .set_vcpu_events(&state.events)
            .map_err(kvm_err(id, "KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tsc_tests {
    use super::tsc_targets;

    const KHZ: u32 = 2_596_000; // one millisecond = 2_596_000 ticks

    #[test]
    fn vcpus_saved_one_after_the_other_share_the_latest_tsc_and_none_goes_backwards() {
        // vCPU 1 was saved 0.4 ms after vCPU 0 (seen in the nested host: with vCPU 0's TSC
        // for both, vCPU 1's went back by 1_058_791 ticks and the restore check refused it).
        let saved = [32_021_086_913, 32_022_145_704];
        let t = tsc_targets(&saved, KHZ, 0);
        assert_eq!(t, vec![32_022_145_704; 2]);
        let t = tsc_targets(&saved, KHZ, 5_000);
        assert_eq!(t, vec![32_022_150_704; 2]);
        // Whichever vCPU is later.
        let t = tsc_targets(&[saved[1], saved[0], saved[1] - 7], KHZ, 0);
        assert_eq!(t, vec![saved[1]; 3]);
        for (s, t) in saved.iter().zip(tsc_targets(&saved, KHZ, 0)) {
            assert!(t >= *s);
        }
    }

    #[test]
    fn a_vcpu_further_apart_keeps_its_distance() {
        let saved = [1_000_000_000, 1_000_000_100, 1_000_000_000 + 5 * 2_596_000];
        let t = tsc_targets(&saved, KHZ, 10);
        assert_eq!(t, vec![1_000_000_110, 1_000_000_110, saved[2] + 10]);
        // One vCPU, and none.
        assert_eq!(tsc_targets(&[42], KHZ, 1), vec![43]);
        assert!(tsc_targets(&[], KHZ, 1).is_empty());
    }
}
