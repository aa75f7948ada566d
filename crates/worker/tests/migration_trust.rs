//! Trust on the migration channel, with real workers, sockets and KVM: a receiver (mutual TLS,
//! one-time secret) refuses a plain TCP client, garbage bytes, a certificate of another CA, a
//! valid certificate of another node, a wrong secret and a plaintext source, each with a clear
//! error on the side that tried and in the receiver's log, while an idle connection is held
//! open; the source refuses a destination that is not the node it expects. The receiver
//! then takes the real migration and the guest runs on, verified. A plaintext receiver shows
//! the same for garbage and oversized frames, and its secret admits one session only.

mod common;
use common::*;
use migration::wire::{self, Msg, Role};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Waits for the moved guest to run on at the destination; checks the whole guest output.
fn check_after_move(src_log: &str, dst: &Worker) {
    let before = Log::parse(src_log);
    let need = before.hb_of(0).last().map(|h| h.counter).unwrap_or(0) + 3;
    let t0 = Instant::now();
    loop {
        let all = Log::parse(&format!("{src_log}{}", dst.log()));
        let d = Log::parse(&dst.log());
        if all.hb_of(0).last().map(|h| h.counter).unwrap_or(0) >= need
            && d.verify_ok.iter().any(|m| m["cpu"] == "0")
        {
            all.assert_hb_continuous(1);
            all.assert_no_corruption();
            return;
        }
        all.assert_no_corruption();
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "destination made no progress:\n{}",
            tail(&dst.log(), 20)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn guest(d: &Path) -> Worker {
    let src = Worker::run_guest(
        d,
        "src",
        1,
        128,
        "ferry.workload=verify ferry.wss_mib=16 ferry.hb_ms=5",
    );
    src.wait_log(Duration::from_secs(30), "the workload", |l| {
        l.min_hb_per_cpu(1) >= 3 && l.verify_ok_cpus().len() == 1
    });
    src
}

/// A failed `ctl migrate`: its kind and reason; the VM still runs at the source.
fn refused(src: &Worker, r: &MigrateResult) -> (String, String) {
    assert!(!r.ok, "the migration was not refused: {:?}", r.lines.last());
    let last = r.last();
    assert_eq!(last["reply"], "failed", "{last}");
    assert_eq!(last["source_running"], true, "{last}");
    assert_eq!(src.ctl(&["status"])["state"], "running");
    (
        last["kind"].as_str().unwrap_or("").to_string(),
        reason(last),
    )
}

fn with(mut args: Vec<String>, more: &[&str]) -> Vec<String> {
    args.extend(more.iter().map(|s| s.to_string()));
    args
}

/// Sends `bytes` on a fresh connection and reads until the receiver closes it (bounded):
/// the `Refuse` it sent, if it sent one.
fn probe(addr: &str, bytes: &[u8]) -> Option<String> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(bytes).unwrap();
    let mut got = Vec::new();
    let t = Instant::now();
    let _ = s.read_to_end(&mut got);
    assert!(
        t.elapsed() < Duration::from_secs(14),
        "the receiver kept the connection open"
    );
    match wire::recv_msg(&mut &got[..]) {
        Ok(Msg::Refuse { reason }) => Some(reason),
        Ok(m) => panic!("a stranger got {}", m.name()),
        Err(_) => None,
    }
}

fn hello(protocol: u32) -> Vec<u8> {
    let mut b = Vec::new();
    wire::send_msg(
        &mut b,
        &Msg::Hello {
            protocol,
            session: 42,
            role: Role::Control,
        },
    )
    .unwrap();
    b
}

#[test]
fn tls_receiver_refuses_strangers_then_takes_the_real_migration() {
    let dir = tempdir();
    let d = dir.path();
    let pki = TestPki::new(d);
    let src = guest(d);
    let (dst, secret) = Receiver::spawn_tls(d, "dst", &pki, &[]);
    let sec = secret.to_str().unwrap();

    // An idle connection, open through everything below: it blocks nothing.
    let mut idle = TcpStream::connect(&dst.addr).unwrap();
    let t_idle = Instant::now();

    // A plain TCP client speaking the migration protocol, and garbage bytes.
    assert_eq!(probe(&dst.addr, &hello(wire::PROTOCOL_VERSION)), None);
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    assert_eq!(probe(&dst.addr, &garbage), None);

    // Node src's name, but a certificate of another CA.
    let forged = with(
        TestPki::args_from(&pki.other, &pki.dir, "src", "dst"),
        &["--secret-file", sec],
    );
    let (kind, why) = refused(&src, &src.migrate(&dst.addr, &strs(&forged)));
    assert_eq!(kind, "unauthenticated", "{why}");
    assert!(
        why.contains("the peer refused this side's certificate"),
        "{why}"
    );

    // A valid certificate of this cluster, but of another node.
    let intruder = with(pki.args("intruder", "dst"), &["--secret-file", sec]);
    let (kind, why) = refused(&src, &src.migrate(&dst.addr, &strs(&intruder)));
    assert_eq!(kind, "unauthenticated", "{why}");
    assert!(
        why.contains("the peer refused this side's certificate"),
        "{why}"
    );

    // The source checks the destination too: it is not the node this source expects.
    let wrong_peer = with(pki.args("src", "intruder"), &["--secret-file", sec]);
    let (kind, why) = refused(&src, &src.migrate(&dst.addr, &strs(&wrong_peer)));
    assert_eq!(kind, "unauthenticated", "{why}");
    assert!(
        why.contains("the peer's certificate names node dst, not the expected node intruder"),
        "{why}"
    );

    // The right certificate and a wrong secret.
    let other_secret = pki.secret("not-dst");
    let wrong = with(
        pki.args("src", "dst"),
        &["--secret-file", other_secret.to_str().unwrap()],
    );
    let (kind, why) = refused(&src, &src.migrate(&dst.addr, &strs(&wrong)));
    assert_eq!(kind, "unauthenticated", "{why}");
    assert!(
        why.contains("the destination refused the control connection: wrong migration secret"),
        "{why}"
    );

    // A plaintext source.
    let (_, why) = refused(
        &src,
        &src.migrate(&dst.addr, &["--insecure", "--secret-file", sec]),
    );
    assert!(!why.is_empty());

    // The idle connection is still open (its handshake time has not run out) ...
    assert!(
        t_idle.elapsed() < migration::recv::HANDSHAKE_TIMEOUT,
        "the refusals took too long to test the idle connection"
    );
    idle.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    assert!(matches!(idle.peek(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock));
    idle.set_nonblocking(false).unwrap();

    // ... and is cut once its handshake time runs out; the receiver goes on waiting.
    idle.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let r = idle.read(&mut b);
    let t = t_idle.elapsed();
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(
        t >= migration::recv::HANDSHAKE_TIMEOUT
            && t < migration::recv::HANDSHAKE_TIMEOUT + Duration::from_secs(4),
        "the idle connection was cut after {t:?}"
    );
    // (Time for the receiver to log it before it is busy with the migration.)
    std::thread::sleep(Duration::from_millis(200));

    // The real migration goes through, with another idle connection open meanwhile.
    let _idle2 = TcpStream::connect(&dst.addr).unwrap();
    let s = src
        .migrate_tls(&dst.addr, &pki, &secret, &[])
        .summary()
        .clone();
    assert_eq!(s["protocol"], wire::PROTOCOL_VERSION);
    src.shutdown();
    let src_log = std::fs::read_to_string(d.join("src.serial")).unwrap();
    check_after_move(&src_log, &dst.w);

    // The receiver said why it refused each.
    let out = dst.w.shutdown();
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    for (what, needle) in [
        ("plain client and garbage", "refused: TLS handshake failed: TLS: the peer does not speak TLS"),
        ("another CA", "refused: TLS handshake failed: TLS: the peer's certificate is not signed by this cluster's CA"),
        ("another node", "refused: TLS handshake failed: TLS: the peer's certificate names node intruder, not the expected node src"),
        ("source expecting another node", "refused: TLS handshake failed: TLS: the peer refused this side's certificate"),
        ("wrong secret", "refused: wrong migration secret"),
        ("idle", "refused: TLS handshake failed: TLS handshake timed out"),
    ] {
        assert!(log.contains(needle), "{what}: no {needle:?} in:\n{log}");
    }
    assert!(
        log.matches("the peer does not speak TLS").count() >= 3,
        "{log}"
    );
}

#[test]
fn plaintext_receiver_survives_garbage_and_its_secret_admits_one_session() {
    let dir = tempdir();
    let d = dir.path();
    let pki = TestPki::new(d);
    let src = guest(d);
    let s1 = pki.secret("first");
    let first = Receiver::spawn(
        d,
        "first",
        &["--insecure", "--secret-file", s1.to_str().unwrap()],
    );
    let s1s = s1.to_str().unwrap();

    // Garbage, a frame header announcing 64 MiB (refused from the header: nothing is
    // allocated or waited for), a v3 Hello (no secret possible) and no secret at all.
    assert_eq!(probe(&first.addr, b"GET / HTTP/1.1\r\n\r\n"), None);
    let mut big = hello(wire::PROTOCOL_VERSION);
    big[8..12].copy_from_slice(&(64u32 << 20).to_le_bytes());
    assert_eq!(probe(&first.addr, &big[..wire::HEADER_LEN]), None);
    let v3 = probe(&first.addr, &hello(3)).unwrap();
    assert!(
        v3.contains("requires the migration's one-time secret"),
        "{v3}"
    );
    let (kind, why) = refused(&src, &src.migrate(&first.addr, &["--insecure"]));
    assert_eq!(kind, "unauthenticated", "{why}");
    assert!(why.contains("none was presented"), "{why}");

    // The secret admits one session (here a dry run); presenting it again is a replay.
    let ok = src.migrate(
        &first.addr,
        &["--insecure", "--secret-file", s1s, "--dry-run"],
    );
    assert_eq!(ok.summary()["dry_run"], true);
    let (kind, why) = refused(
        &src,
        &src.migrate(
            &first.addr,
            &["--insecure", "--secret-file", s1s, "--dry-run"],
        ),
    );
    assert_eq!(kind, "unauthenticated", "{why}");
    assert!(why.contains("replayed migration secret"), "{why}");
    let out = first.w.shutdown();
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    for needle in [
        "refused: corrupt stream: bad frame magic",
        &format!(
            "refused: corrupt stream: frame of {} bytes exceeds the {}-byte limit",
            64u32 << 20,
            wire::PRE_AUTH_MAX_PAYLOAD
        ),
        "refused: this destination requires the migration's one-time secret; none was presented",
        "refused: replayed migration secret",
    ] {
        assert!(log.contains(needle), "no {needle:?} in:\n{log}");
    }

    // A new receiver has its own secret: the first one is refused there, its own works.
    let s2 = pki.secret("second");
    let second = Receiver::spawn(
        d,
        "second",
        &["--insecure", "--secret-file", s2.to_str().unwrap()],
    );
    let (_, why) = refused(
        &src,
        &src.migrate(&second.addr, &["--insecure", "--secret-file", s1s]),
    );
    assert!(why.contains("wrong migration secret"), "{why}");
    src.migrate(
        &second.addr,
        &["--insecure", "--secret-file", s2.to_str().unwrap()],
    )
    .summary();
    src.shutdown();
    let src_log = std::fs::read_to_string(d.join("src.serial")).unwrap();
    check_after_move(&src_log, &second.w);
}

/// A receiver bound to its agent's plan (`--expect-config`) and confined to its storage
/// roots refuses a source that offers another VM (here one with a host file as its disk) and
/// a disk that leads out of its root through a symlink, each in preflight with the reason,
/// opening nothing of it; then it takes the planned VM.
#[test]
fn receiver_takes_only_the_planned_vm_and_opens_disks_only_beneath_its_roots() {
    let dir = tempdir();
    let d = dir.path();
    let store = d.join("store");
    std::fs::create_dir(&store).unwrap();
    // A "host file" the attacker names as its disk, and a symlink to it inside the root.
    let host_file = d.join("host-file");
    std::fs::write(&host_file, vec![0x5au8; 1 << 20]).unwrap();
    std::os::unix::fs::symlink(&host_file, store.join("escape.img")).unwrap();

    let cmdline = "ferry.workload=verify ferry.wss_mib=16 ferry.hb_ms=5";
    let planned = vmm::VmConfig {
        vcpus: 1,
        memory_mib: 128,
        kernel: vmm::KernelSource::TestGuest,
        initrd: None,
        cmdline: cmdline.into(),
        cpu_profile: "host".into(),
        disks: vec![],
        nics: vec![],
    };
    let plan = d.join("plan.json");
    std::fs::write(&plan, serde_json::to_vec(&planned).unwrap()).unwrap();
    let root = store.to_str().unwrap();
    let dst = Receiver::spawn(
        d,
        "dst",
        &[
            "--expect-config",
            plan.to_str().unwrap(),
            "--storage-root",
            root,
        ],
    );

    // Another VM: same guest, plus the host file as a read-write disk.
    let disk = format!("{}", host_file.display());
    let intruder = Worker::spawn(
        d,
        "intruder",
        &[
            "run",
            "--kernel",
            "test-guest",
            "--memory-mib",
            "128",
            "--cmdline",
            cmdline,
            "--disk",
            &disk,
        ],
    );
    let (kind, why) = refused(&intruder, &intruder.migrate(&dst.addr, &[]));
    assert_eq!(kind, "refused", "{why}");
    assert!(
        why.contains("not the one this node's agent planned")
            && why.contains(&format!(
                "the source offers disks [{disk}], this node's plan says []"
            )),
        "{why}"
    );
    intruder.shutdown();
    assert_eq!(std::fs::read(&host_file).unwrap(), vec![0x5au8; 1 << 20]);

    // The planned VM, but with its disk a symlink out of the root (a plan may name it: the
    // open beneath the root refuses it).
    let dst2 = Receiver::spawn(d, "dst2", &["--storage-root", root]);
    let escape = format!("{}/escape.img", root);
    let sneaky = Worker::spawn(
        d,
        "sneaky",
        &[
            "run",
            "--kernel",
            "test-guest",
            "--memory-mib",
            "128",
            "--cmdline",
            cmdline,
            "--disk",
            &format!("{escape},ro"),
        ],
    );
    let (kind, why) = refused(&sneaky, &sneaky.migrate(&dst2.addr, &[]));
    assert_eq!(kind, "refused", "{why}");
    assert!(
        why.contains(&format!(
            "disk image {escape} leads out of storage root {root}"
        )),
        "{why}"
    );
    sneaky.shutdown();
    drop(dst2);

    // The planned VM moves, verified, to the receiver that refused the intruder.
    let src = guest(d);
    src.migrate(&dst.addr, &[]).summary();
    src.shutdown();
    let src_log = std::fs::read_to_string(d.join("src.serial")).unwrap();
    check_after_move(&src_log, &dst.w);
}
