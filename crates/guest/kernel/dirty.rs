//! `ferry.workload=dirty` (and the `ferry.load_mib` load of disk-log/net-echo): every CPU
//! rewrites its partition of the working set, page by page, round after round.

use crate::heartbeat::heartbeat_if_due;
use crate::line::Line;
use crate::rt::{rdtsc, wait_until};
use crate::state::{PerCpu, Shared};
use crate::workload::{batch_pages, pace_due, page_ptr};

pub(crate) fn dirty(cpu: usize, st: &mut PerCpu, sh: &Shared, start: u64, end: u64) -> ! {
    st.dirty_pos = start;
    st.dirty_round = 1;
    let batch = batch_pages(sh);
    loop {
        let now = rdtsc();
        heartbeat_if_due(cpu, st, sh, now);
        if now >= st.next_report || st.next_report > now.saturating_add(sh.sec_ticks) {
            Line::new()
                .str("dirty cpu=")
                .dec(cpu as u64)
                .str(" rounds=")
                .dec(st.dirty_round - 1)
                .str(" mib=")
                .dec(st.pace_count / 256)
                .send();
            st.next_report = rdtsc() + sh.sec_ticks;
        }
        if sh.rounds != 0 && st.dirty_round > sh.rounds {
            // Done writing: behave like idle (sleep until the next heartbeat or report).
            wait_until(sh, st.next_hb.min(st.next_report));
            continue;
        }
        if let Some(due) = pace_due(st, sh, now) {
            if due > now {
                wait_until(sh, due.min(st.next_hb));
                continue;
            }
        }
        for i in 0..batch {
            if i % 16 == 15 {
                heartbeat_if_due(cpu, st, sh, rdtsc());
            }
            // SAFETY: the page is inside this CPU's partition of the working set (RAM).
            unsafe {
                page_ptr(sh, st.dirty_pos)
                    .cast::<u64>()
                    .write_volatile(st.dirty_round)
            };
            st.pace_count += 1;
            st.dirty_pos += 1;
            if st.dirty_pos == end {
                st.dirty_pos = start;
                st.dirty_round += 1;
                if sh.rounds != 0 && st.dirty_round > sh.rounds {
                    break;
                }
            }
        }
    }
}

