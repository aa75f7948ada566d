//! A whole virtual machine: KVM VM, RAM, vCPU threads, devices, and the run control that
//! pauses and resumes them.
//!
//! Threading: each vCPU runs `KVM_RUN` on its own thread and holds its [`Vcpu`]'s mutex while
//! doing so. To pause, the controller clears the `run` flag and kicks every vCPU thread with a
//! real-time signal whose handler sets `immediate_exit` in that thread's `kvm_run`; the thread
//! re-enters KVM once with `immediate_exit` set so that a half-finished port or MMIO access is
//! completed (KVM only commits it on the next `KVM_RUN`), releases the mutex and parks. While
//! parked, the controller may read or write vCPU state through the mutex.

use crate::boot;
use crate::config::{KernelSource, VmConfig};
use crate::cpuid::{self, CpuidTable};
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::{DeviceError, HostDevices, VirtioDevices};
use crate::devices::{Devices, DevicesState, PioAction};
use crate::memory::{GuestRam, MemoryLayout};
use crate::persist::{kvm_bytes, Persist};
use crate::vcpu::{Vcpu, VcpuError, VcpuState};
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_run, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit, VmFd};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

/// Length of one auto-converge throttle period.
const THROTTLE_PERIOD_US: u64 = 10_000;

/// The serial port's interrupt line.
pub const SERIAL_IRQ: u32 = 4;
/// Where KVM puts its TSS (three pages below 4 GiB, inside the MMIO hole).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

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
            clock: self.vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
        })
    }

    fn restore(vm: Arc<VmFd>, s: &PlatformState) -> Result<Platform, VmError> {
        let p = Platform::create(vm)?;
        p.apply(s)?;
        Ok(p)
    }
}

impl Platform {
    /// Loads saved state into freshly created in-kernel devices.
    pub fn apply(&self, s: &PlatformState) -> Result<(), VmError> {
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
            clock: s.clock.clock,
            ..Default::default()
        };
        self.vm
            .set_clock(&clock)
            .map_err(kvm_err("KVM_SET_CLOCK"))?;
        Ok(())
    }
}

/// Everything but guest memory: what a snapshot or a migration carries besides the pages.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct MachineState {
    pub config: VmConfig,
    pub layout: MemoryLayout,
    /// VM-wide CPUID template (per-vCPU copies are in `vcpus`).
    pub cpuid: CpuidTable,
    pub msr_list: Vec<u32>,
    pub platform: PlatformState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
}

impl MachineState {
    /// Checks the parts of a state that came from outside before any of it is used.
    pub fn validate(&self, max_memory: u64) -> Result<(), VmError> {
        self.config.validate()?;
        self.layout.validate(max_memory)?;
        if self.layout.total_bytes() != self.config.memory_bytes() {
            return Err(VmError::Incompatible(format!(
                "memory layout holds {} bytes but the config says {} MiB",
                self.layout.total_bytes(),
                self.config.memory_mib
            )));
        }
        if self.vcpus.len() != self.config.vcpus as usize {
            return Err(VmError::Incompatible(format!(
                "state has {} vCPUs but the config says {}",
                self.vcpus.len(),
                self.config.vcpus
            )));
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            if v.id as usize != i {
                return Err(VmError::Incompatible(format!(
                    "vCPU state {i} carries id {}",
                    v.id
                )));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// vCPU kicking

thread_local! {
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN_PTR.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer is set by this thread to its own vCPU's kvm_run mapping while
            // it holds the vCPU, and cleared before the vCPU is released; a volatile byte store
            // is async-signal-safe.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
            .expect("cannot install the vCPU kick signal handler");
    });
}

// ---------------------------------------------------------------------------------------------
// Run control

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Run,
    Pause,
    Exit,
}

struct CtlState {
    target: Target,
    /// vCPU threads inside their run loop (between seeing `Run` and parking again).
    running: usize,
    exited: usize,
    started: bool,
    event: Option<VmEvent>,
}

struct Control {
    run: AtomicBool,
    /// Auto-converge: percentage of each throttle period the vCPUs are kept out of the guest.
    throttle: AtomicU8,
    state: Mutex<CtlState>,
    cv: Condvar,
    threads: Mutex<Vec<libc::pthread_t>>,
}

impl Control {
    fn lock(&self) -> MutexGuard<'_, CtlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn kick_all(&self) {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        for &t in threads.iter() {
            // SAFETY: `t` is a live vCPU thread of this process (threads are joined only after
            // they were told to exit and the list is cleared before that).
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// A vCPU thread reports that the VM cannot continue.
    fn guest_event(&self, ev: VmEvent) {
        let mut st = self.lock();
        if st.event.is_none() {
            st.event = Some(ev);
        }
        st.target = Target::Exit;
        self.run.store(false, Ordering::SeqCst);
        drop(st);
        self.cv.notify_all();
        self.kick_all();
    }
}

fn vcpu_loop(
    vcpu: Arc<Mutex<Vcpu>>,
    ctl: Arc<Control>,
    devices: Arc<Mutex<Devices>>,
    virtio: Arc<VirtioDevices>,
) {
    loop {
        {
            let mut st = ctl.lock();
            loop {
                match st.target {
                    Target::Run => {
                        st.running += 1;
                        ctl.cv.notify_all();
                        break;
                    }
                    Target::Exit => {
                        st.exited += 1;
                        ctl.cv.notify_all();
                        return;
                    }
                    Target::Pause => st = ctl.cv.wait(st).unwrap_or_else(|e| e.into_inner()),
                }
            }
        }
        let mut v = vcpu.lock().unwrap_or_else(|e| e.into_inner());
        let id = v.id;
        let run_ptr: *mut kvm_run = v.fd.get_kvm_run();
        KVM_RUN_PTR.with(|p| p.set(run_ptr));
        v.fd.set_kvm_immediate_exit(0);
        let mut event = None;
        loop {
            if !ctl.run.load(Ordering::Acquire) {
                // Let KVM finish a pending I/O instruction without running the guest further.
                v.fd.set_kvm_immediate_exit(1);
                let _ = v.fd.run();
                v.fd.set_kvm_immediate_exit(0);
                break;
            }
            match v.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    let act = devices
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .pio_write(port, data);
                    if act == PioAction::Reset {
                        event = Some(VmEvent::Reset);
                        break;
                    }
                }
                Ok(VcpuExit::IoIn(port, data)) => devices
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pio_read(port, data),
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !virtio.mmio_read(addr, data) {
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    virtio.mmio_write(addr, data);
                }
                Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => {}
                Ok(VcpuExit::Shutdown) => {
                    event = Some(VmEvent::TripleFault { vcpu: id });
                    break;
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    event = Some(match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmEvent::Shutdown,
                        kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmEvent::Reset,
                        k => VmEvent::Crashed {
                            vcpu: id,
                            reason: format!("system event {k}"),
                        },
                    });
                    break;
                }
                Ok(VcpuExit::InternalError) => {
                    let run = v.fd.get_kvm_run();
                    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the union
                    // member KVM filled in.
                    let ie = unsafe { run.__bindgen_anon_1.internal };
                    let n = (ie.ndata as usize).min(ie.data.len());
                    let data: Vec<String> =
                        ie.data[..n].iter().map(|d| format!("{d:#x}")).collect();
                    event = Some(VmEvent::Crashed {
                        vcpu: id,
                        reason: format!(
                            "KVM internal error, suberror {} data [{}]",
                            ie.suberror,
                            data.join(" ")
                        ),
                    });
                    break;
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    event = Some(VmEvent::Crashed {
                        vcpu: id,
                        reason: format!(
                            "VM entry failed: hardware reason {reason:#x} on host CPU {cpu}"
                        ),
                    });
                    break;
                }
                Ok(other) => {
                    event = Some(VmEvent::Crashed {
                        vcpu: id,
                        reason: format!("unexpected exit {other:?}"),
                    });
                    break;
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // A kick: re-arm KVM_RUN (the loop head sees a pause request), and serve
                    // auto-converge throttling by sleeping off this vCPU's share.
                    v.fd.set_kvm_immediate_exit(0);
                    let pct = ctl.throttle.load(Ordering::Relaxed) as u64;
                    if pct > 0 && ctl.run.load(Ordering::Acquire) {
                        std::thread::sleep(Duration::from_micros(THROTTLE_PERIOD_US * pct / 100));
                    }
                }
                Err(e) => {
                    event = Some(VmEvent::Crashed {
                        vcpu: id,
                        reason: format!("KVM_RUN failed: {e}"),
                    });
                    break;
                }
            }
        }
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
        drop(v);
        if let Some(ev) = event {
            ctl.guest_event(ev);
        }
        let mut st = ctl.lock();
        st.running -= 1;
        ctl.cv.notify_all();
    }
}

// ---------------------------------------------------------------------------------------------
// The VM

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

struct Base {
    vm_fd: Arc<VmFd>,
    ram: Arc<GuestRam>,
    platform: Option<Platform>,
    serial_irq: EventFd,
}

fn create_base(kvm: &Kvm, ram: Arc<GuestRam>) -> Result<Base, VmError> {
    let vm_fd = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
    let platform = Platform::create(vm_fd.clone())?;
    crate::dirty::enable_manual_protect(&vm_fd)
        .map_err(|e| VmError::Incompatible(e.to_string()))?;
    ram.register(&vm_fd, 0)?;
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm_fd
        .register_irqfd(&serial_irq, SERIAL_IRQ)
        .map_err(kvm_err("KVM_IRQFD"))?;
    Ok(Base {
        vm_fd,
        ram,
        platform: Some(platform),
        serial_irq,
    })
}

/// A VM whose KVM objects exist but whose state is not loaded yet (see [`Vm::prepare`]).
pub struct PreparedVm {
    config: VmConfig,
    cpuid: CpuidTable,
    vcpus: Vec<Vcpu>,
    virtio: VirtioDevices,
    base: Base,
}

impl PreparedVm {
    /// The devices of the VM being prepared (not running yet).
    pub fn virtio(&self) -> &VirtioDevices {
        &self.virtio
    }

    /// Loads `state` (which must describe the prepared VM) and returns a paused VM.
    pub fn finish(mut self, state: &MachineState, serial_out: File) -> Result<Vm, VmError> {
        if state.config != self.config
            || state.cpuid != self.cpuid
            || self.base.ram.layout() != &state.layout
        {
            return Err(VmError::Incompatible(
                "the state does not describe the prepared VM".into(),
            ));
        }
        state.validate(u64::MAX)?;
        let platform = self.base.platform.as_ref().expect("platform created");
        platform.apply(&state.platform)?;
        for (v, vs) in self.vcpus.iter_mut().zip(&state.vcpus) {
            if vs.cpuid != cpuid::for_vcpu(&self.cpuid, v.id, self.config.vcpus) {
                return Err(VmError::Incompatible(format!(
                    "vCPU {} state carries a different CPUID",
                    v.id
                )));
            }
            v.set_msr_list(state.msr_list.clone());
            v.apply(vs)?;
        }
        self.virtio.restore(&state.devices.virtio)?;
        let serial = SerialDevice::from_state(
            &state.devices.serial,
            self.base.serial_irq.try_clone().map_err(VmError::EventFd)?,
            serial_out,
        )
        .map_err(VmError::Serial)?;
        Ok(Vm::assemble(
            self.config,
            self.cpuid,
            state.msr_list.clone(),
            self.vcpus,
            &mut self.base,
            Devices::new(serial),
            self.virtio,
        ))
    }
}

/// Host limits the VM's config is checked against.
pub fn host_memory_limit() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let psize = unsafe { libc::sysconf(libc::_SC_PAGE_SIZE) };
    (pages.max(0) as u64) * (psize.max(0) as u64)
}

impl Vm {
    /// Creates and boots a new VM (not yet running: call [`Vm::start`]).
    pub fn create(
        kvm: &Kvm,
        config: VmConfig,
        host: &HostDevices,
        serial_out: File,
    ) -> Result<Vm, VmError> {
        config.validate()?;
        let host_mem = host_memory_limit();
        if config.memory_bytes() > host_mem {
            return Err(VmError::Incompatible(format!(
                "VM needs {} MiB of RAM but this host has only {} MiB",
                config.memory_mib,
                host_mem >> 20
            )));
        }
        let kernel = match &config.kernel {
            KernelSource::TestGuest => guest::ELF.to_vec(),
            KernelSource::Path(p) => boot::read_file(p)?,
        };
        let initrd = match &config.initrd {
            Some(p) => Some(std::fs::read(p).map_err(|e| boot::BootError::Initrd {
                path: p.display().to_string(),
                err: e.to_string(),
            })?),
            None => None,
        };
        let supported = cpuid::supported(kvm)?;
        let cpuid = cpuid::build(&supported, &config.cpu_profile)?;
        let layout = MemoryLayout::for_size(config.memory_bytes());
        let mut base = create_base(kvm, Arc::new(GuestRam::new(layout.clone())?))?;
        let virtio = VirtioDevices::build(&config, host, base.ram.clone(), &base.vm_fd)?;
        // The device parameters go first: a guest that keeps only a prefix of a long command
        // line still finds its devices.
        let cmdline = format!("{} {}", virtio.cmdline_params().trim(), config.cmdline);
        let entry = boot::load(
            base.ram.memory(),
            &layout,
            &kernel,
            cmdline.trim(),
            initrd.as_deref(),
        )?;
        // Boot data was written through vm-memory; that is not a "device write" to track.
        base.ram.reset_vmm_dirty();
        let candidates = kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
        let mut vcpus = Vec::new();
        let mut msr_list = Vec::new();
        for id in 0..config.vcpus {
            let mut v = Vcpu::create(
                &base.vm_fd,
                id,
                &cpuid::for_vcpu(&cpuid, id, config.vcpus),
                Vec::new(),
            )?;
            if id == 0 {
                msr_list = v.readable_msrs(candidates.as_slice());
            }
            v.set_msr_list(msr_list.clone());
            v.setup_boot(if id == 0 { Some(&entry) } else { None })?;
            vcpus.push(v);
        }
        let serial = SerialDevice::new(
            base.serial_irq.try_clone().map_err(VmError::EventFd)?,
            serial_out,
        );
        Ok(Vm::assemble(
            config,
            cpuid,
            msr_list,
            vcpus,
            &mut base,
            Devices::new(serial),
            virtio,
        ))
    }

    /// Re-creates a VM from saved state. Guest memory is left zeroed: the caller fills it
    /// through [`Vm::ram`] before calling [`Vm::start`].
    pub fn restore(
        kvm: &Kvm,
        state: &MachineState,
        host: &HostDevices,
        serial_out: File,
    ) -> Result<Vm, VmError> {
        state.validate(host_memory_limit())?;
        let ram = Arc::new(GuestRam::new(state.layout.clone())?);
        Vm::restore_with_ram(kvm, state, ram, host, serial_out)
    }

    /// Re-creates a VM from saved state around RAM that already holds the guest's memory.
    pub fn restore_with_ram(
        kvm: &Kvm,
        state: &MachineState,
        ram: Arc<GuestRam>,
        host: &HostDevices,
        serial_out: File,
    ) -> Result<Vm, VmError> {
        state.validate(host_memory_limit())?;
        Vm::prepare(kvm, &state.config, &state.cpuid, ram, host)?.finish(state, serial_out)
    }

    /// Builds everything of a VM that does not depend on its run-time state — KVM VM,
    /// irqchip, PIT, memory slots, vCPUs with their CPUID — so that a migration destination can
    /// do this while memory is still being copied and only load state at switchover.
    pub fn prepare(
        kvm: &Kvm,
        config: &VmConfig,
        cpuid: &CpuidTable,
        ram: Arc<GuestRam>,
        host: &HostDevices,
    ) -> Result<PreparedVm, VmError> {
        config.validate()?;
        if ram.layout().total_bytes() != config.memory_bytes() {
            return Err(VmError::Incompatible(
                "guest RAM size differs from the configuration".into(),
            ));
        }
        let supported = cpuid::supported(kvm)?;
        let missing = cpuid::missing_features(cpuid, &supported);
        if !missing.is_empty() {
            return Err(VmError::Incompatible(format!(
                "this host's KVM lacks CPU features the VM uses: {}",
                missing.join(", ")
            )));
        }
        if cpuid.vendor() != supported.vendor() {
            return Err(VmError::Incompatible(format!(
                "VM was created on a {} CPU, this host is {}",
                cpuid.vendor(),
                supported.vendor()
            )));
        }
        let base = create_base(kvm, ram)?;
        let virtio = VirtioDevices::build(config, host, base.ram.clone(), &base.vm_fd)?;
        let mut vcpus = Vec::new();
        for id in 0..config.vcpus {
            vcpus.push(Vcpu::create(
                &base.vm_fd,
                id,
                &cpuid::for_vcpu(cpuid, id, config.vcpus),
                Vec::new(),
            )?);
        }
        Ok(PreparedVm {
            config: config.clone(),
            cpuid: cpuid.clone(),
            vcpus,
            virtio,
            base,
        })
    }

    fn assemble(
        config: VmConfig,
        cpuid: CpuidTable,
        msr_list: Vec<u32>,
        vcpus: Vec<Vcpu>,
        base: &mut Base,
        devices: Devices,
        virtio: VirtioDevices,
    ) -> Vm {
        Vm {
            config,
            cpuid,
            msr_list,
            vcpus: vcpus.into_iter().map(|v| Arc::new(Mutex::new(v))).collect(),
            platform: base.platform.take().expect("platform created"),
            devices: Arc::new(Mutex::new(devices)),
            virtio: Arc::new(virtio),
            ctl: Arc::new(Control {
                run: AtomicBool::new(false),
                throttle: AtomicU8::new(0),
                state: Mutex::new(CtlState {
                    target: Target::Pause,
                    running: 0,
                    exited: 0,
                    started: false,
                    event: None,
                }),
                cv: Condvar::new(),
                threads: Mutex::new(Vec::new()),
            }),
            joins: Mutex::new(Vec::new()),
            serial_irq: base.serial_irq.try_clone().expect("eventfd dup"),
            vm_fd: base.vm_fd.clone(),
            ram: base.ram.clone(),
        }
    }

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

    /// Starts the vCPU threads; the VM runs. Takes the disk locks first.
    pub fn start(&self) -> Result<(), VmError> {
        // A fresh start waits only briefly: a lock held for longer belongs to a running VM.
        self.virtio.acquire_storage(Duration::from_secs(1))?;
        self.virtio.resume();
        self.spawn_vcpus(true)
    }

    /// Starts the vCPU threads but keeps them parked: a later [`Vm::resume`] only has to wake
    /// them (a migration destination does this before the switchover).
    pub fn start_paused(&self) -> Result<(), VmError> {
        self.spawn_vcpus(false)
    }

    /// Waits until every vCPU thread is inside its run loop (or `timeout` passes).
    pub fn wait_running(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.ctl.lock();
        while st.running < self.vcpus.len() {
            let now = Instant::now();
            if now >= deadline || st.event.is_some() {
                return false;
            }
            st = self
                .ctl
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    fn spawn_vcpus(&self, run: bool) -> Result<(), VmError> {
        install_kick_handler();
        let mut st = self.ctl.lock();
        if st.started {
            return Ok(());
        }
        st.started = true;
        st.target = if run { Target::Run } else { Target::Pause };
        self.ctl.run.store(run, Ordering::SeqCst);
        drop(st);
        let mut joins = self.joins.lock().unwrap_or_else(|e| e.into_inner());
        let mut threads = self.ctl.threads.lock().unwrap_or_else(|e| e.into_inner());
        for v in &self.vcpus {
            let id = v.lock().unwrap_or_else(|e| e.into_inner()).id;
            let (v, ctl, dev, virtio) = (
                v.clone(),
                self.ctl.clone(),
                self.devices.clone(),
                self.virtio.clone(),
            );
            let h = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu_loop(v, ctl, dev, virtio))
                .map_err(VmError::Thread)?;
            use std::os::unix::thread::JoinHandleExt;
            threads.push(h.as_pthread_t() as libc::pthread_t);
            joins.push(h);
        }
        Ok(())
    }

    /// Current run state.
    pub fn run_state(&self) -> VmRunState {
        let st = self.ctl.lock();
        match (st.started, st.target, &st.event) {
            (_, _, Some(_)) | (_, Target::Exit, _) => VmRunState::Stopped,
            (false, _, _) => VmRunState::Created,
            (true, Target::Run, _) => VmRunState::Running,
            (true, Target::Pause, _) => VmRunState::Paused,
        }
    }

    /// vCPU threads currently inside their run loop.
    pub fn running_vcpus(&self) -> usize {
        self.ctl.lock().running
    }

    /// Why the VM stopped, if it did.
    pub fn event(&self) -> Option<VmEvent> {
        self.ctl.lock().event.clone()
    }

    /// Blocks until the VM stops (guest reset/shutdown/crash, or [`Vm::stop`]) or `timeout`.
    pub fn wait_stopped(&self, timeout: Option<Duration>) -> Option<VmEvent> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.ctl.lock();
        loop {
            if let Some(e) = &st.event {
                return Some(e.clone());
            }
            match deadline {
                None => st = self.ctl.cv.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    st = self
                        .ctl
                        .cv
                        .wait_timeout(st, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }

    /// Pauses every vCPU (returns once all are out of KVM_RUN and parked). Idempotent.
    pub fn pause(&self) -> Result<(), VmError> {
        let mut st = self.ctl.lock();
        if let Some(e) = &st.event {
            return Err(VmError::Stopped(e.to_string()));
        }
        if !st.started || st.target == Target::Pause {
            return Ok(());
        }
        st.target = Target::Pause;
        self.ctl.run.store(false, Ordering::SeqCst);
        drop(st);
        self.ctl.kick_all();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut st = self.ctl.lock();
        // A thread that has not entered its run loop yet sees `Pause` and waits; only those
        // inside it must leave.
        while st.running > 0 {
            if let Some(e) = &st.event {
                return Err(VmError::Stopped(e.to_string()));
            }
            if Instant::now() >= deadline {
                return Err(VmError::PauseTimeout(Duration::from_secs(10)));
            }
            let (g, to) = self
                .ctl
                .cv
                .wait_timeout(st, Duration::from_millis(20))
                .unwrap_or_else(|e| e.into_inner());
            st = g;
            if to.timed_out() {
                drop(st);
                self.ctl.kick_all(); // a kick may have landed just before a thread took its vCPU
                st = self.ctl.lock();
            }
        }
        drop(st);
        // No vCPU runs: stop the devices' own threads from touching guest memory too.
        self.virtio.pause();
        // Tell a kvmclock-aware guest it was stopped (avoids soft-lockup reports); harmless if
        // the guest does not use kvmclock (KVM then returns EINVAL, which is ignored).
        for v in &self.vcpus {
            let _ = v
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .fd
                .kvmclock_ctrl();
        }
        Ok(())
    }

    /// Resumes a paused VM. Idempotent.
    pub fn resume(&self) -> Result<(), VmError> {
        let st = self.ctl.lock();
        if let Some(e) = &st.event {
            return Err(VmError::Stopped(e.to_string()));
        }
        if !st.started {
            drop(st);
            return self.start();
        }
        if st.target == Target::Run {
            return Ok(());
        }
        drop(st);
        // Never run without the disks: if their locks cannot be had, stay paused.
        self.virtio.acquire_storage(STORAGE_LOCK_WAIT)?;
        self.virtio.resume();
        self.ctl.lock().target = Target::Run;
        self.ctl.run.store(true, Ordering::SeqCst);
        self.ctl.cv.notify_all();
        Ok(())
    }

    /// Asks the VM to stop for good without waiting (see [`Vm::stop`]).
    pub fn request_stop(&self) {
        self.ctl.guest_event(VmEvent::Stopped);
    }

    /// Like [`Vm::request_stop`], recording why.
    pub fn request_stop_with(&self, ev: VmEvent) {
        self.ctl.guest_event(ev);
    }

    /// Stops the VM for good and joins the vCPU threads.
    pub fn stop(&self) {
        self.request_stop();
        let joins: Vec<_> = self
            .joins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for j in joins {
            let _ = j.join();
        }
        self.ctl
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.flush_serial();
    }

    /// Flushes the serial log.
    pub fn flush_serial(&self) {
        self.devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .serial
            .flush();
    }

    /// Captures the complete machine state. The VM must be paused (or never started).
    pub fn save_state(&self) -> Result<MachineState, VmError> {
        if self.run_state() == VmRunState::Running {
            return Err(VmError::Incompatible("save_state needs a paused VM".into()));
        }
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            vcpus.push(v.lock().unwrap_or_else(|e| e.into_inner()).save()?);
        }
        let platform = self.platform.save()?;
        let mut dev = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        dev.serial.flush();
        Ok(MachineState {
            config: self.config.clone(),
            layout: self.ram.layout().clone(),
            cpuid: self.cpuid.clone(),
            msr_list: self.msr_list.clone(),
            platform,
            vcpus,
            devices: DevicesState {
                virtio: self.virtio.state(),
                ..dev.state()
            },
        })
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

    /// Auto-converge: keeps every vCPU out of the guest for `pct` % of each 10 ms period
    /// (0 turns throttling off, at most 99). A helper thread kicks the vCPUs once per period;
    /// each kicked vCPU sleeps off its share before re-entering the guest.
    pub fn set_throttle(&self, pct: u8) {
        let pct = pct.min(99);
        let old = self.ctl.throttle.swap(pct, Ordering::SeqCst);
        if old == 0 && pct > 0 {
            let ctl = self.ctl.clone();
            let _ = std::thread::Builder::new()
                .name("throttle".into())
                .spawn(move || loop {
                    std::thread::sleep(Duration::from_micros(THROTTLE_PERIOD_US));
                    if ctl.throttle.load(Ordering::SeqCst) == 0 || ctl.lock().target == Target::Exit
                    {
                        return;
                    }
                    ctl.kick_all();
                });
        }
    }

    /// Current auto-converge throttle percentage.
    pub fn throttle(&self) -> u8 {
        self.ctl.throttle.load(Ordering::SeqCst)
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
