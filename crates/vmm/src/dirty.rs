//! Dirty page tracking for live migration.
//!
//! KVM's dirty bitmap with manual protection (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`): reading the
//! bitmap (`KVM_GET_DIRTY_LOG`) does not re-protect anything; `KVM_CLEAR_DIRTY_LOG` clears
//! exactly the bits we are about to send and write-protects those pages again, so a guest write
//! after the clear is caught by the next round. kvm-ioctls wraps only GET; CLEAR is wrapped here.
//! The dirty ring is not used: on this project's PVM hosts it loses entries when emulated guest
//! ring-0 code writes many pages (see PLATFORM.md).
//!
//! Pages the VMM itself writes through vm-memory (device emulation) are recorded in vm-memory's
//! `AtomicBitmap` and merged in, so migration never misses them.

use crate::memory::{GuestRam, KVM_MEM_LOG_DIRTY_PAGES, PAGE_SIZE};
use kvm_bindings::{
    kvm_clear_dirty_log, kvm_enable_cap, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::VmFd;

vmm_sys_util::ioctl_iowr_nr!(
    KVM_CLEAR_DIRTY_LOG,
    kvm_bindings::KVMIO,
    0xc0,
    kvm_clear_dirty_log
);

/// Dirty tracking errors.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("KVM lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: {0}")]
    NoManualProtect(kvm_ioctls::Error),
    #[error("cannot turn dirty logging {state} on slot {slot}: {err}")]
    Slot {
        state: &'static str,
        slot: u32,
        err: String,
    },
    #[error("KVM_GET_DIRTY_LOG on slot {slot} failed: {err}")]
    Get { slot: u32, err: kvm_ioctls::Error },
    #[error("KVM_CLEAR_DIRTY_LOG on slot {slot} failed: {err}")]
    Clear { slot: u32, err: std::io::Error },
}

/// A bitmap over all RAM pages (index = memfd offset / 4 KiB), 64 pages per word.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageBitmap {
    pub words: Vec<u64>,
    pub pages: u64,
}

impl PageBitmap {
    /// All clear.
    pub fn new(pages: u64) -> PageBitmap {
        PageBitmap {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    /// All set.
    pub fn full(pages: u64) -> PageBitmap {
        let mut b = PageBitmap {
            words: vec![!0u64; pages.div_ceil(64) as usize],
            pages,
        };
        if !pages.is_multiple_of(64) {
            let last = b.words.len() - 1;
            b.words[last] = (1u64 << (pages % 64)) - 1;
        }
        b
    }

    pub fn set(&mut self, page: u64) {
        self.words[(page / 64) as usize] |= 1 << (page % 64);
    }

    pub fn clear(&mut self, page: u64) {
        self.words[(page / 64) as usize] &= !(1 << (page % 64));
    }

    pub fn get(&self, page: u64) -> bool {
        self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Adds every page of `other`.
    pub fn union_with(&mut self, other: &PageBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// ORs `words` (a region bitmap) in at page offset `first` (a multiple of 64).
    fn or_at(&mut self, first: u64, words: &[u64]) {
        debug_assert_eq!(first % 64, 0);
        let base = (first / 64) as usize;
        for (i, w) in words.iter().enumerate() {
            if let Some(dst) = self.words.get_mut(base + i) {
                *dst |= *w;
            }
        }
    }

    /// Set pages as ascending runs `(first, count)`.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (wi, &w) in self.words.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let b = w.trailing_zeros() as u64;
                let p = wi as u64 * 64 + b;
                w &= w - 1;
                if p >= self.pages {
                    break;
                }
                match out.last_mut() {
                    Some((f, c)) if *f + *c == p => *c += 1,
                    _ => out.push((p, 1)),
                }
            }
        }
        out
    }
}

/// Turns on manual dirty-log protection for `vm` (once per VM, before tracking starts).
pub fn enable_manual_protect(vm: &VmFd) -> Result<(), DirtyError> {
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = (KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET) as u64;
    vm.enable_cap(&cap).map_err(DirtyError::NoManualProtect)
}

/// Dirty tracking over all RAM slots of one VM.
pub struct DirtyLog<'a> {
    vm: &'a VmFd,
    ram: &'a GuestRam,
}

impl<'a> DirtyLog<'a> {
    /// Starts logging on every slot. With INITIALLY_SET every page starts dirty (and nothing
    /// is write-protected until it is cleared), which is what the first full pass wants.
    pub fn start(vm: &'a VmFd, ram: &'a GuestRam) -> Result<DirtyLog<'a>, DirtyError> {
        ram.register(vm, KVM_MEM_LOG_DIRTY_PAGES)
            .map_err(|e| DirtyError::Slot {
                state: "on",
                slot: 0,
                err: e.to_string(),
            })?;
        Ok(DirtyLog { vm, ram })
    }

    /// Stops logging (the slots are registered again without the flag).
    pub fn stop(self) -> Result<(), DirtyError> {
        self.ram.register(self.vm, 0).map_err(|e| DirtyError::Slot {
            state: "off",
            slot: 0,
            err: e.to_string(),
        })
    }

    /// Returns the pages dirtied since the previous call (KVM's log merged with the VMM's),
    /// and re-arms tracking for exactly those pages. Read page contents only after this.
    pub fn collect(&self) -> Result<PageBitmap, DirtyError> {
        let layout = self.ram.layout();
        let mut out = PageBitmap::new(layout.total_pages());
        for (slot, region) in layout.regions.iter().enumerate() {
            let slot = slot as u32;
            let first = region.file_offset / PAGE_SIZE;
            let mut bits = self
                .vm
                .get_dirty_log(slot, region.size as usize)
                .map_err(|err| DirtyError::Get { slot, err })?;
            if bits.iter().any(|&w| w != 0) {
                self.clear(slot, region.size / PAGE_SIZE, &mut bits)?;
                out.or_at(first, &bits);
            }
            let vmm_bits = self.ram.take_vmm_dirty(slot as usize);
            out.or_at(first, &vmm_bits);
        }
        Ok(out)
    }

    fn clear(&self, slot: u32, pages: u64, bits: &mut [u64]) -> Result<(), DirtyError> {
        let mut c = kvm_clear_dirty_log {
            slot,
            num_pages: pages as u32,
            first_page: 0,
            ..Default::default()
        };
        c.__bindgen_anon_1.dirty_bitmap = bits.as_mut_ptr() as *mut libc::c_void;
        // SAFETY: `bits` holds one bit per page of the slot (KVM_GET_DIRTY_LOG sized it), lives
        // across the call, and the ioctl only reads it.
        let r = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(self.vm, KVM_CLEAR_DIRTY_LOG(), &c) };
        if r < 0 {
            return Err(DirtyError::Clear {
                slot,
                err: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_runs() {
        let mut b = PageBitmap::new(200);
        for p in [0, 1, 2, 63, 64, 65, 130, 199] {
            b.set(p);
        }
        assert_eq!(b.count(), 8);
        assert_eq!(b.runs(), vec![(0, 3), (63, 3), (130, 1), (199, 1)]);
        assert_eq!(PageBitmap::full(70).count(), 70);
    }
}
