//! The `snapshot` harness: Ferry's snapshot files (`crates/vmm/src/snapshot.rs`) and the
//! versioned state codec they (and the migration stream's `STATE` frame) use.
//!
//! Input: `mode u8 | param u8 | bytes...`
//! * `mode & 3 == 0`: `bytes` is an encoded state: `decode_state(v, bytes)` for
//!   `v = MIN_READ_VERSION + param % 4` (2, 3, 4, and 5 which must be refused).
//! * `mode & 3 == 1`: `bytes` is a snapshot file, read with `load_sparse` (the tools' reader).
//! * `mode & 3 == 2`: `bytes` is a snapshot file, read as `snapshot::restore` reads it:
//!   `Reader::open`, `read_state`, the state validated, then `read_into` a guest RAM of the
//!   state's layout (up to 64 MiB).
//! * `mode & 3 == 3`: both readers on the same file.
//! * `mode & 8` (with `mode & 3 == 0`): a state that decodes is also written as a snapshot
//!   file (`snapshot::write_versioned`, in its version if it can be, with a few pages) and that
//!   file read back with both readers: the file readers then see every state the decoder
//!   accepts, without the fuzzer having to keep section lengths and checksums right.
//! * `mode & 4`: recompute the header and section checksums of the file first, so that
//!   mutations get past them to the state decoder and the section logic.
//!
//! Checked besides "no panic": a decoded state re-encodes to the same bytes (the codec is
//! canonical), an upgraded old state downgrades to exactly what was read, what `load_sparse`
//! returns is consistent (whole pages, ascending, inside the VM).

use crate::Cursor;
use std::path::PathBuf;
use std::sync::Mutex;
use vmm::memory::{GuestRam, MemoryLayout, PAGE_SIZE};
use vmm::snapshot::{self, SnapshotError};

/// Largest guest RAM the harness allocates for `read_into`.
const MAX_RAM: u64 = 64 << 20;

/// Rewrites the header checksum and every complete section's checksum of a snapshot file.
pub fn fix_snapshot_crcs(buf: &mut [u8]) {
    if buf.len() < 28 {
        return;
    }
    let crc = crc32c::crc32c(&buf[..24]);
    buf[24..28].copy_from_slice(&crc.to_le_bytes());
    let mut off = 28usize;
    while off + 16 <= buf.len() {
        let len = u64::from_le_bytes(buf[off + 4..off + 12].try_into().unwrap());
        let Some(end) = usize::try_from(len)
            .ok()
            .and_then(|l| (off + 16).checked_add(l))
        else {
            break;
        };
        if end > buf.len() {
            break;
        }
        let crc = crc32c::crc32c(&buf[off + 16..end]);
        buf[off + 12..off + 16].copy_from_slice(&crc.to_le_bytes());
        off = end;
    }
}

fn scratch_path() -> PathBuf {
    crate::scratch_dir().join(format!("ferry-fuzz-snapshot-{}", std::process::id()))
}

/// One fuzz input.
pub fn run(data: &[u8]) {
    crate::init();
    let mut c = Cursor::new(data);
    let mode = c.u8();
    let param = c.u8();
    let rest = c.rest();
    match mode & 3 {
        0 => {
            let version = snapshot::MIN_READ_VERSION + param as u32 % 4;
            if let Some(st) = check_state(version, rest) {
                if mode & 8 != 0 {
                    check_as_file(version, &st);
                }
            }
        }
        m => {
            let mut file = rest.to_vec();
            if mode & 4 != 0 {
                fix_snapshot_crcs(&mut file);
            }
            let path = scratch_path();
            std::fs::write(&path, &file).expect("write the scratch snapshot");
            if m & 1 != 0 {
                check_load_sparse(&path);
            }
            if m & 2 != 0 {
                check_restore_path(&path);
            }
        }
    }
}

/// Decodes a state as a destination or a restore does, and checks the codec round trip.
pub fn check_state(version: u32, bytes: &[u8]) -> Option<vmm::vm::MachineState> {
    let st = match snapshot::decode_state(version, bytes) {
        Ok(st) => st,
        Err(e) => {
            crate::debug!("snapshot: v{version} state refused: {e}");
            return None;
        }
    };
    crate::debug!(
        "snapshot: v{version} state decoded: {} vCPUs, {} virtio devices",
        st.vcpus.len(),
        st.devices.virtio.len()
    );
    assert!(
        snapshot::reads_version(version),
        "version {version} decoded"
    );
    let _ = st.validate(u64::MAX);
    let enc = snapshot::encode_state(&st).expect("a decoded state re-encodes");
    if version == snapshot::VERSION {
        assert!(
            enc == bytes,
            "the state codec is not canonical: re-encoding differs"
        );
    } else {
        // An old state upgrades with a fresh RTC (and, from v2, empty NIC backlogs), which
        // its version expresses: it must downgrade to exactly what was read.
        let old = snapshot::encode_state_versioned(version, &st)
            .expect("an upgraded old state downgrades to its version");
        assert!(
            old == bytes,
            "upgrading then downgrading a v{version} state changed it"
        );
    }
    let again =
        snapshot::decode_state(snapshot::VERSION, &enc).expect("a re-encoded state decodes");
    assert!(
        snapshot::encode_state(&again).unwrap() == enc,
        "decode/encode is not idempotent"
    );
    Some(st)
}

/// Writes `st` as a snapshot file (as `snapshot::take` would) and reads it back both ways.
fn check_as_file(version: u32, st: &vmm::vm::MachineState) {
    // The harness's own arithmetic must not overflow on an unvalidated layout.
    let total = st
        .layout
        .regions
        .iter()
        .try_fold(0u64, |a, r| a.checked_add(r.size))
        .unwrap_or(0)
        / PAGE_SIZE;
    let pages = snapshot::SparsePages {
        total_pages: total,
        pages: [0, 1, total / 2]
            .into_iter()
            .filter(|&i| i < total)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(|i| (i, vec![i as u8 | 1; PAGE_SIZE as usize]))
            .collect(),
    };
    let path = scratch_path();
    let written = snapshot::write_versioned(&path, version, st, &pages)
        .or_else(|_| snapshot::write_versioned(&path, snapshot::VERSION, st, &pages));
    if let Err(e) = written {
        crate::debug!("snapshot: cannot write the state as a file: {e}");
        return;
    }
    check_load_sparse(&path);
    check_restore_path(&path);
}

fn check_load_sparse(path: &std::path::Path) {
    if crate::ignored("layout-overflow") {
        // Finding `layout-overflow` (fuzz/README.md): step around states whose RAM sizes
        // overflow when added up.
        let st = snapshot::Reader::open(path).and_then(|mut r| r.read_state());
        if st.is_ok_and(|st| {
            st.layout
                .regions
                .iter()
                .try_fold(0u64, |a, r| a.checked_add(r.size))
                .is_none()
        }) {
            return;
        }
    }
    match snapshot::load_sparse(path) {
        Ok((st, sparse)) => {
            crate::debug!("snapshot: loaded {} pages", sparse.pages.len());
            assert_eq!(sparse.total_pages, st.layout.total_pages());
            let mut prev = None;
            for (i, p) in &sparse.pages {
                assert_eq!(p.len(), PAGE_SIZE as usize, "a page of {} bytes", p.len());
                assert!(
                    *i < sparse.total_pages,
                    "page {i} of {}",
                    sparse.total_pages
                );
                assert!(prev.is_none_or(|q| q < *i), "pages out of order");
                prev = Some(*i);
            }
        }
        Err(e) => check_err(&e),
    }
}

fn check_err(e: &SnapshotError) {
    crate::debug!("snapshot: refused: {e}");
}

/// Guest RAM for `read_into`, kept between inputs with the same layout.
static RAM: Mutex<Option<(MemoryLayout, GuestRam)>> = Mutex::new(None);

fn check_restore_path(path: &std::path::Path) {
    let mut reader = match snapshot::Reader::open(path) {
        Ok(r) => r,
        Err(e) => return check_err(&e),
    };
    assert!(snapshot::reads_version(reader.version()));
    let st = match reader.read_state() {
        Ok(st) => st,
        Err(e) => return check_err(&e),
    };
    // `Vm::restore` validates the state before it creates RAM from its layout.
    if st.validate(MAX_RAM).is_err() {
        return;
    }
    let mut ram = RAM.lock().unwrap_or_else(|e| e.into_inner());
    if ram.as_ref().is_none_or(|(l, _)| *l != st.layout) {
        *ram = None;
        let r = GuestRam::new(st.layout.clone()).expect("guest RAM for a validated layout");
        *ram = Some((st.layout.clone(), r));
    }
    let (_, r) = ram.as_ref().unwrap();
    match snapshot::read_into(&mut reader, &st, r) {
        Ok((chunks, pages)) => {
            crate::debug!("snapshot: restored {chunks} chunks, {pages} pages");
            assert!(pages <= st.layout.total_pages())
        }
        Err(e) => check_err(&e),
    }
}
