//! A whole virtual machine: KVM VM, RAM, vCPU threads, devices, and the run control that
//! pauses and resumes them.
//!
//! Threading: each vCPU runs `KVM_RUN` on its own thread and holds its [`Vcpu`]'s mutex while
//! doing so. To pause, the controller clears the `run` flag and kicks every vCPU thread with a
//! real-time signal whose handler sets `immediate_exit` in that thread's `kvm_run`; the thread
//! re-enters KVM once with `immediate_exit` set so that a half-finished port or MMIO access is
//! completed (KVM only commits it on the next `KVM_RUN`), releases the mutex and parks. While
//! parked, the controller may read or write vCPU state through the mutex.
//!
//! Files: this one holds the [`Vm`] itself, its errors and events; `assemble` builds VMs
//! ([`Vm::create`], [`Vm::restore`], [`Vm::prepare`] and [`PreparedVm`]); `platform` the
//! in-kernel irqchip/PIT/kvmclock ([`Platform`]); `state` the [`MachineState`] and
//! [`Vm::save_state`]; `kick` the signal that kicks vCPU threads out of `KVM_RUN`; `run` the
//! run control (start, pause, resume, stop); `vcpu_loop` the vCPU threads' exit handling;
//! `throttle` auto-converge.

mod assemble;
mod kick;
mod platform;
mod run;
mod state;
mod throttle;
mod vcpu_loop;

pub use assemble::{host_memory_limit, PreparedVm};
pub use kick::kick_signal;
pub use platform::{realtime_ns, Platform, PlatformState};

/// How a VM loaded from saved state relates its clocks to the time since the save.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestTime {
    /// The guest's TSC and kvmclock continue from their saved values: the guest does not see
    /// the time the state spent saved (a snapshot restored later; as QEMU's loadvm does).
    Continue,
    /// The guest's TSC and kvmclock move on by the wall-clock time since the state was saved
    /// (a migration: the guest sees exactly the pause it had, whatever this host's own TSC
    /// reads). Assumes the two hosts' CLOCK_REALTIME agree (NTP), as KVM's own
    /// KVM_CLOCK_REALTIME protocol does; a saving host whose clock is ahead counts as no time.
    Elapsed,
}
pub use state::MachineState;

use crate::boot;
use crate::config::VmConfig;
use crate::cpuid::{self, CpuidTable};
use crate::devices::virtio::{DeviceError, VirtioDevices};
use crate::devices::Devices;
use crate::memory::GuestRam;
use crate::vcpu::{Vcpu, VcpuError};
use kvm_ioctls::VmFd;
use run::Control;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmm_sys_util::eventfd::EventFd;

/// The serial port's interrupt line.
pub const SERIAL_IRQ: u32 = 4;

/// VM-level errors.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{0}")]
    NoKvm(String),
    #[error("invalid configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{op} failed: {err}")]
    Kvm {
        op: &'static str,
        err: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error(transparent)]
    Cpuid(#[from] cpuid::CpuidError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error("serial console: {0}")]
    Serial(String),
    #[error("cannot create eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot start vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error("the VM has stopped: {0}")]
    Stopped(String),
    #[error("vCPUs did not pause within {0:?}")]
    PauseTimeout(Duration),
    #[error("incompatible state: {0}")]
    Incompatible(String),
    #[error("the state read back after the restore differs from the state saved: {0}")]
    StateMismatch(String),
    #[error("{0}")]
    Snapshot(String),
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// How long a VM waits for its disk locks when it resumes (a migration source may still be
/// releasing them, or a failed destination may still be exiting).
pub const STORAGE_LOCK_WAIT: Duration = Duration::from_secs(10);

fn kvm_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |err| VmError::Kvm { op, err }
}

/// Why a VM stopped on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmEvent {
    /// The guest asked for a reset (i8042 command 0xFE, or KVM system event).
    Reset,
    /// The guest powered itself off.
    Shutdown,
    /// A vCPU triple-faulted.
    TripleFault { vcpu: u8 },
    /// KVM could not run the guest any more.
    Crashed { vcpu: u8, reason: String },
    /// The VMM was asked to stop the VM.
    Stopped,
    /// The VM now runs elsewhere (live migration committed).
    Migrated { to: String },
}

impl std::fmt::Display for VmEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmEvent::Reset => write!(f, "guest requested a reset"),
            VmEvent::Shutdown => write!(f, "guest powered off"),
            VmEvent::TripleFault { vcpu } => write!(f, "vCPU {vcpu} triple-faulted (guest reset)"),
            VmEvent::Crashed { vcpu, reason } => write!(f, "vCPU {vcpu} crashed: {reason}"),
            VmEvent::Stopped => write!(f, "stopped by request"),
            VmEvent::Migrated { to } => write!(f, "migrated to {to}"),
        }
    }
}

/// Run state as seen by the control API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmRunState {
    Created,
    Running,
    Paused,
    Stopped,
}

/// One virtual machine.
pub struct Vm {
    config: VmConfig,
    cpuid: CpuidTable,
    msr_list: Vec<u32>,
    vcpus: Vec<Arc<Mutex<Vcpu>>>,
    platform: Platform,
    devices: Arc<Mutex<Devices>>,
    virtio: Arc<VirtioDevices>,
    ctl: Arc<Control>,
    joins: Mutex<Vec<std::thread::JoinHandle<()>>>,
    serial_irq: EventFd,
    vm_fd: Arc<VmFd>,
    // Declared last: dropped after the VmFd, so KVM never holds a mapping we unmapped.
    ram: Arc<GuestRam>,
}

impl Vm {
    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The KVM VM.
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm_fd
    }

    /// The VM's CPUID template.
    pub fn cpuid(&self) -> &CpuidTable {
        &self.cpuid
    }

    /// Flushes the serial log.
    pub fn flush_serial(&self) {
        self.devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .serial
            .flush();
    }

    /// The VM's virtio devices.
    pub fn virtio(&self) -> &VirtioDevices {
        &self.virtio
    }

    /// Flushes the disks and releases their locks so that a migration destination can take
    /// them. The VM must be paused; [`Vm::resume`] takes them back.
    pub fn release_storage(&self) -> Result<(), VmError> {
        if self.run_state() == VmRunState::Running {
            return Err(VmError::Incompatible(
                "the disks can only be released while the VM is paused".into(),
            ));
        }
        Ok(self.virtio.release_storage()?)
    }

    /// Takes the disk locks, waiting up to `wait` for another host to release them.
    pub fn acquire_storage(&self, wait: Duration) -> Result<(), VmError> {
        Ok(self.virtio.acquire_storage(wait)?)
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// The eventfd behind the serial IRQ (kept so the irqfd stays registered).
    pub fn serial_irq(&self) -> &EventFd {
        &self.serial_irq
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}
