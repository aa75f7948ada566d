//! The worker runs under its seccomp filters (vmm::sandbox): every thread has the worker
//! filter, vCPU threads one more, and a forbidden system call kills the process. (Every
//! other worker test also checks that its workers run in filter mode: `common::Worker::spawn`.)

mod common;
use common::*;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn guest_args(dir: &Path, name: &str) -> Vec<String> {
    [
        "run",
        "--kernel",
        "test-guest",
        "--memory-mib",
        "64",
        "--cmdline",
        "ferry.workload=verify ferry.wss_mib=8",
        "--serial-log",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        dir.join(format!("{name}.serial")).display().to_string(),
        "--api-socket".into(),
        dir.join(format!("{name}.sock")).display().to_string(),
    ])
    .collect()
}

/// Runs a worker started to make the forbidden call `probe`; its exit status and stderr.
fn probe(dir: &Path, probe: &str, extra: &[&str]) -> (std::process::ExitStatus, String) {
    require_kvm();
    let mut args = guest_args(dir, probe);
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut child = Command::new(bin())
        .args(&args)
        .env("FERRY_SANDBOX_PROBE", probe)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(5) {
            child.kill().unwrap();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status, err)
}

#[test]
fn a_forbidden_system_call_kills_the_worker() {
    let dir = tempdir();
    let d = dir.path();
    // The main thread executing a program.
    let (st, err) = probe(d, "exec", &[]);
    assert!(err.contains("sandbox probe: executing /bin/true"), "{err}");
    assert!(!err.contains("let it through"), "{err}");
    assert_eq!(st.signal(), Some(libc::SIGSYS), "{st:?}: {err}");
    // A vCPU thread opening a socket.
    let (st, err) = probe(d, "vcpu-socket", &[]);
    assert_eq!(st.signal(), Some(libc::SIGSYS), "{st:?}: {err}");
    // A vCPU thread opening an existing file (vCPU threads may only create new ones).
    let (st, err) = probe(d, "vcpu-open", &[]);
    assert!(
        err.contains("a vCPU thread opens /proc/self/status"),
        "{err}"
    );
    assert!(!err.contains("let it through"), "{err}");
    assert_eq!(st.signal(), Some(libc::SIGSYS), "{st:?}: {err}");
    // The main thread opening a netlink socket (sockets: Unix, IPv4, IPv6 only).
    let (st, err) = probe(d, "netlink", &[]);
    assert!(err.contains("opening a netlink socket"), "{err}");
    assert!(!err.contains("let it through"), "{err}");
    assert_eq!(st.signal(), Some(libc::SIGSYS), "{st:?}: {err}");
    // The main thread making an ioctl request off the list (TIOCSTI) while KVM's go on.
    let (st, err) = probe(d, "tiocsti", &[]);
    assert!(err.contains("a TIOCSTI ioctl"), "{err}");
    assert!(!err.contains("let it through"), "{err}");
    assert_eq!(st.signal(), Some(libc::SIGSYS), "{st:?}: {err}");
    // Without a probe the same worker, under the same filters, runs until the deadline.
    let (st, err) = probe(d, "none", &[]);
    assert_eq!(st.signal(), Some(libc::SIGKILL), "{st:?}: {err}");
    // Without the filters the same calls go through: it is the filter that kills.
    let (st, err) = probe(d, "exec", &["--no-seccomp"]);
    assert!(
        err.contains("the filter let it through: Ok"),
        "{st:?}: {err}"
    );
    assert!(err.contains("without its seccomp filters"), "{err}");
    assert_eq!(
        st.signal(),
        Some(libc::SIGKILL),
        "it ran until killed: {st:?}: {err}"
    );
}

#[test]
fn every_thread_is_filtered_and_vcpus_twice() {
    let dir = tempdir();
    let w = Worker::run_guest(
        dir.path(),
        "g",
        2,
        64,
        "ferry.workload=verify ferry.wss_mib=8",
    );
    w.wait_log(Duration::from_secs(30), "a verify sweep", |l| {
        !l.verify_ok.is_empty()
    });
    let pid = w.child.as_ref().unwrap().id() as i32;
    let main = proc_status_field(pid, pid, "Seccomp_filters").unwrap();
    assert!(main >= 2, "main thread has {main} filters");
    let mut vcpus = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid: i32 = t.unwrap().file_name().to_string_lossy().parse().unwrap();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap();
        assert_eq!(seccomp_mode(pid, tid), Some(2), "thread {}", comm.trim());
        let n = proc_status_field(pid, tid, "Seccomp_filters").unwrap();
        if comm.starts_with("vcpu") {
            vcpus += 1;
            assert_eq!(n, main + 1, "{}", comm.trim());
        } else {
            assert!(n >= main, "{} has {n} filters", comm.trim());
        }
    }
    assert_eq!(vcpus, 2);
    w.shutdown();
}
