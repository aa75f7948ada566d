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

    pub fn tail(&self, n: usize) -> String {
        let l: Vec<&str> = self.console.lines().collect();
        l[l.len().saturating_sub(n)..].join("\n")
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
for m in irqbypass kvm ccp kvm-amd; do insmod /mods/$m.ko || echo "FERRY-RESULT insmod-failed $m"; done
ip link set lo up
result() { echo "FERRY-RESULT $*"; }
dump() { echo "FERRY-FILE-BEGIN $1"; cat "$1"; echo; echo "FERRY-FILE-END $1"; }
# wait_for FILE PATTERN COUNT SECONDS [PID]: until FILE has COUNT lines matching PATTERN
# (fails at once on a PANIC in FILE, or when process PID has ended).
wait_for() {
  local w=0 n
  while :; do
    n=$(grep -c "$2" "$1" 2>/dev/null); n=${n:-0}
    [ "$n" -ge "$3" ] && return 0
    w=$((w+1)); [ $w -gt $(($4*10)) ] && return 1
    grep -q PANIC "$1" 2>/dev/null && return 1
    [ -n "$5" ] && ! kill -0 "$5" 2>/dev/null && { n=$(grep -c "$2" "$1" 2>/dev/null); [ "${n:-0}" -ge "$3" ]; return; }
    [ -n "$PEER" ] && [ $((w % 30)) = 0 ] && peer_failed && return 1
    sleep 0.1
  done
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
result cpu "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
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
    L1::boot(scenario, files, &L1Opts::default()).wait(timeout)
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
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max"])
            .args(["-smp", &opts.smp.to_string()])
            .args(["-m", &opts.memory_mib.to_string()])
            .args([
                "-nographic",
                "-no-reboot",
                "-nodefaults",
                "-serial",
                "stdio",
            ]);
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
                "console=ttyS0 quiet panic=-1 tsc_early_khz={} {}",
                outer_tsc_khz(),
                opts.append
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::fs::File::create(&console).unwrap()))
            .stderr(Stdio::piped())
            .spawn()
            .expect("start qemu-system-x86_64 (installed by scripts/install-deps.sh)");
        L1 {
            qemu,
            console,
            t0: Instant::now(),
            _dir: dir,
        }
    }

    /// Waits up to `timeout` for L1 to power off (killed after it), and returns what it printed.
    pub fn wait(mut self, timeout: Duration) -> L1Output {
        loop {
            if self.qemu.try_wait().unwrap().is_some() {
                break;
            }
            if self.t0.elapsed() > timeout {
                let _ = self.qemu.kill();
                let _ = self.qemu.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let text = String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default())
            .replace("\r\n", "\n");
        parse(text, self.t0.elapsed().as_secs_f64())
    }
}

impl Drop for L1 {
    fn drop(&mut self) {
        if let Ok(None) = self.qemu.try_wait() {
            let _ = self.qemu.kill();
            let _ = self.qemu.wait();
        }
    }
}

fn parse(console: String, seconds: f64) -> L1Output {
    let mut results = BTreeMap::new();
    let mut files = BTreeMap::new();
    let mut done = false;
    let mut cur: Option<(String, String)> = None;
    for raw in console.lines() {
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
    }
}
