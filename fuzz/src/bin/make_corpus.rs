//! Writes the seed corpus of every fuzz target with Ferry's own encoders:
//! `fuzz/corpus/wire_frame/` (real frames of every control message, page batches in each
//! codec, a state frame), `fuzz/corpus/snapshot/` (encoded states of every readable version,
//! real snapshot files), `fuzz/corpus/device_state/` (device states saved by real devices
//! that a driver brought up, with the requests and frames that follow).
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --bin make_corpus [-- OUT_DIR]`
//! (default `fuzz/corpus` next to this crate). Each seed is also run through its harness once.

use ferry_fuzz::device::{self, Op};
use ferry_fuzz::seeds;
use migration::preflight::{DiskView, PreflightRequest};
use migration::wire::{self, Msg, PageBatch, Role};
use std::path::{Path, PathBuf};
use vmm::snapshot::{self, SparsePages};

fn main() {
    let out = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus"));
    // The harnesses' scratch files (disk images, a snapshot) go to a directory removed at the end.
    let scratch =
        std::env::temp_dir().join(format!("ferry-make-corpus-scratch-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    std::env::set_var("FERRY_FUZZ_SCRATCH", &scratch);
    let mut total = 0usize;
    for (target, seeds, run) in [
        (
            "wire_frame",
            wire_seeds(),
            ferry_fuzz::wire::run as fn(&[u8]),
        ),
        ("snapshot", snapshot_seeds(), ferry_fuzz::snapshot::run),
        ("device_state", device_seeds(), ferry_fuzz::device::run),
    ] {
        let dir = out.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for old in std::fs::read_dir(&dir).unwrap() {
            let p = old.unwrap().path();
            if p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("seed-")
            {
                std::fs::remove_file(p).unwrap();
            }
        }
        let mut bytes = 0;
        for (name, data) in &seeds {
            run(data);
            std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
            bytes += data.len();
        }
        println!(
            "{target}: {} seeds, {bytes} bytes in {}",
            seeds.len(),
            dir.display()
        );
        total += bytes;
    }
    println!("total {total} bytes");
    // Reproducers of the findings (fuzz/README.md), next to the corpus: `../crashes/<target>/`.
    for (target, name, data) in reproducers() {
        let dir = out.join("..").join("crashes").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), data).unwrap();
        println!("reproducer {target}/{name}");
    }
    let _ = std::fs::remove_dir_all(&scratch);
}

/// Crafted, minimal inputs that trigger the findings (each crashes its target until fixed).
fn reproducers() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut out = Vec::new();
    // driver-features: the guest writes DriverFeatures bits the device does not offer; the
    // saved state is then refused by every restore.
    out.push((
        "device_state",
        "driver-features",
        device::seed(0, &[], &[w(0, 0x24, 0), w(0, 0x20, 0x70)]),
    ));
    // rtc-year-10000: the guest sets its clock to 9999-12-31 23:59:59 (BCD, clock halted
    // with SET, then running), a second passes, it halts the clock again: the RTC latches year
    // 10000, which its restore refuses.
    let mut rtc = vec![Op::RtcWrite {
        reg: 0x0b,
        val: 0x82,
    }];
    for (reg, val) in [
        (0x32u8, 0x99u8),
        (0x09, 0x99),
        (0x08, 0x12),
        (0x07, 0x31),
        (0x04, 0x23),
        (0x02, 0x59),
        (0x00, 0x59),
    ] {
        rtc.push(Op::RtcWrite { reg, val });
    }
    rtc.push(Op::RtcWrite {
        reg: 0x0b,
        val: 0x02,
    });
    rtc.push(Op::Advance { ms: 2000 });
    rtc.push(Op::RtcWrite {
        reg: 0x0b,
        val: 0x82,
    });
    out.push(("device_state", "rtc-year-10000", device::seed(0, &[], &rtc)));
    // layout-overflow: a snapshot whose two RAM regions' sizes add up past u64::MAX.
    let mut st = seeds::machine_state(1, 0, 0, false);
    let half = 1u64 << 63;
    st.layout.regions = vec![
        vmm::memory::RamRegion {
            gpa: 0,
            size: half,
            file_offset: 0,
        },
        vmm::memory::RamRegion {
            gpa: half,
            size: half,
            file_offset: half,
        },
    ];
    let dir = std::env::temp_dir().join(format!("ferry-make-corpus-r-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("overflow.snapshot");
    snapshot::write(
        &path,
        &st,
        &SparsePages {
            total_pages: 0,
            pages: vec![],
        },
    )
    .unwrap();
    let file = std::fs::read(&path).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    out.push(("snapshot", "layout-overflow", [vec![1, 0], file].concat()));
    out
}

// ---- wire_frame ----

fn frame(kind: u16, flags: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    wire::write_frame(&mut out, kind, flags, &[payload]).unwrap();
    out
}

fn msg(m: &Msg) -> Vec<u8> {
    let mut out = Vec::new();
    wire::send_msg(&mut out, m).unwrap();
    out
}

fn page(fill: u8) -> Vec<u8> {
    (0..4096)
        .map(|i| if i % 64 == 0 { fill } else { (i / 64) as u8 })
        .collect()
}

fn batch(codec: contract::Compression) -> Vec<u8> {
    let entries = [5u64, 9 | wire::ZERO_PAGE, 11];
    let raw = [page(1), page(2)].concat();
    let body = match codec {
        contract::Compression::None => raw.clone(),
        contract::Compression::Lz4 => lz4_flex::block::compress(&raw),
        contract::Compression::Zstd => zstd::bulk::compress(&raw, 1).unwrap(),
    };
    let mut out = Vec::new();
    PageBatch::header(&mut out, 1, &entries, codec, raw.len());
    out.extend_from_slice(&body);
    out
}

fn preflight() -> PreflightRequest {
    let st = seeds::machine_state(1, 1, 1, false);
    PreflightRequest {
        state_version: snapshot::VERSION,
        config: st.config,
        layout: st.layout,
        cpuid: st.cpuid,
        source: contract::HostSummary {
            vendor: "GenuineIntel".into(),
            model: "Intel(R) Xeon(R) CPU".into(),
            cpus: 2,
            free_memory_mib: 20_000,
            cpu_limit_profile: Some("baseline".into()),
        },
        disks: vec![DiskView {
            bytes: 1 << 20,
            locked_by_vm: true,
        }],
    }
}

fn messages() -> Vec<(&'static str, Msg)> {
    use contract::{FailureKind, MigrationFailure, Phase};
    let f =
        MigrationFailure::before(Phase::Precopy, FailureKind::Refused, "no room").caused_by("busy");
    vec![
        (
            "hello",
            Msg::Hello {
                protocol: wire::PROTOCOL_VERSION,
                session: 0x1234_5678_9abc,
                role: Role::Control,
            },
        ),
        (
            "hello-data",
            Msg::Hello {
                protocol: wire::PROTOCOL_VERSION,
                session: 0x1234_5678_9abc,
                role: Role::Data { index: 1 },
            },
        ),
        ("hello-ack", Msg::HelloAck { protocol: 4 }),
        (
            "refuse",
            Msg::Refuse {
                reason: "busy".into(),
            },
        ),
        ("preflight", Msg::Preflight(preflight())),
        (
            "preflight-report",
            Msg::PreflightReport(contract::PreflightReport {
                ok: false,
                problems: vec!["not enough memory".into()],
                missing_features: vec!["avx512f".into()],
                destination: preflight().source,
                restore_cost_us: 1500,
            }),
        ),
        (
            "begin",
            Msg::Begin {
                streams: 2,
                compression: contract::Compression::Lz4,
            },
        ),
        ("begin-ack", Msg::BeginAck { restore_us: 900 }),
        (
            "pass-done",
            Msg::PassDone {
                pass: 1,
                frames: vec![10, 12],
                pages: 5000,
            },
        ),
        ("pass-ack", Msg::PassAck { pass: 1 }),
        ("paused", Msg::Paused),
        ("ready", Msg::Ready { restore_us: 1200 }),
        ("commit", Msg::Commit),
        ("resumed", Msg::Resumed { resume_us: 80 }),
        ("abort", wire::failure_msg(2, &f)),
        ("ping", Msg::Ping),
        ("fail", wire::failure_msg(3, &f)),
        ("auth-none", Msg::Auth { secret: None }),
        (
            "auth",
            Msg::Auth {
                secret: Some(contract::trust::MigrationSecret([0xa5; 32])),
            },
        ),
        ("auth-ok", Msg::AuthOk),
    ]
}

fn wire_input(mode: u8, param: u8, total_pages: u16, stream: &[u8]) -> Vec<u8> {
    let mut out = vec![mode, param];
    out.extend_from_slice(&total_pages.to_le_bytes());
    out.extend_from_slice(stream);
    out
}

fn wire_seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (name, m) in messages() {
        let mut s = msg(&m);
        if m != Msg::Ping {
            // Ping is skipped by recv_msg: follow it by a real message.
            s = [msg(&Msg::Ping), s].concat();
        }
        out.push((format!("msg-{name}"), wire_input(0, 0, 0, &s)));
    }
    let hello = msg(&messages()[0].1);
    let auth = msg(&messages()[18].1);
    out.push((
        "pre-auth".into(),
        wire_input(1, 0, 0, &[hello.clone(), auth.clone()].concat()),
    ));
    out.push((
        "pre-auth-choppy".into(),
        wire_input(1 | 8 | 16, 6, 0, &[hello, auth].concat()),
    ));
    let st = seeds::machine_state(1, 1, 1, true);
    let state = snapshot::encode_state(&st).unwrap();
    let state_v3 =
        snapshot::encode_state_versioned(3, &seeds::machine_state(1, 1, 1, false)).unwrap();
    let mut session = Vec::new();
    for name in [
        "hello-data",
        "auth",
        "begin",
        "pass-done",
        "paused",
        "ready",
        "commit",
    ] {
        session.extend(msg(&messages()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap()
            .1));
    }
    for codec in [
        contract::Compression::None,
        contract::Compression::Lz4,
        contract::Compression::Zstd,
    ] {
        session.extend(frame(wire::KIND_PAGES, 0, &batch(codec)));
    }
    session.extend(frame(wire::KIND_STATE, 2, &state));
    out.push(("receiver-session".into(), wire_input(2, 0, 8192, &session)));
    out.push((
        "receiver-session-fixcrc".into(),
        wire_input(2 | 4 | 8, 200, 8192, &session),
    ));
    for (i, codec) in [
        contract::Compression::None,
        contract::Compression::Lz4,
        contract::Compression::Zstd,
    ]
    .into_iter()
    .enumerate()
    {
        out.push((
            format!("pages-{i}"),
            wire_input(2 | 4, 0, 16, &frame(wire::KIND_PAGES, 0, &batch(codec))),
        ));
        out.push((
            format!("raw-pages-{i}"),
            wire_input(3, 1, 16, &batch(codec)),
        ));
    }
    out.push((
        "state-v3".into(),
        wire_input(2 | 4, 0, 0, &frame(wire::KIND_STATE, 1, &state_v3)),
    ));
    out.push((
        "state-v4-one-frame".into(),
        wire_input(2 | 4 | 32, 0, 0, &frame(wire::KIND_STATE, 2, &state)),
    ));
    out.push((
        "preflight-one-frame".into(),
        wire_input(4 | 32, 0, 0, &msg(&Msg::Preflight(preflight()))),
    ));
    out.push((
        "pages-one-frame".into(),
        wire_input(
            2 | 4 | 32,
            0,
            16,
            &frame(wire::KIND_PAGES, 0, &batch(contract::Compression::Lz4)),
        ),
    ));
    out.push((
        "raw-msg-preflight".into(),
        wire_input(3, 0, 0, &msg(&Msg::Preflight(preflight()))[16..]),
    ));
    out.push(("raw-state".into(), wire_input(3, 2 | (2 << 2), 0, &state)));
    out
}

// ---- snapshot ----

fn snapshot_file(version: u32, st: &vmm::vm::MachineState) -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("ferry-make-corpus-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("seed.snapshot");
    let pages = SparsePages {
        total_pages: st.layout.total_pages(),
        pages: vec![(0, page(7)), (1, page(8)), (300, page(9))],
    };
    snapshot::write_versioned(&path, version, st, &pages).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    bytes
}

fn snapshot_seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let input = |mode: u8, param: u8, bytes: &[u8]| [vec![mode, param], bytes.to_vec()].concat();
    let rich = seeds::machine_state(1, 1, 1, true);
    let plain = seeds::machine_state(1, 1, 1, false);
    // Version 3 has the NIC backlog but no RTC.
    let mut v3 = rich.clone();
    v3.devices.rtc = vmm::devices::rtc::RtcState::default();
    let multi = seeds::machine_state(2, 2, 2, true);
    let bare = seeds::machine_state(1, 0, 0, false);
    let state =
        |v: u32, st: &vmm::vm::MachineState| snapshot::encode_state_versioned(v, st).unwrap();
    out.push(("state-v4".into(), input(0, 2, &state(4, &rich))));
    out.push(("state-v4-as-file".into(), input(8, 2, &state(4, &rich))));
    out.push(("state-v3-as-file".into(), input(8, 1, &state(3, &v3))));
    out.push(("state-v2-as-file".into(), input(8, 0, &state(2, &plain))));
    out.push(("state-v4-multi".into(), input(0, 2, &state(4, &multi))));
    out.push(("state-v4-bare".into(), input(0, 2, &state(4, &bare))));
    out.push(("state-v3".into(), input(0, 1, &state(3, &v3))));
    out.push(("state-v2".into(), input(0, 0, &state(2, &plain))));
    for (v, st) in [(4, &rich), (3, &v3), (2, &plain)] {
        let file = snapshot_file(v, st);
        out.push((format!("file-v{v}-sparse"), input(1, 0, &file)));
        out.push((format!("file-v{v}-restore"), input(2, 0, &file)));
        out.push((format!("file-v{v}-sparse-fixcrc"), input(1 | 4, 0, &file)));
        out.push((format!("file-v{v}-restore-fixcrc"), input(2 | 4, 0, &file)));
        out.push((format!("file-v{v}-both-fixcrc"), input(3 | 4, 0, &file)));
    }
    out
}

// ---- device_state ----

const DESC: u64 = 0x10000;
const AVAIL: u64 = 0x11000;
const USED: u64 = 0x12000;
const QSIZE: u32 = 16;
const HDR: u64 = 0x20000;
const DATA: u64 = 0x30000;
const STATUS: u64 = 0x40000;
const TXBUF: u64 = 0x50000;
const RXBUF: u64 = 0x60000;

const F_VERSION_1: u64 = 1 << 32;
const BLK_F_FLUSH: u64 = 1 << 9;
const BLK_F_RO: u64 = 1 << 5;
const NET_F_MAC: u64 = 1 << 5;
const NET_F_STATUS: u64 = 1 << 16;

fn w(dev: u8, off: u16, val: u32) -> Op {
    Op::MmioWrite { dev, off, val }
}

fn qbase(q: u32) -> u64 {
    q as u64 * 0x4000
}

/// What a virtio driver writes to bring device `dev` up with `features` and `nq` queues.
fn driver_init(dev: u8, features: u64, nq: u32) -> Vec<Op> {
    let mut ops = vec![
        w(dev, 0x70, 0),
        w(dev, 0x70, 3),
        w(dev, 0x24, 0),
        w(dev, 0x20, features as u32),
        w(dev, 0x24, 1),
        w(dev, 0x20, (features >> 32) as u32),
        w(dev, 0x70, 0xb),
        Op::MmioRead {
            dev,
            off: 0x70,
            size: 2,
        },
    ];
    for q in 0..nq {
        let b = qbase(q);
        ops.extend([
            w(dev, 0x30, q),
            Op::MmioRead {
                dev,
                off: 0x34,
                size: 2,
            },
            w(dev, 0x38, QSIZE),
            w(dev, 0x80, (DESC + b) as u32),
            w(dev, 0x84, 0),
            w(dev, 0x90, (AVAIL + b) as u32),
            w(dev, 0x94, 0),
            w(dev, 0xa0, (USED + b) as u32),
            w(dev, 0xa4, 0),
            w(dev, 0x44, 1),
        ]);
    }
    ops.push(w(dev, 0x70, 0xf));
    ops
}

/// The descriptors of one chain at `first` and its avail-ring entry number `avail_idx`.
fn chain(q: u32, first: u16, bufs: &[(u64, u32, bool)], avail_idx: u16) -> Vec<Op> {
    let mut ops = Vec::new();
    for (i, &(addr, len, write)) in bufs.iter().enumerate() {
        let idx = (first as u32 + i as u32) % QSIZE;
        let last = i + 1 == bufs.len();
        let flags: u16 = if last { 0 } else { 1 } | if write { 2 } else { 0 };
        let next = ((idx + 1) % QSIZE) as u16;
        let mut d = Vec::new();
        d.extend_from_slice(&addr.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        ops.push(Op::Mem {
            addr: (DESC + qbase(q) + idx as u64 * 16) as u32,
            bytes: d,
        });
    }
    let slot = AVAIL + qbase(q) + 4 + (avail_idx as u32 % QSIZE) as u64 * 2;
    ops.push(Op::Mem {
        addr: slot as u32,
        bytes: first.to_le_bytes().to_vec(),
    });
    ops.push(Op::Mem {
        addr: (AVAIL + qbase(q) + 2) as u32,
        bytes: (avail_idx + 1).to_le_bytes().to_vec(),
    });
    ops
}

/// A virtio-blk request of `kind` at `sector` (`len` data bytes) as descriptors `first..`.
fn blk_request(dev: u8, kind: u32, sector: u64, len: u32, first: u16, avail_idx: u16) -> Vec<Op> {
    let mut hdr = kind.to_le_bytes().to_vec();
    hdr.extend_from_slice(&0u32.to_le_bytes());
    hdr.extend_from_slice(&sector.to_le_bytes());
    let mut ops = vec![
        Op::Mem {
            addr: HDR as u32,
            bytes: hdr,
        },
        Op::Mem {
            addr: DATA as u32,
            bytes: (0..64).collect(),
        },
        Op::Mem {
            addr: STATUS as u32,
            bytes: vec![0xff],
        },
    ];
    let mut bufs = vec![(HDR, 16, false)];
    if len > 0 {
        bufs.push((DATA, len, kind != 1));
    }
    bufs.push((STATUS, 1, true));
    ops.extend(chain(0, first, &bufs, avail_idx));
    ops.push(Op::Notify { dev, q: 0 });
    ops
}

fn eth_frame(tag: u8) -> Vec<u8> {
    let mut f = vec![0u8; 12]; // virtio_net_hdr_v1
    f.extend_from_slice(&seeds::mac(0));
    f.extend_from_slice(&seeds::mac(9));
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend(std::iter::repeat_n(tag, 46));
    f
}

fn serial_and_rtc_ops() -> Vec<Op> {
    let mut ops = Vec::new();
    // 8N1 at 115200, FIFO on, receive interrupt on, a line of output.
    for (port, val) in [
        (3u8, 0x80u8),
        (0, 1),
        (1, 0),
        (3, 3),
        (2, 0xc7),
        (4, 0x0b),
        (1, 1),
    ] {
        ops.push(Op::PioWrite { port, val });
    }
    for b in b"ok\n" {
        ops.push(Op::PioWrite { port: 0, val: *b });
    }
    for port in [5u8, 2, 6, 0, 7] {
        ops.push(Op::PioRead { port });
    }
    // Set the clock to 2024-02-29 23:59:58 under SET, run it, read it back, write CMOS RAM.
    ops.push(Op::RtcWrite {
        reg: 0x0b,
        val: 0x82,
    });
    for (reg, val) in [
        (0x32u8, 0x20u8),
        (0x09, 0x24),
        (0x08, 0x02),
        (0x07, 0x29),
        (0x04, 0x23),
        (0x02, 0x59),
        (0x00, 0x58),
    ] {
        ops.push(Op::RtcWrite { reg, val });
    }
    ops.push(Op::RtcWrite {
        reg: 0x0b,
        val: 0x02,
    });
    ops.push(Op::Advance { ms: 3000 });
    for reg in [
        0x0a, 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32, 0x0b, 0x0c, 0x0d,
    ] {
        ops.push(Op::RtcRead { reg });
    }
    ops.push(Op::RtcWrite {
        reg: 0x0b,
        val: 0x06,
    }); // binary mode
    ops.push(Op::RtcWrite { reg: 0x04, val: 13 });
    ops.push(Op::RtcWrite {
        reg: 0x0b,
        val: 0x00,
    }); // 12-hour mode
    ops.push(Op::RtcRead { reg: 0x04 });
    ops.push(Op::RtcWrite {
        reg: 0x40,
        val: 0x5a,
    });
    ops.push(Op::PioWrite {
        port: 10,
        val: 0x8b,
    });
    ops.push(Op::PioRead { port: 10 });
    ops.push(Op::PioWrite { port: 9, val: 0xd1 }); // i8042 write output port
    ops.push(Op::PioRead { port: 8 });
    ops.push(Op::Checkpoint);
    ops
}

fn device_seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let blk = F_VERSION_1 | BLK_F_FLUSH;
    let net = F_VERSION_1 | NET_F_MAC | NET_F_STATUS;
    let blk_ops = |dev: u8| {
        let mut ops = vec![Op::Resume];
        ops.extend(blk_request(dev, 1, 3, 512, 0, 0)); // write
        ops.extend(blk_request(dev, 0, 3, 512, 3, 1)); // read
        ops.extend(blk_request(dev, 4, 0, 0, 6, 2)); // flush
        ops.extend(blk_request(dev, 8, 0, 20, 8, 3)); // get id
        ops.extend(blk_request(dev, 0, 63, 1024, 11, 4)); // out of range
        ops.push(Op::MmioRead {
            dev,
            off: 0x60,
            size: 2,
        });
        ops.push(w(dev, 0x64, 1));
        ops.push(Op::MmioRead {
            dev,
            off: 0x100,
            size: 3,
        });
        ops.push(Op::Checkpoint);
        ops.push(Op::Pause);
        ops
    };
    let net_ops = |dev: u8| {
        let mut ops = vec![Op::Resume];
        // Two receive buffers, then a frame from the TAP.
        ops.extend(chain(0, 0, &[(RXBUF, 2048, true)], 0));
        ops.extend(chain(0, 1, &[(RXBUF + 0x1000, 2048, true)], 1));
        ops.push(Op::Notify { dev, q: 0 });
        ops.push(Op::RxRound { dev });
        ops.push(Op::Inject {
            dev,
            frame: eth_frame(0x33),
        });
        ops.push(Op::RxRound { dev });
        // A frame to transmit.
        ops.push(Op::Mem {
            addr: TXBUF as u32,
            bytes: eth_frame(0x44),
        });
        ops.extend(chain(1, 0, &[(TXBUF, 70, false)], 0));
        ops.push(Op::Notify { dev, q: 1 });
        ops.push(Op::Inject {
            dev,
            frame: eth_frame(0x55),
        });
        ops.push(Op::Checkpoint);
        ops.push(Op::Pause);
        ops
    };
    // Fresh devices: the driver's bring-up runs after the restore.
    let fresh = device::seed(0, &[], &[driver_init(0, blk, 1), blk_ops(0)].concat());
    out.push(("fresh-disk".into(), fresh));
    out.push((
        "fresh-nic".into(),
        device::seed(2, &[], &[driver_init(0, net, 2), net_ops(0)].concat()),
    ));
    // Devices brought up before the save.
    out.push((
        "disk".into(),
        device::seed(0, &driver_init(0, blk, 1), &blk_ops(0)),
    ));
    out.push((
        "disk-ro".into(),
        device::seed(1, &driver_init(0, blk | BLK_F_RO, 1), &blk_ops(0)),
    ));
    let mut nic_setup = driver_init(0, net, 2);
    nic_setup.push(Op::Inject {
        dev: 0,
        frame: eth_frame(0x11),
    });
    nic_setup.push(Op::Inject {
        dev: 0,
        frame: eth_frame(0x22),
    });
    out.push((
        "nic-backlog".into(),
        device::seed(2, &nic_setup, &net_ops(0)),
    ));
    let mut both = driver_init(0, blk, 1);
    both.extend(driver_init(1, net, 2));
    out.push((
        "disk-nic".into(),
        device::seed(
            3,
            &both,
            &[blk_ops(0), net_ops(1), serial_and_rtc_ops()].concat(),
        ),
    ));
    let mut four = driver_init(0, blk, 1);
    four.extend(driver_init(1, blk | BLK_F_RO, 1));
    four.extend(driver_init(2, net, 2));
    four.extend(driver_init(3, net, 2));
    four.push(Op::Inject {
        dev: 3,
        frame: eth_frame(0x66),
    });
    out.push((
        "four".into(),
        device::seed(4, &four, &[blk_ops(1), net_ops(2), net_ops(3)].concat()),
    ));
    out.push((
        "ports".into(),
        device::seed(0, &serial_and_rtc_ops(), &serial_and_rtc_ops()),
    ));
    out
}
