//! The `device_state` harness: device-state restore, as a snapshot restore or a migration
//! destination performs it (`PreparedVm::finish`: `VirtioDevices::apply`,
//! `SerialDevice::restore` through `Persist`, `Rtc::restore`), on devices built without KVM:
//! virtio-blk on a scratch image, virtio-net on a socket pair standing in for the TAP, the
//! serial port on an eventfd and `/dev/null`, guest RAM in a memfd.
//!
//! Input: `set u8 | bincode(DevicesState) | ops...`
//! * `set % 5` picks the VM's devices ([`DEVICE_SETS`]); the saved virtio states must fit
//!   them, as a restored VM's configuration decides its devices.
//! * The state is decoded with the snapshot codec's options (trailing bytes are the ops).
//! * If the restore succeeds, the ops are what the guest and the host then do: guest memory
//!   writes (descriptor rings, requests, frames), MMIO register accesses, queue notifies,
//!   resume/pause, receive-thread rounds, frames arriving on the TAP, port I/O to the serial
//!   port, the i8042 and the RTC (on a virtual clock), and checkpoints.
//!
//! Checked besides "no panic": a successful restore saves back exactly the state it was given;
//! and at every checkpoint (and at the end) the devices' saved state, encoded and decoded as a
//! snapshot does, restores onto fresh devices of the same VM and saves back identically: a VM
//! whose devices were restored from any state, and that the guest then drove in any way, can
//! still be snapshotted and migrated.

use crate::Cursor;
use bincode::Options;
use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress};
use vmm::config::{DiskConfig, MacAddr, NicConfig};
use vmm::devices::rtc::{Rtc, RTC_INDEX};
use vmm::devices::serial::{SerialArgs, SerialDevice};
use vmm::devices::tap::Tap;
use vmm::devices::virtio::{self, VirtioDevices, MMIO_BASE, MMIO_SIZE};
use vmm::devices::{Devices, DevicesState, COM1, I8042_CMD, I8042_DATA};
use vmm::memory::{GuestRam, MemoryLayout};
use vmm::persist::Persist;
use vmm_sys_util::eventfd::EventFd;

/// Guest RAM of the harness (zeroed before every input).
pub const RAM_BYTES: usize = 512 << 10;
/// Sectors of the scratch disk images.
pub const DISK_SECTORS: u64 = 64;
/// Most ops run per input.
const MAX_OPS: usize = 512;

/// A virtio device of a device set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dev {
    /// Disk 0 (read-write) or 1 (read-only).
    Disk(usize),
    /// NIC 0 or 1.
    Nic(usize),
}

/// The device sets an input can pick from (configuration order: disks, then NICs).
pub const DEVICE_SETS: &[&[Dev]] = &[
    &[Dev::Disk(0)],
    &[Dev::Disk(1)],
    &[Dev::Nic(0)],
    &[Dev::Disk(0), Dev::Nic(0)],
    &[Dev::Disk(0), Dev::Disk(1), Dev::Nic(0), Dev::Nic(1)],
];

/// What the guest or the host does after the restore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Guest writes `bytes` at guest-physical `addr`.
    Mem { addr: u32, bytes: Vec<u8> },
    /// 32-bit MMIO write to register `off` of device `dev`.
    MmioWrite { dev: u8, off: u16, val: u32 },
    /// MMIO read of `size` bytes (1, 2, 4 or 8).
    MmioRead { dev: u8, off: u16, size: u8 },
    /// The guest notifies queue `q` of device `dev`.
    Notify { dev: u8, q: u8 },
    /// The VM resumes (`VirtioDevices::resume`).
    Resume,
    /// The VM pauses.
    Pause,
    /// Device `dev`'s receive thread runs once.
    RxRound { dev: u8 },
    /// A frame arrives on NIC `dev`'s TAP.
    Inject { dev: u8, frame: Vec<u8> },
    /// Guest `out` to a port: COM1 + 0..=7, the i8042, the RTC index port (`port % 11`).
    PioWrite { port: u8, val: u8 },
    /// Guest `in` from a port (same choice).
    PioRead { port: u8 },
    /// Guest writes RTC register `reg` (through the data port) at the current virtual time.
    RtcWrite { reg: u8, val: u8 },
    /// Guest reads RTC register `reg`.
    RtcRead { reg: u8 },
    /// The virtual clock moves on by `ms` milliseconds.
    Advance { ms: u32 },
    /// Save, encode, decode, restore onto fresh devices: must succeed.
    Checkpoint,
}

const N_OPS: u8 = 14;

impl Op {
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Op::Mem { addr, bytes } => {
                out.push(0);
                out.extend_from_slice(&addr.to_le_bytes());
                let n = bytes.len().min(255);
                out.push(n as u8);
                out.extend_from_slice(&bytes[..n]);
            }
            Op::MmioWrite { dev, off, val } => {
                out.push(1);
                out.push(*dev);
                out.extend_from_slice(&off.to_le_bytes());
                out.extend_from_slice(&val.to_le_bytes());
            }
            Op::MmioRead { dev, off, size } => {
                out.push(2);
                out.push(*dev);
                out.extend_from_slice(&off.to_le_bytes());
                out.push(*size);
            }
            Op::Notify { dev, q } => out.extend_from_slice(&[3, *dev, *q]),
            Op::Resume => out.push(4),
            Op::Pause => out.push(5),
            Op::RxRound { dev } => out.extend_from_slice(&[6, *dev]),
            Op::Inject { dev, frame } => {
                out.extend_from_slice(&[7, *dev]);
                let n = frame.len().min(u16::MAX as usize);
                out.extend_from_slice(&(n as u16).to_le_bytes());
                out.extend_from_slice(&frame[..n]);
            }
            Op::PioWrite { port, val } => out.extend_from_slice(&[8, *port, *val]),
            Op::PioRead { port } => out.extend_from_slice(&[9, *port]),
            Op::RtcWrite { reg, val } => out.extend_from_slice(&[10, *reg, *val]),
            Op::RtcRead { reg } => out.extend_from_slice(&[11, *reg]),
            Op::Advance { ms } => {
                out.push(12);
                out.extend_from_slice(&ms.to_le_bytes());
            }
            Op::Checkpoint => out.push(13),
        }
    }

    pub fn decode(c: &mut Cursor<'_>) -> Op {
        match c.u8() % N_OPS {
            0 => {
                let addr = c.u32();
                let n = c.u8() as usize;
                Op::Mem {
                    addr,
                    bytes: c.bytes(n).to_vec(),
                }
            }
            1 => Op::MmioWrite {
                dev: c.u8(),
                off: c.u16(),
                val: c.u32(),
            },
            2 => Op::MmioRead {
                dev: c.u8(),
                off: c.u16(),
                size: c.u8(),
            },
            3 => Op::Notify {
                dev: c.u8(),
                q: c.u8(),
            },
            4 => Op::Resume,
            5 => Op::Pause,
            6 => Op::RxRound { dev: c.u8() },
            7 => {
                let dev = c.u8();
                let n = c.u16() as usize;
                Op::Inject {
                    dev,
                    frame: c.bytes(n).to_vec(),
                }
            }
            8 => Op::PioWrite {
                port: c.u8(),
                val: c.u8(),
            },
            9 => Op::PioRead { port: c.u8() },
            10 => Op::RtcWrite {
                reg: c.u8(),
                val: c.u8(),
            },
            11 => Op::RtcRead { reg: c.u8() },
            12 => Op::Advance { ms: c.u32() },
            _ => Op::Checkpoint,
        }
    }
}

/// The ports [`Op::PioWrite`] / [`Op::PioRead`] reach (the RTC data port goes through
/// [`Op::RtcWrite`] / [`Op::RtcRead`], which use the virtual clock).
const PORTS: [u16; 11] = [
    COM1,
    COM1 + 1,
    COM1 + 2,
    COM1 + 3,
    COM1 + 4,
    COM1 + 5,
    COM1 + 6,
    COM1 + 7,
    I8042_DATA,
    I8042_CMD,
    RTC_INDEX,
];

/// Per-process fixtures: guest RAM, the scratch disk images, `/dev/null`.
struct Rig {
    ram: Arc<GuestRam>,
    disks: [DiskConfig; 2],
    devnull: File,
}

fn rig() -> &'static Rig {
    static RIG: OnceLock<Rig> = OnceLock::new();
    RIG.get_or_init(|| {
        let ram = GuestRam::new(MemoryLayout::for_size(RAM_BYTES as u64)).expect("guest RAM");
        let disk = |i: usize| {
            let path =
                crate::scratch_dir().join(format!("ferry-fuzz-disk{i}-{}.img", std::process::id()));
            let f = File::create(&path).expect("scratch disk image");
            f.set_len(DISK_SECTORS * 512)
                .expect("size the scratch disk");
            DiskConfig {
                path,
                read_only: i == 1,
            }
        };
        Rig {
            ram: Arc::new(ram),
            disks: [disk(0), disk(1)],
            devnull: File::options()
                .read(true)
                .write(true)
                .open("/dev/null")
                .expect("/dev/null"),
        }
    })
}

/// One VM's devices, as `PreparedVm` holds them before the state is loaded.
pub struct Machine {
    set: &'static [Dev],
    virtio: VirtioDevices,
    /// The host end of each NIC's stand-in TAP (index: position in `set`); dropped after
    /// `virtio` (field order), so a NIC never sees its TAP close.
    peers: Vec<Option<OwnedFd>>,
}

fn socket_pair() -> (File, OwnedFd) {
    let mut fds = [0i32; 2];
    // SAFETY: socketpair writes two descriptors into `fds`; the result is checked.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are fresh and owned by nobody else.
    unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

impl Machine {
    /// Fresh (never used) devices of set `set`.
    pub fn new(set: usize) -> Machine {
        let rig = rig();
        let set = DEVICE_SETS[set % DEVICE_SETS.len()];
        let mut devs = Vec::new();
        let mut peers = Vec::new();
        for d in set {
            match *d {
                Dev::Disk(i) => {
                    devs.push(
                        virtio::block_for_fuzzing(&rig.disks[i], rig.ram.clone()).expect("disk"),
                    );
                    peers.push(None);
                }
                Dev::Nic(i) => {
                    let (tap, peer) = socket_pair();
                    let tap = Tap::from_file_for_fuzzing(tap, &format!("fuzz{i}"));
                    let nic = NicConfig {
                        mac: MacAddr(crate::seeds::mac(i)),
                    };
                    devs.push(virtio::net_for_fuzzing(&nic, tap, rig.ram.clone()).expect("NIC"));
                    peers.push(Some(peer));
                }
            }
        }
        Machine {
            set,
            virtio: VirtioDevices::for_fuzzing(devs),
            peers,
        }
    }

    fn serial(state: &vmm::devices::serial::SerialState) -> Result<SerialDevice, String> {
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let out = rig().devnull.try_clone().expect("dup /dev/null");
        SerialDevice::restore(
            SerialArgs {
                irq,
                out: out.into(),
            },
            state,
        )
        .map_err(|e| e.to_string())
    }

    /// Loads `st` as `PreparedVm::finish` does; the port devices come back with it.
    pub fn restore(&self, st: &DevicesState) -> Result<Devices, String> {
        self.virtio.apply(&st.virtio).map_err(|e| e.to_string())?;
        let serial = Machine::serial(&st.serial)?;
        let rtc = Rtc::restore(&st.rtc).map_err(|e| e.to_string())?;
        Ok(Devices::new(serial, rtc))
    }

    /// Saves everything, as `Vm::save_state` does.
    pub fn save(&self, dev: &mut Devices) -> DevicesState {
        dev.serial.flush();
        DevicesState {
            serial: dev.serial.save().expect("serial save"),
            virtio: self.virtio.save().expect("virtio save"),
            rtc: dev.rtc.save(),
        }
    }
}

/// Resets the per-process fixtures to their initial contents (deterministic inputs).
fn reset() {
    static ZEROS: [u8; RAM_BYTES] = [0; RAM_BYTES];
    let rig = rig();
    rig.ram
        .memory()
        .write_slice(&ZEROS, GuestAddress(0))
        .expect("zero guest RAM");
    for d in &rig.disks {
        if let Ok(f) = File::options().write(true).open(&d.path) {
            let _ = f.set_len(0);
            let _ = f.set_len(DISK_SECTORS * 512);
        }
    }
}

/// The virtual clock's start: a plausible host time (2023-11 ... 2106).
const CLOCK_BASE: u64 = 1_700_000_000;

/// State of a run: the devices, the port devices and the virtual clock.
pub struct Run {
    pub machine: Machine,
    pub devices: Devices,
    pub now: Duration,
}

impl Run {
    pub fn exec(&mut self, op: &Op) {
        let ndev = self.machine.set.len();
        let dev_addr = |dev: u8, off: u16| {
            MMIO_BASE + (dev as usize % ndev) as u64 * MMIO_SIZE + (off as u64 % MMIO_SIZE)
        };
        match op {
            Op::Mem { addr, bytes } => {
                let _ = rig()
                    .ram
                    .memory()
                    .write_slice(bytes, GuestAddress(*addr as u64 % RAM_BYTES as u64));
            }
            Op::MmioWrite { dev, off, val } => {
                assert!(self
                    .machine
                    .virtio
                    .mmio_write(dev_addr(*dev, *off), &val.to_le_bytes()));
            }
            Op::MmioRead { dev, off, size } => {
                let mut b = [0u8; 8];
                let n = [1, 2, 4, 8][*size as usize % 4];
                assert!(self
                    .machine
                    .virtio
                    .mmio_read(dev_addr(*dev, *off), &mut b[..n]));
            }
            Op::Notify { dev, q } => {
                let v = (*q as u32).to_le_bytes();
                assert!(self.machine.virtio.mmio_write(dev_addr(*dev, 0x50), &v));
            }
            Op::Resume => self.machine.virtio.resume(),
            Op::Pause => self.machine.virtio.pause(),
            Op::RxRound { dev } => self
                .machine
                .virtio
                .rx_round_for_fuzzing(*dev as usize % ndev),
            Op::Inject { dev, frame } => {
                if let Some(Some(peer)) = self.machine.peers.get(*dev as usize % ndev) {
                    // SAFETY: sends a valid buffer on a socket this harness owns.
                    unsafe {
                        libc::send(
                            std::os::fd::AsRawFd::as_raw_fd(peer),
                            frame.as_ptr().cast(),
                            frame.len(),
                            libc::MSG_DONTWAIT,
                        )
                    };
                }
            }
            Op::PioWrite { port, val } => {
                let _ = self
                    .devices
                    .pio_write(PORTS[*port as usize % PORTS.len()], &[*val]);
            }
            Op::PioRead { port } => {
                let mut b = [0u8];
                self.devices
                    .pio_read(PORTS[*port as usize % PORTS.len()], &mut b);
            }
            Op::RtcWrite { reg, val } => self.devices.rtc.write_reg(*reg & 0x7f, *val, self.now),
            Op::RtcRead { reg } => {
                let _ = self.devices.rtc.read_reg(*reg & 0x7f, self.now);
            }
            Op::Advance { ms } => self.now += Duration::from_millis(*ms as u64),
            Op::Checkpoint => self.checkpoint(),
        }
    }

    /// The devices' state now must restore onto a fresh VM of the same configuration.
    pub fn checkpoint(&mut self) {
        let saved = self.machine.save(&mut self.devices);
        let bytes = crate::state_codec()
            .serialize(&saved)
            .expect("a saved device state encodes");
        let decoded: DevicesState = crate::state_codec()
            .deserialize(&bytes)
            .expect("an encoded device state decodes");
        assert!(decoded == saved, "device state changes through its codec");
        let fresh = Machine::new(
            DEVICE_SETS
                .iter()
                .position(|s| *s == self.machine.set)
                .unwrap(),
        );
        let mut devices = match fresh.restore(&decoded) {
            Ok(d) => d,
            // Finding `driver-features` (fuzz/README.md).
            Err(e) if e.contains("are not all offered here") && crate::ignored("driver-features") => return,
            // Finding `rtc-year-10000`.
            Err(e) if e.contains("RTC state: latched year") && crate::ignored("rtc-year-10000") => return,
            Err(e) => panic!(
                "the devices saved a state that a restore of the same VM refuses: {e}\nstate: {decoded:?}"
            ),
        };
        let again = fresh.save(&mut devices);
        assert!(
            again == decoded,
            "a restored device set does not save back what it was given"
        );
    }
}

/// Decodes the device state at the front of `c` (snapshot codec options, trailing bytes left).
pub fn decode_state(data: &[u8]) -> Option<(DevicesState, &[u8])> {
    let mut rest = data;
    let st = crate::state_codec()
        .allow_trailing_bytes()
        .deserialize_from::<_, DevicesState>(&mut rest)
        .ok()?;
    Some((st, rest))
}

/// One fuzz input.
pub fn run(data: &[u8]) {
    crate::init();
    let mut c = Cursor::new(data);
    let set = c.u8() as usize;
    let Some((st, ops)) = decode_state(c.rest()) else {
        crate::debug!("device_state: the state does not decode");
        return;
    };
    reset();
    let machine = Machine::new(set);
    let mut devices = match machine.restore(&st) {
        Ok(d) => d,
        Err(e) => {
            crate::debug!("device_state: restore refused: {e}");
            return;
        }
    };
    let back = machine.save(&mut devices);
    assert!(
        back == st,
        "a restored device set does not save back what it was given"
    );
    let mut run = Run {
        machine,
        devices,
        now: Duration::from_secs(CLOCK_BASE),
    };
    let mut c = Cursor::new(ops);
    let mut n = 0;
    while !c.is_empty() && n < MAX_OPS {
        let op = Op::decode(&mut c);
        crate::debug!("device_state: op {n}: {op:?}");
        run.exec(&op);
        n += 1;
    }
    run.checkpoint();
    crate::debug!(
        "device_state: {n} ops; final state: {:?}",
        run.machine.save(&mut run.devices)
    );
}

/// Builds a device-state seed: device set `set`, brought up by `setup` from fresh, saved; then
/// `ops` to run after its restore. Returns the fuzz input.
pub fn seed(set: usize, setup: &[Op], ops: &[Op]) -> Vec<u8> {
    reset();
    let machine = Machine::new(set);
    let devices = Devices::new(
        Machine::serial(&Default::default()).expect("fresh serial"),
        Rtc::new(),
    );
    let mut run = Run {
        machine,
        devices,
        now: Duration::from_secs(CLOCK_BASE),
    };
    for op in setup {
        run.exec(op);
    }
    run.machine.virtio.pause();
    let st = run.machine.save(&mut run.devices);
    let mut out = vec![set as u8];
    out.extend(
        crate::state_codec()
            .serialize(&st)
            .expect("encode a seed state"),
    );
    for op in ops {
        op.encode(&mut out);
    }
    out
}
