//! `ferry.workload=disk-log`: a virtio-blk driver (ring 3, CPU 0) appending to a log of
//! records (format in `disklog.rs`). See the doc comment of main.rs for the behaviour and
//! output lines.

use crate::cmdline::Config;
use crate::disklog::{make_record, Scan, RECORD_SIZE};
use crate::line::Line;
use crate::virtio::{self, dma_alloc, phys, Mmio};
use crate::virtq::{Buf, Virtq};
use crate::entry::panic_line;
use crate::heartbeat::heartbeat_if_due;
use crate::rt::{rdtsc, wait_until};
use crate::state::{PerCpu, Shared};
use crate::workload::idle;

/// VIRTIO_BLK_F_FLUSH.
const F_FLUSH: u64 = 1 << 9;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const S_OK: u8 = 0;
/// Sectors per read request while scanning.
const SCAN_BATCH: u64 = 64;
/// The block config space (capacity) must be inside the register window.
const MIN_WINDOW: u64 = 0x108;

struct Blk {
    dev: Mmio,
    q: Virtq,
    features: u64,
    /// Sectors (512 bytes) on the disk.
    capacity: u64,
    /// 16-byte request header followed (at +16) by the status byte.
    hdr: *mut u8,
    /// SCAN_BATCH sectors of data buffer.
    data: *mut u8,
}

static mut BLK: Blk = Blk {
    dev: Mmio::NONE,
    q: Virtq::EMPTY,
    features: 0,
    capacity: 0,
    hdr: core::ptr::null_mut(),
    data: core::ptr::null_mut(),
};

fn blk() -> &'static mut Blk {
    let p = &raw mut BLK;
    // SAFETY: written by the BSP in setup() before the APs are released, then used by CPU 0
    // alone (one call chain).
    unsafe { &mut *p }
}

/// Boot (BSP, before the boot line): finds and initializes the block device. PANIC line and
/// Err on any problem.
pub fn setup(cfg: &Config, mapped: u64) -> Result<(), ()> {
    let dev = virtio::find(cfg.virtio_devices(), virtio::ID_BLOCK, "virtio-blk", mapped)?;
    if dev.size < MIN_WINDOW {
        panic_line()
            .str("virtio-blk at 0x")
            .hex(dev.base)
            .str(": register window too small for the block config (")
            .dec(dev.size)
            .str(" bytes)")
            .send();
        return Err(());
    }
    let wanted = if cfg.disk_flush != 0 { F_FLUSH } else { 0 };
    let features = dev.begin_init(wanted)?;
    let q = dev.setup_queue(0)?;
    let capacity = dev.config_read(|m| u64::from(m.config32(0)) | u64::from(m.config32(4)) << 32);
    dev.driver_ok()?;
    let b = blk();
    *b = Blk {
        dev,
        q,
        features,
        capacity,
        hdr: dma_alloc(64, 64),
        data: dma_alloc(SCAN_BATCH as usize * RECORD_SIZE, 4096),
    };
    Ok(())
}

/// Boot (BSP, after the boot line): `virtio-blk base=0x<hex> irq=<n> features=0x<hex>
/// sectors=<capacity> queue=<size>`.
pub fn print_info() {
    let b = blk();
    virtio::device_line(&b.dev, b.features)
        .str(" sectors=")
        .dec(b.capacity)
        .str(" queue=")
        .dec(u64::from(b.q.size()))
        .send();
}

/// Submits one request and waits (polling, heartbeats going on) until the device completes
/// it; returns the status byte the device wrote.
fn request(
    b: &mut Blk,
    typ: u32,
    sector: u64,
    bytes: u32,
    cpu: usize,
    st: &mut PerCpu,
    sh: &Shared,
) -> u8 {
    // SAFETY: hdr points to 64 bytes of driver memory the device does not use right now (no
    // request in flight).
    unsafe {
        b.hdr.cast::<u32>().write_volatile(typ);
        b.hdr.add(4).cast::<u32>().write_volatile(0);
        b.hdr.add(8).cast::<u64>().write_volatile(sector);
        b.hdr.add(16).write_volatile(0xff);
    }
    let hdr = Buf {
        addr: phys(b.hdr),
        len: 16,
        device_writes: false,
    };
    let status = Buf {
        addr: phys(b.hdr) + 16,
        len: 1,
        device_writes: true,
    };
    let data = Buf {
        addr: phys(b.data),
        len: bytes,
        device_writes: typ == T_IN,
    };
    let head = if bytes == 0 {
        b.q.add(&[hdr, status])
    } else {
        b.q.add(&[hdr, data, status])
    };
    // one request at a time: the queue is empty here
    assert!(head.is_some(), "virtio-blk queue full");
    if b.q.needs_notify() {
        b.dev.notify(0);
    }
    let start = rdtsc();
    let spin = sh.tsc_khz / 5; // 200 us
    let step = sh.tsc_khz / 2; // 500 us
    let check_every = sh.tsc_khz * 100; // 100 ms
    let mut next_check = start + check_every;
    loop {
        if b.q.pop_used().is_some() {
            break;
        }
        let now = rdtsc();
        heartbeat_if_due(cpu, st, sh, now);
        if now.wrapping_sub(start) < spin {
            core::hint::spin_loop();
            continue;
        }
        if now >= next_check {
            b.dev.check_alive();
            next_check = now + check_every;
        }
        wait_until(sh, (now + step).min(st.next_hb));
    }
    // SAFETY: the status byte, written by the device before it returned the chain.
    unsafe { b.hdr.add(16).read_volatile() }
}

fn error(seq: u64, status: u8) {
    Line::new()
        .str("disk ERROR seq=")
        .dec(seq)
        .str(" status=")
        .dec(u64::from(status))
        .send();
}

/// The disk-log workload on CPU 0.
pub fn run(cpu: usize, st: &mut PerCpu, sh: &Shared) -> ! {
    let b = blk();
    let cap = b.capacity;

    // 1. Find the end of the log.
    let mut scan = Scan::START;
    let mut sector = 0;
    while let Scan::Running { last } = scan {
        if sector >= cap {
            scan = Scan::End { last };
            break;
        }
        let n = (cap - sector).min(SCAN_BATCH);
        let s = request(b, T_IN, sector, n as u32 * RECORD_SIZE as u32, cpu, st, sh);
        if s != S_OK {
            error(sector + 1, s);
            idle(cpu, st, sh);
        }
        // SAFETY: the device filled n sectors of the data buffer and is done with it.
        let recs =
            unsafe { core::slice::from_raw_parts(b.data.cast::<[u8; RECORD_SIZE]>(), n as usize) };
        scan = scan.feed(sector, recs, cap);
        sector += n;
    }
    let mut last = match scan {
        Scan::End { last } => last,
        Scan::Corrupt { at } => {
            Line::new().str("disk CORRUPT at=").dec(at).send();
            idle(cpu, st, sh)
        }
        Scan::Running { .. } => unreachable!(),
    };
    Line::new().str("disk ok last=").dec(last).send();

    // 2. Append, rate limited.
    let flush_every = if b.features & F_FLUSH != 0 {
        sh.disk_flush
    } else {
        0
    };
    // TSC ticks per record (0 = unlimited)
    let ticks = (sh.tsc_khz * 1000).checked_div(sh.disk_rate).unwrap_or(0);
    let mut due = rdtsc();
    loop {
        let now = rdtsc();
        heartbeat_if_due(cpu, st, sh, now);
        if last >= cap {
            Line::new().str("disk full last=").dec(last).send();
            idle(cpu, st, sh);
        }
        if ticks != 0 {
            if due > now.saturating_add(sh.sec_ticks) {
                due = now; // the TSC went backwards (e.g. restored on another host)
            }
            if now < due {
                wait_until(sh, due.min(st.next_hb));
                continue;
            }
            if now - due > sh.sec_ticks / 20 {
                due = now; // more than 50 ms behind (stall, pause, migration): no burst
            }
            due += ticks;
        }
        let seq = last + 1;
        // SAFETY: the data buffer is not in use by the device (no request in flight).
        make_record(unsafe { &mut *b.data.cast::<[u8; RECORD_SIZE]>() }, seq);
        let s = request(b, T_OUT, last, RECORD_SIZE as u32, cpu, st, sh);
        if s != S_OK {
            error(seq, s);
            idle(cpu, st, sh);
        }
        last = seq;
        Line::new().str("disk seq=").dec(seq).send();
        if flush_every != 0 && seq % flush_every == 0 {
            let s = request(b, T_FLUSH, 0, 0, cpu, st, sh);
            if s != S_OK {
                error(seq, s);
                idle(cpu, st, sh);
            }
            Line::new().str("disk flush seq=").dec(seq).send();
        }
    }
}
