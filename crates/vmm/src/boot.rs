//! Boot loaders: PVH ELF (what Ferry's test guest and `qemu -M microvm -kernel` use) and Linux
//! bzImage + initrd (64-bit boot protocol).
//!
//! bzImage boot is implemented for hosts with hardware virtualization (VMX/SVM). It cannot be
//! exercised on this project's PVM-based CI hosts, where guest ring 0 is emulated and a stock
//! Linux kernel dies on emulation failures; only the image parsing and the zero page layout are
//! unit-tested here.

use crate::memory::{GuestMem, MemoryLayout, LOW_RAM_END};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use std::io::Cursor;
use vm_memory::{Address, Bytes, GuestAddress};

/// Where the boot GDT lives.
pub const BOOT_GDT_START: u64 = 0x500;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map (right after the start info).
pub const MEMMAP_START: u64 = 0x7000;
/// Linux zero page (bzImage boot).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Boot page tables for bzImage (PML4, PDPT, PD).
pub const PML4_START: u64 = 0x9000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Kernels load at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the legacy VGA/BIOS hole that is not RAM for the guest.
pub const EBDA_START: u64 = 0xA_0000;
/// Initial stack pointer for 64-bit bzImage entry.
pub const BOOT_STACK: u64 = 0x8ff0;

// The ACPI tables sit in the reserved legacy BIOS area of the e820 map.
const _: () =
    assert!(crate::acpi::ACPI_START >= EBDA_START && crate::acpi::ACPI_END <= HIMEM_START);

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Boot failures.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read kernel {path}: {err}")]
    ReadKernel { path: String, err: std::io::Error },
    #[error(transparent)]
    Confined(#[from] crate::confine::ConfineError),
    #[error("kernel image is neither a PVH ELF nor a bzImage: ELF: {elf}; bzImage: {bz}")]
    UnknownFormat { elf: String, bz: String },
    #[error("ELF kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); Ferry boots ELF kernels only through PVH")]
    NoPvhEntry,
    #[error("cannot load initrd {path}: {err}")]
    Initrd { path: String, err: String },
    #[error("initrd is {size} bytes, too large for {avail} bytes of low memory")]
    InitrdTooLarge { size: u64, avail: u64 },
    #[error("cannot write boot data into guest memory: {0}")]
    Write(String),
    #[error(transparent)]
    Acpi(#[from] crate::acpi::AcpiError),
    #[error("{0}")]
    Platform(String),
}

/// How vCPU 0 must start.
#[derive(Clone, Copy, Debug)]
pub struct BootEntry {
    pub regs: kvm_regs,
    pub sregs_patch: SregsPatch,
}

/// The boot protocol decides the initial segment/control register setup.
#[derive(Clone, Copy, Debug)]
pub enum SregsPatch {
    /// 32-bit protected mode, paging off (PVH).
    Protected32,
    /// 64-bit long mode with the boot page tables at [`PML4_START`] (bzImage).
    Long64,
}

fn e820_map(layout: &MemoryLayout) -> Vec<(u64, u64, u32)> {
    let mut map = Vec::new();
    for r in &layout.regions {
        if r.gpa == 0 {
            // Low RAM: [0, 640K) RAM, [640K, 1M) reserved (legacy), [1M, end) RAM.
            map.push((0, EBDA_START.min(r.size), E820_RAM));
            if r.size > HIMEM_START {
                map.push((EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED));
                map.push((HIMEM_START, r.size - HIMEM_START, E820_RAM));
            }
        } else {
            map.push((r.gpa, r.size, E820_RAM));
        }
    }
    map
}

fn write_cmdline(mem: &GuestMem, cmdline: &str) -> Result<(), BootError> {
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|e| BootError::Write(format!("cmdline: {e}")))
}

fn write_boot_gdt(mem: &GuestMem) -> Result<(), BootError> {
    // null, 0x08 code64, 0x10 code32 (flat), 0x18 data (flat), 0x20 TSS placeholder
    let gdt: [u64; 5] = [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x0000_8b00_0000_0067,
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|e| BootError::Write(format!("gdt: {e}")))?;
    }
    Ok(())
}

fn seg(selector: u16, type_: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Applies the boot protocol's segment and control register state to `sregs`.
pub fn patch_sregs(sregs: &mut kvm_sregs, patch: SregsPatch) {
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = 5 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    let tss = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: 0x20,
        type_: 11,
        present: 1,
        s: 0,
        g: 0,
        ..Default::default()
    };
    sregs.tr = tss;
    match patch {
        SregsPatch::Protected32 => {
            sregs.cs = seg(0x10, 0xb, 0, 1);
            let data = seg(0x18, 0x3, 0, 1);
            sregs.ds = data;
            sregs.es = data;
            sregs.fs = data;
            sregs.gs = data;
            sregs.ss = data;
            sregs.cr0 = 0x11; // PE | ET
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        SregsPatch::Long64 => {
            sregs.cs = seg(0x08, 0xb, 1, 0);
            let data = seg(0x18, 0x3, 0, 1);
            sregs.ds = data;
            sregs.es = data;
            sregs.fs = data;
            sregs.gs = data;
            sregs.ss = data;
            sregs.cr3 = PML4_START;
            sregs.cr4 = 0x20; // PAE
            sregs.cr0 = 0x8000_0011; // PG | ET | PE
            sregs.efer = 0x500; // LME | LMA
        }
    }
}

/// Loads `image` (PVH ELF or bzImage) and writes everything the boot protocol needs.
pub fn load(
    mem: &GuestMem,
    layout: &MemoryLayout,
    image: &[u8],
    cmdline: &str,
    initrd: Option<&[u8]>,
    rsdp: Option<u64>,
) -> Result<BootEntry, BootError> {
    write_boot_gdt(mem)?;
    write_cmdline(mem, cmdline)?;
    match Elf::load(
        mem,
        None,
        &mut Cursor::new(image),
        Some(GuestAddress(HIMEM_START)),
    ) {
        Ok(res) => {
            let entry = match res.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => a,
                _ => return Err(BootError::NoPvhEntry),
            };
            setup_pvh(mem, layout, rsdp)?;
            let regs = kvm_regs {
                rip: entry.raw_value(),
                rbx: PVH_INFO_START,
                rflags: 0x2,
                ..Default::default()
            };
            Ok(BootEntry {
                regs,
                sregs_patch: SregsPatch::Protected32,
            })
        }
        Err(elf_err) => {
            let res = BzImage::load(
                mem,
                None,
                &mut Cursor::new(image),
                Some(GuestAddress(HIMEM_START)),
            )
            .map_err(|bz| BootError::UnknownFormat {
                elf: elf_err.to_string(),
                bz: bz.to_string(),
            })?;
            let hdr = res.setup_header.ok_or_else(|| BootError::UnknownFormat {
                elf: elf_err.to_string(),
                bz: "no setup header".into(),
            })?;
            setup_linux(mem, layout, hdr, cmdline, initrd, rsdp)?;
            write_boot_page_tables(mem)?;
            let regs = kvm_regs {
                rip: res.kernel_load.raw_value() + KERNEL_64BIT_ENTRY_OFFSET,
                rsp: BOOT_STACK,
                rbp: BOOT_STACK,
                rsi: ZERO_PAGE_START,
                rflags: 0x2,
                ..Default::default()
            };
            Ok(BootEntry {
                regs,
                sregs_patch: SregsPatch::Long64,
            })
        }
    }
}

fn setup_pvh(mem: &GuestMem, layout: &MemoryLayout, rsdp: Option<u64>) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(layout)
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        rsdp_paddr: rsdp.unwrap_or(0),
        ..Default::default()
    };
    let mut params = BootParams::new::<hvm_start_info>(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections::<hvm_memmap_table_entry>(&memmap, GuestAddress(MEMMAP_START));
    PvhBootConfigurator::write_bootparams::<GuestMem>(&params, mem)
        .map_err(|e| BootError::Write(e.to_string()))
}

fn setup_linux(
    mem: &GuestMem,
    layout: &MemoryLayout,
    hdr: linux_loader::loader::bootparam::setup_header,
    cmdline: &str,
    initrd: Option<&[u8]>,
    rsdp: Option<u64>,
) -> Result<(), BootError> {
    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: rsdp.unwrap_or(0),
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;
    params.hdr.kernel_alignment = 0x0100_0000;
    if let Some(rd) = initrd {
        let low_end = layout.regions[0].size.min(LOW_RAM_END);
        // Place the initrd page-aligned at the top of low RAM, below initrd_addr_max.
        let max = (hdr.initrd_addr_max as u64).min(low_end.saturating_sub(1));
        let size = rd.len() as u64;
        if size + HIMEM_START * 16 > max {
            return Err(BootError::InitrdTooLarge { size, avail: max });
        }
        let addr = (max + 1 - size) & !0xfff;
        mem.write_slice(rd, GuestAddress(addr))
            .map_err(|e| BootError::Write(format!("initrd: {e}")))?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let e820 = e820_map(layout);
    for (i, (addr, size, type_)) in e820.iter().enumerate() {
        params.e820_table[i].addr = *addr;
        params.e820_table[i].size = *size;
        params.e820_table[i].r#type = *type_;
    }
    params.e820_entries = e820.len() as u8;
    let bp = BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START));
    linux_loader::configurator::linux::LinuxBootConfigurator::write_bootparams::<GuestMem>(&bp, mem)
        .map_err(|e| BootError::Write(e.to_string()))
}

/// Identity-maps the first 1 GiB with 2 MiB pages for the 64-bit Linux entry.
fn write_boot_page_tables(mem: &GuestMem) -> Result<(), BootError> {
    let pml4 = PML4_START;
    let pdpt = pml4 + 0x1000;
    let pd = pdpt + 0x1000;
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|e| BootError::Write(format!("page tables: {e}")))
    };
    w(pdpt | 0x3, pml4)?;
    w(pd | 0x3, pdpt)?;
    for i in 0..512u64 {
        w((i << 21) | 0x83, pd + i * 8)?;
    }
    Ok(())
}

/// Reads a kernel (or initrd) file named by a VM's configuration, under this process's
/// storage policy ([`crate::confine`]).
pub fn read_file(path: &std::path::Path, what: crate::confine::Use) -> Result<Vec<u8>, BootError> {
    use std::io::Read;
    let mut f = crate::confine::open(path, false, what)?;
    let mut v = Vec::new();
    f.read_to_end(&mut v).map_err(|err| BootError::ReadKernel {
        path: path.display().to_string(),
        err,
    })?;
    Ok(v)
}

/// The guest-physical end of the loaded data structures, for sanity checks.
pub fn low_memory_needed() -> u64 {
    CMDLINE_START + crate::config::MAX_CMDLINE_LEN as u64 + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;

    #[test]
    fn pvh_boot_of_the_test_guest() {
        let layout = MemoryLayout::for_size(64 << 20);
        let ram = GuestRam::new(layout.clone()).unwrap();
        let e = load(
            ram.memory(),
            &layout,
            guest::ELF,
            "ferry.workload=idle",
            None,
            Some(0xe0000),
        )
        .unwrap();
        assert!(matches!(e.sregs_patch, SregsPatch::Protected32));
        assert_eq!(e.regs.rbx, PVH_INFO_START);
        let info: hvm_start_info = ram.memory().read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.memmap_entries, 3);
        assert_eq!(info.rsdp_paddr, 0xe0000);
        // The ACPI tables' area is reserved in the memory map, not RAM.
        let map: Vec<hvm_memmap_table_entry> = (0..info.memmap_entries as u64)
            .map(|i| {
                ram.memory()
                    .read_obj(GuestAddress(MEMMAP_START + i * 24))
                    .unwrap()
            })
            .collect();
        let holding = map
            .iter()
            .find(|e| e.addr <= crate::acpi::ACPI_START && e.addr + e.size >= crate::acpi::ACPI_END)
            .expect("an entry covers the ACPI tables");
        assert_eq!(holding.type_, E820_RESERVED);
        assert!(!map.iter().any(|e| e.type_ == E820_RAM
            && e.addr < crate::acpi::ACPI_END
            && e.addr + e.size > crate::acpi::ACPI_START));
        let mut cmd = [0u8; 20];
        ram.memory()
            .read_slice(&mut cmd, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&cmd[..19], b"ferry.workload=idle");
        assert_eq!(cmd[19], 0);
    }

    #[test]
    fn garbage_is_refused_with_both_reasons() {
        let layout = MemoryLayout::for_size(64 << 20);
        let ram = GuestRam::new(layout.clone()).unwrap();
        let err = load(ram.memory(), &layout, &[0x42; 8192], "", None, None).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("neither a PVH ELF nor a bzImage"), "{msg}");
    }
}
