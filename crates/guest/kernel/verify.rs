//! `ferry.workload=verify`: every CPU rewrites and checks its partition of the working set
//! (page logic in `verify_logic.rs`) and reports what it finds.

use crate::heartbeat::heartbeat_if_due;
use crate::line::Line;
use crate::rt::{rdtsc, wait_until};
use crate::state::{PerCpu, Shared};
use crate::verify_logic::{Found, Pages, Verifier, PAGE_WORDS};
use crate::workload::{batch_pages, pace_due, page_ptr};
use core::arch::asm;

pub(crate) const MAX_CORRUPT_LINES_PER_SWEEP: u64 = 16;

pub(crate) struct Wss<'a>(&'a Shared);

impl Pages for Wss<'_> {
    #[inline(always)]
    fn page(&mut self, index: u64) -> &mut [u64; PAGE_WORDS] {
        // Compiler barrier: page contents must really be re-read from memory (the host may have
        // replaced them, e.g. a migration), never forwarded from earlier stores.
        // SAFETY: empty asm.
        unsafe { asm!("", options(nostack, preserves_flags)) };
        // SAFETY: the page is inside this CPU's partition (RAM, identity mapped, used by no one
        // else) and only one page reference is alive at a time.
        unsafe { &mut *page_ptr(self.0, index) }
    }
}

pub(crate) fn verify(cpu: usize, st: &mut PerCpu, sh: &Shared, start: u64, end: u64) -> ! {
    let mut wss = Wss(sh);
    st.verify_init_pos = start;
    while st.verify_init_pos < end {
        let stop = (st.verify_init_pos + 64).min(end);
        while st.verify_init_pos < stop {
            Verifier::init_page(&mut wss, st.verify_init_pos);
            st.verify_init_pos += 1;
        }
        heartbeat_if_due(cpu, st, sh, rdtsc());
    }
    st.verify = Verifier::after_init(start, end);
    let pages = end - start;
    let batch = batch_pages(sh);
    let now = rdtsc();
    st.pace_base_tsc = now;
    st.pace_base_count = st.pace_count;
    loop {
        let now = rdtsc();
        heartbeat_if_due(cpu, st, sh, now);
        if let Some(due) = pace_due(st, sh, now) {
            if due > now {
                wait_until(sh, due.min(st.next_hb));
                continue;
            }
        }
        for i in 0..batch {
            if i % 16 == 15 {
                // Heartbeats stay on time within a batch too (the gap a migration leaves in
                // them should measure the pause, not the batch length).
                heartbeat_if_due(cpu, st, sh, rdtsc());
            }
            let mut errors = 0;
            let mut printed = st.verify_sweep_printed;
            let sweep_done = st.verify.step(&mut wss, |page, expected, found| {
                errors += 1;
                if printed < MAX_CORRUPT_LINES_PER_SWEEP {
                    printed += 1;
                    report_corrupt(cpu, page, expected, found);
                }
            });
            st.verify_sweep_printed = printed;
            st.verify_sweep_errors += errors;
            st.pace_count += 1;
            if sweep_done {
                st.verify_sweeps += 1;
                let gen = st.verify.writer.gen;
                if st.verify_sweep_errors != 0 {
                    Line::new()
                        .str("verify bad gen=")
                        .dec(gen)
                        .str(" pages=")
                        .dec(pages)
                        .str(" cpu=")
                        .dec(cpu as u64)
                        .str(" errors=")
                        .dec(st.verify_sweep_errors)
                        .send();
                } else {
                    let now = rdtsc();
                    if st.verify_last_ok == 0 || now.wrapping_sub(st.verify_last_ok) >= sh.hb_ticks
                    {
                        st.verify_last_ok = now;
                        Line::new()
                            .str("verify ok gen=")
                            .dec(gen)
                            .str(" pages=")
                            .dec(pages)
                            .str(" cpu=")
                            .dec(cpu as u64)
                            .str(" sweeps=")
                            .dec(st.verify_sweeps)
                            .send();
                    }
                }
                st.verify_sweep_errors = 0;
                st.verify_sweep_printed = 0;
            }
        }
    }
}

#[cold]
pub(crate) fn report_corrupt(cpu: usize, page: u64, expected: u64, found: Found) {
    Line::new()
        .str("verify CORRUPT page=")
        .dec(page)
        .str(" cpu=")
        .dec(cpu as u64)
        .str(" expected_gen=")
        .dec(expected)
        .str(" found_gen=")
        .dec(found.gen)
        .str(" found_index=")
        .dec(found.index)
        .str(" checksum=")
        .str(if found.checksum_ok { "ok" } else { "bad" })
        .send();
}
