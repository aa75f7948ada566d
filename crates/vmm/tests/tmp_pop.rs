use std::sync::Arc;
#[test]
fn pop() {
    let kvm = vmm::open_kvm().unwrap();
    let layout = vmm::memory::MemoryLayout::for_size(1 << 30);
    let src = vec![7u8; 4096];
    for with_vm in [false, true, false, true] {
        let ram = Arc::new(vmm::memory::GuestRam::new(layout.clone()).unwrap());
        let cfg = vmm::VmConfig {
            vcpus: 1,
            memory_mib: 1024,
            kernel: vmm::KernelSource::TestGuest,
            initrd: None,
            cmdline: String::new(),
            cpu_profile: "host".into(),
        };
        let cpuid = vmm::cpuid::build(&vmm::cpuid::supported(&kvm).unwrap(), "host").unwrap();
        let _p = if with_vm {
            Some(vmm::Vm::prepare(&kvm, &cfg, &cpuid, ram.clone()).unwrap())
        } else {
            None
        };
        let t = std::time::Instant::now();
        for p in 0..131072u64 {
            let dst = ram.ptr_at_offset(p * 4096).unwrap();
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, 4096) };
        }
        let d = t.elapsed();
        eprintln!(
            "with_vm={with_vm}: 512 MiB in {:?} = {:.1} us/page",
            d,
            d.as_secs_f64() * 1e6 / 131072.0
        );
    }
}
