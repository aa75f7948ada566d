//! The source's data streams: one thread per TCP connection, fed page lists by the phase
//! driver, copying pages out of guest memory, compressing and framing them, with a shared
//! token-bucket rate cap.

use crate::wire::{self, Compression, MAX_BATCH_PAGES, ZERO_PAGE};
use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use trust::Conn;
use vmm::dirty::PageBitmap;
use vmm::memory::{GuestRam, PAGE_SIZE};

/// Token bucket shared by the streams.
pub(super) struct RateLimiter {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    pub(super) fn new(rate: u64) -> RateLimiter {
        RateLimiter {
            rate: rate as f64,
            state: Mutex::new((0.0, Instant::now())),
        }
    }

    pub(super) fn take(&self, bytes: usize) {
        let wait = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let burst = self.rate * 0.02;
            s.0 = (s.0 + self.rate * now.duration_since(s.1).as_secs_f64()).min(burst);
            s.1 = now;
            s.0 -= bytes as f64;
            if s.0 < 0.0 {
                -s.0 / self.rate
            } else {
                0.0
            }
        };
        if wait > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(wait));
        }
    }
}

/// Counters shared with the stream threads.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) bytes: AtomicU64,
    pub(super) pages: AtomicU64,
    pub(super) zero: AtomicU64,
}

pub(super) enum Work {
    /// Pages to send; `holes` marks pages known to be zero without reading them (pass 0:
    /// never-written parts of the memfd, which reading would allocate).
    Batch {
        pass: u32,
        pages: Vec<u64>,
        holes: Option<Arc<PageBitmap>>,
    },
    Flush(SyncSender<Result<u64, String>>),
}

pub(super) struct Stream {
    pub(super) tx: SyncSender<Work>,
    pub(super) join: Option<std::thread::JoinHandle<()>>,
}

pub(super) fn stream_thread(
    sock: Conn,
    rx: Receiver<Work>,
    ram: Arc<GuestRam>,
    compression: Compression,
    limiter: Option<Arc<RateLimiter>>,
    counters: Arc<Counters>,
) {
    let mut w = BufWriter::with_capacity(512 << 10, sock);
    let mut frames = 0u64;
    let mut error: Option<String> = None;
    let mut raw: Vec<u8> = Vec::with_capacity(MAX_BATCH_PAGES * PAGE_SIZE as usize);
    let mut comp: Vec<u8> = Vec::new();
    let mut hdr: Vec<u8> = Vec::new();
    let mut entries: Vec<u64> = Vec::with_capacity(MAX_BATCH_PAGES);
    // Test builds only (contract's `fault-injection`): the RAM page whose copies get a flipped
    // bit, as a lost or damaged page would arrive.
    let flip = contract::faults::flip_page().and_then(|gpa| ram.layout().page_index(gpa));
    let mut zctx = match compression {
        Compression::Zstd => zstd::bulk::Compressor::new(1).ok(),
        _ => None,
    };
    for work in rx {
        match work {
            Work::Batch { pass, pages, holes } => {
                if error.is_some() {
                    continue; // keep draining so the distributor never blocks on us
                }
                raw.clear();
                entries.clear();
                let mut zeros = 0u64;
                for &p in &pages {
                    if holes.as_ref().is_some_and(|h| h.get(p)) {
                        entries.push(p | ZERO_PAGE);
                        zeros += 1;
                        continue;
                    }
                    let Some(src) = ram.ptr_at_offset(p * PAGE_SIZE) else {
                        error = Some(format!("page {p} is outside guest RAM"));
                        break;
                    };
                    let start = raw.len();
                    raw.resize(start + PAGE_SIZE as usize, 0);
                    // SAFETY: `src` points at a whole 4 KiB guest page inside a mapped region.
                    // The guest may be writing it concurrently; the copy may then be torn, but
                    // dirty logging re-sends any page written after its bit was cleared, and the
                    // final pass runs with the VM paused.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            src,
                            raw.as_mut_ptr().add(start),
                            PAGE_SIZE as usize,
                        )
                    };
                    if flip == Some(p) {
                        raw[start + contract::faults::FLIP_BYTE] ^= contract::faults::FLIP_MASK;
                    }
                    if vmm::memory::is_zero(&raw[start..]) {
                        raw.truncate(start);
                        entries.push(p | ZERO_PAGE);
                        zeros += 1;
                    } else {
                        entries.push(p);
                    }
                }
                if error.is_some() {
                    continue;
                }
                let (codec, body): (Compression, &[u8]) = match compression {
                    Compression::None => (Compression::None, &raw),
                    _ if raw.is_empty() => (Compression::None, &raw),
                    Compression::Lz4 => {
                        comp.resize(lz4_flex::block::get_maximum_output_size(raw.len()), 0);
                        match lz4_flex::block::compress_into(&raw, &mut comp) {
                            Ok(n) if n < raw.len() => (Compression::Lz4, &comp[..n]),
                            _ => (Compression::None, &raw),
                        }
                    }
                    Compression::Zstd => {
                        comp.resize(zstd::zstd_safe::compress_bound(raw.len()), 0);
                        match zctx.as_mut().map(|z| z.compress_to_buffer(&raw, &mut comp)) {
                            Some(Ok(n)) if n < raw.len() => (Compression::Zstd, &comp[..n]),
                            _ => (Compression::None, &raw),
                        }
                    }
                };
                wire::PageBatch::header(&mut hdr, pass, &entries, codec, raw.len());
                if let Some(l) = &limiter {
                    l.take(hdr.len() + body.len() + wire::HEADER_LEN);
                }
                match wire::write_frame(&mut w, wire::KIND_PAGES, 0, &[&hdr, body]) {
                    Ok(n) => {
                        frames += 1;
                        counters.bytes.fetch_add(n, Ordering::Relaxed);
                        counters
                            .pages
                            .fetch_add(pages.len() as u64, Ordering::Relaxed);
                        counters.zero.fetch_add(zeros, Ordering::Relaxed);
                    }
                    Err(e) => error = Some(e.to_string()),
                }
            }
            Work::Flush(reply) => {
                if error.is_none() {
                    if let Err(e) = w.flush() {
                        error = Some(e.to_string());
                    }
                }
                let _ = reply.send(match &error {
                    None => Ok(frames),
                    Some(e) => Err(e.clone()),
                });
            }
        }
    }
}

/// Pages of `ram` that lie in memfd holes (never written, read as zero).
pub(super) fn hole_bitmap(ram: &GuestRam) -> PageBitmap {
    let total = ram.layout().total_pages();
    let mut holes = PageBitmap::full(total);
    for (start, end) in ram.data_extents() {
        for p in start / PAGE_SIZE..end.div_ceil(PAGE_SIZE).min(total) {
            holes.clear(p);
        }
    }
    holes
}
