//! Valid values to start from: a VM configuration, CPUID, and a whole `MachineState` as a
//! paused VM of that configuration would save it (built by hand, without KVM: every field a
//! decoder reads is there, with plausible values).

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use vmm::config::{DiskConfig, KernelSource, MacAddr, NicConfig, VmConfig};
use vmm::cpuid::{CpuidEntry, CpuidTable};
use vmm::devices::rtc::RtcState;
use vmm::devices::serial::SerialState;
use vmm::devices::virtio::block::BlockState;
use vmm::devices::virtio::net::NetState;
use vmm::devices::virtio::{DeviceSnap, QueueSnap, VirtioState};
use vmm::devices::DevicesState;
use vmm::memory::MemoryLayout;
use vmm::vcpu::{FpuState, VcpuState};
use vmm::vm::{MachineState, PlatformState};

/// MAC of NIC `i` in the seeds and the device harness.
pub fn mac(i: usize) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0x12, 0x34, 0x56 + i as u8]
}

/// A 32 MiB VM with `vcpus` vCPUs, `disks` disks and `nics` NICs.
pub fn config(vcpus: u8, disks: usize, nics: usize) -> VmConfig {
    VmConfig {
        vcpus,
        memory_mib: 32,
        kernel: KernelSource::TestGuest,
        initrd: None,
        cmdline: "console=ttyS0 ferry.workload=dirty".into(),
        cpu_profile: "baseline".into(),
        disks: (0..disks)
            .map(|i| DiskConfig {
                path: format!("/srv/ferry/disk{i}.img").into(),
                read_only: i % 2 == 1,
            })
            .collect(),
        nics: (0..nics)
            .map(|i| NicConfig {
                mac: MacAddr(mac(i)),
            })
            .collect(),
    }
}

fn leaf(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> CpuidEntry {
    CpuidEntry {
        function,
        index,
        flags: 0,
        eax,
        ebx,
        ecx,
        edx,
    }
}

/// A small Intel CPUID table with KVM's leaves and the timing leaf.
pub fn cpuid() -> CpuidTable {
    CpuidTable {
        entries: vec![
            leaf(0, 0, 0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            leaf(1, 0, 0x0005_06e3, 0x0000_0800, 0xf7fa_3223, 0x0f8b_fbff),
            CpuidEntry {
                flags: kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..leaf(7, 0, 0, 0x029c_67af, 0, 0)
            },
            leaf(0x4000_0000, 0, 0x4000_0010, 0x4b4d_564b, 0x564b_4d56, 0x4d),
            leaf(0x4000_0010, 0, 2_000_000, 1_000_000, 0, 0),
            leaf(0x8000_0000, 0, 0x8000_0008, 0, 0, 0),
            leaf(0x8000_0007, 0, 0, 0, 0, 1 << 8),
        ],
    }
}

fn vcpu(id: u8, nr: u8) -> VcpuState {
    let mut regs = kvm_regs {
        rip: 0x10_0000,
        rsp: 0x8_0000,
        rflags: 2,
        ..Default::default()
    };
    regs.rsi = 0x7000;
    let mut sregs = kvm_sregs {
        cr0: 0x8000_0011,
        cr3: 0x9000,
        cr4: 0x20,
        efer: 0x500,
        ..Default::default()
    };
    sregs.cs.selector = 0x8;
    sregs.cs.l = 1;
    sregs.cs.present = 1;
    let mut lapic = kvm_lapic_state::default();
    lapic.regs[0x20 + 3] = id as _; // APIC ID
    lapic.regs[0xf0] = -1; // spurious vector 0xff, enabled
    lapic.regs[0xf1] = 0x01;
    VcpuState {
        id,
        cpuid: vmm::cpuid::for_vcpu(&cpuid(), id, nr),
        mp_state: kvm_mp_state { mp_state: 0 },
        regs,
        sregs,
        fpu: FpuState {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        },
        xsave: (0..1024u32)
            .map(|i| if i == 6 { 0x1f80 } else { 0 })
            .collect(),
        xcrs: kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        },
        debugregs: kvm_debugregs {
            dr6: 0xffff_0ff0,
            dr7: 0x400,
            ..Default::default()
        },
        lapic,
        msrs: vec![
            (0x10, 123_456_789),
            (0x1b, 0xfee0_0900),
            (0xc000_0080, 0x500),
        ],
        events: kvm_vcpu_events::default(),
        tsc_khz: Some(2_000_000),
    }
}

fn platform() -> PlatformState {
    let chip = |id| kvm_irqchip {
        chip_id: id,
        ..Default::default()
    };
    PlatformState {
        pic_master: chip(KVM_IRQCHIP_PIC_MASTER),
        pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE),
        ioapic: chip(KVM_IRQCHIP_IOAPIC),
        pit: kvm_pit_state2::default(),
        clock: kvm_clock_data {
            clock: 5_000_000_000,
            flags: KVM_CLOCK_REALTIME,
            realtime: 1_700_000_000_000_000_000,
            ..Default::default()
        },
    }
}

/// A queue a driver set up (ready, rings in the first MiB).
pub fn queue(q: u64, next: u16) -> QueueSnap {
    QueueSnap {
        max_size: 256,
        size: 16,
        ready: true,
        next_avail: next,
        next_used: next,
        event_idx: false,
        desc_table: 0x10000 + q * 0x4000,
        avail_ring: 0x11000 + q * 0x4000,
        used_ring: 0x12000 + q * 0x4000,
    }
}

/// The saved state of a virtio-blk disk of `sectors` sectors after some requests.
pub fn block_state(sectors: u64, read_only: bool) -> VirtioState {
    VirtioState {
        device_features_sel: 0,
        driver_features_sel: 1,
        driver_features: 1 << 32 | 1 << 9 | if read_only { 1 << 5 } else { 0 },
        status: 0xf,
        queue_sel: 0,
        interrupt_status: 1,
        config_generation: 0,
        queues: vec![queue(0, 3)],
        device: DeviceSnap::Block(BlockState {
            capacity_sectors: sectors,
            read_only,
        }),
    }
}

/// The saved state of NIC `i`, with `backlog` received frames waiting.
pub fn net_state(i: usize, backlog: usize) -> VirtioState {
    VirtioState {
        device_features_sel: 1,
        driver_features_sel: 1,
        driver_features: 1 << 32 | 1 << 5 | 1 << 16,
        status: 0xf,
        queue_sel: 1,
        interrupt_status: 0,
        config_generation: 0,
        queues: vec![queue(0, 7), queue(1, 2)],
        device: DeviceSnap::Net(NetState {
            mac: mac(i),
            rx_backlog: (0..backlog)
                .map(|k| {
                    let mut f = vec![0u8; 12];
                    f.extend_from_slice(&[0xff; 6]);
                    f.extend_from_slice(&mac(9));
                    f.extend_from_slice(&[0x08, 0x06]);
                    f.extend(std::iter::repeat_n(k as u8, 28));
                    f
                })
                .collect(),
        }),
    }
}

/// A serial port a guest has programmed (8N1, 115200, FIFO on, a byte of input waiting).
pub fn serial_state() -> SerialState {
    SerialState {
        baud_divisor_low: 1,
        baud_divisor_high: 0,
        interrupt_enable: 1,
        interrupt_identification: 0xc1,
        line_control: 3,
        line_status: 0x61,
        modem_control: 0x0b,
        modem_status: 0xb0,
        scratch: 0x5a,
        in_buffer: b"x".to_vec(),
    }
}

/// An RTC a guest has used (selected a register, keeps a clock offset, wrote CMOS RAM).
pub fn used_rtc() -> RtcState {
    let mut r = RtcState::default();
    r.index = 0x0b;
    r.cmos[0x10] = 0x42;
    r.offset_secs = -3600;
    r
}

/// A whole machine state; `rich` adds what only version 4 (RTC) and 3 (NIC backlog) hold.
pub fn machine_state(vcpus: u8, disks: usize, nics: usize, rich: bool) -> MachineState {
    let mut virtio = Vec::new();
    for i in 0..disks {
        virtio.push(block_state(2048, i % 2 == 1));
    }
    for i in 0..nics {
        virtio.push(net_state(i, if rich { 2 } else { 0 }));
    }
    MachineState {
        config: config(vcpus, disks, nics),
        layout: MemoryLayout::for_size(32 << 20),
        cpuid: cpuid(),
        msr_list: vec![0x10, 0x1b, 0xc000_0080],
        platform: platform(),
        vcpus: (0..vcpus).map(|i| vcpu(i, vcpus)).collect(),
        devices: DevicesState {
            serial: serial_state(),
            virtio,
            rtc: if rich {
                used_rtc()
            } else {
                RtcState::default()
            },
        },
    }
}
