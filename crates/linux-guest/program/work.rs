//! The workload of each CPU: dispatch, the dirty writer, the memory verifier and the pacing
//! they share (the test guest's algorithms, in wall-clock time instead of TSC ticks).

use crate::boot::{Guest, PAGE_SIZE};
use crate::cmdline::Workload;
use crate::hb::Cpu;
use crate::out::line;
use crate::verify_logic::{Found, Pages, Verifier, PAGE_WORDS};
use crate::{disk, net};
use std::arch::asm;
use std::time::{Duration, Instant};

/// At most this many `verify CORRUPT` lines per sweep and CPU (all are counted).
const MAX_CORRUPT_LINES_PER_SWEEP: u64 = 16;

/// Runs CPU `k`'s workload forever.
pub fn run(mut c: Cpu) -> ! {
    let g = c.g;
    let (start, end) = partition(g, c.k);
    match g.cfg.workload {
        Workload::DiskLog if c.k == 0 => disk::run(&mut c),
        Workload::NetEcho if c.k == 0 => net::run(&mut c),
        Workload::DiskLog | Workload::NetEcho if start != end => dirty(&mut c, start, end),
        Workload::Idle | Workload::DiskLog | Workload::NetEcho => c.idle(),
        _ if start == end => c.idle(),
        Workload::Dirty => dirty(&mut c, start, end),
        Workload::Verify => verify(&mut c, start, end),
    }
}

/// Pages `[k*P/N, (k+1)*P/N)` of the working set belong to CPU k (CPUs 1.. share the
/// `ferry.load_mib` set when CPU 0 drives a device).
pub fn partition(g: &Guest, cpu: usize) -> (u64, u64) {
    let k = if g.cfg.workload.drives_device() {
        if cpu == 0 || g.wss_pages == 0 {
            return (0, 0);
        }
        cpu as u64 - 1
    } else {
        cpu as u64
    };
    (
        k * g.wss_pages / g.wss_cpus,
        (k + 1) * g.wss_pages / g.wss_cpus,
    )
}

/// Pages per batch between time checks: 64 when unlimited, ~10 ms worth (1..=256) when paced.
fn batch_pages(g: &Guest) -> u64 {
    if g.cfg.rate_mibs == 0 {
        64
    } else {
        (g.cfg.rate_mibs * 256 / g.wss_cpus / 100).clamp(1, 256)
    }
}

/// Rate limit: `ferry.rate_mibs` over all CPUs, split evenly; 4 KiB counted per page write.
struct Pace {
    base: Instant,
    base_count: u64,
    count: u64,
}

impl Pace {
    fn new() -> Pace {
        Pace {
            base: Instant::now(),
            base_count: 0,
            count: 0,
        }
    }

    /// When write number `self.count` is due (None = unlimited). A backlog older than 50 ms
    /// is forgiven (no catch-up burst after a pause).
    fn due(&mut self, g: &Guest, now: Instant) -> Option<Instant> {
        if g.cfg.rate_mibs == 0 {
            return None;
        }
        let n = u128::from(self.count - self.base_count);
        let ns = n * 1_000_000_000 * u128::from(g.wss_cpus) / (u128::from(g.cfg.rate_mibs) * 256);
        let due = self.base + Duration::from_nanos(ns as u64);
        if now > due && now - due > Duration::from_millis(50) {
            self.base = now;
            self.base_count = self.count;
            return Some(now);
        }
        Some(due)
    }
}

/// Address of page `index` of the working set.
fn page_ptr(g: &Guest, index: u64) -> *mut [u64; PAGE_WORDS] {
    (g.wss_base + (index * PAGE_SIZE) as usize) as *mut [u64; PAGE_WORDS]
}

/// `ferry.workload=dirty` (and the `ferry.load_mib` load): one u64 (= round number) at offset
/// 0 of every page of the partition, in order, round after round.
fn dirty(c: &mut Cpu, start: u64, end: u64) -> ! {
    let g = c.g;
    let mut pos = start;
    let mut round = 1u64;
    let mut pace = Pace::new();
    let batch = batch_pages(g);
    loop {
        let now = Instant::now();
        c.heartbeat_if_due();
        if now >= c.next_report {
            line!(
                "dirty cpu={} rounds={} mib={}",
                c.k,
                round - 1,
                pace.count / 256
            );
            c.next_report = Instant::now() + Duration::from_secs(1);
        }
        if g.cfg.rounds != 0 && round > g.cfg.rounds {
            c.wait_until(c.next_hb().min(c.next_report));
            continue;
        }
        if let Some(due) = pace.due(g, now) {
            if due > now {
                c.wait_until(due.min(c.next_hb()));
                continue;
            }
        }
        for i in 0..batch {
            if i % 16 == 15 {
                c.heartbeat_if_due();
            }
            // SAFETY: the page is inside this CPU's partition of the working set (mapped for
            // the life of the process, written by this thread only).
            unsafe { page_ptr(g, pos).cast::<u64>().write_volatile(round) };
            pace.count += 1;
            pos += 1;
            if pos == end {
                pos = start;
                round += 1;
                if g.cfg.rounds != 0 && round > g.cfg.rounds {
                    break;
                }
            }
        }
    }
}

/// The working set as the verifier sees it.
struct Wss<'a>(&'a Guest);

impl Pages for Wss<'_> {
    #[inline(always)]
    fn page(&mut self, index: u64) -> &mut [u64; PAGE_WORDS] {
        // Compiler barrier: page contents must really be re-read from memory (something outside
        // may have changed them: a migration, or a test's process_vm_writev), never forwarded
        // from earlier stores.
        // SAFETY: empty asm; it only acts as a memory clobber.
        unsafe { asm!("", options(nostack, preserves_flags)) };
        // SAFETY: the page is inside this CPU's partition (mapped for the life of the process,
        // used by this thread only) and only one page reference is alive at a time.
        unsafe { &mut *page_ptr(self.0, index) }
    }
}

/// `ferry.workload=verify`: the test guest's verifier (`verify_logic.rs`) on this CPU's
/// partition, with the same output lines.
fn verify(c: &mut Cpu, start: u64, end: u64) -> ! {
    let g = c.g;
    let mut wss = Wss(g);
    let mut p = start;
    while p < end {
        let stop = (p + 64).min(end);
        while p < stop {
            Verifier::init_page(&mut wss, p);
            p += 1;
        }
        c.heartbeat_if_due();
    }
    let mut v = Verifier::after_init(start, end);
    let pages = end - start;
    let batch = batch_pages(g);
    let mut pace = Pace::new();
    let (mut sweeps, mut sweep_errors, mut sweep_printed) = (0u64, 0u64, 0u64);
    let mut last_ok: Option<Instant> = None;
    loop {
        let now = Instant::now();
        c.heartbeat_if_due();
        if let Some(due) = pace.due(g, now) {
            if due > now {
                c.wait_until(due.min(c.next_hb()));
                continue;
            }
        }
        for i in 0..batch {
            if i % 16 == 15 {
                c.heartbeat_if_due();
            }
            let mut errors = 0;
            let mut printed = sweep_printed;
            let k = c.k;
            let sweep_done = v.step(&mut wss, |page, expected, found| {
                errors += 1;
                if printed < MAX_CORRUPT_LINES_PER_SWEEP {
                    printed += 1;
                    report_corrupt(k, page, expected, found);
                }
            });
            sweep_printed = printed;
            sweep_errors += errors;
            pace.count += 1;
            if sweep_done {
                sweeps += 1;
                let gen = v.writer.gen;
                if sweep_errors != 0 {
                    line!(
                        "verify bad gen={gen} pages={pages} cpu={} errors={sweep_errors}",
                        c.k
                    );
                } else {
                    let now = Instant::now();
                    if last_ok.is_none_or(|t| now - t >= g.hb) {
                        last_ok = Some(now);
                        line!(
                            "verify ok gen={gen} pages={pages} cpu={} sweeps={sweeps}",
                            c.k
                        );
                    }
                }
                sweep_errors = 0;
                sweep_printed = 0;
            }
        }
    }
}

#[cold]
fn report_corrupt(cpu: usize, page: u64, expected: u64, found: Found) {
    line!(
        "verify CORRUPT page={page} cpu={cpu} expected_gen={expected} found_gen={} found_index={} checksum={}",
        found.gen,
        found.index,
        if found.checksum_ok { "ok" } else { "bad" }
    );
}
