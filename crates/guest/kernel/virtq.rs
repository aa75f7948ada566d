//! Split virtqueue (virtio 1.x "split" layout) over memory the caller provides.
//!
//! Pure code with no dependencies besides `core`: compiled into the guest kernel (ring 3) and,
//! through a `#[path]` module in `src/lib.rs`, into the host unit tests of the `guest` crate
//! (where a small software device plays the other side).
//!
//! One queue of `size` (a power of two, <= [`MAX_SIZE`]) entries lives in one 4 KiB block:
//! descriptor table at offset 0 (16 bytes each), available ring right after it
//! (`flags, idx, ring[size], used_event`), used ring at the next multiple of 4
//! (`flags, idx, ring[size] of (id u32, len u32), avail_event`). Addresses in descriptors are
//! guest-physical, which in the Ferry guest equal virtual addresses (identity map).
//!
//! Free descriptors are chained through their `next` fields. The available ring's flags say
//! VIRTQ_AVAIL_F_NO_INTERRUPT (the guest polls the used ring); the used ring's flags
//! (VIRTQ_USED_F_NO_NOTIFY) are honoured by [`Virtq::needs_notify`]. No event index, no
//! indirect descriptors.
//!
//! Memory ordering: descriptor and buffer contents are written before the available index
//! (release fence), the used ring flags are read after a full fence (so a device that just
//! re-enabled notifications is never missed), and a used element and the buffer it returns are
//! read only after the used index (acquire fence). All ring accesses are volatile.

use core::sync::atomic::{fence, Ordering};

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
pub const USED_F_NO_NOTIFY: u16 = 1;
/// Largest queue this driver sets up.
pub const MAX_SIZE: u16 = 128;
/// Bytes of (4 KiB-aligned) memory one queue needs.
pub const RING_BYTES: usize = 4096;

/// Offsets of (descriptor table, available ring, used ring) for a queue of `size` entries.
pub const fn layout(size: u16) -> (usize, usize, usize) {
    let n = size as usize;
    let avail = 16 * n;
    let used = (avail + 6 + 2 * n).next_multiple_of(4);
    (0, avail, used)
}

const _: () = assert!(layout(MAX_SIZE).2 + 6 + 8 * MAX_SIZE as usize <= RING_BYTES);

/// One buffer of a descriptor chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    /// The device writes this buffer (else it only reads it).
    pub device_writes: bool,
}

/// A chain the device has finished with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// Head descriptor index.
    pub id: u16,
    /// Bytes the device wrote into the chain's writable buffers.
    pub len: u32,
    /// Address of the chain's first buffer (lets callers find their buffer without a table).
    pub addr: u64,
}

/// Driver side of one split virtqueue.
#[derive(Debug)]
pub struct Virtq {
    base: usize,
    size: u16,
    free_head: u16,
    num_free: u16,
    /// Next available ring index (free running).
    avail_idx: u16,
    /// Next used ring index to consume (free running).
    last_used: u16,
}

impl Virtq {
    /// A queue that is not set up (size 0).
    pub const EMPTY: Virtq = Virtq {
        base: 0,
        size: 0,
        free_head: 0,
        num_free: 0,
        avail_idx: 0,
        last_used: 0,
    };

    /// Initializes the rings of a queue of `size` entries in `mem`.
    ///
    /// # Safety
    /// `mem` is 4096-byte aligned, [`RING_BYTES`] long, and used by nothing but this queue and
    /// its device for as long as the queue is in use; `size` is a power of two <= [`MAX_SIZE`].
    pub unsafe fn new(mem: *mut u8, size: u16) -> Virtq {
        assert!(size.is_power_of_two() && size <= MAX_SIZE);
        assert!((mem as usize).is_multiple_of(4096));
        // SAFETY: the caller gives this queue `mem`, RING_BYTES long.
        unsafe { core::ptr::write_bytes(mem, 0, RING_BYTES) };
        let q = Virtq {
            base: mem as usize,
            size,
            free_head: 0,
            num_free: size,
            avail_idx: 0,
            last_used: 0,
        };
        for i in 0..size {
            q.write_desc(i, 0, 0, 0, (i + 1) % size);
        }
        // SAFETY: the available ring's flags lie inside `mem` (the layout of `size` entries
        // fits RING_BYTES).
        unsafe { q.avail_ptr(0).write_volatile(AVAIL_F_NO_INTERRUPT) };
        q
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Free descriptors (tests only).
    #[cfg(test)]
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Guest-physical addresses of the descriptor table, available ring and used ring.
    pub fn addrs(&self) -> (u64, u64, u64) {
        let (d, a, u) = layout(self.size);
        let b = self.base as u64;
        (b + d as u64, b + a as u64, b + u as u64)
    }

    fn desc_ptr(&self, i: u16) -> *mut u64 {
        (self.base + 16 * usize::from(i)) as *mut u64
    }

    /// u16 `k` of the available ring (0 = flags, 1 = idx, 2.. = ring).
    fn avail_ptr(&self, k: usize) -> *mut u16 {
        (self.base + layout(self.size).1 + 2 * k) as *mut u16
    }

    /// u32 `k` of the used ring (0 = flags | idx << 16, 1 + 2e = id of element e, 2 + 2e = len).
    fn used_ptr(&self, k: usize) -> *mut u32 {
        (self.base + layout(self.size).2 + 4 * k) as *mut u32
    }

    fn write_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let p = self.desc_ptr(i);
        // SAFETY: i < size, inside the queue memory (see `new`).
        unsafe {
            p.write_volatile(addr);
            p.add(1).cast::<u32>().write_volatile(len);
            p.add(1).cast::<u16>().add(2).write_volatile(flags);
            p.add(1).cast::<u16>().add(3).write_volatile(next);
        }
    }

    /// (addr, flags, next) of descriptor `i`.
    fn read_desc(&self, i: u16) -> (u64, u16, u16) {
        let p = self.desc_ptr(i);
        // SAFETY: i < size, inside the queue memory (see `new`).
        unsafe {
            (
                p.read_volatile(),
                p.add(1).cast::<u16>().add(2).read_volatile(),
                p.add(1).cast::<u16>().add(3).read_volatile(),
            )
        }
    }

    /// Puts a chain of `bufs` (1..=free descriptors) into the available ring; returns the head
    /// descriptor index, or None if there are not enough free descriptors. The device sees the
    /// chain after the next notification (see [`Virtq::needs_notify`]).
    pub fn add(&mut self, bufs: &[Buf]) -> Option<u16> {
        let n = bufs.len();
        if n == 0 || n > usize::from(self.num_free) {
            return None;
        }
        let head = self.free_head;
        let mut i = head;
        for (k, b) in bufs.iter().enumerate() {
            let (_, _, next) = self.read_desc(i);
            let mut flags = if b.device_writes { DESC_F_WRITE } else { 0 };
            if k + 1 < n {
                flags |= DESC_F_NEXT;
            }
            self.write_desc(i, b.addr, b.len, flags, next);
            if k + 1 < n {
                i = next;
            } else {
                self.free_head = next;
            }
        }
        self.num_free -= n as u16;
        let slot = 2 + usize::from(self.avail_idx & (self.size - 1));
        // SAFETY: slot < 2 + size: inside the available ring.
        unsafe { self.avail_ptr(slot).write_volatile(head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // descriptors, buffers and the ring slot before the index
        fence(Ordering::Release);
        // SAFETY: the idx field of the available ring.
        unsafe { self.avail_ptr(1).write_volatile(self.avail_idx) };
        Some(head)
    }

    /// After [`Virtq::add`]: whether the device wants a notification (QueueNotify) now, i.e.
    /// it has not set VIRTQ_USED_F_NO_NOTIFY.
    pub fn needs_notify(&self) -> bool {
        // the available index store must be visible before the flags are read (store -> load)
        fence(Ordering::SeqCst);
        // SAFETY: the flags/idx word of the used ring.
        let w = unsafe { self.used_ptr(0).read_volatile() };
        w as u16 & USED_F_NO_NOTIFY == 0
    }

    /// Number of chains the device has returned that were not consumed yet.
    pub fn used_pending(&self) -> u16 {
        // SAFETY: the flags/idx word of the used ring.
        let w = unsafe { self.used_ptr(0).read_volatile() };
        ((w >> 16) as u16).wrapping_sub(self.last_used)
    }

    /// Takes the next chain the device has finished with, if any, and frees its descriptors.
    pub fn pop_used(&mut self) -> Option<Used> {
        if self.used_pending() == 0 {
            return None;
        }
        // the element (and the buffers it returns) after the index
        fence(Ordering::Acquire);
        let e = usize::from(self.last_used & (self.size - 1));
        // SAFETY: e < size: inside the used ring.
        let (id, len) = unsafe {
            (
                self.used_ptr(1 + 2 * e).read_volatile(),
                self.used_ptr(2 + 2 * e).read_volatile(),
            )
        };
        self.last_used = self.last_used.wrapping_add(1);
        let id = id as u16 & (self.size - 1);
        let (addr, _, _) = self.read_desc(id);
        // free the chain
        let mut i = id;
        let mut n = 1;
        loop {
            let (_, flags, next) = self.read_desc(i);
            if flags & DESC_F_NEXT == 0 || n >= self.size {
                break;
            }
            i = next & (self.size - 1);
            n += 1;
        }
        let (a, _, _) = self.read_desc(i);
        self.write_desc(i, a, 0, 0, self.free_head);
        self.free_head = id;
        self.num_free = (self.num_free + n).min(self.size);
        Some(Used { id, len, addr })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C, align(4096))]
    struct Mem([u8; RING_BYTES]);

    /// (addr, len, device-writable) of one buffer as the device sees it.
    type DevBuf = (u64, u32, bool);

    /// The device side, reading and writing the same memory.
    struct Dev {
        base: usize,
        size: u16,
        next_avail: u16,
        used_idx: u16,
    }

    impl Dev {
        fn u16_at(&self, off: usize) -> u16 {
            // SAFETY: `off` is inside the test's ring memory (the layout of `size` entries).
            unsafe { ((self.base + off) as *const u16).read_volatile() }
        }
        fn desc(&self, i: u16) -> (u64, u32, u16, u16) {
            let p = self.base + 16 * usize::from(i);
            // SAFETY: descriptor `i` (< size) lies in the test's ring memory.
            unsafe {
                (
                    (p as *const u64).read_volatile(),
                    ((p + 8) as *const u32).read_volatile(),
                    ((p + 12) as *const u16).read_volatile(),
                    ((p + 14) as *const u16).read_volatile(),
                )
            }
        }
        /// Pops one available chain: (head, its buffers as (addr, len, writable)).
        fn take(&mut self) -> Option<(u16, Vec<DevBuf>)> {
            let (_, a, _) = layout(self.size);
            if self.u16_at(a + 2) == self.next_avail {
                return None;
            }
            let slot = usize::from(self.next_avail % self.size);
            let head = self.u16_at(a + 4 + 2 * slot);
            self.next_avail = self.next_avail.wrapping_add(1);
            let mut bufs = Vec::new();
            let mut i = head;
            loop {
                let (addr, len, flags, next) = self.desc(i);
                bufs.push((addr, len, flags & DESC_F_WRITE != 0));
                if flags & DESC_F_NEXT == 0 {
                    break;
                }
                i = next;
            }
            Some((head, bufs))
        }
        fn complete(&mut self, head: u16, len: u32) {
            let (_, _, u) = layout(self.size);
            let e = usize::from(self.used_idx % self.size);
            // SAFETY: used-ring entry `e` (< size) and the ring's index lie in the test's ring
            // memory.
            unsafe {
                ((self.base + u + 4 + 8 * e) as *mut u32).write_volatile(u32::from(head));
                ((self.base + u + 8 + 8 * e) as *mut u32).write_volatile(len);
                self.used_idx = self.used_idx.wrapping_add(1);
                ((self.base + u + 2) as *mut u16).write_volatile(self.used_idx);
            }
        }
        fn set_no_notify(&self, on: bool) {
            let (_, _, u) = layout(self.size);
            // SAFETY: the used ring's flags lie in the test's ring memory.
            unsafe { ((self.base + u) as *mut u16).write_volatile(u16::from(on)) };
        }
    }

    fn setup(size: u16) -> (Box<Mem>, Virtq, Dev) {
        let mut mem = Box::new(Mem([0xa5; RING_BYTES]));
        // SAFETY: `Mem` is 4096-byte aligned and RING_BYTES long, and the returned box keeps it
        // alive for the queue's users (this test and its device side).
        let q = unsafe { Virtq::new(mem.0.as_mut_ptr(), size) };
        let dev = Dev {
            base: mem.0.as_ptr() as usize,
            size,
            next_avail: 0,
            used_idx: 0,
        };
        (mem, q, dev)
    }

    #[test]
    fn layout_fits_and_is_aligned() {
        for size in [1u16, 2, 8, 64, 128] {
            let (d, a, u) = layout(size);
            assert_eq!(d, 0);
            assert_eq!(a, 16 * usize::from(size));
            assert_eq!(u % 4, 0);
            assert!(u >= a + 6 + 2 * usize::from(size));
            assert!(u + 6 + 8 * usize::from(size) <= RING_BYTES);
        }
        let (_, q, dev) = setup(64);
        let (d, a, u) = q.addrs();
        assert_eq!(d, dev.base as u64);
        assert_eq!(a, dev.base as u64 + 1024);
        assert_eq!(u, dev.base as u64 + 1024 + 136); // 6 + 2 * 64 = 134, rounded up to 4
                                                     // no interrupts wanted
        assert_eq!(dev.u16_at(1024), AVAIL_F_NO_INTERRUPT);
    }

    #[test]
    fn chains_round_trip_with_index_wrap() {
        let (_mem, mut q, mut dev) = setup(8);
        let mut expect_free = 8;
        // many more requests than 65536 / 8 so both free-running indices wrap
        for r in 0..70_000u32 {
            let n = (r % 3 + 1) as usize;
            let bufs: Vec<Buf> = (0..n)
                .map(|k| Buf {
                    addr: 0x1000 * u64::from(r) + k as u64,
                    len: r + k as u32,
                    device_writes: k == n - 1,
                })
                .collect();
            let head = q.add(&bufs).unwrap();
            expect_free -= n as u16;
            assert_eq!(q.num_free(), expect_free);
            let (h, got) = dev.take().unwrap();
            assert_eq!(h, head);
            assert_eq!(got.len(), n);
            for (k, (addr, len, w)) in got.iter().enumerate() {
                assert_eq!(
                    (*addr, *len, *w),
                    (bufs[k].addr, bufs[k].len, bufs[k].device_writes)
                );
            }
            assert!(dev.take().is_none());
            assert!(q.pop_used().is_none());
            dev.complete(h, r);
            assert_eq!(q.used_pending(), 1);
            let u = q.pop_used().unwrap();
            assert_eq!(
                u,
                Used {
                    id: head,
                    len: r,
                    addr: bufs[0].addr
                }
            );
            expect_free += n as u16;
            assert_eq!(q.num_free(), expect_free);
            assert!(q.pop_used().is_none());
        }
    }

    #[test]
    fn full_queue_out_of_order_completion() {
        let (_mem, mut q, mut dev) = setup(4);
        let one = |a| {
            [Buf {
                addr: a,
                len: 1,
                device_writes: true,
            }]
        };
        let heads: Vec<u16> = (0..4).map(|a| q.add(&one(a)).unwrap()).collect();
        assert!(q.add(&one(9)).is_none());
        assert_eq!(q.num_free(), 0);
        let taken: Vec<u16> = (0..4).map(|_| dev.take().unwrap().0).collect();
        assert_eq!(taken, heads);
        // complete in reverse order
        for &h in heads.iter().rev() {
            dev.complete(h, 100 + u32::from(h));
        }
        let mut got = Vec::new();
        while let Some(u) = q.pop_used() {
            got.push((u.id, u.len));
        }
        assert_eq!(
            got,
            heads
                .iter()
                .rev()
                .map(|&h| (h, 100 + u32::from(h)))
                .collect::<Vec<_>>()
        );
        assert_eq!(q.num_free(), 4);
        // a two-descriptor chain and two singles fit again
        assert!(q.add(&[one(1)[0], one(2)[0]]).is_some());
        assert!(q.add(&one(3)).is_some());
        assert!(q.add(&one(4)).is_some());
        assert!(q.add(&one(5)).is_none());
    }

    #[test]
    fn notification_suppression() {
        let (_mem, mut q, dev) = setup(2);
        q.add(&[Buf {
            addr: 1,
            len: 1,
            device_writes: false,
        }])
        .unwrap();
        assert!(q.needs_notify());
        dev.set_no_notify(true);
        assert!(!q.needs_notify());
        dev.set_no_notify(false);
        assert!(q.needs_notify());
        assert!(q.add(&[]).is_none());
    }
}
