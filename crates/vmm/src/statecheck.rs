//! The restored machine is the saved machine: after a vCPU's state was loaded, it is read back
//! from KVM and compared with what was saved, piece by piece (registers, segments with their
//! hidden parts, TR and LDT, control registers, EFER, FPU, XSAVE, XCRs, debug registers, LAPIC,
//! pending events, MP state and every MSR). What may legitimately differ is named here: the
//! TSC runs on (it must not go backwards), the LAPIC timer's current count counts down, the
//! LAPIC's PPR (derived from TPR and ISR, which are compared) may be stale, and
//! SYSENTER_ESP/EIP may come back as their low 32 bits (as AMD CPUs keep them).
//!
//! The VM-wide platform is read back too: both PICs and the IOAPIC byte for byte (except the
//! timer's own interrupt line, which the running PIT may raise between the load and the
//! read-back), the PIT's channels (except when each count was loaded: KVM stamps its own
//! host time there) and kvmclock (at least the saved value plus the time the guest is moved
//! on by, and not seconds past it).
//!
//! Used by `ferry-vmm restore/receive --verify-state` (a difference fails the restore) and as a
//! debug assertion in the restore path.

use crate::vcpu::VcpuState;
use crate::vm::PlatformState;
use kvm_bindings::kvm_segment;
use kvm_bindings::{kvm_pit_channel_state, KVM_IRQCHIP_IOAPIC};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use zerocopy::IntoBytes;

static ENABLED: AtomicBool = AtomicBool::new(cfg!(debug_assertions));

/// Turns the read-back check of every restore in this process on (a worker's
/// `--verify-state`); always on in debug builds.
pub fn enable(on: bool) {
    ENABLED.store(on || cfg!(debug_assertions), Ordering::SeqCst);
}

/// Whether restores are checked.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// MSR_IA32_TSC: advances between the save and the read-back.
const MSR_TSC: u32 = 0x10;
/// Hyper-V's HV_X64_MSR_TIME_REF_COUNT (0x40000020, the partition reference counter), which
/// KVM lists on SVM and VMX hosts: a clock in 100 ns units that advances like the TSC.
const MSR_HV_CLOCKS: [u32; 1] = [0x4000_0020];
/// Hyper-V's HV_X64_MSR_VP_RUNTIME (0x40000010): KVM computes it from the run time of the
/// host thread that reads it (`current`) plus an offset set by the thread that wrote it, so a
/// value saved on a vCPU thread and read back on the loading thread differ by the two threads'
/// run times, in either direction (seen in the nested host: saved 2^64-167998, read back
/// 40435). Not compared; the guest cannot see it either (Ferry exposes no Hyper-V CPUID).
const MSR_HV_VP_RUNTIME: u32 = 0x4000_0010;
/// MSR_IA32_TSC_ADJUST: KVM may adjust it when it synchronizes the TSCs of a new VM's vCPUs.
const MSR_TSC_ADJUST: u32 = 0x3b;
/// IA32_SYSENTER_ESP and IA32_SYSENTER_EIP. AMD CPUs keep only their low 32 bits, and so does
/// KVM on SVM when it writes them for a guest whose CPUID is not Intel's (the high half is
/// kept only to emulate an Intel CPU). Under QEMU's emulated AMD CPU (the nested test host) the
/// guest's own WRMSR keeps all 64 bits, and KVM (6.1) reads SYSENTER_ESP back from the VMCB
/// untruncated: the source saves a 64-bit value that the destination's KVM cuts to 32 bits.
/// Linux writes 64-bit addresses there; SYSENTER does not exist in long mode on AMD. The low
/// half must come back unchanged.
const MSR_SYSENTER_ESP_EIP: [u32; 2] = [0x175, 0x176];
/// LAPIC current-count register (offset in the LAPIC page): the timer counts down.
const LAPIC_TMCCT: usize = 0x390;
/// LAPIC processor-priority register: derived from the TPR and the highest vector in service
/// (ISR), both compared. KVM (6.1) recomputes it in KVM_SET_LAPIC before it recounts the
/// restored ISR, so a vCPU saved inside an interrupt handler reads back the TPR's class
/// (seen: saved 0xe0, now 0x10) until its next priority update; KVM's interrupt decisions
/// compute the priority afresh, so the guest gets the same interrupts.
const LAPIC_PPR: usize = 0xa0;

fn seg(name: &str, a: &kvm_segment, b: &kvm_segment, out: &mut Vec<String>) {
    if a.as_bytes() != b.as_bytes() {
        out.push(format!("{name}: saved {a:?}, now {b:?}"));
    }
}

/// Every difference between the state `saved` and the state `now` read back after loading
/// it, as one line each (empty: the same machine).
pub fn vcpu_differences(saved: &VcpuState, now: &VcpuState) -> Vec<String> {
    let mut out = Vec::new();
    let id = saved.id;
    let mut d = |what: &str, same: bool, detail: String| {
        if !same {
            out.push(format!("vCPU {id} {what}: {detail}"));
        }
    };
    d(
        "registers",
        saved.regs.as_bytes() == now.regs.as_bytes(),
        format!("saved {:?}, now {:?}", saved.regs, now.regs),
    );
    let (s, n) = (&saved.sregs, &now.sregs);
    let mut segs = Vec::new();
    for (name, a, b) in [
        ("cs", &s.cs, &n.cs),
        ("ds", &s.ds, &n.ds),
        ("es", &s.es, &n.es),
        ("fs", &s.fs, &n.fs),
        ("gs", &s.gs, &n.gs),
        ("ss", &s.ss, &n.ss),
        ("tr", &s.tr, &n.tr),
        ("ldt", &s.ldt, &n.ldt),
    ] {
        seg(name, a, b, &mut segs);
    }
    for sd in segs {
        d("segment", false, sd);
    }
    d(
        "descriptor tables",
        s.gdt.as_bytes() == n.gdt.as_bytes() && s.idt.as_bytes() == n.idt.as_bytes(),
        format!(
            "gdt {:?} / {:?}, idt {:?} / {:?}",
            s.gdt, n.gdt, s.idt, n.idt
        ),
    );
    d(
        "control registers",
        (s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base)
            == (n.cr0, n.cr2, n.cr3, n.cr4, n.cr8, n.efer, n.apic_base),
        format!(
            "saved cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} cr8 {:#x} efer {:#x} apic_base {:#x}, now {:#x} {:#x} {:#x} {:#x} {:#x} {:#x} {:#x}",
            s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base,
            n.cr0, n.cr2, n.cr3, n.cr4, n.cr8, n.efer, n.apic_base
        ),
    );
    d(
        "pending interrupt bitmap",
        s.interrupt_bitmap == n.interrupt_bitmap,
        format!(
            "saved {:x?}, now {:x?}",
            s.interrupt_bitmap, n.interrupt_bitmap
        ),
    );
    d(
        "FPU",
        saved.fpu == now.fpu,
        "legacy FPU/SSE state differs".into(),
    );
    d(
        "XSAVE area",
        saved.xsave == now.xsave,
        format!(
            "{} of {} words differ",
            saved
                .xsave
                .iter()
                .zip(&now.xsave)
                .filter(|(a, b)| a != b)
                .count(),
            saved.xsave.len().max(now.xsave.len())
        ),
    );
    d(
        "XCRs",
        saved.xcrs.as_bytes() == now.xcrs.as_bytes(),
        format!("saved {:?}, now {:?}", saved.xcrs, now.xcrs),
    );
    d(
        "debug registers",
        saved.debugregs.as_bytes() == now.debugregs.as_bytes(),
        format!("saved {:?}, now {:?}", saved.debugregs, now.debugregs),
    );
    d(
        "vCPU events",
        saved.events.as_bytes() == now.events.as_bytes(),
        format!("saved {:?}, now {:?}", saved.events, now.events),
    );
    d(
        "MP state",
        saved.mp_state.mp_state == now.mp_state.mp_state,
        format!(
            "saved {}, now {}",
            saved.mp_state.mp_state, now.mp_state.mp_state
        ),
    );
    let (la, lb) = (saved.lapic.regs.as_bytes(), now.lapic.regs.as_bytes());
    let lapic_diff: Vec<usize> = (0..la.len().min(lb.len()) / 4)
        .map(|w| w * 4)
        .filter(|&o| o != LAPIC_TMCCT && o != LAPIC_PPR && la[o..o + 4] != lb[o..o + 4])
        .collect();
    d(
        "LAPIC",
        lapic_diff.is_empty(),
        format!(
            "registers at {}",
            lapic_diff
                .iter()
                .map(|o| format!(
                    "{o:#x} (saved {:#x}, now {:#x})",
                    u32::from_le_bytes(la[*o..*o + 4].try_into().unwrap_or_default()),
                    u32::from_le_bytes(lb[*o..*o + 4].try_into().unwrap_or_default())
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    let a: BTreeMap<u32, u64> = saved.msrs.iter().copied().collect();
    let b: BTreeMap<u32, u64> = now.msrs.iter().copied().collect();
    for (idx, va) in &a {
        match b.get(idx) {
            None => d(
                "MSR",
                false,
                format!("{idx:#x} was saved but cannot be read back"),
            ),
            Some(vb) if *idx == MSR_TSC || MSR_HV_CLOCKS.contains(idx) => d(
                if *idx == MSR_TSC {
                    "TSC"
                } else {
                    "Hyper-V clock MSR"
                },
                vb >= va,
                format!("{idx:#x} went backwards: saved {va}, now {vb}"),
            ),
            Some(_) if *idx == MSR_TSC_ADJUST || *idx == MSR_HV_VP_RUNTIME => {}
            Some(vb) if MSR_SYSENTER_ESP_EIP.contains(idx) => d(
                "MSR",
                vb == va || *vb == va & 0xffff_ffff,
                format!("{idx:#x}: saved {va:#x}, now {vb:#x}"),
            ),
            Some(vb) => d(
                "MSR",
                va == vb,
                format!("{idx:#x}: saved {va:#x}, now {vb:#x}"),
            ),
        }
    }
    out
}

/// The PIT's interrupt: IRQ 0 on the master PIC, GSI 2 on the IOAPIC (the MADT's override).
const PIT_PIC_IRQ_BIT: u8 = 1 << 0;
const PIT_IOAPIC_IRR_BIT: u32 = 1 << 2;
/// How far past the expected value a read-back kvmclock may be: the load and the read-back
/// are microseconds apart; a second means the clock was not restored but restarted elsewhere.
const CLOCK_SLACK_NS: u64 = 1_000_000_000;

/// Every difference between the platform state `saved` (loaded with kvmclock moved on by
/// `advance_ns`) and the state `now` read back afterwards.
pub fn platform_differences(
    saved: &PlatformState,
    now: &PlatformState,
    advance_ns: u64,
) -> Vec<String> {
    let mut out = Vec::new();
    for (name, a, b) in [
        ("master PIC", &saved.pic_master, &now.pic_master),
        ("slave PIC", &saved.pic_slave, &now.pic_slave),
    ] {
        // SAFETY: both are PIC chips (their ids were checked at load and KVM fills the `pic`
        // member for them); the member is a plain struct of bytes.
        let (pa, pb) = unsafe { (a.chip.pic, b.chip.pic) };
        let timer = if name == "master PIC" {
            PIT_PIC_IRQ_BIT
        } else {
            0
        };
        let (mut qa, mut qb) = (pa, pb);
        for q in [&mut qa, &mut qb] {
            q.irr &= !timer;
            q.last_irr &= !timer;
        }
        if qa.as_bytes() != qb.as_bytes() || pb.irr & pa.irr != pa.irr {
            out.push(format!("{name}: saved {pa:?}, now {pb:?}"));
        }
    }
    if saved.ioapic.chip_id == KVM_IRQCHIP_IOAPIC && now.ioapic.chip_id == KVM_IRQCHIP_IOAPIC {
        // SAFETY: the chip id says KVM filled the `ioapic` member, a plain struct of integers.
        let (ia, ib) = unsafe { (saved.ioapic.chip.ioapic, now.ioapic.chip.ioapic) };
        let (mut ja, mut jb) = (ia, ib);
        ja.irr &= !PIT_IOAPIC_IRR_BIT;
        jb.irr &= !PIT_IOAPIC_IRR_BIT;
        if ja.as_bytes() != jb.as_bytes() {
            let entries: Vec<String> = ia
                .redirtbl
                .iter()
                .zip(&ib.redirtbl)
                .enumerate()
                // SAFETY: `bits` covers the whole 8-byte redirection entry.
                .filter(|(_, (x, y))| unsafe { x.bits != y.bits })
                // SAFETY: as above.
                .map(|(i, (x, y))| unsafe { format!("GSI {i} {:#x} -> {:#x}", x.bits, y.bits) })
                .collect();
            out.push(format!(
                "IOAPIC: saved id {} ioregsel {:#x} irr {:#x} base {:#x}, now {} {:#x} {:#x} {:#x}; {}",
                ia.id,
                ia.ioregsel,
                ia.irr,
                ia.base_address,
                ib.id,
                ib.ioregsel,
                ib.irr,
                ib.base_address,
                if entries.is_empty() {
                    "redirection table the same".to_string()
                } else {
                    entries.join(", ")
                }
            ));
        }
    } else {
        out.push("IOAPIC: not an IOAPIC chip".into());
    }
    let channel = |c: &kvm_pit_channel_state| kvm_pit_channel_state {
        count_load_time: 0,
        ..*c
    };
    for (i, (a, b)) in saved.pit.channels.iter().zip(&now.pit.channels).enumerate() {
        if channel(a).as_bytes() != channel(b).as_bytes() {
            out.push(format!("PIT channel {i}: saved {a:?}, now {b:?}"));
        }
    }
    if saved.pit.flags != now.pit.flags {
        out.push(format!(
            "PIT flags: saved {:#x}, now {:#x}",
            saved.pit.flags, now.pit.flags
        ));
    }
    let want = saved.clock.clock.wrapping_add(advance_ns);
    if now.clock.clock < want || now.clock.clock - want > CLOCK_SLACK_NS {
        out.push(format!(
            "kvmclock: saved {} ns, moved on by {advance_ns} ns, read back {} ns",
            saved.clock.clock, now.clock.clock
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_differences_only() {
        let s = VcpuState::default_for_tests(0);
        let mut n = s.clone();
        assert!(vcpu_differences(&s, &n).is_empty());
        // The TSC may run on; the LAPIC timer may count down.
        n.msrs = vec![(MSR_TSC, 2000), (0x1b, 0xfee00900)];
        let mut s2 = s.clone();
        s2.msrs = vec![(MSR_TSC, 1000), (0x1b, 0xfee00900)];
        n.lapic.regs[LAPIC_TMCCT] = 5;
        n.lapic.regs[LAPIC_PPR] = 0x10;
        assert!(
            vcpu_differences(&s2, &n).is_empty(),
            "{:?}",
            vcpu_differences(&s2, &n)
        );
        // A TSC that went back, a changed TR, a changed MSR: each named.
        n.msrs = vec![(MSR_TSC, 10), (0x1b, 0xfee00800)];
        n.sregs.tr.type_ = 9;
        let d = vcpu_differences(&s2, &n);
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d
            .iter()
            .any(|l| l.contains("TSC") && l.contains("backwards")));
        assert!(d.iter().any(|l| l.contains("tr:")));
        assert!(d.iter().any(|l| l.contains("0x1b")));
        // SYSENTER_ESP/EIP: the low half only, as on AMD; a changed low half is named.
        s2.msrs = vec![(0x175, 0xffff_fe00_0000_3000), (0x176, 0x1234)];
        let mut n2 = s2.clone();
        n2.msrs = vec![(0x175, 0x3000), (0x176, 0x1234)];
        assert!(vcpu_differences(&s2, &n2).is_empty());
        n2.msrs = vec![(0x175, 0x4000), (0x176, 0x1234)];
        assert_eq!(vcpu_differences(&s2, &n2).len(), 1);
        // HV VP_RUNTIME depends on the reading thread: not compared; TIME_REF_COUNT must not
        // go back.
        s2.msrs = vec![(MSR_HV_VP_RUNTIME, u64::MAX - 167_998), (0x4000_0020, 500)];
        n2.msrs = vec![(MSR_HV_VP_RUNTIME, 40_435), (0x4000_0020, 400)];
        let d = vcpu_differences(&s2, &n2);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].contains("0x40000020"), "{d:?}");
    }

    #[test]
    fn platform_read_back_equals_what_was_loaded_and_names_what_does_not() {
        use crate::persist::Persist;
        use crate::vm::Platform;
        use std::sync::Arc;
        let kvm = crate::open_kvm().unwrap();
        let vm = Arc::new(kvm.create_vm().unwrap());
        let p = Platform::create(vm.clone()).unwrap();
        p.mask_legacy_pics().unwrap();
        let mut saved = p.save().unwrap();
        // A state that is not the fresh one: an IOAPIC entry programmed, a PIT count loaded.
        // SAFETY: chip_id is the IOAPIC's, so `ioapic` is the member KVM filled and reads.
        unsafe { saved.ioapic.chip.ioapic.redirtbl[4].bits = 0x0000_0000_0000_0031 };
        saved.pit.channels[2].count = 0x1234;
        saved.pit.channels[2].mode = 2;
        // The guest is moved on by 5 s.
        let advance = 5_000_000_000;
        let fresh = Platform::create(Arc::new(kvm.create_vm().unwrap())).unwrap();
        fresh.apply_advanced(&saved, advance).unwrap();
        let now = fresh.save().unwrap();
        let d = platform_differences(&saved, &now, advance);
        assert!(d.is_empty(), "{d:?}");
        // Each kind of difference is named.
        let mut other = now;
        // SAFETY: as above.
        unsafe { other.ioapic.chip.ioapic.redirtbl[4].bits = 0x0001_0000 };
        other.pit.channels[2].count = 7;
        other.pic_master.chip.pic.imr = 0;
        other.clock.clock = saved.clock.clock + advance - 1;
        let d = platform_differences(&saved, &other, advance);
        assert_eq!(d.len(), 4, "{d:?}");
        assert!(d.iter().any(|l| l.contains("GSI 4")), "{d:?}");
        assert!(d.iter().any(|l| l.starts_with("PIT channel 2")), "{d:?}");
        assert!(d.iter().any(|l| l.starts_with("master PIC")), "{d:?}");
        assert!(d.iter().any(|l| l.starts_with("kvmclock")), "{d:?}");
        // A clock restarted far ahead is named too.
        other = fresh.save().unwrap();
        other.clock.clock = saved.clock.clock + advance + 3 * CLOCK_SLACK_NS;
        assert_eq!(platform_differences(&saved, &other, advance).len(), 1);
    }
}
