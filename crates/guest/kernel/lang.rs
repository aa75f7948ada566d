//! The panic handler and the C memory functions the compiler expects (ring 3 only).

use crate::line::Line;
use crate::rt::{current_cpu, sys_halt};
use core::arch::asm;

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    use core::fmt::Write;
    let mut l = Line::new();
    l.str("PANIC cpu=")
        .dec(current_cpu() as u64)
        .str(" rust panic");
    if let Some(loc) = info.location() {
        l.str(" at ")
            .str(loc.file())
            .str(":")
            .dec(u64::from(loc.line()));
    }
    let _ = write!(l, ": {}", info.message());
    l.send();
    sys_halt()
}

/// Referenced by the prebuilt `core` (built with unwinding); never called with panic=abort.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {
    sys_halt()
}

/// # Safety
/// C `memcpy`: `src` is readable and `dst` writable for `n` bytes, and they do not overlap.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: copies `n` bytes forward from `src` to `dst` (DF is clear: nothing in ring 3
    // sets it but memmove, which clears it again), which the caller made valid.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// C `memmove`: `src` is readable and `dst` writable for `n` bytes (they may overlap).
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // no overlap, or dst below src: forward copy is safe
        // SAFETY: copies `n` bytes forward within ranges the caller made valid; a forward copy
        // never reads a byte it already overwrote here.
        unsafe {
            asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
                 options(nostack, preserves_flags));
        }
    } else {
        // SAFETY: here dst is above src and the ranges overlap, so n >= 1 and `n - 1` stays
        // inside both ranges; the backward copy (DF set, cleared again) reads every byte before
        // overwriting it.
        unsafe {
            asm!("std", "rep movsb", "cld",
                 inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
                 options(nostack));
        }
    }
    dst
}

/// # Safety
/// C `memset`: `dst` is writable for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: stores `n` bytes forward from `dst`, which the caller made valid.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// C `memcmp`: `a` and `b` are readable for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n, and the caller made both ranges readable for n bytes.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// C `bcmp`: `a` and `b` are readable for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: the caller's guarantee is memcmp's.
    unsafe { memcmp(a, b, n) }
}
