//! virtio devices on the virtio-mmio transport (version 2, "modern"): a block device backed by
//! a raw image on shared storage ([`block`]) and a network device backed by a TAP ([`net`]).
//!
//! Device `i` of a VM sits at [`MMIO_BASE`]` + i * `[`MMIO_SIZE`] and raises GSI [`gsi`]`(i)`
//! (5, 6, 7, 9, 10, ...: ISA IRQ 8 belongs to the CMOS RTC) through an irqfd; the guest learns
//! both from the ACPI DSDT (`LNRO0005` devices, see [`crate::acpi`]) and from
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
//!
//! Files: `transport` holds the virtio-mmio register window of one device ([`VirtioMmio`]) and
//! serves its queues; `state` the saved form of a device ([`VirtioState`]) and how a device is
//! saved and restored; `devices` all devices of a VM ([`VirtioDevices`]: MMIO dispatch, pause and
//! resume, disk locks, NIC announcements); `host` what a host supplies to them ([`HostDevices`],
//! [`NetBackend`]).

pub mod block;
mod devices;
mod host;
pub mod net;
mod state;
mod transport;

pub use devices::{VirtioArgs, VirtioDevices};
pub use host::{HostDevices, NetBackend};
pub use state::{DeviceSnap, QueueSnap, VirtioState};
pub(crate) use transport::Kind;
pub use transport::VirtioMmio;

/// Guest-physical address of the first virtio-mmio device.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Size of one device's register window.
pub const MMIO_SIZE: u64 = 0x1000;
/// Interrupt line of the first device (the serial port has 4).
pub const FIRST_GSI: u32 = 5;
/// Most virtio devices one VM may have (GSIs 5..=13 but 8).
pub const MAX_DEVICES: usize = 8;

/// The interrupt line (GSI = ISA IRQ = IOAPIC pin) of virtio device `index`: counting up from
/// [`FIRST_GSI`], skipping the RTC's IRQ 8. (Builds before state format 4 used `5 + index`,
/// i.e. GSI 8 for a fourth device; only guests that take their interrupt lines from the command
/// line or ACPI notice, and Ferry's test guest polls its devices.)
pub const fn gsi(index: usize) -> u32 {
    let g = FIRST_GSI + index as u32;
    if g >= crate::acpi::RTC_IRQ {
        g + 1
    } else {
        g
    }
}

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
    #[error(transparent)]
    Confined(#[from] crate::confine::ConfineError),
    #[error("NIC {index}: {msg}")]
    Nic { index: usize, msg: String },
    #[error("{0}")]
    Config(String),
    #[error("virtio state does not fit this VM: {0}")]
    State(String),
    #[error("cannot set up the interrupt of virtio device {index}: {msg}")]
    Irq { index: usize, msg: String },
}

/// Fuzzing hook (the `ferry-fuzz` crate): a virtio-blk device on `disk` outside any VM (no
/// KVM; its interrupt is an unregistered eventfd). Not for production use.
#[doc(hidden)]
pub fn block_for_fuzzing(
    disk: &crate::config::DiskConfig,
    ram: std::sync::Arc<crate::memory::GuestRam>,
) -> Result<VirtioMmio, DeviceError> {
    let kind = transport::Kind::Block(block::Block::open(disk)?);
    detached(kind, ram)
}

/// A device outside any VM: its interrupt is an eventfd nobody registered.
fn detached(
    kind: transport::Kind,
    ram: std::sync::Arc<crate::memory::GuestRam>,
) -> Result<VirtioMmio, DeviceError> {
    let irq =
        vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).map_err(|e| DeviceError::Irq {
            index: 0,
            msg: e.to_string(),
        })?;
    Ok(VirtioMmio::new(kind, irq, ram))
}

/// Fuzzing hook: a virtio-net device over `tap` outside any VM (see [`block_for_fuzzing`]).
#[doc(hidden)]
pub fn net_for_fuzzing(
    nic: &crate::config::NicConfig,
    tap: crate::devices::tap::Tap,
    ram: std::sync::Arc<crate::memory::GuestRam>,
) -> Result<VirtioMmio, DeviceError> {
    let kind = transport::Kind::Net(net::Net::with_tap_for_fuzzing(nic, tap)?);
    detached(kind, ram)
}

#[cfg(test)]
mod tests;
