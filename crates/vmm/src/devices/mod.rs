//! Devices. Port I/O: the 16550 serial console (COM1), the CMOS RTC ([`rtc`]) and the i8042
//! controller (guest reset);
//! ports nobody implements read as all-ones, like an empty ISA bus. MMIO: the virtio devices
//! ([`virtio`]) with their host backends ([`tap`]).

pub mod rtc;
pub mod serial;
pub mod tap;
pub mod virtio;

use rtc::{Rtc, RtcState, RTC_DATA, RTC_INDEX};
use serial::{SerialDevice, SerialState};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use vm_superio::{I8042Device, Trigger};

/// COM1 base port.
pub const COM1: u16 = 0x3f8;
/// i8042 data port.
pub const I8042_DATA: u16 = 0x60;
/// i8042 command/status port.
pub const I8042_CMD: u16 = 0x64;

/// What a port access asks of the VM besides its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PioAction {
    None,
    /// The guest asked for a reset through the i8042 (command 0xFE).
    Reset,
}

/// A trigger that only records that it fired.
#[derive(Clone, Default, Debug)]
pub struct FlagTrigger(Arc<AtomicBool>);

impl FlagTrigger {
    /// Returns whether it fired since the last call, and clears it.
    pub fn take(&self) -> bool {
        self.0.swap(false, Ordering::SeqCst)
    }
}

impl Trigger for FlagTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// All port-I/O devices of a VM.
pub struct Devices {
    pub serial: SerialDevice,
    pub rtc: Rtc,
    i8042: I8042Device<FlagTrigger>,
    reset: FlagTrigger,
}

/// State of all devices.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DevicesState {
    pub serial: SerialState,
    /// virtio devices in configuration order (disks, then NICs).
    pub virtio: Vec<virtio::VirtioState>,
    /// The CMOS RTC (since state format 4).
    pub rtc: RtcState,
}

impl Devices {
    /// Builds the device set around a serial console and an RTC.
    pub fn new(serial: SerialDevice, rtc: Rtc) -> Devices {
        let reset = FlagTrigger::default();
        Devices {
            serial,
            rtc,
            i8042: I8042Device::new(reset.clone()),
            reset,
        }
    }

    /// Handles an `in` from the guest.
    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        match port {
            COM1..=0x3ff if data.len() == 1 => data[0] = self.serial.read((port - COM1) as u8),
            I8042_DATA | I8042_CMD if data.len() == 1 => {
                data[0] = self.i8042.read((port - I8042_DATA) as u8)
            }
            RTC_INDEX | RTC_DATA if data.len() == 1 => data[0] = self.rtc.pio_read(port),
            _ => data.fill(0xff),
        }
    }

    /// Handles an `out` from the guest.
    pub fn pio_write(&mut self, port: u16, data: &[u8]) -> PioAction {
        match port {
            COM1..=0x3ff if data.len() == 1 => self.serial.write((port - COM1) as u8, data[0]),
            RTC_INDEX | RTC_DATA if data.len() == 1 => self.rtc.pio_write(port, data[0]),
            I8042_DATA | I8042_CMD if data.len() == 1 => {
                let _ = self.i8042.write((port - I8042_DATA) as u8, data[0]);
                if self.reset.take() {
                    return PioAction::Reset;
                }
            }
            _ => {}
        }
        PioAction::None
    }
}
