//! The in-kernel platform devices of a VM: irqchip (PIC×2, IOAPIC), PIT and kvmclock.

use super::{kvm_err, VmError};
use crate::persist::{kvm_bytes, Persist};
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, KVM_CLOCK_REALTIME,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Where KVM puts its TSS (three pages below 4 GiB, inside the MMIO hole).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// VM-wide KVM device state: the two PICs, the IOAPIC, the PIT and kvmclock.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct PlatformState {
    #[serde(with = "kvm_bytes")]
    pub pic_master: kvm_irqchip,
    #[serde(with = "kvm_bytes")]
    pub pic_slave: kvm_irqchip,
    #[serde(with = "kvm_bytes")]
    pub ioapic: kvm_irqchip,
    #[serde(with = "kvm_bytes")]
    pub pit: kvm_pit_state2,
    #[serde(with = "kvm_bytes")]
    pub clock: kvm_clock_data,
}

/// The in-kernel platform devices of one VM.
pub struct Platform {
    vm: Arc<VmFd>,
}

impl Platform {
    /// Creates the in-kernel irqchip (PIC + IOAPIC + LAPICs) and PIT.
    pub fn create(vm: Arc<VmFd>) -> Result<Platform, VmError> {
        vm.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        Ok(Platform { vm })
    }
}

impl Persist for Platform {
    type State = PlatformState;
    type ConstructorArgs = Arc<VmFd>;
    type Error = VmError;

    fn save(&self) -> Result<PlatformState, VmError> {
        let chip = |id| -> Result<kvm_irqchip, VmError> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.vm
                .get_irqchip(&mut c)
                .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
            Ok(c)
        };
        Ok(PlatformState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
            clock: clock_with_realtime(self.vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?),
        })
    }

    fn restore(vm: Arc<VmFd>, s: &PlatformState) -> Result<Platform, VmError> {
        let p = Platform::create(vm)?;
        p.apply(s)?;
        Ok(p)
    }
}

/// CLOCK_REALTIME in nanoseconds.
pub fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A kvmclock reading that says when it was taken: kernels with KVM_CLOCK_REALTIME fill the
/// host's CLOCK_REALTIME at the same instant; for older ones (and PVM) it is read right after.
fn clock_with_realtime(mut c: kvm_clock_data) -> kvm_clock_data {
    if c.flags & KVM_CLOCK_REALTIME == 0 {
        c.realtime = realtime_ns();
        c.flags |= KVM_CLOCK_REALTIME;
    }
    c
}

impl PlatformState {
    /// Wall-clock nanoseconds from when this state was saved until `now_ns` (0 if the saving
    /// host's clock is ahead, or the state does not say when it was taken).
    pub fn elapsed_since_save(&self, now_ns: u64) -> u64 {
        if self.clock.flags & KVM_CLOCK_REALTIME == 0 {
            return 0;
        }
        now_ns.saturating_sub(self.clock.realtime)
    }
}

impl Platform {
    /// Leaves the two 8259 PICs as a PC's firmware and the kernel's real-mode setup code do
    /// before a kernel's 64-bit entry: initialized (vectors 0x08 and 0x70)
    /// with every line masked. A Linux kernel entered at its 64-bit entry skips the setup code
    /// that masks them, and with hardware-reduced ACPI it never touches the PICs; KVM routes
    /// ISA GSIs to the PIC as well as the IOAPIC, so unmasked, uninitialized PICs would turn
    /// every serial or virtio interrupt into a bogus ExtINT vector (4, 5, ...) on CPU 0.
    pub fn mask_legacy_pics(&self) -> Result<(), VmError> {
        for (id, base) in [
            (KVM_IRQCHIP_PIC_MASTER, 0x08u8),
            (KVM_IRQCHIP_PIC_SLAVE, 0x70),
        ] {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.vm
                .get_irqchip(&mut c)
                .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
            // SAFETY: for the PIC chip ids KVM fills the `pic` member of the union, a plain
            // struct of bytes, so reading and writing it is reading and writing those bytes.
            let pic = unsafe { &mut c.chip.pic };
            pic.imr = 0xff;
            pic.irq_base = base;
            pic.init_state = 0;
            pic.init4 = 1;
            self.vm
                .set_irqchip(&c)
                .map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }

    /// Loads saved state into freshly created in-kernel devices.
    pub fn apply(&self, s: &PlatformState) -> Result<(), VmError> {
        self.apply_advanced(s, 0)
    }

    /// Loads saved state with kvmclock moved on by `advance_ns` (see [`super::GuestTime`]).
    pub fn apply_advanced(&self, s: &PlatformState, advance_ns: u64) -> Result<(), VmError> {
        for (c, id) in [
            (&s.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&s.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&s.ioapic, KVM_IRQCHIP_IOAPIC),
        ] {
            if c.chip_id != id {
                return Err(VmError::Incompatible(format!(
                    "irqchip state has chip id {} where {id} belongs",
                    c.chip_id
                )));
            }
            self.vm.set_irqchip(c).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        self.vm.set_pit2(&s.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
        // Only the clock value is restored; KVM rejects flags it did not produce here.
        let clock = kvm_clock_data {
            clock: s.clock.clock.wrapping_add(advance_ns),
            ..Default::default()
        };
        self.vm
            .set_clock(&clock)
            .map_err(kvm_err("KVM_SET_CLOCK"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_pics_are_left_initialized_and_masked() {
        let kvm = crate::open_kvm().unwrap();
        let vm = Arc::new(kvm.create_vm().unwrap());
        let p = Platform::create(vm.clone()).unwrap();
        p.mask_legacy_pics().unwrap();
        let s = p.save().unwrap();
        for (c, base) in [(&s.pic_master, 0x08), (&s.pic_slave, 0x70)] {
            // SAFETY: KVM filled the `pic` member for the PIC chip ids.
            let pic = unsafe { c.chip.pic };
            assert_eq!((pic.imr, pic.irq_base, pic.init_state), (0xff, base, 0));
        }
    }
}
