//! State format version 3, read for compatibility.
//!
//! Version 3 is what Ferry wrote before version 4 added the CMOS RTC (`DevicesState::rtc`).
//! As for version 2 ([`crate::state_v2`]), bincode is not self-describing, so a version 3 state
//! is decoded into the mirror types below, which have exactly the version 3 layout, and then
//! upgraded to the current [`MachineState`]: the VM gets a freshly powered-on RTC (host time, no
//! offset, CMOS RAM zeroed), which is what a version 3 VM had — no RTC at all (its ports read as
//! all-ones), so no guest of that build can have depended on one.
//!
//! Only `MachineState` and `DevicesState` changed; everything they contain is reused as is.
//! The reverse conversion (`TryFrom<&MachineState> for MachineStateV3`) is for tools and tests
//! (and a migration to a version 3 build); it refuses a state whose RTC a guest has used
//! (selected a register, written the clock or the RAM) instead of dropping it.

use crate::config::VmConfig;
use crate::cpuid::CpuidTable;
use crate::devices::rtc::RtcState;
use crate::devices::serial::SerialState;
use crate::devices::virtio::VirtioState;
use crate::devices::DevicesState;
use crate::memory::MemoryLayout;
use crate::vcpu::VcpuState;
use crate::vm::{MachineState, PlatformState};
use serde::{Deserialize, Serialize};

/// The format version these types describe.
pub const VERSION: u32 = 3;

/// `MachineState` as version 3 laid it out.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct MachineStateV3 {
    pub config: VmConfig,
    pub layout: MemoryLayout,
    pub cpuid: CpuidTable,
    pub msr_list: Vec<u32>,
    pub platform: PlatformState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesStateV3,
}

/// `DevicesState` as version 3 laid it out (no RTC).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DevicesStateV3 {
    pub serial: SerialState,
    pub virtio: Vec<VirtioState>,
}

impl From<DevicesStateV3> for DevicesState {
    fn from(s: DevicesStateV3) -> DevicesState {
        DevicesState {
            serial: s.serial,
            virtio: s.virtio,
            rtc: RtcState::default(),
        }
    }
}

impl From<MachineStateV3> for MachineState {
    fn from(s: MachineStateV3) -> MachineState {
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

/// Why a state cannot be expressed in an older version that has no RTC.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the VM state cannot be written as format version {version}: {msg}")]
pub struct DowngradeError {
    pub version: u32,
    pub msg: String,
}

/// Refuses an RTC that a guest has used (anything but a fresh clock's state).
pub fn check_rtc_unused(rtc: &RtcState, version: u32) -> Result<(), DowngradeError> {
    if *rtc != RtcState::default() {
        return Err(DowngradeError {
            version,
            msg: "the guest has used its CMOS RTC (version 3 and older have none)".into(),
        });
    }
    Ok(())
}

impl TryFrom<&MachineState> for MachineStateV3 {
    type Error = DowngradeError;

    fn try_from(s: &MachineState) -> Result<MachineStateV3, DowngradeError> {
        check_rtc_unused(&s.devices.rtc, VERSION)?;
        Ok(MachineStateV3 {
            config: s.config.clone(),
            layout: s.layout.clone(),
            cpuid: s.cpuid.clone(),
            msr_list: s.msr_list.clone(),
            platform: s.platform.clone(),
            vcpus: s.vcpus.clone(),
            devices: DevicesStateV3 {
                serial: s.devices.serial.clone(),
                virtio: s.devices.virtio.clone(),
            },
        })
    }
}
