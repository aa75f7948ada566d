//! virtio devices on the virtio-mmio transport (version 2, "modern"): a block device backed by
//! a raw image on shared storage ([`block`]) and a network device backed by a TAP ([`net`]).
//!
//! Device `i` of a VM sits at [`MMIO_BASE`]` + i * `[`MMIO_SIZE`] and raises GSI
//! [`FIRST_GSI`]` + i` through an irqfd; the guest learns both from
//! `virtio_mmio.device=4K@<base>:<gsi>` on its command line (the syntax Linux uses).
//! Disks come first, then NICs, in configuration order.
//!
//! Requests are served synchronously: a block request is read, performed and completed while
//! the vCPU that wrote `QueueNotify` waits, and a transmitted frame is handed to the TAP the
//! same way. So when the vCPUs are paused no request is half done, and the device state (the
//! transport registers plus each queue's ring addresses and positions) is complete without an
//! in-flight list; requests the guest queued but had not notified yet are still in the rings
//! in guest memory and are picked up when the VM resumes (here or on a migration destination).
//! The only other guest-memory writer is the NIC's receive thread, which stops while the VM is
//! paused.
//!
//! Every write into guest memory goes through vm-memory, which records the page in the VMM-side
//! dirty bitmap that migration merges with KVM's.

pub mod block;
pub mod net;

use crate::config::VmConfig;
use crate::memory::GuestRam;
use block::Block;
use net::Net;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_VERSION_1,
};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

/// Guest-physical address of the first virtio-mmio device.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Size of one device's register window.
pub const MMIO_SIZE: u64 = 0x1000;
/// Interrupt line of the first device (the serial port has 4).
pub const FIRST_GSI: u32 = 5;
/// Most virtio devices one VM may have (GSIs 5..=12).
pub const MAX_DEVICES: usize = 8;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR: u32 = 0x5952_5246; // "FRRY"

// virtio-mmio register offsets (virtio 1.2, 4.2.2).
const R_MAGIC: u64 = 0x000;
const R_VERSION: u64 = 0x004;
const R_DEVICE_ID: u64 = 0x008;
const R_VENDOR_ID: u64 = 0x00c;
const R_DEVICE_FEATURES: u64 = 0x010;
const R_DEVICE_FEATURES_SEL: u64 = 0x014;
const R_DRIVER_FEATURES: u64 = 0x020;
const R_DRIVER_FEATURES_SEL: u64 = 0x024;
const R_QUEUE_SEL: u64 = 0x030;
const R_QUEUE_NUM_MAX: u64 = 0x034;
const R_QUEUE_NUM: u64 = 0x038;
const R_QUEUE_READY: u64 = 0x044;
const R_QUEUE_NOTIFY: u64 = 0x050;
const R_INTERRUPT_STATUS: u64 = 0x060;
const R_INTERRUPT_ACK: u64 = 0x064;
const R_STATUS: u64 = 0x070;
const R_QUEUE_DESC_LOW: u64 = 0x080;
const R_QUEUE_DESC_HIGH: u64 = 0x084;
const R_QUEUE_DRIVER_LOW: u64 = 0x090;
const R_QUEUE_DRIVER_HIGH: u64 = 0x094;
const R_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const R_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const R_CONFIG_GENERATION: u64 = 0x0fc;
const R_CONFIG: u64 = 0x100;

/// The interrupt status bit for "a used buffer was added".
pub const INT_VRING: u32 = 1;
/// The interrupt status bit for "the configuration changed".
pub const INT_CONFIG: u32 = 2;

/// Device errors.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("disk {path}: {msg}")]
    Disk { path: String, msg: String },
    #[error("disk {path} is in use by another VM (its image lock is held elsewhere)")]
    DiskLocked { path: String },
    #[error("NIC {index}: {msg}")]
    Nic { index: usize, msg: String },
    #[error("{0}")]
    Config(String),
    #[error("virtio state does not fit this VM: {0}")]
    State(String),
    #[error("cannot set up the interrupt of virtio device {index}: {msg}")]
    Irq { index: usize, msg: String },
}

/// Where a NIC's frames go on this host. Host-local: a migration destination brings its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetBackend {
    /// Create a TAP and make it a port of this bridge.
    Bridge(String),
    /// Use this (existing or to-be-created) TAP as it is.
    Tap(String),
}

impl std::str::FromStr for NetBackend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some(("bridge", b)) if !b.is_empty() => Ok(NetBackend::Bridge(b.to_string())),
            Some(("tap", t)) if !t.is_empty() => Ok(NetBackend::Tap(t.to_string())),
            _ => Err(format!(
                "invalid network backend {s:?}: use bridge=<name> or tap=<name>"
            )),
        }
    }
}

/// Host-side resources of a VM's devices that are not part of its configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostDevices {
    /// One backend per NIC, in order.
    pub nets: Vec<NetBackend>,
}

impl HostDevices {
    /// Resolves backends given on a command line for a VM with `nics` NICs: one per NIC in
    /// order, or a single `bridge=` for all of them.
    pub fn for_nics(backends: &[NetBackend], nics: usize) -> Result<HostDevices, String> {
        let nets = match backends {
            [one @ NetBackend::Bridge(_)] => vec![one.clone(); nics],
            many if many.len() == nics => many.to_vec(),
            [] => {
                return Err(format!(
                    "the VM has {nics} NICs and this host was given no network backend for them"
                ))
            }
            many => {
                return Err(format!(
                    "the VM has {nics} NICs but {} network backends were given",
                    many.len()
                ))
            }
        };
        Ok(HostDevices { nets })
    }
}

/// A queue's state in a form that serializes (mirrors [`QueueState`]; untrusted on restore).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueSnap {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnap {
    fn from(q: QueueState) -> QueueSnap {
        QueueSnap {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl QueueSnap {
    fn to_queue(self) -> Result<Queue, String> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(|e| format!("{e:?}"))
    }
}

/// What is specific to the device behind the transport.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum DeviceSnap {
    Block(block::BlockState),
    Net(net::NetState),
}

/// One virtio device's complete state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct VirtioState {
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub status: u32,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueSnap>,
    pub device: DeviceSnap,
}

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
    fn features(&self) -> u64 {
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
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    irq: EventFd,
    pub(crate) ram: Arc<GuestRam>,
    /// The VM runs: queues may be served (false while paused, so nothing touches guest memory).
    pub(crate) active: bool,
}

impl VirtioMmio {
    fn new(kind: Kind, irq: EventFd, ram: Arc<GuestRam>) -> VirtioMmio {
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

    /// Saves the device state. The VM must be paused.
    pub fn state(&mut self) -> VirtioState {
        VirtioState {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            status: self.status,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            device: match &mut self.kind {
                Kind::Block(b) => DeviceSnap::Block(b.state()),
                Kind::Net(n) => DeviceSnap::Net(n.state()),
            },
        }
    }

    /// Loads saved state (untrusted: everything is checked against this device first).
    pub fn restore(&mut self, s: &VirtioState) -> Result<(), DeviceError> {
        match (&self.kind, &s.device) {
            (Kind::Block(b), DeviceSnap::Block(bs)) => b.check_state(bs)?,
            (Kind::Net(n), DeviceSnap::Net(ns)) => n.check_state(ns)?,
            _ => return Err(DeviceError::State("saved device is of another type".into())),
        }
        if s.queues.len() != self.queues.len() {
            return Err(DeviceError::State(format!(
                "{} queues saved, the device has {}",
                s.queues.len(),
                self.queues.len()
            )));
        }
        if s.driver_features & !self.kind.features() != 0 {
            return Err(DeviceError::State(format!(
                "driver features {:#x} are not all offered here ({:#x})",
                s.driver_features,
                self.kind.features()
            )));
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for (i, (qs, q)) in s.queues.iter().zip(&self.queues).enumerate() {
            if qs.max_size != q.max_size() {
                return Err(DeviceError::State(format!(
                    "queue {i} has maximum size {} saved, {} here",
                    qs.max_size,
                    q.max_size()
                )));
            }
            let nq = qs
                .to_queue()
                .map_err(|e| DeviceError::State(format!("queue {i}: {e}")))?;
            if nq.ready() && !nq.is_valid(self.ram.memory()) {
                return Err(DeviceError::State(format!(
                    "queue {i} rings lie outside guest RAM or are misaligned"
                )));
            }
            queues.push(nq);
        }
        self.queues = queues;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.status = s.status;
        self.queue_sel = s.queue_sel;
        self.interrupt_status = s.interrupt_status;
        self.config_generation = s.config_generation;
        if let (Kind::Net(n), DeviceSnap::Net(ns)) = (&mut self.kind, &s.device) {
            n.restore(ns);
        }
        Ok(())
    }
}

/// All virtio devices of a VM.
pub struct VirtioDevices {
    devs: Vec<Arc<Mutex<VirtioMmio>>>,
    rx_threads: Vec<net::RxThread>,
    storage_held: AtomicBool,
}

fn lock(d: &Mutex<VirtioMmio>) -> MutexGuard<'_, VirtioMmio> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

impl VirtioDevices {
    /// Builds the devices `config` asks for: opens the disk images (without locking them:
    /// see [`VirtioDevices::acquire_storage`]), sets up the NICs' TAPs, and wires each device's
    /// interrupt to its GSI.
    pub fn build(
        config: &VmConfig,
        host: &HostDevices,
        ram: Arc<GuestRam>,
        vm: &kvm_ioctls::VmFd,
    ) -> Result<VirtioDevices, DeviceError> {
        let n = config.disks.len() + config.nics.len();
        if n > MAX_DEVICES {
            return Err(DeviceError::Config(format!(
                "{n} virtio devices requested, at most {MAX_DEVICES} are supported"
            )));
        }
        if host.nets.len() != config.nics.len() {
            return Err(DeviceError::Config(format!(
                "the VM has {} NICs but {} network backends were given",
                config.nics.len(),
                host.nets.len()
            )));
        }
        let mut kinds = Vec::with_capacity(n);
        for d in &config.disks {
            kinds.push(Kind::Block(Block::open(d)?));
        }
        for (i, (nic, backend)) in config.nics.iter().zip(&host.nets).enumerate() {
            kinds.push(Kind::Net(Net::new(i, nic, backend)?));
        }
        let mut devs = Vec::with_capacity(n);
        for (i, kind) in kinds.into_iter().enumerate() {
            let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| DeviceError::Irq {
                index: i,
                msg: e.to_string(),
            })?;
            vm.register_irqfd(&irq, FIRST_GSI + i as u32)
                .map_err(|e| DeviceError::Irq {
                    index: i,
                    msg: format!("KVM_IRQFD: {e}"),
                })?;
            devs.push(Arc::new(Mutex::new(VirtioMmio::new(
                kind,
                irq,
                ram.clone(),
            ))));
        }
        let mut rx_threads = Vec::new();
        for d in &devs {
            if let Some(t) = net::RxThread::spawn(d.clone())? {
                rx_threads.push(t);
            }
        }
        Ok(VirtioDevices {
            devs,
            rx_threads,
            storage_held: AtomicBool::new(false),
        })
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.devs.len()
    }

    /// Whether the VM has no virtio devices.
    pub fn is_empty(&self) -> bool {
        self.devs.is_empty()
    }

    /// What the guest's command line must say to find the devices.
    pub fn cmdline_params(&self) -> String {
        (0..self.devs.len())
            .map(|i| {
                format!(
                    " virtio_mmio.device=4K@{:#x}:{}",
                    MMIO_BASE + i as u64 * MMIO_SIZE,
                    FIRST_GSI + i as u32
                )
            })
            .collect()
    }

    fn device_at(&self, addr: u64) -> Option<(&Arc<Mutex<VirtioMmio>>, u64)> {
        if addr < MMIO_BASE {
            return None;
        }
        let i = ((addr - MMIO_BASE) / MMIO_SIZE) as usize;
        self.devs
            .get(i)
            .map(|d| (d, (addr - MMIO_BASE) % MMIO_SIZE))
    }

    /// An MMIO read; `false` if no device lives at `addr`.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.device_at(addr) {
            Some((d, off)) => {
                lock(d).read(off, data);
                true
            }
            None => false,
        }
    }

    /// An MMIO write; `false` if no device lives at `addr`.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        match self.device_at(addr) {
            Some((d, off)) => {
                lock(d).write(off, data);
                true
            }
            None => false,
        }
    }

    /// Stops all device activity that touches guest memory (the VM is being paused). When
    /// this returns, the receive threads are idle and no device writes guest memory.
    pub fn pause(&self) {
        for d in &self.devs {
            lock(d).active = false;
        }
    }

    /// Lets the devices run again (the VM resumes) and serves whatever the guest queued
    /// meanwhile.
    pub fn resume(&self) {
        for d in &self.devs {
            let mut g = lock(d);
            g.active = true;
            match &g.kind {
                Kind::Net(n) => {
                    n.wake_rx();
                    g.process(net::TX_QUEUE);
                }
                Kind::Block(_) => g.process(0),
            }
        }
    }

    /// Saves every device. The VM must be paused.
    pub fn state(&self) -> Vec<VirtioState> {
        self.devs.iter().map(|d| lock(d).state()).collect()
    }

    /// Loads saved device state (before the VM first runs).
    pub fn restore(&self, states: &[VirtioState]) -> Result<(), DeviceError> {
        if states.len() != self.devs.len() {
            return Err(DeviceError::State(format!(
                "{} virtio devices saved, the VM has {}",
                states.len(),
                self.devs.len()
            )));
        }
        for (i, (d, s)) in self.devs.iter().zip(states).enumerate() {
            lock(d).restore(s).map_err(|e| match e {
                DeviceError::State(m) => DeviceError::State(format!("device {i}: {m}")),
                e => e,
            })?;
        }
        Ok(())
    }

    /// Takes the exclusive lock of every disk image (shared for read-only disks), retrying for
    /// up to `wait` while another process still holds one (e.g. a migration source that is
    /// about to release it). Idempotent.
    pub fn acquire_storage(&self, wait: Duration) -> Result<(), DeviceError> {
        if self.storage_held.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut taken: Vec<&Arc<Mutex<VirtioMmio>>> = Vec::new();
        for d in &self.devs {
            let mut g = lock(d);
            if let Kind::Block(b) = &mut g.kind {
                if let Err(e) = b.lock(wait) {
                    drop(g);
                    for t in taken {
                        if let Kind::Block(b) = &mut lock(t).kind {
                            let _ = b.unlock();
                        }
                    }
                    return Err(e);
                }
                drop(g);
                taken.push(d);
            }
        }
        self.storage_held.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Flushes every disk to stable storage and releases its lock, so that another host may
    /// take over the images. The VM must be paused.
    pub fn release_storage(&self) -> Result<(), DeviceError> {
        for d in &self.devs {
            if let Kind::Block(b) = &mut lock(d).kind {
                b.flush()?;
            }
        }
        for d in &self.devs {
            if let Kind::Block(b) = &mut lock(d).kind {
                b.unlock()?;
            }
        }
        self.storage_held.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Whether this VM holds its disk locks.
    pub fn storage_held(&self) -> bool {
        self.storage_held.load(Ordering::SeqCst)
    }

    /// Announces every NIC's MAC from this host (RARP broadcasts, now and a few times over
    /// the next 350 ms) so that switches learn where the VM lives after a migration.
    pub fn announce(&self) {
        for d in &self.devs {
            if let Kind::Net(n) = &lock(d).kind {
                n.announce();
            }
        }
    }

    /// Announces every NIC's MAC once, now: a migration destination does this as soon as it
    /// holds the complete VM (still paused), so frames for the VM queue in its TAPs instead of
    /// reaching the paused source; the source announces again if it resumes after all.
    pub fn announce_once(&self) {
        for d in &self.devs {
            if let Kind::Net(n) = &lock(d).kind {
                n.announce_once();
            }
        }
    }

    /// Per-NIC counters (for status reporting).
    pub fn net_stats(&self) -> Vec<net::NetStats> {
        self.devs
            .iter()
            .filter_map(|d| match &lock(d).kind {
                Kind::Net(n) => Some(n.stats()),
                _ => None,
            })
            .collect()
    }

    /// Host names of the NICs' TAPs.
    pub fn tap_names(&self) -> Vec<String> {
        self.devs
            .iter()
            .filter_map(|d| match &lock(d).kind {
                Kind::Net(n) => Some(n.tap_name().to_string()),
                _ => None,
            })
            .collect()
    }
}

impl Drop for VirtioDevices {
    fn drop(&mut self) {
        for t in self.rx_threads.drain(..) {
            t.stop();
        }
    }
}

#[cfg(test)]
mod tests;
