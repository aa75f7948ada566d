//! 16550 UART (vm-superio) whose output goes to a log file, line-buffered, and whose interrupt
//! line is an eventfd registered with KVM as irqfd for GSI 4.

use crate::persist::Persist;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{LineWriter, Write};
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// The serial port's interrupt: an eventfd KVM turns into IRQ 4.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// Serial port state (mirror of vm-superio's, with serde).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialState {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialState> for vm_superio::serial::SerialState {
    fn from(s: &SerialState) -> Self {
        vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// Output sink of the console.
pub type SerialOut = LineWriter<File>;

/// The COM1 device.
pub struct SerialDevice {
    inner: Serial<IrqTrigger, NoEvents, SerialOut>,
}

impl SerialDevice {
    /// A fresh UART writing to `out`.
    pub fn new(irq: EventFd, out: File) -> SerialDevice {
        SerialDevice {
            inner: Serial::new(IrqTrigger(irq), LineWriter::new(out)),
        }
    }

    pub(crate) fn read(&mut self, offset: u8) -> u8 {
        self.inner.read(offset)
    }

    pub(crate) fn write(&mut self, offset: u8, value: u8) {
        // The only error is a failed write to the log file or eventfd; the guest must not be
        // affected by a full disk, so it is ignored here (the bytes are lost from the log).
        let _ = self.inner.write(offset, value);
    }

    /// Flushes buffered output to the log file.
    pub fn flush(&mut self) {
        let _ = self.inner.writer_mut().flush();
    }
}

/// What re-creating a UART needs besides its state.
pub struct SerialArgs {
    /// The interrupt line (an irqfd of GSI 4).
    pub irq: EventFd,
    /// Where the guest's output goes.
    pub out: File,
}

/// Saved serial state that vm-superio refuses.
#[derive(Debug, thiserror::Error)]
#[error("invalid serial state: {0}")]
pub struct SerialError(String);

impl Persist for SerialDevice {
    type State = SerialState;
    type ConstructorArgs = SerialArgs;
    type Error = SerialError;

    /// Saves the UART registers and input FIFO (output not yet flushed stays in the log's
    /// buffer: flush first).
    fn save(&self) -> Result<SerialState, SerialError> {
        Ok(self.inner.state().into())
    }

    /// A UART re-created from saved state (restore, migration).
    fn restore(args: SerialArgs, state: &SerialState) -> Result<SerialDevice, SerialError> {
        let s: vm_superio::serial::SerialState = state.into();
        Serial::from_state(
            &s,
            IrqTrigger(args.irq),
            NoEvents,
            LineWriter::new(args.out),
        )
        .map(|inner| SerialDevice { inner })
        .map_err(|e| SerialError(format!("{e:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uart_is_re_created_from_its_saved_state() {
        let out = || tempfile::tempfile().unwrap();
        let irq = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut a = SerialDevice::new(irq(), out());
        a.write(3, 0x80); // LCR: DLAB on
        a.write(0, 0x0c); // divisor 12 (9600 baud)
        a.write(3, 0x03); // 8N1, DLAB off
        a.write(1, 0x01); // IER: receive interrupt
        a.write(7, 0x5a); // scratch
        let saved = a.save().unwrap();
        assert_eq!(
            (saved.baud_divisor_low, saved.line_control, saved.scratch),
            (0x0c, 0x03, 0x5a)
        );
        let mut b = SerialDevice::restore(
            SerialArgs {
                irq: irq(),
                out: out(),
            },
            &saved,
        )
        .unwrap();
        assert_eq!(b.save().unwrap(), saved);
        assert_eq!(b.read(7), 0x5a);
    }
}
