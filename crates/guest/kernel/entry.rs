//! Entry of every CPU into ring 3, and the BSP's boot checks and setup.

use crate::boot::{BootInfo, MemmapEntry, CMDLINE_MAX, MAX_MEMMAP, PVH_MAGIC};
use crate::cmdline::{self, Workload};
use crate::line::Line;
use crate::rt::{rdtsc, sys_halt, sys_sleep_until};
use crate::state::{Shared, GO, SHARED};
use crate::workload::run;
use crate::{disk, net, virtio, MIB, PAGE_SIZE};
use core::arch::asm;
use core::sync::atomic::Ordering;

pub(crate) const WSS_MIN_START: u64 = 16 * MIB;
pub(crate) const WSS_ALIGN: u64 = 2 * MIB;

/// Ring-3 entry of every CPU (see the boot path above). `cpu` = APIC ID.
///
/// # Safety
/// Only `boot.S` calls it, once per CPU, with `info` = `&BOOT_INFO` fully written.
#[no_mangle]
pub unsafe extern "C" fn user_main(cpu: u64, info: *const BootInfo) -> ! {
    let mxcsr: u32 = 0x1f80;
    // SAFETY: loads the default SSE control word (all exceptions masked).
    unsafe { asm!("ldmxcsr [{}]", in(reg) &mxcsr, options(nostack, readonly)) };
    let cpu = cpu as usize;
    // SAFETY: ring 0 filled BOOT_INFO before entering ring 3 and never writes it afterwards.
    let info = unsafe { &*info };
    if cpu as u32 == info.bsp_id {
        if bsp_setup(cpu, info).is_err() {
            GO.store(2, Ordering::Release);
            sys_halt();
        }
        GO.store(1, Ordering::Release);
    } else {
        let ms = info.tsc_hz / 1000;
        loop {
            match GO.load(Ordering::Acquire) {
                0 if ms != 0 && info.has_tsc_deadline != 0 => sys_sleep_until(rdtsc() + ms),
                0 => core::hint::spin_loop(),
                1 => break,
                _ => sys_halt(),
            }
        }
    }
    run(cpu)
}

pub(crate) fn panic_line() -> Line {
    let mut l = Line::new();
    l.str("PANIC ");
    l
}

pub(crate) fn bsp_setup(cpu: usize, info: &BootInfo) -> Result<(), ()> {
    if info.start_info_magic != PVH_MAGIC {
        panic_line()
            .str("no valid hvm_start_info at 0x")
            .hex(info.start_info_paddr)
            .str(" (PVH boot required)")
            .send();
        return Err(());
    }
    let cmd = &info.cmdline[..(info.cmdline_len as usize).min(CMDLINE_MAX)];
    let cfg = match cmdline::parse(cmd) {
        Ok(c) => c,
        Err(bad) => {
            panic_line()
                .str("bad cmdline: ")
                .bytes(bad.item)
                .str(" (")
                .str(bad.reason)
                .str(")")
                .send();
            return Err(());
        }
    };
    let tsc_khz = cfg.tsc_khz.unwrap_or((info.tsc_hz + 500) / 1000);
    if tsc_khz == 0 {
        panic_line()
            .str("unknown TSC frequency (no kvmclock, PIT failed): pass ferry.tsc_khz=<kHz>")
            .send();
        return Err(());
    }
    let mask = info.cpu_mask & 0xffff;
    let ncpus = mask.count_ones();
    if cpu != 0 || mask != (1u32 << ncpus) - 1 {
        panic_line()
            .str("CPU APIC IDs are not 0..N-1: bsp=")
            .dec(cpu as u64)
            .str(" mask=0x")
            .hex(u64::from(mask))
            .send();
        return Err(());
    }
    let entries = &info.memmap[..(info.memmap_entries as usize).min(MAX_MEMMAP)];
    if entries.is_empty() {
        panic_line()
            .str("no memory map in hvm_start_info (version ")
            .dec(u64::from(info.start_info_version))
            .str(")")
            .send();
        return Err(());
    }
    let ram: u64 = entries.iter().filter(|e| e.typ == 1).map(|e| e.size).sum();
    let mem_mib = (ram + MIB / 2) / MIB;

    let mut wss_base = 0;
    let mut wss_pages = 0;
    let mapped = u64::from(info.mapped_gib) << 30;
    let wss_mib = if cfg.workload.uses_wss() {
        cfg.wss_mib
    } else if cfg.workload.drives_device() {
        cfg.load_mib
    } else {
        0
    };
    if wss_mib > 0 {
        wss_pages = wss_mib * (MIB / PAGE_SIZE);
        match find_wss(entries, mapped, wss_mib * MIB) {
            Ok(base) => wss_base = base,
            Err(largest) => {
                panic_line()
                    .str(if cfg.workload.uses_wss() {
                        "bad cmdline: ferry.wss_mib="
                    } else {
                        "bad cmdline: ferry.load_mib="
                    })
                    .dec(wss_mib)
                    .str(" (does not fit in RAM: largest contiguous RAM above 16 MiB is ")
                    .dec(largest / MIB)
                    .str(" MiB)")
                    .send();
                return Err(());
            }
        }
    }

    // Devices (CPU 0 drives them later): found and initialized before the boot line, so any
    // problem is a boot PANIC instead of it.
    virtio::dma_reset();
    match cfg.workload {
        Workload::DiskLog => disk::setup(&cfg, mapped)?,
        Workload::NetEcho => net::setup(&cfg, mapped)?,
        _ => {}
    }

    Line::new()
        .str("ferry-guest boot cpus=")
        .dec(u64::from(ncpus))
        .str(" mem_mib=")
        .dec(mem_mib)
        .str(" tsc_khz=")
        .dec(tsc_khz)
        .str(" workload=")
        .str(cfg.workload.name())
        .str(" wss_mib=")
        .dec(cfg.wss_mib)
        .str(" rate_mibs=")
        .dec(cfg.rate_mibs)
        .str(" hb_ms=")
        .dec(cfg.hb_ms)
        .str(" load_mib=")
        .dec(if cfg.workload.drives_device() { cfg.load_mib } else { 0 })
        .send();
    match cfg.workload {
        Workload::Dirty | Workload::Verify => {
            Line::new()
                .str("wss gpa=0x")
                .hex(wss_base)
                .str(" pages=")
                .dec(wss_pages)
                .send();
        }
        Workload::DiskLog => disk::print_info(),
        Workload::NetEcho => net::print_info(),
        Workload::Idle => {}
    }

    let shared = &raw mut SHARED;
    // SAFETY: the APs do not read SHARED before GO is released, and only this CPU writes it.
    unsafe {
        *shared = Shared {
            workload: cfg.workload,
            wss_cpus: if cfg.workload.drives_device() {
                u64::from(ncpus).saturating_sub(1).max(1)
            } else {
                u64::from(ncpus)
            },
            tsc_khz,
            hb_ticks: cfg.hb_ms * tsc_khz,
            spin_ticks: tsc_khz * 3 / 10,
            sec_ticks: tsc_khz * 1000,
            wss_base,
            wss_pages,
            rate_mibs: cfg.rate_mibs,
            rounds: cfg.rounds,
            reset_at: if cfg.reset_after_ms == 0 { 0 } else { rdtsc() + cfg.reset_after_ms * tsc_khz },
            has_deadline: info.has_tsc_deadline != 0,
            disk_rate: cfg.disk_rate,
            disk_flush: cfg.disk_flush,
        };
    }
    Ok(())
}

/// First 2 MiB-aligned address >= 16 MiB where `bytes` of contiguous RAM (merged adjacent RAM
/// entries, below `limit`) fit; `Err(largest candidate size)` otherwise.
pub(crate) fn find_wss(entries: &[MemmapEntry], limit: u64, bytes: u64) -> Result<u64, u64> {
    let mut ranges = [(0u64, 0u64); MAX_MEMMAP];
    let mut n = 0;
    for e in entries.iter().filter(|e| e.typ == 1 && e.size != 0) {
        ranges[n] = (e.addr, e.addr.saturating_add(e.size));
        n += 1;
    }
    let ranges = &mut ranges[..n];
    ranges.sort_unstable();
    let mut largest = 0;
    let mut i = 0;
    while i < ranges.len() {
        let (start, mut end) = ranges[i];
        i += 1;
        while i < ranges.len() && ranges[i].0 <= end {
            end = end.max(ranges[i].1);
            i += 1;
        }
        let base = start.max(WSS_MIN_START).next_multiple_of(WSS_ALIGN);
        let end = end.min(limit);
        if base >= end {
            continue;
        }
        if end - base >= bytes {
            return Ok(base);
        }
        largest = largest.max(end - base);
    }
    Err(largest)
}
