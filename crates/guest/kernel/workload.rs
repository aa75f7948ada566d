//! The workload of each CPU: dispatch, idle, and the pacing dirty and verify share.

use crate::cmdline::Workload;
use crate::dirty::dirty;
use crate::heartbeat::heartbeat_if_due;
use crate::rt::{rdtsc, wait_until};
use crate::state::{percpu, shared, PerCpu, Shared};
use crate::verify::verify;
use crate::verify_logic::PAGE_WORDS;
use crate::{disk, net, PAGE_SIZE};

pub(crate) fn run(cpu: usize) -> ! {
    let sh = shared();
    let st = percpu(cpu);
    let now = rdtsc();
    st.hb_counter = 1;
    st.next_hb = now;
    st.next_report = now + sh.sec_ticks;
    st.pace_base_tsc = now;
    st.pace_base_count = 0;
    st.pace_count = 0;
    let (start, end) = partition(sh, cpu);
    match sh.workload {
        Workload::DiskLog if cpu == 0 => disk::run(cpu, st, sh),
        Workload::NetEcho if cpu == 0 => net::run(cpu, st, sh),
        // `ferry.load_mib`: the other CPUs load the VM with writes while CPU 0 serves.
        Workload::DiskLog | Workload::NetEcho if start != end => dirty(cpu, st, sh, start, end),
        Workload::Idle | Workload::DiskLog | Workload::NetEcho => idle(cpu, st, sh),
        _ if start == end => idle(cpu, st, sh),
        Workload::Dirty => dirty(cpu, st, sh, start, end),
        Workload::Verify => verify(cpu, st, sh, start, end),
    }
}

/// Pages `[k*P/N, (k+1)*P/N)` of the working set belong to CPU k.
pub(crate) fn partition(sh: &Shared, cpu: usize) -> (u64, u64) {
    let k = if sh.workload.drives_device() {
        // CPU 0 serves the device; CPUs 1.. share the `ferry.load_mib` working set.
        if cpu == 0 || sh.wss_pages == 0 {
            return (0, 0);
        }
        cpu as u64 - 1
    } else {
        cpu as u64
    };
    (
        k * sh.wss_pages / sh.wss_cpus,
        (k + 1) * sh.wss_pages / sh.wss_cpus,
    )
}

pub(crate) fn idle(cpu: usize, st: &mut PerCpu, sh: &Shared) -> ! {
    loop {
        heartbeat_if_due(cpu, st, sh, rdtsc());
        wait_until(sh, st.next_hb);
    }
}

/// Rate limit: the TSC at which write number `st.pace_count` is due (None = unlimited).
pub(crate) fn pace_due(st: &mut PerCpu, sh: &Shared, now: u64) -> Option<u64> {
    if sh.rate_mibs == 0 {
        return None;
    }
    // ticks per page = tsc_hz * N / (R * 256)
    let num = u128::from(sh.tsc_khz) * 1000 * u128::from(sh.wss_cpus);
    let den = u128::from(sh.rate_mibs) * 256;
    let n = u128::from(st.pace_count - st.pace_base_count);
    let due = st.pace_base_tsc + (n * num / den) as u64;
    if (now > due && now - due > sh.sec_ticks / 20) || due > now.saturating_add(sh.sec_ticks) {
        // more than 50 ms behind (stall, pause, migration): do not burst to catch up; or the
        // TSC went backwards
        st.pace_base_tsc = now;
        st.pace_base_count = st.pace_count;
        return Some(now);
    }
    Some(due)
}

/// Pages per batch between time checks: 64 when unlimited; ~10 ms worth (1..=256) when rate
/// limited, so a paced CPU sleeps ~100 times per second (each sleep costs an int3 round trip and
/// a timer interrupt, i.e. emulated ring-0 work) instead of after every page.
pub(crate) fn batch_pages(sh: &Shared) -> u64 {
    if sh.rate_mibs == 0 {
        64
    } else {
        (sh.rate_mibs * 256 / sh.wss_cpus / 100).clamp(1, 256)
    }
}

pub(crate) fn page_ptr(sh: &Shared, index: u64) -> *mut [u64; PAGE_WORDS] {
    (sh.wss_base + index * PAGE_SIZE) as *mut [u64; PAGE_WORDS]
}
