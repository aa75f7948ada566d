//! KVM dirty logging is exact: a shadow copy maintained only from the dirty bitmaps equals guest
//! memory once the VM is paused, while a guest dirties memory on every vCPU.

use std::time::Duration;
use vmm::dirty::DirtyLog;
use vmm::memory::PAGE_SIZE;
use vmm::{KernelSource, Vm, VmConfig};

fn copy_pages(vm: &Vm, shadow: &mut [u8], pages: impl Iterator<Item = u64>) {
    for p in pages {
        let src = vm.ram().ptr_at_offset(p * PAGE_SIZE).unwrap();
        let dst = &mut shadow[(p * PAGE_SIZE) as usize..((p + 1) * PAGE_SIZE) as usize];
        // SAFETY: src is a mapped 4 KiB guest page (torn copies are re-sent by the next round).
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), PAGE_SIZE as usize) };
    }
}

fn run(workload: &str, vcpus: u8) {
    run_throttled(workload, vcpus, 0)
}

fn run_throttled(workload: &str, vcpus: u8, throttle: u8) {
    let kvm = vmm::open_kvm().unwrap();
    let cfg = VmConfig {
        vcpus,
        memory_mib: 128,
        kernel: KernelSource::TestGuest,
        initrd: None,
        cmdline: format!("ferry.workload={workload} ferry.wss_mib=32 ferry.hb_ms=10"),
        cpu_profile: "host".into(),
        disks: vec![],
        nics: vec![],
    };
    let log = tempfile::NamedTempFile::new().unwrap();
    let vm = Vm::create(&kvm, cfg, &Default::default(), log.reopen().unwrap()).unwrap();
    vm.start().unwrap();
    vm.set_throttle(throttle);
    std::thread::sleep(Duration::from_millis(300));
    let total = vm.ram().layout().total_pages();
    let mut shadow = vec![0u8; (total * PAGE_SIZE) as usize];
    let dl = DirtyLog::start(vm.vm_fd(), vm.ram()).unwrap();
    let first = dl.collect().unwrap();
    assert_eq!(
        first.count(),
        total,
        "INITIALLY_SET: the first round reports every page"
    );
    copy_pages(&vm, &mut shadow, 0..total);
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(30));
        let b = dl.collect().unwrap();
        assert!(b.count() > 0, "the guest dirtied nothing?");
        let pages: Vec<u64> = b.runs().into_iter().flat_map(|(f, c)| f..f + c).collect();
        copy_pages(&vm, &mut shadow, pages.into_iter());
    }
    vm.pause().unwrap();
    let b = dl.collect().unwrap();
    let pages: Vec<u64> = b.runs().into_iter().flat_map(|(f, c)| f..f + c).collect();
    copy_pages(&vm, &mut shadow, pages.into_iter());
    let mut bad = Vec::new();
    for p in 0..total {
        let src = vm.ram().ptr_at_offset(p * PAGE_SIZE).unwrap();
        // SAFETY: paused VM, mapped page.
        let real = unsafe { std::slice::from_raw_parts(src, PAGE_SIZE as usize) };
        if real != &shadow[(p * PAGE_SIZE) as usize..((p + 1) * PAGE_SIZE) as usize] {
            bad.push(p);
        }
    }
    vm.stop();
    assert!(
        bad.is_empty(),
        "{workload}/{vcpus} vCPUs: {} pages changed without a dirty bit, first: {:?}",
        bad.len(),
        &bad[..bad.len().min(10)]
    );
}

#[test]
fn dirty_log_is_exact_1_vcpu() {
    run("dirty", 1);
    run("verify", 1);
}

#[test]
fn dirty_log_is_exact_2_vcpus() {
    run("dirty", 2);
    run("verify", 2);
}

#[test]
fn dirty_log_is_exact_while_throttled() {
    run_throttled("verify", 2, 50);
}
