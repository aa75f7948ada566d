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
    let out = Command::new(repo().join("scripts/nested/prepare.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/nested/prepare.sh");
    assert!(
        out.status.success(),
        "scripts/nested/prepare.sh failed (see above)"
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A newc cpio archive (what the kernel unpacks as its initramfs) of every file under `root`.
pub fn cpio(root: &Path) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8], ino: u32) {
        let hdr = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        out.extend_from_slice(hdr.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out.extend_from_slice(data);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }
    fn walk(root: &Path, rel: &Path, out: &mut Vec<u8>, ino: &mut u32) {
        let mut entries: Vec<_> = std::fs::read_dir(root.join(rel))
            .unwrap()
            .flatten()
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let r = rel.join(e.file_name());
            let name = r.to_str().unwrap().to_string();
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            *ino += 1;
            if meta.is_dir() {
                entry(out, &name, 0o040755, &[], *ino);
                walk(root, &r, out, ino);
            } else {
                use std::os::unix::fs::PermissionsExt;
                let mode = 0o100000 | (meta.permissions().mode() & 0o7777);
                entry(out, &name, mode, &std::fs::read(e.path()).unwrap(), *ino);
            }
        }
    }
    let mut out = Vec::new();
    let mut ino = 0;
    walk(root, Path::new(""), &mut out, &mut ino);
    entry(&mut out, "TRAILER!!!", 0, &[], 0);
    out
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
    sleep 0.1
  done
}
[ -e /dev/kvm ] && result kvm present || result kvm missing
result cpu "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
cd /tmp
"#;

/// Boots L1 with `scenario` (a shell script, run after [`PRELUDE`]) and `files` (path inside
/// L1 → file here), waits up to `timeout` for `FERRY-DONE`, and returns what it printed.
pub fn run_l1(scenario: &str, files: &[(&str, &Path)], timeout: Duration) -> L1Output {
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
    let vmm = super::common::bin();
    std::fs::copy(&vmm, ir.join("bin/ferry-vmm")).unwrap();
    let _ = Command::new("strip").arg(ir.join("bin/ferry-vmm")).status();
    for lib in libraries(&vmm) {
        let dst = ir.join(lib.strip_prefix("/").unwrap());
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(&lib, &dst).unwrap();
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
        .write_all(&cpio(&ir))
        .unwrap();
    let console = dir.path().join("console.log");
    let t0 = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "2048",
        ])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(c.join("vmlinuz"))
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::fs::File::create(&console).unwrap()))
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-system-x86_64 (installed by scripts/install-deps.sh)");
    loop {
        if qemu.try_wait().unwrap().is_some() {
            break;
        }
        if t0.elapsed() > timeout {
            let _ = qemu.kill();
            let _ = qemu.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let text =
        String::from_utf8_lossy(&std::fs::read(&console).unwrap_or_default()).replace("\r\n", "\n");
    parse(text, t0.elapsed().as_secs_f64())
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
