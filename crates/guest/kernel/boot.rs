//! Ring 0 (`boot.S`, assembly only: boot, SMP start-up, interrupt, exception and system-call
//! handlers) and what it shares with ring 3: the boot information it fills in, the serial lock
//! and the layout constants both sides use.

use core::arch::global_asm;
use core::mem::offset_of;
use core::sync::atomic::AtomicU32;

/// CPUs supported (APIC IDs 0..MAX_CPUS-1).
pub const MAX_CPUS: usize = 16;
/// Ring-0 stack per CPU (TSS.RSP0).
pub const KSTACK_SIZE: usize = 8 * 1024;
/// Ring-3 stack per CPU.
pub const USTACK_SIZE: usize = 128 * 1024;
/// Memory map entries copied from hvm_start_info.
pub const MAX_MEMMAP: usize = 64;
/// Command line bytes copied (including the NUL).
pub const CMDLINE_MAX: usize = 1024;
/// Page directories (1 GiB each) for the identity map.
pub const PD_PAGES: usize = 64;
/// LAPIC timer vector.
pub const TIMER_VECTOR: usize = 0x20;
/// AP trampoline address (SIPI vector 0x08).
pub const TRAMPOLINE: usize = 0x8000;

pub(crate) const PVH_MAGIC: u32 = 0x336e_c578;

/// One `hvm_memmap_table_entry`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MemmapEntry {
    pub addr: u64,
    pub size: u64,
    /// 1 = RAM.
    pub typ: u32,
    pub reserved: u32,
}

/// What ring 0 found at boot, passed to [`user_main`]. Written only by ring 0 before ring 3 runs.
#[repr(C)]
pub struct BootInfo {
    /// EBX at the PVH entry.
    pub start_info_paddr: u64,
    /// hvm_start_info magic if it was valid (0x336ec578), else 0.
    pub start_info_magic: u32,
    pub start_info_version: u32,
    /// Bit i: CPU with APIC ID i checked in. Bit 31: check-in window closed.
    pub cpu_mask: u32,
    /// APIC ID of the BSP.
    pub bsp_id: u32,
    /// Measured TSC frequency in Hz (0 = unknown).
    pub tsc_hz: u64,
    /// 0 = none, 1 = kvmclock, 2 = PIT.
    pub tsc_source: u32,
    /// CPUID.1:ECX[24]: the LAPIC timer runs in TSC-deadline mode.
    pub has_tsc_deadline: u32,
    /// `[0, mapped_gib GiB)` is identity mapped.
    pub mapped_gib: u32,
    /// Entries copied into `memmap`.
    pub memmap_entries: u32,
    /// Entries start_info reported.
    pub memmap_total: u32,
    /// Bytes in `cmdline` (no NUL).
    pub cmdline_len: u32,
    pub memmap: [MemmapEntry; MAX_MEMMAP],
    pub cmdline: [u8; CMDLINE_MAX],
}

/// Filled by ring 0 at boot.
#[no_mangle]
pub static mut BOOT_INFO: BootInfo = BootInfo {
    start_info_paddr: 0,
    start_info_magic: 0,
    start_info_version: 0,
    cpu_mask: 0,
    bsp_id: 0,
    tsc_hz: 0,
    tsc_source: 0,
    has_tsc_deadline: 0,
    mapped_gib: 0,
    memmap_entries: 0,
    memmap_total: 0,
    cmdline_len: 0,
    memmap: [MemmapEntry {
        addr: 0,
        size: 0,
        typ: 0,
        reserved: 0,
    }; MAX_MEMMAP],
    cmdline: [0; CMDLINE_MAX],
};

/// COM1 line lock: 0 = free, else owner cpu + 1. Shared with the ring-0 panic handler.
#[no_mangle]
pub static SERIAL_LOCK: AtomicU32 = AtomicU32::new(0);

global_asm!(
    include_str!("boot.S"),
    BI_SI_PADDR = const offset_of!(BootInfo, start_info_paddr),
    BI_SI_MAGIC = const offset_of!(BootInfo, start_info_magic),
    BI_SI_VERSION = const offset_of!(BootInfo, start_info_version),
    BI_CPU_MASK = const offset_of!(BootInfo, cpu_mask),
    BI_BSP_ID = const offset_of!(BootInfo, bsp_id),
    BI_TSC_HZ = const offset_of!(BootInfo, tsc_hz),
    BI_TSC_SOURCE = const offset_of!(BootInfo, tsc_source),
    BI_HAS_DEADLINE = const offset_of!(BootInfo, has_tsc_deadline),
    BI_MAPPED_GIB = const offset_of!(BootInfo, mapped_gib),
    BI_MEMMAP_ENTRIES = const offset_of!(BootInfo, memmap_entries),
    BI_MEMMAP_TOTAL = const offset_of!(BootInfo, memmap_total),
    BI_CMDLINE_LEN = const offset_of!(BootInfo, cmdline_len),
    BI_MEMMAP = const offset_of!(BootInfo, memmap),
    BI_CMDLINE = const offset_of!(BootInfo, cmdline),
    MAX_CPUS = const MAX_CPUS,
    KSTACK_SIZE = const KSTACK_SIZE,
    USTACK_SIZE = const USTACK_SIZE,
    MAX_MEMMAP = const MAX_MEMMAP,
    CMDLINE_MAX = const CMDLINE_MAX,
    PD_PAGES = const PD_PAGES,
    TIMER_VECTOR = const TIMER_VECTOR,
    TRAMPOLINE = const TRAMPOLINE,
    options(att_syntax)
);

const _: () = assert!(core::mem::size_of::<MemmapEntry>() == 24);
const _: () = assert!(offset_of!(BootInfo, memmap) % 8 == 0);

extern "C" {
    /// Base of the per-CPU ring-3 stacks (boot.S).
    pub(crate) static user_stacks: u8;
}
