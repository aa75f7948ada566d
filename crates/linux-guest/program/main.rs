//! # ferry-linux-guest
//!
//! The workloads of Ferry's test guest (`crates/guest/kernel`) as a static Linux userspace
//! program, with the same command line options and the same output lines, so the checks the
//! tests make on the test guest's serial log (`crates/worker/tests/common/mod.rs`: `Log::parse`,
//! `assert_hb_continuous`, `assert_no_corruption`, `verify_ok_cpus`, `switchover_gaps_ms`, the
//! disk-log checks) apply unchanged to a stock Linux guest running it. Built by
//! `crates/linux-guest/build.rs` (direct `rustc`, `+crt-static`: no shared libraries needed).
//!
//! ## Modes
//! - Guest: without `FERRY_CMDLINE` in the environment it reads the options from
//!   `/proc/cmdline`. The initramfs `/init` (a busybox shell script, `testbed::initramfs`)
//!   mounts proc/sys/dev, loads the modules, configures eth0 from `ferry.ip`/`ferry.mac` and
//!   runs this program with the console as standard output. /init stays PID 1, so a failure
//!   of this program is reported on the console (`PANIC ferry-linux-guest exited ...`) instead
//!   of as a kernel panic, and `ferry.reset_after_ms` restarts the machine (reboot(2)).
//! - Process (tests): with `FERRY_CMDLINE=<options>` it takes the options from there instead;
//!   `ferry.reset_after_ms` then ends the process with exit status 100 instead of restarting the
//!   machine. Everything else is the same.
//!
//! Output goes to standard output, one `write(2)` per line (never interleaved).
//!
//! ## Options
//! The test guest's parser (`cmdline.rs`, included unchanged): same keys, values, defaults and
//! `PANIC bad cmdline: <item> (<reason>)` errors (then it exits with status 1). In Linux:
//! - `ferry.workload`, `ferry.wss_mib`, `ferry.rate_mibs`, `ferry.hb_ms`, `ferry.rounds`,
//!   `ferry.load_mib`, `ferry.disk_rate`: as in the test guest. The CPUs are the ones in the
//!   process's affinity mask (all online CPUs for a guest), numbered 0..N-1 in that order;
//!   there is one thread per CPU, pinned to it (sched_setaffinity).
//! - `ferry.tsc_khz`: as in the test guest; else measured against CLOCK_MONOTONIC (50 ms).
//! - `ferry.reset_after_ms`: see Modes.
//! - `ferry.disk_flush=<n>`: every record is written with O_DSYNC already (durable when
//!   acknowledged); n > 0 adds an fdatasync and `disk flush seq=<s>` after every n-th record.
//! - `ferry.ip`: required by net-echo as in the test guest; /init assigns it to eth0 (with an
//!   on-link default route, so like the test guest it answers whoever asks). `ferry.mac`: /init
//!   sets it as eth0's address (the test guest uses it only if the device has no MAC).
//! - `virtio_mmio.device=`: parsed (checked) and otherwise left to the kernel.
//! - Linux only (`opts.rs`; the test guest ignores them): `ferry.disk=<path>` (disk-log
//!   device, default /dev/vda) and `ferry.udp_port=<port>` (net-echo, default 7). The test guest
//!   echoes UDP on every port; a Linux socket echoes on one.
//!
//! ## Output (the test guest's formats unless said otherwise)
//! 1. `ferry-guest boot cpus=<N> mem_mib=<MemTotal MiB> tsc_khz=<K> workload=<w> wss_mib=<W>
//!    rate_mibs=<R> hb_ms=<H> load_mib=<L> os=linux` (`os=linux` is extra).
//! 2. Linux only, when there is a working set: `linux-wss va=0x<hex> pages=<P> pid=<pid>
//!    locked=<0|1>`: page `i` is at virtual address `va + 4096 * i` of process `pid`
//!    (anonymous memory, populated and mlock'd; `locked=0` if mlock failed), then, if the
//!    kernel tells it (/proc/self/pagemap, as root), `linux-wss-phys page=0 pa=0x<hex>`: the
//!    guest-physical address of page 0 (mlock'd, so it stays there). disk-log:
//!    `linux-disk path=<p> sectors=<n> direct=<0|1>` (direct=0: the file system refused
//!    O_DIRECT, O_DSYNC still holds).
//! 3. `hb <cpu> <counter> <tsc>` every `hb_ms` on every CPU; counter 1, 2, ...; tsc = rdtsc.
//!    After a stall longer than one period the cadence restarts. Linux only: when two
//!    consecutive heartbeats of a CPU are more than 2 `hb_ms` apart, right after the second one
//!    `pause cpu=<k> ms=<gap by CLOCK_MONOTONIC> tsc_ms=<gap by TSC> hb=<its counter>` (the hb
//!    line cannot carry the monotonic time: the tests' parser wants exactly 4 fields).
//! 4. idle / dirty / verify: as in the test guest (`dirty cpu=..`, `verify ok gen=.. pages=..
//!    cpu=.. sweeps=..`, `verify CORRUPT page=.. cpu=.. expected_gen=.. found_gen=..
//!    found_index=.. checksum=ok|bad`, `verify bad gen=.. pages=.. cpu=.. errors=..`), same
//!    partitions, same algorithm (`verify_logic.rs`, included unchanged), pacing in wall-clock
//!    time.
//! 5. disk-log (CPU 0): `disk ok last=<N>` / `disk CORRUPT at=<sector>`, then `disk seq=<s>`
//!    after each record is durable, `disk flush seq=<s>`, `disk full last=<N>`; errors are
//!    `disk ERROR seq=<s> errno=<errno> (<text>)` (errno instead of a virtio status byte).
//! 6. net-echo (CPU 0): `net up mac=<eth0's MAC or none> ip=<ferry.ip> udp_port=<port>`, then
//!    once a second if something changed `net rx=<datagrams received> tx=<sent> icmp=<the
//!    kernel's ICMP echo replies since start> udp=<UDP replies>` (no `arp=`: the kernel answers
//!    ARP and does not count it).
//! 7. `PANIC <reason>` at boot (then exit status 1); `PANIC cpu=<k> rust panic at
//!    <file>:<line>: <msg>` from a CPU's thread (that CPU stops, the others go on).

mod boot;
mod disk;
mod hb;
mod net;
mod opts;
mod out;
mod sys;
mod work;

#[path = "../../guest/kernel/cmdline.rs"]
#[allow(dead_code)]
mod cmdline;
#[path = "../../guest/kernel/disklog.rs"]
#[allow(dead_code)]
mod disklog;
#[path = "../../guest/kernel/verify_logic.rs"]
mod verify_logic;

fn main() {
    boot::main()
}
