//! Bad input: nonsense flags and configs, missing files, and truncated, bit-flipped,
//! wrong-version or foreign snapshot files. Each gives a one-line error that says what is wrong,
//! a non-zero exit, no panic, and touches nothing (no serial log, no socket left behind).

mod common;
use common::*;
use std::path::Path;
use std::time::Duration;

fn run_args<'a>(dir: &'a Path, extra: &[&'a str]) -> Vec<String> {
    let mut v: Vec<String> = vec!["run".into()];
    v.extend(extra.iter().map(|s| s.to_string()));
    v.push("--serial-log".into());
    v.push(dir.join("s.log").display().to_string());
    v.push("--api-socket".into());
    v.push(dir.join("api.sock").display().to_string());
    v
}

fn assert_untouched(dir: &Path) {
    for f in ["s.log", "api.sock"] {
        assert!(!dir.join(f).exists(), "{f} was left behind");
    }
    assert_no_temp_files(dir, "s.log");
}

/// No temporary file of `name` (`.<name>.<pid>.<random>.tmp`) is left in `dir`.
fn assert_no_temp_files(dir: &Path, name: &str) {
    let left: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!(".{name}.")) && n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "temporary files left behind: {left:?}");
}

#[test]
fn nonsense_flags_and_configs() {
    let dir = tempdir();
    let d = dir.path();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--kernel", "test-guest", "--bogus"],
            "unexpected argument",
        ),
        (
            vec!["--kernel", "test-guest", "--vcpus", "0"],
            "vcpus must be between 1 and 8",
        ),
        (
            vec!["--kernel", "test-guest", "--vcpus", "9"],
            "vcpus must be between 1 and 8",
        ),
        (
            vec!["--kernel", "test-guest", "--vcpus", "many"],
            "invalid value",
        ),
        (
            vec!["--kernel", "test-guest", "--memory-mib", "1"],
            "memory must be between",
        ),
        (
            vec!["--kernel", "test-guest", "--memory-mib", "99999999"],
            "memory must be between",
        ),
        (
            vec!["--kernel", "test-guest", "--cpu-profile", "skylake"],
            "unknown CPU profile \"skylake\"",
        ),
        (vec!["--kernel", "/nonexistent/kernel"], "does not exist"),
        (
            vec!["--kernel", "/etc/hostname"],
            "neither a PVH ELF nor a bzImage",
        ),
        (
            vec!["--kernel", "test-guest", "--initrd", "/etc/hostname"],
            "initrd can only be used with a bzImage",
        ),
    ];
    for (extra, expect) in cases {
        let args = run_args(d, &extra);
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let (code, err) = run_fail(&a);
        assert_ne!(code, 0);
        assert!(
            err.contains(expect),
            "{extra:?}: expected {expect:?} in {err:?}"
        );
        assert_untouched(d);
    }
    let (_, err) = run_fail(&["frobnicate"]);
    assert!(err.contains("unrecognized subcommand"), "{err}");
    let (_, err) = run_fail(&[
        "ctl",
        "--api-socket",
        d.join("nope.sock").to_str().unwrap(),
        "status",
    ]);
    assert!(err.contains("cannot connect"), "{err}");
}

#[test]
fn socket_in_use_is_refused() {
    let dir = tempdir();
    let w = Worker::run_guest(dir.path(), "a", 1, 64, "ferry.workload=idle");
    let sock = w.socket.to_str().unwrap().to_string();
    let log2 = dir.path().join("b.serial");
    let (_, err) = run_fail(&[
        "run",
        "--kernel",
        "test-guest",
        "--serial-log",
        log2.to_str().unwrap(),
        "--api-socket",
        &sock,
    ]);
    assert!(err.contains("in use"), "{err}");
    assert!(!log2.exists());
    // The first worker is unaffected.
    assert_eq!(w.ctl(&["status"])["state"], "running");
    w.shutdown();
}

/// Takes a real snapshot of a small verify guest.
fn real_snapshot(dir: &Path) -> std::path::PathBuf {
    let w = Worker::run_guest(dir, "src", 1, 64, "ferry.workload=verify ferry.wss_mib=8");
    w.wait_log(Duration::from_secs(30), "a verify sweep", |l| {
        !l.verify_ok.is_empty()
    });
    let snap = dir.join("good.snap");
    w.ctl(&["snapshot", snap.to_str().unwrap()]);
    w.shutdown();
    snap
}

fn restore_fails(dir: &Path, snap: &Path, expect: &str) {
    let log = dir.join("r.log");
    let sock = dir.join("r.sock");
    let (code, err) = run_fail(&[
        "restore",
        "--snapshot",
        snap.to_str().unwrap(),
        "--serial-log",
        log.to_str().unwrap(),
        "--api-socket",
        sock.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains(expect), "expected {expect:?} in {err:?}");
    assert!(
        !log.exists() && !sock.exists(),
        "a failed restore left files behind"
    );
    assert_no_temp_files(dir, "r.log");
}

#[test]
fn broken_snapshots_are_refused() {
    let dir = tempdir();
    let d = dir.path();
    let snap = real_snapshot(d);
    let good = std::fs::read(&snap).unwrap();
    let len = good.len();
    let bad = d.join("bad.snap");

    // Truncated at many points: in the header, the state, a memory chunk, before the end marker.
    for cut in [0usize, 5, 20, 40, 200, len / 3, len / 2, len - 30, len - 1] {
        std::fs::write(&bad, &good[..cut]).unwrap();
        let expect = if cut < 8 {
            "not a Ferry snapshot"
        } else {
            "truncated snapshot"
        };
        restore_fails(d, &bad, expect);
    }
    // One flipped bit anywhere: header, state, memory, end marker.
    for pos in [10usize, 30, 100, len / 2, len - 5] {
        let mut b = good.clone();
        b[pos] ^= 0x10;
        std::fs::write(&bad, &b).unwrap();
        restore_fails(d, &bad, "snapshot");
    }
    let mut b = good.clone();
    b[len / 2] ^= 1;
    std::fs::write(&bad, &b).unwrap();
    restore_fails(d, &bad, "checksum mismatch");
    // Wrong version (header checksum recomputed, so only the version is wrong).
    let mut b = good.clone();
    b[8..12].copy_from_slice(&7u32.to_le_bytes());
    let crc = crc32c_of(&b[..24]);
    b[24..28].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&bad, &b).unwrap();
    restore_fails(d, &bad, "version 7 is not supported");
    // Foreign files.
    std::fs::write(&bad, b"hello world, definitely not a snapshot").unwrap();
    restore_fails(d, &bad, "not a Ferry snapshot");
    restore_fails(d, &d.join("missing.snap"), "cannot open snapshot");
    // Trailing garbage.
    let mut b = good.clone();
    b.extend_from_slice(b"junk");
    std::fs::write(&bad, &b).unwrap();
    restore_fails(d, &bad, "trailing bytes");
    // The good file still restores.
    let w = Worker::restore(d, "ok", &snap);
    w.wait_log(
        Duration::from_secs(30),
        "a verify sweep after restore",
        |l| !l.verify_ok.is_empty(),
    )
    .assert_no_corruption();
    w.shutdown();
}

fn crc32c_of(b: &[u8]) -> u32 {
    // Same polynomial as the snapshot format (CRC-32C, Castagnoli), bitwise.
    let mut crc = !0u32;
    for &x in b {
        crc ^= x as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn missing_kvm_is_a_one_line_error() {
    // Hide /dev/kvm in a private mount namespace (CI runs as root).
    let dir = tempdir();
    let d = dir.path();
    let script = format!(
        "mount -t tmpfs none /dev && exec {} run --kernel test-guest --serial-log {}/s.log --api-socket {}/api.sock",
        bin().display(),
        d.display(),
        d.display()
    );
    let out = std::process::Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("/dev/kvm does not exist"), "{err}");
    assert_untouched(d);
}

/// A minimal image with a valid bzImage setup header (boot protocol 2.12) and a kernel body
/// of `hlt` instructions: enough for the loader to take it for a Linux bzImage.
fn tiny_bzimage(path: &Path) {
    let setup_sects = 4u8;
    let mut b = vec![0u8; (setup_sects as usize + 1) * 512];
    b[0x1f1] = setup_sects;
    b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    b[0x202..0x206].copy_from_slice(b"HdrS");
    b[0x206..0x208].copy_from_slice(&0x020cu16.to_le_bytes());
    b[0x211] = 1; // LOADED_HIGH
    b[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    b[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    b[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes());
    b.extend(std::iter::repeat_n(0xf4u8, 4096));
    std::fs::write(path, b).unwrap();
}

/// On a host whose KVM cannot run stock Linux (PVM: no VMX/SVM), a bzImage is refused at once
/// with one line that says why, instead of a VM that hangs in emulated ring 0.
#[test]
fn a_bzimage_where_linux_cannot_run_is_refused_in_one_line() {
    let dir = tempdir();
    let d = dir.path();
    let kernel = d.join("bzImage");
    tiny_bzimage(&kernel);
    if vmm::host::kvm_is_pvm() || !vmm::host::hardware_virtualization() {
        let args = run_args(d, &["--kernel", kernel.to_str().unwrap()]);
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let t0 = std::time::Instant::now();
        let (code, err) = run_fail(&a);
        assert_ne!(code, 0);
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "took {:?}",
            t0.elapsed()
        );
        assert!(
            err.contains("cannot boot a Linux bzImage here") && err.contains("VMX/SVM"),
            "{err}"
        );
        assert!(!d.join("api.sock").exists());
    } else {
        // Hardware virtualization: the image is loaded and the VM runs (its `hlt`s).
        let w = Worker::spawn(d, "hw", &["run", "--kernel", kernel.to_str().unwrap()]);
        assert_eq!(w.ctl(&["status"])["state"], "running");
        w.shutdown();
    }
}

/// Symlinks planted where a serial log or a snapshot is written (the final names and the
/// predictable temporary names older versions used) are never followed: the file they point
/// at keeps its bytes, the log and the snapshot are regular files of their own.
#[test]
fn planted_symlinks_are_not_followed() {
    let dir = tempdir();
    let d = dir.path();
    let victim = d.join("victim");
    std::fs::write(&victim, "precious").unwrap();
    let snap = d.join("good.snap");
    let planted = [
        d.join("src.serial"),
        d.join("src.serial.partial"),
        d.join("good.snap.tmp"),
        snap.clone(),
    ];
    for p in &planted {
        std::os::unix::fs::symlink(&victim, p).unwrap();
    }
    let w = Worker::run_guest(d, "src", 1, 64, "ferry.workload=verify ferry.wss_mib=8");
    w.wait_log(Duration::from_secs(30), "a verify sweep", |l| {
        !l.verify_ok.is_empty()
    });
    w.ctl(&["snapshot", snap.to_str().unwrap()]);
    w.shutdown();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    for p in [d.join("src.serial"), snap.clone()] {
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert!(
            m.file_type().is_file(),
            "{} is not a regular file",
            p.display()
        );
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o077,
            0,
            "{} is readable by others",
            p.display()
        );
    }
    assert!(std::fs::read_to_string(d.join("src.serial"))
        .unwrap()
        .contains("verify"));
    for p in [d.join("src.serial.partial"), d.join("good.snap.tmp")] {
        assert!(std::fs::symlink_metadata(&p)
            .unwrap()
            .file_type()
            .is_symlink());
    }
    assert_no_temp_files(d, "good.snap");
    assert_no_temp_files(d, "src.serial");
    // The snapshot restores.
    let r = Worker::spawn(d, "r", &["restore", "--snapshot", snap.to_str().unwrap()]);
    r.wait_log(
        Duration::from_secs(30),
        "a verify sweep after restore",
        |l| !l.verify_ok.is_empty(),
    );
    r.shutdown();
}

/// The control socket is the worker's own: mode 0600, and a client of another user is
/// refused by its peer credentials even when the mode would let it connect.
#[test]
fn api_socket_takes_only_its_own_user() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = tempdir();
    let d = dir.path();
    let w = Worker::run_guest(d, "src", 1, 64, "ferry.workload=verify ferry.wss_mib=8");
    let mode = std::fs::metadata(&w.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "API socket mode {mode:o}");
    // The test directory is private; open it so another user can reach the socket at all.
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = || {
        let out = std::process::Command::new(bin())
            .args(["ctl", "--api-socket"])
            .arg(&w.socket)
            .arg("status")
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        assert!(!out.status.success(), "uid 65534 used the worker's API");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = as_nobody();
    assert!(e.contains("ermission denied"), "{e}");
    // A socket whose mode was widened by mistake still takes nobody else.
    std::fs::set_permissions(&w.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let e = as_nobody();
    assert!(e.contains("uid 65534 may not use this worker"), "{e}");
    // Its own user still can, and the VM ran on.
    assert_eq!(w.ctl(&["status"])["state"], "running");
    w.shutdown();
}
