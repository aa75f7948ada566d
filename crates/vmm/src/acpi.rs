//! ACPI tables for Linux guests, built with the rust-vmm `acpi_tables` crate: RSDP, XSDT, FADT
//! (hardware-reduced), MADT (one local APIC per vCPU, the IOAPIC, interrupt source overrides)
//! and a DSDT that describes COM1, the CMOS RTC and every virtio-mmio device (`LNRO0005`: how
//! stock distribution kernels, which lack `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`, find them).
//!
//! All tables live in the legacy BIOS area [`ACPI_START`]`..`[`ACPI_END`], which the e820 map
//! (and the PVH memory map) already reserve and which nothing else of Ferry's boot layout uses
//! (boot data sits below 0x30000, kernels at 1 MiB and above). The RSDP is at the start of that
//! area, where a legacy scan of 0xE0000-0xFFFFF finds it too; the boot protocols also pass its
//! address directly (`boot_params.acpi_rsdp_addr`, `hvm_start_info.rsdp_paddr`).
//!
//! Interrupt wiring, as KVM's default GSI routing (no KVM_SET_GSI_ROUTING) makes it: ISA IRQ n
//! is IOAPIC pin n for n < 16 (and PIC pin n), so every override is an identity. The serial
//! port (4) and the virtio devices ([`crate::devices::virtio::gsi`]) raise their lines through
//! irqfds without a resample fd: KVM pulses the line (1 then 0), an edge, so the DSDT declares
//! them edge-triggered, active-high.

use crate::devices::virtio::{MAX_DEVICES, MMIO_SIZE};
use crate::memory::GuestMem;
use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use acpi_tables::AmlSink;
use vm_memory::{Bytes, GuestAddress};
use zerocopy::{Immutable, IntoBytes};

/// Start of the area the tables occupy (the RSDP is here).
pub const ACPI_START: u64 = 0xE_0000;
/// End (exclusive) of that area: the end of the legacy BIOS area.
pub const ACPI_END: u64 = 0x10_0000;
/// Local APIC base address.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// IOAPIC base address (KVM's in-kernel IOAPIC).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// CMOS century register index the FADT names.
pub const CMOS_CENTURY: u8 = 0x32;
/// The RTC's interrupt line (ISA IRQ 8).
pub const RTC_IRQ: u32 = 8;

const OEM_ID: [u8; 6] = *b"FERRY ";
const OEM_TABLE_ID: [u8; 8] = *b"FERRYVM ";
const OEM_REVISION: u32 = 1;
/// MADT flag: the machine also has dual 8259 PICs.
const MADT_PCAT_COMPAT: u32 = 1;
/// Offset of the flags field in the MADT (after the header and the LAPIC address).
const MADT_FLAGS_OFFSET: usize = 40;

/// ACPI table errors.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables need {need} bytes, more than the {avail} bytes of the BIOS area")]
    TooLarge { need: u64, avail: u64 },
    #[error("{0} virtio devices, more than the {MAX_DEVICES} a VM may have")]
    TooManyDevices(usize),
    #[error("{0} vCPUs: the MADT describes 1..=255")]
    BadVcpus(u8),
    #[error("cannot write the ACPI tables into guest memory: {0}")]
    Write(String),
}

/// One virtio-mmio device as the DSDT announces it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub gsi: u32,
}

/// The tables of one VM, each with the guest-physical address it goes to.
#[derive(Debug, Clone)]
pub struct Tables {
    pub rsdp_addr: u64,
    pub tables: Vec<(u64, Vec<u8>)>,
}

/// MADT Interrupt Source Override (type 2), which the crate does not provide.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    r#type: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: u32,
    flags: u16,
}

impl InterruptSourceOverride {
    /// ISA IRQ `source` → `gsi`, edge-triggered, active-high (MPS INTI flags 0b01_01).
    fn isa_edge_high(source: u8, gsi: u32) -> Self {
        InterruptSourceOverride {
            r#type: 2,
            length: 10,
            bus: 0,
            source,
            gsi,
            flags: 0b0101,
        }
    }
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

fn bytes_of(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn fix_checksum(table: &mut [u8]) {
    table[9] = 0;
    let sum = table.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    table[9] = 0u8.wrapping_sub(sum);
}

/// One DSDT `Device` with `_HID`, an optional `_UID` and a `_CRS` of `resources`, as AML.
fn device(name: &str, hid: &dyn Aml, uid: Option<u32>, resources: &[&dyn Aml]) -> Vec<u8> {
    let crs = aml::ResourceTemplate::new(resources.to_vec());
    let hid = aml::Name::new(aml::Path::new("_HID"), hid);
    let crs = aml::Name::new(aml::Path::new("_CRS"), &crs);
    let uid = uid.map(|u| aml::Name::new(aml::Path::new("_UID"), &u));
    let mut children: Vec<&dyn Aml> = vec![&hid];
    if let Some(u) = &uid {
        children.push(u);
    }
    children.push(&crs);
    bytes_of(&aml::Device::new(aml::Path::new(name), children))
}

fn dsdt(devices: &[MmioDevice]) -> Vec<u8> {
    let mut body = Vec::new();
    // COM1: 16550 at 0x3f8, IRQ 4.
    body.extend(device(
        "COM1",
        &aml::EISAName::new("PNP0501"),
        Some(0),
        &[
            &aml::IO::new(0x3f8, 0x3f8, 0, 8),
            &aml::Interrupt::new(true, true, false, false, crate::vm::SERIAL_IRQ),
        ],
    ));
    // The CMOS RTC at 0x70-0x71, IRQ 8.
    body.extend(device(
        "RTC_",
        &aml::EISAName::new("PNP0B00"),
        None,
        &[
            &aml::IO::new(0x70, 0x70, 1, 2),
            &aml::Interrupt::new(true, true, false, false, RTC_IRQ),
        ],
    ));
    // virtio-mmio devices: register window and interrupt line.
    for (i, d) in devices.iter().enumerate() {
        body.extend(device(
            &format!("VR{i:02X}"),
            &"LNRO0005",
            Some(i as u32),
            &[
                &aml::Memory32Fixed::new(true, d.base as u32, MMIO_SIZE as u32),
                &aml::Interrupt::new(true, true, false, false, d.gsi),
            ],
        ));
    }
    let sb = aml::Scope::raw(aml::Path::new("\\_SB_"), body);
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.append_slice(&sb);
    sdt.as_slice().to_vec()
}

fn madt(nr_vcpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for id in 0..nr_vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    // The PIT (ISA IRQ 0) is on IOAPIC pin 0 under KVM's default routing, not pin 2 as on
    // most PC firmware: say so explicitly. Everything else is identity-mapped by default.
    madt.add_structure(InterruptSourceOverride::isa_edge_high(0, 0));
    let mut b = bytes_of(&madt);
    b[MADT_FLAGS_OFFSET..MADT_FLAGS_OFFSET + 4].copy_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    fix_checksum(&mut b);
    b
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    // Ignored by hardware-reduced platforms, but Linux's CMOS clock code reads it.
    f.century = CMOS_CENTURY;
    bytes_of(&f.finalize())
}

fn align16(a: u64) -> u64 {
    (a + 15) & !15
}

/// Builds the tables for `nr_vcpus` vCPUs and `devices`.
pub fn build(nr_vcpus: u8, devices: &[MmioDevice]) -> Result<Tables, AcpiError> {
    if nr_vcpus == 0 || nr_vcpus == u8::MAX {
        return Err(AcpiError::BadVcpus(nr_vcpus));
    }
    if devices.len() > MAX_DEVICES {
        return Err(AcpiError::TooManyDevices(devices.len()));
    }
    let rsdp_addr = ACPI_START;
    let mut next = align16(rsdp_addr + Rsdp::len() as u64);
    let dsdt = dsdt(devices);
    let dsdt_addr = next;
    next = align16(next + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let fadt_addr = next;
    next = align16(next + fadt.len() as u64);
    let madt = madt(nr_vcpus);
    let madt_addr = next;
    next = align16(next + madt.len() as u64);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = bytes_of(&xsdt);
    let xsdt_addr = next;
    next += xsdt.len() as u64;
    if next > ACPI_END {
        return Err(AcpiError::TooLarge {
            need: next - ACPI_START,
            avail: ACPI_END - ACPI_START,
        });
    }
    let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt_addr));
    Ok(Tables {
        rsdp_addr,
        tables: vec![
            (rsdp_addr, rsdp),
            (dsdt_addr, dsdt),
            (fadt_addr, fadt),
            (madt_addr, madt),
            (xsdt_addr, xsdt),
        ],
    })
}

/// Builds the tables and writes them into guest memory; returns the RSDP's address.
pub fn write(mem: &GuestMem, nr_vcpus: u8, devices: &[MmioDevice]) -> Result<u64, AcpiError> {
    let t = build(nr_vcpus, devices)?;
    for (addr, bytes) in &t.tables {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(|e| AcpiError::Write(e.to_string()))?;
    }
    Ok(t.rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::{gsi, MMIO_BASE};

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn table<'a>(t: &'a Tables, sig: &[u8; 4]) -> (u64, &'a [u8]) {
        t.tables
            .iter()
            .find(|(_, b)| &b[..4] == sig)
            .map(|(a, b)| (*a, b.as_slice()))
            .unwrap_or_else(|| panic!("no {:?} table", std::str::from_utf8(sig)))
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    fn devices(n: usize) -> Vec<MmioDevice> {
        (0..n)
            .map(|i| MmioDevice {
                base: MMIO_BASE + i as u64 * MMIO_SIZE,
                gsi: gsi(i),
            })
            .collect()
    }

    #[test]
    fn checksums_lengths_and_links() {
        let t = build(4, &devices(3)).unwrap();
        let (rsdp_addr, rsdp) = t.tables[0].clone();
        assert_eq!(rsdp_addr, ACPI_START);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP");
        for (addr, b) in &t.tables[1..] {
            assert_eq!(u32_at(b, 4) as usize, b.len(), "length of {:?}", &b[..4]);
            assert_eq!(sum(b), 0, "checksum of {:?}", &b[..4]);
            assert!(*addr >= ACPI_START && addr + b.len() as u64 <= ACPI_END);
        }
        // No two tables overlap.
        let mut spans: Vec<(u64, u64)> = t
            .tables
            .iter()
            .map(|(a, b)| (*a, a + b.len() as u64))
            .collect();
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0, "{w:x?} overlap");
        }
        // RSDP → XSDT → FADT, MADT; FADT → DSDT.
        let (xsdt_addr, xsdt) = table(&t, b"XSDT");
        assert_eq!(u64_at(&rsdp, 24), xsdt_addr);
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(xsdt, o))
            .collect();
        let (fadt_addr, fadt) = table(&t, b"FACP");
        let (madt_addr, _) = table(&t, b"APIC");
        assert_eq!(entries, vec![fadt_addr, madt_addr]);
        let (dsdt_addr, _) = table(&t, b"DSDT");
        assert_eq!(u64_at(fadt, 140), dsdt_addr, "X_DSDT");
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        let iapc_boot_arch = u16::from_le_bytes([fadt[109], fadt[110]]);
        assert_eq!(
            iapc_boot_arch & (1 << 5),
            0,
            "CMOS RTC must not be marked absent"
        );
        assert_eq!(fadt[108], CMOS_CENTURY);
    }

    #[test]
    fn madt_has_one_lapic_per_vcpu_the_ioapic_and_overrides() {
        for n in [1u8, 2, 8] {
            let t = build(n, &devices(1)).unwrap();
            let (_, m) = table(&t, b"APIC");
            assert_eq!(u32_at(m, 36), LAPIC_ADDR);
            assert_eq!(u32_at(m, 40) & 1, 1, "PCAT_COMPAT");
            let mut lapics = Vec::new();
            let mut ioapics = Vec::new();
            let mut overrides = Vec::new();
            let mut o = 44;
            while o < m.len() {
                let (ty, len) = (m[o], m[o + 1] as usize);
                assert!(len >= 2 && o + len <= m.len(), "bad MADT entry at {o}");
                match ty {
                    0 => lapics.push((m[o + 2], m[o + 3], u32_at(m, o + 4))),
                    1 => ioapics.push((m[o + 2], u32_at(m, o + 4), u32_at(m, o + 8))),
                    2 => overrides.push((m[o + 3], u32_at(m, o + 4))),
                    t => panic!("unexpected MADT entry type {t}"),
                }
                o += len;
            }
            let want: Vec<(u8, u8, u32)> = (0..n).map(|i| (i, i, 1)).collect();
            assert_eq!(lapics, want, "{n} vCPUs");
            assert_eq!(ioapics, vec![(0, IOAPIC_ADDR, 0)]);
            assert_eq!(overrides, vec![(0, 0)]);
        }
        assert!(build(0, &[]).is_err());
    }

    /// Finds `needle` in `hay`, returning every offset.
    fn find_all(hay: &[u8], needle: &[u8]) -> Vec<usize> {
        hay.windows(needle.len())
            .enumerate()
            .filter(|(_, w)| *w == needle)
            .map(|(i, _)| i)
            .collect()
    }

    #[test]
    fn dsdt_describes_the_virtio_devices_com1_and_the_rtc() {
        let devs = devices(4);
        let t = build(2, &devs).unwrap();
        let (_, d) = table(&t, b"DSDT");
        let hids = find_all(d, b"\x0dLNRO0005\0");
        assert_eq!(hids.len(), devs.len(), "one _HID string per device");
        for (i, dev) in devs.iter().enumerate() {
            // Device name, then Memory32Fixed (0x86, len 9, rw) base, size.
            let name = format!("VR{i:02X}");
            assert_eq!(find_all(d, name.as_bytes()).len(), 1, "{name}");
            let mut mem = vec![0x86, 9, 0, 1];
            mem.extend_from_slice(&(dev.base as u32).to_le_bytes());
            mem.extend_from_slice(&(MMIO_SIZE as u32).to_le_bytes());
            assert_eq!(find_all(d, &mem).len(), 1, "window of device {i}");
            // Extended interrupt: consumer, edge, active-high, exclusive; one GSI.
            let mut irq = vec![0x89, 6, 0, 0b0011, 1];
            irq.extend_from_slice(&dev.gsi.to_le_bytes());
            let pos = find_all(d, &irq);
            assert_eq!(pos.len(), 1, "interrupt of device {i}");
            assert!(
                pos[0] > find_all(d, &mem)[0],
                "interrupt follows its window"
            );
        }
        // COM1 and RTC: EISA IDs, IO ranges, IRQs 4 and 8.
        let eisa = |s: &str| bytes_of(&aml::EISAName::new(s));
        assert_eq!(find_all(d, &eisa("PNP0501")).len(), 1);
        assert_eq!(find_all(d, &eisa("PNP0B00")).len(), 1);
        assert_eq!(find_all(d, &[0x47, 1, 0xf8, 3, 0xf8, 3, 0, 8]).len(), 1);
        assert_eq!(find_all(d, &[0x47, 1, 0x70, 0, 0x70, 0, 1, 2]).len(), 1);
        for irq in [4u32, RTC_IRQ] {
            let mut e = vec![0x89, 6, 0, 0b0011, 1];
            e.extend_from_slice(&irq.to_le_bytes());
            assert_eq!(find_all(d, &e).len(), 1, "IRQ {irq}");
        }
        assert!(devs.iter().all(|d| d.gsi != RTC_IRQ && d.gsi != 4));
    }

    #[test]
    fn every_device_count_fits() {
        let t = build(crate::config::MAX_VCPUS, &devices(MAX_DEVICES)).unwrap();
        assert!(t.tables.iter().all(|(a, b)| a + b.len() as u64 <= ACPI_END));
        assert!(build(1, &devices(MAX_DEVICES + 1)).is_err());
    }
}
