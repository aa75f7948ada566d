//! `ferry.workload=disk-log` on CPU 0: the test guest's record log (`disklog.rs`) on a block
//! device or file (`ferry.disk`, default /dev/vda), written with O_DIRECT|O_DSYNC so a record
//! is durable when `pwrite` returns, and only then printed as `disk seq=<s>`.

use crate::disklog::{make_record, Scan, RECORD_SIZE};
use crate::hb::Cpu;
use crate::out::line;
use crate::sys::{self, EINVAL, O_DIRECT, O_DSYNC};
use std::alloc::{alloc_zeroed, Layout};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::time::{Duration, Instant};

/// Sectors per read while scanning (as the test guest).
const SCAN_BATCH: u64 = 64;

/// The open disk.
pub struct Disk {
    pub path: String,
    file: File,
    /// 512-byte sectors.
    pub sectors: u64,
    /// Opened with O_DIRECT (false: the file system refused it; O_DSYNC still holds).
    pub direct: bool,
}

/// Boot: opens the disk and finds its size.
pub fn open(path: &str) -> io::Result<Disk> {
    let open = |flags| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(path)
    };
    let (file, direct) = match open(O_DIRECT | O_DSYNC) {
        Ok(f) => (f, true),
        Err(e) if e.raw_os_error() == Some(EINVAL) => (open(O_DSYNC)?, false),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    let bytes = if meta.file_type().is_block_device() {
        sys::block_device_bytes(file.as_raw_fd())?
    } else {
        meta.len()
    };
    Ok(Disk {
        path: path.to_string(),
        file,
        sectors: bytes / RECORD_SIZE as u64,
        direct,
    })
}

/// A 4 KiB-aligned buffer of `SCAN_BATCH` sectors (O_DIRECT needs aligned memory).
fn buffer() -> &'static mut [u8] {
    let len = SCAN_BATCH as usize * RECORD_SIZE;
    let layout = Layout::from_size_align(len, 4096).expect("layout");
    // SAFETY: a non-zero-sized layout; the memory is zeroed, never freed, and only this
    // thread (CPU 0, which calls this once) uses it.
    let p = unsafe { alloc_zeroed(layout) };
    assert!(!p.is_null(), "out of memory");
    // SAFETY: `p` points to `len` zeroed bytes owned by nobody else.
    unsafe { std::slice::from_raw_parts_mut(p, len) }
}

fn error(c: &mut Cpu, seq: u64, e: &io::Error) -> ! {
    line!(
        "disk ERROR seq={seq} errno={} ({e})",
        e.raw_os_error().unwrap_or(0)
    );
    c.idle()
}

/// The disk-log workload on CPU 0.
pub fn run(c: &mut Cpu) -> ! {
    let g = c.g;
    let d = g.disk.as_ref().expect("disk-log without a disk");
    let cap = d.sectors;
    let buf = buffer();

    // 1. Find the end of the log.
    let mut scan = Scan::START;
    let mut sector = 0;
    while let Scan::Running { last } = scan {
        if sector >= cap {
            scan = Scan::End { last };
            break;
        }
        let n = (cap - sector).min(SCAN_BATCH);
        let bytes = &mut buf[..n as usize * RECORD_SIZE];
        if let Err(e) = d.file.read_exact_at(bytes, sector * RECORD_SIZE as u64) {
            error(c, sector + 1, &e);
        }
        let recs: Vec<[u8; RECORD_SIZE]> = bytes
            .chunks_exact(RECORD_SIZE)
            .map(|r| r.try_into().expect("512 bytes"))
            .collect();
        scan = scan.feed(sector, &recs, cap);
        sector += n;
        c.heartbeat_if_due();
    }
    let mut last = match scan {
        Scan::End { last } => last,
        Scan::Corrupt { at } => {
            line!("disk CORRUPT at={at}");
            c.idle()
        }
        Scan::Running { .. } => unreachable!(),
    };
    line!("disk ok last={last}");

    // 2. Append, rate limited.
    let every = (g.cfg.disk_rate != 0).then(|| Duration::from_secs(1) / g.cfg.disk_rate as u32);
    let mut due = Instant::now();
    let rec: &mut [u8; RECORD_SIZE] = (&mut buf[..RECORD_SIZE]).try_into().expect("512 bytes");
    loop {
        let now = Instant::now();
        c.heartbeat_if_due();
        if last >= cap {
            line!("disk full last={last}");
            c.idle();
        }
        if let Some(every) = every {
            if now < due {
                c.wait_until(due.min(c.next_hb()));
                continue;
            }
            if now - due > Duration::from_millis(50) {
                due = now; // more than 50 ms behind (stall, pause, migration): no burst
            }
            due += every;
        }
        let seq = last + 1;
        make_record(rec, seq);
        if let Err(e) = d.file.write_all_at(rec, last * RECORD_SIZE as u64) {
            error(c, seq, &e);
        }
        // O_DSYNC: the record is on the device now.
        last = seq;
        line!("disk seq={seq}");
        if g.cfg.disk_flush != 0 && seq % g.cfg.disk_flush == 0 {
            if let Err(e) = d.file.sync_data() {
                error(c, seq, &e);
            }
            line!("disk flush seq={seq}");
        }
    }
}
