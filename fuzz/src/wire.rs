//! The `wire_frame` harness: Ferry's migration wire (`crates/migration/src/wire.rs`) as a
//! destination reads it from a peer.
//!
//! Input: `mode u8 | param u8 | total_pages u16 | stream...`
//! * `mode & 3` — who reads the stream:
//!   0: the control connection after authentication ([`wire::recv_msg`], `Ping`s skipped);
//!   1: a connection that has not authenticated ([`wire::recv_msg_pre_auth`]);
//!   2: a receiver loop ([`wire::read_frame_into`] with one reused buffer) that hands each frame
//!      to its decoder by kind: control message, page batch ([`wire::PageBatch::parse`]) or VM
//!      state (`vmm::snapshot::decode_state`, version from the frame flags);
//!   3: the decoders alone on the unframed payload (`param & 3`: control message, page
//!      batch, VM state, control message; `param >> 2`: the flags).
//! * `mode & 32` — the stream is one frame: set its header's length to the bytes that follow
//!   the header (before the CRC fix-up), so that payloads can grow and shrink.
//! * `mode & 4` — recompute every frame's CRC first, so that mutated payloads get past the
//!   checksum to the decoders (without it, the fuzzer exercises the checksum itself).
//! * `mode & 8` — the reader returns at most `param + 1` bytes per `read`;
//!   `mode & 16` — every other `read` fails with `Interrupted`.
//!
//! Checked besides "no panic": a decoded message re-encodes and decodes to itself; a page
//! batch only ever hands out whole 4 KiB pages inside the VM; a connection that has not
//! authenticated never makes Ferry allocate more than [`PRE_AUTH_ALLOC_LIMIT`] at once; a
//! preflight request goes through the destination's pure checks.

use crate::{ChoppyReader, Cursor};
use migration::wire::{self, Frame, Msg, PageBatch, WireError, HEADER_LEN};

/// Largest single allocation accepted while a stranger's frame is read and decoded (the
/// frame is at most 1 KiB; serde may preallocate up to 1 MiB for a sequence it is told is
/// long, and bincode's limit stops the decoding after that).
pub const PRE_AUTH_ALLOC_LIMIT: usize = 2 << 20;

/// Rewrites the checksum of every complete frame in `buf` (frames laid end to end).
pub fn fix_frame_crcs(buf: &mut [u8]) {
    let mut off = 0usize;
    while off + HEADER_LEN <= buf.len() {
        let len = u32::from_le_bytes(buf[off + 8..off + 12].try_into().unwrap()) as usize;
        let Some(end) = (off + HEADER_LEN).checked_add(len) else {
            break;
        };
        if end > buf.len() {
            break;
        }
        let crc = crc32c::crc32c_append(crc32c::crc32c(&buf[off..off + 12]), &buf[off + 16..end]);
        buf[off + 12..off + 16].copy_from_slice(&crc.to_le_bytes());
        off = end;
    }
}

/// One fuzz input.
pub fn run(data: &[u8]) {
    crate::init();
    let mut c = Cursor::new(data);
    let mode = c.u8();
    let param = c.u8();
    let total_pages = c.u16() as u64;
    let mut stream = c.rest().to_vec();
    if mode & 32 != 0 && stream.len() >= HEADER_LEN {
        let len = (stream.len() - HEADER_LEN) as u32;
        stream[8..12].copy_from_slice(&len.to_le_bytes());
    }
    if mode & 4 != 0 {
        fix_frame_crcs(&mut stream);
    }
    let chunk = if mode & 8 != 0 {
        param as usize + 1
    } else {
        usize::MAX
    };
    let mut r = ChoppyReader::new(&stream, chunk, mode & 16 != 0);
    match mode & 3 {
        0 => loop {
            match wire::recv_msg(&mut r) {
                Ok(m) => {
                    assert!(m != Msg::Ping, "recv_msg returned a Ping");
                    check_msg(&m);
                }
                Err(e) => {
                    check_err(&e);
                    break;
                }
            }
        },
        1 => {
            // A stranger gets a handful of frames before the handshake times out.
            for _ in 0..4 {
                let (res, peak) =
                    crate::largest_allocation_during(|| wire::recv_msg_pre_auth(&mut r));
                assert!(
                    peak <= PRE_AUTH_ALLOC_LIMIT,
                    "an unauthenticated peer made Ferry allocate {peak} bytes at once"
                );
                match res {
                    Ok(m) => check_msg(&m),
                    Err(e) => {
                        check_err(&e);
                        if let WireError::TooLarge(len, max) = e {
                            assert!(len > max && max <= wire::PRE_AUTH_MAX_PAYLOAD);
                        }
                        break;
                    }
                }
            }
        }
        2 => {
            let mut buf = Vec::new();
            loop {
                match wire::read_frame_into(&mut r, &mut buf) {
                    Ok((kind, flags)) => {
                        assert!(buf.len() <= wire::MAX_PAYLOAD as usize);
                        dispatch(kind, flags, &buf, total_pages);
                    }
                    Err(e) => {
                        check_err(&e);
                        break;
                    }
                }
            }
        }
        _ => {
            let kinds = [
                wire::KIND_CONTROL,
                wire::KIND_PAGES,
                wire::KIND_STATE,
                wire::KIND_CONTROL,
            ];
            dispatch(
                kinds[param as usize & 3],
                param as u16 >> 2,
                &stream,
                total_pages,
            );
        }
    }
}

fn check_err(e: &WireError) {
    // Every error formats (the message goes into the migration's failure report).
    crate::debug!("wire: {e}");
}

fn dispatch(kind: u16, flags: u16, payload: &[u8], total_pages: u64) {
    match kind {
        wire::KIND_CONTROL => {
            let f = Frame {
                kind,
                flags,
                payload: payload.to_vec(),
            };
            match wire::decode_msg(&f) {
                Ok(m) => check_msg(&m),
                Err(e) => check_err(&e),
            }
        }
        wire::KIND_PAGES => check_batch(payload, total_pages),
        wire::KIND_STATE => {
            // The destination decodes the state in the version the source announced.
            let version = vmm::snapshot::MIN_READ_VERSION + (flags as u32 % 4);
            let res = vmm::snapshot::decode_state(version, payload);
            crate::debug!(
                "wire: v{version} state: {}",
                res.as_ref()
                    .map(|_| "decoded".to_string())
                    .unwrap_or_else(|e| e.to_string())
            );
            if let Ok(st) = res {
                assert!(vmm::snapshot::reads_version(version));
                let _ = st.platform.elapsed_since_save(vmm::vm::realtime_ns());
                let _ = st.validate(u64::MAX);
            }
        }
        other => panic!("read_frame accepted a frame of unknown kind {other}"),
    }
}

fn check_batch(payload: &[u8], total_pages: u64) {
    let mut scratch = Vec::new();
    let mut seen = 0usize;
    let res = PageBatch::parse(payload, total_pages, &mut scratch, |idx, data| {
        assert!(idx < total_pages, "page {idx} of {total_pages} handed out");
        if let Some(d) = data {
            // The receiver copies exactly 4 KiB from `d.as_ptr()` into guest RAM.
            assert_eq!(d.len(), 4096, "a page of {} bytes handed out", d.len());
        }
        seen += 1;
        Ok(())
    });
    crate::debug!("wire: page batch: {res:?}");
    match res {
        Ok((pass, n)) => {
            assert_eq!(n, seen, "batch reported {n} pages, handed out {seen}");
            assert!((1..=wire::MAX_BATCH_PAGES).contains(&n));
            assert_eq!(pass, u32::from_le_bytes(payload[0..4].try_into().unwrap()));
        }
        Err(e) => check_err(&e),
    }
}

/// What a destination does with a decoded message, minus the I/O; plus the round trip.
pub fn check_msg(m: &Msg) {
    crate::debug!("wire: {}", m.name());
    assert!(!m.name().is_empty());
    let _ = wire::peer_failure(m);
    let mut buf = Vec::new();
    wire::send_msg(&mut buf, m).expect("a decoded message re-encodes");
    let f = wire::read_frame(&mut &buf[..]).expect("a re-encoded message reads back");
    let again = wire::decode_msg(&f).expect("a re-encoded message decodes");
    assert_eq!(&again, m, "{} does not round-trip", m.name());
    if let Msg::Preflight(req) = m {
        // `migration::preflight::check` minus what needs KVM or touches the host's files.
        let _ = vmm::snapshot::reads_version(req.state_version);
        let _ = req.config.validate();
        if req
            .layout
            .validate(req.config.memory_bytes().max(1))
            .is_ok()
        {
            let _ = req.layout.total_bytes() != req.config.memory_bytes();
        }
        let offer = crate::seeds::cpuid();
        let _ = req.cpuid.vendor() != offer.vendor();
        let _ = vmm::cpuid::missing_features(&req.cpuid, &offer);
        let _ = req.cpuid.tsc_khz();
        let _ = migration::preflight::binding_problems(&crate::seeds::config(1, 1, 1), &req.config);
        let _ = format!("{:?}", req.source);
    }
}
