//! Harnesses behind Ferry's fuzz targets, shared by the libFuzzer binaries
//! (`fuzz_targets/*.rs`) and by the seed generator (`src/bin/make_corpus.rs`).
//!
//! Each `run` function takes one fuzz input and exercises one untrusted-input surface of Ferry:
//! * [`wire::run`] — the migration wire: frame reader, control message decoder, page batches.
//! * [`snapshot::run`] — the snapshot file reader and the versioned state decoder.
//! * [`device::run`] — device-state restore (serial, RTC, virtio-blk, virtio-net) and what
//!   the restored devices then do with guest memory.
//!
//! A harness panics only when it found a bug: Ferry's code panicked, or an invariant the
//! harness checks does not hold (the assertion message names it).

pub mod device;
pub mod seeds;
pub mod snapshot;
pub mod wire;

/// Where the harnesses keep their scratch files (a snapshot file, disk images): the directory
/// `FERRY_FUZZ_SCRATCH` names (scripts/fuzz.sh sets one and removes it), else `/dev/shm`, else
/// the temporary directory. File names carry the process id.
pub fn scratch_dir() -> std::path::PathBuf {
    if let Some(d) = std::env::var_os("FERRY_FUZZ_SCRATCH") {
        return d.into();
    }
    if std::path::Path::new("/dev/shm").is_dir() {
        "/dev/shm".into()
    } else {
        std::env::temp_dir()
    }
}

/// Whether known finding `id` (see fuzz/README.md) is to be stepped around instead of reported:
/// `FERRY_FUZZ_IGNORE=id,id,...`. Unset (the default, and what CI runs), every finding
/// crashes its target; set, fuzzing can go on past a finding not fixed yet to look for others.
pub fn ignored(id: &str) -> bool {
    static IDS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    IDS.get_or_init(|| {
        std::env::var("FERRY_FUZZ_IGNORE")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    })
    .iter()
    .any(|i| i == id)
}

/// Whether `FERRY_FUZZ_DEBUG` is set: the harnesses then say on stderr what they did with an
/// input (when replaying one by hand).
pub fn debug_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("FERRY_FUZZ_DEBUG").is_some())
}

/// `eprintln!` when [`debug_enabled`].
#[macro_export]
macro_rules! debug {
    ($($t:tt)*) => {
        if $crate::debug_enabled() {
            eprintln!($($t)*);
        }
    };
}

/// Reads little-endian values off the front of a fuzz input; past the end everything is 0.
pub struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(data: &'a [u8]) -> Cursor<'a> {
        Cursor { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Up to `n` bytes.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (a, b) = self.data.split_at(n);
        self.data = b;
        a
    }

    /// Everything that is left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(usize::MAX)
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

/// The bincode options of Ferry's snapshot and migration state codec
/// (`vmm::snapshot::bincode_opts`, private there): fixed-width little-endian integers, the
/// 64 MiB state limit, no trailing bytes.
pub fn state_codec() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(vmm::snapshot::MAX_STATE_BYTES)
        .reject_trailing_bytes()
}

/// A reader that hands out its bytes in pieces of at most `chunk` bytes and, if `interrupt`,
/// fails every other call with `Interrupted` (as a socket read interrupted by a signal does),
/// to exercise the retry loops of the frame reader.
pub struct ChoppyReader<'a> {
    pub data: &'a [u8],
    pub chunk: usize,
    pub interrupt: bool,
    flip: bool,
}

impl<'a> ChoppyReader<'a> {
    pub fn new(data: &'a [u8], chunk: usize, interrupt: bool) -> ChoppyReader<'a> {
        ChoppyReader {
            data,
            chunk: chunk.max(1),
            interrupt,
            flip: false,
        }
    }
}

impl std::io::Read for ChoppyReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.interrupt {
            self.flip = !self.flip;
            if self.flip {
                return Err(std::io::ErrorKind::Interrupted.into());
            }
        }
        let n = buf.len().min(self.chunk).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

// A malloc limit for stable builds. libFuzzer's `-malloc_limit_mb` relies on a sanitizer's
// allocator hooks, which a stable (sanitizer-less) build does not have, so every allocation
// goes through this allocator: one larger than `FERRY_FUZZ_MALLOC_LIMIT_MB` (default 256 MiB,
// four times the largest frame or state Ferry accepts) aborts, which libFuzzer records as a
// crash with its input. It also measures the largest allocation of a scope
// ([`largest_allocation_during`]).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static LIMIT: AtomicUsize = AtomicUsize::new(256 << 20);
static TRACKING: AtomicBool = AtomicBool::new(false);
static PEAK: AtomicUsize = AtomicUsize::new(0);

struct Guard;

#[global_allocator]
static GUARD: Guard = Guard;

fn note(size: usize) {
    if size > LIMIT.load(Ordering::Relaxed) {
        over_limit(size);
    }
    if TRACKING.load(Ordering::Relaxed) {
        PEAK.fetch_max(size, Ordering::Relaxed);
    }
}

#[cold]
fn over_limit(size: usize) -> ! {
    // No allocation from here on: format the size by hand.
    let mut msg =
        *b"==ferry-fuzz== allocation of                      bytes exceeds the malloc limit\n";
    let mut digits = [0u8; 20];
    let (mut n, mut i) = (size, digits.len());
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    msg[29..29 + digits.len() - i].copy_from_slice(&digits[i..]);
    // SAFETY: writes a valid buffer to stderr; abort never returns.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::abort()
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged.
unsafe impl GlobalAlloc for Guard {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract is System's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Applies `FERRY_FUZZ_MALLOC_LIMIT_MB` (once; every harness calls this first).
pub fn init() {
    static DONE: std::sync::Once = std::sync::Once::new();
    DONE.call_once(|| {
        if let Some(mb) = std::env::var("FERRY_FUZZ_MALLOC_LIMIT_MB")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
        {
            LIMIT.store(mb.saturating_mul(1 << 20), Ordering::Relaxed);
        }
    });
}

/// Runs `f` and returns its result with the size of the largest single allocation it made
/// (this thread's and any other's: the harnesses are single-threaded where they use this).
pub fn largest_allocation_during<R>(f: impl FnOnce() -> R) -> (R, usize) {
    PEAK.store(0, Ordering::Relaxed);
    TRACKING.store(true, Ordering::Relaxed);
    let r = f();
    TRACKING.store(false, Ordering::Relaxed);
    (r, PEAK.load(Ordering::Relaxed))
}
