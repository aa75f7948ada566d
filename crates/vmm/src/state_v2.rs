//! State format version 2, read for compatibility.
//!
//! Version 2 is what Ferry wrote before version 3 added the NIC receive backlog
//! (`NetState::rx_backlog`). bincode is not self-describing, so an old state cannot be read
//! into the current types; it is decoded into the mirror types below, which have exactly the
//! version 2 layout, and then upgraded to the current [`MachineState`] with an explicit
//! conversion (`From<MachineStateV2> for MachineState`: every NIC gets an empty backlog, which
//! is what a version 2 NIC carried — its waiting frames stayed in the source's TAP).
//!
//! Version 4 added the CMOS RTC ([`crate::state_v3`]): a version 2 state is upgraded with a
//! freshly powered-on RTC as well, and a downgrade refuses a used one.
//!
//! Only the structs whose layout changed, and the structs that contain them, are mirrored:
//! `MachineState` → `DevicesState` → `VirtioState` → `DeviceSnap` → `NetState`. Everything
//! else (config, memory layout, CPUID, platform and vCPU state, serial, queues, disk state) is
//! still laid out as in version 2 and reused as is. A change to the layout of any of those needs
//! a new format version, and a mirror of the old layout here (or in a module of its own).
//!
//! The reverse conversion (`TryFrom<&MachineState> for MachineStateV2`) exists for tools and
//! tests that must produce what a version 2 build produced; it refuses a state that version 2
//! cannot express (a non-empty receive backlog) instead of dropping frames. Ferry itself always
//! writes the current version.

use crate::config::VmConfig;
use crate::cpuid::CpuidTable;
use crate::devices::serial::SerialState;
use crate::devices::virtio::{
    block::BlockState, net::NetState, DeviceSnap, QueueSnap, VirtioState,
};
use crate::devices::DevicesState;
use crate::memory::MemoryLayout;
use crate::vcpu::VcpuState;
use crate::vm::{MachineState, PlatformState};
use serde::{Deserialize, Serialize};

/// The format version these types describe.
pub const VERSION: u32 = 2;

/// `MachineState` as version 2 laid it out.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct MachineStateV2 {
    pub config: VmConfig,
    pub layout: MemoryLayout,
    pub cpuid: CpuidTable,
    pub msr_list: Vec<u32>,
    pub platform: PlatformState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesStateV2,
}

/// `DevicesState` as version 2 laid it out.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DevicesStateV2 {
    pub serial: SerialState,
    pub virtio: Vec<VirtioStateV2>,
}

/// `VirtioState` as version 2 laid it out.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct VirtioStateV2 {
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub status: u32,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueSnap>,
    pub device: DeviceSnapV2,
}

/// `DeviceSnap` as version 2 laid it out (same variants, same order).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum DeviceSnapV2 {
    Block(BlockState),
    Net(NetStateV2),
}

/// `NetState` of version 2: the MAC only.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NetStateV2 {
    pub mac: [u8; 6],
}

// Upgrades: version 2 → current.

impl From<NetStateV2> for NetState {
    fn from(s: NetStateV2) -> NetState {
        NetState {
            mac: s.mac,
            rx_backlog: Vec::new(),
        }
    }
}

impl From<DeviceSnapV2> for DeviceSnap {
    fn from(s: DeviceSnapV2) -> DeviceSnap {
        match s {
            DeviceSnapV2::Block(b) => DeviceSnap::Block(b),
            DeviceSnapV2::Net(n) => DeviceSnap::Net(n.into()),
        }
    }
}

impl From<VirtioStateV2> for VirtioState {
    fn from(s: VirtioStateV2) -> VirtioState {
        VirtioState {
            device_features_sel: s.device_features_sel,
            driver_features_sel: s.driver_features_sel,
            driver_features: s.driver_features,
            status: s.status,
            queue_sel: s.queue_sel,
            interrupt_status: s.interrupt_status,
            config_generation: s.config_generation,
            queues: s.queues,
            device: s.device.into(),
        }
    }
}

impl From<DevicesStateV2> for DevicesState {
    fn from(s: DevicesStateV2) -> DevicesState {
        DevicesState {
            serial: s.serial,
            virtio: s.virtio.into_iter().map(Into::into).collect(),
            rtc: crate::devices::rtc::RtcState::default(),
        }
    }
}

impl From<MachineStateV2> for MachineState {
    fn from(s: MachineStateV2) -> MachineState {
        MachineState {
            config: s.config,
            layout: s.layout,
            cpuid: s.cpuid,
            msr_list: s.msr_list,
            platform: s.platform,
            vcpus: s.vcpus,
            devices: s.devices.into(),
        }
    }
}

// Downgrades: current → version 2 (tools and tests only; lossless or refused).

/// Why a state cannot be expressed in version 2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the VM state cannot be written as format version 2: {0}")]
pub struct DowngradeError(pub String);

impl TryFrom<&MachineState> for MachineStateV2 {
    type Error = DowngradeError;

    fn try_from(s: &MachineState) -> Result<MachineStateV2, DowngradeError> {
        crate::state_v3::check_rtc_unused(&s.devices.rtc, VERSION)
            .map_err(|e| DowngradeError(e.msg))?;
        let mut virtio = Vec::with_capacity(s.devices.virtio.len());
        for (i, v) in s.devices.virtio.iter().enumerate() {
            let device = match &v.device {
                DeviceSnap::Block(b) => DeviceSnapV2::Block(b.clone()),
                DeviceSnap::Net(n) if !n.rx_backlog.is_empty() => {
                    return Err(DowngradeError(format!(
                        "virtio device {i} holds {} received frames (version 2 has no receive backlog)",
                        n.rx_backlog.len()
                    )))
                }
                DeviceSnap::Net(n) => DeviceSnapV2::Net(NetStateV2 { mac: n.mac }),
            };
            virtio.push(VirtioStateV2 {
                device_features_sel: v.device_features_sel,
                driver_features_sel: v.driver_features_sel,
                driver_features: v.driver_features,
                status: v.status,
                queue_sel: v.queue_sel,
                interrupt_status: v.interrupt_status,
                config_generation: v.config_generation,
                queues: v.queues.clone(),
                device,
            });
        }
        Ok(MachineStateV2 {
            config: s.config.clone(),
            layout: s.layout.clone(),
            cpuid: s.cpuid.clone(),
            msr_list: s.msr_list.clone(),
            platform: s.platform.clone(),
            vcpus: s.vcpus.clone(),
            devices: DevicesStateV2 {
                serial: s.devices.serial.clone(),
                virtio,
            },
        })
    }
}
