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
//! 2. `_start32` first copies what it needs from start_info into [`boot::BootInfo`] (magic, version,
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
//!    halt. Every CPU then `iretq`s to ring 3: [`entry::user_main`]`(cpu, &BOOT_INFO)` on its own
//!    128 KiB stack (RSP % 16 == 8 at entry), RFLAGS = IF|IOPL3|0x2. Ring 3 reaches its ports
//!    (COM1, the i8042) through the TSS I/O permission bitmap *and* IOPL 3: PVM honours only
//!    the bitmap; QEMU's TCG (the CPU of the nested SVM test host) honours the bitmap only while
//!    the cached TR type is 9 (available), and after any KVM_SET_SREGS on SVM it is 11 (busy,
//!    as KVM reports it), so a restored or migrated vCPU there keeps its port access only
//!    through IOPL 3.
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
//!
//! ## Source files
//! `boot.S` is all of ring 0; `boot.rs` includes it and holds what ring 0 and ring 3 share
//! (`BootInfo`, the serial lock, layout constants). Ring 3: `entry.rs` (entry of every CPU,
//! boot checks on the BSP), `rt.rs` (TSC, COM1 output, system calls, waiting), `state.rs`
//! (shared configuration and per-CPU state), `heartbeat.rs`, `workload.rs` (dispatch, idle,
//! pacing), `dirty.rs`, `verify.rs` (with the page logic in `verify_logic.rs`), `disk.rs` +
//! `disklog.rs` (disk-log), `net.rs` + `netpkt.rs` (net-echo), `virtio.rs` + `virtq.rs`
//! (virtio-mmio drivers), `cmdline.rs`, `line.rs` (output lines), `lang.rs` (panic handler and
//! the C memory functions).

#![no_std]
#![no_main]

mod boot;
mod cmdline;
mod dirty;
mod disk;
mod disklog;
mod entry;
mod heartbeat;
mod lang;
mod line;
mod net;
mod netpkt;
mod rt;
mod state;
mod verify;
mod verify_logic;
mod virtio;
mod virtq;
mod workload;

const PAGE_SIZE: u64 = 4096;
const MIB: u64 = 1 << 20;
