//! The destination's data streams: one thread per connection applies page batches straight
//! into guest RAM; the control thread waits for them at each pass barrier.

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

pub(super) fn stream_rx(
    sock: trust::Conn,
    index: usize,
    ram: Arc<GuestRam>,
    total_pages: u64,
    shared: Arc<StreamShared>,
    pass: Arc<AtomicU64>,
) {
    // Small buffer: page batches (~1 MiB) are read straight into `buf`, bypassing it.
    let mut r = BufReader::with_capacity(64 << 10, sock);
    let mut buf = Vec::with_capacity(1 << 20);
    let mut scratch = Vec::new();
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
    loop {
        let kind = match wire::read_frame_into(&mut r, &mut buf) {
            Ok((k, _)) => k,
            Err(WireError::Eof) => return,
            Err(e) => return fail(e.to_string()),
        };
        if kind != wire::KIND_PAGES {
            return fail(format!("unexpected frame kind {kind} on a data stream"));
        }
        let cur = pass.load(Ordering::SeqCst);
        let res = wire::PageBatch::parse(&buf, total_pages, &mut scratch, |idx, data| {
            let Some(dst) = ram.ptr_at_offset(idx * PAGE_SIZE) else {
                return Err(WireError::Decode {
                    what: "page batch",
                    err: format!("page {idx} not mapped"),
                });
            };
            match data {
                // SAFETY: `dst` is a whole 4 KiB page of the destination's RAM, which no vCPU
                // runs on yet; pages of one pass are disjoint across streams and passes are
                // separated by the PassDone/PassAck barrier.
                Some(d) => unsafe {
                    std::ptr::copy_nonoverlapping(d.as_ptr(), dst, PAGE_SIZE as usize)
                },
                // Fresh RAM is already zero in pass 0; later a page may have held data.
                // SAFETY: as above.
                None if cur > 0 => unsafe { std::ptr::write_bytes(dst, 0, PAGE_SIZE as usize) },
                None => {}
            }
            Ok(())
        });
        match res {
            Ok((p, n)) => {
                if p as u64 != cur {
                    return fail(format!("page batch for pass {p} during pass {cur}"));
                }
                shared.pages.fetch_add(n as u64, Ordering::Relaxed);
                shared.bytes.fetch_add(
                    buf.len() as u64 + wire::HEADER_LEN as u64,
                    Ordering::Relaxed,
                );
                shared.applied[index].fetch_add(1, Ordering::SeqCst);
                let _l = shared.lock.lock();
                shared.cv.notify_all();
            }
            Err(e) => return fail(e.to_string()),
        }
    }
}
