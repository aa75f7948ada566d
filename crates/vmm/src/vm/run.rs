//! Run control: the state the controller and the vCPU threads share, and starting, pausing,
//! resuming and stopping the vCPU threads.

use super::kick::{install_kick_handler, kick_signal};
use super::vcpu_loop::vcpu_loop;
use super::{Vm, VmError, VmEvent, VmRunState, STORAGE_LOCK_WAIT};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Target {
    Run,
    Pause,
    Exit,
}

pub(super) struct CtlState {
    pub(super) target: Target,
    /// vCPU threads inside their run loop (between seeing `Run` and parking again).
    pub(super) running: usize,
    pub(super) exited: usize,
    pub(super) started: bool,
    pub(super) event: Option<VmEvent>,
}

pub(super) struct Control {
    pub(super) run: AtomicBool,
    /// Auto-converge: percentage of each throttle period the vCPUs are kept out of the guest.
    pub(super) throttle: AtomicU8,
    pub(super) state: Mutex<CtlState>,
    pub(super) cv: Condvar,
    pub(super) threads: Mutex<Vec<libc::pthread_t>>,
}

impl Control {
    pub(super) fn lock(&self) -> MutexGuard<'_, CtlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn kick_all(&self) {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        for &t in threads.iter() {
            // SAFETY: `t` is a live vCPU thread of this process (threads are joined only after
            // they were told to exit and the list is cleared before that).
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// A vCPU thread reports that the VM cannot continue.
    pub(super) fn guest_event(&self, ev: VmEvent) {
        let mut st = self.lock();
        if st.event.is_none() {
            st.event = Some(ev);
        }
        st.target = Target::Exit;
        self.run.store(false, Ordering::SeqCst);
        drop(st);
        self.cv.notify_all();
        self.kick_all();
    }
}

impl Vm {
    /// Starts the vCPU threads; the VM runs. Takes the disk locks first.
    pub fn start(&self) -> Result<(), VmError> {
        // A fresh start waits only briefly: a lock held for longer belongs to a running VM.
        self.virtio.acquire_storage(Duration::from_secs(1))?;
        self.virtio.resume();
        self.note_tsc_lead();
        self.spawn_vcpus(true)
    }

    /// Starts the vCPU threads but keeps them parked: a later [`Vm::resume`] only has to wake
    /// them (a migration destination does this before the switchover).
    pub fn start_paused(&self) -> Result<(), VmError> {
        self.spawn_vcpus(false)
    }

    /// Waits until every vCPU thread is inside its run loop (or `timeout` passes).
    pub fn wait_running(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.ctl.lock();
        while st.running < self.vcpus.len() {
            let now = Instant::now();
            if now >= deadline || st.event.is_some() {
                return false;
            }
            st = self
                .ctl
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    fn spawn_vcpus(&self, run: bool) -> Result<(), VmError> {
        install_kick_handler();
        let mut st = self.ctl.lock();
        if st.started {
            return Ok(());
        }
        st.started = true;
        st.target = if run { Target::Run } else { Target::Pause };
        self.ctl.run.store(run, Ordering::SeqCst);
        drop(st);
        let mut joins = self.joins.lock().unwrap_or_else(|e| e.into_inner());
        let mut threads = self.ctl.threads.lock().unwrap_or_else(|e| e.into_inner());
        for v in &self.vcpus {
            let id = v.lock().unwrap_or_else(|e| e.into_inner()).id;
            let (v, ctl, dev, virtio) = (
                v.clone(),
                self.ctl.clone(),
                self.devices.clone(),
                self.virtio.clone(),
            );
            let h = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    // A vCPU thread that cannot be confined does not run the guest.
                    if let Err(e) = crate::sandbox::enter_vcpu_thread() {
                        eprintln!(
                            "ferry-vmm: vcpu{id}: {e}: {:?}",
                            std::error::Error::source(&e)
                        );
                        std::process::abort();
                    }
                    vcpu_loop(v, ctl, dev, virtio)
                })
                .map_err(VmError::Thread)?;
            use std::os::unix::thread::JoinHandleExt;
            threads.push(h.as_pthread_t() as libc::pthread_t);
            joins.push(h);
        }
        Ok(())
    }

    /// Current run state.
    pub fn run_state(&self) -> VmRunState {
        let st = self.ctl.lock();
        match (st.started, st.target, &st.event) {
            (_, _, Some(_)) | (_, Target::Exit, _) => VmRunState::Stopped,
            (false, _, _) => VmRunState::Created,
            (true, Target::Run, _) => VmRunState::Running,
            (true, Target::Pause, _) => VmRunState::Paused,
        }
    }

    /// vCPU threads currently inside their run loop.
    pub fn running_vcpus(&self) -> usize {
        self.ctl.lock().running
    }

    /// Why the VM stopped, if it did.
    pub fn event(&self) -> Option<VmEvent> {
        self.ctl.lock().event.clone()
    }

    /// Blocks until the VM stops (guest reset/shutdown/crash, or [`Vm::stop`]) or `timeout`.
    pub fn wait_stopped(&self, timeout: Option<Duration>) -> Option<VmEvent> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.ctl.lock();
        loop {
            if let Some(e) = &st.event {
                return Some(e.clone());
            }
            match deadline {
                None => st = self.ctl.cv.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    st = self
                        .ctl
                        .cv
                        .wait_timeout(st, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }

    /// Pauses every vCPU (returns once all are out of KVM_RUN and parked). Idempotent.
    pub fn pause(&self) -> Result<(), VmError> {
        let mut st = self.ctl.lock();
        if let Some(e) = &st.event {
            return Err(VmError::Stopped(e.to_string()));
        }
        if !st.started || st.target == Target::Pause {
            return Ok(());
        }
        st.target = Target::Pause;
        self.ctl.run.store(false, Ordering::SeqCst);
        drop(st);
        self.ctl.kick_all();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut st = self.ctl.lock();
        // A thread that has not entered its run loop yet sees `Pause` and waits; only those
        // inside it must leave.
        while st.running > 0 {
            if let Some(e) = &st.event {
                return Err(VmError::Stopped(e.to_string()));
            }
            if Instant::now() >= deadline {
                return Err(VmError::PauseTimeout(Duration::from_secs(10)));
            }
            let (g, to) = self
                .ctl
                .cv
                .wait_timeout(st, Duration::from_millis(20))
                .unwrap_or_else(|e| e.into_inner());
            st = g;
            if to.timed_out() {
                drop(st);
                self.ctl.kick_all(); // a kick may have landed just before a thread took its vCPU
                st = self.ctl.lock();
            }
        }
        drop(st);
        // No vCPU runs: stop the devices' own threads from touching guest memory too.
        self.virtio.pause();
        // Tell a kvmclock-aware guest it was stopped (avoids soft-lockup reports); harmless if
        // the guest does not use kvmclock (KVM then returns EINVAL, which is ignored).
        for v in &self.vcpus {
            let _ = v.lock().unwrap_or_else(|e| e.into_inner()).mark_stopped();
        }
        Ok(())
    }

    /// Resumes a paused VM. Idempotent.
    pub fn resume(&self) -> Result<(), VmError> {
        let st = self.ctl.lock();
        if let Some(e) = &st.event {
            return Err(VmError::Stopped(e.to_string()));
        }
        if !st.started {
            drop(st);
            return self.start();
        }
        if st.target == Target::Run {
            return Ok(());
        }
        drop(st);
        // Never run without the disks: if their locks cannot be had, stay paused.
        self.virtio.acquire_storage(STORAGE_LOCK_WAIT)?;
        self.virtio.resume();
        self.ctl.lock().target = Target::Run;
        self.ctl.run.store(true, Ordering::SeqCst);
        self.ctl.cv.notify_all();
        Ok(())
    }

    /// Asks the VM to stop for good without waiting (see [`Vm::stop`]).
    pub fn request_stop(&self) {
        self.ctl.guest_event(VmEvent::Stopped);
    }

    /// Like [`Vm::request_stop`], recording why.
    pub fn request_stop_with(&self, ev: VmEvent) {
        self.ctl.guest_event(ev);
    }

    /// Stops the VM for good and joins the vCPU threads.
    pub fn stop(&self) {
        self.request_stop();
        let joins: Vec<_> = self
            .joins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for j in joins {
            let _ = j.join();
        }
        self.ctl
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.flush_serial();
    }
}
