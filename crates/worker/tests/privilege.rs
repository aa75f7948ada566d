//! A worker given `--user` opens what its VM needs as root (/dev/kvm, a disk image only root
//! can open, its socket), then runs as that user with no capabilities: the VM works (the
//! disk-log guest keeps every acknowledged record across live migrations over mutual TLS, to a
//! receiver that dropped root too and on from it, with node keys only root can read), and the
//! worker can create nothing where its user may not, even through its own control API; a
//! restore with `--user` takes only the VM it was told to expect.

mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const SRC_UID: u32 = 2_000_000_101;
const DST_UID: u32 = 2_000_000_102;

/// A directory owned by `uid` (the worker's serial log goes there).
fn dir_for(parent: &Path, name: &str, uid: u32) -> PathBuf {
    let d = parent.join(name);
    std::fs::create_dir(&d).unwrap();
    std::os::unix::fs::chown(&d, Some(uid), Some(uid)).unwrap();
    d
}

/// A disk image only root can open: 0600 in a 0700 directory, both root's.
fn private_image(parent: &Path) -> PathBuf {
    let d = parent.join("private");
    std::fs::create_dir(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
    let p = d.join("disk.img");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(8 << 20).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// `key:` of /proc/PID/status, split into words.
fn status_words(pid: u32, key: &str) -> Vec<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// The process runs as `uid` (real, effective, saved, fs; group likewise, no supplementary
/// groups), with no capabilities and no way to gain any, under its seccomp filter.
fn assert_unprivileged(w: &Worker, uid: u32) {
    let pid = w.child.as_ref().unwrap().id();
    let u = uid.to_string();
    assert_eq!(status_words(pid, "Uid:"), [u.as_str(); 4], "{}", w.name);
    assert_eq!(status_words(pid, "Gid:"), [u.as_str(); 4], "{}", w.name);
    assert!(status_words(pid, "Groups:").is_empty(), "{}", w.name);
    for cap in ["CapInh:", "CapPrm:", "CapEff:", "CapAmb:"] {
        assert_eq!(
            status_words(pid, cap),
            ["0000000000000000"],
            "{} {cap}",
            w.name
        );
    }
    assert_eq!(status_words(pid, "NoNewPrivs:"), ["1"], "{}", w.name);
    assert_eq!(status_words(pid, "Seccomp:"), ["2"], "{}", w.name);
}

/// The VM of these tests as an agent plans it (`--expect-config`): the test guest with `disk`.
fn planned(memory_mib: u64, cmdline: &str, disk: &Path) -> vmm::VmConfig {
    vmm::VmConfig {
        vcpus: 1,
        memory_mib,
        kernel: vmm::KernelSource::TestGuest,
        initrd: None,
        cmdline: cmdline.into(),
        cpu_profile: "host".into(),
        disks: vec![vmm::config::DiskConfig {
            path: disk.to_path_buf(),
            read_only: false,
        }],
        nics: vec![],
    }
}

fn wait_records(w: &Worker, n: usize) {
    let before = disk_seqs(&w.log()).len();
    w.wait_log(Duration::from_secs(30), "disk records", |_| {
        disk_seqs(&w.log()).len() >= before + n
    });
}

#[test]
fn an_unprivileged_worker_runs_and_migrates_its_vm_and_opens_nothing_new() {
    let dir = tempdir();
    let d = dir.path();
    let img = private_image(d);
    let cmdline = "ferry.workload=disk-log ferry.disk_rate=400 ferry.disk_flush=8";
    // Node identities only root can read (0600 keys in root's 0700 directory): the workers
    // read theirs before they drop root.
    let pki = TestPki::new(d);
    let src_files = trust::pki::node_files(&pki.dir, "src");
    let ca = pki.dir.join(trust::pki::CA_CERT);
    let src_dir = dir_for(d, "src", SRC_UID);
    let user = format!("{SRC_UID}");
    let src = Worker::spawn(
        &src_dir,
        "src",
        &[
            "run",
            "--tls-cert",
            src_files.cert.to_str().unwrap(),
            "--tls-key",
            src_files.key.to_str().unwrap(),
            "--tls-ca",
            ca.to_str().unwrap(),
            "--kernel",
            "test-guest",
            "--memory-mib",
            "64",
            "--cmdline",
            cmdline,
            "--disk",
            img.to_str().unwrap(),
            "--user",
            &user,
        ],
    );
    assert_unprivileged(&src, SRC_UID);
    src.wait_log(Duration::from_secs(30), "the boot check", |l| {
        l.other.iter().any(|x| x == "disk ok last=0")
    });
    wait_records(&src, 30);

    // Its user cannot create a file where root keeps its own: a snapshot into the private
    // directory is refused (as root it would have been written), and the VM runs on.
    let snap = img.with_file_name("snap");
    let out = std::process::Command::new(bin())
        .args(["ctl", "--api-socket", src.socket.to_str().unwrap()])
        .args(["snapshot", snap.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the snapshot was written");
    assert!(err.contains("ermission denied"), "{err}");
    assert!(!snap.exists());
    assert_eq!(src.ctl(&["status"])["state"], "running");
    wait_records(&src, 10);

    // The receiver is bound to the planned VM and opens its disk before it drops root too.
    let plan = d.join("plan.json");
    std::fs::write(
        &plan,
        serde_json::to_vec(&planned(64, cmdline, &img)).unwrap(),
    )
    .unwrap();
    let dst_dir = dir_for(d, "dst", DST_UID);
    // (A TLS receiver opens disks only beneath its storage roots.)
    let root = img.parent().unwrap().to_str().unwrap();
    let dst_user = format!("{DST_UID}:{DST_UID}");
    let (dst, secret) = Receiver::spawn_tls(
        &dst_dir,
        "dst",
        &pki,
        &[
            "--expect-config",
            plan.to_str().unwrap(),
            "--user",
            &dst_user,
            "--storage-root",
            root,
        ],
    );
    assert_unprivileged(&dst.w, DST_UID);
    let r = src.migrate_tls(&dst.addr, &pki, &secret, &[]);
    assert!(r.summary()["downtime_ms"].as_f64().unwrap() > 0.0);
    let src_log = src.log();
    src.shutdown();
    wait_records(&dst.w, 40);
    assert_unprivileged(&dst.w, DST_UID);
    // Every record the source acknowledged is followed by the next one on the destination
    // (the serial stream continues too: a line cut by the pause ends on the next host).
    let assert_continues = |before: &str, after: &str| {
        let all = disk_seqs(&format!("{before}{after}"));
        for w in all.windows(2) {
            assert_eq!(w[1], w[0] + 1, "sequence broken across the migration");
        }
        assert!(
            all.len() > disk_seqs(before).len() + 10,
            "no records after the move"
        );
    };
    assert_continues(&src_log, &dst.w.log());

    // And on, out of the unprivileged receiver, over TLS as node dst (the identity it read
    // at start), to a receiver of node src.
    let back_secret = pki.secret("back");
    let mut back_args = pki.args("src", "dst");
    back_args.extend([
        "--secret-file".into(),
        back_secret.to_str().unwrap().into(),
        "--storage-root".into(),
        root.into(),
    ]);
    let back = Receiver::spawn(d, "back", &strs(&back_args));
    let mut out_args = pki.args("dst", "src");
    out_args.extend(["--secret-file".into(), back_secret.to_str().unwrap().into()]);
    let r = dst.w.migrate(&back.addr, &strs(&out_args));
    assert!(r.ok, "{}", r.stderr);
    let dst_log = dst.w.log();
    dst.w.shutdown();
    wait_records(&back.w, 40);
    assert_continues(&dst_log, &back.w.log());
    for log in [&src_log, &dst_log, &back.w.log()] {
        assert!(!log.contains("disk CORRUPT") && !log.contains("PANIC"));
    }
    back.w.shutdown();
}

#[test]
fn user_is_checked() {
    let dir = tempdir();
    let d = dir.path();
    let base = |mode: &str| -> Vec<String> {
        let mut v: Vec<String> = match mode {
            "run" => ["run", "--kernel", "test-guest"].map(String::from).to_vec(),
            _ => ["receive", "--insecure", "--listen", "127.0.0.1:0"]
                .map(String::from)
                .to_vec(),
        };
        v.extend([
            "--serial-log".into(),
            d.join("x.serial").display().to_string(),
            "--api-socket".into(),
            d.join("x.sock").display().to_string(),
        ]);
        v
    };
    let fail = |mode: &str, extra: &[&str]| {
        let mut a = base(mode);
        a.extend(extra.iter().map(|s| s.to_string()));
        run_fail(&strs(&a)).1
    };
    let e = fail("run", &["--user", "root"]);
    assert!(e.contains("refusing to run the worker as root"), "{e}");
    let e = fail("run", &["--user", "0:5"]);
    assert!(e.contains("refusing to run the worker as root"), "{e}");
    let e = fail("run", &["--user", "no-such-user-anywhere"]);
    assert!(e.contains("unknown user"), "{e}");
    // (A receiver also warns about --insecure: not through `run_fail`'s one-line check.)
    let out = std::process::Command::new(bin())
        .args(base("receive"))
        .args(["--user", "2000000103"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{e}");
    assert!(e.contains("error: --user needs --expect-config"), "{e}");
    // The serial log's directory must be the user's: here it is root's (0700).
    let out = std::process::Command::new(bin())
        .args(base("run"))
        .args(["--user", "2000000103"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{e}");
    assert!(
        e.contains("error: cannot create serial log") && e.contains("ermission denied"),
        "{e}"
    );
}

/// `restore --user` takes the VM it was told to expect (`--expect-config`): the snapshot (in a
/// directory only root can read) and the disk image are opened before root is dropped, the
/// restored guest goes on writing its disk log where it stopped, and a snapshot of another VM
/// is refused before anything is restored.
#[test]
fn an_unprivileged_restore_takes_only_the_expected_vm() {
    let dir = tempdir();
    let d = dir.path();
    let img = private_image(d);
    let cmdline = "ferry.workload=disk-log ferry.disk_rate=400 ferry.disk_flush=8";
    let src = Worker::spawn(
        d,
        "src",
        &[
            "run",
            "--kernel",
            "test-guest",
            "--memory-mib",
            "64",
            "--cmdline",
            cmdline,
            "--disk",
            img.to_str().unwrap(),
        ],
    );
    src.wait_log(Duration::from_secs(30), "the boot check", |l| {
        l.other.iter().any(|x| x == "disk ok last=0")
    });
    wait_records(&src, 20);
    let snap = img.with_file_name("vm.snap");
    src.ctl(&["pause"]);
    src.ctl(&["snapshot", snap.to_str().unwrap()]);
    let src_log = src.log();
    src.shutdown();

    let planned = |memory_mib| planned(memory_mib, cmdline, &img);
    let plan = d.join("plan.json");
    std::fs::write(&plan, serde_json::to_vec(&planned(64)).unwrap()).unwrap();
    let other = d.join("other.json");
    std::fs::write(&other, serde_json::to_vec(&planned(128)).unwrap()).unwrap();
    let user = format!("{DST_UID}");
    let rdir = dir_for(d, "r", DST_UID);
    let restore = |name: &str, plan: Option<&Path>| -> Vec<String> {
        let mut a = vec![
            "restore".to_string(),
            "--snapshot".into(),
            snap.display().to_string(),
            "--user".into(),
            user.clone(),
        ];
        if let Some(p) = plan {
            a.extend(["--expect-config".into(), p.display().to_string()]);
        }
        a.extend([
            "--serial-log".into(),
            rdir.join(format!("{name}.serial")).display().to_string(),
            "--api-socket".into(),
            rdir.join(format!("{name}.sock")).display().to_string(),
        ]);
        a
    };
    let (_, e) = run_fail(&strs(&restore("x", None)));
    assert!(e.contains("error: --user needs --expect-config"), "{e}");
    // (Checked after the drop: the snapshot is untrusted input. Nothing is restored.)
    let out = std::process::Command::new(bin())
        .args(restore("y", Some(&other)))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{e}");
    assert!(
        e.contains("holds another VM than --expect-config names: memory (MiB) 64 in the snapshot, 128 expected"),
        "{e}"
    );
    assert!(
        !rdir.join("y.sock").exists() || !e.contains("restored"),
        "{e}"
    );
    // (Worker::spawn names the serial log and socket itself.)
    let args = restore("r", Some(&plan));
    let r = Worker::spawn(&rdir, "r", &strs(&args[..7]));
    assert_unprivileged(&r, DST_UID);
    wait_records(&r, 20);
    let all = disk_seqs(&format!("{src_log}{}", r.log()));
    for w in all.windows(2) {
        assert_eq!(w[1], w[0] + 1, "sequence broken across the restore");
    }
    assert!(!r.log().contains("disk CORRUPT") && !r.log().contains("PANIC"));
    r.shutdown();
}
