//! The destination's data streams: one thread per connection reads page batches, a few more
//! (see [`appliers`]) apply them straight into guest RAM; the control thread waits for them at
//! each pass barrier.

use crate::wire::{self, WireError};
use std::io::BufReader;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use vmm::memory::{GuestRam, PAGE_SIZE};

use super::IDLE_TIMEOUT;

pub(super) struct StreamShared {
    /// Every connection of the session: a failing data stream shuts them all down, so that the
    /// control loop and the source learn about it at once instead of at the next barrier.
    pub(super) sockets: Mutex<Vec<TcpStream>>,
    pub(super) applied: Vec<AtomicU64>,
    pub(super) error: Mutex<Option<String>>,
    pub(super) cv: Condvar,
    pub(super) lock: Mutex<()>,
    pub(super) bytes: AtomicU64,
    pub(super) pages: AtomicU64,
}

pub(super) fn wait_applied(shared: &StreamShared, frames: &[u64]) -> Result<(), String> {
    let deadline = Instant::now() + IDLE_TIMEOUT;
    let mut g = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some(e) = shared
            .error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Err(e);
        }
        if frames
            .iter()
            .enumerate()
            .all(|(i, &f)| shared.applied[i].load(Ordering::SeqCst) >= f)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("timed out waiting for page data".into());
        }
        g = shared
            .cv
            .wait_timeout(g, Duration::from_millis(50))
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// Threads that apply one data stream's page batches, as a function of the number of streams:
/// a destination's first touch of fresh guest RAM is what pass 0 waits for, and on hosts that
/// back their guests' memory on demand (these machines) first touches overlap well across
/// threads (4 streams moved pass 0 3.6x faster than 1 on 2 CPUs), so one stream's batches are
/// applied by several threads while its reader already takes in the next.
///
/// `FERRY_RX_APPLIERS=N` in the destination's environment overrides it (0: each stream's
/// reader applies its batches itself, as before; for before/after comparisons).
fn appliers(streams: usize) -> usize {
    if let Some(n) = std::env::var("FERRY_RX_APPLIERS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        return n.min(16);
    }
    (4 / streams.max(1)).clamp(1, 4)
}

pub(super) fn stream_rx(
    sock: trust::Conn,
    index: usize,
    streams: usize,
    ram: Arc<GuestRam>,
    total_pages: u64,
    shared: Arc<StreamShared>,
    pass: Arc<AtomicU64>,
) {
    // Small buffer: page batches (~1 MiB) are read straight into a batch buffer, bypassing it.
    let mut r = BufReader::with_capacity(64 << 10, sock);
    let fail = |e: String| {
        let mut g = shared.error.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(format!("data stream {index}: {e}"));
        }
        drop(g);
        for s in shared
            .sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let _l = shared.lock.lock();
        shared.cv.notify_all();
    };
    let n = appliers(streams);
    // Batches read and not yet applied go to the appliers; their buffers come back for reuse.
    let (work_tx, work_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(n);
    let work_rx = Mutex::new(work_rx);
    let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    for _ in 0..=n {
        let _ = free_tx.send(Vec::with_capacity(1 << 20));
    }
    let apply = |buf: &[u8], scratch: &mut Vec<u8>| -> Result<(), String> {
        let cur = pass.load(Ordering::SeqCst);
        let (p, pages) = wire::PageBatch::parse(buf, total_pages, scratch, |idx, data| {
            let Some(dst) = ram.ptr_at_offset(idx * PAGE_SIZE) else {
                return Err(WireError::Decode {
                    what: "page batch",
                    err: format!("page {idx} not mapped"),
                });
            };
            match data {
                // SAFETY: `dst` is a whole 4 KiB page of the destination's RAM, which no vCPU
                // runs on yet; a page is in at most one batch of a pass (batches of one pass
                // are disjoint, across streams and across the appliers of one), and passes
                // are separated by the PassDone/PassAck barrier, which waits for every batch
                // of the pass to be applied.
                Some(d) => unsafe {
                    std::ptr::copy_nonoverlapping(d.as_ptr(), dst, PAGE_SIZE as usize)
                },
                // Fresh RAM is already zero in pass 0; later a page may have held data.
                // SAFETY: as above.
                None if cur > 0 => unsafe { std::ptr::write_bytes(dst, 0, PAGE_SIZE as usize) },
                None => {}
            }
            Ok(())
        })
        .map_err(|e| e.to_string())?;
        if p as u64 != cur {
            return Err(format!("page batch for pass {p} during pass {cur}"));
        }
        shared.pages.fetch_add(pages as u64, Ordering::Relaxed);
        shared.bytes.fetch_add(
            buf.len() as u64 + wire::HEADER_LEN as u64,
            Ordering::Relaxed,
        );
        shared.applied[index].fetch_add(1, Ordering::SeqCst);
        let _l = shared.lock.lock();
        shared.cv.notify_all();
        Ok(())
    };
    std::thread::scope(|s| {
        // Owned here: when the reader stops, the appliers finish what it queued and end; when
        // every applier has ended (failed), the reader gets no buffer back and stops.
        let (work_tx, free_tx) = (work_tx, free_tx);
        for _ in 0..n {
            let (work_rx, free_tx) = (&work_rx, free_tx.clone());
            let (apply, fail) = (&apply, &fail);
            s.spawn(move || {
                let mut scratch = Vec::new();
                loop {
                    let next = work_rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok(buf) = next else { return };
                    if let Err(e) = apply(&buf, &mut scratch) {
                        return fail(e);
                    }
                    let _ = free_tx.send(buf);
                }
            });
        }
        drop(free_tx);
        let (mut scratch, mut free) = (Vec::new(), Vec::new());
        loop {
            // A buffer comes back once an applier is done with it.
            let Ok(mut buf) = free.pop().map(Ok).unwrap_or_else(|| free_rx.recv()) else {
                return;
            };
            let kind = match wire::read_frame_into(&mut r, &mut buf) {
                Ok((k, _)) => k,
                Err(WireError::Eof) => return,
                Err(e) => return fail(e.to_string()),
            };
            if kind != wire::KIND_PAGES {
                return fail(format!("unexpected frame kind {kind} on a data stream"));
            }
            if n == 0 {
                if let Err(e) = apply(&buf, &mut scratch) {
                    return fail(e);
                }
                free.push(buf);
            } else if work_tx.send(buf).is_err() {
                return;
            }
        }
    });
}
