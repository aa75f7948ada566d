//! # Ferry test guest kernel
//!
//! A tiny x86-64 kernel that Ferry's tests boot (under the Ferry VMM and, unchanged, under
//! `qemu-system-x86_64 -accel kvm -M microvm -kernel`). It runs a workload on every vCPU and
//! reports on COM1 in simple lines, including what it needs to prove memory integrity across
//! snapshots and live migrations. Built by `crates/guest/build.rs` (direct `rustc` call, no_std,
//! static, linked by `kernel.ld`); this file is the spec other code relies on.
//!
//! ## Design
//! The platform's KVM emulates all guest ring-0 code (~4 M instr/s, no SSE/x87/int3/... there)
//! but runs 64-bit ring 3 natively. So:
//! - ring 0 (`boot.S`, assembly only) does the boot, SMP start-up and tiny interrupt,
//!   exception and system-call handlers; it never calls compiler-generated code;
//! - everything else (command line, output, workloads) is Rust running in ring 3 (SSE etc. fine);
//! - ring 3 writes COM1 itself (the TSS I/O bitmap allows ports 0x3f8-0x3ff only) and reaches
//!   ring 0 only through `int3` (the "system call") and interrupts;
//! - virtio-mmio devices (disk-log, net-echo) are driven from ring 3 too, by polling: the
//!   identity map is user-accessible, so MMIO works there (each register access is a VM exit).
//!
//! ## Boot path
//! 1. PVH: the ELF has a Xen note type 18 (XEN_ELFNOTE_PHYS32_ENTRY) pointing at `_start32`; the
//!    image is linked and loaded at 1 MiB (vaddr == paddr). Entry in 32-bit protected mode,
//!    paging off, EBX = `struct hvm_start_info`. The loader must zero the ELF's bss (memsz >
//!    filesz), as QEMU does and as fresh guest RAM is.
//! 2. `_start32` first copies what it needs from start_info into [`BootInfo`] (magic, version,
//!    up to 1023 bytes of command line, up to 64 memory map entries), so start_info, the command
//!    line and the memory map may live anywhere in RAM except inside this kernel image.
//! 3. Identity page tables with 2 MiB pages, U/S=1 everywhere (ring 3 may touch all memory),
//!    covering `[0, max(4 GiB, highest RAM end rounded up to 1 GiB))`, at most 64 GiB (RAM above
//!    64 GiB is neither mapped nor used). The 2 MiB pages of the IOAPIC (0xfec00000) and LAPIC
//!    (0xfee00000) are PCD|PWT. Long mode, CR4 = PAE|OSFXSR|OSXMMEXCPT.
//! 4. BSP (64-bit): GDT (0x08 kernel code64, 0x10 kernel data, 0x18 kernel code32, 0x23 user
//!    data, 0x2b user code64, 0x30 + 16*cpu TSS of cpu), IDT, per-CPU init (TSS, LAPIC software
//!    enabled with spurious vector 0xff, LINT0/LINT1 masked, timer LVT = 0x20 in TSC-deadline
//!    mode if CPUID.1:ECX[24], else masked), legacy PICs masked, TSC frequency (below).
//! 5. SMP without ACPI: the BSP copies a real-mode trampoline to 0x8000 and sends INIT, SIPI,
//!    SIPI (vector 0x08) to all-excluding-self. Each AP goes real -> protected -> long mode
//!    with the same page tables, reads its APIC ID (0xfee00020 bits 31:24) = its CPU index,
//!    loads GDT/IDT/its TSS, enables its LAPIC and checks in by setting bit `cpu` in
//!    `BootInfo.cpu_mask` with `lock cmpxchg`. The BSP waits at least 50 ms, until no AP checked
//!    in for 20 ms, at most 500 ms, then closes the window (bit 31); an AP arriving later halts
//!    forever. APIC IDs must be 0..N-1 (both QEMU and KVM number vCPUs that way); APIC IDs >= 16
//!    halt. Every CPU then `iretq`s to ring 3: [`user_main`]`(cpu, &BOOT_INFO)` on its own
//!    128 KiB stack (RSP % 16 == 8 at entry), RFLAGS = IF|0x2 (IOPL 0).
//! 6. Ring 3 on the BSP parses the command line, checks everything, prints the boot line (and
//!    the `wss` line), then releases the APs (which wait in ring 3, sleeping) and every CPU runs
//!    the workload.
//!
//! ## TSC frequency
//! If CPUID 0x40000000 says "KVMKVMKVM" and 0x40000001 EAX has KVM_FEATURE_CLOCKSOURCE2 (bit 3),
//! ring 0 enables kvmclock (MSR 0x4b564d01 = pvclock struct | 1), waits (bounded) for KVM to
//! fill it in, reads `tsc_to_system_mul`/`tsc_shift`, disables kvmclock again (writes 0) and
//! computes `hz = 1e9 * 2^32 / mul`, shifted right by `tsc_shift` (left if negative). Otherwise
//! it compares the TSC with >= 42 ms of PIT channel 0 (mode 0 from 0xffff, read back with latch
//! commands on ports 0x43/0x40; channel 0 because its gate is always on, while port 0x61, the
//! channel-2 gate, does not exist on e.g. QEMU microvm; its IRQ0 reaches nothing since the PICs,
//! LINT0 and the IOAPIC pins are masked; bounded wait). `ferry.tsc_khz=<K>` on the command line
//! wins over both (applied in ring 3). No frequency at all -> `PANIC unknown TSC frequency ...`.
//! A VMM should therefore expose the KVM CPUID leaves with kvmclock, or an in-kernel PIT, or pass
//! `ferry.tsc_khz`.
//!
//! ## Memory layout (guest-physical = virtual)
//! | what | where |
//! |---|---|
//! | AP real-mode trampoline (39 bytes) | 0x8000 (written after start_info was copied) |
//! | PVH note, text, rodata | from 0x100000 (1 MiB) |
//! | data: GDT, 16 TSSs (128-byte slots) followed by ONE shared 8 KiB I/O bitmap (only 0x3f8-0x3ff allowed) | after the text |
//! | bss: `BOOT_INFO`, IDT, page tables (PML4, PDPT, up to 64 PDs), 16 x 8 KiB ring-0 stacks, 16 x 128 KiB ring-3 stacks, kvmclock struct, serial lock, shared config, per-CPU workload state (`PERCPU`: heartbeat counters, writer state, ...), virtio driver state and driver memory (below) | after the data; everything ends below 16 MiB (link-time assert; ~3.8 MiB today) |
//! | virtio driver memory (`virtio::DMA`, 256 KiB, 4 KiB-aligned, bump-allocated by CPU 0 at boot, zeroed on allocation): one 4 KiB block per virtqueue (descriptor table, available ring, used ring) and the buffers: disk-log 64 B request header + status, 32 KiB data; net-echo 64 x 2 KiB RX + 32 x 2 KiB TX buffers | inside the bss (so below 16 MiB and never in the working set); the devices DMA only there |
//! | working set (dirty/verify) | ONE contiguous range of `wss_mib` MiB: the first 2 MiB-aligned address >= 16 MiB inside a RAM range of the memory map (adjacent RAM entries merged) where it fits; so 0x1000000 whenever it fits below the first hole |
//!
//! ## System calls (`int3` from ring 3, vector 3 is a DPL-3 interrupt gate)
//! RAX = function, argument in RDI; returns RAX (0 ok, -1 unknown function); all other registers
//! and RFLAGS are preserved.
//! - 1 = sleep until TSC >= RDI: returns at once if already due, else arms IA32_TSC_DEADLINE
//!   (0x6e0) = RDI and does `sti; hlt` until rdtsc >= RDI (re-checked with interrupts off after
//!   every wakeup); returns with iretq, which restores the caller's RFLAGS (IF=1).
//!   Only used if TSC-deadline mode exists; otherwise ring 3 spins instead (then an idle guest
//!   burns CPU).
//!
//! Ring 3 calls it as `asm!("int3", inout("rax") 1u64 => _, in("rdi") deadline)`.
//! - 2 = halt this CPU forever (`cli; hlt`), used after fatal errors.
//!
//! Other vectors: 0..31 -> panic (below); 0x20 LAPIC timer -> EOI, iretq; 0xff spurious ->
//! iretq; anything else is not present and panics with #NP (vec=11).
//!
//! ## Command line
//! `key=value` items separated by spaces, unknown keys ignored (see `cmdline.rs`):
//! `ferry.workload=idle|dirty|verify|disk-log|net-echo` (idle), `ferry.wss_mib=<W>` (64; dirty
//! and verify only), `ferry.rate_mibs=<R>` (0 = unlimited; total over all CPUs, split evenly),
//! `ferry.hb_ms=<ms>` (100), `ferry.rounds=<N>` (dirty: stop writing after N rounds over the
//! working set, then only heartbeats; 0 = never stop), `ferry.reset_after_ms=<ms>` (CPU 0
//! prints `reset requested` and resets the machine through the i8042 after that long; 0 =
//! never), `ferry.tsc_khz=<K>`, `ferry.disk_rate=<records/s>` (disk-log; 100; 0 = as fast as
//! possible), `ferry.disk_flush=<n>` (disk-log: a flush request after every n-th record if the
//! device offers VIRTIO_BLK_F_FLUSH; 0 = never, the default), `ferry.ip=<a.b.c.d>` (net-echo;
//! required), `ferry.mac=<xx:xx:xx:xx:xx:xx>` (net-echo: used if the device offers no MAC;
//! default 02:46:52:59:00:01), and Linux's `virtio_mmio.device=<size>@<base>:<irq>[:<id>]`
//! (repeatable, at most 8; size decimal or 0x-hex with optional K/M/G; base decimal or 0x-hex;
//! irq decimal; see "virtio devices"). A bad value, net-echo without `ferry.ip`, or a working
//! set that does not fit in RAM, prints `PANIC bad cmdline: <item> (<reason>)` and halts EVERY
//! CPU (no heartbeats at all).
//!
//! ## virtio devices (disk-log, net-echo)
//! - Discovery: only the `virtio_mmio.device=` entries of the command line (QEMU microvm appends
//!   them for its transports that hold a device, but only with `-M microvm,acpi=off`; Ferry's
//!   VMM appends `virtio_mmio.device=4K@0x<0xd0000000 + i * 0x1000>:<irq>`). The workload looks
//!   at the entries in order: each must lie inside the identity map and read MagicValue
//!   0x74726976; DeviceID 0 (empty transport) and other device types are skipped; the first
//!   device of the wanted type (2 = block for disk-log, 1 = net for net-echo) must be Version 2
//!   (modern; a legacy Version 1 device is refused: QEMU needs
//!   `-global virtio-mmio.force-legacy=false`). Only that device is touched; it is set up by the
//!   BSP before the boot line: reset (Status 0, read back until 0), ACKNOWLEDGE | DRIVER,
//!   features (DeviceFeaturesSel 0/1), DriverFeatures, FEATURES_OK (checked), queues, then
//!   DRIVER_OK. Any problem is a boot PANIC (instead of the boot line).
//! - Features: VIRTIO_F_VERSION_1 (bit 32) is required. Block also accepts VIRTIO_BLK_F_FLUSH
//!   (bit 9) if offered AND `ferry.disk_flush` > 0; net also accepts VIRTIO_NET_F_MAC (bit 5) if
//!   offered and the register window reaches the MAC (>= 0x106 bytes). Nothing else (no event
//!   index, no indirect descriptors, no offloads, no mergeable RX buffers, no packed rings).
//! - Queues (split virtqueues): QueueSel, QueueReady must read 0, QueueNumMax (0 = PANIC),
//!   size = min(QueueNumMax, 128) rounded down to a power of two, QueueDesc/Driver/Device
//!   Low/High, QueueReady = 1. Block: queue 0. Net: queue 0 = RX, 1 = TX. The available ring's
//!   flags = VIRTQ_AVAIL_F_NO_INTERRUPT; QueueNotify (value = queue index) is written after new
//!   buffers unless the used ring's flags say VIRTQ_USED_F_NO_NOTIFY.
//! - No interrupts: completions are found by polling the used rings (plain RAM reads).
//!   InterruptStatus is never read or acknowledged; the device's IRQ line, if it raises one,
//!   ends at a masked IOAPIC pin.
//! - Register accesses are 32-bit, except the net config (MAC), read byte by byte; config
//!   fields are read between two equal ConfigGeneration reads. The Status register is read
//!   again only rarely (net: once a second; block: every 100 ms while a request is
//!   outstanding): DEVICE_NEEDS_RESET, FAILED or a lost DRIVER_OK there prints
//!   `PANIC virtio-<blk|net> at 0x<base>: device ...` and halts CPU 0 (the other CPUs go on).
//! - Only CPU 0 drives the device; the other CPUs run the idle workload. CPU 0 keeps its
//!   heartbeats on time while it polls and sleeps (syscall 1) when there is nothing to do.
//! - Block requests: header (16 bytes: type, 0, sector; device-readable) -> data (device-
//!   writable for reads) -> status byte (device-writable); flush: header -> status. One
//!   request at a time. While waiting: spin 200 us, then sleep in 500 us steps.
//! - Net buffers: RX = one device-writable 2 KiB descriptor each (12-byte virtio-net header,
//!   then the frame); TX = one device-readable descriptor (12 zero bytes, then the frame).
//!
//! ## Output (COM1, one `\n`-terminated line per event, never interleaved; numbers decimal
//! unless shown with `0x`)
//! 1. `ferry-guest boot cpus=<N> mem_mib=<RAM MiB> tsc_khz=<K> workload=<idle|dirty|verify|disk-log|net-echo> wss_mib=<W> rate_mibs=<R> hb_ms=<H>`
//!    once, by the BSP. `mem_mib` = sum of the RAM (type 1) entries of the memory map, in MiB
//!    rounded to nearest.
//! 2. `wss gpa=0x<hex start> pages=<P>` once after the boot line, dirty and verify only.
//!    Page `i` of the working set is at guest-physical `start + 4096 * i`.
//!    disk-log instead: `virtio-blk base=0x<hex> irq=<n> features=0x<negotiated, hex>
//!    sectors=<capacity in 512-byte sectors> queue=<size>`; net-echo:
//!    `virtio-net base=0x<hex> irq=<n> features=0x<negotiated, hex> rxq=<size> txq=<size>`.
//! 3. `hb <cpu> <counter> <tsc>` every `hb_ms` on every CPU and every workload: counter 1, 2,
//!    3, ... per CPU (the first one right when the workload starts); tsc = rdtsc when the line
//!    was made. After a stall longer than one period the cadence restarts (no burst of lines).
//! 4. idle: the CPU sleeps (syscall 1) until its next heartbeat.
//! 5. dirty: CPU k of N owns WSS pages `[k*P/N, (k+1)*P/N)` and writes one u64 (= round number,
//!    1, 2, ...) at offset 0 of every page, in order, over and over; rate limited to R/N MiB/s
//!    (4 KiB counted per page write; pages are written in bursts of ~10 ms worth, at most 256;
//!    when ahead of schedule it sleeps via syscall 1 if the wait is >= 300 us, else spins; a
//!    backlog older than 50 ms is forgiven, so there is no catch-up burst after a pause). At most once per second:
//!    `dirty cpu=<k> rounds=<completed rounds> mib=<pages written / 256>`.
//! 6. verify: page layout in `verify_logic.rs` (word0 = global WSS page index, word1 =
//!    generation >= 1, word2 = checksum of the rest of the page, words 3..511 = pattern of
//!    (index, gen)). CPU k owns the same partition as for dirty, fills it with generation 1
//!    (unthrottled, heartbeats continue), then loops: the writer state (gen g, pos p) lives in per-CPU kernel memory (not in the
//!    WSS); each step checks page p (must hold g-1), rewrites it with g, advances p (wrap: g+1),
//!    then the checker checks one page c (started half a partition ahead) against
//!    `c < p ? g : g-1` and advances. So every page is looked at twice per writer cycle and a
//!    stale page (an older self-consistent version, e.g. a dirty page a migration missed) is
//!    found within half a cycle, before the writer could overwrite it. Writes are rate limited like dirty (R/N MiB/s; initial
//!    fill unlimited). On a mismatch:
//!    `verify CORRUPT page=<i> cpu=<k> expected_gen=<e> found_gen=<f> found_index=<x> checksum=<ok|bad>`
//!    (at most 16 such lines per sweep and CPU; all are counted), then the page is rewritten with
//!    the expected content so each fault is reported once. A sweep is one pass of the checker
//!    over the partition. After a sweep without errors, at most once per hb_ms per CPU:
//!    `verify ok gen=<g> pages=<pages in partition> cpu=<k> sweeps=<sweeps completed so far>`;
//!    after every sweep with errors: `verify bad gen=<g> pages=<n> cpu=<k> errors=<errors in that sweep>`.
//!    CPUs with an empty partition (P < N) just idle with heartbeats.
//! 7. disk-log (CPU 0; record format in `disklog.rs`: 512-byte record `seq` = 1, 2, ... in
//!    sector `seq - 1`: "FERRYLOG", seq u64, 64-bit checksum of the record without the checksum
//!    field, payload derived from seq). First the log is scanned from sector 0 with reads of up
//!    to 64 sectors until the first all-zero sector or the end of the disk:
//!    `disk ok last=<N>` (N = last valid seq, 0 = empty), or, at the first sector that is
//!    neither zero nor the right record (magic, seq, checksum, payload),
//!    `disk CORRUPT at=<sector>` and no appending at all. Then records N+1, N+2, ... are
//!    written one at a time (record s at sector s - 1), each acknowledged by the device with
//!    VIRTIO_BLK_S_OK before `disk seq=<s>` is printed, `ferry.disk_rate` records per second (a
//!    backlog older than 50 ms is forgiven); if a flush interval is in force, after every
//!    n-th record a flush request and `disk flush seq=<s>`. At the capacity:
//!    `disk full last=<N>`. A request that fails: `disk ERROR seq=<s> status=<virtio-blk
//!    status byte>` (s = the record being written or flushed; for a failed read while
//!    scanning, the seq of the first sector of that read). After CORRUPT, full or ERROR, CPU 0
//!    only does heartbeats. An acknowledged record is in the device's backend; if the VMM dies
//!    mid-write, the next boot may also find the one record that was written but not yet
//!    printed (`last` = last printed seq or one more).
//! 8. net-echo (CPU 0; packet handling in `netpkt.rs`): posts min(64, rxq) RX buffers, prints
//!    `net up mac=<xx:xx:xx:xx:xx:xx> ip=<a.b.c.d>` (the device's MAC if it offers one, else
//!    `ferry.mac` or 02:46:52:59:00:01), then sends one gratuitous ARP (broadcast ARP request
//!    for its own IP). It answers ARP requests for `ferry.ip`, ICMP echo requests to it (same
//!    id, sequence and data) and UDP datagrams to it on any port (payload echoed to the
//!    sender's address and port, from the port it was sent to), with valid IPv4/ICMP/UDP
//!    checksums; everything else (IPv6, other addresses, fragments, bad checksums, ...) is
//!    ignored. At most once per second, and only if a counter changed:
//!    `net rx=<frames received> tx=<frames sent> arp=<ARP replies> icmp=<echo replies> udp=<UDP replies>`.
//!    It polls the RX ring continuously for 1 ms after the last frame, then every 1 ms,
//!    sleeping in between (syscall 1). A reply that finds all 32 TX buffers in flight for 2 ms
//!    is dropped.
//! 9. `PANIC cpu=<n> vec=<v> err=0x<hex> rip=0x<hex> cr2=0x<hex>` from ring 0 on any CPU
//!    exception (that CPU halts forever; the others go on); `PANIC cpu=<n> rust panic at
//!    <file>:<line>: <msg>` from ring 3; `PANIC bad cmdline: ...`; other `PANIC <reason>` lines
//!    for boot problems (no start_info, no memory map, unknown TSC frequency, CPU IDs not
//!    0..N-1, `no virtio block device (<n> virtio_mmio.device entries on the command line)`,
//!    `no virtio net device (...)`, `virtio-mmio at 0x<base>: bad magic 0x<hex> ...`,
//!    `virtio-<blk|net> at 0x<base> is a legacy virtio-mmio device (version 1) ...`, a device
//!    refusing features or queues, ...). Every PANIC line is final for the CPU (or, at boot,
//!    the whole guest).
//!
//! Serial lock: a u32 in guest memory (`SERIAL_LOCK`; 0 free, else owner cpu + 1) taken with
//! `lock cmpxchg` by ring 3 for each line and (bounded wait) by the ring-0 panic handler. Each
//! `out` is a VM exit (~65 us here): keep `hb_ms` reasonable (a heartbeat line costs ~2 ms).
//!
//! All workload state (heartbeat counters, writer state, round counters, virtqueue indices and
//! driver state) is in guest memory or registers, so a snapshot/restore or live migration of
//! the whole VM continues it seamlessly (given that the VMM carries its device state along).

#![no_std]
#![no_main]

mod cmdline;
mod disk;
mod disklog;
mod line;
mod net;
mod netpkt;
mod verify_logic;
mod virtio;
mod virtq;

use core::arch::{asm, global_asm};
use core::mem::offset_of;
use core::sync::atomic::{AtomicU32, Ordering};

use cmdline::Workload;
use line::Line;
use verify_logic::{Found, Pages, Verifier, Writer, PAGE_WORDS};

/// CPUs supported (APIC IDs 0..MAX_CPUS-1).
pub const MAX_CPUS: usize = 16;
/// Ring-0 stack per CPU (TSS.RSP0).
pub const KSTACK_SIZE: usize = 8 * 1024;
/// Ring-3 stack per CPU.
pub const USTACK_SIZE: usize = 128 * 1024;
/// Memory map entries copied from hvm_start_info.
pub const MAX_MEMMAP: usize = 64;
/// Command line bytes copied (including the NUL).
pub const CMDLINE_MAX: usize = 1024;
/// Page directories (1 GiB each) for the identity map.
pub const PD_PAGES: usize = 64;
/// LAPIC timer vector.
pub const TIMER_VECTOR: usize = 0x20;
/// AP trampoline address (SIPI vector 0x08).
pub const TRAMPOLINE: usize = 0x8000;

const PVH_MAGIC: u32 = 0x336e_c578;
const COM1: u16 = 0x3f8;
const PAGE_SIZE: u64 = 4096;
const MIB: u64 = 1 << 20;
const WSS_MIN_START: u64 = 16 * MIB;
const WSS_ALIGN: u64 = 2 * MIB;
const MAX_CORRUPT_LINES_PER_SWEEP: u64 = 16;

/// One `hvm_memmap_table_entry`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MemmapEntry {
    pub addr: u64,
    pub size: u64,
    /// 1 = RAM.
    pub typ: u32,
    pub reserved: u32,
}

/// What ring 0 found at boot, passed to [`user_main`]. Written only by ring 0 before ring 3 runs.
#[repr(C)]
pub struct BootInfo {
    /// EBX at the PVH entry.
    pub start_info_paddr: u64,
    /// hvm_start_info magic if it was valid (0x336ec578), else 0.
    pub start_info_magic: u32,
    pub start_info_version: u32,
    /// Bit i: CPU with APIC ID i checked in. Bit 31: check-in window closed.
    pub cpu_mask: u32,
    /// APIC ID of the BSP.
    pub bsp_id: u32,
    /// Measured TSC frequency in Hz (0 = unknown).
    pub tsc_hz: u64,
    /// 0 = none, 1 = kvmclock, 2 = PIT.
    pub tsc_source: u32,
    /// CPUID.1:ECX[24]: the LAPIC timer runs in TSC-deadline mode.
    pub has_tsc_deadline: u32,
    /// `[0, mapped_gib GiB)` is identity mapped.
    pub mapped_gib: u32,
    /// Entries copied into `memmap`.
    pub memmap_entries: u32,
    /// Entries start_info reported.
    pub memmap_total: u32,
    /// Bytes in `cmdline` (no NUL).
    pub cmdline_len: u32,
    pub memmap: [MemmapEntry; MAX_MEMMAP],
    pub cmdline: [u8; CMDLINE_MAX],
}

/// Filled by ring 0 at boot.
#[no_mangle]
pub static mut BOOT_INFO: BootInfo = BootInfo {
    start_info_paddr: 0,
    start_info_magic: 0,
    start_info_version: 0,
    cpu_mask: 0,
    bsp_id: 0,
    tsc_hz: 0,
    tsc_source: 0,
    has_tsc_deadline: 0,
    mapped_gib: 0,
    memmap_entries: 0,
    memmap_total: 0,
    cmdline_len: 0,
    memmap: [MemmapEntry {
        addr: 0,
        size: 0,
        typ: 0,
        reserved: 0,
    }; MAX_MEMMAP],
    cmdline: [0; CMDLINE_MAX],
};

/// COM1 line lock: 0 = free, else owner cpu + 1. Shared with the ring-0 panic handler.
#[no_mangle]
pub static SERIAL_LOCK: AtomicU32 = AtomicU32::new(0);

global_asm!(
    include_str!("boot.S"),
    BI_SI_PADDR = const offset_of!(BootInfo, start_info_paddr),
    BI_SI_MAGIC = const offset_of!(BootInfo, start_info_magic),
    BI_SI_VERSION = const offset_of!(BootInfo, start_info_version),
    BI_CPU_MASK = const offset_of!(BootInfo, cpu_mask),
    BI_BSP_ID = const offset_of!(BootInfo, bsp_id),
    BI_TSC_HZ = const offset_of!(BootInfo, tsc_hz),
    BI_TSC_SOURCE = const offset_of!(BootInfo, tsc_source),
    BI_HAS_DEADLINE = const offset_of!(BootInfo, has_tsc_deadline),
    BI_MAPPED_GIB = const offset_of!(BootInfo, mapped_gib),
    BI_MEMMAP_ENTRIES = const offset_of!(BootInfo, memmap_entries),
    BI_MEMMAP_TOTAL = const offset_of!(BootInfo, memmap_total),
    BI_CMDLINE_LEN = const offset_of!(BootInfo, cmdline_len),
    BI_MEMMAP = const offset_of!(BootInfo, memmap),
    BI_CMDLINE = const offset_of!(BootInfo, cmdline),
    MAX_CPUS = const MAX_CPUS,
    KSTACK_SIZE = const KSTACK_SIZE,
    USTACK_SIZE = const USTACK_SIZE,
    MAX_MEMMAP = const MAX_MEMMAP,
    CMDLINE_MAX = const CMDLINE_MAX,
    PD_PAGES = const PD_PAGES,
    TIMER_VECTOR = const TIMER_VECTOR,
    TRAMPOLINE = const TRAMPOLINE,
    options(att_syntax)
);

const _: () = assert!(core::mem::size_of::<MemmapEntry>() == 24);
const _: () = assert!(offset_of!(BootInfo, memmap) % 8 == 0);

extern "C" {
    /// Base of the per-CPU ring-3 stacks (boot.S).
    static user_stacks: u8;
}

// ------------------------------------------------------------------------------------------
// Ring-3 runtime

#[inline(always)]
fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[inline(always)]
fn outb(port: u16, value: u8) {
    // SAFETY: port I/O to COM1, allowed by the TSS I/O bitmap; no memory effects.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// CPU index of the caller, from its stack pointer (each CPU has its own ring-3 stack).
fn current_cpu() -> usize {
    let sp: usize;
    // SAFETY: reads RSP.
    unsafe { asm!("mov {}, rsp", out(reg) sp, options(nomem, nostack, preserves_flags)) };
    let base = &raw const user_stacks as usize;
    (sp.wrapping_sub(base) / USTACK_SIZE).min(MAX_CPUS - 1)
}

/// Writes `bytes` to COM1 under the serial lock (re-entrant for the lock owner).
pub fn serial_write(bytes: &[u8]) {
    let me = current_cpu() as u32 + 1;
    let nested = SERIAL_LOCK.load(Ordering::Relaxed) == me;
    if !nested {
        loop {
            if SERIAL_LOCK.load(Ordering::Relaxed) == 0
                && SERIAL_LOCK
                    .compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                break;
            }
            core::hint::spin_loop();
        }
    }
    for &b in bytes {
        outb(COM1, b);
    }
    if !nested {
        SERIAL_LOCK.store(0, Ordering::Release);
    }
}

/// Syscall 1: sleep in ring 0 until TSC >= deadline.
fn sys_sleep_until(deadline: u64) {
    // SAFETY: int3 is the system call; the handler preserves everything but RAX.
    unsafe { asm!("int3", inout("rax") 1u64 => _, in("rdi") deadline, options(nostack)) }
}

/// Syscall 3: reset the machine (i8042).
fn sys_reset() -> ! {
    // SAFETY: int3 syscall 3 does not return (the VMM resets or stops the machine).
    unsafe { asm!("int3", in("rax") 3u64, options(noreturn, nostack)) }
}

/// Syscall 2: halt this CPU forever.
fn sys_halt() -> ! {
    // SAFETY: int3 syscall 2 never returns.
    unsafe { asm!("int3", in("rax") 2u64, options(noreturn, nostack)) }
}

fn spin_until(deadline: u64) {
    while rdtsc() < deadline {
        core::hint::spin_loop();
    }
}

/// Waits until TSC >= deadline: spin if it is close (or there is no TSC-deadline timer), else
/// sleep in ring 0.
fn wait_until(sh: &Shared, deadline: u64) {
    let now = rdtsc();
    if deadline <= now {
        return;
    }
    if !sh.has_deadline || deadline - now < sh.spin_ticks {
        spin_until(deadline);
    } else {
        sys_sleep_until(deadline);
    }
}

// ------------------------------------------------------------------------------------------
// Shared configuration (written by the BSP before releasing the APs) and per-CPU state.

struct Shared {
    workload: Workload,
    /// CPUs that write the working set: all of them for dirty/verify, all but CPU 0 (which
    /// drives the device) for disk-log/net-echo with `ferry.load_mib`.
    wss_cpus: u64,
    tsc_khz: u64,
    hb_ticks: u64,
    /// Waits shorter than this (300 us) spin instead of sleeping.
    spin_ticks: u64,
    sec_ticks: u64,
    wss_base: u64,
    wss_pages: u64,
    rate_mibs: u64,
    rounds: u64,
    /// TSC at which CPU 0 resets the machine (0 = never).
    reset_at: u64,
    has_deadline: bool,
    /// disk-log: records per second (0 = unlimited) and flush interval (0 = never).
    disk_rate: u64,
    disk_flush: u64,
}

static mut SHARED: Shared = Shared {
    workload: Workload::Idle,
    wss_cpus: 1,
    tsc_khz: 0,
    hb_ticks: 0,
    spin_ticks: 0,
    sec_ticks: 0,
    wss_base: 0,
    wss_pages: 0,
    rate_mibs: 0,
    rounds: 0,
    reset_at: 0,
    has_deadline: false,
    disk_rate: 0,
    disk_flush: 0,
};

/// 0 = APs wait, 1 = go, 2 = boot failed (everybody halts).
static GO: AtomicU32 = AtomicU32::new(0);

/// Workload state of one CPU (only that CPU touches it).
#[repr(C, align(128))]
struct PerCpu {
    hb_counter: u64,
    next_hb: u64,
    next_report: u64,
    pace_base_tsc: u64,
    pace_base_count: u64,
    /// Page writes so far (dirty and verify; the verify initial fill is not counted).
    pace_count: u64,
    dirty_pos: u64,
    dirty_round: u64,
    verify_init_pos: u64,
    verify: Verifier,
    verify_sweeps: u64,
    verify_sweep_errors: u64,
    verify_sweep_printed: u64,
    verify_last_ok: u64,
}

// All zero: PERCPU lives in .bss.
const PERCPU_INIT: PerCpu = PerCpu {
    hb_counter: 0,
    next_hb: 0,
    next_report: 0,
    pace_base_tsc: 0,
    pace_base_count: 0,
    pace_count: 0,
    dirty_pos: 0,
    dirty_round: 0,
    verify_init_pos: 0,
    verify: Verifier {
        start: 0,
        end: 0,
        writer: Writer { gen: 0, pos: 0 },
        check: 0,
        checked: 0,
    },
    verify_sweeps: 0,
    verify_sweep_errors: 0,
    verify_sweep_printed: 0,
    verify_last_ok: 0,
};

static mut PERCPU: [PerCpu; MAX_CPUS] = [PERCPU_INIT; MAX_CPUS];

fn shared() -> &'static Shared {
    // SAFETY: written only by the BSP before GO is released (Release/Acquire), read-only after.
    let shared = &raw const SHARED;
    unsafe { &*shared }
}

fn percpu(cpu: usize) -> &'static mut PerCpu {
    assert!(cpu < MAX_CPUS);
    // SAFETY: each CPU only ever uses its own element, and only from one call chain.
    unsafe { &mut *(&raw mut PERCPU).cast::<PerCpu>().add(cpu) }
}

// ------------------------------------------------------------------------------------------
// Entry and boot checks

/// Ring-3 entry of every CPU (see the boot path above). `cpu` = APIC ID.
///
/// # Safety
/// Only `boot.S` calls it, once per CPU, with `info` = `&BOOT_INFO` fully written.
#[no_mangle]
pub unsafe extern "C" fn user_main(cpu: u64, info: *const BootInfo) -> ! {
    let mxcsr: u32 = 0x1f80;
    // SAFETY: loads the default SSE control word (all exceptions masked).
    unsafe { asm!("ldmxcsr [{}]", in(reg) &mxcsr, options(nostack, readonly)) };
    let cpu = cpu as usize;
    // SAFETY: ring 0 filled BOOT_INFO before entering ring 3 and never writes it afterwards.
    let info = unsafe { &*info };
    if cpu as u32 == info.bsp_id {
        if bsp_setup(cpu, info).is_err() {
            GO.store(2, Ordering::Release);
            sys_halt();
        }
        GO.store(1, Ordering::Release);
    } else {
        let ms = info.tsc_hz / 1000;
        loop {
            match GO.load(Ordering::Acquire) {
                0 if ms != 0 && info.has_tsc_deadline != 0 => sys_sleep_until(rdtsc() + ms),
                0 => core::hint::spin_loop(),
                1 => break,
                _ => sys_halt(),
            }
        }
    }
    run(cpu)
}

fn panic_line() -> Line {
    let mut l = Line::new();
    l.str("PANIC ");
    l
}

fn bsp_setup(cpu: usize, info: &BootInfo) -> Result<(), ()> {
    if info.start_info_magic != PVH_MAGIC {
        panic_line()
            .str("no valid hvm_start_info at 0x")
            .hex(info.start_info_paddr)
            .str(" (PVH boot required)")
            .send();
        return Err(());
    }
    let cmd = &info.cmdline[..(info.cmdline_len as usize).min(CMDLINE_MAX)];
    let cfg = match cmdline::parse(cmd) {
        Ok(c) => c,
        Err(bad) => {
            panic_line()
                .str("bad cmdline: ")
                .bytes(bad.item)
                .str(" (")
                .str(bad.reason)
                .str(")")
                .send();
            return Err(());
        }
    };
    let tsc_khz = cfg.tsc_khz.unwrap_or((info.tsc_hz + 500) / 1000);
    if tsc_khz == 0 {
        panic_line()
            .str("unknown TSC frequency (no kvmclock, PIT failed): pass ferry.tsc_khz=<kHz>")
            .send();
        return Err(());
    }
    let mask = info.cpu_mask & 0xffff;
    let ncpus = mask.count_ones();
    if cpu != 0 || mask != (1u32 << ncpus) - 1 {
        panic_line()
            .str("CPU APIC IDs are not 0..N-1: bsp=")
            .dec(cpu as u64)
            .str(" mask=0x")
            .hex(u64::from(mask))
            .send();
        return Err(());
    }
    let entries = &info.memmap[..(info.memmap_entries as usize).min(MAX_MEMMAP)];
    if entries.is_empty() {
        panic_line()
            .str("no memory map in hvm_start_info (version ")
            .dec(u64::from(info.start_info_version))
            .str(")")
            .send();
        return Err(());
    }
    let ram: u64 = entries.iter().filter(|e| e.typ == 1).map(|e| e.size).sum();
    let mem_mib = (ram + MIB / 2) / MIB;

    let mut wss_base = 0;
    let mut wss_pages = 0;
    let mapped = u64::from(info.mapped_gib) << 30;
    let wss_mib = if cfg.workload.uses_wss() {
        cfg.wss_mib
    } else if cfg.workload.drives_device() {
        cfg.load_mib
    } else {
        0
    };
    if wss_mib > 0 {
        wss_pages = wss_mib * (MIB / PAGE_SIZE);
        match find_wss(entries, mapped, wss_mib * MIB) {
            Ok(base) => wss_base = base,
            Err(largest) => {
                panic_line()
                    .str(if cfg.workload.uses_wss() {
                        "bad cmdline: ferry.wss_mib="
                    } else {
                        "bad cmdline: ferry.load_mib="
                    })
                    .dec(wss_mib)
                    .str(" (does not fit in RAM: largest contiguous RAM above 16 MiB is ")
                    .dec(largest / MIB)
                    .str(" MiB)")
                    .send();
                return Err(());
            }
        }
    }

    // Devices (CPU 0 drives them later): found and initialized before the boot line, so any
    // problem is a boot PANIC instead of it.
    virtio::dma_reset();
    match cfg.workload {
        Workload::DiskLog => disk::setup(&cfg, mapped)?,
        Workload::NetEcho => net::setup(&cfg, mapped)?,
        _ => {}
    }

    Line::new()
        .str("ferry-guest boot cpus=")
        .dec(u64::from(ncpus))
        .str(" mem_mib=")
        .dec(mem_mib)
        .str(" tsc_khz=")
        .dec(tsc_khz)
        .str(" workload=")
        .str(cfg.workload.name())
        .str(" wss_mib=")
        .dec(cfg.wss_mib)
        .str(" rate_mibs=")
        .dec(cfg.rate_mibs)
        .str(" hb_ms=")
        .dec(cfg.hb_ms)
        .str(" load_mib=")
        .dec(if cfg.workload.drives_device() { cfg.load_mib } else { 0 })
        .send();
    match cfg.workload {
        Workload::Dirty | Workload::Verify => {
            Line::new()
                .str("wss gpa=0x")
                .hex(wss_base)
                .str(" pages=")
                .dec(wss_pages)
                .send();
        }
        Workload::DiskLog => disk::print_info(),
        Workload::NetEcho => net::print_info(),
        Workload::Idle => {}
    }

    // SAFETY: the APs do not read SHARED before GO is released.
    let shared = &raw mut SHARED;
    unsafe {
        *shared = Shared {
            workload: cfg.workload,
            wss_cpus: if cfg.workload.drives_device() {
                u64::from(ncpus).saturating_sub(1).max(1)
            } else {
                u64::from(ncpus)
            },
            tsc_khz,
            hb_ticks: cfg.hb_ms * tsc_khz,
            spin_ticks: tsc_khz * 3 / 10,
            sec_ticks: tsc_khz * 1000,
            wss_base,
            wss_pages,
            rate_mibs: cfg.rate_mibs,
            rounds: cfg.rounds,
            reset_at: if cfg.reset_after_ms == 0 { 0 } else { rdtsc() + cfg.reset_after_ms * tsc_khz },
            has_deadline: info.has_tsc_deadline != 0,
            disk_rate: cfg.disk_rate,
            disk_flush: cfg.disk_flush,
        };
    }
    Ok(())
}

/// First 2 MiB-aligned address >= 16 MiB where `bytes` of contiguous RAM (merged adjacent RAM
/// entries, below `limit`) fit; `Err(largest candidate size)` otherwise.
fn find_wss(entries: &[MemmapEntry], limit: u64, bytes: u64) -> Result<u64, u64> {
    let mut ranges = [(0u64, 0u64); MAX_MEMMAP];
    let mut n = 0;
    for e in entries.iter().filter(|e| e.typ == 1 && e.size != 0) {
        ranges[n] = (e.addr, e.addr.saturating_add(e.size));
        n += 1;
    }
    let ranges = &mut ranges[..n];
    ranges.sort_unstable();
    let mut largest = 0;
    let mut i = 0;
    while i < ranges.len() {
        let (start, mut end) = ranges[i];
        i += 1;
        while i < ranges.len() && ranges[i].0 <= end {
            end = end.max(ranges[i].1);
            i += 1;
        }
        let base = start.max(WSS_MIN_START).next_multiple_of(WSS_ALIGN);
        let end = end.min(limit);
        if base >= end {
            continue;
        }
        if end - base >= bytes {
            return Ok(base);
        }
        largest = largest.max(end - base);
    }
    Err(largest)
}

// ------------------------------------------------------------------------------------------
// Workloads

fn run(cpu: usize) -> ! {
    let sh = shared();
    let st = percpu(cpu);
    let now = rdtsc();
    st.hb_counter = 1;
    st.next_hb = now;
    st.next_report = now + sh.sec_ticks;
    st.pace_base_tsc = now;
    st.pace_base_count = 0;
    st.pace_count = 0;
    let (start, end) = partition(sh, cpu);
    match sh.workload {
        Workload::DiskLog if cpu == 0 => disk::run(cpu, st, sh),
        Workload::NetEcho if cpu == 0 => net::run(cpu, st, sh),
        // `ferry.load_mib`: the other CPUs load the VM with writes while CPU 0 serves.
        Workload::DiskLog | Workload::NetEcho if start != end => dirty(cpu, st, sh, start, end),
        Workload::Idle | Workload::DiskLog | Workload::NetEcho => idle(cpu, st, sh),
        _ if start == end => idle(cpu, st, sh),
        Workload::Dirty => dirty(cpu, st, sh, start, end),
        Workload::Verify => verify(cpu, st, sh, start, end),
    }
}

/// Pages `[k*P/N, (k+1)*P/N)` of the working set belong to CPU k.
fn partition(sh: &Shared, cpu: usize) -> (u64, u64) {
    let k = if sh.workload.drives_device() {
        // CPU 0 serves the device; CPUs 1.. share the `ferry.load_mib` working set.
        if cpu == 0 || sh.wss_pages == 0 {
            return (0, 0);
        }
        cpu as u64 - 1
    } else {
        cpu as u64
    };
    (
        k * sh.wss_pages / sh.wss_cpus,
        (k + 1) * sh.wss_pages / sh.wss_cpus,
    )
}

fn heartbeat_if_due(cpu: usize, st: &mut PerCpu, sh: &Shared, now: u64) {
    if cpu == 0 && sh.reset_at != 0 && now >= sh.reset_at {
        Line::new().str("reset requested").send();
        sys_reset();
    }
    if st.next_hb > now.saturating_add(2 * sh.hb_ticks) {
        st.next_hb = now; // the TSC went backwards (e.g. restored on another host)
    }
    if now < st.next_hb {
        return;
    }
    let tsc = rdtsc();
    Line::new()
        .str("hb ")
        .dec(cpu as u64)
        .str(" ")
        .dec(st.hb_counter)
        .str(" ")
        .dec(tsc)
        .send();
    st.hb_counter += 1;
    st.next_hb += sh.hb_ticks;
    if st.next_hb <= tsc {
        st.next_hb = tsc + sh.hb_ticks;
    }
}

fn idle(cpu: usize, st: &mut PerCpu, sh: &Shared) -> ! {
    loop {
        heartbeat_if_due(cpu, st, sh, rdtsc());
        wait_until(sh, st.next_hb);
    }
}

/// Rate limit: the TSC at which write number `st.pace_count` is due (None = unlimited).
fn pace_due(st: &mut PerCpu, sh: &Shared, now: u64) -> Option<u64> {
    if sh.rate_mibs == 0 {
        return None;
    }
    // ticks per page = tsc_hz * N / (R * 256)
    let num = u128::from(sh.tsc_khz) * 1000 * u128::from(sh.wss_cpus);
    let den = u128::from(sh.rate_mibs) * 256;
    let n = u128::from(st.pace_count - st.pace_base_count);
    let due = st.pace_base_tsc + (n * num / den) as u64;
    if (now > due && now - due > sh.sec_ticks / 20) || due > now.saturating_add(sh.sec_ticks) {
        // more than 50 ms behind (stall, pause, migration): do not burst to catch up; or the
        // TSC went backwards
        st.pace_base_tsc = now;
        st.pace_base_count = st.pace_count;
        return Some(now);
    }
    Some(due)
}

/// Pages per batch between time checks: 64 when unlimited; ~10 ms worth (1..=256) when rate
/// limited, so a paced CPU sleeps ~100 times per second (each sleep costs an int3 round trip and
/// a timer interrupt, i.e. emulated ring-0 work) instead of after every page.
fn batch_pages(sh: &Shared) -> u64 {
    if sh.rate_mibs == 0 {
        64
    } else {
        (sh.rate_mibs * 256 / sh.wss_cpus / 100).clamp(1, 256)
    }
}

fn page_ptr(sh: &Shared, index: u64) -> *mut [u64; PAGE_WORDS] {
    (sh.wss_base + index * PAGE_SIZE) as *mut [u64; PAGE_WORDS]
}

fn dirty(cpu: usize, st: &mut PerCpu, sh: &Shared, start: u64, end: u64) -> ! {
    st.dirty_pos = start;
    st.dirty_round = 1;
    let batch = batch_pages(sh);
    loop {
        let now = rdtsc();
        heartbeat_if_due(cpu, st, sh, now);
        if now >= st.next_report || st.next_report > now.saturating_add(sh.sec_ticks) {
            Line::new()
                .str("dirty cpu=")
                .dec(cpu as u64)
                .str(" rounds=")
                .dec(st.dirty_round - 1)
                .str(" mib=")
                .dec(st.pace_count / 256)
                .send();
            st.next_report = rdtsc() + sh.sec_ticks;
        }
        if sh.rounds != 0 && st.dirty_round > sh.rounds {
            // Done writing: behave like idle (sleep until the next heartbeat or report).
            wait_until(sh, st.next_hb.min(st.next_report));
            continue;
        }
        if let Some(due) = pace_due(st, sh, now) {
            if due > now {
                wait_until(sh, due.min(st.next_hb));
                continue;
            }
        }
        for i in 0..batch {
            if i % 16 == 15 {
                heartbeat_if_due(cpu, st, sh, rdtsc());
            }
            // SAFETY: the page is inside this CPU's partition of the working set (RAM).
            unsafe {
                page_ptr(sh, st.dirty_pos)
                    .cast::<u64>()
                    .write_volatile(st.dirty_round)
            };
            st.pace_count += 1;
            st.dirty_pos += 1;
            if st.dirty_pos == end {
                st.dirty_pos = start;
                st.dirty_round += 1;
                if sh.rounds != 0 && st.dirty_round > sh.rounds {
                    break;
                }
            }
        }
    }
}

/// The working set as seen by the verifier.
struct Wss<'a>(&'a Shared);

impl Pages for Wss<'_> {
    #[inline(always)]
    fn page(&mut self, index: u64) -> &mut [u64; PAGE_WORDS] {
        // Compiler barrier: page contents must really be re-read from memory (the host may have
        // replaced them, e.g. a migration), never forwarded from earlier stores.
        // SAFETY: empty asm.
        unsafe { asm!("", options(nostack, preserves_flags)) };
        // SAFETY: the page is inside this CPU's partition (RAM, identity mapped, used by no one
        // else) and only one page reference is alive at a time.
        unsafe { &mut *page_ptr(self.0, index) }
    }
}

fn verify(cpu: usize, st: &mut PerCpu, sh: &Shared, start: u64, end: u64) -> ! {
    let mut wss = Wss(sh);
    st.verify_init_pos = start;
    while st.verify_init_pos < end {
        let stop = (st.verify_init_pos + 64).min(end);
        while st.verify_init_pos < stop {
            Verifier::init_page(&mut wss, st.verify_init_pos);
            st.verify_init_pos += 1;
        }
        heartbeat_if_due(cpu, st, sh, rdtsc());
    }
    st.verify = Verifier::after_init(start, end);
    let pages = end - start;
    let batch = batch_pages(sh);
    let now = rdtsc();
    st.pace_base_tsc = now;
    st.pace_base_count = st.pace_count;
    loop {
        let now = rdtsc();
        heartbeat_if_due(cpu, st, sh, now);
        if let Some(due) = pace_due(st, sh, now) {
            if due > now {
                wait_until(sh, due.min(st.next_hb));
                continue;
            }
        }
        for i in 0..batch {
            if i % 16 == 15 {
                // Heartbeats stay on time within a batch too (the gap a migration leaves in
                // them should measure the pause, not the batch length).
                heartbeat_if_due(cpu, st, sh, rdtsc());
            }
            let mut errors = 0;
            let mut printed = st.verify_sweep_printed;
            let sweep_done = st.verify.step(&mut wss, |page, expected, found| {
                errors += 1;
                if printed < MAX_CORRUPT_LINES_PER_SWEEP {
                    printed += 1;
                    report_corrupt(cpu, page, expected, found);
                }
            });
            st.verify_sweep_printed = printed;
            st.verify_sweep_errors += errors;
            st.pace_count += 1;
            if sweep_done {
                st.verify_sweeps += 1;
                let gen = st.verify.writer.gen;
                if st.verify_sweep_errors != 0 {
                    Line::new()
                        .str("verify bad gen=")
                        .dec(gen)
                        .str(" pages=")
                        .dec(pages)
                        .str(" cpu=")
                        .dec(cpu as u64)
                        .str(" errors=")
                        .dec(st.verify_sweep_errors)
                        .send();
                } else {
                    let now = rdtsc();
                    if st.verify_last_ok == 0 || now.wrapping_sub(st.verify_last_ok) >= sh.hb_ticks
                    {
                        st.verify_last_ok = now;
                        Line::new()
                            .str("verify ok gen=")
                            .dec(gen)
                            .str(" pages=")
                            .dec(pages)
                            .str(" cpu=")
                            .dec(cpu as u64)
                            .str(" sweeps=")
                            .dec(st.verify_sweeps)
                            .send();
                    }
                }
                st.verify_sweep_errors = 0;
                st.verify_sweep_printed = 0;
            }
        }
    }
}

#[cold]
fn report_corrupt(cpu: usize, page: u64, expected: u64, found: Found) {
    Line::new()
        .str("verify CORRUPT page=")
        .dec(page)
        .str(" cpu=")
        .dec(cpu as u64)
        .str(" expected_gen=")
        .dec(expected)
        .str(" found_gen=")
        .dec(found.gen)
        .str(" found_index=")
        .dec(found.index)
        .str(" checksum=")
        .str(if found.checksum_ok { "ok" } else { "bad" })
        .send();
}

// ------------------------------------------------------------------------------------------
// Panic handler and the C memory functions the compiler expects (ring 3 only).

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    use core::fmt::Write;
    let mut l = Line::new();
    l.str("PANIC cpu=")
        .dec(current_cpu() as u64)
        .str(" rust panic");
    if let Some(loc) = info.location() {
        l.str(" at ")
            .str(loc.file())
            .str(":")
            .dec(u64::from(loc.line()));
    }
    let _ = write!(l, ": {}", info.message());
    l.send();
    sys_halt()
}

/// Referenced by the prebuilt `core` (built with unwinding); never called with panic=abort.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {
    sys_halt()
}

/// # Safety
/// C `memcpy`.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
         options(nostack, preserves_flags));
    dst
}

/// # Safety
/// C `memmove`.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // no overlap, or dst below src: forward copy is safe
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    } else {
        asm!("std", "rep movsb", "cld",
             inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
             options(nostack));
    }
    dst
}

/// # Safety
/// C `memset`.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8,
         options(nostack, preserves_flags));
    dst
}

/// # Safety
/// C `memcmp`.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        let (x, y) = (a.add(i).read_volatile(), b.add(i).read_volatile());
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// C `bcmp`.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    memcmp(a, b, n)
}
