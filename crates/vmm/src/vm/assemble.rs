//! Building a VM: from a configuration (boot), from saved state (restore), or in two steps
//! for a migration destination ([`Vm::prepare`], then [`PreparedVm::finish`]).

use super::run::{Control, CtlState, Target};
use super::{kvm_err, GuestTime, MachineState, Platform, Vm, VmError, SERIAL_IRQ};
use crate::boot;
use crate::config::{KernelSource, VmConfig};
use crate::cpuid::{self, CpuidTable};
use crate::devices::rtc::Rtc;
use crate::devices::serial::{SerialArgs, SerialDevice};
use crate::devices::virtio::{HostDevices, VirtioDevices};
use crate::devices::Devices;
use crate::memory::{GuestRam, MemoryLayout};
use crate::persist::Persist;
use crate::vcpu::Vcpu;
use kvm_ioctls::{Kvm, VmFd};
use std::sync::atomic::{AtomicBool, AtomicU8};
use std::sync::{Arc, Condvar, Mutex};
use vmm_sys_util::eventfd::EventFd;

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
    pub fn finish(
        mut self,
        state: &MachineState,
        serial_out: impl Into<crate::devices::serial::ConsoleLog>,
        time: GuestTime,
    ) -> Result<Vm, VmError> {
        if state.config != self.config
            || state.cpuid != self.cpuid
            || self.base.ram.layout() != &state.layout
        {
            return Err(VmError::Incompatible(
                "the state does not describe the prepared VM".into(),
            ));
        }
        state.validate(u64::MAX)?;
        let advance_ns = match time {
            GuestTime::Continue => 0,
            GuestTime::Elapsed => state.platform.elapsed_since_save(super::realtime_ns()),
        };
        let platform = self.base.platform.as_ref().expect("platform created");
        platform.apply_advanced(&state.platform, advance_ns)?;
        for (v, vs) in self.vcpus.iter_mut().zip(&state.vcpus) {
            if vs.cpuid != cpuid::for_vcpu(&self.cpuid, v.id, self.config.vcpus) {
                return Err(VmError::Incompatible(format!(
                    "vCPU {} state carries a different CPUID",
                    v.id
                )));
            }
            v.set_msr_list(state.msr_list.clone());
            v.apply_advanced(vs, advance_ns)?;
            // A hint for the guest's watchdogs, never a reason to refuse the VM.
            let _ = v.mark_stopped();
        }
        let saved = &state.platform;
        crate::vcpu::place_tsc(&self.vcpus, &state.vcpus, || match time {
            GuestTime::Continue => 0,
            GuestTime::Elapsed => saved.elapsed_since_save(super::realtime_ns()),
        })?;
        if crate::statecheck::enabled() {
            // The restored machine must be the saved machine: read it back and compare.
            let t = std::time::Instant::now();
            let mut diffs = crate::statecheck::platform_differences(
                &state.platform,
                &platform.save()?,
                advance_ns,
            );
            for (v, vs) in self.vcpus.iter().zip(&state.vcpus) {
                let now = v.save()?;
                diffs.extend(crate::statecheck::vcpu_differences(vs, &now));
            }
            if !diffs.is_empty() {
                return Err(VmError::StateMismatch(diffs.join("; ")));
            }
            eprintln!(
                "ferry-vmm: restored state read back and compared in {:.2} ms",
                t.elapsed().as_secs_f64() * 1e3
            );
        }
        self.virtio.apply(&state.devices.virtio)?;
        let serial = SerialDevice::restore(
            SerialArgs {
                irq: self.base.serial_irq.try_clone().map_err(VmError::EventFd)?,
                out: serial_out.into(),
            },
            &state.devices.serial,
        )
        .map_err(|e| VmError::Serial(e.to_string()))?;
        let rtc =
            Rtc::restore(&state.devices.rtc).map_err(|e| VmError::Incompatible(e.to_string()))?;
        let vm = Vm::assemble(
            self.config,
            self.cpuid,
            state.msr_list.clone(),
            self.vcpus,
            &mut self.base,
            Devices::new(serial, rtc),
            self.virtio,
        );
        vm.note_tsc_lead();
        Ok(vm)
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
        serial_out: impl Into<crate::devices::serial::ConsoleLog>,
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
            KernelSource::Path(p) => boot::read_file(p, crate::confine::Use::Kernel)?,
        };
        let initrd = match &config.initrd {
            Some(p) => Some(boot::read_file(p, crate::confine::Use::Initrd)?),
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
        let rsdp = crate::acpi::write(base.ram.memory(), config.vcpus, &virtio.acpi_devices())
            .map_err(boot::BootError::from)?;
        let entry = boot::load(
            base.ram.memory(),
            &layout,
            &kernel,
            cmdline.trim(),
            initrd.as_deref(),
            Some(rsdp),
        )?;
        if matches!(entry.sregs_patch, boot::SregsPatch::Long64) {
            // A Linux bzImage: refuse up front where it cannot run instead of hanging.
            crate::host::check_runs_linux().map_err(boot::BootError::Platform)?;
            base.platform
                .as_ref()
                .expect("platform created")
                .mask_legacy_pics()?;
        }
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
            serial_out.into(),
        );
        Ok(Vm::assemble(
            config,
            cpuid,
            msr_list,
            vcpus,
            &mut base,
            Devices::new(serial, Rtc::new()),
            virtio,
        ))
    }

    /// Re-creates a VM from saved state. Guest memory is left zeroed: the caller fills it
    /// through [`Vm::ram`] before calling [`Vm::start`].
    pub fn restore(
        kvm: &Kvm,
        state: &MachineState,
        host: &HostDevices,
        serial_out: impl Into<crate::devices::serial::ConsoleLog>,
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
        serial_out: impl Into<crate::devices::serial::ConsoleLog>,
    ) -> Result<Vm, VmError> {
        state.validate(host_memory_limit())?;
        Vm::prepare(kvm, &state.config, &state.cpuid, ram, host)?.finish(
            state,
            serial_out,
            GuestTime::Continue,
        )
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
            tsc_lead: std::sync::OnceLock::new(),
            vm_fd: base.vm_fd.clone(),
            ram: base.ram.clone(),
        }
    }
}
