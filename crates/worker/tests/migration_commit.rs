//! Externally decided commits (what a cluster agent does with its store compare-and-swap): the
//! source waits for the decision once the destination holds the VM; the destination accepts
//! the decision from its own side too, and never gives up a VM whose commit may have happened.

mod common;
use common::*;
use std::time::{Duration, Instant};
use worker::api::{CommitDecision, MigrateCommand, MigrateSession, Reply};

fn args(to: &str) -> MigrateCommand {
    MigrateCommand {
        to: to.into(),
        params: Default::default(),
        dry_run: false,
        external_commit: true,
        handover: false,
        max_protocol: None,
        transport: contract::trust::Transport::Insecure,
        secret: None,
    }
}

/// Runs the session until `commit-ready`; returns it (the VM is paused on the source now).
fn until_ready(src: &Worker, to: &str) -> MigrateSession {
    let mut s = MigrateSession::start(&src.socket, args(to)).unwrap();
    loop {
        match s.next_reply().unwrap() {
            Reply::Progress(_) => continue,
            Reply::CommitReady => return s,
            other => panic!("expected commit-ready, got {other:?}"),
        }
    }
}

fn final_line(s: &mut MigrateSession) -> Reply {
    loop {
        let r = s.next_reply().unwrap();
        if !matches!(r, Reply::Progress(_)) {
            return r;
        }
    }
}

fn pair(d: &std::path::Path) -> (Worker, Receiver) {
    let src = Worker::run_guest(
        d,
        "src",
        2,
        128,
        "ferry.workload=verify ferry.wss_mib=32 ferry.hb_ms=10",
    );
    src.wait_log(Duration::from_secs(30), "verify", |l| {
        l.verify_ok_cpus().len() == 2
    });
    let dst = Receiver::spawn(d, "dst", &["--external-commit"]);
    (src, dst)
}

fn dst_verifies(dst: &Worker) {
    dst.wait_log(Duration::from_secs(30), "verify on the destination", |l| {
        l.verify_ok_cpus().len() == 2
    })
    .assert_no_corruption();
    assert_eq!(dst.ctl(&["status"])["state"], "running");
}

#[test]
fn commit_decided_by_the_client() {
    let dir = tempdir();
    let (src, dst) = pair(dir.path());
    let mut s = until_ready(&src, &dst.addr);
    assert_eq!(
        src.ctl(&["status"])["state"],
        "paused",
        "the VM waits paused for the decision"
    );
    s.decide(CommitDecision::Commit).unwrap();
    let last = final_line(&mut s);
    assert!(matches!(last, Reply::Done(_)), "{last:?}");
    src.shutdown();
    dst_verifies(&dst.w);
    dst.w.shutdown();
}

#[test]
fn abort_decided_by_the_client_keeps_the_vm_on_the_source() {
    let dir = tempdir();
    let (src, mut dst) = pair(dir.path());
    let mut s = until_ready(&src, &dst.addr);
    s.decide(CommitDecision::Abort).unwrap();
    let Reply::Failed(f) = final_line(&mut s) else {
        panic!("the migration must fail")
    };
    assert!(f.source_running, "{f:?}");
    assert_eq!(f.kind, contract::FailureKind::CommitRefused, "{f:?}");
    assert_eq!(f.commit, contract::CommitPoint::Before, "{f:?}");
    assert_eq!(src.ctl(&["status"])["state"], "running");
    let n = Log::parse(&src.log()).verify_ok.len();
    src.wait_log(Duration::from_secs(30), "more sweeps", |l| {
        l.verify_ok.len() >= n + 2
    })
    .assert_no_corruption();
    let out = wait_with_timeout(dst.w.child.take().unwrap(), Duration::from_secs(20));
    assert!(!out.status.success(), "the destination must discard the VM");
    src.shutdown();
}

#[test]
fn destination_resumes_on_its_own_agents_word_when_the_source_is_gone() {
    // The store's CAS succeeded but the source (worker and agent) died before telling the
    // destination: only the destination's agent knows, and it must be able to resume the VM.
    let dir = tempdir();
    let (mut src, dst) = pair(dir.path());
    let s = until_ready(&src, &dst.addr);
    let mut c = src.child.take().unwrap();
    c.kill().unwrap();
    c.wait().unwrap();
    drop(s);
    // The destination does not give up the VM: it waits for a decision.
    let t0 = Instant::now();
    loop {
        let st = dst.w.ctl(&["status"]);
        if st["migration"]["awaiting_decision"] == true
            && st["migration"]["source_connected"] == false
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "destination state: {st}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(dst.w.socket.exists(), "the destination must keep waiting");
    assert_eq!(dst.w.ctl(&["commit"])["decision"], "commit");
    let src_log = std::fs::read_to_string(dir.path().join("src.serial")).unwrap();
    let t0 = Instant::now();
    loop {
        let all = Log::parse(&format!("{src_log}{}", dst.w.log()));
        if Log::parse(&dst.w.log()).verify_ok_cpus().len() == 2 {
            all.assert_hb_continuous(2);
            all.assert_no_corruption();
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
    }
    dst.w.shutdown();
}

#[test]
fn a_lost_decision_leaves_the_source_paused_until_told() {
    // The client (agent) disappears before deciding: the source cannot know whether the CAS
    // happened, so it neither resumes nor commits; the VM stays paused until somebody decides.
    let dir = tempdir();
    let (src, mut dst) = pair(dir.path());
    let s = until_ready(&src, &dst.addr);
    drop(s);
    let t0 = Instant::now();
    loop {
        let st = src.ctl(&["status"]);
        let active = st["migration"]["active"].as_bool().unwrap_or(true);
        if !active {
            assert_eq!(st["state"], "paused", "{st}");
            assert_eq!(st["migration"]["failure"]["kind"], "commit-unknown", "{st}");
            assert_eq!(st["migration"]["failure"]["commit"], "unknown", "{st}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{st}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The destination is still waiting too; the owner stayed (say) on the source: abort there,
    // resume here.
    assert_eq!(dst.w.ctl(&["abort"])["decision"], "abort");
    let out = wait_with_timeout(dst.w.child.take().unwrap(), Duration::from_secs(20));
    assert!(!out.status.success());
    src.ctl(&["resume"]);
    let n = Log::parse(&src.log()).verify_ok.len();
    src.wait_log(Duration::from_secs(30), "sweeps after resume", |l| {
        l.verify_ok.len() >= n + 2
    })
    .assert_no_corruption();
    src.shutdown();
}

#[test]
fn destination_resumed_on_its_agents_word_first_and_the_source_still_reports_the_summary() {
    // A cluster's usual race: the store's swap is seen by the destination's agent, which
    // resumes its receiver before the source's Commit arrives; the destination then closes.
    // The source's Commit meets a closed connection, but the Resumed it was sent is there:
    // the migration is done with its numbers, not "unconfirmed".
    let dir = tempdir();
    let (src, dst) = pair(dir.path());
    let mut s = until_ready(&src, &dst.addr);
    assert_eq!(dst.w.ctl(&["commit"])["decision"], "commit");
    let t0 = Instant::now();
    while dst.w.ctl(&["status"])["state"] != "running" {
        assert!(t0.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(10));
    }
    // Let the destination finish its side (Resumed sent, connection closed) first.
    std::thread::sleep(Duration::from_millis(300));
    s.decide(CommitDecision::Commit).unwrap();
    let last = final_line(&mut s);
    let Reply::Done(summary) = last else {
        panic!("the migration must end done with its summary: {last:?}")
    };
    assert!(summary.downtime_ms > 0.0, "{summary:?}");
    src.shutdown();
    dst_verifies(&dst.w);
    dst.w.shutdown();
}
