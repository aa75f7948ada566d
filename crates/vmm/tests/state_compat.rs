//! State format compatibility: snapshots in format versions 2 (no NIC receive backlog) and 3
//! (no CMOS RTC) made from a real running test-guest VM with a disk and a NIC restore, and the
//! guest carries on; their states decode to exactly the current state with empty backlogs and a
//! fresh RTC; versions outside 2..=4 are refused by number; a damaged version 2 file is refused
//! as strictly as a current one.

use std::path::Path;
use std::time::{Duration, Instant};
use vmm::config::{DiskConfig, MacAddr, NicConfig};
use vmm::devices::rtc::RtcState;
use vmm::devices::virtio::{DeviceSnap, HostDevices, NetBackend};
use vmm::snapshot::{self, SnapshotError};
use vmm::vm::MachineState;
use vmm::{KernelSource, Vm, VmConfig};

const VCPUS: u8 = 2;

fn wait_for(log: &Path, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if pred(&text) {
            return text;
        }
        assert!(
            !text.contains("PANIC"),
            "guest panicked waiting for {what}:\n{text}"
        );
        assert!(
            t0.elapsed() < timeout,
            "timed out waiting for {what}; serial log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A TAP name of its own for every NIC of this test process (tests run in parallel).
fn tap_name() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("fsc{}x{n}", std::process::id() % 100_000)
}

fn config(dir: &Path) -> VmConfig {
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    VmConfig {
        vcpus: VCPUS,
        memory_mib: 64,
        kernel: KernelSource::TestGuest,
        initrd: None,
        cmdline: "ferry.workload=verify ferry.wss_mib=8 ferry.hb_ms=20".into(),
        cpu_profile: "host".into(),
        disks: vec![DiskConfig {
            path: image,
            read_only: false,
        }],
        nics: vec![NicConfig {
            mac: MacAddr([0x02, 0xf5, 0x5c, 0, 0, 0x02]),
        }],
    }
}

fn host() -> HostDevices {
    HostDevices {
        nets: vec![NetBackend::Tap(tap_name())],
    }
}

/// The state with every NIC's receive backlog emptied: what a version 2 build would have saved.
fn without_backlog(mut s: MachineState) -> MachineState {
    for v in &mut s.devices.virtio {
        if let DeviceSnap::Net(n) = &mut v.device {
            n.rx_backlog.clear();
        }
    }
    s
}

/// Every heartbeat counter of `cpu`, in order (complete lines only).
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

/// The counter of cpu `cpu`'s last complete heartbeat line (`hb <cpu> <counter> <tsc>`).
fn last_hb(log: &str, cpu: u32) -> Option<u64> {
    hbs(log, cpu).last().copied()
}

/// Runs the guest until both vCPUs beat and one sweep verified, pauses it, and writes its
/// snapshot in format version 2. Returns the (backlog-free) state it saved and the serial log
/// up to the pause.
fn make_v2_snapshot(dir: &Path, path: &Path) -> (MachineState, String) {
    make_old_snapshot(dir, path, 2)
}

/// The same in format `version`.
fn make_old_snapshot(dir: &Path, path: &Path, version: u32) -> (MachineState, String) {
    let kvm = vmm::open_kvm().unwrap();
    let log = dir.join("src.log");
    let vm = Vm::create(
        &kvm,
        config(dir),
        &host(),
        std::fs::File::create(&log).unwrap(),
    )
    .unwrap();
    vm.start().unwrap();
    wait_for(
        &log,
        "heartbeats and a sweep",
        Duration::from_secs(60),
        |t| t.contains("verify ok ") && (0..VCPUS as u32).all(|c| last_hb(t, c) >= Some(3)),
    );
    vm.pause().unwrap();
    let state = without_backlog(vm.save_state().unwrap());
    // The test guest never touches the RTC: its state is a fresh clock's, which versions 2
    // and 3 (no RTC) express by leaving it out.
    assert_eq!(state.devices.rtc, RtcState::default());
    let stats = snapshot::write_versioned(path, version, &state, vm.ram().as_ref()).unwrap();
    assert_eq!(stats.format_version, version);
    vm.flush_serial();
    let text = std::fs::read_to_string(&log).unwrap();
    vm.stop();
    (state, text)
}

fn old_snapshot_restores_and_the_guest_carries_on(version: u32) {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join(format!("v{version}.snap"));
    let (saved, before) = make_old_snapshot(dir.path(), &snap, version);
    let hb: Vec<u64> = (0..VCPUS as u32)
        .map(|c| last_hb(&before, c).unwrap())
        .collect();

    // The file says its version and its state reads back as the saved state (empty
    // backlogs, a fresh RTC).
    let mut r = snapshot::Reader::open(&snap).unwrap();
    assert_eq!(r.version(), version);
    let read = r.read_state().unwrap();
    assert_eq!(
        snapshot::encode_state(&read).unwrap(),
        snapshot::encode_state(&saved).unwrap()
    );
    assert!(read.devices.virtio.iter().any(|v| matches!(
        &v.device,
        DeviceSnap::Net(n) if n.rx_backlog.is_empty() && n.mac == [0x02, 0xf5, 0x5c, 0, 0, 0x02]
    )));

    // A fresh VM restored from it (another TAP, same image) runs on: every vCPU's heartbeat
    // counter goes on from where it was, and the verifier finds its memory intact.
    let kvm = vmm::open_kvm().unwrap();
    let log = dir.path().join("dst.log");
    let (vm, stats) =
        snapshot::restore(&kvm, &snap, &host(), std::fs::File::create(&log).unwrap()).unwrap();
    assert_eq!(stats.format_version, version);
    vm.start().unwrap();
    let text = wait_for(&log, "the guest to go on", Duration::from_secs(60), |t| {
        t.matches("verify ok ").count() >= 2 * VCPUS as usize
            && (0..VCPUS as u32).all(|c| last_hb(t, c) >= Some(hb[c as usize] + 3))
    });
    vm.stop();
    assert!(!text.contains("CORRUPT"), "{text}");
    // Across the restore (the log before the pause, then the new one: a line cut by the
    // pause is completed there), every counter goes up by exactly one.
    let all = before + &text;
    for c in 0..VCPUS as u32 {
        let h = hbs(&all, c);
        assert!(
            h.windows(2).all(|w| w[1] == w[0] + 1),
            "cpu {c}: heartbeat counters not continuous: {h:?}"
        );
    }
}

#[test]
fn a_version_2_snapshot_restores_and_the_guest_carries_on() {
    old_snapshot_restores_and_the_guest_carries_on(2);
}

#[test]
fn a_version_3_snapshot_restores_and_the_guest_carries_on() {
    old_snapshot_restores_and_the_guest_carries_on(3);
}

#[test]
fn version_3_decodes_to_the_current_state_with_a_fresh_rtc() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("v3.snap");
    let (saved, _) = make_old_snapshot(dir.path(), &snap, 3);
    let v3 = snapshot::encode_state_versioned(3, &saved).unwrap();
    let v4 = snapshot::encode_state(&saved).unwrap();
    // The layouts differ exactly by the RTC at the end.
    let rtc_len = bincode::serialize(&RtcState::default()).unwrap().len();
    assert_eq!(v4.len(), v3.len() + rtc_len);
    assert_eq!(&v4[..v3.len()], &v3[..]);
    let decoded = snapshot::decode_state(3, &v3).unwrap();
    assert_eq!(decoded.devices.rtc, RtcState::default());
    assert_eq!(snapshot::encode_state(&decoded).unwrap(), v4);
    assert!(matches!(
        snapshot::decode_state(3, &v4),
        Err(SnapshotError::Decode(_))
    ));
    assert!(matches!(
        snapshot::decode_state(4, &v3),
        Err(SnapshotError::Decode(_))
    ));
    // A guest that used its RTC cannot be written in a format without one.
    let mut used = saved.clone();
    used.devices.rtc.offset_secs = 3600;
    for v in [2, 3] {
        let e = snapshot::encode_state_versioned(v, &used).unwrap_err();
        assert!(e.to_string().contains("CMOS RTC"), "{e}");
    }
}

#[test]
fn version_2_decodes_to_the_current_state_with_empty_backlogs() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("v2.snap");
    let (saved, _) = make_v2_snapshot(dir.path(), &snap);
    let v2 = snapshot::encode_state_versioned(2, &saved).unwrap();
    let v3 = snapshot::encode_state_versioned(3, &saved).unwrap();
    // The layouts differ exactly by the backlog's length field (u64, one NIC).
    assert_eq!(v3.len(), v2.len() + 8);
    let decoded = snapshot::decode_state(2, &v2).unwrap();
    assert_eq!(snapshot::encode_state_versioned(3, &decoded).unwrap(), v3);
    assert_eq!(
        snapshot::encode_state(&decoded).unwrap(),
        snapshot::encode_state(&saved).unwrap()
    );
    // Neither layout passes for the other.
    assert!(matches!(
        snapshot::decode_state(3, &v2),
        Err(SnapshotError::Decode(_))
    ));
    assert!(matches!(
        snapshot::decode_state(2, &v3),
        Err(SnapshotError::Decode(_))
    ));

    // A state version 2 cannot express is not written as version 2 (frames are not dropped).
    let mut busy = saved.clone();
    for v in &mut busy.devices.virtio {
        if let DeviceSnap::Net(n) = &mut v.device {
            n.rx_backlog.push(vec![0; 64]);
        }
    }
    let e = snapshot::encode_state_versioned(2, &busy).unwrap_err();
    assert!(e.to_string().contains("1 received frames"), "{e}");
}

/// Rewrites the header's version field (and its checksum, so only the version is "wrong").
fn relabel(bytes: &[u8], version: u32) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[8..12].copy_from_slice(&version.to_le_bytes());
    let crc = crc32c(&b[..24]);
    b[24..28].copy_from_slice(&crc.to_le_bytes());
    b
}

/// CRC-32C (Castagnoli), bitwise: the test does not borrow the implementation it checks.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
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

fn load(dir: &Path, name: &str, bytes: &[u8]) -> Result<u32, SnapshotError> {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    let version = snapshot::Reader::open(&p)?.version();
    snapshot::load_sparse(&p).map(|_| version)
}

#[test]
fn other_versions_and_damaged_version_2_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let snap = d.join("v2.snap");
    let (saved, _) = make_v2_snapshot(d, &snap);
    let good = std::fs::read(&snap).unwrap();
    assert_eq!(load(d, "good", &good).unwrap(), 2);

    // Versions 1 and 5 (and 7): refused by number, with what this build reads.
    for v in [1u32, 5, 7] {
        let e = load(d, &format!("v{v}"), &relabel(&good, v)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("snapshot format version {v} is not supported (this build reads versions 2-4)")
        );
        let e = snapshot::decode_state(v, &snapshot::encode_state(&saved).unwrap()).unwrap_err();
        assert!(matches!(e, SnapshotError::Version(x) if x == v), "{e}");
        assert!(matches!(
            snapshot::encode_state_versioned(v, &saved),
            Err(SnapshotError::Version(_))
        ));
    }
    // A version 2 or 3 label on a version 4 state is not taken at its word.
    let v4 = d.join("v4.snap");
    let sparse = snapshot::load_sparse(&snap).unwrap().1;
    snapshot::write(&v4, &saved, &sparse).unwrap();
    let v4_bytes = std::fs::read(&v4).unwrap();
    assert_eq!(load(d, "v4", &v4_bytes).unwrap(), 4);
    for v in [2, 3] {
        let e = load(d, "mislabeled", &relabel(&v4_bytes, v)).unwrap_err();
        assert!(matches!(e, SnapshotError::Decode(_)), "{e}");
    }

    // Truncated anywhere: header, state section, a memory chunk, before the end marker.
    let state_len = u64::from_le_bytes(good[32..40].try_into().unwrap()) as usize;
    for cut in [
        10,
        30,
        28 + 16 + state_len / 2,
        28 + 16 + state_len + 100,
        good.len() - 30,
        good.len() - 1,
    ] {
        let e = load(d, "cut", &good[..cut]).unwrap_err();
        assert!(
            matches!(e, SnapshotError::Truncated { .. }),
            "cut at {cut}: {e}"
        );
    }
    // A flipped bit in the header, the state, a memory chunk or the end marker.
    for (at, what) in [
        (16, "header"),
        (28 + 16 + state_len / 2, "state"),
        (28 + 16 + state_len + 16 + 12 + 5, "memory"),
        (good.len() - 3, "end marker"),
    ] {
        let mut b = good.clone();
        b[at] ^= 0x10;
        let e = load(d, "flip", &b).unwrap_err();
        assert!(
            matches!(
                e,
                SnapshotError::HeaderChecksum | SnapshotError::Checksum { .. }
            ),
            "bit flipped in the {what} at byte {at}: {e}"
        );
    }
}

/// The state section of a snapshot written by the last version 2 build (commit 1c6e911,
/// `ferry-vmm run --kernel test-guest --vcpus 2 --memory-mib 32 --cmdline "ferry.workload=net-echo
/// ferry.ip=10.0.0.2 ferry.hb_ms=20" --nic 02:f5:5c:00:00:09 --net-backend tap=...`, paused,
/// `ctl snapshot`): the mirror types must read exactly what that build wrote.
const REAL_V2_STATE: &[u8] = include_bytes!("data/state-v2-net-echo.bin");

#[test]
fn the_state_a_version_2_build_wrote_decodes_and_re_encodes_byte_for_byte() {
    let s = snapshot::decode_state(2, REAL_V2_STATE).unwrap();
    assert_eq!((s.config.vcpus, s.config.memory_mib), (2, 32));
    assert_eq!(s.config.nics[0].mac.0, [0x02, 0xf5, 0x5c, 0, 0, 0x09]);
    assert_eq!(s.vcpus.len(), 2);
    s.validate(u64::MAX).unwrap();
    let [v] = &s.devices.virtio[..] else {
        panic!("one virtio device expected")
    };
    let DeviceSnap::Net(n) = &v.device else {
        panic!("a NIC expected")
    };
    assert_eq!(n.mac, [0x02, 0xf5, 0x5c, 0, 0, 0x09]);
    assert!(n.rx_backlog.is_empty());
    // The driver had set the NIC up (net-echo): its queues are live state worth carrying.
    assert!(v.queues.iter().all(|q| q.ready));
    assert_eq!(
        snapshot::encode_state_versioned(2, &s).unwrap(),
        REAL_V2_STATE,
        "the v2 mirror types do not have the layout the v2 build wrote"
    );
    assert_eq!(
        snapshot::encode_state_versioned(3, &s).unwrap().len(),
        REAL_V2_STATE.len() + 8
    );
    assert!(matches!(
        snapshot::decode_state(3, REAL_V2_STATE),
        Err(SnapshotError::Decode(_))
    ));
}

/// The state section of a snapshot written by the last version 3 build (commit c1ee94b,
/// `ferry-vmm run --kernel test-guest --vcpus 2 --memory-mib 32 --cmdline "ferry.workload=net-echo
/// ferry.ip=10.0.0.2 ferry.hb_ms=20" --nic 02:f5:5c:00:00:0a --net-backend tap=...`, paused,
/// `ctl snapshot`): the version 3 mirror types must read exactly what that build wrote.
const REAL_V3_STATE: &[u8] = include_bytes!("data/state-v3-net-echo.bin");

#[test]
fn the_state_a_version_3_build_wrote_decodes_and_re_encodes_byte_for_byte() {
    let s = snapshot::decode_state(3, REAL_V3_STATE).unwrap();
    assert_eq!((s.config.vcpus, s.config.memory_mib), (2, 32));
    assert_eq!(s.config.nics[0].mac.0, [0x02, 0xf5, 0x5c, 0, 0, 0x0a]);
    s.validate(u64::MAX).unwrap();
    assert_eq!(
        s.devices.rtc,
        RtcState::default(),
        "a version 3 VM gets a fresh RTC"
    );
    let [v] = &s.devices.virtio[..] else {
        panic!("one virtio device expected")
    };
    assert!(v.queues.iter().all(|q| q.ready));
    assert_eq!(
        snapshot::encode_state_versioned(3, &s).unwrap(),
        REAL_V3_STATE,
        "the v3 mirror types do not have the layout the v3 build wrote"
    );
    let rtc_len = bincode::serialize(&RtcState::default()).unwrap().len();
    assert_eq!(
        snapshot::encode_state(&s).unwrap().len(),
        REAL_V3_STATE.len() + rtc_len
    );
    for wrong in [2, 4] {
        assert!(matches!(
            snapshot::decode_state(wrong, REAL_V3_STATE),
            Err(SnapshotError::Decode(_))
        ));
    }
}
