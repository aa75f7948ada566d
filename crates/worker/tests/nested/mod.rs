//! The nested SVM test host: an "L1" Linux (Debian's stock kernel, busybox) booted under
//! QEMU's software emulator with an emulated AMD CPU that has SVM and nested paging, so its
//! `kvm_amd` gives Ferry an ordinary KVM — unlike this machine's own PVM KVM. Ferry's binaries
//! run inside; a scenario is a shell script run by L1's `/init`; results leave L1 through its
//! serial console as marked lines and files.
//!
//! ```text
//! FERRY-RESULT <key> <value...>
//! FERRY-FILE-BEGIN <path> … FERRY-FILE-END <path>
//! FERRY-DONE
//! ```
//! The Debian packages come from `scripts/nested/prepare.sh` (downloaded once, cached).
#![allow(dead_code)]

pub mod linux;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What L1 printed, split up.
pub struct L1Output {
    pub console: String,
    pub results: BTreeMap<String, String>,
    pub files: BTreeMap<String, String>,
    pub done: bool,
    pub seconds: f64,
    /// QEMU's own log (`-d cpu_reset,guest_errors`): the emulated CPU's full state at every
    /// reset, so an L1 that triple-faulted shows where (L1 runs with `nokaslr`: RIPs are
    /// System.map addresses).
    pub qemu_log: String,
    /// L1 stopped printing its sign of life (`FERRY-ALIVE`, every 5 s) for [`SILENT_LIMIT`].
    pub wedged: bool,
    /// Set when the test host itself failed (see [`host_failure`]): L1's kernel locked up or
    /// the emulated machine stopped without finishing the scenario.
    pub host_failure: Option<String>,
}

impl L1Output {
    pub fn result(&self, key: &str) -> &str {
        self.results
            .get(key)
            .map(|s| s.as_str())
            .unwrap_or_else(|| panic!("L1 reported no {key}:\n{}", self.tail(60)))
    }

    pub fn file(&self, path: &str) -> &str {
        self.files
            .get(path)
            .map(|s| s.as_str())
            .unwrap_or_else(|| panic!("L1 sent no file {path}:\n{}", self.tail(60)))
    }

    /// The end of L1's KVM trace (sent by `stop_here`), or a note that there is none.
    pub fn kvm_trace(&self) -> &str {
        self.files
            .get("/tmp/kvm-trace")
            .map(|s| s.as_str())
            .unwrap_or("(L1 sent no KVM trace)")
    }

    /// The last `n` lines of L1's console; for an L1 that did not finish, also the end of
    /// QEMU's log (a reset of the emulated CPU, with its registers, is logged there).
    pub fn tail(&self, n: usize) -> String {
        let l: Vec<&str> = self.console.lines().collect();
        let mut t = l[l.len().saturating_sub(n)..].join("\n");
        if !self.done {
            let q: Vec<&str> = self.qemu_log.lines().collect();
            t.push_str("\n--- QEMU log (end) ---\n");
            t.push_str(&q[q.len().saturating_sub(60)..].join("\n"));
        }
        t
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The cache with the L1 kernel, modules and busybox (prepared on first use).
pub fn cache() -> PathBuf {
    testbed::initramfs::nested_cache().unwrap_or_else(|e| panic!("nested cache: {e}"))
}

/// Shared libraries `bin` needs (by `ldd`), with the loader.
fn libraries(bin: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(bin).output().expect("ldd");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(PathBuf::from)
        })
        .collect()
}

const PRELUDE: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev; mount -t tmpfs tmp /tmp
# kvm-amd's module parameters may come from L1's command line (ferry.kvm_amd=npt=0,avic=0).
KVM_AMD="$(sed -n 's/.*ferry\.kvm_amd=\([^ ]*\).*/\1/p' /proc/cmdline | tr , ' ')"
for m in irqbypass kvm ccp; do insmod /mods/$m.ko || echo "FERRY-RESULT insmod-failed $m"; done
insmod /mods/kvm-amd.ko $KVM_AMD || echo "FERRY-RESULT insmod-failed kvm-amd $KVM_AMD"
ip link set lo up
result() { echo "FERRY-RESULT $*"; }
# A sign of life every 5 s: an L1 that stops printing it has stopped (nested::L1::wait).
# It ends at the first `dump` (files are sent at the end), so that it never lands inside one.
( while :; do echo "FERRY-ALIVE $(cut -d' ' -f1 /proc/uptime)"; sleep 5; done ) &
ALIVE=$!
send() { echo "FERRY-FILE-BEGIN $1"; cat "$1"; echo; echo "FERRY-FILE-END $1"; }
# The first `dump` also ends the shutdown watcher below (waiting for a file it is sending).
dump() {
  [ -n "$ALIVE" ] && { kill $ALIVE 2>/dev/null; ALIVE=; }
  [ -z "$FINAL" ] && { FINAL=1; touch /tmp/.final; until mkdir /tmp/.sending 2>/dev/null; do sleep 0.2; done; }
  send "$1"
}
# L1's KVM traces every exit of its guests (with the guest's RIP and exit information; SVM
# clears a vCPU's state on a shutdown exit, so this is the only record of where a guest
# triple-faulted), injected exceptions and interrupts, CR and MSR writes, into a ring of
# 2 MiB per CPU; `kvm_trace_dump` sends its last lines (/tmp/kvm-trace).
T=/sys/kernel/tracing
mount -t tracefs nodev $T 2>/dev/null
if [ -d $T/events/kvm ] && ! grep -q ferry.trace=0 /proc/cmdline; then
  echo 2048 > $T/buffer_size_kb
  for e in kvm_exit kvm_inj_exception kvm_inj_virq kvm_cr kvm_msr kvm_nested_vmexit_inject; do
    [ -e $T/events/kvm/$e/enable ] && echo 1 > $T/events/kvm/$e/enable
  done
  # A shutdown exit (SVM_EXIT_SHUTDOWN) stops the trace at once: what led to it stays in the ring.
  echo 'traceoff if exit_reason == 127' > $T/events/kvm/kvm_exit/trigger 2>/dev/null && TRIGGER=1
  echo 1 > $T/tracing_on
fi
# The trace sent: the 60 exits before each shutdown still in the ring (a vCPU that died minutes
# before the step that failed, e.g. a migration source), the last 20 events of each vCPU thread
# that shut down (its own, whatever other threads did meanwhile), then the last 400 lines.
kvm_trace_file() { echo 0 > $T/tracing_on; cat $T/trace > /tmp/kvm-all; {
  grep -B 60 "reason shutdown" /tmp/kvm-all | tail -n 600
  echo "-- each vCPU thread that shut down: its own last events --"
  for th in $(grep "reason shutdown" /tmp/kvm-all | awk '{print $1}' | sort -u | tail -n 4); do
    grep -E "^ *$th " /tmp/kvm-all | grep -B 20 "reason shutdown" | tail -n 21
  done
  echo "-- the last 400 lines --"; tail -n 400 /tmp/kvm-all; } > /tmp/kvm-trace; rm -f /tmp/kvm-all; }
kvm_trace_dump() { [ -e $T/trace ] && { kvm_trace_file; dump /tmp/kvm-trace; }; }
# The shutdown watcher: once the trigger has stopped the trace, the trace is sent while the
# scenario runs on (`kvm-shutdown-seen N` first), and tracing goes on. nested::L1::wait reads
# it at once: a known signature of the emulator failing ends this L1 then, not when a step
# that waits for the dead guest times out. Its lines may land inside others' (parse mends them).
if [ -n "$TRIGGER" ]; then
  ( n=0; while [ ! -e /tmp/.final ]; do
      sleep 2
      [ "$(cat $T/tracing_on)" = 0 ] || continue
      until mkdir /tmp/.sending 2>/dev/null; do sleep 0.2; done
      [ -e /tmp/.final ] && { rmdir /tmp/.sending; break; }
      n=$((n+1)); kvm_trace_file; result kvm-shutdown-seen $n; send /tmp/kvm-trace
      echo 1 > $T/tracing_on; rmdir /tmp/.sending
    done ) &
fi
# stop_here STEP: reports STEP failed, sends every existing file of $FILES (globs allowed) and
# the KVM trace, and powers L1 off (a two-host bed tells its peer first, and gives it time).
stop_here() {
  result "$1" failed
  local linger=0
  [ -d /tmp/www ] && { signal failed; linger=8; }
  for f in $FILES; do [ -e $f ] && dump $f; done
  kvm_trace_dump
  echo FERRY-DONE; sleep $linger; poweroff -f
}
# wait_for FILE PATTERN COUNT SECONDS [PID]: until FILE has COUNT lines matching PATTERN
# (fails at once on a PANIC in FILE, or when process PID has ended). SECONDS is wall time
# (under TCG one grep of a long log can take longer than the poll interval), and a timeout
# says what it waited for.
wait_for() {
  local end=$(( $(date +%s) + $4 )) w=0 n
  while :; do
    n=$(grep -c "$2" "$1" 2>/dev/null); n=${n:-0}
    [ "$n" -ge "$3" ] && return 0
    [ "$(date +%s)" -ge $end ] && { echo "FERRY-RESULT wait-timeout $1 $2: $n of $3 after $4 s"; return 1; }
    grep -q PANIC "$1" 2>/dev/null && return 1
    [ -n "$5" ] && ! kill -0 "$5" 2>/dev/null && { n=$(grep -c "$2" "$1" 2>/dev/null); [ "${n:-0}" -ge "$3" ] && return 0; echo "FERRY-RESULT wait-ended $1: process $5 exited"; return 1; }
    w=$((w+1)); [ -n "$PEER" ] && [ $((w % 30)) = 0 ] && peer_failed && return 1
    sleep 0.1
  done
}
# gone PID SECONDS: waits until process PID has exited (killed with SIGKILL after SECONDS).
gone() {
  local end=$(( $(date +%s) + $2 ))
  while kill -0 "$1" 2>/dev/null; do
    [ "$(date +%s)" -ge $end ] && { echo "FERRY-RESULT gone-timeout pid $1"; kill -9 "$1"; return 1; }
    sleep 0.1
  done
  return 0
}
# Two-host beds: `net_up ADDR` brings up eth0 (virtio-net on QEMU's datagram link) and serves
# /tmp/www over HTTP on port 8000; `signal NAME` publishes a step there, `await HOST NAME
# SECONDS` waits for the other host's.
net_up() {
  for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net; do insmod /mods/$m.ko 2>/dev/null; done
  local w=0; while [ ! -e /sys/class/net/eth0 ]; do w=$((w+1)); [ $w -gt 100 ] && return 1; sleep 0.1; done
  ip addr add $1/24 dev eth0 && ip link set eth0 up || return 1
  mkdir -p /tmp/www; httpd -p $1:8000 -h /tmp/www
}
# A host that fails signals `failed`; waits on the other host ($PEER) end when they see it.
signal() { echo "${2:-1}" > /tmp/www/$1; }
peer_failed() { wget -q -O /dev/null http://$PEER:8000/failed 2>/dev/null; }
await() {
  local w=0
  while ! wget -q -O /tmp/await.$2 http://$1:8000/$2 2>/dev/null; do
    w=$((w+1)); [ $w -gt $(($3*2)) ] && { echo "FERRY-RESULT await-$2 timed out"; return 1; }
    sleep 0.5
    [ -n "$PEER" ] && peer_failed && { echo "FERRY-RESULT await-$2 peer failed"; return 1; }
  done
  return 0
}
[ -e /dev/kvm ] && result kvm present || result kvm missing
# Where L1's KVM enters its guests (__svm_vcpu_run's section): see nested::host_failure.
result kvm-amd-noinstr "$(cat /sys/module/kvm_amd/sections/.noinstr.text 2>/dev/null)"
result cpu "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
result kvm-trigger "$(grep -v '^#' $T/events/kvm/kvm_exit/trigger 2>/dev/null)"
cd /tmp
"#;

/// How an L1 host is booted.
#[derive(Clone, Debug)]
pub struct L1Opts {
    pub smp: u32,
    pub memory_mib: u32,
    /// Extra binaries for /bin (with their shared libraries); `ferry-vmm` is always there.
    pub bins: Vec<PathBuf>,
    /// A NIC (virtio-net-pci, `eth0` inside) on a QEMU datagram link: frames go from the unix
    /// socket `local` to `remote` (the other host's `local`). MAC as given.
    pub link: Option<Link>,
    /// Appended to the L1 kernel command line (the scenario reads it from /proc/cmdline).
    pub append: String,
}

#[derive(Clone, Debug)]
pub struct Link {
    pub local: PathBuf,
    pub remote: PathBuf,
    pub mac: String,
}

impl Default for L1Opts {
    fn default() -> Self {
        L1Opts {
            smp: 2,
            memory_mib: 2048,
            bins: Vec::new(),
            link: None,
            append: String::new(),
        }
    }
}

/// The TSC frequency of this (outer) machine, which is also the frequency of an L1's TSC:
/// QEMU's TCG reads the host's TSC for the guest's RDTSC. L1 is told it (`tsc_early_khz`)
/// because its own calibration against the emulated PIT/HPET is as wrong as the host is busy
/// (seen: 898627 kHz on a 2596 MHz machine), and its KVM hands that frequency to the guests.
fn outer_tsc_khz() -> u32 {
    let kvm = vmm::open_kvm().expect("/dev/kvm");
    vmm::host::HostTsc::read(&kvm).expect("KVM_GET_TSC_KHZ").khz
}

/// A running L1 host.
pub struct L1 {
    qemu: std::process::Child,
    console: PathBuf,
    qemu_log: PathBuf,
    t0: Instant,
    _dir: tempfile::TempDir,
}

fn add_binary(ir: &Path, bin: &Path) {
    let name = bin.file_name().unwrap();
    std::fs::copy(bin, ir.join("bin").join(name)).unwrap();
    let _ = Command::new("strip")
        .arg(ir.join("bin").join(name))
        .status();
    for lib in libraries(bin) {
        let dst = ir.join(lib.strip_prefix("/").unwrap());
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(&lib, &dst).unwrap();
    }
}

/// Boots L1 with `scenario` (a shell script, run after [`PRELUDE`]) and `files` (path inside
/// L1 → file here), waits up to `timeout` for `FERRY-DONE`, and returns what it printed.
pub fn run_l1(scenario: &str, files: &[(&str, &Path)], timeout: Duration) -> L1Output {
    run_l1_with(scenario, files, &L1Opts::default(), timeout)
}

/// How many times a scenario is started when the test host fails under it. Eight: a CI run of
/// 2026-12-02 saw the emulator fail three L1 runs of `nested_host` in a row (16-23 s in, each a
/// guest entered with L1's RIP), two runs of 2026-12-03 five in a row, where on a quiet
/// machine one run in five to ten fails. Bounded in time too: see [`HOST_RETRY_BUDGET`].
pub const HOST_ATTEMPTS: usize = 8;

/// No fresh L1 is started for a test once its runs have taken this long (the CI run's time is
/// bounded; a host failing this often fails the test with its evidence).
pub const HOST_RETRY_BUDGET: Duration = Duration::from_secs(20 * 60);

/// [`run_l1`] with `opts`. A run in which the test host itself failed (QEMU's emulated machine,
/// not Ferry: see [`host_failure`]) is reported on stderr with its evidence and run again in a
/// fresh L1, up to [`HOST_ATTEMPTS`] runs. A guest triple fault without a known signature is
/// printed with the trace before it and given one more run, once: a second fails the test. The
/// last run's output is returned whatever it says.
pub fn run_l1_with(
    scenario: &str,
    files: &[(&str, &Path)],
    opts: &L1Opts,
    timeout: Duration,
) -> L1Output {
    let mut attempt = 1;
    let mut unexplained = 0;
    let t0 = Instant::now();
    loop {
        let out = L1::boot(scenario, files, opts).wait(timeout);
        match &out.host_failure {
            Some(why) if attempt < HOST_ATTEMPTS && t0.elapsed() < HOST_RETRY_BUDGET => {
                report_host_failure(attempt, why, &out);
                attempt += 1;
            }
            Some(_) => {
                eprintln!(
                    "nested: attempt {attempt}: the test host failed again; no more attempts \
                     ({} s of L1 runs, at most {HOST_ATTEMPTS} runs or {} s)",
                    t0.elapsed().as_secs(),
                    HOST_RETRY_BUDGET.as_secs()
                );
                return out;
            }
            None => {
                let Some(evidence) = guest_triple_fault(&out) else {
                    return out;
                };
                unexplained += 1;
                eprintln!(
                    "nested: attempt {attempt}: a guest triple-faulted and the test host's trace \
                     shows none of the emulator's known signatures ({evidence}). The exits \
                     before each shutdown:\n{}",
                    shutdown_context(&out)
                );
                if unexplained > 1 || attempt >= HOST_ATTEMPTS {
                    eprintln!("nested: the second unexplained guest triple fault fails the test");
                    return out;
                }
                eprintln!(
                    "nested: running it once more in a fresh L1 (a second one fails the test)"
                );
                attempt += 1;
            }
        }
    }
}

/// The line of a finished scenario that says a worker's VM triple-faulted, if a step failed.
/// Neither guest triple-faults by itself (the test guest cannot take an exception it cannot
/// deliver; Linux panics), every restore reads its state back, and the traced triple faults of
/// these test hosts were the emulator's (docs/NESTED.md); but one whose trace matches no known
/// signature is only given one more fresh L1 (see [`run_l1_with`]), never more.
pub fn guest_triple_fault(out: &L1Output) -> Option<String> {
    if !out.results.values().any(|v| v == "failed") {
        return None;
    }
    out.files.iter().find_map(|(name, body)| {
        body.lines()
            .find(|l| l.contains("triple-faulted"))
            .map(|l| format!("{name}: {}", l.trim()))
    })
}

/// The part of the KVM trace sent before the last 400 lines: the exits before each shutdown.
fn shutdown_context(out: &L1Output) -> String {
    let trace = out
        .files
        .get("/tmp/kvm-trace")
        .map(String::as_str)
        .unwrap_or("");
    let ctx = trace.split("-- the last 400 lines --").next().unwrap_or("");
    let (before, own) = match ctx.split_once("-- each vCPU thread that shut down") {
        Some((b, o)) => (b, format!("-- each vCPU thread that shut down{o}")),
        None => (ctx, String::new()),
    };
    let lines: Vec<&str> = before.lines().collect();
    let own: Vec<&str> = own.lines().take(100).collect();
    format!(
        "{}\n{}",
        lines[lines.len().saturating_sub(60)..].join("\n"),
        own.join("\n")
    )
}

/// Prints a failed test host's evidence (the run is then repeated).
pub fn report_host_failure(attempt: usize, why: &str, out: &L1Output) {
    eprintln!(
        "nested: attempt {attempt}: the test host failed after {:.0} s ({why}); \
         starting a fresh L1. Its console (end):\n{}",
        out.seconds,
        out.tail(40)
    );
}

/// Lines of L1's own kernel that say the emulated machine stopped making progress.
const HOST_LOCKUP: [&str; 5] = [
    "watchdog: BUG: soft lockup",
    "rcu: INFO: rcu_preempt self-detected stall",
    "rcu: INFO: rcu_preempt detected stalls",
    // L1's own kernel stack overflowed in page-fault entry (CI, 2026-12-02: `vcpu0`, L1's KVM
    // thread, at `exc_page_fault+0x15`, a page fault taken at every entry of its handler).
    "BUG: TASK stack guard page was hit",
    // The panic that overflow ends in; seen alone as well (CI, 2026-12-03: `vcpu0` returning
    // from a futex call, no guard-page report before it). A userspace process in L1 cannot
    // corrupt L1's kernel stack: this is the emulated machine failing.
    "Kernel panic - not syncing: corrupted stack end detected inside scheduler",
];

/// Whether an L1 run failed in the test host rather than in what it tested:
/// - L1's kernel reported a soft lockup or an RCU stall (seen under QEMU 7.2's TCG with both L1
///   CPUs idle for minutes right after a restore), or that its own stack overflowed in page-fault
///   entry;
/// - a guest vCPU exited at a RIP inside L1's own `kvm_amd` entry code (its `.noinstr.text`,
///   where `__svm_vcpu_run` executes VMRUN): the emulated CPU entered the guest with the host's
///   RIP — the instruction after L1's VMRUN — instead of the guest's (seen right after L1's
///   KVM handled a nested page fault; the guest then faults on that address and
///   triple-faults). No guest can choose that address, and real CPUs do not do this;
/// - L1 stopped printing its sign of life for [`SILENT_LIMIT`] (seen: both L1 CPUs busy in
///   QEMU for minutes, nothing on the console, no lockup report — the watchdog's timer did not
///   run either; QEMU's monitor then reports the CPUs' registers into the log);
/// - a shutdown of the test guest while delivering a page fault, where the scenario runs only
///   the test guest ([`test_guest_page_fault`]);
/// - a shutdown delivering an instruction-fetch page fault at the RIP a vCPU was just resumed
///   at, in the page it had executed from ([`fetch_fault_on_resume`]);
/// - a shutdown delivering an event (an interrupt or an exception) at the very RIP a vCPU was
///   resumed at, where the same vCPU thread had taken interrupts before
///   ([`delivery_fault_on_resume`]);
/// - QEMU exited without the scenario finishing and without L1's kernel saying why (a reset of
///   the emulated machine: `-no-reboot` ends QEMU on it; a scenario that ended `/init` makes
///   the kernel say "Attempted to kill init").
pub fn host_failure(out: &L1Output, qemu_exited: bool) -> Option<String> {
    // A finished scenario without a failed step passed, whatever its trace shows (the shutdown
    // watcher sends one for any shutdown exit).
    if out.done && !out.results.values().any(|v| v == "failed") {
        return None;
    }
    if let Some(why) = trace_signature(out) {
        return Some(why);
    }
    if out.done {
        return None;
    }
    if out.wedged {
        return Some(format!(
            "L1 printed no sign of life for {} s (its CPUs are in QEMU's log)",
            SILENT_LIMIT.as_secs()
        ));
    }
    if let Some(l) = out
        .console
        .lines()
        .find(|l| HOST_LOCKUP.iter().any(|m| l.contains(m)))
    {
        return Some(format!("L1's kernel: {}", l.trim()));
    }
    if qemu_exited && !out.console.contains("Kernel panic") {
        return Some("the emulated machine stopped (reset) before the scenario finished".into());
    }
    None
}

/// The emulator's signatures that the KVM trace L1 sent shows, if any (see [`host_failure`]).
/// [`L1::wait`] asks as soon as the shutdown watcher has sent a trace.
pub fn trace_signature(out: &L1Output) -> Option<String> {
    host_rip_in_guest(out)
        .or_else(|| test_guest_page_fault(out))
        .or_else(|| fetch_fault_on_resume(out))
        .or_else(|| delivery_fault_on_resume(out))
}

/// A `kvm_exit` of L1's trace whose guest RIP lies in L1's `kvm_amd` entry code (see
/// [`host_failure`]).
fn host_rip_in_guest(out: &L1Output) -> Option<String> {
    let base = out.results.get("kvm-amd-noinstr")?;
    let base = u64::from_str_radix(base.trim_start_matches("0x"), 16).ok()?;
    exits(out).iter().find_map(|e| {
        let rip = e.field("rip")?;
        (base..base + 0x1000).contains(&rip).then(|| {
            format!(
                "a guest vCPU ran at {rip:#x}, inside L1's kvm_amd entry code (at {base:#x}): \
                 the emulated CPU entered the guest with L1's own RIP ({})",
                e.text
            )
        })
    })
}

/// One `kvm_exit` line of L1's trace: `vcpu N reason R rip 0x… info1 0x… …`.
struct Exit<'a> {
    text: &'a str,
    vcpu: &'a str,
}

impl Exit<'_> {
    fn is(&self, reason: &str) -> bool {
        self.text.contains(&format!(" reason {reason} "))
    }

    /// A hex field (`rip`, `info1`, `info2`, `intr_info`, `error_code`).
    fn field(&self, key: &str) -> Option<u64> {
        let v = self
            .text
            .split_once(&format!(" {key} 0x"))?
            .1
            .split_whitespace()
            .next()?;
        u64::from_str_radix(v, 16).ok()
    }

    /// A shutdown while a #PF was being delivered (`intr_info` valid, exception, vector 14).
    fn page_fault_shutdown(&self) -> bool {
        self.is("shutdown") && self.field("intr_info") == Some(0x8000_0b0e)
    }
}

/// The `kvm_exit` lines of the KVM trace L1 sent, in order.
fn exits(out: &L1Output) -> Vec<Exit<'_>> {
    let Some(trace) = out.files.get("/tmp/kvm-trace") else {
        return Vec::new();
    };
    trace
        .lines()
        .filter_map(|l| {
            let text = l.split_once("kvm_exit: ")?.1.trim();
            let vcpu = text.split(" reason ").next()?;
            Some(Exit { text, vcpu })
        })
        .collect()
}

/// A shutdown of Ferry's test guest while a page fault was being delivered (`intr_info` valid
/// #PF), in a scenario that declared it runs only the test guest (`result l2 test-guest`). The
/// test guest maps all its memory with static 2 MiB pages, user-accessible, and never changes
/// them: no page fault is possible in it, and none can fail to be delivered, unless the CPU's page
/// walk is wrong. Seen in a CI run of 2026-12-02: a restored generation reading its working set,
/// nested page faults on consecutive 4 KiB pages of one 2 MiB guest page (0x15ef000, then
/// 0x15f0000), then a not-present #PF (error code 4) at the same RIP and a shutdown delivering
/// it. (A stock Linux guest takes page faults all the time: this is never asked of it.)
fn test_guest_page_fault(out: &L1Output) -> Option<String> {
    if out.results.get("l2").map(String::as_str) != Some("test-guest") {
        return None;
    }
    exits(out)
        .iter()
        .find(|e| e.page_fault_shutdown())
        .map(|e| {
            format!(
                "the test guest, which maps all its memory with static 2 MiB pages and takes no \
             page faults, shut down delivering one: the emulated CPU's page walk failed ({})",
                e.text
            )
        })
}

/// A vCPU that shut down delivering an instruction-fetch page fault at the very RIP it was
/// resumed at after its previous exit (that exit's RIP, or the next RIP an I/O exit gives), in
/// the page that exit had just executed from: no guest instruction ran between the two, so the
/// page was mapped and executable, and the fetch cannot fault. Seen in CI, 2026-12-02: a stock
/// Linux vCPU writing its serial port (`io rip 0xffffffffb36aa496`, next 0x…497), then
/// `shutdown rip 0xffffffffb36aa497 intr_info 0x80000b0e error_code 0x10`.
fn fetch_fault_on_resume(out: &L1Output) -> Option<String> {
    let exits = exits(out);
    exits.iter().enumerate().find_map(|(i, e)| {
        if !e.page_fault_shutdown() || e.field("error_code")? & 0x10 == 0 {
            return None;
        }
        let rip = e.field("rip")?;
        let prev = exits[..i].iter().rev().find(|p| p.vcpu == e.vcpu)?;
        let prev_rip = prev.field("rip")?;
        let resumed = if prev.is("io") {
            prev.field("info2")?
        } else {
            prev_rip
        };
        (rip == resumed && rip >> 12 == prev_rip >> 12).then(|| {
            format!(
                "a guest vCPU shut down fetching the instruction it was resumed at, in the page \
                 it had just executed from: the emulated CPU's page walk failed ({} | {})",
                prev.text, e.text
            )
        })
    })
}

impl L1 {
    /// Starts L1 with `scenario`, `files` and `opts` (see [`run_l1`]).
    pub fn boot(scenario: &str, files: &[(&str, &Path)], opts: &L1Opts) -> L1 {
        let c = cache();
        let dir = tempfile::Builder::new()
            .prefix("ferry-nested-")
            .tempdir()
            .unwrap();
        let ir = dir.path().join("ir");
        for d in ["bin", "proc", "sys", "dev", "tmp", "mods"] {
            std::fs::create_dir_all(ir.join(d)).unwrap();
        }
        std::fs::copy(c.join("busybox"), ir.join("bin/busybox")).unwrap();
        for m in std::fs::read_dir(c.join("mods")).unwrap().flatten() {
            std::fs::copy(m.path(), ir.join("mods").join(m.file_name())).unwrap();
        }
        add_binary(&ir, &super::common::bin());
        for b in &opts.bins {
            add_binary(&ir, b);
        }
        for (inside, here) in files {
            let dst = ir.join(inside.trim_start_matches('/'));
            std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
            std::fs::copy(here, &dst).unwrap();
        }
        let init = format!("{PRELUDE}\n{scenario}\necho FERRY-DONE\npoweroff -f\n");
        std::fs::write(ir.join("init"), init).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(ir.join("init"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let initrd = dir.path().join("l1.cpio");
        std::fs::File::create(&initrd)
            .unwrap()
            .write_all(&testbed::initramfs::cpio_of_dir(&ir).unwrap())
            .unwrap();
        let console = dir.path().join("console.log");
        let qemu_log = dir.path().join("qemu.log");
        // FERRY_NESTED_QEMU: another emulator binary; FERRY_NESTED_TCG: TCG's options (both
        // to compare the test host's failure rate across emulators and settings).
        let mut cmd = Command::new(
            std::env::var("FERRY_NESTED_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into()),
        );
        let tcg = std::env::var("FERRY_NESTED_TCG").unwrap_or_else(|_| "thread=multi".into());
        cmd.args(["-accel", &format!("tcg,{tcg}"), "-cpu", "max"])
            .args(["-smp", &opts.smp.to_string()])
            .args(["-m", &opts.memory_mib.to_string()])
            .args([
                "-nographic",
                "-no-reboot",
                "-nodefaults",
                "-serial",
                "stdio",
                "-d",
                "cpu_reset,guest_errors",
            ])
            .arg("-D")
            .arg(&qemu_log)
            .arg("-monitor")
            .arg(format!(
                "unix:{},server=on,wait=off",
                dir.path().join("monitor.sock").display()
            ));
        if let Some(l) = &opts.link {
            cmd.arg("-netdev").arg(format!(
                "dgram,id=n0,local.type=unix,local.path={},remote.type=unix,remote.path={}",
                l.local.display(),
                l.remote.display()
            ));
            cmd.arg("-device")
                .arg(format!("virtio-net-pci,netdev=n0,mac={}", l.mac));
        }
        let qemu = cmd
            .arg("-kernel")
            .arg(c.join("vmlinuz"))
            .arg("-initrd")
            .arg(&initrd)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 loglevel=5 panic=-1 nokaslr tsc_early_khz={} {}{}",
                outer_tsc_khz(),
                opts.append,
                // FERRY_NESTED_TRACE=0: no KVM trace in L1 (to compare runs without it);
                // FERRY_NESTED_KVM_AMD=npt=0,...: kvm-amd's parameters in L1.
                if std::env::var("FERRY_NESTED_TRACE").as_deref() == Ok("0") {
                    " ferry.trace=0".to_string()
                } else {
                    String::new()
                } + &std::env::var("FERRY_NESTED_KVM_AMD")
                    .map(|p| format!(" ferry.kvm_amd={p}"))
                    .unwrap_or_default()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::fs::File::create(&console).unwrap()))
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("qemu.err")).unwrap(),
            ))
            .spawn()
            .expect("start qemu-system-x86_64 (installed by scripts/install-deps.sh)");
        L1 {
            qemu,
            console,
            qemu_log,
            t0: Instant::now(),
            _dir: dir,
        }
    }

    /// Waits up to `timeout` for L1 to power off (killed after it, or as soon as L1's kernel
    /// reports a CPU stuck for a minute: see [`host_failure`]), and returns what it printed.
    pub fn wait(self, timeout: Duration) -> L1Output {
        self.wait_or_stop(timeout, &std::sync::atomic::AtomicBool::new(false))
    }

    /// [`L1::wait`], also ended (as a timeout) once `stop` is set: a two-host bed stops one
    /// host when the other failed.
    pub fn wait_or_stop(
        mut self,
        timeout: Duration,
        stop: &std::sync::atomic::AtomicBool,
    ) -> L1Output {
        let read = |p: &Path| {
            String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).replace("\r\n", "\n")
        };
        let mut exited = false;
        let mut wedged = false;
        let mut early: Option<String> = None;
        let mut shutdowns_seen = 0usize;
        let mut polls = 0u64;
        let (mut alive, mut alive_at) = (0usize, Instant::now());
        loop {
            if self.qemu.try_wait().unwrap().is_some() {
                exited = true;
                break;
            }
            if self.t0.elapsed() > timeout || stop.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            polls += 1;
            if polls.is_multiple_of(25) {
                let console = read(&self.console);
                if stuck_seconds(&console) >= 60 {
                    break;
                }
                // A trace sent by the shutdown watcher (complete once its end marker is there):
                // a known signature of the emulator ends this L1 now.
                let sent = console.matches("FERRY-FILE-END /tmp/kvm-trace").count();
                if sent > shutdowns_seen {
                    shutdowns_seen = sent;
                    let partial = parse(console.clone(), self.t0.elapsed().as_secs_f64());
                    if let Some(why) = trace_signature(&partial) {
                        early = Some(format!("{why}; seen while the scenario ran"));
                        break;
                    }
                }
                let n = console.matches("FERRY-ALIVE").count();
                if n != alive {
                    (alive, alive_at) = (n, Instant::now());
                } else if alive > 0 && alive_at.elapsed() > SILENT_LIMIT {
                    wedged = true;
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let registers = if exited {
            String::new()
        } else {
            let r = self.monitor("info registers -a");
            let _ = self.qemu.kill();
            let _ = self.qemu.wait();
            r
        };
        let mut out = parse(read(&self.console), self.t0.elapsed().as_secs_f64());
        out.wedged = wedged;
        out.qemu_log = read(&self.qemu_log);
        if !registers.is_empty() {
            out.qemu_log
                .push_str("\n--- info registers -a (when L1 was stopped) ---\n");
            out.qemu_log.push_str(&registers);
        }
        let err = read(&self.console.with_file_name("qemu.err"));
        if !err.trim().is_empty() {
            out.qemu_log.push_str("\n--- QEMU stderr ---\n");
            out.qemu_log.push_str(&err);
        }
        out.host_failure = early.or_else(|| host_failure(&out, exited));
        out
    }
}

impl L1 {
    /// What QEMU's monitor answers to `command` (empty if it does not within 3 s).
    fn monitor(&self, command: &str) -> String {
        use std::io::Read;
        let path = self.console.with_file_name("monitor.sock");
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(&path) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let _ = writeln!(s, "{command}");
        let (mut out, mut buf, t0) = (Vec::new(), [0u8; 4096], Instant::now());
        while t0.elapsed() < Duration::from_secs(3) {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(_) if !out.is_empty() => break,
                Err(_) => {}
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// How long L1 may go without its sign of life before it counts as stopped.
pub const SILENT_LIMIT: Duration = Duration::from_secs(90);

impl Drop for L1 {
    fn drop(&mut self) {
        if let Ok(None) = self.qemu.try_wait() {
            let _ = self.qemu.kill();
            let _ = self.qemu.wait();
        }
    }
}

/// Splits what L1 printed into results and files.
pub fn parse(console: String, seconds: f64) -> L1Output {
    let mut results = BTreeMap::new();
    let mut files = BTreeMap::new();
    let mut done = false;
    let mut cur: Option<(String, String)> = None;
    // The start of a file's line that another writer's line cut into (see below).
    let mut carry = String::new();
    for raw in console.lines() {
        let joined;
        let raw = if cur.is_some() && !carry.is_empty() {
            joined = std::mem::take(&mut carry) + raw;
            joined.as_str()
        } else {
            raw
        };
        // While a file is sent, other writers go on (the sign of life, the shutdown watcher,
        // the scenario's results): each writes a whole line at once, which can land inside a
        // line of the file. It ends that half-line, whose rest follows it: mend it.
        if cur.is_some() {
            if let Some(i) = ["FERRY-RESULT ", "FERRY-ALIVE "]
                .iter()
                .filter_map(|m| raw.find(m))
                .min()
            {
                if let Some(r) = raw[i..].strip_prefix("FERRY-RESULT ") {
                    let (k, v) = r.split_once(' ').unwrap_or((r, ""));
                    results.insert(k.to_string(), v.trim().to_string());
                }
                carry = raw[..i].to_string();
                continue;
            }
        }
        // Kernel messages can land in the middle of a line: markers count wherever they start.
        let l = [
            "FERRY-RESULT ",
            "FERRY-FILE-BEGIN ",
            "FERRY-FILE-END ",
            "FERRY-DONE",
        ]
        .iter()
        .filter_map(|m| raw.find(m))
        .min()
        .map(|i| &raw[i..])
        .unwrap_or(raw);
        if let Some((name, body)) = &mut cur {
            if l == format!("FERRY-FILE-END {name}") {
                // `dump` ends the file with one newline of its own (so that the end marker
                // starts a line): take it off again, so that an unfinished last line (output
                // cut by a pause) stays unfinished.
                let (n, mut b) = cur.take().unwrap();
                b.pop();
                files.insert(n, b);
            } else {
                body.push_str(raw);
                body.push('\n');
            }
            continue;
        }
        if let Some(r) = l.strip_prefix("FERRY-RESULT ") {
            let (k, v) = r.split_once(' ').unwrap_or((r, ""));
            results.insert(k.to_string(), v.trim().to_string());
        } else if let Some(f) = l.strip_prefix("FERRY-FILE-BEGIN ") {
            cur = Some((f.to_string(), String::new()));
        } else if l == "FERRY-DONE" {
            done = true;
        }
    }
    L1Output {
        console,
        results,
        files,
        done,
        seconds,
        qemu_log: String::new(),
        wedged: false,
        host_failure: None,
    }
}

/// The longest "soft lockup - CPU#n stuck for Ns!" L1's kernel reported (0 if none).
fn stuck_seconds(console: &str) -> u64 {
    console
        .lines()
        .filter_map(|l| {
            l.split_once("stuck for ")?
                .1
                .split_once("s!")?
                .0
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

/// The `ferry` CLI next to `ferry-vmm` (the workspace's test build makes both).
pub fn ferry_bin() -> PathBuf {
    let ferry = super::common::bin().with_file_name("ferry");
    assert!(
        ferry.is_file(),
        "{} is missing: build the CLI too (cargo build --release -p cli)",
        ferry.display()
    );
    ferry
}

/// One event of L1's KVM trace with the thread that logged it (one thread per guest vCPU, so
/// vCPUs of different VMs are told apart) and its timestamp.
struct Event<'a> {
    thread: &'a str,
    time: f64,
    /// What follows `kvm_exit: `, `kvm_inj_virq: ` or `kvm_msr: `.
    text: &'a str,
    kind: &'a str,
}

/// Every `kvm_exit`, `kvm_inj_virq` and `kvm_msr` event of the trace L1 sent, once each (its
/// sections overlap), in time order.
fn events(out: &L1Output) -> Vec<Event<'_>> {
    let Some(trace) = out.files.get("/tmp/kvm-trace") else {
        return Vec::new();
    };
    let mut seen = std::collections::HashSet::new();
    let mut v: Vec<Event> = trace
        .lines()
        .filter(|l| seen.insert(*l))
        .filter_map(|l| {
            let thread = l.split_whitespace().next()?;
            let (head, rest) = ["kvm_exit: ", "kvm_inj_virq: ", "kvm_msr: "]
                .iter()
                .find_map(|k| {
                    l.split_once(k)
                        .map(|(h, r)| (h, (k.trim_end_matches(": "), r)))
                })?;
            let time = head
                .trim_end()
                .trim_end_matches(':')
                .rsplit(' ')
                .next()?
                .parse()
                .ok()?;
            Some(Event {
                thread,
                time,
                text: rest.1.trim(),
                kind: rest.0,
            })
        })
        .collect();
    v.sort_by(|a, b| a.time.total_cmp(&b.time));
    v
}

/// A vCPU that shut down delivering an event (`intr_info` valid: an interrupt, or an
/// exception its instruction raised) at the very RIP it was resumed at after its previous exit,
/// while the same vCPU thread had taken interrupts before (an interrupt injected and followed
/// by an ordinary exit, or an x2APIC end-of-interrupt written): its IDT, GDT and stacks were in
/// place, and a delivery fails only if the CPU's page walk during it does (the emulated SVM
/// mishandles a nested page fault taken while delivering an event). Seen in CI, 2026-12-02: a
/// stock Linux vCPU of a migration source in pre-copy (dirty logging write-protects its pages),
/// `vintr rip 0xffffffffb6a59b99`, IRQ 0x21 injected, `shutdown rip 0xffffffffb6a59b99
/// intr_info 0x80000021`; and a freshly booted one shutting down delivering a #PF right after a
/// run of nested page faults at that RIP. A guest whose memory a migration or a restore got
/// wrong fails its first delivery instead: that one is not this signature.
fn delivery_fault_on_resume(out: &L1Output) -> Option<String> {
    let ev = events(out);
    let field = |text: &str, key: &str| -> Option<u64> {
        let v = text
            .split_once(&format!(" {key} 0x"))?
            .1
            .split_whitespace()
            .next()?;
        u64::from_str_radix(v, 16).ok()
    };
    ev.iter().enumerate().find_map(|(i, s)| {
        if s.kind != "kvm_exit" || !s.text.contains(" reason shutdown ") {
            return None;
        }
        if field(s.text, "intr_info")? & 0x8000_0000 == 0 {
            return None;
        }
        let rip = field(s.text, "rip")?;
        let mine: Vec<&Event> = ev[..i].iter().filter(|e| e.thread == s.thread).collect();
        let (pi, prev) = mine
            .iter()
            .enumerate()
            .rev()
            .find(|(_, e)| e.kind == "kvm_exit")?;
        let resumed = if prev.text.contains(" reason io ") {
            field(prev.text, "info2")?
        } else {
            field(prev.text, "rip")?
        };
        if rip != resumed {
            return None;
        }
        let took_before = mine[..pi].iter().enumerate().any(|(j, e)| {
            (e.kind == "kvm_msr" && e.text.starts_with("msr_write 80b "))
                || (e.kind == "kvm_inj_virq"
                    && mine[j + 1..pi + 1].iter().any(|x| {
                        x.kind == "kvm_exit" && !x.text.contains(" reason shutdown ")
                    }))
        });
        took_before.then(|| {
            format!(
                "a guest vCPU that had taken interrupts before shut down delivering an event at                  the RIP it was resumed at: the emulated CPU's event delivery failed ({} {} | {} {})",
                prev.thread, prev.text, s.thread, s.text
            )
        })
    })
}
