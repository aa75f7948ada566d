//! Device tests with a tiny virtio driver written against the MMIO registers and a split
//! virtqueue laid out in real (memfd) guest RAM.

use super::block::Block;
use super::devices::lock;
use super::net::Net;
use super::transport::*;
use super::*;
use crate::config::{DiskConfig, MacAddr, NicConfig, VmConfig};
use crate::memory::{GuestRam, MemoryLayout, PAGE_SIZE};
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::*;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const DESC: u64 = 0x10000;
const AVAIL: u64 = 0x11000;
const USED: u64 = 0x12000;
const QSIZE: u16 = 16;

fn ram() -> Arc<GuestRam> {
    Arc::new(GuestRam::new(MemoryLayout::for_size(32 << 20)).unwrap())
}

fn w32(d: &mut VirtioMmio, off: u64, v: u32) {
    d.write(off, &v.to_le_bytes());
}

fn r32(d: &mut VirtioMmio, off: u64) -> u32 {
    let mut b = [0u8; 4];
    d.read(off, &mut b);
    u32::from_le_bytes(b)
}

/// A split queue `q` at DESC/AVAIL/USED + q * 0x4000, driven from the test.
struct Driver {
    base: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Driver {
    fn desc(&self) -> u64 {
        DESC + self.base
    }
    fn avail(&self) -> u64 {
        AVAIL + self.base
    }
    fn used(&self) -> u64 {
        USED + self.base
    }

    /// Brings a device up with `features` and queues `0..nq`.
    fn init(d: &mut VirtioMmio, features: u64, nq: u32) -> Vec<Driver> {
        assert_eq!(r32(d, R_MAGIC), MAGIC);
        assert_eq!(r32(d, R_VERSION), 2);
        w32(d, R_STATUS, 0);
        w32(
            d,
            R_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        w32(d, R_DRIVER_FEATURES_SEL, 0);
        w32(d, R_DRIVER_FEATURES, features as u32);
        w32(d, R_DRIVER_FEATURES_SEL, 1);
        w32(d, R_DRIVER_FEATURES, (features >> 32) as u32);
        w32(
            d,
            R_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
        );
        assert_ne!(r32(d, R_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        let mut out = Vec::new();
        for q in 0..nq {
            let drv = Driver {
                base: q as u64 * 0x4000,
                next_desc: 0,
                avail_idx: 0,
                used_seen: 0,
            };
            w32(d, R_QUEUE_SEL, q);
            assert!(r32(d, R_QUEUE_NUM_MAX) >= QSIZE as u32);
            w32(d, R_QUEUE_NUM, QSIZE as u32);
            w32(d, R_QUEUE_DESC_LOW, drv.desc() as u32);
            w32(d, R_QUEUE_DESC_HIGH, 0);
            w32(d, R_QUEUE_DRIVER_LOW, drv.avail() as u32);
            w32(d, R_QUEUE_DRIVER_HIGH, 0);
            w32(d, R_QUEUE_DEVICE_LOW, drv.used() as u32);
            w32(d, R_QUEUE_DEVICE_HIGH, 0);
            w32(d, R_QUEUE_READY, 1);
            assert_eq!(r32(d, R_QUEUE_READY), 1);
            out.push(drv);
        }
        w32(
            d,
            R_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE
                | VIRTIO_CONFIG_S_DRIVER
                | VIRTIO_CONFIG_S_FEATURES_OK
                | VIRTIO_CONFIG_S_DRIVER_OK,
        );
        out
    }

    /// Queues a chain of (addr, len, device-writable) buffers.
    fn push(&mut self, ram: &GuestRam, bufs: &[(u64, u32, bool)]) {
        let mem = ram.memory();
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = (self.next_desc as usize + i) % QSIZE as usize;
            let last = i + 1 == bufs.len();
            let mut flags = 0u16;
            if !last {
                flags |= 1; // NEXT
            }
            if write {
                flags |= 2; // WRITE
            }
            let next = ((idx + 1) % QSIZE as usize) as u16;
            let at = self.desc() + idx as u64 * 16;
            mem.write_obj(addr, GuestAddress(at)).unwrap();
            mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        self.next_desc = ((self.next_desc as usize + bufs.len()) % QSIZE as usize) as u16;
        let slot = self.avail() + 4 + (self.avail_idx % QSIZE) as u64 * 2;
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail() + 2))
            .unwrap();
    }

    /// Used elements not seen yet: (id, len).
    fn take_used(&mut self, ram: &GuestRam) -> Vec<(u32, u32)> {
        let mem = ram.memory();
        let idx: u16 = mem.read_obj(GuestAddress(self.used() + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = self.used() + 4 + (self.used_seen % QSIZE) as u64 * 8;
            out.push((
                mem.read_obj(GuestAddress(at)).unwrap(),
                mem.read_obj(GuestAddress(at + 4)).unwrap(),
            ));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

fn image(sectors: u64) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&vec![0u8; (sectors * 512) as usize]).unwrap();
    f
}

fn block_dev(ram: &Arc<GuestRam>, path: &std::path::Path, ro: bool) -> VirtioMmio {
    let b = Block::open(&DiskConfig {
        path: path.into(),
        read_only: ro,
    })
    .unwrap();
    let mut d = VirtioMmio::new(
        Kind::Block(b),
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ram.clone(),
    );
    d.active = true;
    d
}

const HDR: u64 = 0x20000;
const DATA: u64 = 0x30000;
const STATUS: u64 = 0x40000;

fn blk_request(
    d: &mut VirtioMmio,
    drv: &mut Driver,
    ram: &GuestRam,
    kind: u32,
    sector: u64,
    len: u32,
) -> (u8, u32) {
    let mem = ram.memory();
    mem.write_obj(kind, GuestAddress(HDR)).unwrap();
    mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let data_writable = kind != VIRTIO_BLK_T_OUT;
    let mut bufs = vec![(HDR, 16, false)];
    if len > 0 {
        bufs.push((DATA, len, data_writable));
    }
    bufs.push((STATUS, 1, true));
    drv.push(ram, &bufs);
    w32(d, R_QUEUE_NOTIFY, 0);
    let used = drv.take_used(ram);
    assert_eq!(used.len(), 1, "one request, one completion");
    (mem.read_obj(GuestAddress(STATUS)).unwrap(), used[0].1)
}

fn blk_features() -> u64 {
    1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_BLK_F_FLUSH
}

#[test]
fn block_reads_writes_and_flushes_the_image() {
    let ram = ram();
    let img = image(64);
    let mut d = block_dev(&ram, img.path(), false);
    assert_eq!(r32(&mut d, R_DEVICE_ID), 2);
    let mut cap = [0u8; 8];
    d.read(R_CONFIG, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 64);
    let mut drv = Driver::init(&mut d, blk_features(), 1).remove(0);

    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
    ram.memory()
        .write_slice(&pattern, GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        blk_request(&mut d, &mut drv, &ram, VIRTIO_BLK_T_OUT, 5, 1024),
        (VIRTIO_BLK_S_OK as u8, 1)
    );
    assert_eq!(
        blk_request(&mut d, &mut drv, &ram, VIRTIO_BLK_T_FLUSH, 0, 0),
        (VIRTIO_BLK_S_OK as u8, 1)
    );
    let mut on_disk = vec![0u8; 1024];
    std::fs::File::open(img.path())
        .unwrap()
        .read_exact_at_helper(5 * 512, &mut on_disk);
    assert_eq!(on_disk, pattern);

    ram.memory()
        .write_slice(&[0u8; 1024], GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        blk_request(&mut d, &mut drv, &ram, VIRTIO_BLK_T_IN, 5, 1024),
        (VIRTIO_BLK_S_OK as u8, 1025)
    );
    let mut back = vec![0u8; 1024];
    ram.memory()
        .read_slice(&mut back, GuestAddress(DATA))
        .unwrap();
    assert_eq!(back, pattern);
    // The interrupt was raised and is acknowledged through the register.
    assert_eq!(r32(&mut d, R_INTERRUPT_STATUS) & INT_VRING, INT_VRING);
    w32(&mut d, R_INTERRUPT_ACK, INT_VRING);
    assert_eq!(r32(&mut d, R_INTERRUPT_STATUS), 0);
}

trait ReadAt {
    fn read_exact_at_helper(&self, off: u64, buf: &mut [u8]);
}
impl ReadAt for std::fs::File {
    fn read_exact_at_helper(&self, off: u64, buf: &mut [u8]) {
        use std::os::unix::fs::FileExt;
        self.read_exact_at(buf, off).unwrap();
    }
}

#[test]
fn block_refuses_bad_requests_with_a_status() {
    let ram = ram();
    let img = image(8);
    let mut d = block_dev(&ram, img.path(), false);
    let mut drv = Driver::init(&mut d, blk_features(), 1).remove(0);
    // Past the end, straddling the end, unknown type.
    assert_eq!(
        blk_request(&mut d, &mut drv, &ram, VIRTIO_BLK_T_IN, 8, 512).0,
        VIRTIO_BLK_S_IOERR as u8
    );
    assert_eq!(
        blk_request(&mut d, &mut drv, &ram, VIRTIO_BLK_T_OUT, 7, 1024).0,
        VIRTIO_BLK_S_IOERR as u8
    );
    assert_eq!(
        blk_request(&mut d, &mut drv, &ram, VIRTIO_BLK_T_IN, u64::MAX, 512).0,
        VIRTIO_BLK_S_IOERR as u8
    );
    assert_eq!(
        blk_request(&mut d, &mut drv, &ram, 99, 0, 0).0,
        VIRTIO_BLK_S_UNSUPP as u8
    );
    // A descriptor pointing outside guest RAM fails the request, not the VMM.
    ram.memory()
        .write_obj(VIRTIO_BLK_T_IN, GuestAddress(HDR))
        .unwrap();
    drv.push(
        &ram,
        &[(HDR, 16, false), (1 << 40, 512, true), (STATUS, 1, true)],
    );
    w32(&mut d, R_QUEUE_NOTIFY, 0);
    assert_eq!(drv.take_used(&ram).len(), 1);
    // Still works afterwards.
    assert_eq!(
        blk_request(&mut d, &mut drv, &ram, VIRTIO_BLK_T_IN, 0, 512).0,
        VIRTIO_BLK_S_OK as u8
    );

    // A read-only disk refuses writes and says so in its features.
    let mut ro = block_dev(&ram, img.path(), true);
    w32(&mut ro, R_DEVICE_FEATURES_SEL, 0);
    assert_ne!(r32(&mut ro, R_DEVICE_FEATURES) & (1 << VIRTIO_BLK_F_RO), 0);
    let mut drv = Driver::init(&mut ro, blk_features() | 1 << VIRTIO_BLK_F_RO, 1).remove(0);
    assert_eq!(
        blk_request(&mut ro, &mut drv, &ram, VIRTIO_BLK_T_OUT, 0, 512).0,
        VIRTIO_BLK_S_IOERR as u8
    );
}

#[test]
fn features_outside_the_offer_are_refused() {
    let ram = ram();
    let img = image(8);
    let mut d = block_dev(&ram, img.path(), false);
    w32(
        &mut d,
        R_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    w32(&mut d, R_DRIVER_FEATURES_SEL, 0);
    w32(&mut d, R_DRIVER_FEATURES, 1 << 20); // not offered
    w32(&mut d, R_DRIVER_FEATURES_SEL, 1);
    w32(&mut d, R_DRIVER_FEATURES, 1); // VERSION_1
    w32(
        &mut d,
        R_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
    );
    assert_eq!(r32(&mut d, R_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    // Legacy (no VERSION_1) is refused too.
    w32(&mut d, R_STATUS, 0);
    w32(
        &mut d,
        R_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    w32(&mut d, R_DRIVER_FEATURES_SEL, 0);
    w32(&mut d, R_DRIVER_FEATURES, 1 << VIRTIO_BLK_F_FLUSH);
    w32(
        &mut d,
        R_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
    );
    assert_eq!(r32(&mut d, R_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
}

/// Pages marked in the VMM-side dirty bitmap of region 0.
fn vmm_dirty_pages(ram: &GuestRam) -> Vec<u64> {
    let words = ram.take_vmm_dirty(0);
    let mut out = Vec::new();
    for (w, bits) in words.iter().enumerate() {
        for b in 0..64 {
            if bits & (1 << b) != 0 {
                out.push((w * 64 + b) as u64 * PAGE_SIZE);
            }
        }
    }
    out
}

#[test]
fn device_writes_into_guest_memory_are_marked_dirty() {
    let ram = ram();
    let img = image(64);
    let mut d = block_dev(&ram, img.path(), false);
    let mut drv = Driver::init(&mut d, blk_features(), 1).remove(0);
    // A write request: the device only writes the status byte and the used ring.
    ram.memory()
        .write_slice(&[0x5a; 8192], GuestAddress(DATA))
        .unwrap();
    let mem = ram.memory();
    mem.write_obj(VIRTIO_BLK_T_OUT, GuestAddress(HDR)).unwrap();
    mem.write_obj(0u64, GuestAddress(HDR + 8)).unwrap();
    drv.push(
        &ram,
        &[(HDR, 16, false), (DATA, 8192, false), (STATUS, 1, true)],
    );
    ram.reset_vmm_dirty();
    w32(&mut d, R_QUEUE_NOTIFY, 0);
    assert_eq!(vmm_dirty_pages(&ram), vec![USED, STATUS]);
    drv.take_used(&ram);

    // A read request spanning two pages: data pages, status and used ring are dirty, and
    // nothing else.
    mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(HDR)).unwrap();
    drv.push(
        &ram,
        &[(HDR, 16, false), (DATA, 8192, true), (STATUS, 1, true)],
    );
    ram.reset_vmm_dirty();
    w32(&mut d, R_QUEUE_NOTIFY, 0);
    assert_eq!(
        vmm_dirty_pages(&ram),
        vec![USED, DATA, DATA + PAGE_SIZE, STATUS]
    );
}

#[test]
fn image_lock_is_exclusive_and_visible_to_others() {
    let img = image(8);
    let cfg = DiskConfig {
        path: img.path().into(),
        read_only: false,
    };
    let mut a = Block::open(&cfg).unwrap();
    let mut b = Block::open(&cfg).unwrap();
    assert!(
        !block::probe_image(img.path(), false)
            .unwrap()
            .locked_elsewhere
    );
    a.lock(Duration::ZERO).unwrap();
    assert!(
        block::probe_image(img.path(), false)
            .unwrap()
            .locked_elsewhere
    );
    let e = b.lock(Duration::from_millis(20)).unwrap_err();
    assert!(matches!(e, DeviceError::DiskLocked { .. }), "{e}");
    assert!(e.to_string().contains("in use by another VM"), "{e}");
    // Released: the other one gets it.
    a.unlock().unwrap();
    b.lock(Duration::ZERO).unwrap();
    assert!(a.lock(Duration::ZERO).is_err());
    drop(b); // closing the image releases its lock
    a.lock(Duration::ZERO).unwrap();
    // Read-only users share, but never with a writer.
    let ro = DiskConfig {
        path: img.path().into(),
        read_only: true,
    };
    let mut r1 = Block::open(&ro).unwrap();
    assert!(r1.lock(Duration::ZERO).is_err());
    a.unlock().unwrap();
    let mut r2 = Block::open(&ro).unwrap();
    r1.lock(Duration::ZERO).unwrap();
    r2.lock(Duration::ZERO).unwrap();
    assert!(a.lock(Duration::ZERO).is_err());
}

#[test]
fn missing_or_tiny_images_are_refused_clearly() {
    let e = Block::open(&DiskConfig {
        path: "/nonexistent/ferry.img".into(),
        read_only: false,
    })
    .err()
    .unwrap();
    assert!(e.to_string().contains("/nonexistent/ferry.img"), "{e}");
    assert!(e.to_string().contains("does not exist"), "{e}");
    let tiny = tempfile::NamedTempFile::new().unwrap();
    let e = Block::open(&DiskConfig {
        path: tiny.path().into(),
        read_only: false,
    })
    .err()
    .unwrap();
    assert!(e.to_string().contains("smaller than one sector"), "{e}");
}

#[test]
fn block_state_round_trip_continues_the_queue() {
    let ram = ram();
    let img = image(64);
    let mut d = block_dev(&ram, img.path(), false);
    let mut drv = Driver::init(&mut d, blk_features(), 1).remove(0);
    for s in 0..5 {
        ram.memory()
            .write_slice(&[s as u8 + 1; 512], GuestAddress(DATA))
            .unwrap();
        blk_request(&mut d, &mut drv, &ram, VIRTIO_BLK_T_OUT, s, 512);
    }
    let st = d.state();
    assert_eq!(st.queues[0].next_avail, 5);
    assert_eq!(st.queues[0].next_used, 5);
    // "Another host": a fresh device over the same image and the same RAM.
    let mut e = block_dev(&ram, img.path(), false);
    e.restore(&st).unwrap();
    assert_eq!(e.state(), st);
    ram.memory()
        .write_slice(&[0u8; 512], GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        blk_request(&mut e, &mut drv, &ram, VIRTIO_BLK_T_IN, 3, 512),
        (VIRTIO_BLK_S_OK as u8, 513)
    );
    let mut back = [0u8; 512];
    ram.memory()
        .read_slice(&mut back, GuestAddress(DATA))
        .unwrap();
    assert_eq!(back, [4u8; 512]);

    // Untrusted state is checked.
    let mut bad = st.clone();
    bad.queues[0].size = 3; // not a power of two
    assert!(block_dev(&ram, img.path(), false).restore(&bad).is_err());
    let mut bad = st.clone();
    bad.queues[0].desc_table = 1 << 45; // outside RAM
    assert!(block_dev(&ram, img.path(), false).restore(&bad).is_err());
    let mut bad = st.clone();
    if let DeviceSnap::Block(b) = &mut bad.device {
        b.capacity_sectors = 65;
    }
    let e = block_dev(&ram, img.path(), false)
        .restore(&bad)
        .unwrap_err();
    assert!(e.to_string().contains("65 sectors"), "{e}");
    let mut bad = st.clone();
    bad.driver_features |= 1 << 40;
    assert!(bad.status & virtio_bindings::virtio_config::VIRTIO_CONFIG_S_FEATURES_OK != 0);
    assert!(block_dev(&ram, img.path(), false).restore(&bad).is_err());
    // Found by fuzzing (fuzz/crashes/device_state/driver-features): before FEATURES_OK the
    // guest may have proposed features the device does not offer; that state is valid (the
    // device refuses FEATURES_OK) and must restore, or the guest could make its VM
    // unmigratable.
    let mut proposed = st.clone();
    proposed.driver_features |= 1 << 40;
    proposed.status = 7; // ACKNOWLEDGE | DRIVER | DRIVER_OK, no FEATURES_OK
    let mut again = block_dev(&ram, img.path(), false);
    again.restore(&proposed).unwrap();
    assert_eq!(again.state().driver_features, proposed.driver_features);
    let mut bad = st;
    bad.queues.pop();
    assert!(block_dev(&ram, img.path(), false).restore(&bad).is_err());
}

// ---------------------------------------------------------------------------------------------
// virtio-net against a real TAP (needs CAP_NET_ADMIN, as the worker does)

struct PacketSocket(std::os::fd::OwnedFd);

impl PacketSocket {
    /// An AF_PACKET socket bound to interface `ifindex`: what it sends leaves through the TAP
    /// towards the guest; what the guest sends arrives here.
    fn bind(ifindex: i32) -> PacketSocket {
        use std::os::fd::FromRawFd;
        let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
        // SAFETY: plain socket(2); checked below.
        let fd =
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fresh fd owned by nobody else.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain old data.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto as u16;
        sa.sll_ifindex = ifindex;
        // SAFETY: binds with a valid sockaddr_ll of the given size.
        let r = unsafe {
            libc::bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        PacketSocket(fd)
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: writes a valid slice to our socket.
        let n = unsafe {
            libc::send(
                std::os::fd::AsRawFd::as_raw_fd(&self.0),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }

    /// Next frame with ethertype `ty` (skips the kernel's own IPv6 chatter), within 2 s.
    fn recv_type(&self, ty: [u8; 2]) -> Vec<u8> {
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let mut buf = vec![0u8; 2048];
        loop {
            assert!(
                std::time::Instant::now() < deadline,
                "no frame of type {ty:?}"
            );
            // SAFETY: reads into a valid buffer, non-blocking.
            let n = unsafe {
                libc::recv(
                    std::os::fd::AsRawFd::as_raw_fd(&self.0),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n >= 14 && buf[12..14] == ty {
                return buf[..n as usize].to_vec();
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

fn test_frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x88, 0xb5]); // local experimental ethertype
    f.extend_from_slice(payload);
    f
}

#[test]
fn net_moves_frames_between_the_guest_and_a_tap() {
    let ram = ram();
    let mac = MacAddr([0x02, 0xf5, 0, 0, 0, 0x42]);
    let tap_name = format!("fyt{}", std::process::id() % 1_000_000);
    let net = Net::new(0, &NicConfig { mac }, &NetBackend::Tap(tap_name.clone())).unwrap();
    let ifindex = net.tap.index().unwrap();
    let dev = Arc::new(Mutex::new(VirtioMmio::new(
        Kind::Net(net),
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ram.clone(),
    )));
    let rx_thread = net::RxThread::spawn(dev.clone()).unwrap().unwrap();
    let host = PacketSocket::bind(ifindex);
    let features = 1u64 << VIRTIO_F_VERSION_1 | 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
    let (mut rxq, mut txq) = {
        let mut d = lock(&dev);
        d.active = true;
        assert_eq!(r32(&mut d, R_DEVICE_ID), 1);
        let mut m = [0u8; 6];
        d.read(R_CONFIG, &mut m);
        assert_eq!(m, mac.0);
        let mut q = Driver::init(&mut d, features, 2);
        let tx = q.remove(1);
        (q.remove(0), tx)
    };
    // Guest -> host: header + frame on the transmit queue.
    let out = test_frame([0xff; 6], mac.0, b"hello from the guest");
    let mut txbuf = vec![0u8; crate::devices::tap::VNET_HDR_LEN];
    txbuf.extend_from_slice(&out);
    ram.memory()
        .write_slice(&txbuf, GuestAddress(0x50000))
        .unwrap();
    {
        let mut d = lock(&dev);
        txq.push(&ram, &[(0x50000, txbuf.len() as u32, false)]);
        w32(&mut d, R_QUEUE_NOTIFY, 1);
        assert_eq!(txq.take_used(&ram).len(), 1);
    }
    assert_eq!(host.recv_type([0x88, 0xb5]), out);

    // Host -> guest: post buffers (one page each), send a frame into the TAP; the receive
    // thread delivers it into a buffer and marks that page dirty. The kernel may deliver its
    // own frames (IPv6 neighbour discovery on a fresh link) first, so look for ours.
    let hdr = crate::devices::tap::VNET_HDR_LEN;
    {
        let mut d = lock(&dev);
        for i in 0..8u64 {
            rxq.push(&ram, &[(0x60000 + i * 0x1000, 2048, true)]);
        }
        w32(&mut d, R_QUEUE_NOTIFY, 0);
    }
    std::thread::sleep(Duration::from_millis(50));
    let mut seen = rxq.take_used(&ram).len() as u64;
    ram.reset_vmm_dirty();
    let inbound = test_frame(mac.0, [0x02, 0, 0, 0, 0, 1], b"hello from the host");
    host.send(&inbound);
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let (slot, len) = 'found: loop {
        for (id, len) in rxq.take_used(&ram) {
            let mut got = vec![0u8; len as usize];
            let at = 0x60000 + id as u64 * 0x1000;
            ram.memory().read_slice(&mut got, GuestAddress(at)).unwrap();
            seen += 1;
            if got.len() > hdr && got[hdr + 12..hdr + 14] == [0x88, 0xb5] {
                assert_eq!(&got[hdr..], &inbound[..]);
                assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
                break 'found (at, len);
            }
        }
        assert!(std::time::Instant::now() < deadline, "frame not delivered");
        std::thread::sleep(Duration::from_millis(2));
    };
    assert_eq!(len as usize, hdr + inbound.len());
    let dirty = vmm_dirty_pages(&ram);
    assert!(dirty.contains(&slot) && dirty.contains(&USED), "{dirty:x?}");
    for i in seen..8 {
        assert!(!dirty.contains(&(0x60000 + i * 0x1000)), "{dirty:x?}");
    }
    assert!(seen < 8, "all buffers used by kernel chatter");

    // Paused: nothing is delivered (guest memory stays untouched) until resume.
    lock(&dev).active = false;
    rxq.take_used(&ram); // whatever was delivered before the pause
    ram.reset_vmm_dirty();
    host.send(&inbound);
    std::thread::sleep(Duration::from_millis(100));
    assert!(rxq.take_used(&ram).is_empty());
    assert!(vmm_dirty_pages(&ram).is_empty());
    {
        let d = lock(&dev);
        let Kind::Net(n) = &d.kind else { panic!() };
        n.wake_rx();
    }
    lock(&dev).active = true;
    if let Kind::Net(n) = &lock(&dev).kind {
        n.wake_rx();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while rxq.take_used(&ram).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "not delivered after resume"
        );
        std::thread::sleep(Duration::from_millis(2));
    }

    // The announcement is a RARP from the VM's MAC.
    if let Kind::Net(n) = &lock(&dev).kind {
        n.announce();
    }
    let rarp = host.recv_type([0x80, 0x35]);
    assert_eq!(&rarp[6..12], &mac.0);
    rx_thread.stop();
}

#[test]
fn frames_that_arrive_while_paused_move_with_the_saved_state() {
    let ram = ram();
    let mac = MacAddr([0x02, 0xf5, 0, 0, 0, 0x43]);
    let pid = std::process::id() % 1_000_000;
    let nic = |name: String| Net::new(0, &NicConfig { mac }, &NetBackend::Tap(name)).unwrap();
    let src_net = nic(format!("fys{pid}"));
    let host = PacketSocket::bind(src_net.tap.index().unwrap());
    let src = Arc::new(Mutex::new(VirtioMmio::new(
        Kind::Net(src_net),
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ram.clone(),
    )));
    let features = 1u64 << VIRTIO_F_VERSION_1 | 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
    let mut rxq = {
        let mut d = lock(&src);
        let mut q = Driver::init(&mut d, features, 2);
        q.remove(0)
    };
    for i in 0..16u64 {
        rxq.push(&ram, &[(0x60000 + i * 0x1000, 2048, true)]);
    }
    // The VM is paused (devices inactive, no receive thread): three frames reach the TAP.
    let frames: Vec<Vec<u8>> = (0..3u8)
        .map(|i| test_frame(mac.0, [0x02, 0, 0, 0, 0, 1], &[b'f', i, 0xaa, 0x55]))
        .collect();
    for f in &frames {
        host.send(f);
    }
    std::thread::sleep(Duration::from_millis(50));
    let st = lock(&src).state();
    let DeviceSnap::Net(ns) = &st.device else {
        panic!("not a NIC")
    };
    let hdr = crate::devices::tap::VNET_HDR_LEN;
    let ours: Vec<&[u8]> = ns
        .rx_backlog
        .iter()
        .map(|f| &f[hdr..])
        .filter(|f| f[12..14] == [0x88, 0xb5])
        .collect();
    assert_eq!(ours, frames.iter().map(|f| &f[..]).collect::<Vec<_>>());
    assert!(rxq.take_used(&ram).is_empty(), "delivered while paused");

    // Untrusted state: a runt frame or an oversized backlog is refused.
    let mut bad = st.clone();
    if let DeviceSnap::Net(n) = &mut bad.device {
        n.rx_backlog.push(vec![0; 3]);
    }
    let e = lock(&src).restore(&bad).unwrap_err();
    assert!(e.to_string().contains("3 bytes"), "{e}");
    let mut bad = st.clone();
    if let DeviceSnap::Net(n) = &mut bad.device {
        n.rx_backlog = vec![vec![0; 64]; net::MAX_BACKLOG + 1];
    }
    assert!(lock(&src).restore(&bad).is_err());

    // A fresh device elsewhere (another TAP) restores the state and, once running, delivers
    // exactly those frames, in order, into the guest's buffers.
    let dst = Arc::new(Mutex::new(VirtioMmio::new(
        Kind::Net(nic(format!("fyd{pid}"))),
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ram.clone(),
    )));
    lock(&dst).restore(&st).unwrap();
    drop(src);
    let rx_thread = net::RxThread::spawn(dst.clone()).unwrap().unwrap();
    lock(&dst).active = true;
    if let Kind::Net(n) = &lock(&dst).kind {
        n.wake_rx();
    }
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while got.len() < ns.rx_backlog.len() {
        for (id, len) in rxq.take_used(&ram) {
            let mut f = vec![0u8; len as usize];
            ram.memory()
                .read_slice(&mut f, GuestAddress(0x60000 + id as u64 * 0x1000))
                .unwrap();
            got.push(f);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "backlog not delivered"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let delivered: Vec<&[u8]> = got
        .iter()
        .map(|f| &f[hdr..])
        .filter(|f| f[12..14] == [0x88, 0xb5])
        .collect();
    assert_eq!(delivered, frames.iter().map(|f| &f[..]).collect::<Vec<_>>());
    if let Kind::Net(n) = &lock(&dst).kind {
        assert_eq!(n.stats().rx_carried, ns.rx_backlog.len() as u64);
    }
    rx_thread.stop();
}

#[test]
fn a_vms_devices_save_and_are_rebuilt_from_their_state_through_persist() {
    use crate::persist::Persist;
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let vm = Arc::new(kvm.create_vm().unwrap());
    vm.create_irq_chip().unwrap();
    let ram = ram();
    let img = image(64);
    let config = VmConfig {
        vcpus: 1,
        memory_mib: 32,
        kernel: crate::config::KernelSource::TestGuest,
        initrd: None,
        cmdline: String::new(),
        cpu_profile: "host".into(),
        disks: vec![DiskConfig {
            path: img.path().to_path_buf(),
            read_only: false,
        }],
        nics: vec![],
    };
    let args = || VirtioArgs {
        config: config.clone(),
        host: HostDevices::default(),
        ram: ram.clone(),
        vm: vm.clone(),
    };
    let a = VirtioDevices::build(&config, &HostDevices::default(), ram.clone(), &vm).unwrap();
    {
        let mut d = lock(&a.devs[0]);
        let mut drv = Driver::init(&mut d, blk_features(), 1).remove(0);
        d.active = true;
        blk_request(&mut d, &mut drv, &ram, VIRTIO_BLK_T_OUT, 3, 512);
    }
    let saved = a.save().unwrap();
    assert_eq!(saved[0].queues[0].next_used, 1);
    drop(a);
    let b = VirtioDevices::restore(args(), &saved).unwrap();
    assert_eq!(b.save().unwrap(), saved);
    // A state for other devices is refused.
    let mut bad = saved.clone();
    bad[0].queues.pop();
    assert!(VirtioDevices::restore(args(), &bad).is_err());
}
