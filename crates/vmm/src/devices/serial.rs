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

/// Where the guest's console output goes: a file, and optionally the rule that keeps it
/// bounded. The guest is untrusted and may print without end; with [`Rotation`] the log at
/// `path` is moved to `path.1` (`path.1` to `path.2`, ... up to `keep`) once it would pass
/// `max_bytes`, and a fresh file takes its place, so the console never takes more than
/// `(keep + 1) * max_bytes` of the host's disk.
pub struct ConsoleLog {
    file: File,
    rotation: Option<Rotation>,
    written: u64,
}

/// How a console log is bounded.
#[derive(Clone, Debug)]
pub struct Rotation {
    /// The log's directory, held open (rotation works in it by name, even in a worker that
    /// can no longer reach it by path).
    pub dir: std::sync::Arc<crate::confine::DirHandle>,
    /// The log's file name in `dir` (the file the [`ConsoleLog`] writes is the one by this
    /// name).
    pub name: std::ffi::OsString,
    /// Bytes one file may hold before it is rotated.
    pub max_bytes: u64,
    /// Rotated files kept (`name.1` ..= `name.keep`; at least 1).
    pub keep: u32,
}

impl Rotation {
    /// The rule for the log at `path` (its directory is opened now).
    pub fn at(path: &std::path::Path, max_bytes: u64, keep: u32) -> std::io::Result<Rotation> {
        let (dir, name) = crate::confine::DirHandle::of_file(path)?;
        Ok(Rotation {
            dir: std::sync::Arc::new(dir),
            name,
            max_bytes,
            keep,
        })
    }

    /// The log's path (for messages).
    pub fn path(&self) -> std::path::PathBuf {
        self.dir.path().join(&self.name)
    }
}

impl From<File> for ConsoleLog {
    /// An unbounded log (the caller owns the file and its size).
    fn from(file: File) -> ConsoleLog {
        ConsoleLog {
            file,
            rotation: None,
            written: 0,
        }
    }
}

impl ConsoleLog {
    /// A log at `rotation.path`, already open as `file`, rotated as `rotation` says.
    pub fn rotating(file: File, rotation: Rotation) -> ConsoleLog {
        let written = file.metadata().map(|m| m.len()).unwrap_or(0);
        ConsoleLog {
            file,
            rotation: Some(Rotation {
                keep: rotation.keep.max(1),
                max_bytes: rotation.max_bytes.max(1),
                ..rotation
            }),
            written,
        }
    }

    /// A second handle on the same log and rule.
    pub fn try_clone(&self) -> std::io::Result<ConsoleLog> {
        Ok(ConsoleLog {
            file: self.file.try_clone()?,
            rotation: self.rotation.clone(),
            written: self.written,
        })
    }

    /// Moves the full log aside and continues in a fresh file at its path (created through an
    /// O_EXCL temporary file and renamed into place: nothing planted there is followed).
    /// If that fails (disk full, directory gone), the current file is emptied instead: the
    /// bound holds either way.
    fn rotate(&mut self, r: &Rotation) {
        let numbered = |i: u32| {
            let mut n = r.name.clone();
            n.push(format!(".{i}"));
            n
        };
        let fresh = (|| -> std::io::Result<File> {
            for i in (1..r.keep).rev() {
                match r.dir.rename(&numbered(i), &numbered(i + 1)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            let (file, tmp) = r.dir.create_temp(&r.name)?;
            r.dir.rename(&r.name, &numbered(1))?;
            r.dir.rename(&tmp, &r.name)?;
            Ok(file)
        })();
        match fresh {
            Ok(f) => self.file = f,
            Err(_) => {
                use std::io::Seek;
                let _ = self.file.set_len(0);
                let _ = self.file.seek(std::io::SeekFrom::Start(0));
            }
        }
        self.written = 0;
    }
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut take = buf.len();
        if let Some(r) = self.rotation.clone() {
            if self.written > 0 && self.written + buf.len() as u64 > r.max_bytes {
                self.rotate(&r);
            }
            // A chunk larger than a whole file is split (the writer comes back for the rest).
            take = take.min(r.max_bytes.saturating_sub(self.written).max(1) as usize);
        }
        let n = self.file.write(&buf[..take])?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Output sink of the console.
pub type SerialOut = LineWriter<ConsoleLog>;

/// The COM1 device.
pub struct SerialDevice {
    inner: Serial<IrqTrigger, NoEvents, SerialOut>,
}

impl SerialDevice {
    /// A fresh UART writing to `out`.
    pub fn new(irq: EventFd, out: ConsoleLog) -> SerialDevice {
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
    pub out: ConsoleLog,
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
        let out = || ConsoleLog::from(tempfile::tempfile().unwrap());
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

#[cfg(test)]
mod rotation_tests {
    use super::*;

    #[test]
    fn a_console_log_stays_within_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let (file, tmp) = crate::confine::create_temp_beside(&path).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let mut log = LineWriter::new(ConsoleLog::rotating(
            file,
            Rotation::at(&path, 1000, 2).unwrap(),
        ));
        for i in 0..1000 {
            writeln!(log, "line {i:05} of a guest that never stops printing").unwrap();
        }
        log.flush().unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["serial.log", "serial.log.1", "serial.log.2"]);
        for n in &names {
            let len = std::fs::metadata(dir.path().join(n)).unwrap().len();
            assert!(len > 0 && len <= 1000, "{n}: {len} bytes");
        }
        // The newest lines are in the live file, the ones before them in .1, then .2.
        let last = std::fs::read_to_string(&path).unwrap();
        assert!(last.ends_with("line 00999 of a guest that never stops printing\n"));
        let first_live: u32 = last[5..10].parse().unwrap();
        let one = std::fs::read_to_string(dir.path().join("serial.log.1")).unwrap();
        let last_of_one: u32 = one.lines().last().unwrap()[5..10].parse().unwrap();
        assert_eq!(last_of_one + 1, first_live);
    }
}
