//! Shared configuration (written by the BSP before releasing the APs) and per-CPU state.

use crate::boot::MAX_CPUS;
use crate::cmdline::Workload;
use crate::verify_logic::{Verifier, Writer};
use core::sync::atomic::AtomicU32;

pub(crate) struct Shared {
    pub(crate) workload: Workload,
    /// CPUs that write the working set: all of them for dirty/verify, all but CPU 0 (which
    /// drives the device) for disk-log/net-echo with `ferry.load_mib`.
    pub(crate) wss_cpus: u64,
    pub(crate) tsc_khz: u64,
    pub(crate) hb_ticks: u64,
    /// Waits shorter than this (300 us) spin instead of sleeping.
    pub(crate) spin_ticks: u64,
    pub(crate) sec_ticks: u64,
    pub(crate) wss_base: u64,
    pub(crate) wss_pages: u64,
    pub(crate) rate_mibs: u64,
    pub(crate) rounds: u64,
    /// TSC at which CPU 0 resets the machine (0 = never).
    pub(crate) reset_at: u64,
    pub(crate) has_deadline: bool,
    /// disk-log: records per second (0 = unlimited) and flush interval (0 = never).
    pub(crate) disk_rate: u64,
    pub(crate) disk_flush: u64,
}

pub(crate) static mut SHARED: Shared = Shared {
    workload: Workload::Idle,
    wss_cpus: 1,
    tsc_khz: 0,
    hb_ticks: 0,
    spin_ticks: 0,
    sec_ticks: 0,
    wss_base: 0,
    wss_pages: 0,
    rate_mibs: 0,
    rounds: 0,
    reset_at: 0,
    has_deadline: false,
    disk_rate: 0,
    disk_flush: 0,
};

/// 0 = APs wait, 1 = go, 2 = boot failed (everybody halts).
pub(crate) static GO: AtomicU32 = AtomicU32::new(0);

/// Workload state of one CPU (only that CPU touches it).
#[repr(C, align(128))]
pub(crate) struct PerCpu {
    pub(crate) hb_counter: u64,
    pub(crate) next_hb: u64,
    pub(crate) next_report: u64,
    pub(crate) pace_base_tsc: u64,
    pub(crate) pace_base_count: u64,
    /// Page writes so far (dirty and verify; the verify initial fill is not counted).
    pub(crate) pace_count: u64,
    pub(crate) dirty_pos: u64,
    pub(crate) dirty_round: u64,
    pub(crate) verify_init_pos: u64,
    pub(crate) verify: Verifier,
    pub(crate) verify_sweeps: u64,
    pub(crate) verify_sweep_errors: u64,
    pub(crate) verify_sweep_printed: u64,
    pub(crate) verify_last_ok: u64,
}

// All zero: PERCPU lives in .bss.
pub(crate) const PERCPU_INIT: PerCpu = PerCpu {
    hb_counter: 0,
    next_hb: 0,
    next_report: 0,
    pace_base_tsc: 0,
    pace_base_count: 0,
    pace_count: 0,
    dirty_pos: 0,
    dirty_round: 0,
    verify_init_pos: 0,
    verify: Verifier {
        start: 0,
        end: 0,
        writer: Writer { gen: 0, pos: 0 },
        check: 0,
        checked: 0,
    },
    verify_sweeps: 0,
    verify_sweep_errors: 0,
    verify_sweep_printed: 0,
    verify_last_ok: 0,
};

pub(crate) static mut PERCPU: [PerCpu; MAX_CPUS] = [PERCPU_INIT; MAX_CPUS];

pub(crate) fn shared() -> &'static Shared {
    let shared = &raw const SHARED;
    // SAFETY: written only by the BSP before GO is released (Release/Acquire), read-only after.
    unsafe { &*shared }
}

pub(crate) fn percpu(cpu: usize) -> &'static mut PerCpu {
    assert!(cpu < MAX_CPUS);
    // SAFETY: each CPU only ever uses its own element, and only from one call chain.
    unsafe { &mut *(&raw mut PERCPU).cast::<PerCpu>().add(cpu) }
}
