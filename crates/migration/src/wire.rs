//! The migration wire format.
//!
//! Every message is a frame: a 16-byte header `magic u32 | kind u16 | flags u16 | len u32 |
//! crc32c u32` followed by `len` payload bytes; the CRC covers the first 12 header bytes and the
//! payload. Kinds: `CONTROL` (a bincode-encoded [`Msg`]), `PAGES` (a batch of guest pages, see
//! [`PageBatch`]) and `STATE` (the encoded `MachineState`). Anything malformed — wrong magic,
//! bad checksum, oversized, truncated, an unknown kind, a message that does not decode — is an
//! error that aborts the migration; nothing is guessed.

use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

/// Newest version of the protocol this build speaks.
///
/// * v2: framed control messages, page batches, state frame; failures as `Abort`.
/// * v3: failures as `Fail` (typed phase and kind); the destination reports the version it
///   accepted in `HelloAck`.
/// * v4: authentication. After `HelloAck` the source sends `Auth` (the migration's one-time
///   secret, if it has one) and waits for `AuthOk` (or `Refuse`) before anything else, on the
///   control connection and on every data connection. The `Hello` itself is unchanged, so a
///   v3 destination still decodes it and refuses the version by name. A destination created
///   with a secret accepts v4 and newer only.
///
/// Negotiation: the source offers its newest version in `Hello`; a destination accepts any
/// version it speaks and refuses others (naming its own); after a refusal the source tries its
/// next older version on a new connection, down to [`MIN_PROTOCOL_VERSION`]. Data connections
/// use the version the control connection agreed on.
pub const PROTOCOL_VERSION: u32 = 4;
/// Oldest version this build still speaks (a peer one release older).
pub const MIN_PROTOCOL_VERSION: u32 = 2;
/// First version with `Auth` after the Hello.
pub const AUTH_PROTOCOL_VERSION: u32 = 4;
/// Version of the encoded VM state (`MachineState` + snapshot codec) this build sends.
pub const STATE_VERSION: u32 = vmm::snapshot::VERSION;
/// Oldest state version this build receives (a source of the previous build, during an
/// upgrade): a destination accepts `MIN_STATE_VERSION..=STATE_VERSION` and decodes the `STATE`
/// frame in the version the source announced in its preflight request.
pub const MIN_STATE_VERSION: u32 = vmm::snapshot::MIN_READ_VERSION;

const FRAME_MAGIC: u32 = 0x4652_4d31; // "FRM1"
/// Header length.
pub const HEADER_LEN: usize = 16;
/// Largest payload accepted (the state is far smaller; a page batch is ≤ ~1 MiB).
pub const MAX_PAYLOAD: u32 = 64 << 20;
/// Largest payload a destination reads from a peer that has not authenticated yet (its
/// `Hello` and `Auth` are well under 200 bytes): nothing large is allocated for a stranger.
pub const PRE_AUTH_MAX_PAYLOAD: u32 = 1024;

/// Frame kinds.
pub const KIND_CONTROL: u16 = 1;
pub const KIND_PAGES: u16 = 2;
pub const KIND_STATE: u16 = 3;

/// Errors reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed by the peer")]
    Eof,
    #[error("stream truncated: connection closed inside a frame")]
    Truncated,
    #[error("corrupt stream: bad frame magic {0:#010x}")]
    BadMagic(u32),
    #[error("corrupt stream: frame checksum mismatch (kind {kind}, {len} bytes)")]
    Checksum { kind: u16, len: u32 },
    #[error("corrupt stream: frame of {0} bytes exceeds the {1}-byte limit")]
    TooLarge(u32, u32),
    #[error("corrupt stream: unknown frame kind {0}")]
    UnknownKind(u16),
    #[error("corrupt stream: undecodable {what}: {err}")]
    Decode { what: &'static str, err: String },
    #[error("network error: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out waiting for the peer")]
    Timeout,
}

impl WireError {
    fn from_io(e: std::io::Error) -> WireError {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => WireError::Timeout,
            _ => WireError::Io(e),
        }
    }
}

/// A received frame.
#[derive(Debug)]
pub struct Frame {
    pub kind: u16,
    pub flags: u16,
    pub payload: Vec<u8>,
}

fn header(kind: u16, flags: u16, payload: &[&[u8]]) -> [u8; HEADER_LEN] {
    let len: usize = payload.iter().map(|p| p.len()).sum();
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&kind.to_le_bytes());
    h[6..8].copy_from_slice(&flags.to_le_bytes());
    h[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    let crc = payload
        .iter()
        .fold(crc32c::crc32c(&h[..12]), |c, p| crc32c::crc32c_append(c, p));
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Writes one frame whose payload is the concatenation of `parts`; returns bytes written.
pub fn write_frame(
    w: &mut impl Write,
    kind: u16,
    flags: u16,
    parts: &[&[u8]],
) -> Result<u64, WireError> {
    let h = header(kind, flags, parts);
    w.write_all(&h).map_err(WireError::from_io)?;
    for p in parts {
        w.write_all(p).map_err(WireError::from_io)?;
    }
    Ok(HEADER_LEN as u64 + parts.iter().map(|p| p.len() as u64).sum::<u64>())
}

/// Reads one frame into `buf` (reused between calls). `Eof` only at a frame boundary.
pub fn read_frame_into(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<(u16, u16), WireError> {
    read_frame_limited(r, buf, MAX_PAYLOAD)
}

/// [`read_frame_into`] refusing payloads over `max` bytes before allocating anything.
pub fn read_frame_limited(
    r: &mut impl Read,
    buf: &mut Vec<u8>,
    max: u32,
) -> Result<(u16, u16), WireError> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut h[got..]) {
            Ok(0) => {
                return Err(if got == 0 {
                    WireError::Eof
                } else {
                    WireError::Truncated
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WireError::from_io(e)),
        }
    }
    let magic = u32::from_le_bytes(h[0..4].try_into().unwrap());
    if magic != FRAME_MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    let kind = u16::from_le_bytes(h[4..6].try_into().unwrap());
    let flags = u16::from_le_bytes(h[6..8].try_into().unwrap());
    let len = u32::from_le_bytes(h[8..12].try_into().unwrap());
    let crc = u32::from_le_bytes(h[12..16].try_into().unwrap());
    if len > max.min(MAX_PAYLOAD) {
        return Err(WireError::TooLarge(len, max.min(MAX_PAYLOAD)));
    }
    if !(KIND_CONTROL..=KIND_STATE).contains(&kind) {
        return Err(WireError::UnknownKind(kind));
    }
    buf.resize(len as usize, 0);
    let mut off = 0;
    while off < buf.len() {
        match r.read(&mut buf[off..]) {
            Ok(0) => return Err(WireError::Truncated),
            Ok(n) => off += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WireError::from_io(e)),
        }
    }
    if crc32c::crc32c_append(crc32c::crc32c(&h[..12]), buf) != crc {
        return Err(WireError::Checksum { kind, len });
    }
    Ok((kind, flags))
}

/// Reads one frame.
pub fn read_frame(r: &mut impl Read) -> Result<Frame, WireError> {
    let mut payload = Vec::new();
    let (kind, flags) = read_frame_into(r, &mut payload)?;
    Ok(Frame {
        kind,
        flags,
        payload,
    })
}

fn codec() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(MAX_PAYLOAD as u64)
        .reject_trailing_bytes()
}

pub use contract::Compression;

/// Which connection a Hello opens.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Control,
    Data { index: u16 },
}

/// Control messages.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Msg {
    /// First message on every connection (source → destination).
    Hello {
        protocol: u32,
        session: u64,
        role: Role,
    },
    /// Destination accepts the connection.
    HelloAck { protocol: u32 },
    /// Destination refuses (version, session mismatch, busy).
    Refuse { reason: String },
    /// Source asks whether the destination can take the VM.
    Preflight(crate::preflight::PreflightRequest),
    /// Destination's answer.
    PreflightReport(crate::preflight::PreflightReport),
    /// Source starts the transfer: data streams follow.
    Begin {
        streams: u16,
        compression: Compression,
    },
    /// Destination has accepted all data streams, allocated RAM and prepared the VM; it reports
    /// its measured share of the switchover (load state + resume on a scratch VM).
    BeginAck { restore_us: u64 },
    /// Source finished sending pass `pass`; `frames[i]` = cumulative page frames sent on
    /// stream i so far. The destination answers `PassAck` once it applied all of them.
    PassDone {
        pass: u32,
        frames: Vec<u64>,
        pages: u64,
    },
    /// Destination applied every frame up to the pass.
    PassAck { pass: u32 },
    /// Source paused the VM (switchover begins).
    Paused,
    /// Destination restored the complete VM from memory + state and can resume it.
    Ready { restore_us: u64 },
    /// Source's word: the destination owns the VM from now on and must resume it.
    Commit,
    /// Destination resumed the VM.
    Resumed { resume_us: u64 },
    /// Either side gives up; the VM stays on the source.
    Abort { phase: String, reason: String },
    /// Liveness while the control channel is otherwise quiet.
    Ping,
    /// (v3) Either side gives up, typed; the VM stays on the source.
    Fail {
        phase: contract::Phase,
        kind: contract::FailureKind,
        message: String,
    },
    /// (v4) Source → destination after `HelloAck`: the migration's one-time secret.
    Auth {
        secret: Option<contract::trust::MigrationSecret>,
    },
    /// (v4) The destination authenticated the connection.
    AuthOk,
}

impl Msg {
    /// Short name for error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "Hello",
            Msg::HelloAck { .. } => "HelloAck",
            Msg::Refuse { .. } => "Refuse",
            Msg::Preflight(_) => "Preflight",
            Msg::PreflightReport(_) => "PreflightReport",
            Msg::Begin { .. } => "Begin",
            Msg::BeginAck { .. } => "BeginAck",
            Msg::PassDone { .. } => "PassDone",
            Msg::PassAck { .. } => "PassAck",
            Msg::Paused => "Paused",
            Msg::Ready { .. } => "Ready",
            Msg::Commit => "Commit",
            Msg::Resumed { .. } => "Resumed",
            Msg::Abort { .. } => "Abort",
            Msg::Ping => "Ping",
            Msg::Fail { .. } => "Fail",
            Msg::Auth { .. } => "Auth",
            Msg::AuthOk => "AuthOk",
        }
    }
}

/// The message that tells the peer this side gives up, in the session's protocol version.
pub fn failure_msg(protocol: u32, f: &contract::MigrationFailure) -> Msg {
    if protocol >= 3 {
        Msg::Fail {
            phase: f.phase,
            kind: f.kind,
            message: f.reason(),
        }
    } else {
        Msg::Abort {
            phase: f.phase.to_string(),
            reason: f.reason(),
        }
    }
}

/// What a peer's `Abort` (v2) or `Fail` (v3) says: the phase it names (as text), the kind (v3
/// only) and its reason.
pub fn peer_failure(m: &Msg) -> Option<(String, Option<contract::FailureKind>, String)> {
    match m {
        Msg::Abort { phase, reason } => Some((phase.clone(), None, reason.clone())),
        Msg::Fail {
            phase,
            kind,
            message,
        } => Some((phase.to_string(), Some(*kind), message.clone())),
        _ => None,
    }
}

/// Sends a control message.
pub fn send_msg(w: &mut impl Write, m: &Msg) -> Result<u64, WireError> {
    use bincode::Options;
    let bytes = codec().serialize(m).map_err(|e| WireError::Decode {
        what: "control message",
        err: e.to_string(),
    })?;
    write_frame(w, KIND_CONTROL, 0, &[&bytes])
}

/// Decodes a control frame.
pub fn decode_msg(f: &Frame) -> Result<Msg, WireError> {
    use bincode::Options;
    if f.kind != KIND_CONTROL {
        return Err(WireError::Decode {
            what: "control message",
            err: format!("got a frame of kind {}", f.kind),
        });
    }
    codec()
        .deserialize(&f.payload)
        .map_err(|e| WireError::Decode {
            what: "control message",
            err: e.to_string(),
        })
}

/// Reads one control message from a peer not authenticated yet: small frames only, `Ping`
/// not skipped (every frame counts against the handshake's time).
pub fn recv_msg_pre_auth(r: &mut impl Read) -> Result<Msg, WireError> {
    let mut payload = Vec::new();
    let (kind, flags) = read_frame_limited(r, &mut payload, PRE_AUTH_MAX_PAYLOAD)?;
    decode_msg(&Frame {
        kind,
        flags,
        payload,
    })
}

/// Reads the next control message, skipping `Ping`s.
pub fn recv_msg(r: &mut impl Read) -> Result<Msg, WireError> {
    loop {
        let f = read_frame(r)?;
        let m = decode_msg(&f)?;
        if m != Msg::Ping {
            return Ok(m);
        }
    }
}

/// A batch of pages on a data stream.
///
/// Payload: `pass u32 | count u16 | codec u8 | 0 u8 | raw_len u32 | count × u64 entries | data`.
/// Entry = RAM page index, with bit 63 set for a zero page (no data). `data` holds the non-zero
/// pages in entry order, compressed with `codec` (0 none, 1 lz4, 2 zstd); `raw_len` is its
/// uncompressed length and must equal 4 KiB × non-zero entries.
pub struct PageBatch;

/// Entry flag: the page is all zeroes.
pub const ZERO_PAGE: u64 = 1 << 63;
/// Most pages in one batch (1 MiB).
pub const MAX_BATCH_PAGES: usize = 256;
const BATCH_HDR: usize = 12;

impl PageBatch {
    /// Encodes a batch header + entries into `out` (data appended by the caller).
    pub fn header(
        out: &mut Vec<u8>,
        pass: u32,
        entries: &[u64],
        codec: Compression,
        raw_len: usize,
    ) {
        out.clear();
        out.extend_from_slice(&pass.to_le_bytes());
        out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        out.push(match codec {
            Compression::None => 0,
            Compression::Lz4 => 1,
            Compression::Zstd => 2,
        });
        out.push(0);
        out.extend_from_slice(&(raw_len as u32).to_le_bytes());
        for e in entries {
            out.extend_from_slice(&e.to_le_bytes());
        }
    }

    /// Parses a batch; calls `page(index, Some(bytes))` for data pages and `page(index, None)`
    /// for zero pages. `scratch` is reused for decompression.
    pub fn parse(
        payload: &[u8],
        total_pages: u64,
        scratch: &mut Vec<u8>,
        mut page: impl FnMut(u64, Option<&[u8]>) -> Result<(), WireError>,
    ) -> Result<(u32, usize), WireError> {
        let bad = |m: String| WireError::Decode {
            what: "page batch",
            err: m,
        };
        if payload.len() < BATCH_HDR {
            return Err(bad(format!(
                "{} bytes is shorter than a batch header",
                payload.len()
            )));
        }
        let pass = u32::from_le_bytes(payload[0..4].try_into().unwrap());
        let count = u16::from_le_bytes(payload[4..6].try_into().unwrap()) as usize;
        let codec = payload[6];
        let raw_len = u32::from_le_bytes(payload[8..12].try_into().unwrap()) as usize;
        if count == 0 || count > MAX_BATCH_PAGES {
            return Err(bad(format!("{count} pages in one batch")));
        }
        let ent_end = BATCH_HDR + 8 * count;
        if payload.len() < ent_end {
            return Err(bad("entry list runs past the frame".into()));
        }
        let entries: Vec<u64> = payload[BATCH_HDR..ent_end]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let data_pages = entries.iter().filter(|e| *e & ZERO_PAGE == 0).count();
        if raw_len != data_pages * 4096 {
            return Err(bad(format!(
                "raw length {raw_len} for {data_pages} data pages"
            )));
        }
        let body = &payload[ent_end..];
        let data: &[u8] = match codec {
            0 => body,
            1 => {
                scratch.resize(raw_len, 0);
                let n = lz4_flex::block::decompress_into(body, scratch)
                    .map_err(|e| bad(format!("lz4: {e}")))?;
                if n != raw_len {
                    return Err(bad(format!("lz4 produced {n} bytes, expected {raw_len}")));
                }
                scratch
            }
            2 => {
                scratch.resize(raw_len, 0);
                let n = zstd::bulk::decompress_to_buffer(body, scratch.as_mut_slice())
                    .map_err(|e| bad(format!("zstd: {e}")))?;
                if n != raw_len {
                    return Err(bad(format!("zstd produced {n} bytes, expected {raw_len}")));
                }
                scratch
            }
            c => return Err(bad(format!("unknown codec {c}"))),
        };
        if data.len() != raw_len {
            return Err(bad(format!(
                "{} data bytes, expected {raw_len}",
                data.len()
            )));
        }
        let mut off = 0;
        for e in entries {
            let idx = e & !ZERO_PAGE;
            if idx >= total_pages {
                return Err(bad(format!(
                    "page {idx} is outside the VM's {total_pages} pages"
                )));
            }
            if e & ZERO_PAGE != 0 {
                page(idx, None)?;
            } else {
                page(idx, Some(&data[off..off + 4096]))?;
                off += 4096;
            }
        }
        Ok((pass, count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_damage_is_detected() {
        let mut buf = Vec::new();
        send_msg(
            &mut buf,
            &Msg::Hello {
                protocol: 1,
                session: 7,
                role: Role::Data { index: 2 },
            },
        )
        .unwrap();
        write_frame(&mut buf, KIND_STATE, 0, &[b"abc", b"def"]).unwrap();
        let mut r = &buf[..];
        assert_eq!(
            recv_msg(&mut r).unwrap(),
            Msg::Hello {
                protocol: 1,
                session: 7,
                role: Role::Data { index: 2 }
            }
        );
        let f = read_frame(&mut r).unwrap();
        assert_eq!((f.kind, &f.payload[..]), (KIND_STATE, &b"abcdef"[..]));
        assert!(matches!(read_frame(&mut r), Err(WireError::Eof)));
        // Every truncation is reported as such; every flipped bit is caught.
        let first_len = HEADER_LEN + u32::from_le_bytes(buf[8..12].try_into().unwrap()) as usize;
        for cut in (1..buf.len()).filter(|&c| c != first_len) {
            let mut r = &buf[..cut];
            let first = read_frame(&mut r);
            let res = if first.is_ok() {
                read_frame(&mut r)
            } else {
                first
            };
            assert!(
                matches!(res, Err(WireError::Truncated)),
                "cut {cut}: {res:?}"
            );
        }
        for i in 0..buf.len() {
            let mut b = buf.clone();
            b[i] ^= 0x08;
            let mut r = &b[..];
            let res = read_frame(&mut r)
                .and_then(|f| decode_msg(&f))
                .and_then(|_| read_frame(&mut r).map(|_| Msg::Ping));
            assert!(res.is_err(), "flip at {i} went unnoticed");
        }
    }

    #[test]
    fn every_control_message_round_trips_in_both_versions() {
        use contract::{FailureKind, MigrationFailure, Phase};
        let mut msgs = vec![
            Msg::HelloAck { protocol: 3 },
            Msg::Refuse {
                reason: "busy".into(),
            },
            Msg::Begin {
                streams: 4,
                compression: Compression::Zstd,
            },
            Msg::BeginAck { restore_us: 9 },
            Msg::PassDone {
                pass: 2,
                frames: vec![1, 2],
                pages: 3,
            },
            Msg::PassAck { pass: 2 },
            Msg::Paused,
            Msg::Ready { restore_us: 1 },
            Msg::Commit,
            Msg::Resumed { resume_us: 2 },
            Msg::Ping,
            Msg::Auth { secret: None },
            Msg::Auth {
                secret: Some(contract::trust::MigrationSecret([7; 32])),
            },
            Msg::AuthOk,
        ];
        for phase in Phase::ALL {
            for kind in [
                FailureKind::Refused,
                FailureKind::CommitUnknown,
                FailureKind::Local,
            ] {
                let f = MigrationFailure::before(phase, kind, "why").caused_by("because");
                for protocol in [MIN_PROTOCOL_VERSION, PROTOCOL_VERSION] {
                    let m = failure_msg(protocol, &f);
                    let (p, k, reason) = peer_failure(&m).unwrap();
                    assert_eq!(reason, "why: because");
                    assert_eq!(p, phase.to_string());
                    assert_eq!(k, (protocol >= 3).then_some(kind));
                    msgs.push(m);
                }
            }
        }
        for m in msgs {
            let mut buf = Vec::new();
            send_msg(&mut buf, &m).unwrap();
            let f = read_frame(&mut &buf[..]).unwrap();
            assert_eq!(decode_msg(&f).unwrap(), m, "{}", m.name());
        }
    }

    #[test]
    fn frames_over_the_pre_auth_limit_are_refused_from_the_header() {
        let mut buf = Vec::new();
        write_frame(&mut buf, KIND_CONTROL, 0, &[&[0u8; 2048]]).unwrap();
        // Only the header is there: a refusal must not wait for (or allocate) the payload.
        let mut r = &buf[..HEADER_LEN];
        let mut out = Vec::new();
        assert!(matches!(
            read_frame_limited(&mut r, &mut out, PRE_AUTH_MAX_PAYLOAD),
            Err(WireError::TooLarge(2048, PRE_AUTH_MAX_PAYLOAD))
        ));
        assert_eq!(out.capacity(), 0);
        assert!(read_frame_into(&mut &buf[..], &mut out).is_ok());
    }

    #[test]
    fn page_batches() {
        for codec in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let pages = [vec![1u8; 4096], vec![2u8; 4096]];
            let entries = [5u64, 9 | ZERO_PAGE, 11];
            let raw: Vec<u8> = pages.concat();
            let body = match codec {
                Compression::None => raw.clone(),
                Compression::Lz4 => lz4_flex::block::compress(&raw),
                Compression::Zstd => zstd::bulk::compress(&raw, 1).unwrap(),
            };
            let mut out = Vec::new();
            PageBatch::header(&mut out, 3, &entries, codec, raw.len());
            out.extend_from_slice(&body);
            let mut seen = Vec::new();
            let mut scratch = Vec::new();
            let (pass, n) = PageBatch::parse(&out, 100, &mut scratch, |i, d| {
                seen.push((i, d.map(|d| d[0])));
                Ok(())
            })
            .unwrap();
            assert_eq!((pass, n), (3, 3));
            assert_eq!(seen, vec![(5, Some(1)), (9, None), (11, Some(2))]);
            assert!(
                PageBatch::parse(&out, 10, &mut scratch, |_, _| Ok(())).is_err(),
                "page 11 of 10 accepted"
            );
        }
    }
}
