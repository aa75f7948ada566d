//! All virtio devices of one VM.

use super::block::Block;
use super::net::{self, Net};
use super::transport::Kind;
use super::{
    gsi, DeviceError, HostDevices, VirtioMmio, VirtioState, MAX_DEVICES, MMIO_BASE, MMIO_SIZE,
};
use crate::config::VmConfig;
use crate::memory::GuestRam;
use crate::persist::Persist;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use vmm_sys_util::eventfd::EventFd;

/// All virtio devices of a VM.
pub struct VirtioDevices {
    pub(super) devs: Vec<Arc<Mutex<VirtioMmio>>>,
    rx_threads: Vec<net::RxThread>,
    storage_held: AtomicBool,
}

/// Locks one device (also when a panic elsewhere poisoned the lock).
pub(super) fn lock(d: &Mutex<VirtioMmio>) -> MutexGuard<'_, VirtioMmio> {
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
            vm.register_irqfd(&irq, gsi(i))
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
                    gsi(i)
                )
            })
            .collect()
    }

    /// The devices as the ACPI DSDT describes them.
    pub fn acpi_devices(&self) -> Vec<crate::acpi::MmioDevice> {
        (0..self.devs.len())
            .map(|i| crate::acpi::MmioDevice {
                base: MMIO_BASE + i as u64 * MMIO_SIZE,
                gsi: gsi(i),
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

    /// Loads saved device state into these devices (built for the same configuration, before
    /// the VM first runs); everything is checked against the devices first.
    pub fn apply(&self, states: &[VirtioState]) -> Result<(), DeviceError> {
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

impl VirtioDevices {
    /// Fuzzing hook (the `ferry-fuzz` crate): a device set around devices made by
    /// [`super::block_for_fuzzing`] / [`super::net_for_fuzzing`], without KVM and without
    /// receive threads. Not for production use.
    #[doc(hidden)]
    pub fn for_fuzzing(devs: Vec<VirtioMmio>) -> VirtioDevices {
        VirtioDevices {
            devs: devs.into_iter().map(|d| Arc::new(Mutex::new(d))).collect(),
            rx_threads: Vec::new(),
            storage_held: AtomicBool::new(false),
        }
    }

    /// Fuzzing hook: what device `i`'s receive thread would do now (nothing unless a NIC).
    #[doc(hidden)]
    pub fn rx_round_for_fuzzing(&self, i: usize) {
        if let Some(d) = self.devs.get(i) {
            net::rx_round_for_fuzzing(&mut lock(d));
        }
    }
}

/// What building a VM's virtio devices needs besides their state.
pub struct VirtioArgs {
    pub config: VmConfig,
    pub host: HostDevices,
    pub ram: Arc<GuestRam>,
    /// The VM the interrupts are registered with (it has an irqchip).
    pub vm: Arc<kvm_ioctls::VmFd>,
}

impl Persist for VirtioDevices {
    type State = Vec<VirtioState>;
    type ConstructorArgs = VirtioArgs;
    type Error = DeviceError;

    /// Saves every device, in configuration order. The VM must be paused (a NIC moves the
    /// frames waiting in its TAP into its receive backlog first).
    fn save(&self) -> Result<Vec<VirtioState>, DeviceError> {
        Ok(self.devs.iter().map(|d| lock(d).state()).collect())
    }

    /// Builds the devices of `args.config` ([`VirtioDevices::build`]) and loads `states` into
    /// them ([`VirtioDevices::apply`]).
    fn restore(args: VirtioArgs, states: &Vec<VirtioState>) -> Result<VirtioDevices, DeviceError> {
        let devs = VirtioDevices::build(&args.config, &args.host, args.ram, &args.vm)?;
        devs.apply(states)?;
        Ok(devs)
    }
}

impl Drop for VirtioDevices {
    fn drop(&mut self) {
        for t in self.rx_threads.drain(..) {
            t.stop();
        }
    }
}
