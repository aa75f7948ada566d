//! Auto-converge throttling: keeping the vCPUs out of the guest for part of every period.

use super::run::Target;
use super::Vm;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Length of one auto-converge throttle period.
pub(super) const THROTTLE_PERIOD_US: u64 = 10_000;

impl Vm {
    /// Auto-converge: keeps every vCPU out of the guest for `pct` % of each 10 ms period
    /// (0 turns throttling off, at most 99). A helper thread kicks the vCPUs once per period;
    /// each kicked vCPU sleeps off its share before re-entering the guest.
    pub fn set_throttle(&self, pct: u8) {
        let pct = pct.min(99);
        let old = self.ctl.throttle.swap(pct, Ordering::SeqCst);
        if old == 0 && pct > 0 {
            let ctl = self.ctl.clone();
            let _ = std::thread::Builder::new()
                .name("throttle".into())
                .spawn(move || loop {
                    std::thread::sleep(Duration::from_micros(THROTTLE_PERIOD_US));
                    if ctl.throttle.load(Ordering::SeqCst) == 0 || ctl.lock().target == Target::Exit
                    {
                        return;
                    }
                    ctl.kick_all();
                });
        }
    }

    /// Current auto-converge throttle percentage.
    pub fn throttle(&self) -> u8 {
        self.ctl.throttle.load(Ordering::SeqCst)
    }
}
