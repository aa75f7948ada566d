//! Initramfs images for Linux guests (test support): a newc cpio writer, and the initramfs of
//! a stock Linux guest that runs Ferry's Linux workload (`ferry-linux-guest`, crate
//! `linux-guest`) with the same options and output lines as Ferry's test guest.
//!
//! The Linux guest initramfs ([`linux_guest`]) holds a static busybox (`/bin/busybox`, e.g.
//! from the nested test host's cache: [`nested_cache`]), the kernel modules given (in
//! `/lib/ferry/modules/`, loaded in the order given), `/bin/ferry-linux-guest` and `/init`
//! ([`init_script`]), a busybox shell script that stays PID 1:
//! 1. installs the busybox applets, mounts proc, sysfs and devtmpfs;
//! 2. `insmod`s every module in order (`ferry-init: insmod <name> failed` if one fails; e.g.
//!    virtio, virtio_ring, virtio_mmio, virtio_blk, failover, net_failover, virtio_net from the
//!    guest kernel's own modules);
//! 3. brings lo up; with `ferry.ip=<a.b.c.d>` on the kernel command line it waits (≤ 10 s) for
//!    eth0, sets `ferry.mac` as its address if given, assigns the address (/32), brings eth0 up,
//!    adds an on-link default route (so, like the test guest, it answers whoever asks on the
//!    link) and sends one gratuitous ARP (the test guest sends one at start too);
//! 4. for `ferry.workload=disk-log` waits (≤ 10 s) for the disk (`ferry.disk`, default
//!    /dev/vda) to appear;
//! 5. with `ferry.kmsg_check=<seconds>` starts a background loop that reads the kernel log
//!    every that many seconds and prints `kmsg check=<n> bad=<warnings so far> date=<date
//!    +%s>` and each new clock/TSC/lockup/RCU-stall warning as `kmsg bad: <line>` (the
//!    kernel's own console output is silenced by `quiet`);
//! 6. runs `/bin/ferry-linux-guest` (which reads /proc/cmdline) with the console as its output;
//!    if it ever ends: `PANIC ferry-linux-guest exited rc=<status>` and the script sleeps.
//!
//! Its own lines start with `ferry-init:` (the tests' parser files them under `other`). Pass
//! `console=ttyS0 quiet` (or `loglevel=1`) on the kernel command line so kernel messages do
//! not land in the middle of the workload's lines. The image is an uncompressed newc archive,
//! which every Linux kernel unpacks (no compression needed).

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A newc ("070701") cpio archive being written, as the Linux kernel unpacks an initramfs.
/// Entries are written in the order added; parents must be added before their children.
#[derive(Default)]
pub struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    pub fn new() -> Cpio {
        Cpio::default()
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8], ino: u32) {
        let hdr = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            data.len(),
            0, // dev major
            0, // dev minor
            0, // rdev major
            0, // rdev minor
            name.len() + 1,
            0 // check
        );
        self.out.extend_from_slice(hdr.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn next_ino(&mut self) -> u32 {
        self.ino += 1;
        self.ino
    }

    /// A directory (mode 0755). `name` is relative, e.g. `bin` or `lib/modules`.
    pub fn dir(&mut self, name: &str) -> &mut Cpio {
        let ino = self.next_ino();
        self.entry(name, 0o040755, &[], ino);
        self
    }

    /// A regular file with permission bits `perm` (e.g. 0o755).
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> &mut Cpio {
        let ino = self.next_ino();
        self.entry(name, 0o100000 | (perm & 0o7777), data, ino);
        self
    }

    /// A symbolic link `name` -> `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Cpio {
        let ino = self.next_ino();
        self.entry(name, 0o120777, target.as_bytes(), ino);
        self
    }

    /// Every entry below `root` (directories, files with their permission bits, symlinks),
    /// sorted by name, as paths relative to `root`.
    pub fn tree(&mut self, root: &Path) -> io::Result<&mut Cpio> {
        self.walk(root, Path::new(""))?;
        Ok(self)
    }

    fn walk(&mut self, root: &Path, rel: &Path) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let mut entries: Vec<_> = std::fs::read_dir(root.join(rel))?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let r = rel.join(e.file_name());
            let name = r
                .to_str()
                .ok_or_else(|| io::Error::other(format!("{} is not UTF-8", r.display())))?
                .to_string();
            let meta = std::fs::symlink_metadata(e.path())?;
            if meta.is_dir() {
                self.dir(&name);
                self.walk(root, &r)?;
            } else if meta.file_type().is_symlink() {
                let target = std::fs::read_link(e.path())?;
                self.symlink(&name, &target.to_string_lossy());
            } else {
                let data = std::fs::read(e.path())?;
                self.file(&name, meta.permissions().mode(), &data);
            }
        }
        Ok(())
    }

    /// Ends the archive (`TRAILER!!!`) and returns it.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], 0);
        self.out
    }
}

/// A newc cpio archive of every entry under `root`.
pub fn cpio_of_dir(root: &Path) -> io::Result<Vec<u8>> {
    let mut c = Cpio::new();
    c.tree(root)?;
    Ok(c.finish())
}

/// The cache directory of the nested test host (Debian's kernel `vmlinuz`, its modules in
/// `mods/`, a static `busybox`), prepared on first use by `scripts/nested/prepare.sh` (which
/// downloads the packages once; its progress goes to this process's stderr).
pub fn nested_cache() -> io::Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/nested/prepare.sh");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| io::Error::other(format!("cannot run {}: {e}", script.display())))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{} failed ({})",
            script.display(),
            out.status
        )));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// What goes into a Linux guest initramfs.
#[derive(Clone, Debug)]
pub struct LinuxGuest {
    /// A static busybox (with sh, mount, insmod, ip, arping, sleep).
    pub busybox: PathBuf,
    /// Kernel modules (`.ko`, uncompressed), loaded by /init in this order.
    pub modules: Vec<PathBuf>,
    /// The workload program; default: the `ferry-linux-guest` built by the `linux-guest` crate.
    pub guest: PathBuf,
    /// More files: (path inside, e.g. `etc/x`, content, permission bits).
    pub files: Vec<(String, Vec<u8>, u32)>,
}

impl LinuxGuest {
    /// busybox, no modules, the built `ferry-linux-guest`.
    pub fn new(busybox: impl Into<PathBuf>) -> LinuxGuest {
        LinuxGuest {
            busybox: busybox.into(),
            modules: Vec::new(),
            guest: PathBuf::from(linux_guest::PATH),
            files: Vec::new(),
        }
    }

    /// Adds modules to load (in order).
    pub fn modules<P: Into<PathBuf>>(mut self, m: impl IntoIterator<Item = P>) -> LinuxGuest {
        self.modules.extend(m.into_iter().map(Into::into));
        self
    }
}

/// File name of module `i` inside the image: its load order, then its own name.
fn module_name(i: usize, path: &Path) -> io::Result<String> {
    let base = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::other(format!("bad module path {}", path.display())))?;
    Ok(format!("{i:02}-{base}"))
}

/// The `/init` script for `modules` (names inside `/lib/ferry/modules/`, in load order).
pub fn init_script(modules: &[String]) -> String {
    let mut s = String::from(
        r#"#!/bin/busybox sh
# Ferry Linux guest init (testbed::initramfs): modules, network, then ferry-linux-guest.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
"#,
    );
    for m in modules {
        s.push_str(&format!(
            "insmod /lib/ferry/modules/{m} || echo \"ferry-init: insmod {m} failed\"\n"
        ));
    }
    s.push_str(
        r#"IP= MAC= WORKLOAD= DISK=/dev/vda KMSG=
for item in $(cat /proc/cmdline); do
  case "$item" in
    ferry.ip=*) IP=${item#ferry.ip=} ;;
    ferry.mac=*) MAC=${item#ferry.mac=} ;;
    ferry.workload=*) WORKLOAD=${item#ferry.workload=} ;;
    ferry.disk=*) DISK=${item#ferry.disk=} ;;
    ferry.kmsg_check=*) KMSG=${item#ferry.kmsg_check=} ;;
  esac
done
# wait_for PATH: up to 10 s for PATH to exist (devices probe asynchronously)
wait_for() { i=0; while [ ! -e "$1" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; [ -e "$1" ]; }
ip link set lo up
if [ -n "$IP" ]; then
  if wait_for /sys/class/net/eth0; then
    [ -n "$MAC" ] && ip link set eth0 address "$MAC"
    ip addr add "$IP/32" dev eth0
    ip link set eth0 up
    ip route add default dev eth0
    arping -U -c 1 -I eth0 "$IP" > /dev/null 2>&1 &
    echo "ferry-init: eth0 $IP"
  else
    echo "ferry-init: no eth0 for ferry.ip=$IP"
  fi
fi
if [ "$WORKLOAD" = disk-log ]; then
  wait_for "$DISK" || echo "ferry-init: no $DISK"
fi
# ferry.kmsg_check=<s>: every s seconds one line `kmsg check=<n> bad=<count> date=<date +%s>`
# (the kernel log's clock, lockup and stall warnings so far; the guest's wall clock), and
# each warning once as `kmsg bad: <line>`. One echo per line: never inside another line.
if [ -n "$KMSG" ]; then
  (
    BAD='unstable|soft lockup|hard lockup|self-detected stall|rcu.*stall|blocked for more than|timekeeping watchdog|clocksource.*skew|tsc.*warp|unable to calibrate|time went backwards'
    n=0 shown=0
    while :; do
      sleep "$KMSG"; n=$((n+1))
      bad=$(dmesg | grep -ciE "$BAD")
      echo "kmsg check=$n bad=$bad date=$(date +%s)"
      if [ "$bad" -gt "$shown" ]; then
        dmesg | grep -iE "$BAD" | tail -n $((bad-shown)) | while read -r l; do echo "kmsg bad: $l"; done
        shown=$bad
      fi
    done
  ) &
fi
echo "ferry-init: starting ferry-linux-guest"
/bin/ferry-linux-guest
echo "PANIC ferry-linux-guest exited rc=$?"
while :; do sleep 3600; done
"#,
    );
    s
}

/// The newc initramfs of a Linux guest running `ferry-linux-guest` (see the module doc).
pub fn linux_guest(g: &LinuxGuest) -> io::Result<Vec<u8>> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|e| io::Error::other(format!("cannot read {}: {e}", p.display())))
    };
    let mut c = Cpio::new();
    for d in [
        "bin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "lib",
        "lib/ferry",
        "lib/ferry/modules",
    ] {
        c.dir(d);
    }
    c.file("bin/busybox", 0o755, &read(&g.busybox)?);
    c.file("bin/ferry-linux-guest", 0o755, &read(&g.guest)?);
    let mut names = Vec::new();
    for (i, m) in g.modules.iter().enumerate() {
        let name = module_name(i, m)?;
        c.file(&format!("lib/ferry/modules/{name}"), 0o644, &read(m)?);
        names.push(name);
    }
    for (path, data, perm) in &g.files {
        c.file(path.trim_start_matches('/'), *perm, data);
    }
    c.file("init", 0o755, init_script(&names).as_bytes());
    Ok(c.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A newc reader for the tests: (name, mode, data) of every entry before the trailer.
    fn entries(a: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let hex = |b: &[u8]| u32::from_str_radix(std::str::from_utf8(b).unwrap(), 16).unwrap();
        let mut v = Vec::new();
        let mut p = 0;
        loop {
            let h = &a[p..p + 110];
            assert_eq!(&h[..6], b"070701");
            let mode = hex(&h[14..22]);
            let size = hex(&h[54..62]) as usize;
            let nlen = hex(&h[94..102]) as usize;
            let name = std::str::from_utf8(&a[p + 110..p + 110 + nlen - 1])
                .unwrap()
                .to_string();
            assert_eq!(a[p + 110 + nlen - 1], 0);
            p = (p + 110 + nlen).next_multiple_of(4);
            let data = a[p..p + size].to_vec();
            p = (p + size).next_multiple_of(4);
            if name == "TRAILER!!!" {
                assert_eq!(p, a.len());
                return v;
            }
            v.push((name, mode, data));
        }
    }

    #[test]
    fn cpio_round_trip_and_what_cpio_reads() {
        let dir = tempdir();
        let root = dir.join("root");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/f"), b"hello").unwrap();
        std::fs::write(root.join("odd"), b"12345").unwrap();
        std::os::unix::fs::symlink("a/b/f", root.join("link")).unwrap();
        let a = cpio_of_dir(&root).unwrap();
        let e = entries(&a);
        let names: Vec<&str> = e.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(names, ["a", "a/b", "a/b/f", "link", "odd"]);
        assert_eq!(e[0].1, 0o040755);
        assert_eq!(e[2].1 & 0o170000, 0o100000);
        assert_eq!(e[2].2, b"hello");
        assert_eq!((e[3].1, e[3].2.as_slice()), (0o120777, &b"a/b/f"[..]));
        // GNU cpio, if installed, lists the same archive.
        if let Ok(mut child) = Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
        {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(&a).unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success());
            let listed = String::from_utf8(out.stdout).unwrap();
            assert_eq!(listed.lines().collect::<Vec<_>>(), names);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "ferry-initramfs-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn linux_guest_image_holds_busybox_modules_guest_and_init() {
        let dir = tempdir();
        let bb = dir.join("busybox");
        std::fs::write(&bb, b"BB").unwrap();
        let m1 = dir.join("virtio_mmio.ko");
        let m2 = dir.join("virtio_blk.ko");
        std::fs::write(&m1, b"M1").unwrap();
        std::fs::write(&m2, b"M2").unwrap();
        let g = LinuxGuest::new(&bb).modules([&m1, &m2]);
        let e = entries(&linux_guest(&g).unwrap());
        let get = |n: &str| {
            e.iter()
                .find(|x| x.0 == n)
                .unwrap_or_else(|| panic!("no {n}"))
        };
        assert_eq!(get("bin/busybox").2, b"BB");
        assert_eq!(get("bin/busybox").1, 0o100755);
        assert_eq!(get("bin/ferry-linux-guest").2, linux_guest::BINARY);
        assert_eq!(get("lib/ferry/modules/00-virtio_mmio.ko").2, b"M1");
        assert_eq!(get("lib/ferry/modules/01-virtio_blk.ko").2, b"M2");
        let init = String::from_utf8(get("init").2.clone()).unwrap();
        assert_eq!(get("init").1, 0o100755);
        let a = init
            .find("insmod /lib/ferry/modules/00-virtio_mmio.ko")
            .unwrap();
        let b = init
            .find("insmod /lib/ferry/modules/01-virtio_blk.ko")
            .unwrap();
        let run = init.find("\n/bin/ferry-linux-guest\n").unwrap();
        assert!(a < b && b < run, "modules in order, then the workload");
        // Every directory comes before what is in it.
        for (i, (n, _, _)) in e.iter().enumerate() {
            if let Some((parent, _)) = n.rsplit_once('/') {
                assert!(e[..i].iter().any(|x| x.0 == parent), "{n} before {parent}");
            }
        }
        assert!(linux_guest(&LinuxGuest::new(dir.join("missing"))).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The /init script is valid shell and parses the command line as documented: run with a
    /// fake root (commands that need the real system replaced by functions printing what they
    /// would do).
    #[test]
    fn init_script_reads_the_command_line() {
        let script = init_script(&["00-x.ko".to_string()]);
        let stubs = r#"
mount() { :; }
insmod() { echo "insmod $*"; }
ip() { echo "ip $*"; }
arping() { echo "arping $*"; }
sleep() { exit 0; }
cat() { echo "console=ttyS0 ferry.workload=net-echo ferry.ip=10.77.0.5 ferry.mac=02:00:00:00:00:07"; }
"#;
        let body = script
            .replace("/bin/busybox --install -s /bin\n", stubs)
            .replace("wait_for /sys/class/net/eth0", "true")
            .replace("/bin/ferry-linux-guest\n", "echo RUN\n");
        let out = Command::new("sh").arg("-c").arg(body).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "insmod /lib/ferry/modules/00-x.ko",
                "ip link set lo up",
                "ip link set eth0 address 02:00:00:00:00:07",
                "ip addr add 10.77.0.5/32 dev eth0",
                "ip link set eth0 up",
                "ip route add default dev eth0",
                "ferry-init: eth0 10.77.0.5",
                "ferry-init: starting ferry-linux-guest",
                "RUN",
                "PANIC ferry-linux-guest exited rc=0",
            ],
            "{text}"
        );
    }
}
