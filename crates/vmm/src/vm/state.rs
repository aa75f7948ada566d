//! The machine state: everything of a VM but its memory, and how a VM captures it.

use super::{PlatformState, Vm, VmError, VmRunState};
use crate::config::VmConfig;
use crate::cpuid::CpuidTable;
use crate::devices::DevicesState;
use crate::memory::MemoryLayout;
use crate::persist::Persist;
use crate::vcpu::VcpuState;
use serde::{Deserialize, Serialize};

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
        self.devices
            .rtc
            .validate()
            .map_err(|e| VmError::Incompatible(e.to_string()))?;
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

impl Vm {
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
        let serial = dev
            .serial
            .save()
            .map_err(|e| VmError::Serial(e.to_string()))?;
        Ok(MachineState {
            config: self.config.clone(),
            layout: self.ram.layout().clone(),
            cpuid: self.cpuid.clone(),
            msr_list: self.msr_list.clone(),
            platform,
            vcpus,
            devices: DevicesState {
                serial,
                virtio: self.virtio.save()?,
                rtc: dev.rtc.save(),
            },
        })
    }
}
