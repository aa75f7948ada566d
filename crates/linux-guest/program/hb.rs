//! Heartbeats (`hb <cpu> <counter> <tsc>`), the pause report, and waiting.

use crate::boot::Guest;
use crate::out::line;
use crate::sys::rdtsc;
use std::time::{Duration, Instant};

/// Waits shorter than this spin instead of sleeping (as the test guest does below 300 us).
const SPIN: Duration = Duration::from_micros(300);

/// One CPU's heartbeat state and its view of the guest.
pub struct Cpu {
    /// CPU index 0..N-1 (the k-th CPU of the affinity mask).
    pub k: usize,
    pub g: &'static Guest,
    counter: u64,
    next: Instant,
    last: Option<(Instant, u64)>,
    /// Next once-a-second report (dirty, net).
    pub next_report: Instant,
}

impl Cpu {
    pub fn new(k: usize, g: &'static Guest) -> Cpu {
        let now = Instant::now();
        Cpu {
            k,
            g,
            counter: 1,
            next: now,
            last: None,
            next_report: now + Duration::from_secs(1),
        }
    }

    /// When the next heartbeat is due.
    pub fn next_hb(&self) -> Instant {
        self.next
    }

    /// Prints the heartbeat if it is due; after a gap of more than two periods also
    /// `pause cpu=<k> ms=<gap, CLOCK_MONOTONIC> tsc_ms=<gap, TSC> hb=<counter>`. CPU 0 also
    /// carries out `ferry.reset_after_ms`.
    pub fn heartbeat_if_due(&mut self) {
        let now = Instant::now();
        if self.k == 0 {
            if let Some(at) = self.g.reset_at {
                if now >= at {
                    crate::boot::reset(self.g);
                }
            }
        }
        if now < self.next {
            return;
        }
        let tsc = rdtsc();
        line!("hb {} {} {}", self.k, self.counter, tsc);
        if let Some((t, t_tsc)) = self.last {
            let gap = now - t;
            if gap > 2 * self.g.hb {
                line!(
                    "pause cpu={} ms={} tsc_ms={} hb={}",
                    self.k,
                    gap.as_millis(),
                    tsc.wrapping_sub(t_tsc) / self.g.tsc_khz,
                    self.counter
                );
            }
        }
        self.last = Some((now, tsc));
        self.counter += 1;
        self.next += self.g.hb;
        if self.next <= now {
            // after a stall the cadence restarts (no burst of lines)
            self.next = now + self.g.hb;
        }
    }

    /// Waits until `deadline`: spins below 300 us, sleeps otherwise.
    pub fn wait_until(&self, deadline: Instant) {
        let now = Instant::now();
        if deadline <= now {
            return;
        }
        if deadline - now < SPIN {
            while Instant::now() < deadline {
                std::hint::spin_loop();
            }
        } else {
            std::thread::sleep(deadline - now);
        }
    }

    /// Heartbeats only, forever.
    pub fn idle(&mut self) -> ! {
        loop {
            self.heartbeat_if_due();
            self.wait_until(self.next);
        }
    }
}

/// TSC ticks per millisecond, measured against CLOCK_MONOTONIC over ~50 ms.
pub fn measure_tsc_khz() -> u64 {
    let t0 = Instant::now();
    let c0 = rdtsc();
    std::thread::sleep(Duration::from_millis(50));
    let c1 = rdtsc();
    let ns = t0.elapsed().as_nanos() as u64;
    (c1.wrapping_sub(c0) as u128 * 1_000_000 / u128::from(ns.max(1))) as u64
}
