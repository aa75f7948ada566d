//! Heartbeats: `hb <cpu> <counter> <tsc>` every `hb_ms` on every CPU (and CPU 0's timed reset).

use crate::line::Line;
use crate::rt::{rdtsc, sys_reset};
use crate::state::{PerCpu, Shared};

pub(crate) fn heartbeat_if_due(cpu: usize, st: &mut PerCpu, sh: &Shared, now: u64) {
    if cpu == 0 && sh.reset_at != 0 && now >= sh.reset_at {
        Line::new().str("reset requested").send();
        sys_reset();
    }
    if st.next_hb > now.saturating_add(2 * sh.hb_ticks) {
        st.next_hb = now; // the TSC went backwards (e.g. restored on another host)
    }
    if now < st.next_hb {
        return;
    }
    let tsc = rdtsc();
    Line::new()
        .str("hb ")
        .dec(cpu as u64)
        .str(" ")
        .dec(st.hb_counter)
        .str(" ")
        .dec(tsc)
        .send();
    st.hb_counter += 1;
    st.next_hb += sh.hb_ticks;
    if st.next_hb <= tsc {
        st.next_hb = tsc + sh.hb_ticks;
    }
}
