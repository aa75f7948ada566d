//! The snapshot file: one versioned, checksummed container for a whole VM.
//!
//! ```text
//! header   "FERRYSNP" | version u32 | flags u32 | page_size u32 | reserved u32 | crc32c u32
//! section  tag [u8; 4] | payload length u64 | crc32c(payload) u32 | payload
//!   "STAT"  bincode(MachineState)                       exactly one, first
//!   "MEMC"  first_page u64 | count u32 | count × 4 KiB   zero or more, ascending, non-zero pages only
//!   "END "  chunks u64 | data pages u64 | total pages u64 exactly one, last
//! ```
//! All integers are little-endian. Pages not present in any `MEMC` chunk are zero. Every byte of
//! the file is covered by a checksum, and the `END ` trailer proves the file is complete, so a
//! truncated, bit-flipped or foreign file is refused with a message that says where and why,
//! before a VM is created from it. Files are written to a fresh temporary file beside `<path>`
//! (O_EXCL, unguessable name, mode 0600: [`crate::confine::create_temp_beside`]) and renamed
//! into place, so a failed snapshot never replaces a good one and a planted symlink is never
//! followed.
//!
//! Versions: Ferry writes [`VERSION`] (4) and reads [`MIN_READ_VERSION`]`..=`[`VERSION`] (2 to
//! 4), so that a cluster in the middle of an upgrade can restore and receive what the previous
//! builds wrote; any other version is refused by number. The container is the same in all; only
//! the encoded state differs (version 3 added the NIC receive backlog, version 4 the CMOS RTC).
//! A state is decoded with the layout of the version it was written in ([`decode_state`] takes
//! the version; versions 3 and 2 through the mirror types of [`crate::state_v3`] and
//! [`crate::state_v2`]) and then converted to the current
//! [`MachineState`]. The migration stream's `STATE` frame uses the same codec and versions.

use crate::memory::{is_zero, GuestRam, PAGE_SIZE};
use crate::vm::MachineState;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::Path;
use std::time::Instant;

/// File magic.
pub const MAGIC: &[u8; 8] = b"FERRYSNP";
/// Current format version (what this build writes).
pub const VERSION: u32 = 4;
/// Oldest format version this build reads.
pub const MIN_READ_VERSION: u32 = 2;
/// Largest run of pages in one memory chunk (1 MiB).
pub const MAX_CHUNK_PAGES: u32 = 256;
/// Largest state section accepted (the state is a few hundred KiB even with 8 vCPUs).
pub const MAX_STATE_BYTES: u64 = 64 << 20;

const HEADER_LEN: usize = 8 + 4 * 5;
const TAG_STATE: &[u8; 4] = b"STAT";
const TAG_MEMORY: &[u8; 4] = b"MEMC";
const TAG_END: &[u8; 4] = b"END ";

/// Snapshot errors. Messages are one line and say what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot open snapshot {path}: {err}")]
    Open { path: String, err: std::io::Error },
    #[error("cannot write snapshot {path}: {err}")]
    Write { path: String, err: std::io::Error },
    #[error("not a Ferry snapshot (bad magic)")]
    BadMagic,
    #[error("snapshot format version {0} is not supported (this build reads versions {MIN_READ_VERSION}-{VERSION})")]
    Version(u32),
    #[error("corrupt snapshot: header checksum mismatch")]
    HeaderChecksum,
    #[error("snapshot uses {0}-byte pages; Ferry uses 4096")]
    PageSize(u32),
    #[error("truncated snapshot: file ends inside {what} at byte {offset}")]
    Truncated { what: String, offset: u64 },
    #[error("corrupt snapshot: checksum mismatch in {what} at byte {offset}")]
    Checksum { what: String, offset: u64 },
    #[error("corrupt snapshot: {0}")]
    Malformed(String),
    #[error("corrupt snapshot: cannot decode the VM state: {0}")]
    Decode(String),
    #[error("cannot encode the VM state: {0}")]
    Encode(String),
    #[error("I/O error reading snapshot at byte {offset}: {err}")]
    Read { offset: u64, err: std::io::Error },
}

/// What writing or reading a snapshot moved.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct SnapshotStats {
    /// Bytes in the file.
    pub file_bytes: u64,
    /// Guest pages stored (non-zero pages).
    pub data_pages: u64,
    /// Guest pages in total.
    pub total_pages: u64,
    /// Bytes of the encoded machine state.
    pub state_bytes: u64,
    /// Format version of the file (written: always [`VERSION`]; read: what the file holds).
    pub format_version: u32,
    /// Wall time.
    pub seconds: f64,
}

fn bincode_opts() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(MAX_STATE_BYTES)
        .reject_trailing_bytes()
}

/// Whether this build reads format `version`.
pub fn reads_version(version: u32) -> bool {
    (MIN_READ_VERSION..=VERSION).contains(&version)
}

/// Encodes a machine state in the current format with the snapshot's (and the migration
/// stream's) codec.
pub fn encode_state(state: &MachineState) -> Result<Vec<u8>, SnapshotError> {
    encode_state_versioned(VERSION, state)
}

/// Encodes a machine state in format `version`. Ferry writes the current version; an older
/// one is for tools and tests that must produce what an older build wrote, and is refused if
/// the state holds something that version cannot express.
pub fn encode_state_versioned(
    version: u32,
    state: &MachineState,
) -> Result<Vec<u8>, SnapshotError> {
    use bincode::Options;
    let encoded = match version {
        VERSION => bincode_opts().serialize(state),
        crate::state_v3::VERSION => {
            let old = crate::state_v3::MachineStateV3::try_from(state)
                .map_err(|e| SnapshotError::Encode(e.to_string()))?;
            bincode_opts().serialize(&old)
        }
        crate::state_v2::VERSION => {
            let old = crate::state_v2::MachineStateV2::try_from(state)
                .map_err(|e| SnapshotError::Encode(e.to_string()))?;
            bincode_opts().serialize(&old)
        }
        v => return Err(SnapshotError::Version(v)),
    };
    encoded.map_err(|e| SnapshotError::Encode(e.to_string()))
}

/// Decodes a machine state written in format `version` (the snapshot header's, or the one a
/// migration source announced) and upgrades it to the current types; never panics on bad
/// input. Refuses versions this build does not read.
pub fn decode_state(version: u32, bytes: &[u8]) -> Result<MachineState, SnapshotError> {
    use bincode::Options;
    let decode_err = |e: bincode::Error| SnapshotError::Decode(e.to_string());
    match version {
        VERSION => bincode_opts().deserialize(bytes).map_err(decode_err),
        crate::state_v3::VERSION => bincode_opts()
            .deserialize::<crate::state_v3::MachineStateV3>(bytes)
            .map(MachineState::from)
            .map_err(decode_err),
        crate::state_v2::VERSION => bincode_opts()
            .deserialize::<crate::state_v2::MachineStateV2>(bytes)
            .map(MachineState::from)
            .map_err(decode_err),
        v => Err(SnapshotError::Version(v)),
    }
}

fn header(version: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&version.to_le_bytes());
    h[12..16].copy_from_slice(&0u32.to_le_bytes());
    h[16..20].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    h[20..24].copy_from_slice(&0u32.to_le_bytes());
    let crc = crc32c::crc32c(&h[..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

struct SectionWriter<W: Write> {
    w: W,
    bytes: u64,
}

impl<W: Write> SectionWriter<W> {
    /// Writes one section. Small leading parts are gathered with the section header into one
    /// write; the large last part (page data) goes straight from guest memory to the file.
    fn section(&mut self, tag: &[u8; 4], parts: &[&[u8]]) -> std::io::Result<()> {
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let crc = parts.iter().fold(0u32, |c, p| crc32c::crc32c_append(c, p));
        let mut head = Vec::with_capacity(64);
        head.extend_from_slice(tag);
        head.extend_from_slice(&len.to_le_bytes());
        head.extend_from_slice(&crc.to_le_bytes());
        let (last, small) = parts
            .split_last()
            .map(|(l, s)| (*l, s))
            .unwrap_or((&[][..], &[]));
        for p in small {
            head.extend_from_slice(p);
        }
        self.w.write_all(&head)?;
        self.w.write_all(last)?;
        self.bytes += 16 + len;
        Ok(())
    }
}

/// A source of guest pages for [`write()`]: yields runs of consecutive pages by RAM page index.
pub trait PageSource {
    /// Total RAM pages.
    fn total_pages(&self) -> u64;
    /// Calls `f(first_page, bytes)` for runs of pages that may be non-zero, ascending.
    fn for_each_run(
        &self,
        f: &mut dyn FnMut(u64, &[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()>;
}

impl PageSource for GuestRam {
    fn total_pages(&self) -> u64 {
        self.layout().total_pages()
    }
    fn for_each_run(
        &self,
        f: &mut dyn FnMut(u64, &[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        for (start, end) in self.data_extents() {
            let mut off = start & !(PAGE_SIZE - 1);
            while off < end {
                // Do not cross a region boundary in one slice.
                let region = self
                    .layout()
                    .regions
                    .iter()
                    .find(|r| off >= r.file_offset && off < r.file_offset + r.size)
                    .copied()
                    .ok_or_else(|| std::io::Error::other("memfd extent outside RAM"))?;
                let stop = end.min(region.file_offset + region.size);
                let ptr = self
                    .ptr_at_offset(off)
                    .ok_or_else(|| std::io::Error::other("unmapped RAM"))?;
                // SAFETY: [off, stop) lies inside one mapped region; the VM is paused, so no vCPU
                // writes these bytes while the slice exists.
                let bytes = unsafe { std::slice::from_raw_parts(ptr, (stop - off) as usize) };
                f(off / PAGE_SIZE, bytes)?;
                off = stop;
            }
        }
        Ok(())
    }
}

/// Sparse pages held in memory (used by tools and tests that edit snapshots).
pub struct SparsePages {
    pub total_pages: u64,
    /// (page index, 4 KiB of data), ascending by index.
    pub pages: Vec<(u64, Vec<u8>)>,
}

impl PageSource for SparsePages {
    fn total_pages(&self) -> u64 {
        self.total_pages
    }
    fn for_each_run(
        &self,
        f: &mut dyn FnMut(u64, &[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        for (i, p) in &self.pages {
            f(*i, p)?;
        }
        Ok(())
    }
}

/// Writes `state` and the non-zero pages of `pages` to `path` (atomically, via a temp file),
/// in the current format.
pub fn write(
    path: &Path,
    state: &MachineState,
    pages: &dyn PageSource,
) -> Result<SnapshotStats, SnapshotError> {
    write_versioned(path, VERSION, state, pages)
}

/// Like [`write()`], in format `version` (see [`encode_state_versioned`]: older versions are for
/// tools and tests).
pub fn write_versioned(
    path: &Path,
    version: u32,
    state: &MachineState,
    pages: &dyn PageSource,
) -> Result<SnapshotStats, SnapshotError> {
    let t0 = Instant::now();
    let werr = |err: std::io::Error| SnapshotError::Write {
        path: path.display().to_string(),
        err,
    };
    let encoded = encode_state_versioned(version, state)?;
    let (file, tmp) = crate::confine::create_temp_beside(path).map_err(werr)?;
    let mut sw = SectionWriter { w: file, bytes: 0 };
    let result = (|| -> std::io::Result<(u64, u64)> {
        sw.w.write_all(&header(version))?;
        sw.bytes += HEADER_LEN as u64;
        sw.section(TAG_STATE, &[&encoded])?;
        let (mut chunks, mut data_pages) = (0u64, 0u64);
        let page = PAGE_SIZE as usize;
        pages.for_each_run(&mut |first, bytes| {
            let n = bytes.len() / page;
            let mut i = 0;
            while i < n {
                if is_zero(&bytes[i * page..(i + 1) * page]) {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < n
                    && i - start < MAX_CHUNK_PAGES as usize
                    && !is_zero(&bytes[i * page..(i + 1) * page])
                {
                    i += 1;
                }
                let count = (i - start) as u32;
                let mut hdr = [0u8; 12];
                hdr[..8].copy_from_slice(&(first + start as u64).to_le_bytes());
                hdr[8..].copy_from_slice(&count.to_le_bytes());
                sw.section(TAG_MEMORY, &[&hdr, &bytes[start * page..i * page]])?;
                chunks += 1;
                data_pages += count as u64;
            }
            Ok(())
        })?;
        let mut end = [0u8; 24];
        end[..8].copy_from_slice(&chunks.to_le_bytes());
        end[8..16].copy_from_slice(&data_pages.to_le_bytes());
        end[16..].copy_from_slice(&pages.total_pages().to_le_bytes());
        sw.section(TAG_END, &[&end])?;
        sw.w.sync_all()?;
        Ok((chunks, data_pages))
    })();
    let (_, data_pages) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(werr(e));
        }
    };
    std::fs::rename(&tmp, path).map_err(werr)?;
    Ok(SnapshotStats {
        file_bytes: sw.bytes,
        data_pages,
        total_pages: pages.total_pages(),
        state_bytes: encoded.len() as u64,
        format_version: version,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Receives verified page runs: `(first page index, bytes)`.
pub type PageSink<'a> = dyn FnMut(u64, &[u8]) -> Result<(), SnapshotError> + 'a;

/// Reads snapshot files section by section, verifying as it goes.
pub struct Reader {
    r: BufReader<File>,
    offset: u64,
    version: u32,
}

/// A verified section header.
struct Section {
    tag: [u8; 4],
    len: u64,
    crc: u32,
    offset: u64,
}

fn tag_name(tag: &[u8; 4]) -> String {
    match tag {
        TAG_STATE => "the VM state section".into(),
        TAG_MEMORY => "a memory chunk".into(),
        TAG_END => "the end marker".into(),
        other => format!("section {:?}", String::from_utf8_lossy(other)),
    }
}

impl Reader {
    /// Opens `path` and verifies the header.
    pub fn open(path: &Path) -> Result<Reader, SnapshotError> {
        let f = File::open(path).map_err(|err| SnapshotError::Open {
            path: path.display().to_string(),
            err,
        })?;
        Reader::from_file(f)
    }

    /// Reads the snapshot in `f` (opened by the caller, from its start) and verifies the
    /// header.
    pub fn from_file(f: File) -> Result<Reader, SnapshotError> {
        let mut r = Reader {
            r: BufReader::with_capacity(4 << 20, f),
            offset: 0,
            version: 0,
        };
        let mut h = [0u8; HEADER_LEN];
        let got = r.read_up_to(&mut h)?;
        if got < 8 || &h[..8] != MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        if got < HEADER_LEN {
            return Err(SnapshotError::Truncated {
                what: "the file header".into(),
                offset: got as u64,
            });
        }
        let version = u32::from_le_bytes(h[8..12].try_into().unwrap());
        let crc = u32::from_le_bytes(h[24..28].try_into().unwrap());
        if crc32c::crc32c(&h[..24]) != crc {
            // A foreign version may legitimately differ in layout: report the version first.
            if !reads_version(version) {
                return Err(SnapshotError::Version(version));
            }
            return Err(SnapshotError::HeaderChecksum);
        }
        if !reads_version(version) {
            return Err(SnapshotError::Version(version));
        }
        let psize = u32::from_le_bytes(h[16..20].try_into().unwrap());
        if psize as u64 != PAGE_SIZE {
            return Err(SnapshotError::PageSize(psize));
        }
        r.version = version;
        Ok(r)
    }

    /// The format version of the file (one this build reads).
    pub fn version(&self) -> u32 {
        self.version
    }

    fn read_up_to(&mut self, buf: &mut [u8]) -> Result<usize, SnapshotError> {
        let mut n = 0;
        while n < buf.len() {
            match self.r.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(err) => {
                    return Err(SnapshotError::Read {
                        offset: self.offset + n as u64,
                        err,
                    })
                }
            }
        }
        self.offset += n as u64;
        Ok(n)
    }

    fn read_exact(&mut self, buf: &mut [u8], what: &str) -> Result<(), SnapshotError> {
        let n = self.read_up_to(buf)?;
        if n < buf.len() {
            return Err(SnapshotError::Truncated {
                what: what.into(),
                offset: self.offset,
            });
        }
        Ok(())
    }

    fn next_section(&mut self) -> Result<Section, SnapshotError> {
        let offset = self.offset;
        let mut h = [0u8; 16];
        let n = self.read_up_to(&mut h)?;
        if n == 0 {
            return Err(SnapshotError::Truncated {
                what: "the section list (no end marker)".into(),
                offset,
            });
        }
        if n < 16 {
            return Err(SnapshotError::Truncated {
                what: "a section header".into(),
                offset: self.offset,
            });
        }
        let tag: [u8; 4] = h[..4].try_into().unwrap();
        if ![TAG_STATE, TAG_MEMORY, TAG_END].contains(&&tag) {
            return Err(SnapshotError::Malformed(format!(
                "unknown section tag {:?} at byte {offset}",
                String::from_utf8_lossy(&tag)
            )));
        }
        Ok(Section {
            tag,
            len: u64::from_le_bytes(h[4..12].try_into().unwrap()),
            crc: u32::from_le_bytes(h[12..16].try_into().unwrap()),
            offset,
        })
    }

    fn read_payload(&mut self, s: &Section, max: u64) -> Result<Vec<u8>, SnapshotError> {
        if s.len > max {
            return Err(SnapshotError::Malformed(format!(
                "{} at byte {} claims {} bytes (limit {max})",
                tag_name(&s.tag),
                s.offset,
                s.len
            )));
        }
        let mut buf = vec![0u8; s.len as usize];
        self.read_exact(&mut buf, &tag_name(&s.tag))?;
        if crc32c::crc32c(&buf) != s.crc {
            return Err(SnapshotError::Checksum {
                what: tag_name(&s.tag),
                offset: s.offset,
            });
        }
        Ok(buf)
    }

    /// Reads and decodes the state section (must come first), in the file's format version,
    /// upgraded to the current types.
    pub fn read_state(&mut self) -> Result<MachineState, SnapshotError> {
        let s = self.next_section()?;
        if &s.tag != TAG_STATE {
            return Err(SnapshotError::Malformed(format!(
                "expected the VM state section first, found {}",
                tag_name(&s.tag)
            )));
        }
        let payload = self.read_payload(&s, MAX_STATE_BYTES)?;
        decode_state(self.version, &payload)
    }

    /// Reads every memory chunk, handing each page run to `sink(first_page, bytes)` after its
    /// checksum was verified, until the end marker; checks the totals it declares.
    pub fn read_memory(
        &mut self,
        total_pages: u64,
        sink: &mut PageSink<'_>,
    ) -> Result<(u64, u64), SnapshotError> {
        let (mut chunks, mut data_pages, mut next_min) = (0u64, 0u64, 0u64);
        let mut buf = Vec::new();
        loop {
            let s = self.next_section()?;
            match &s.tag {
                TAG_MEMORY => {
                    if s.len < 12 || (s.len - 12) % PAGE_SIZE != 0 {
                        return Err(SnapshotError::Malformed(format!(
                            "memory chunk at byte {} has length {}",
                            s.offset, s.len
                        )));
                    }
                    let count = (s.len - 12) / PAGE_SIZE;
                    if count == 0 || count > MAX_CHUNK_PAGES as u64 {
                        return Err(SnapshotError::Malformed(format!(
                            "memory chunk at byte {} holds {count} pages",
                            s.offset
                        )));
                    }
                    buf.resize(s.len as usize, 0);
                    self.read_exact(&mut buf, "a memory chunk")?;
                    if crc32c::crc32c(&buf) != s.crc {
                        return Err(SnapshotError::Checksum {
                            what: "a memory chunk".into(),
                            offset: s.offset,
                        });
                    }
                    let first = u64::from_le_bytes(buf[..8].try_into().unwrap());
                    let declared = u32::from_le_bytes(buf[8..12].try_into().unwrap()) as u64;
                    if declared != count {
                        return Err(SnapshotError::Malformed(format!(
                            "memory chunk at byte {} declares {declared} pages but carries {count}",
                            s.offset
                        )));
                    }
                    if first < next_min || first.checked_add(count).is_none_or(|e| e > total_pages)
                    {
                        return Err(SnapshotError::Malformed(format!(
                            "memory chunk at byte {} covers pages {first}..{} outside 0..{total_pages} or out of order",
                            s.offset,
                            first.saturating_add(count)
                        )));
                    }
                    next_min = first + count;
                    sink(first, &buf[12..])?;
                    chunks += 1;
                    data_pages += count;
                }
                TAG_END => {
                    let p = self.read_payload(&s, 24)?;
                    if p.len() != 24 {
                        return Err(SnapshotError::Malformed(
                            "end marker has the wrong size".into(),
                        ));
                    }
                    let c = u64::from_le_bytes(p[..8].try_into().unwrap());
                    let d = u64::from_le_bytes(p[8..16].try_into().unwrap());
                    let t = u64::from_le_bytes(p[16..24].try_into().unwrap());
                    if c != chunks || d != data_pages || t != total_pages {
                        return Err(SnapshotError::Malformed(format!(
                            "end marker counts {c} chunks / {d} pages / {t} total, file has {chunks} / {data_pages} / {total_pages}"
                        )));
                    }
                    let mut extra = [0u8; 1];
                    if self.read_up_to(&mut extra)? != 0 {
                        return Err(SnapshotError::Malformed(format!(
                            "trailing bytes after the end marker at byte {}",
                            self.offset - 1
                        )));
                    }
                    return Ok((chunks, data_pages));
                }
                _ => {
                    return Err(SnapshotError::Malformed(format!(
                        "unexpected {} at byte {}",
                        tag_name(&s.tag),
                        s.offset
                    )));
                }
            }
        }
    }
}

/// Copies `bytes` into RAM at page `first` (memfd offset `first` × 4 KiB).
fn copy_to_ram(ram: &GuestRam, first: u64, bytes: &[u8]) -> Result<(), SnapshotError> {
    let layout = ram.layout();
    let mut off = first * PAGE_SIZE;
    let mut rest = bytes;
    while !rest.is_empty() {
        let region = layout
            .regions
            .iter()
            .find(|r| off >= r.file_offset && off < r.file_offset + r.size)
            .ok_or_else(|| {
                SnapshotError::Malformed(format!("page {} is outside RAM", off / PAGE_SIZE))
            })?;
        let n = ((region.file_offset + region.size - off) as usize).min(rest.len());
        let dst = ram.ptr_at_offset(off).ok_or_else(|| {
            SnapshotError::Malformed(format!("page {} is not mapped", off / PAGE_SIZE))
        })?;
        // SAFETY: [off, off + n) lies inside one mapped region of `ram`; the VM built on it has
        // not started, and chunks cover disjoint pages, so nothing else accesses these bytes.
        unsafe { std::ptr::copy_nonoverlapping(rest.as_ptr(), dst, n) };
        off += n as u64;
        rest = &rest[n..];
    }
    Ok(())
}

/// Reads and verifies every memory chunk of `reader` into `ram`. The file is read and checked
/// on this thread while two helper threads copy verified chunks into guest RAM: the copy is
/// where fresh guest memory gets allocated, the slowest part, so it runs in parallel.
pub fn read_into(
    reader: &mut Reader,
    state: &MachineState,
    ram: &GuestRam,
) -> Result<(u64, u64), SnapshotError> {
    const COPIERS: usize = 2;
    let total = state.layout.total_pages();
    if ram.layout() != &state.layout {
        return Err(SnapshotError::Malformed(
            "RAM layout differs from the snapshot's".into(),
        ));
    }
    let failed: std::sync::Mutex<Option<SnapshotError>> = std::sync::Mutex::new(None);
    // Chunk buffers are recycled: fresh allocations would cost page faults of their own.
    let (pool_tx, pool_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    for _ in 0..COPIERS * 6 {
        let _ = pool_tx.send(Vec::with_capacity(
            MAX_CHUNK_PAGES as usize * PAGE_SIZE as usize,
        ));
    }
    std::thread::scope(|scope| {
        let mut senders = Vec::new();
        for _ in 0..COPIERS {
            let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, Vec<u8>)>(4);
            senders.push(tx);
            let (failed, pool_tx) = (&failed, pool_tx.clone());
            scope.spawn(move || {
                for (first, bytes) in rx {
                    if let Err(e) = copy_to_ram(ram, first, &bytes) {
                        failed
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_or_insert(e);
                    }
                    let _ = pool_tx.send(bytes);
                }
            });
        }
        let mut next = 0;
        let result = reader.read_memory(total, &mut |first, bytes| {
            if let Some(e) = failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
                return Err(e);
            }
            let mut buf = pool_rx
                .recv()
                .map_err(|_| SnapshotError::Malformed("restore copier stopped".into()))?;
            buf.clear();
            buf.extend_from_slice(bytes);
            senders[next]
                .send((first, buf))
                .map_err(|_| SnapshotError::Malformed("restore copier stopped".into()))?;
            next = (next + 1) % COPIERS;
            Ok(())
        });
        drop(senders);
        result
    })
    .and_then(
        |r| match failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(e) => Err(e),
            None => Ok(r),
        },
    )
}

/// Loads a whole snapshot into memory (state + non-zero pages). For tools and tests.
pub fn load_sparse(path: &Path) -> Result<(MachineState, SparsePages), SnapshotError> {
    let mut r = Reader::open(path)?;
    let state = r.read_state()?;
    let total = state.layout.total_pages();
    let mut pages = Vec::new();
    r.read_memory(total, &mut |first, bytes| {
        for (i, p) in bytes.chunks(PAGE_SIZE as usize).enumerate() {
            pages.push((first + i as u64, p.to_vec()));
        }
        Ok(())
    })?;
    Ok((
        state,
        SparsePages {
            total_pages: total,
            pages,
        },
    ))
}

/// Snapshot of a running or paused VM: pauses it (if running), writes the file, and resumes it
/// if it was running before.
pub fn take(vm: &crate::vm::Vm, path: &Path) -> Result<SnapshotStats, crate::vm::VmError> {
    let was_running = vm.run_state() == crate::vm::VmRunState::Running;
    vm.pause()?;
    let result = vm.save_state().and_then(|state| {
        write(path, &state, vm.ram().as_ref())
            .map_err(|e| crate::vm::VmError::Snapshot(e.to_string()))
    });
    if was_running {
        vm.resume()?;
    }
    result
}

/// Creates a VM from a snapshot file (paused; call `start`). Everything is verified before the
/// VM exists; on any error nothing is left behind.
pub fn restore(
    kvm: &kvm_ioctls::Kvm,
    path: &Path,
    host: &crate::devices::virtio::HostDevices,
    serial_out: impl Into<crate::devices::serial::ConsoleLog>,
) -> Result<(crate::vm::Vm, SnapshotStats), crate::vm::VmError> {
    let snap = |e: SnapshotError| crate::vm::VmError::Snapshot(e.to_string());
    let file = File::open(path)
        .map_err(|err| SnapshotError::Open {
            path: path.display().to_string(),
            err,
        })
        .map_err(snap)?;
    restore_file(kvm, file, path, host, serial_out)
}

/// [`restore`] from a snapshot file the caller opened (`path` only names it): an unprivileged
/// worker opens it before it drops root. Reads from the file's start whatever its offset.
pub fn restore_file(
    kvm: &kvm_ioctls::Kvm,
    mut file: File,
    path: &Path,
    host: &crate::devices::virtio::HostDevices,
    serial_out: impl Into<crate::devices::serial::ConsoleLog>,
) -> Result<(crate::vm::Vm, SnapshotStats), crate::vm::VmError> {
    let t0 = Instant::now();
    let snap = |e: SnapshotError| crate::vm::VmError::Snapshot(e.to_string());
    let open_err = |err| SnapshotError::Open {
        path: path.display().to_string(),
        err,
    };
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(0))
        .map_err(open_err)
        .map_err(snap)?;
    let file_bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut reader = Reader::from_file(file).map_err(snap)?;
    let state = reader.read_state().map_err(snap)?;
    let vm = crate::vm::Vm::restore(kvm, &state, host, serial_out)?;
    let (_, data_pages) = read_into(&mut reader, &state, vm.ram()).map_err(snap)?;
    Ok((
        vm,
        SnapshotStats {
            file_bytes,
            data_pages,
            total_pages: state.layout.total_pages(),
            state_bytes: 0,
            format_version: reader.version(),
            seconds: t0.elapsed().as_secs_f64(),
        },
    ))
}
