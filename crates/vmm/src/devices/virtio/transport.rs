//! The virtio-mmio (version 2) transport of one device: its register window and the serving
//! of its queues.

use super::block::{self, Block};
use super::net::{self, Net};
use super::INT_VRING;
use crate::memory::GuestRam;
use std::sync::Arc;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_VERSION_1,
};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

pub(super) const MAGIC: u32 = 0x7472_6976; // "virt"
pub(super) const VENDOR: u32 = 0x5952_5246; // "FRRY"

// virtio-mmio register offsets (virtio 1.2, 4.2.2).
pub(super) const R_MAGIC: u64 = 0x000;
pub(super) const R_VERSION: u64 = 0x004;
pub(super) const R_DEVICE_ID: u64 = 0x008;
pub(super) const R_VENDOR_ID: u64 = 0x00c;
pub(super) const R_DEVICE_FEATURES: u64 = 0x010;
pub(super) const R_DEVICE_FEATURES_SEL: u64 = 0x014;
pub(super) const R_DRIVER_FEATURES: u64 = 0x020;
pub(super) const R_DRIVER_FEATURES_SEL: u64 = 0x024;
pub(super) const R_QUEUE_SEL: u64 = 0x030;
pub(super) const R_QUEUE_NUM_MAX: u64 = 0x034;
pub(super) const R_QUEUE_NUM: u64 = 0x038;
pub(super) const R_QUEUE_READY: u64 = 0x044;
pub(super) const R_QUEUE_NOTIFY: u64 = 0x050;
pub(super) const R_INTERRUPT_STATUS: u64 = 0x060;
pub(super) const R_INTERRUPT_ACK: u64 = 0x064;
pub(super) const R_STATUS: u64 = 0x070;
pub(super) const R_QUEUE_DESC_LOW: u64 = 0x080;
pub(super) const R_QUEUE_DESC_HIGH: u64 = 0x084;
pub(super) const R_QUEUE_DRIVER_LOW: u64 = 0x090;
pub(super) const R_QUEUE_DRIVER_HIGH: u64 = 0x094;
pub(super) const R_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub(super) const R_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub(super) const R_CONFIG_GENERATION: u64 = 0x0fc;
pub(super) const R_CONFIG: u64 = 0x100;

/// The device behind a transport.
pub(crate) enum Kind {
    Block(Block),
    Net(Net),
}

impl Kind {
    fn device_id(&self) -> u32 {
        match self {
            Kind::Block(_) => virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK,
            Kind::Net(_) => virtio_bindings::virtio_ids::VIRTIO_ID_NET,
        }
    }
    pub(super) fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
            | match self {
                Kind::Block(b) => b.features(),
                Kind::Net(n) => n.features(),
            }
    }
    fn queue_sizes(&self) -> &'static [u16] {
        match self {
            Kind::Block(_) => block::QUEUE_SIZES,
            Kind::Net(_) => net::QUEUE_SIZES,
        }
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = match self {
            Kind::Block(b) => b.config_space(),
            Kind::Net(n) => n.config_space(),
        };
        for (i, d) in data.iter_mut().enumerate() {
            *d = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
}

/// One virtio device with its virtio-mmio transport.
pub struct VirtioMmio {
    pub(crate) kind: Kind,
    pub(crate) queues: Vec<Queue>,
    pub(super) device_features_sel: u32,
    pub(super) driver_features_sel: u32,
    pub(super) driver_features: u64,
    pub(super) status: u32,
    pub(super) queue_sel: u32,
    pub(super) interrupt_status: u32,
    pub(super) config_generation: u32,
    pub(super) irq: EventFd,
    pub(crate) ram: Arc<GuestRam>,
    /// The VM runs: queues may be served (false while paused, so nothing touches guest memory).
    pub(crate) active: bool,
}

impl VirtioMmio {
    pub(super) fn new(kind: Kind, irq: EventFd, ram: Arc<GuestRam>) -> VirtioMmio {
        let queues = kind
            .queue_sizes()
            .iter()
            .map(|&s| Queue::new(s).expect("queue sizes are powers of two"))
            .collect();
        VirtioMmio {
            kind,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            irq,
            ram,
            active: false,
        }
    }

    /// The driver finished setting the device up.
    pub(crate) fn driver_ok(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && self.status & VIRTIO_CONFIG_S_FAILED == 0
    }

    /// Raises the device's interrupt for `why` (INT_VRING / INT_CONFIG).
    pub(crate) fn signal(&mut self, why: u32) {
        self.interrupt_status |= why;
        let _ = self.irq.write(1);
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        if let Kind::Net(n) = &mut self.kind {
            n.reset();
        }
    }

    /// Serves queue `q` (after a notify, or on resume).
    pub(crate) fn process(&mut self, q: usize) {
        if !self.active || !self.driver_ok() || q >= self.queues.len() {
            return;
        }
        let used = match &mut self.kind {
            Kind::Block(_) => block::process(self, q),
            Kind::Net(_) => net::process_tx(self, q),
        };
        if used {
            self.signal(INT_VRING);
        }
    }

    /// Handles a read of the register window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= R_CONFIG {
            self.kind.read_config(offset - R_CONFIG, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let v: u32 = match offset {
            R_MAGIC => MAGIC,
            R_VERSION => 2,
            R_DEVICE_ID => self.kind.device_id(),
            R_VENDOR_ID => VENDOR,
            R_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.kind.features() as u32,
                1 => (self.kind.features() >> 32) as u32,
                _ => 0,
            },
            R_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map(|q| q.max_size() as u32)
                .unwrap_or(0),
            R_QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map(|q| q.ready() as u32)
                .unwrap_or(0),
            R_INTERRUPT_STATUS => self.interrupt_status,
            R_STATUS => self.status,
            R_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// Handles a write to the register window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= R_CONFIG {
            // Neither device has writable configuration fields.
            return;
        }
        if data.len() != 4 {
            return;
        }
        let v = u32::from_le_bytes(data.try_into().expect("4 bytes"));
        // Queue setup is only allowed while the queue is not live.
        let queue_setup_allowed = |s: &Self| {
            s.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
                && s.status & VIRTIO_CONFIG_S_DRIVER_OK == 0
                && s.queues
                    .get(s.queue_sel as usize)
                    .is_some_and(|q| !q.ready())
        };
        match offset {
            R_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            R_DRIVER_FEATURES if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v as u64,
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (v as u64) << 32
                    }
                    _ => {}
                }
            }
            R_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            R_QUEUE_SEL => self.queue_sel = v,
            R_QUEUE_NUM if queue_setup_allowed(self) => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v.min(u16::MAX as u32) as u16);
                }
            }
            R_QUEUE_READY if self.queues.get(self.queue_sel as usize).is_some() => {
                if v == 1 && queue_setup_allowed(self) {
                    // A queue whose rings are not in guest RAM never becomes ready.
                    let ram = self.ram.clone();
                    let q = &mut self.queues[self.queue_sel as usize];
                    q.set_ready(true);
                    if !q.is_valid(ram.memory()) {
                        q.set_ready(false);
                    }
                } else if v == 0 {
                    self.queues[self.queue_sel as usize].set_ready(false);
                }
            }
            R_QUEUE_DESC_LOW | R_QUEUE_DESC_HIGH | R_QUEUE_DRIVER_LOW | R_QUEUE_DRIVER_HIGH
            | R_QUEUE_DEVICE_LOW | R_QUEUE_DEVICE_HIGH
                if queue_setup_allowed(self) =>
            {
                let (lo, hi) = if offset & 4 == 0 {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                };
                let q = self
                    .selected_queue()
                    .expect("checked by queue_setup_allowed");
                match offset & !4 {
                    R_QUEUE_DESC_LOW => q.set_desc_table_address(lo, hi),
                    R_QUEUE_DRIVER_LOW => q.set_avail_ring_address(lo, hi),
                    _ => q.set_used_ring_address(lo, hi),
                }
            }
            R_QUEUE_NOTIFY => {
                let q = v as usize;
                if let Kind::Net(n) = &self.kind {
                    if q == net::RX_QUEUE {
                        n.wake_rx();
                        return;
                    }
                }
                self.process(q);
            }
            R_INTERRUPT_ACK => self.interrupt_status &= !v,
            R_STATUS => self.set_status(v),
            _ => {}
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        if v & VIRTIO_CONFIG_S_FEATURES_OK != 0 && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            // Accept the features only if they are a subset of ours and include VERSION_1
            // (this transport is modern-only); the driver re-reads the status to find out.
            let ours = self.kind.features();
            let ok = self.driver_features & !ours == 0
                && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if !ok {
                v &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        let was_ok = self.driver_ok();
        self.status = v;
        if !was_ok && self.driver_ok() {
            if let Kind::Net(n) = &self.kind {
                n.wake_rx();
            }
        }
    }
}
