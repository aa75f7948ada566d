//! Kicking vCPU threads out of `KVM_RUN`: a real-time signal whose handler sets
//! `immediate_exit` in the `kvm_run` of the thread it interrupts.

use kvm_bindings::kvm_run;
use std::cell::Cell;
use std::sync::Once;

thread_local! {
    /// The `kvm_run` of the vCPU this thread holds (null when it holds none).
    pub(super) static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN_PTR.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer is set by this thread to its own vCPU's kvm_run mapping while
            // it holds the vCPU, and cleared before the vCPU is released; a volatile byte store
            // is async-signal-safe.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

pub(super) fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
            .expect("cannot install the vCPU kick signal handler");
    });
}
