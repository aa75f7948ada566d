//! Mixed-version migrations: a destination accepts a source of an older state format (version
//! 2 with wire protocol 2, version 3 with protocol 3) and decodes its `STATE` frame in that
//! version; the guest carries on. Versions outside 2..=4 are refused in preflight, by number.

use migration::preflight::{self, DestinationLimits, PreflightRequest};
use migration::recv::{self, ReceiveControl, ReceiveOptions};
use migration::send::{self, MigrationControl, SendOptions};
use migration::wire;
use std::path::Path;
use std::time::{Duration, Instant};
use vmm::config::{MacAddr, NicConfig};
use vmm::devices::virtio::{HostDevices, NetBackend};
use vmm::{KernelSource, Vm, VmConfig};

fn config(vcpus: u8, nics: Vec<NicConfig>) -> VmConfig {
    VmConfig {
        vcpus,
        memory_mib: 64,
        kernel: KernelSource::TestGuest,
        initrd: None,
        cmdline: "ferry.workload=verify ferry.wss_mib=8 ferry.hb_ms=20".into(),
        cpu_profile: "host".into(),
        disks: vec![],
        nics,
    }
}

/// A TAP of its own for each side (the NIC is what formats 2 and 3 lay out differently).
fn tap(side: &str) -> NetBackend {
    NetBackend::Tap(tap_name(side))
}

fn tap_name(side: &str) -> String {
    format!("fsv{side}{}", std::process::id() % 100_000)
}

/// A TAP the host sends nothing into: created (persistent) with IPv6 off before Ferry opens it
/// and brings it up. Otherwise the host's IPv6 autoconfiguration frames wait in it, the source
/// saves them as the NIC's receive backlog, and a version 2 state cannot carry that (the
/// migration fails before the commit, as it should).
struct QuietTap(String);

impl QuietTap {
    fn new(name: String) -> QuietTap {
        let ip = |args: &[&str]| {
            let st = std::process::Command::new("ip")
                .args(args)
                .status()
                .unwrap();
            assert!(st.success(), "ip {args:?} failed");
        };
        ip(&["tuntap", "add", "dev", &name, "mode", "tap", "vnet_hdr"]);
        let t = QuietTap(name);
        let knob = format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", t.0);
        if Path::new(&knob).exists() {
            std::fs::write(&knob, "1").unwrap();
        }
        t
    }
}

impl Drop for QuietTap {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["tuntap", "del", "dev", &self.0, "mode", "tap"])
            .status();
    }
}

/// Heartbeat counters of `cpu` (`hb <cpu> <counter> <tsc>`), complete lines only.
fn hbs(log: &str, cpu: u32) -> Vec<u64> {
    let complete = &log[..log.rfind('\n').map(|i| i + 1).unwrap_or(0)];
    complete
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 4 && f[0] == "hb" && f[1].parse::<u32>().ok()? == cpu)
                .then(|| f[2].parse::<u64>().ok())
                .flatten()
        })
        .collect()
}

fn wait_for(log: &Path, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if pred(&text) {
            return text;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn preflight_accepts_state_versions_2_to_4_only() {
    let kvm = vmm::open_kvm().unwrap();
    let vm = Vm::create(
        &kvm,
        config(1, vec![]),
        &Default::default(),
        tempfile::tempfile().unwrap(),
    )
    .unwrap();
    let limits = DestinationLimits::default();
    let req = |state_version| PreflightRequest {
        state_version,
        config: vm.config().clone(),
        layout: vm.ram().layout().clone(),
        cpuid: vm.cpuid().clone(),
        source: preflight::host_summary(&kvm, &limits),
        disks: vec![],
    };
    assert_eq!(
        (wire::MIN_STATE_VERSION, wire::STATE_VERSION),
        (2, 4),
        "update this test with the versions"
    );
    for v in [2, 3, 4] {
        let r = preflight::check(&kvm, &req(v), &limits);
        assert!(
            !r.problems.iter().any(|p| p.contains("state version")),
            "version {v}: {:?}",
            r.problems
        );
    }
    for v in [0, 1, 5, 7] {
        let r = preflight::check(&kvm, &req(v), &limits);
        assert!(!r.ok);
        assert!(
            r.problems.contains(&format!(
                "VM state version {v} is not supported here (this destination reads versions 2-4)"
            )),
            "version {v}: {:?}",
            r.problems
        );
    }
}

#[test]
fn a_version_2_source_migrates_to_this_build_and_the_guest_carries_on() {
    old_source_migrates(2, 2, 0x03);
}

#[test]
fn a_version_3_source_migrates_to_this_build_and_the_guest_carries_on() {
    old_source_migrates(3, 3, 0x04);
}

/// A source that sends state format `state_version` over wire protocol `protocol`, as the
/// build that wrote that format did.
fn old_source_migrates(state_version: u32, protocol: u32, mac_last: u8) {
    let dir = tempfile::tempdir().unwrap();
    let kvm = vmm::open_kvm().unwrap();
    let (src_log, dst_log) = (dir.path().join("src.log"), dir.path().join("dst.log"));
    let vcpus = 2u8;
    let nic = NicConfig {
        mac: MacAddr([0x02, 0xf5, 0x5c, 0, 0, mac_last]),
    };
    // Each version's test has TAPs of its own (the tests run in parallel).
    let (src_side, dst_side) = (format!("s{state_version}"), format!("d{state_version}"));
    let _quiet = QuietTap::new(tap_name(&src_side));
    let vm = Vm::create(
        &kvm,
        config(vcpus, vec![nic]),
        &HostDevices {
            nets: vec![tap(&src_side)],
        },
        std::fs::File::create(&src_log).unwrap(),
    )
    .unwrap();
    vm.start().unwrap();
    wait_for(&src_log, "heartbeats and a sweep", |t| {
        t.contains("verify ok ") && (0..vcpus as u32).all(|c| hbs(t, c).len() >= 3)
    });

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let to = listener.local_addr().unwrap().to_string();
    let serial = std::fs::File::create(&dst_log).unwrap();
    let receiver = std::thread::spawn(move || {
        let kvm = vmm::open_kvm().unwrap();
        recv::receive(
            &kvm,
            &listener,
            &ReceiveOptions {
                limits: DestinationLimits {
                    net_backends: vec![tap(&dst_side)],
                    ..Default::default()
                },
                ..Default::default()
            },
            serial,
            &ReceiveControl::default(),
            &|why| panic!("session ended early: {why}"),
        )
    });
    let summary = send::migrate(
        &vm,
        &SendOptions {
            state_version,
            max_protocol: protocol,
            ..SendOptions::new(to, Default::default())
        },
        &MigrationControl::default(),
    )
    .unwrap();
    assert!(!summary.dry_run && summary.preflight.ok);
    assert_eq!(summary.protocol, protocol);
    vm.stop();
    let before = std::fs::read_to_string(&src_log).unwrap();
    let moved = receiver.join().unwrap().unwrap();
    let last: Vec<u64> = (0..vcpus as u32)
        .map(|c| *hbs(&before, c).last().unwrap())
        .collect();
    let after = wait_for(&dst_log, "the guest to go on", |t| {
        t.matches("verify ok ").count() >= 2 * vcpus as usize
            && (0..vcpus as u32).all(|c| hbs(t, c).last() >= Some(&(last[c as usize] + 3)))
    });
    moved.stop();
    assert!(!after.contains("CORRUPT"), "{after}");
    let all = before + &after;
    for c in 0..vcpus as u32 {
        let h = hbs(&all, c);
        assert!(
            h.windows(2).all(|w| w[1] == w[0] + 1),
            "cpu {c}: heartbeat counters not continuous across the move: {h:?}"
        );
    }
}
