//! The source side of a live migration.
//!
//! State machine (one thread drives it; N stream threads carry pages):
//! `Connect → Handshake → Preflight → Setup → Precopy(pass n)… → FinalMemory → State → Commit →
//! Done`, and from any state before `Commit`: `Aborted` (VM resumed on the source).

use crate::preflight::{self, PreflightReport, PreflightRequest};
use crate::wire::{self, Compression, Msg, Role, WireError, MAX_BATCH_PAGES, ZERO_PAGE};
use crate::{DowntimeBreakdown, MigrationError, Phase, Progress, Summary};
use std::io::{BufWriter, Write};

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::dirty::{DirtyLog, PageBitmap};
use vmm::memory::{GuestRam, PAGE_SIZE};
use vmm::Vm;

/// How to migrate.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// Destination `host:port`.
    pub to: String,
    /// Switch over once the expected downtime is below this.
    pub max_downtime: Duration,
    /// Parallel data connections.
    pub streams: u16,
    pub compression: Compression,
    /// Bandwidth cap for page data, bytes per second.
    pub max_bandwidth: Option<u64>,
    /// Give up (VM stays on the source) after this long.
    pub timeout: Option<Duration>,
    /// Only run the preflight.
    pub dry_run: bool,
    /// Format of the VM state sent: [`wire::STATE_VERSION`]. An older one
    /// (`wire::MIN_STATE_VERSION..`) makes this source send what the previous build sent (for
    /// tests of mixed-version clusters); a state that version cannot express fails the
    /// migration before the commit.
    pub state_version: u32,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            to: String::new(),
            max_downtime: Duration::from_millis(50),
            streams: 1,
            compression: Compression::None,
            max_bandwidth: None,
            timeout: None,
            dry_run: false,
            state_version: wire::STATE_VERSION,
        }
    }
}

/// Decides, once the destination holds the complete VM, whether it takes over. In a cluster
/// this is the store's compare-and-swap of the VM's owner: the migration's commit point.
pub trait CommitGate: Sync {
    /// `Ok(true)`: commit. `Ok(false)`: abort, the VM resumes here. `Err`: the outcome is not
    /// known (e.g. the store did not answer); the VM stays paused here and nothing is sent, so
    /// that whoever learns the outcome later can act on it and the VM never runs twice.
    fn decide(&self) -> Result<bool, String>;
}

/// The standalone engine's gate: the source's word alone is the commit.
pub struct SourceDecides;

impl CommitGate for SourceDecides {
    fn decide(&self) -> Result<bool, String> {
        Ok(true)
    }
}

/// Shared between the engine and whoever watches it (the worker's API).
#[derive(Default)]
pub struct MigrationControl {
    pub progress: Mutex<Progress>,
    pub cancel: AtomicBool,
}

impl MigrationControl {
    fn update(&self, f: impl FnOnce(&mut Progress)) {
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut p);
    }
}

/// Largest number of pre-copy passes before the migration gives up (auto-converge normally
/// finishes long before).
const MAX_PASSES: u32 = 200;
/// Auto-converge: first throttle step and increment, in percent.
const THROTTLE_INITIAL: u8 = 30;
const THROTTLE_STEP: u8 = 20;
/// After this many passes, switch over as soon as the estimate fits the budget.
const SOFT_MAX_PASSES: u32 = 30;
const THROTTLE_MAX: u8 = 99;
/// Connection timeouts.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

struct Failure {
    phase: Phase,
    reason: String,
}

fn fail(phase: Phase, reason: impl Into<String>) -> Failure {
    Failure {
        phase,
        reason: reason.into(),
    }
}

fn wire_fail(phase: Phase) -> impl Fn(WireError) -> Failure {
    move |e| {
        let reason = match e {
            WireError::Eof => "the destination closed the connection".to_string(),
            WireError::Io(ref io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                format!("lost the connection to the destination ({io})")
            }
            other => other.to_string(),
        };
        Failure { phase, reason }
    }
}

/// Token bucket shared by the streams.
struct RateLimiter {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    fn new(rate: u64) -> RateLimiter {
        RateLimiter {
            rate: rate as f64,
            state: Mutex::new((0.0, Instant::now())),
        }
    }

    fn take(&self, bytes: usize) {
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
struct Counters {
    bytes: AtomicU64,
    pages: AtomicU64,
    zero: AtomicU64,
}

enum Work {
    /// Pages to send; `holes` marks pages known to be zero without reading them (pass 0:
    /// never-written parts of the memfd, which reading would allocate).
    Batch {
        pass: u32,
        pages: Vec<u64>,
        holes: Option<Arc<PageBitmap>>,
    },
    Flush(SyncSender<Result<u64, String>>),
}

struct Stream {
    tx: SyncSender<Work>,
    join: Option<std::thread::JoinHandle<()>>,
}

fn stream_thread(
    sock: TcpStream,
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

/// The source end of one migration.
struct Sender<'a> {
    vm: &'a Vm,
    opts: &'a MigrateOptions,
    ctl: &'a MigrationControl,
    control: TcpStream,
    streams: Vec<Stream>,
    counters: Arc<Counters>,
    t0: Instant,
    /// Total time spent sending passes and the bytes they carried (bandwidth estimate).
    send_time: Duration,
    send_bytes: u64,
}

/// Migrates `vm` to `opts.to`. On success the VM has moved: it is left paused here and the
/// caller must stop it. On failure the VM runs on the source (unless `vm_on_source` is false:
/// the commit was sent but not confirmed, and the VM is left paused so that it never runs twice).
pub fn migrate(
    vm: &Vm,
    opts: &MigrateOptions,
    ctl: &MigrationControl,
) -> Result<Summary, MigrationError> {
    migrate_gated(vm, opts, ctl, &SourceDecides)
}

/// [`migrate`] with the commit decided by `gate`.
pub fn migrate_gated(
    vm: &Vm,
    opts: &MigrateOptions,
    ctl: &MigrationControl,
    gate: &dyn CommitGate,
) -> Result<Summary, MigrationError> {
    let t0 = Instant::now();
    ctl.update(|p| {
        *p = Progress {
            phase: Phase::Connect.to_string(),
            ..Default::default()
        }
    });
    let control = connect(&opts.to).map_err(|f| to_error(f, true))?;
    let mut s = Sender {
        vm,
        opts,
        ctl,
        control,
        streams: Vec::new(),
        counters: Arc::new(Counters::default()),
        t0,
        send_time: Duration::ZERO,
        send_bytes: 0,
    };
    let session: u64 = rand_u64();
    let result = s.run(session, gate);
    // Stop the stream threads (dropping the senders ends their loops).
    for st in s.streams.drain(..) {
        drop(st.tx);
        if let Some(j) = st.join {
            let _ = j.join();
        }
    }
    match result {
        Ok(summary) => {
            ctl.update(|p| p.phase = Phase::Done.to_string());
            Ok(summary)
        }
        Err((f, committed)) => {
            if !committed {
                let _ = wire::send_msg(
                    &mut s.control,
                    &Msg::Abort {
                        phase: f.phase.to_string(),
                        reason: f.reason.clone(),
                    },
                );
                vm.set_throttle(0);
                if let Err(e) = vm.resume() {
                    // Typically: the destination still holds a disk lock. The VM stays paused
                    // rather than run without its disks.
                    let mut f = f;
                    f.reason = format!("{}; the VM could not be resumed here: {e}", f.reason);
                    ctl.update(|p| {
                        p.phase = format!("failed in {}", f.phase);
                        p.throttle_pct = 0;
                    });
                    return Err(to_error(f, true));
                }
                // The destination may have announced the VM's MAC already (it does once it
                // holds the complete VM): claim the traffic back.
                vm.virtio().announce();
            }
            ctl.update(|p| {
                p.phase = format!("failed in {}", f.phase);
                p.throttle_pct = 0;
            });
            Err(to_error(f, !committed))
        }
    }
}

fn to_error(f: Failure, on_source: bool) -> MigrationError {
    MigrationError {
        phase: f.phase,
        reason: f.reason,
        vm_on_source: on_source,
    }
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    u64::from_le_bytes(b) ^ (std::process::id() as u64) << 32
}

fn connect(to: &str) -> Result<TcpStream, Failure> {
    let addrs: Vec<_> = to
        .to_socket_addrs()
        .map_err(|e| {
            fail(
                Phase::Connect,
                format!("bad destination address {to:?}: {e}"),
            )
        })?
        .collect();
    let mut last = String::from("no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(fail(
        Phase::Connect,
        format!("cannot connect to {to}: {last}"),
    ))
}

/// Opens a connection's session; returns the round-trip time of the exchange.
fn handshake(
    sock: &mut TcpStream,
    session: u64,
    role: Role,
    phase: Phase,
) -> Result<Duration, Failure> {
    sock.set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(|e| fail(phase, e.to_string()))?;
    // A destination that stops reading (hung, partitioned) fails the write instead of blocking.
    sock.set_write_timeout(Some(REPLY_TIMEOUT))
        .map_err(|e| fail(phase, e.to_string()))?;
    let t = Instant::now();
    wire::send_msg(
        sock,
        &Msg::Hello {
            protocol: wire::PROTOCOL_VERSION,
            session,
            role,
        },
    )
    .map_err(wire_fail(phase))?;
    match wire::recv_msg(sock).map_err(wire_fail(phase))? {
        Msg::HelloAck { protocol } if protocol == wire::PROTOCOL_VERSION => Ok(t.elapsed()),
        Msg::HelloAck { protocol } => Err(fail(
            phase,
            format!("destination answered with protocol version {protocol}"),
        )),
        Msg::Refuse { reason } => Err(fail(phase, format!("destination refused: {reason}"))),
        m => Err(fail(
            phase,
            format!("protocol violation: expected HelloAck, got {}", m.name()),
        )),
    }
}

type Res<T> = Result<T, (Failure, bool)>;

fn pre(f: Failure) -> (Failure, bool) {
    (f, false)
}

impl Sender<'_> {
    fn check_abort(&self, phase: Phase) -> Result<(), Failure> {
        if self.ctl.cancel.load(Ordering::SeqCst) {
            return Err(fail(phase, "cancelled by request"));
        }
        if let Some(t) = self.opts.timeout {
            if self.t0.elapsed() > t {
                return Err(fail(
                    phase,
                    format!("timed out after {:.1} s", t.as_secs_f64()),
                ));
            }
        }
        Ok(())
    }

    fn run(&mut self, session: u64, gate: &dyn CommitGate) -> Res<Summary> {
        let vm = self.vm;
        let rtt =
            handshake(&mut self.control, session, Role::Control, Phase::Handshake).map_err(pre)?;

        // Preflight.
        self.ctl.update(|p| p.phase = Phase::Preflight.to_string());
        let kvm = vmm::open_kvm().map_err(|e| pre(fail(Phase::Preflight, e.to_string())))?;
        let req = PreflightRequest {
            state_version: self.opts.state_version,
            config: vm.config().clone(),
            layout: vm.ram().layout().clone(),
            cpuid: vm.cpuid().clone(),
            source: preflight::host_summary(&kvm, &Default::default()),
            disks: vm
                .config()
                .disks
                .iter()
                .map(|d| preflight::DiskView {
                    bytes: vmm::devices::virtio::block::probe_image(&d.path, true)
                        .map(|p| p.size)
                        .unwrap_or(0),
                    locked_by_vm: vm.virtio().storage_held(),
                })
                .collect(),
        };
        wire::send_msg(&mut self.control, &Msg::Preflight(req))
            .map_err(|e| pre(wire_fail(Phase::Preflight)(e)))?;
        let report: PreflightReport = match wire::recv_msg(&mut self.control)
            .map_err(|e| pre(wire_fail(Phase::Preflight)(e)))?
        {
            Msg::PreflightReport(r) => r,
            Msg::Abort { reason, .. } => {
                return Err(pre(fail(
                    Phase::Preflight,
                    format!("destination aborted: {reason}"),
                )))
            }
            m => {
                return Err(pre(fail(
                    Phase::Preflight,
                    format!(
                        "protocol violation: expected PreflightReport, got {}",
                        m.name()
                    ),
                )))
            }
        };
        if !report.ok {
            return Err(pre(fail(
                Phase::Preflight,
                format!("destination refused: {}", report.problems.join("; ")),
            )));
        }
        if self.opts.dry_run {
            let _ = wire::send_msg(
                &mut self.control,
                &Msg::Abort {
                    phase: "preflight".into(),
                    reason: "dry run".into(),
                },
            );
            return Ok(Summary {
                dry_run: true,
                preflight: report,
                total_ms: ms(self.t0.elapsed()),
                streams: self.opts.streams,
                compression: self.opts.compression,
                ..Default::default()
            });
        }
        let save_cost = save_cost(vm.config().vcpus);

        // Setup: data streams.
        self.ctl.update(|p| p.phase = Phase::Setup.to_string());
        let n = self.opts.streams.clamp(1, 16);
        wire::send_msg(
            &mut self.control,
            &Msg::Begin {
                streams: n,
                compression: self.opts.compression,
            },
        )
        .map_err(|e| pre(wire_fail(Phase::Setup)(e)))?;
        let limiter = self
            .opts
            .max_bandwidth
            .map(|b| Arc::new(RateLimiter::new(b.max(1))));
        for i in 0..n {
            let mut sock = connect(&self.opts.to).map_err(pre)?;
            handshake(&mut sock, session, Role::Data { index: i }, Phase::Setup).map_err(pre)?;
            let (tx, rx) = sync_channel(4);
            let (ram, comp, lim, ctr) = (
                vm.ram().clone(),
                self.opts.compression,
                limiter.clone(),
                self.counters.clone(),
            );
            let join = std::thread::Builder::new()
                .name(format!("mig-tx{i}"))
                .spawn(move || stream_thread(sock, rx, ram, comp, lim, ctr))
                .map_err(|e| pre(fail(Phase::Setup, e.to_string())))?;
            self.streams.push(Stream {
                tx,
                join: Some(join),
            });
        }
        let restore_us =
            match wire::recv_msg(&mut self.control).map_err(|e| pre(wire_fail(Phase::Setup)(e)))? {
                Msg::BeginAck { restore_us } => restore_us,
                Msg::Abort { reason, .. } => {
                    return Err(pre(fail(
                        Phase::Setup,
                        format!("destination aborted: {reason}"),
                    )))
                }
                m => {
                    return Err(pre(fail(
                        Phase::Setup,
                        format!("protocol violation: expected BeginAck, got {}", m.name()),
                    )))
                }
            };
        // Fixed switchover cost: pause + save + encode here, load + resume there (both
        // measured on scratch VMs of this shape), and the Ready/Commit/Resumed round trips.
        let fixed_cost = save_cost + Duration::from_micros(restore_us) + rtt * 3;

        // Pre-copy.
        let log = DirtyLog::start(vm.vm_fd(), vm.ram())
            .map_err(|e| pre(fail(Phase::Setup, e.to_string())))?;
        let mut report = report;
        report.restore_cost_us = restore_us;
        let result = self.precopy_and_switchover(&log, fixed_cost, report, gate);
        let _ = log.stop();
        result
    }

    fn progress_bw(&self) -> f64 {
        if self.send_time.is_zero() {
            0.0
        } else {
            self.send_bytes as f64 / self.send_time.as_secs_f64()
        }
    }

    fn precopy_and_switchover(
        &mut self,
        log: &DirtyLog,
        fixed_cost: Duration,
        report: PreflightReport,
        gate: &dyn CommitGate,
    ) -> Res<Summary> {
        let vm = self.vm;
        let mut pass = 0u32;
        let mut max_throttle = 0u8;
        let mut dirty = log
            .collect()
            .map_err(|e| pre(fail(Phase::Precopy, e.to_string())))?;
        let mut pass0_mibs = 0.0;
        let mut prev_dirty = u64::MAX;
        loop {
            self.check_abort(Phase::Precopy).map_err(pre)?;
            self.ctl.update(|p| {
                p.phase = Phase::Precopy.to_string();
                p.pass = pass;
                p.remaining_pages = dirty.count();
                p.remaining_bytes = dirty.count() * PAGE_SIZE;
            });
            let t = Instant::now();
            let data_before = self.data_pages();
            let bytes = self.send_pass(pass, &dirty, Phase::Precopy)?;
            let took = t.elapsed();
            // The downtime estimate divides remaining (dirty, i.e. data) pages by this rate:
            // guest bytes moved per second, whatever compression made of them on the wire.
            self.send_time += took;
            self.send_bytes += (self.data_pages() - data_before) * PAGE_SIZE;
            if pass == 0 {
                pass0_mibs = bytes as f64 / took.as_secs_f64().max(1e-9) / (1 << 20) as f64;
            }
            dirty = log
                .collect()
                .map_err(|e| pre(fail(Phase::Precopy, e.to_string())))?;
            let dirty_pages = dirty.count();
            let bw = self.progress_bw().max(1.0);
            let remaining = dirty_pages * PAGE_SIZE;
            let memory_time = Duration::from_secs_f64(remaining as f64 / bw);
            let expected = memory_time + fixed_cost;
            let dirty_rate = (dirty_pages * PAGE_SIZE) as f64 / took.as_secs_f64().max(1e-6);
            // Convergence policy. The budget is a hard limit on the expected downtime. Within
            // it, keep copying while passes still shrink the dirty set, until the memory part
            // of the downtime is down to a tenth of the budget. When the set stops shrinking
            // short of that, throttle the guest (auto-converge), harder on every pass.
            let target = (self.opts.max_downtime / 10).max(Duration::from_millis(1));
            let shrinking = dirty_pages * 4 <= prev_dirty.saturating_mul(3)
                && prev_dirty.saturating_sub(dirty_pages) >= 64;
            let fits = expected <= self.opts.max_downtime;
            // When the fixed cost alone is over the budget no number of passes can meet it:
            // switch over once the memory part is small, and report the downtime it took.
            let unreachable = fixed_cost >= self.opts.max_downtime;
            let switch_now = (fits || unreachable)
                && (memory_time <= target
                    || (!shrinking && vm.throttle() >= THROTTLE_MAX)
                    || pass + 1 >= SOFT_MAX_PASSES);
            if !switch_now && pass >= 1 && !shrinking {
                let t = vm.throttle();
                let next = if t == 0 {
                    THROTTLE_INITIAL
                } else {
                    t.saturating_add(THROTTLE_STEP).min(THROTTLE_MAX)
                };
                vm.set_throttle(next);
                max_throttle = max_throttle.max(next);
            }
            prev_dirty = dirty_pages;
            let c = &self.counters;
            let (bs, ps, zs) = (
                c.bytes.load(Ordering::Relaxed),
                c.pages.load(Ordering::Relaxed),
                c.zero.load(Ordering::Relaxed),
            );
            let thr = vm.throttle();
            let elapsed = self.t0.elapsed().as_secs_f64();
            self.ctl.update(|p| {
                p.bytes_sent = bs;
                p.pages_sent = ps;
                p.zero_pages = zs;
                p.remaining_pages = dirty_pages;
                p.remaining_bytes = remaining;
                p.dirty_rate_mibs = dirty_rate / (1 << 20) as f64;
                p.bandwidth_mibs = bw / (1 << 20) as f64;
                p.expected_downtime_ms = ms(expected);
                p.throttle_pct = thr;
                p.elapsed_s = elapsed;
            });
            pass += 1;
            if switch_now {
                break;
            }
            if pass >= MAX_PASSES {
                return Err(pre(fail(
                    Phase::Precopy,
                    format!("did not converge in {MAX_PASSES} passes"),
                )));
            }
        }

        // Switchover: the downtime clock starts at the pause.
        self.check_abort(Phase::FinalMemory).map_err(pre)?;
        self.ctl
            .update(|p| p.phase = Phase::FinalMemory.to_string());
        let t_pause = Instant::now();
        vm.pause()
            .map_err(|e| pre(fail(Phase::FinalMemory, e.to_string())))?;
        let _ = wire::send_msg(&mut self.control, &Msg::Paused);
        // The final pass: what the last pre-copy round found dirty (collected, not yet sent)
        // plus whatever the guest dirtied until the pause.
        let mut last = log
            .collect()
            .map_err(|e| pre(fail(Phase::FinalMemory, e.to_string())))?;
        last.union_with(&dirty);
        self.send_pass(pass, &last, Phase::FinalMemory)?;
        let t_mem = Instant::now();

        self.ctl.update(|p| p.phase = Phase::State.to_string());
        let state = vm
            .save_state()
            .map_err(|e| pre(fail(Phase::State, e.to_string())))?;
        let encoded = vmm::snapshot::encode_state_versioned(self.opts.state_version, &state)
            .map_err(|e| pre(fail(Phase::State, e.to_string())))?;
        // Hand the disks over: everything acknowledged is flushed and the image locks are
        // released for the destination, which takes them before it reports Ready. Any failure
        // from here until the commit makes the source take them back before it resumes.
        vm.release_storage()
            .map_err(|e| pre(fail(Phase::State, format!("cannot release the disks: {e}"))))?;
        wire::write_frame(&mut self.control, wire::KIND_STATE, 0, &[&encoded])
            .map_err(|e| pre(wire_fail(Phase::State)(e)))?;
        match wire::recv_msg(&mut self.control).map_err(|e| pre(wire_fail(Phase::State)(e)))? {
            Msg::Ready { .. } => {}
            Msg::Abort { reason, .. } => {
                return Err(pre(fail(
                    Phase::State,
                    format!("destination aborted: {reason}"),
                )))
            }
            m => {
                return Err(pre(fail(
                    Phase::State,
                    format!("protocol violation: expected Ready, got {}", m.name()),
                )))
            }
        }
        let t_ready = Instant::now();
        // Last chance to cancel: after this the destination owns the VM.
        self.check_abort(Phase::State).map_err(pre)?;
        self.ctl.update(|p| p.phase = Phase::Commit.to_string());
        match gate.decide() {
            Ok(true) => {}
            Ok(false) => return Err(pre(fail(Phase::Commit, "the commit was refused (the VM's owner did not change)"))),
            Err(e) => {
                return Err((
                    fail(Phase::Commit, format!("the commit decision is unknown ({e}); the VM is left paused here until its owner is settled")),
                    true,
                ))
            }
        }
        wire::send_msg(&mut self.control, &Msg::Commit)
            .map_err(|e| pre(wire_fail(Phase::Commit)(e)))?;
        let resumed = wire::recv_msg(&mut self.control);
        let t_done = Instant::now();
        let resume_us = match resumed {
            Ok(Msg::Resumed { resume_us }) => resume_us,
            Ok(m) => {
                return Err((fail(Phase::Commit, format!("commit sent but the destination answered {} instead of Resumed; the VM is left paused here", m.name())), true))
            }
            Err(e) => {
                return Err((fail(Phase::Commit, format!("commit sent but the destination did not confirm ({e}); the VM is left paused here so it never runs twice")), true))
            }
        };
        let c = &self.counters;
        let pages_sent = c.pages.load(Ordering::Relaxed);
        let zero_pages = c.zero.load(Ordering::Relaxed);
        self.ctl.update(|p| {
            p.phase = Phase::Done.to_string();
            p.pass = pass;
            p.remaining_pages = 0;
            p.remaining_bytes = 0;
            p.bytes_sent = c.bytes.load(Ordering::Relaxed);
            p.pages_sent = pages_sent;
            p.zero_pages = zero_pages;
            p.expected_downtime_ms = 0.0;
        });
        Ok(Summary {
            dry_run: false,
            preflight: report,
            total_ms: ms(self.t0.elapsed()),
            downtime_ms: ms(t_done - t_pause),
            downtime: DowntimeBreakdown {
                final_memory_ms: ms(t_mem - t_pause),
                state_ms: ms(t_ready - t_mem),
                commit_ms: ms(t_done - t_ready),
                resume_ms: resume_us as f64 / 1e3,
            },
            passes: pass + 1,
            bytes_sent: c.bytes.load(Ordering::Relaxed) + encoded.len() as u64,
            pages_sent,
            zero_pages,
            data_pages: pages_sent - zero_pages,
            state_bytes: encoded.len() as u64,
            max_throttle_pct: max_throttle,
            streams: self.opts.streams,
            compression: self.opts.compression,
            pass0_mibs,
            fixed_cost_ms: ms(fixed_cost),
        })
    }

    /// Sends every page of `pages` over the streams, then waits until the destination applied
    /// them all (the per-pass barrier). Returns the bytes the pass put on the wire.
    fn send_pass(&mut self, pass: u32, pages: &PageBitmap, phase: Phase) -> Res<u64> {
        let before = self.counters.bytes.load(Ordering::Relaxed);
        // Pass 0 covers all RAM: pages in memfd holes were never written and are zero. Dirty
        // logging is already on, so a write after this scan is caught by the next pass.
        let holes = (pass == 0).then(|| Arc::new(hole_bitmap(self.vm.ram())));
        let n = self.streams.len();
        let mut batch = Vec::with_capacity(MAX_BATCH_PAGES);
        let mut next = 0usize;
        let mut sent = 0u64;
        for (first, count) in pages.runs() {
            for p in first..first + count {
                batch.push(p);
                if batch.len() == MAX_BATCH_PAGES {
                    if sent.is_multiple_of(16) {
                        if phase == Phase::Precopy {
                            self.check_abort(phase).map_err(pre)?;
                        }
                        self.publish_live(
                            pages.count().saturating_sub(sent * MAX_BATCH_PAGES as u64),
                        );
                    }
                    let b = std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH_PAGES));
                    self.dispatch(
                        next,
                        Work::Batch {
                            pass,
                            pages: b,
                            holes: holes.clone(),
                        },
                        phase,
                    )?;
                    next = (next + 1) % n;
                    sent += 1;
                }
            }
        }
        if !batch.is_empty() {
            self.dispatch(
                next,
                Work::Batch {
                    pass,
                    pages: batch,
                    holes: holes.clone(),
                },
                phase,
            )?;
        }
        let mut frames = Vec::with_capacity(n);
        for i in 0..n {
            let (rtx, rrx) = sync_channel(1);
            self.dispatch(i, Work::Flush(rtx), phase)?;
            match rrx.recv() {
                Ok(Ok(f)) => frames.push(f),
                Ok(Err(e)) => return Err(pre(fail(phase, format!("data stream {i}: {e}")))),
                Err(_) => return Err(pre(fail(phase, format!("data stream {i} stopped")))),
            }
        }
        wire::send_msg(
            &mut self.control,
            &Msg::PassDone {
                pass,
                frames,
                pages: pages.count(),
            },
        )
        .map_err(|e| pre(wire_fail(phase)(e)))?;
        match wire::recv_msg(&mut self.control).map_err(|e| pre(wire_fail(phase)(e)))? {
            Msg::PassAck { pass: p } if p == pass => {}
            Msg::Abort { reason, .. } => {
                return Err(pre(fail(phase, format!("destination aborted: {reason}"))))
            }
            m => {
                return Err(pre(fail(
                    phase,
                    format!(
                        "protocol violation: expected PassAck({pass}), got {}",
                        m.name()
                    ),
                )))
            }
        }
        Ok(self.counters.bytes.load(Ordering::Relaxed) - before)
    }

    /// Data (non-zero) pages sent so far.
    fn data_pages(&self) -> u64 {
        self.counters.pages.load(Ordering::Relaxed) - self.counters.zero.load(Ordering::Relaxed)
    }

    /// Copies the live counters into the progress report (during a pass).
    fn publish_live(&self, remaining_pages: u64) {
        let c = &self.counters;
        let (bs, ps, zs) = (
            c.bytes.load(Ordering::Relaxed),
            c.pages.load(Ordering::Relaxed),
            c.zero.load(Ordering::Relaxed),
        );
        let elapsed = self.t0.elapsed().as_secs_f64();
        self.ctl.update(|p| {
            p.bytes_sent = bs;
            p.pages_sent = ps;
            p.zero_pages = zs;
            p.remaining_pages = remaining_pages;
            p.remaining_bytes = remaining_pages * PAGE_SIZE;
            p.elapsed_s = elapsed;
        });
    }

    fn dispatch(&self, i: usize, w: Work, phase: Phase) -> Res<()> {
        self.streams[i]
            .tx
            .send(w)
            .map_err(|_| pre(fail(phase, format!("data stream {i} stopped"))))
    }
}

/// Pages of `ram` that lie in memfd holes (never written, read as zero).
fn hole_bitmap(ram: &GuestRam) -> PageBitmap {
    let total = ram.layout().total_pages();
    let mut holes = PageBitmap::full(total);
    for (start, end) in ram.data_extents() {
        for p in start / PAGE_SIZE..end.div_ceil(PAGE_SIZE).min(total) {
            holes.clear(p);
        }
    }
    holes
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

static SAVE_COSTS: crate::preflight::CostMemo = Mutex::new(std::collections::BTreeMap::new());

/// This host's cost of pausing a VM with `vcpus` vCPUs and capturing + encoding its state,
/// measured on a scratch VM (best of three) and kept like the restore cost
/// ([`crate::preflight::host_cost`]).
pub fn save_cost(vcpus: u8) -> Duration {
    let measure = |vcpus: u8| -> Result<u64, String> {
        let kvm = vmm::open_kvm().map_err(|e| e.to_string())?;
        Ok((0..3)
            .map(|_| measure_save_cost(&kvm, vcpus))
            .min()
            .unwrap_or_default()
            .as_micros() as u64)
    };
    crate::preflight::host_cost("save", vcpus, &SAVE_COSTS, measure)
        .map(Duration::from_micros)
        .unwrap_or(Duration::from_millis(1))
}

/// Measures [`save_cost`] in the background (a worker does this at start, off the critical
/// path of a later migration).
pub fn warm_save_cost(vcpus: u8) {
    warm_save_cost_after(vcpus, Duration::ZERO);
}

/// Like [`warm_save_cost`], after `delay` (a VM that just resumed here should not compete with
/// a measurement in its first moments).
pub fn warm_save_cost_after(vcpus: u8, delay: Duration) {
    let _ = std::thread::Builder::new()
        .name("cost-probe".into())
        .spawn(move || {
            std::thread::sleep(delay);
            save_cost(vcpus);
        });
}

/// Time to pause a VM of this shape and capture + encode its state, measured on a scratch VM.
fn measure_save_cost(kvm: &kvm_ioctls::Kvm, vcpus: u8) -> Duration {
    let cfg = vmm::VmConfig {
        vcpus,
        memory_mib: vmm::config::MIN_MEMORY_MIB,
        kernel: vmm::KernelSource::TestGuest,
        initrd: None,
        cmdline: "ferry.workload=idle".into(),
        cpu_profile: "host".into(),
        disks: vec![],
        nics: vec![],
    };
    let Ok(devnull) = std::fs::OpenOptions::new().write(true).open("/dev/null") else {
        return Duration::from_millis(1);
    };
    let Ok(vm) = Vm::create(kvm, cfg, &Default::default(), devnull) else {
        return Duration::from_millis(1);
    };
    if vm.start().is_err() {
        return Duration::from_millis(1);
    }
    // Measure a VM whose vCPUs are really running, as the migrating one's are.
    let deadline = Instant::now() + Duration::from_millis(200);
    while vm.running_vcpus() < vcpus as usize && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
    std::thread::sleep(Duration::from_millis(1));
    let t = Instant::now();
    let ok = vm.pause().is_ok()
        && vm
            .save_state()
            .ok()
            .and_then(|s| vmm::snapshot::encode_state(&s).ok())
            .is_some();
    let d = t.elapsed();
    vm.stop();
    if ok {
        d
    } else {
        Duration::from_millis(1)
    }
}
