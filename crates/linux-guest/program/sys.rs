//! The few libc calls std does not wrap (glibc is linked statically; these are its symbols).

use std::ffi::c_void;
use std::io;

/// `cpu_set_t`: 1024 CPUs.
const CPU_SET_BYTES: usize = 128;

extern "C" {
    fn sched_getaffinity(pid: i32, size: usize, mask: *mut u8) -> i32;
    fn sched_setaffinity(pid: i32, size: usize, mask: *const u8) -> i32;
    fn mmap(addr: *mut c_void, len: usize, prot: i32, flags: i32, fd: i32, off: i64)
        -> *mut c_void;
    fn mlock(addr: *const c_void, len: usize) -> i32;
    fn ioctl(fd: i32, request: u64, ...) -> i32;
    fn reboot(cmd: i32) -> i32;
    fn sync();
}

const PROT_READ: i32 = 1;
const PROT_WRITE: i32 = 2;
const MAP_PRIVATE: i32 = 0x02;
const MAP_ANONYMOUS: i32 = 0x20;
const MAP_POPULATE: i32 = 0x8000;
const MAP_FAILED: *mut c_void = !0usize as *mut c_void;
/// `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: u64 = 0x8008_1272;
const LINUX_REBOOT_CMD_RESTART: i32 = 0x0123_4567;

/// `O_DIRECT` on x86-64.
pub const O_DIRECT: i32 = 0o40000;
/// `O_DSYNC` on x86-64.
pub const O_DSYNC: i32 = 0o10000;
/// `EINVAL`.
pub const EINVAL: i32 = 22;

/// The CPUs this process may run on (its affinity mask), in increasing order.
pub fn online_cpus() -> io::Result<Vec<usize>> {
    let mut mask = [0u8; CPU_SET_BYTES];
    // SAFETY: the kernel writes at most `CPU_SET_BYTES` bytes into `mask`.
    if unsafe { sched_getaffinity(0, CPU_SET_BYTES, mask.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((0..CPU_SET_BYTES * 8)
        .filter(|&c| mask[c / 8] & (1 << (c % 8)) != 0)
        .collect())
}

/// Pins the calling thread to CPU `cpu`.
pub fn pin_to(cpu: usize) -> io::Result<()> {
    let mut mask = [0u8; CPU_SET_BYTES];
    mask[cpu / 8] |= 1 << (cpu % 8);
    // SAFETY: `mask` is a valid cpu_set_t of `CPU_SET_BYTES` bytes; pid 0 = this thread.
    if unsafe { sched_setaffinity(0, CPU_SET_BYTES, mask.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Private anonymous memory of `bytes`, populated; never unmapped. Returns the base address
/// and whether `mlock` succeeded.
pub fn map_anonymous(bytes: usize) -> io::Result<(*mut u8, Result<(), io::Error>)> {
    // SAFETY: a fresh anonymous mapping chosen by the kernel; it aliases nothing.
    let p = unsafe {
        mmap(
            std::ptr::null_mut(),
            bytes,
            PROT_READ | PROT_WRITE,
            MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE,
            -1,
            0,
        )
    };
    if p == MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: locks the range just mapped.
    let locked = if unsafe { mlock(p, bytes) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    };
    Ok((p.cast(), locked))
}

/// Size in bytes of the block device open as `fd`.
pub fn block_device_bytes(fd: i32) -> io::Result<u64> {
    let mut bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
    if unsafe { ioctl(fd, BLKGETSIZE64, &mut bytes as *mut u64) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(bytes)
}

/// Restarts the machine (needs CAP_SYS_BOOT); returns only on failure.
pub fn restart_machine() -> io::Error {
    // SAFETY: sync() has no preconditions; reboot() either restarts or fails with errno.
    unsafe {
        sync();
        reboot(LINUX_REBOOT_CMD_RESTART);
    }
    io::Error::last_os_error()
}

/// The time-stamp counter.
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc exists on every x86-64 CPU and has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The physical address of this process's page at `va` (from /proc/self/pagemap: present bit
/// 63, frame number in bits 0-54), `None` if it is not present or the kernel hides frame
/// numbers (they read as 0 without CAP_SYS_ADMIN).
pub fn physical_address(va: usize) -> io::Result<Option<u64>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open("/proc/self/pagemap")?;
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, (va as u64 / 4096) * 8)?;
    let e = u64::from_le_bytes(e);
    let pfn = e & ((1 << 55) - 1);
    Ok((e >> 63 == 1 && pfn != 0).then_some(pfn * 4096 + va as u64 % 4096))
}
