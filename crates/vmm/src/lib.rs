//! Ferry's virtual machine monitor library.
//!
//! A [`vm::Vm`] owns one KVM virtual machine: guest RAM in a memfd ([`memory`]), one thread per
//! vCPU ([`vcpu`]), the in-kernel irqchip/PIT/kvmclock, and the port-I/O devices ([`devices`]):
//! a 16550 serial console and an i8042 controller for guest resets. [`boot`] loads a PVH ELF
//! (or, on hosts with hardware virtualization, a Linux bzImage + initrd); [`cpuid`] builds the
//! guest CPUID from a named CPU profile. Every stateful component (vCPU, platform devices, serial
//! port, virtio devices) saves and restores its own typed state through [`persist::Persist`];
//! [`snapshot`] writes the whole VM to one versioned, checksummed file and reads it back (the
//! current format and the older ones, [`state_v3`] and [`state_v2`]).

pub mod acpi;
pub mod boot;
pub mod config;
pub mod confine;
pub mod cpuid;
pub mod devices;
pub mod dirty;
pub mod host;
pub mod memory;
pub mod persist;
pub mod privilege;
pub mod sandbox;
pub mod snapshot;
pub mod state_v2;
pub mod state_v3;
pub mod statecheck;
pub mod vcpu;
pub mod vm;

pub use config::{KernelSource, VmConfig};
pub use vm::{Vm, VmError, VmRunState};

/// Opens `/dev/kvm`, turning the common failure into a one-line message (in a worker that
/// dropped its privileges: a new descriptor of the one opened before, [`privilege`]).
pub fn open_kvm() -> Result<kvm_ioctls::Kvm, vm::VmError> {
    if let Some(k) = privilege::kvm() {
        return k.map_err(|e| vm::VmError::NoKvm(format!("cannot duplicate /dev/kvm: {e}")));
    }
    if !std::path::Path::new("/dev/kvm").exists() {
        return Err(vm::VmError::NoKvm(
            "/dev/kvm does not exist: this host has no KVM (load kvm_intel/kvm_amd or run on a KVM-capable machine)".into(),
        ));
    }
    kvm_ioctls::Kvm::new().map_err(|e| vm::VmError::NoKvm(format!("cannot open /dev/kvm: {e}")))
}
