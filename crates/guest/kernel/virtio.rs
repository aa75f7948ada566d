//! virtio-mmio (version 2, "modern") transport and driver memory, ring 3, CPU 0 only.
//!
//! Every register access is one MMIO exit (~65 us on the Ferry platform), so the drivers touch
//! registers only to set up, to notify (QueueNotify, skipped while the device says
//! VIRTQ_USED_F_NO_NOTIFY) and for rare status checks; completions are found by polling the
//! used rings in RAM. Interrupts stay off: the available rings say VIRTQ_AVAIL_F_NO_INTERRUPT,
//! InterruptStatus is never acknowledged, and whatever IRQ line the device raises ends at a
//! masked IOAPIC pin.

use crate::cmdline::VirtioMmio;
use crate::line::Line;
use crate::entry::panic_line;
use crate::virtq::{Virtq, MAX_SIZE, RING_BYTES};

pub const MAGIC: u32 = 0x7472_6976; // "virt"
pub const ID_NET: u32 = 1;
pub const ID_BLOCK: u32 = 2;

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const REG_CONFIG: u64 = 0x100;

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 64;
pub const STATUS_FAILED: u32 = 128;

/// VIRTIO_F_VERSION_1: required (modern device).
pub const F_VERSION_1: u64 = 1 << 32;

/// One virtio-mmio transport.
#[derive(Clone, Copy, Debug)]
pub struct Mmio {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
    /// "virtio-blk" / "virtio-net", for messages.
    pub name: &'static str,
}

impl Mmio {
    pub const NONE: Mmio = Mmio {
        base: 0,
        size: 0,
        irq: 0,
        name: "",
    };

    fn read32(&self, off: u64) -> u32 {
        // SAFETY: a register of the transport (identity mapped, user accessible); exits to the
        // VMM.
        unsafe { ((self.base + off) as *const u32).read_volatile() }
    }

    fn write32(&self, off: u64, v: u32) {
        // SAFETY: as in read32.
        unsafe { ((self.base + off) as *mut u32).write_volatile(v) }
    }

    pub fn status(&self) -> u32 {
        self.read32(REG_STATUS)
    }

    fn set_status(&self, s: u32) {
        self.write32(REG_STATUS, s)
    }

    /// Tells the device that queue `q` has new buffers.
    pub fn notify(&self, q: u32) {
        self.write32(REG_QUEUE_NOTIFY, q)
    }

    fn config_generation(&self) -> u32 {
        self.read32(REG_CONFIG_GENERATION)
    }

    /// Byte `off` of the device configuration space.
    pub fn config8(&self, off: u64) -> u8 {
        // SAFETY: as in read32 (the caller checked the window is large enough).
        unsafe { ((self.base + REG_CONFIG + off) as *const u8).read_volatile() }
    }

    /// Little-endian u32 at `off` of the device configuration space.
    pub fn config32(&self, off: u64) -> u32 {
        self.read32(REG_CONFIG + off)
    }

    /// Reads configuration fields consistently: repeats `f` until the configuration generation
    /// is the same before and after.
    pub fn config_read<T>(&self, mut f: impl FnMut(&Mmio) -> T) -> T {
        loop {
            let g = self.config_generation();
            let v = f(self);
            if self.config_generation() == g {
                return v;
            }
        }
    }

    fn fail<T>(&self, what: &str) -> Result<T, ()> {
        self.set_status(self.status() | STATUS_FAILED);
        panic_line()
            .str(self.name)
            .str(" at 0x")
            .hex(self.base)
            .str(": ")
            .str(what)
            .send();
        Err(())
    }

    /// PANIC line and halt this CPU if the device reports DEVICE_NEEDS_RESET or FAILED (one
    /// MMIO exit; call it rarely).
    pub fn check_alive(&self) {
        let s = self.status();
        if s & (STATUS_NEEDS_RESET | STATUS_FAILED) != 0 || s & STATUS_DRIVER_OK == 0 {
            panic_line()
                .str(self.name)
                .str(" at 0x")
                .hex(self.base)
                .str(": device ")
                .str(if s & STATUS_NEEDS_RESET != 0 {
                    "needs reset"
                } else {
                    "failed or was reset"
                })
                .str(" (status=0x")
                .hex(u64::from(s))
                .str(")")
                .send();
            crate::rt::sys_halt();
        }
    }

    /// Reset, ACKNOWLEDGE | DRIVER, feature negotiation (VERSION_1 required, plus whatever of
    /// `wanted` the device offers), FEATURES_OK. Returns the negotiated features.
    pub fn begin_init(&self, wanted: u64) -> Result<u64, ()> {
        self.set_status(0);
        let mut tries = 0;
        while self.status() != 0 {
            tries += 1;
            if tries == 1000 {
                return self.fail("device does not finish its reset");
            }
        }
        self.set_status(STATUS_ACKNOWLEDGE);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.write32(REG_DEVICE_FEATURES_SEL, 0);
        let lo = self.read32(REG_DEVICE_FEATURES);
        self.write32(REG_DEVICE_FEATURES_SEL, 1);
        let hi = self.read32(REG_DEVICE_FEATURES);
        let offered = u64::from(lo) | u64::from(hi) << 32;
        if offered & F_VERSION_1 == 0 {
            return self.fail("device does not offer VIRTIO_F_VERSION_1");
        }
        let accept = offered & (wanted | F_VERSION_1);
        self.write32(REG_DRIVER_FEATURES_SEL, 0);
        self.write32(REG_DRIVER_FEATURES, accept as u32);
        self.write32(REG_DRIVER_FEATURES_SEL, 1);
        self.write32(REG_DRIVER_FEATURES, (accept >> 32) as u32);
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.set_status(s);
        if self.status() & STATUS_FEATURES_OK == 0 {
            return self.fail("device did not accept our features (FEATURES_OK not set)");
        }
        Ok(accept)
    }

    /// Sets up queue `q` with min(QueueNumMax, [`MAX_SIZE`]) entries (rounded down to a power of
    /// two) in fresh driver memory.
    pub fn setup_queue(&self, q: u32) -> Result<Virtq, ()> {
        self.write32(REG_QUEUE_SEL, q);
        if self.read32(REG_QUEUE_READY) != 0 {
            self.fail("queue already in use after reset")?;
        }
        let max = self.read32(REG_QUEUE_NUM_MAX);
        if max == 0 {
            self.fail("queue not available (QueueNumMax = 0)")?;
        }
        let n = max.min(u32::from(MAX_SIZE));
        let n = 1u16 << (31 - n.leading_zeros());
        let mem = dma_alloc(RING_BYTES, 4096);
        // SAFETY: fresh, aligned driver memory of RING_BYTES, used only by this queue.
        let vq = unsafe { Virtq::new(mem, n) };
        let (desc, avail, used) = vq.addrs();
        self.write32(REG_QUEUE_NUM, u32::from(n));
        self.write32(REG_QUEUE_DESC_LOW, desc as u32);
        self.write32(REG_QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.write32(REG_QUEUE_DRIVER_LOW, avail as u32);
        self.write32(REG_QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        self.write32(REG_QUEUE_DEVICE_LOW, used as u32);
        self.write32(REG_QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        self.write32(REG_QUEUE_READY, 1);
        Ok(vq)
    }

    /// DRIVER_OK: the device is live.
    pub fn driver_ok(&self) -> Result<(), ()> {
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        let s = self.status();
        if s & (STATUS_NEEDS_RESET | STATUS_FAILED) != 0 || s & STATUS_DRIVER_OK == 0 {
            return self.fail("device refused DRIVER_OK");
        }
        Ok(())
    }
}

/// Finds the first transport of `devs` holding device `device_id` (a modern, version 2 one).
/// Transports with device ID 0 (no device) and other devices are skipped. PANIC line (and Err)
/// if an entry lies outside the identity map (`mapped` bytes), has no virtio magic, if the
/// device found is a legacy (version 1) one, or if there is none.
pub fn find(
    devs: &[VirtioMmio],
    device_id: u32,
    name: &'static str,
    mapped: u64,
) -> Result<Mmio, ()> {
    for d in devs {
        if d.base.checked_add(d.size).is_none_or(|end| end > mapped) {
            panic_line()
                .str("bad cmdline: virtio_mmio.device at 0x")
                .hex(d.base)
                .str(" (outside the guest's identity map of ")
                .dec(mapped >> 30)
                .str(" GiB)")
                .send();
            return Err(());
        }
        let m = Mmio {
            base: d.base,
            size: d.size,
            irq: d.irq,
            name,
        };
        let magic = m.read32(REG_MAGIC);
        if magic != MAGIC {
            panic_line()
                .str("virtio-mmio at 0x")
                .hex(d.base)
                .str(": bad magic 0x")
                .hex(u64::from(magic))
                .str(" (no virtio-mmio transport there)")
                .send();
            return Err(());
        }
        if m.read32(REG_DEVICE_ID) != device_id {
            continue;
        }
        match m.read32(REG_VERSION) {
            2 => return Ok(m),
            1 => {
                panic_line()
                    .str(name)
                    .str(" at 0x")
                    .hex(d.base)
                    .str(" is a legacy virtio-mmio device (version 1); only version 2 is supported")
                    .str(" (QEMU: -global virtio-mmio.force-legacy=false)")
                    .send();
                return Err(());
            }
            v => {
                panic_line()
                    .str(name)
                    .str(" at 0x")
                    .hex(d.base)
                    .str(": unsupported virtio-mmio version ")
                    .dec(u64::from(v))
                    .send();
                return Err(());
            }
        }
    }
    panic_line()
        .str(match device_id {
            ID_BLOCK => "no virtio block device (",
            ID_NET => "no virtio net device (",
            _ => "no such virtio device (",
        })
        .dec(devs.len() as u64)
        .str(" virtio_mmio.device entries on the command line)")
        .send();
    Err(())
}

/// The device's `virtio-xxx base=0x<hex> irq=<n> features=0x<hex>` line prefix.
pub fn device_line(m: &Mmio, features: u64) -> Line {
    let mut l = Line::new();
    l.str(m.name)
        .str(" base=0x")
        .hex(m.base)
        .str(" irq=")
        .dec(u64::from(m.irq))
        .str(" features=0x")
        .hex(features);
    l
}

// ------------------------------------------------------------------------------------------
// Driver memory: one 4 KiB-aligned block in the kernel's bss (below 16 MiB, so never in the
// working set), handed out by a bump allocator on CPU 0 during setup.

/// Bytes of driver memory (rings and buffers of one device).
pub const DMA_BYTES: usize = 256 * 1024;

#[repr(C, align(4096))]
struct DmaArea([u8; DMA_BYTES]);

static mut DMA: DmaArea = DmaArea([0; DMA_BYTES]);
static mut DMA_USED: usize = 0;

/// Forgets all allocations (called once, before the device setup; keeps a reboot into a
/// not-reloaded image from running out).
pub fn dma_reset() {
    // SAFETY: only CPU 0 allocates, during setup, before anything else uses DMA.
    unsafe { DMA_USED = 0 };
}

/// `bytes` of zeroed driver memory aligned to `align` (a power of two). Panics if the area is
/// exhausted (a bug: the drivers' needs are fixed).
pub fn dma_alloc(bytes: usize, align: usize) -> *mut u8 {
    // SAFETY: only CPU 0 allocates, during setup, before anything else uses DMA.
    unsafe {
        let used = &raw mut DMA_USED;
        let start = (*used).next_multiple_of(align);
        assert!(start + bytes <= DMA_BYTES, "virtio driver memory exhausted");
        *used = start + bytes;
        let p = (&raw mut DMA).cast::<u8>().add(start);
        core::ptr::write_bytes(p, 0, bytes);
        p
    }
}

/// Guest-physical (= virtual) address of driver memory.
pub fn phys<T>(p: *const T) -> u64 {
    p as u64
}
