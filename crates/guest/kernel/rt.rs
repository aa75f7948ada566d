//! Ring-3 runtime: TSC, COM1 output, the system calls, waiting.

use crate::boot::{user_stacks, MAX_CPUS, SERIAL_LOCK, USTACK_SIZE};
use crate::state::Shared;
use core::arch::asm;
use core::sync::atomic::Ordering;

pub(crate) const COM1: u16 = 0x3f8;

#[inline(always)]
pub(crate) fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[inline(always)]
pub(crate) fn outb(port: u16, value: u8) {
    // SAFETY: port I/O to COM1, allowed by the TSS I/O bitmap; no memory effects.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// CPU index of the caller, from its stack pointer (each CPU has its own ring-3 stack).
pub(crate) fn current_cpu() -> usize {
    let sp: usize;
    // SAFETY: reads RSP.
    unsafe { asm!("mov {}, rsp", out(reg) sp, options(nomem, nostack, preserves_flags)) };
    let base = &raw const user_stacks as usize;
    (sp.wrapping_sub(base) / USTACK_SIZE).min(MAX_CPUS - 1)
}

/// Writes `bytes` to COM1 under the serial lock (re-entrant for the lock owner).
pub fn serial_write(bytes: &[u8]) {
    let me = current_cpu() as u32 + 1;
    let nested = SERIAL_LOCK.load(Ordering::Relaxed) == me;
    if !nested {
        loop {
            if SERIAL_LOCK.load(Ordering::Relaxed) == 0
                && SERIAL_LOCK
                    .compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                break;
            }
            core::hint::spin_loop();
        }
    }
    for &b in bytes {
        outb(COM1, b);
    }
    if !nested {
        SERIAL_LOCK.store(0, Ordering::Release);
    }
}

/// Syscall 1: sleep in ring 0 until TSC >= deadline.
pub(crate) fn sys_sleep_until(deadline: u64) {
    // SAFETY: int3 is the system call; the handler preserves everything but RAX.
    unsafe { asm!("int3", inout("rax") 1u64 => _, in("rdi") deadline, options(nostack)) }
}

/// Syscall 3: reset the machine (i8042).
pub(crate) fn sys_reset() -> ! {
    // SAFETY: int3 syscall 3 does not return (the VMM resets or stops the machine).
    unsafe { asm!("int3", in("rax") 3u64, options(noreturn, nostack)) }
}

/// Syscall 2: halt this CPU forever.
pub(crate) fn sys_halt() -> ! {
    // SAFETY: int3 syscall 2 never returns.
    unsafe { asm!("int3", in("rax") 2u64, options(noreturn, nostack)) }
}

pub(crate) fn spin_until(deadline: u64) {
    while rdtsc() < deadline {
        core::hint::spin_loop();
    }
}

/// Waits until TSC >= deadline: spin if it is close (or there is no TSC-deadline timer), else
/// sleep in ring 0.
pub(crate) fn wait_until(sh: &Shared, deadline: u64) {
    let now = rdtsc();
    if deadline <= now {
        return;
    }
    if !sh.has_deadline || deadline - now < sh.spin_ticks {
        spin_until(deadline);
    } else {
        sys_sleep_until(deadline);
    }
}
