//! The body of a vCPU thread: run the guest, serve its exits, park when told to.

use super::kick::KVM_RUN_PTR;
use super::run::{Control, Target};
use super::throttle::THROTTLE_PERIOD_US;
use super::VmEvent;
use crate::devices::virtio::VirtioDevices;
use crate::devices::{Devices, PioAction};
use crate::vcpu::Vcpu;
use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuExit;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Runs vCPU `vcpu` until the VM exits; parks it whenever the controller pauses the VM.
pub(super) fn vcpu_loop(
    vcpu: Arc<Mutex<Vcpu>>,
    ctl: Arc<Control>,
    devices: Arc<Mutex<Devices>>,
    virtio: Arc<VirtioDevices>,
) {
    loop {
        {
            let mut st = ctl.lock();
            loop {
                match st.target {
                    Target::Run => {
                        st.running += 1;
                        ctl.cv.notify_all();
                        break;
                    }
                    Target::Exit => {
                        st.exited += 1;
                        ctl.cv.notify_all();
                        return;
                    }
                    Target::Pause => st = ctl.cv.wait(st).unwrap_or_else(|e| e.into_inner()),
                }
            }
        }
        let mut v = vcpu.lock().unwrap_or_else(|e| e.into_inner());
        let id = v.id;
        let run_ptr: *mut kvm_run = v.fd.get_kvm_run();
        KVM_RUN_PTR.with(|p| p.set(run_ptr));
        v.fd.set_kvm_immediate_exit(0);
        let mut event = None;
        loop {
            if !ctl.run.load(Ordering::Acquire) {
                // Let KVM finish a pending I/O instruction without running the guest further.
                v.fd.set_kvm_immediate_exit(1);
                let _ = v.fd.run();
                v.fd.set_kvm_immediate_exit(0);
                break;
            }
            match v.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    let act = devices
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .pio_write(port, data);
                    if act == PioAction::Reset {
                        event = Some(VmEvent::Reset);
                        break;
                    }
                }
                Ok(VcpuExit::IoIn(port, data)) => devices
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pio_read(port, data),
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !virtio.mmio_read(addr, data) {
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    virtio.mmio_write(addr, data);
                }
                Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => {}
                Ok(VcpuExit::Shutdown) => {
                    event = Some(VmEvent::TripleFault { vcpu: id });
                    break;
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    event = Some(match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmEvent::Shutdown,
                        kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmEvent::Reset,
                        k => VmEvent::Crashed {
                            vcpu: id,
                            reason: format!("system event {k}"),
                        },
                    });
                    break;
                }
                Ok(VcpuExit::InternalError) => {
                    let run = v.fd.get_kvm_run();
                    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the union
                    // member KVM filled in.
                    let ie = unsafe { run.__bindgen_anon_1.internal };
                    let n = (ie.ndata as usize).min(ie.data.len());
                    let data: Vec<String> =
                        ie.data[..n].iter().map(|d| format!("{d:#x}")).collect();
                    event = Some(VmEvent::Crashed {
                        vcpu: id,
                        reason: format!(
                            "KVM internal error, suberror {} data [{}]",
                            ie.suberror,
                            data.join(" ")
                        ),
                    });
                    break;
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    event = Some(VmEvent::Crashed {
                        vcpu: id,
                        reason: format!(
                            "VM entry failed: hardware reason {reason:#x} on host CPU {cpu}"
                        ),
                    });
                    break;
                }
                Ok(other) => {
                    event = Some(VmEvent::Crashed {
                        vcpu: id,
                        reason: format!("unexpected exit {other:?}"),
                    });
                    break;
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // A kick: re-arm KVM_RUN (the loop head sees a pause request), and serve
                    // auto-converge throttling by sleeping off this vCPU's share.
                    v.fd.set_kvm_immediate_exit(0);
                    let pct = ctl.throttle.load(Ordering::Relaxed) as u64;
                    if pct > 0 && ctl.run.load(Ordering::Acquire) {
                        std::thread::sleep(Duration::from_micros(THROTTLE_PERIOD_US * pct / 100));
                    }
                }
                Err(e) => {
                    event = Some(VmEvent::Crashed {
                        vcpu: id,
                        reason: format!("KVM_RUN failed: {e}"),
                    });
                    break;
                }
            }
        }
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
        drop(v);
        if let Some(ev) = event {
            ctl.guest_event(ev);
        }
        let mut st = ctl.lock();
        st.running -= 1;
        ctl.cv.notify_all();
    }
}
