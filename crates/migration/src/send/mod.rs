//! The source side of a live migration: an explicit sequence of phases, one method each, run by
//! [`migrate_gated`]. Each phase returns what the next one needs; a failure says which phase it
//! came from, what kind it is and whether the commit point was passed.
//!
//! ```text
//! source                                   destination
//! connect ─── TCP ─────────────────────────▶ accept
//! handshake   Hello{protocol,session} ─────▶            (refused: retry one version older)
//!             ◀───────────────── HelloAck{protocol}
//! preflight   Preflight{config,cpuid,…} ───▶ checks
//!             ◀──────────────── PreflightReport          (refused / dry run: stop here)
//! setup       Begin{streams} ──────────────▶
//!             N × data Hello ──────────────▶ RAM, VM objects built in the background
//!             ◀──────────────────── BeginAck{restore cost}
//!             (gate.hand_over(): asked now, answered during pre-copy, awaited before pause)
//! precopy     pages (data streams), PassDone ▶ apply; PassAck   … pass after pass (policy)
//! pause       VM paused; Paused ───────────▶ announce the NICs
//! final-pages last dirty pages, PassDone ───▶ PassAck
//! device-state STATE frame ────────────────▶ load into the prepared VM, take the disks
//!             ◀──────────────────────── Ready
//! commit      gate decides (cluster: store CAS; handed over: nothing to ask) — the commit point
//!             Commit ──────────────────────▶ resume
//!             ◀────────────────────── Resumed
//! ```
//! Before the commit point any failure sends `Fail`/`Abort`, re-takes the disks and resumes the
//! VM here (handed over and paused: it stays paused for the caller to resume once the store is
//! swapped back); after it the destination owns the VM and this side never resumes it.

mod streams;

use crate::policy::{self, Budget, PassRecord, Step};
use crate::preflight::{self, PreflightReport, PreflightRequest};
use crate::wire::{self, Msg, Role, WireError, MAX_BATCH_PAGES};
use contract::faults::{self, FaultPoint};
use contract::trust::MigrationSecret;
use contract::{
    CommitPoint, DowntimeBreakdown, FailureKind, MigrationFailure, MigrationParams, Phase,
    Progress, Summary,
};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use streams::{hole_bitmap, stream_thread, Counters, RateLimiter, Stream, Work};
use trust::tls::NodeClient;
use trust::Conn;
use vmm::dirty::{DirtyLog, PageBitmap};
use vmm::memory::PAGE_SIZE;
use vmm::Vm;

pub use crate::cost::{save_cost, warm_save_cost, warm_save_cost_after};

/// What to migrate where.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// Destination `host:port`.
    pub to: String,
    /// Validated by the caller ([`MigrationParams::validate`]).
    pub params: MigrationParams,
    /// Only run the preflight.
    pub dry_run: bool,
    /// Newest wire protocol version to offer.
    pub max_protocol: u32,
    /// Format of the VM state sent: [`wire::STATE_VERSION`]. An older one
    /// (`wire::MIN_STATE_VERSION..`) makes this source send what the previous build sent (for
    /// tests of mixed-version clusters); a state that version cannot express fails the
    /// migration before the commit.
    pub state_version: u32,
    /// Mutual TLS on every connection, the destination required to be this node; `None`:
    /// plaintext (the caller asked for it explicitly).
    pub tls: Option<NodeClient>,
    /// The one-time secret the destination was created with (sent in `Auth`, v4).
    pub secret: Option<MigrationSecret>,
}

impl SendOptions {
    pub fn new(to: impl Into<String>, params: MigrationParams) -> SendOptions {
        SendOptions {
            to: to.into(),
            params,
            dry_run: false,
            max_protocol: wire::PROTOCOL_VERSION,
            state_version: wire::STATE_VERSION,
            tls: None,
            secret: None,
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

    /// Whether a `commit` decision is itself the commit point (a store swap), so that the
    /// source never resumes after it even if telling the destination fails. The standalone
    /// engine's commit point is the `Commit` message instead.
    fn decision_is_commit_point(&self) -> bool;

    /// Asks, once setup is done, that the commit be *handed over* to the migration stream (a
    /// cluster: the store records that the source's `Commit` message decides, so that no
    /// store swap sits in the downtime). The answer is awaited before the pause: `Ok(true)`
    /// handed over (then [`CommitGate::decide`] is not asked, and from the pause on a
    /// failure leaves the VM paused: whoever handed over resumes it once the store says so);
    /// `Ok(false)` or `Err` fails the migration with the VM still running. `None`: no
    /// handover, the gate decides at Ready.
    fn hand_over(&self) -> Option<std::sync::mpsc::Receiver<Result<bool, String>>> {
        None
    }
}

/// The standalone engine's gate: the source's word (the `Commit` message) is the commit.
pub struct SourceDecides;

impl CommitGate for SourceDecides {
    fn decide(&self) -> Result<bool, String> {
        Ok(true)
    }
    fn decision_is_commit_point(&self) -> bool {
        false
    }
}

/// Shared between the engine and whoever watches it (the worker's API).
#[derive(Default)]
pub struct MigrationControl {
    pub progress: Mutex<Progress>,
    pub cancel: AtomicBool,
    /// How the migration failed, once it did.
    pub failure: Mutex<Option<MigrationFailure>>,
}

impl MigrationControl {
    fn update(&self, f: impl FnOnce(&mut Progress)) {
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut p);
    }

    fn phase(&self, phase: Phase) {
        self.update(|p| p.phase = phase);
    }

    /// The progress now.
    pub fn snapshot(&self) -> Progress {
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Connection timeouts.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

type F = MigrationFailure;

fn fail(phase: Phase, kind: FailureKind, msg: impl Into<String>) -> F {
    MigrationFailure::before(phase, kind, msg)
}

/// A wire error talking to the destination, as a failure of `phase`.
fn wire_fail(phase: Phase) -> impl Fn(WireError) -> F {
    move |e| match e {
        WireError::Eof => fail(
            phase,
            FailureKind::PeerLost,
            "the destination closed the connection",
        ),
        WireError::Truncated => fail(
            phase,
            FailureKind::PeerLost,
            "the destination closed the connection inside a frame",
        ),
        WireError::Timeout => fail(
            phase,
            FailureKind::PeerLost,
            format!(
                "the destination stopped answering ({} s)",
                REPLY_TIMEOUT.as_secs()
            ),
        ),
        WireError::Io(io) if trust::tls::is_tls_failure(&io) => fail(
            phase,
            FailureKind::Unauthenticated,
            "the TLS session with the destination failed",
        )
        .caused_by(io),
        WireError::Io(io) => fail(
            phase,
            FailureKind::PeerLost,
            "lost the connection to the destination",
        )
        .caused_by(io),
        other => fail(
            phase,
            FailureKind::Protocol,
            "the destination sent a corrupt stream",
        )
        .caused_by(other),
    }
}

fn violation(phase: Phase, want: &str, got: &Msg) -> F {
    fail(
        phase,
        FailureKind::Protocol,
        format!("protocol violation: expected {want}, got {}", got.name()),
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    u64::from_le_bytes(b) ^ (std::process::id() as u64) << 32
}

/// (v4) Presents the secret after the HelloAck; the destination says AuthOk or refuses.
fn authenticate(
    protocol: u32,
    secret: &Option<MigrationSecret>,
    conn: &mut Conn,
    phase: Phase,
    what: &str,
) -> Result<(), F> {
    if protocol < wire::AUTH_PROTOCOL_VERSION {
        return Ok(());
    }
    wire::send_msg(
        conn,
        &Msg::Auth {
            secret: secret.clone(),
        },
    )
    .map_err(wire_fail(phase))?;
    match wire::recv_msg(conn).map_err(wire_fail(phase))? {
        Msg::AuthOk => Ok(()),
        Msg::Refuse { reason } => Err(fail(
            phase,
            FailureKind::Unauthenticated,
            format!("the destination refused {what}: {reason}"),
        )),
        m => Err(violation(phase, "AuthOk", &m)),
    }
}

/// Opens data stream `index` of session `session`: connection (TLS handshake included),
/// Hello/HelloAck, Auth.
fn open_data_stream(
    opts: &SendOptions,
    protocol: u32,
    session: u64,
    index: u16,
) -> Result<Conn, F> {
    let mut sock = connect(&opts.to, Phase::Setup, opts.tls.as_ref())?;
    wire::send_msg(
        &mut sock,
        &Msg::Hello {
            protocol,
            session,
            role: Role::Data { index },
        },
    )
    .map_err(wire_fail(Phase::Setup))?;
    match wire::recv_msg(&mut sock).map_err(wire_fail(Phase::Setup))? {
        Msg::HelloAck { protocol: p } if p == protocol => {}
        Msg::Refuse { reason } => {
            return Err(fail(
                Phase::Setup,
                FailureKind::Refused,
                format!("the destination refused data stream {index}: {reason}"),
            ))
        }
        m => return Err(violation(Phase::Setup, "HelloAck", &m)),
    }
    authenticate(
        protocol,
        &opts.secret,
        &mut sock,
        Phase::Setup,
        &format!("data stream {index}"),
    )?;
    Ok(sock)
}

/// Connects to the destination: TCP, then (with `tls`) the TLS handshake, in which the
/// destination must prove it is the expected node.
fn connect(to: &str, phase: Phase, tls: Option<&NodeClient>) -> Result<Conn, F> {
    let tcp = connect_tcp(to, phase)?;
    let Some(t) = tls else {
        return Ok(Conn::plain(tcp));
    };
    Conn::connect_tls(tcp, t.config.clone(), t.name.clone(), TLS_HANDSHAKE_TIMEOUT).map_err(|e| {
        let kind = if trust::tls::is_tls_failure(&e) {
            FailureKind::Unauthenticated
        } else {
            FailureKind::PeerLost
        };
        fail(
            phase,
            kind,
            format!(
                "TLS handshake with {to} (expected node {}) failed",
                t.peer_node
            ),
        )
        .caused_by(e)
    })
}

fn connect_tcp(to: &str, phase: Phase) -> Result<TcpStream, F> {
    let addrs: Vec<_> = to
        .to_socket_addrs()
        .map_err(|e| {
            fail(
                phase,
                FailureKind::BadRequest,
                format!("bad destination address {to:?}"),
            )
            .caused_by(e)
        })?
        .collect();
    let mut last = String::from("no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                // A destination that stops reading (hung, partitioned) fails the write
                // instead of blocking it forever.
                s.set_read_timeout(Some(REPLY_TIMEOUT))
                    .and_then(|_| s.set_write_timeout(Some(REPLY_TIMEOUT)))
                    .map_err(|e| fail(phase, FailureKind::Local, "socket setup").caused_by(e))?;
                return Ok(s);
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(fail(
        phase,
        FailureKind::PeerLost,
        format!("cannot connect to {to}"),
    )
    .caused_by(last))
}

/// What pre-copy handed to the switchover.
struct Converged {
    /// Dirty, not yet sent.
    dirty: PageBitmap,
    /// The next pass number (the final pass).
    pass: u32,
    pass0_mibs: f64,
    max_throttle: u8,
}

/// Times of the switchover, for the downtime breakdown.
struct Switchover {
    t_pause: Instant,
    t_pages: Instant,
    t_ready: Instant,
    t_decided: Instant,
    t_resumed: Instant,
    resume_us: u64,
    state_bytes: u64,
}

/// The source end of one migration: what every phase works on.
struct Session<'a> {
    vm: &'a Vm,
    opts: &'a SendOptions,
    ctl: &'a MigrationControl,
    control: Conn,
    /// Agreed in the handshake.
    protocol: u32,
    session: u64,
    streams: Vec<Stream>,
    counters: Arc<Counters>,
    t0: Instant,
    /// Total time spent sending passes and the guest bytes they carried (link rate).
    send_time: Duration,
    send_bytes: u64,
    /// Where the commit point is relative to where the session is.
    commit: CommitPoint,
    /// The commit was handed over to the stream ([`CommitGate::hand_over`]).
    handed_over: bool,
    /// The VM was (being) paused for the switchover.
    paused: bool,
}

/// Migrates `vm` with the source's word as the commit ([`SourceDecides`]).
pub fn migrate(vm: &Vm, opts: &SendOptions, ctl: &MigrationControl) -> Result<Summary, F> {
    migrate_gated(vm, opts, ctl, &SourceDecides)
}

/// Migrates `vm` to `opts.to`, the commit decided by `gate`. On success the VM has moved: it is
/// left paused here and the caller must stop it. On failure before the commit point the VM runs
/// here again (`source_running`, unless its disks could not be taken back); after it, or when
/// the commit's outcome is unknown, the VM stays paused here so that it never runs twice.
pub fn migrate_gated(
    vm: &Vm,
    opts: &SendOptions,
    ctl: &MigrationControl,
    gate: &dyn CommitGate,
) -> Result<Summary, F> {
    *ctl.progress.lock().unwrap_or_else(|e| e.into_inner()) = Progress::default();
    *ctl.failure.lock().unwrap_or_else(|e| e.into_inner()) = None;
    let result = match connect(&opts.to, Phase::Connect, opts.tls.as_ref()) {
        Ok(control) => {
            let mut s = Session {
                vm,
                opts,
                ctl,
                control,
                protocol: opts.max_protocol,
                session: rand_u64(),
                streams: Vec::new(),
                counters: Arc::new(Counters::default()),
                t0: Instant::now(),
                send_time: Duration::ZERO,
                send_bytes: 0,
                commit: CommitPoint::Before,
                handed_over: false,
                paused: false,
            };
            let r = s.run(gate);
            s.stop_streams();
            r.map_err(|f| s.settle_failure(f))
        }
        Err(f) => Err(f),
    };
    match &result {
        Ok(_) => ctl.phase(Phase::Resumed),
        Err(f) => {
            ctl.update(|p| p.throttle_pct = 0);
            *ctl.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(f.clone());
        }
    }
    result
}

impl Session<'_> {
    fn run(&mut self, gate: &dyn CommitGate) -> Result<Summary, F> {
        let rtt = self.handshake()?;
        let report = self.preflight()?;
        if self.opts.dry_run {
            return Ok(self.dry_run(report));
        }
        let (report, fixed_cost) = self.setup(report, rtt)?;
        let log = DirtyLog::start(self.vm.vm_fd(), self.vm.ram()).map_err(|e| {
            fail(
                Phase::Setup,
                FailureKind::Local,
                "cannot start dirty logging",
            )
            .caused_by(e)
        })?;
        let result = self.transfer(&log, report, fixed_cost, gate);
        let _ = log.stop();
        result
    }

    /// Pre-copy and switchover, with dirty logging on.
    fn transfer(
        &mut self,
        log: &DirtyLog,
        report: PreflightReport,
        fixed_cost: Duration,
        gate: &dyn CommitGate,
    ) -> Result<Summary, F> {
        // The handover is asked for now and answered while pre-copy runs.
        let handover = gate.hand_over();
        let converged = self.precopy(log, fixed_cost)?;
        if let Some(answer) = handover {
            self.await_handover(answer)?;
        }
        let t_pause = self.pause()?;
        let t_pages = self.final_pages(log, &converged)?;
        let (state_bytes, t_ready) = self.device_state()?;
        let t_decided = self.commit(gate)?;
        let (t_resumed, resume_us) = self.resumed()?;
        let sw = Switchover {
            t_pause,
            t_pages,
            t_ready,
            t_decided,
            t_resumed,
            resume_us,
            state_bytes,
        };
        Ok(self.summary(report, fixed_cost, &converged, &sw))
    }

    /// Cancel and timeout checks (before the commit point only).
    fn check_abort(&self, phase: Phase) -> Result<(), F> {
        if self.ctl.cancel.load(Ordering::SeqCst) {
            return Err(fail(phase, FailureKind::Cancelled, "cancelled by request"));
        }
        if let Some(t) = self.opts.params.timeout_s {
            if self.t0.elapsed().as_secs_f64() > t {
                return Err(fail(
                    phase,
                    FailureKind::TimedOut,
                    format!("timed out after {t:.1} s"),
                ));
            }
        }
        Ok(())
    }

    /// The next control message; a peer's `Fail`/`Abort` becomes a failure of `phase`.
    fn reply(&mut self, phase: Phase) -> Result<Msg, F> {
        let m = wire::recv_msg(&mut self.control).map_err(wire_fail(phase))?;
        if let Some((p, kind, reason)) = wire::peer_failure(&m) {
            let kind = match kind {
                Some(FailureKind::Refused) => FailureKind::Refused,
                _ => FailureKind::PeerAborted,
            };
            return Err(fail(
                phase,
                kind,
                format!("the destination gave up in {p}: {reason}"),
            ));
        }
        Ok(m)
    }

    fn send(&mut self, phase: Phase, m: &Msg) -> Result<(), F> {
        wire::send_msg(&mut self.control, m)
            .map(|_| ())
            .map_err(wire_fail(phase))
    }

    // -----------------------------------------------------------------------------------------
    // Phases

    /// Agrees on a protocol version: offers the newest, then older ones on a fresh connection
    /// after each refusal. Returns the round-trip time of the accepted exchange.
    fn handshake(&mut self) -> Result<Duration, F> {
        self.ctl.phase(Phase::Handshake);
        let mut refusals = Vec::new();
        let mut offer = self.opts.max_protocol;
        loop {
            let t = Instant::now();
            self.send(
                Phase::Handshake,
                &Msg::Hello {
                    protocol: offer,
                    session: self.session,
                    role: Role::Control,
                },
            )?;
            match self.reply(Phase::Handshake)? {
                Msg::HelloAck { protocol }
                    if (wire::MIN_PROTOCOL_VERSION..=offer).contains(&protocol) =>
                {
                    self.protocol = protocol;
                    let mut control = self.control.try_clone().map_err(|e| {
                        fail(Phase::Handshake, FailureKind::Local, "socket").caused_by(e)
                    })?;
                    self.authenticate(&mut control, Phase::Handshake, "the control connection")?;
                    return Ok(t.elapsed());
                }
                Msg::HelloAck { protocol } => {
                    return Err(fail(
                        Phase::Handshake,
                        FailureKind::Protocol,
                        format!(
                            "the destination answered with protocol version {protocol} to an offer of version {offer}"
                        ),
                    ))
                }
                Msg::Refuse { reason } => {
                    refusals.push(format!("version {offer}: {reason}"));
                    if offer <= wire::MIN_PROTOCOL_VERSION {
                        return Err(fail(
                            Phase::Handshake,
                            FailureKind::Refused,
                            format!(
                                "the destination refused every protocol version this source speaks ({}-{}): {}",
                                wire::MIN_PROTOCOL_VERSION,
                                self.opts.max_protocol,
                                refusals.join("; ")
                            ),
                        ));
                    }
                    offer -= 1;
                    self.control =
                        connect(&self.opts.to, Phase::Handshake, self.opts.tls.as_ref())?;
                }
                m => return Err(violation(Phase::Handshake, "HelloAck", &m)),
            }
        }
    }

    /// (v4) Presents the secret after the HelloAck; the destination says AuthOk or refuses.
    fn authenticate(&self, conn: &mut Conn, phase: Phase, what: &str) -> Result<(), F> {
        authenticate(self.protocol, &self.opts.secret, conn, phase, what)
    }

    /// Describes the VM; the destination checks it can take it.
    fn preflight(&mut self) -> Result<PreflightReport, F> {
        self.ctl.phase(Phase::Preflight);
        let vm = self.vm;
        let kvm = vmm::open_kvm()
            .map_err(|e| fail(Phase::Preflight, FailureKind::Local, e.to_string()))?;
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
        self.send(Phase::Preflight, &Msg::Preflight(req))?;
        let report = match self.reply(Phase::Preflight)? {
            Msg::PreflightReport(r) => r,
            m => return Err(violation(Phase::Preflight, "PreflightReport", &m)),
        };
        if !report.ok {
            return Err(fail(
                Phase::Preflight,
                FailureKind::Refused,
                format!("destination refused: {}", report.problems.join("; ")),
            ));
        }
        Ok(report)
    }

    /// A dry run ends after the preflight.
    fn dry_run(&mut self, report: PreflightReport) -> Summary {
        let end = fail(Phase::Preflight, FailureKind::Cancelled, "dry run");
        let _ = wire::send_msg(&mut self.control, &wire::failure_msg(self.protocol, &end));
        Summary {
            dry_run: true,
            preflight: report,
            total_ms: ms(self.t0.elapsed()),
            streams: self.opts.params.streams,
            compression: self.opts.params.compression,
            protocol: self.protocol,
            ..Default::default()
        }
    }

    /// Opens the data streams; the destination allocates RAM and builds the VM. Returns the
    /// report (with the destination's restore cost) and the fixed switchover cost.
    fn setup(
        &mut self,
        mut report: PreflightReport,
        rtt: Duration,
    ) -> Result<(PreflightReport, Duration), F> {
        self.ctl.phase(Phase::Setup);
        let save_cost = save_cost(self.vm.config().vcpus);
        let params = &self.opts.params;
        let n = params.streams.clamp(1, contract::migration::MAX_STREAMS);
        let compression = params.compression;
        self.send(
            Phase::Setup,
            &Msg::Begin {
                streams: n,
                compression,
            },
        )?;
        let limiter = params
            .max_bandwidth_bytes()
            .map(|b| Arc::new(RateLimiter::new(b.max(1))));
        // The data connections open at once (each its own handshakes and round trips; the
        // destination admits each on a thread of its own): with TLS, one after the other they
        // were most of an idle guest's migration time. The first failure (by stream index)
        // is reported; connections that did open are dropped with it.
        let (opts, protocol, session) = (&self.opts, self.protocol, self.session);
        let socks: Vec<Result<Conn, F>> = std::thread::scope(|s| {
            let opening: Vec<_> = (0..n)
                .map(|i| s.spawn(move || open_data_stream(opts, protocol, session, i)))
                .collect();
            opening
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(fail(
                            Phase::Setup,
                            FailureKind::Local,
                            "opening a data stream panicked",
                        ))
                    })
                })
                .collect()
        });
        let socks = socks.into_iter().collect::<Result<Vec<Conn>, F>>()?;
        for (i, sock) in socks.into_iter().enumerate() {
            let (tx, rx) = sync_channel(4);
            let (ram, lim, ctr) = (
                self.vm.ram().clone(),
                limiter.clone(),
                self.counters.clone(),
            );
            let join = std::thread::Builder::new()
                .name(format!("mig-tx{i}"))
                .spawn(move || stream_thread(sock, rx, ram, compression, lim, ctr))
                .map_err(|e| {
                    fail(
                        Phase::Setup,
                        FailureKind::Local,
                        "cannot start a stream thread",
                    )
                    .caused_by(e)
                })?;
            self.streams.push(Stream {
                tx,
                join: Some(join),
            });
        }
        let restore_us = match self.reply(Phase::Setup)? {
            Msg::BeginAck { restore_us } => restore_us,
            m => return Err(violation(Phase::Setup, "BeginAck", &m)),
        };
        report.restore_cost_us = restore_us;
        // Fixed switchover cost: pause + save + encode here, load + resume there (both
        // measured on scratch VMs of this shape), and the Ready/Commit/Resumed round trips.
        Ok((
            report,
            save_cost + Duration::from_micros(restore_us) + rtt * 3,
        ))
    }

    /// Pass after pass while the VM runs, until the policy says switch over.
    fn precopy(&mut self, log: &DirtyLog, fixed_cost: Duration) -> Result<Converged, F> {
        let vm = self.vm;
        let mut pass = 0u32;
        let mut max_throttle = 0u8;
        let mut pass0_mibs = 0.0;
        let mut history: Vec<PassRecord> = Vec::new();
        let mut dirty = log
            .collect()
            .map_err(|e| fail(Phase::Precopy, FailureKind::Local, "dirty log").caused_by(e))?;
        loop {
            self.check_abort(Phase::Precopy)?;
            self.ctl.update(|p| {
                p.phase = Phase::Precopy;
                p.pass = pass;
                p.remaining_pages = dirty.count();
                p.remaining_bytes = dirty.count() * PAGE_SIZE;
            });
            let t = Instant::now();
            let throttle = vm.throttle();
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
                .map_err(|e| fail(Phase::Precopy, FailureKind::Local, "dirty log").caused_by(e))?;
            let dirty_pages = dirty.count();
            history.push(PassRecord {
                pass,
                dirty_after: dirty_pages,
                duration: took,
                throttle_pct: throttle,
            });
            let budget = Budget {
                max_downtime: Duration::from_millis(self.opts.params.max_downtime_ms),
                fixed_cost,
                link_rate: self.link_rate(),
            };
            let step = policy::next_step(&history, &budget);
            if let Step::Throttle(t) = step {
                vm.set_throttle(t);
                max_throttle = max_throttle.max(t);
            }
            let (_, expected) = policy::expected_downtime(dirty_pages, &budget);
            let last = history.last().expect("a pass was just recorded");
            self.publish_pass(
                dirty_pages,
                policy::dirty_rate(last) * PAGE_SIZE as f64,
                budget.link_rate,
                expected,
            );
            pass += 1;
            match step {
                Step::SwitchOver => {
                    return Ok(Converged {
                        dirty,
                        pass,
                        pass0_mibs,
                        max_throttle,
                    })
                }
                Step::GiveUp => {
                    return Err(fail(
                        Phase::Precopy,
                        FailureKind::NotConverging,
                        format!("did not converge in {} passes", policy::MAX_PASSES),
                    ))
                }
                Step::Continue | Step::Throttle(_) => {}
            }
        }
    }

    /// The downtime clock starts: the VM stops, the destination learns it (and announces the
    /// VM's NICs, so frames queue there).
    /// The answer to the handover, before the VM pauses (so a refusal leaves it running).
    fn await_handover(
        &mut self,
        answer: std::sync::mpsc::Receiver<Result<bool, String>>,
    ) -> Result<(), F> {
        let phase = Phase::Precopy;
        match answer.recv() {
            Ok(Ok(true)) => {
                self.handed_over = true;
                Ok(())
            }
            Ok(Ok(false)) => Err(fail(
                phase,
                FailureKind::CommitRefused,
                "the commit could not be handed over to the migration (the store refused)",
            )),
            Ok(Err(e)) => Err(fail(
                phase,
                FailureKind::Local,
                "no answer to the commit handover",
            )
            .caused_by(e)),
            Err(_) => Err(fail(
                phase,
                FailureKind::Local,
                "no answer to the commit handover: the gate is gone",
            )),
        }
    }

    fn pause(&mut self) -> Result<Instant, F> {
        self.check_abort(Phase::Pause)?;
        self.ctl.phase(Phase::Pause);
        let t = Instant::now();
        self.paused = true;
        self.vm.pause().map_err(|e| {
            fail(Phase::Pause, FailureKind::Local, "cannot pause the VM").caused_by(e)
        })?;
        let _ = wire::send_msg(&mut self.control, &Msg::Paused);
        faults::hit(FaultPoint::WorkerPaused);
        Ok(t)
    }

    /// The final pass: what the last pre-copy round found dirty (collected, not yet sent) plus
    /// whatever the guest dirtied until the pause.
    fn final_pages(&mut self, log: &DirtyLog, c: &Converged) -> Result<Instant, F> {
        self.ctl.phase(Phase::FinalPages);
        let mut last = log
            .collect()
            .map_err(|e| fail(Phase::FinalPages, FailureKind::Local, "dirty log").caused_by(e))?;
        last.union_with(&c.dirty);
        self.send_pass(c.pass, &last, Phase::FinalPages)?;
        Ok(Instant::now())
    }

    /// vCPU and device state; the disks are handed over; the destination loads everything and
    /// says Ready. Returns the state's size and when Ready arrived.
    fn device_state(&mut self) -> Result<(u64, Instant), F> {
        self.ctl.phase(Phase::DeviceState);
        let vm = self.vm;
        let state = vm.save_state().map_err(|e| {
            fail(
                Phase::DeviceState,
                FailureKind::Local,
                "cannot save the VM state",
            )
            .caused_by(e)
        })?;
        let encoded = vmm::snapshot::encode_state_versioned(self.opts.state_version, &state)
            .map_err(|e| {
                fail(
                    Phase::DeviceState,
                    FailureKind::Local,
                    "cannot encode the VM state",
                )
                .caused_by(e)
            })?;
        // Hand the disks over: everything acknowledged is flushed and the image locks are
        // released for the destination, which takes them before it reports Ready. Any failure
        // from here until the commit makes the source take them back before it resumes.
        vm.release_storage().map_err(|e| {
            fail(
                Phase::DeviceState,
                FailureKind::Local,
                "cannot release the disks",
            )
            .caused_by(e)
        })?;
        wire::write_frame(&mut self.control, wire::KIND_STATE, 0, &[&encoded])
            .map_err(wire_fail(Phase::DeviceState))?;
        match self.reply(Phase::DeviceState)? {
            Msg::Ready { .. } => {}
            m => return Err(violation(Phase::DeviceState, "Ready", &m)),
        }
        faults::hit(FaultPoint::WorkerReady);
        self.counters.bytes.fetch_add(
            encoded.len() as u64 + wire::HEADER_LEN as u64,
            Ordering::Relaxed,
        );
        Ok((encoded.len() as u64, Instant::now()))
    }

    /// The commit point: the gate decides, then the destination is told.
    fn commit(&mut self, gate: &dyn CommitGate) -> Result<Instant, F> {
        // Last chance to cancel: after this the destination owns the VM.
        self.check_abort(Phase::Ready)?;
        self.ctl.phase(Phase::Ready);
        // A destination that died (or gave up) since it said Ready cannot take the VM: find out
        // before deciding, so that the VM stays here instead of being committed to nobody.
        self.destination_still_ready()?;
        let decision = if self.handed_over {
            Ok(true) // the stream's Commit is the commit point
        } else {
            gate.decide()
        };
        match decision {
            Ok(true) => {}
            Ok(false) => {
                return Err(fail(
                    Phase::Ready,
                    FailureKind::CommitRefused,
                    "the commit was refused (the VM's owner did not change)",
                ))
            }
            Err(e) => {
                self.commit = CommitPoint::Unknown;
                return Err(fail(
                    Phase::Ready,
                    FailureKind::CommitUnknown,
                    "the commit decision is unknown; the VM is left paused here until its owner is settled",
                )
                .caused_by(e));
            }
        }
        let t_decided = Instant::now();
        // Handed over, the Commit about to be written is the commit point: once we try, the
        // destination may have it (a failed write is no proof it did not arrive), and a
        // destination whose source vanished after Ready commits on its own.
        if gate.decision_is_commit_point() || self.handed_over {
            self.commit = CommitPoint::After;
        }
        self.ctl.phase(Phase::Commit);
        let sent = self.send(Phase::Commit, &Msg::Commit);
        if sent.is_ok() {
            // The Commit frame is complete on the wire: the destination may act on it.
            self.commit = CommitPoint::After;
        }
        // Past the commit point (Commit sent, or a cluster's store already named the
        // destination, which may have resumed on that word and closed before Commit arrived).
        if self.commit == CommitPoint::After {
            faults::hit(FaultPoint::WorkerCommitSent);
            // The store decided: a destination that resumed on that word may have closed
            // before the Commit arrived, and its Resumed may still be there to read.
            return Ok(t_decided);
        }
        sent?;
        Ok(t_decided)
    }

    /// Whether the destination's control connection is still open with nothing unexpected on
    /// it (a cheap non-blocking peek; the destination sends nothing between Ready and Commit).
    fn destination_still_ready(&mut self) -> Result<(), F> {
        let phase = Phase::Ready;
        match self.control.poll_readable() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Ok(0) => Err(fail(
                phase,
                FailureKind::PeerLost,
                "the destination closed the connection after it said Ready",
            )),
            Ok(_) => match self.reply(phase)? {
                Msg::Ping => Ok(()),
                m => Err(violation(phase, "nothing after Ready", &m)),
            },
            Err(e) => Err(fail(
                phase,
                FailureKind::PeerLost,
                "lost the destination after it said Ready",
            )
            .caused_by(e)),
        }
    }

    /// The destination confirms the VM runs there.
    fn resumed(&mut self) -> Result<(Instant, u64), F> {
        match wire::recv_msg(&mut self.control) {
            Ok(Msg::Resumed { resume_us }) => Ok((Instant::now(), resume_us)),
            Ok(m) => Err(fail(
                Phase::Commit,
                FailureKind::Protocol,
                format!("commit sent but the destination answered {} instead of Resumed; the VM is left paused here", m.name()),
            )),
            Err(e) => Err(fail(
                Phase::Commit,
                FailureKind::PeerLost,
                "past the commit point but the destination did not confirm the resume; the VM is left paused here so it never runs twice",
            )
            .caused_by(e)),
        }
    }

    // -----------------------------------------------------------------------------------------
    // After the phases

    /// A failure, settled: before the commit point the destination is told, the VM takes its
    /// disks back and runs here again; after it (or when unknown) the VM stays paused.
    fn settle_failure(&mut self, mut f: F) -> F {
        f.commit = self.commit;
        if f.commit != CommitPoint::Before {
            f.source_running = false;
            return f;
        }
        let _ = wire::send_msg(&mut self.control, &wire::failure_msg(self.protocol, &f));
        self.vm.set_throttle(0);
        if self.handed_over && self.paused {
            // The destination may commit on its own while the store names the handover: the
            // VM resumes here only once whoever handed over has swapped the store back.
            f.source_running = false;
            f.message = format!(
                "{}; the VM stays paused here until the store takes the handover back",
                f.message
            );
            return f;
        }
        match self.vm.resume() {
            Ok(()) => {
                // The destination may have announced the VM's MAC already (it does once the
                // source paused): claim the traffic back.
                self.vm.virtio().announce();
                f.source_running = true;
            }
            Err(e) => {
                // Typically: the destination still holds a disk lock. The VM stays paused
                // rather than run without its disks.
                f.source_running = false;
                f.message = format!("{}; the VM could not be resumed here: {e}", f.message);
            }
        }
        f
    }

    fn summary(
        &self,
        report: PreflightReport,
        fixed_cost: Duration,
        c: &Converged,
        sw: &Switchover,
    ) -> Summary {
        let ctr = &self.counters;
        let pages_sent = ctr.pages.load(Ordering::Relaxed);
        let zero_pages = ctr.zero.load(Ordering::Relaxed);
        let bytes_sent = ctr.bytes.load(Ordering::Relaxed);
        self.ctl.update(|p| {
            p.phase = Phase::Resumed;
            p.pass = c.pass;
            p.remaining_pages = 0;
            p.remaining_bytes = 0;
            p.bytes_sent = bytes_sent;
            p.pages_sent = pages_sent;
            p.zero_pages = zero_pages;
            p.expected_downtime_ms = 0.0;
        });
        Summary {
            dry_run: false,
            preflight: report,
            total_ms: ms(self.t0.elapsed()),
            downtime_ms: ms(sw.t_resumed - sw.t_pause),
            downtime: DowntimeBreakdown {
                final_memory_ms: ms(sw.t_pages - sw.t_pause),
                state_ms: ms(sw.t_ready - sw.t_pages),
                commit_ms: ms(sw.t_resumed - sw.t_ready),
                decision_ms: ms(sw.t_decided - sw.t_ready),
                resume_ms: sw.resume_us as f64 / 1e3,
            },
            passes: c.pass + 1,
            bytes_sent,
            pages_sent,
            zero_pages,
            data_pages: pages_sent - zero_pages,
            state_bytes: sw.state_bytes,
            max_throttle_pct: c.max_throttle,
            streams: self.opts.params.streams,
            compression: self.opts.params.compression,
            pass0_mibs: c.pass0_mibs,
            fixed_cost_ms: ms(fixed_cost),
            protocol: self.protocol,
        }
    }

    /// Stops the stream threads (dropping the senders ends their loops).
    fn stop_streams(&mut self) {
        for st in self.streams.drain(..) {
            drop(st.tx);
            if let Some(j) = st.join {
                let _ = j.join();
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Passes

    fn link_rate(&self) -> f64 {
        if self.send_time.is_zero() {
            1.0
        } else {
            (self.send_bytes as f64 / self.send_time.as_secs_f64()).max(1.0)
        }
    }

    /// Data (non-zero) pages sent so far.
    fn data_pages(&self) -> u64 {
        self.counters.pages.load(Ordering::Relaxed) - self.counters.zero.load(Ordering::Relaxed)
    }

    /// Sends every page of `pages` over the streams, then waits until the destination applied
    /// them all (the per-pass barrier). Returns the bytes the pass put on the wire.
    fn send_pass(&mut self, pass: u32, pages: &PageBitmap, phase: Phase) -> Result<u64, F> {
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
                            self.check_abort(phase)?;
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
                    if sent == 1 && phase == Phase::Precopy {
                        match pass {
                            0 => faults::hit(FaultPoint::WorkerPass0),
                            2 => faults::hit(FaultPoint::WorkerPass2),
                            _ => {}
                        }
                    }
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
                Ok(Err(e)) => {
                    return Err(fail(
                        phase,
                        FailureKind::PeerLost,
                        format!("data stream {i} failed"),
                    )
                    .caused_by(e))
                }
                Err(_) => {
                    return Err(fail(
                        phase,
                        FailureKind::Local,
                        format!("data stream {i} stopped"),
                    ))
                }
            }
        }
        self.send(
            phase,
            &Msg::PassDone {
                pass,
                frames,
                pages: pages.count(),
            },
        )?;
        match self.reply(phase)? {
            Msg::PassAck { pass: p } if p == pass => {}
            m => return Err(violation(phase, &format!("PassAck({pass})"), &m)),
        }
        Ok(self.counters.bytes.load(Ordering::Relaxed) - before)
    }

    fn dispatch(&self, i: usize, w: Work, phase: Phase) -> Result<(), F> {
        self.streams[i].tx.send(w).map_err(|_| {
            fail(
                phase,
                FailureKind::Local,
                format!("data stream {i} stopped"),
            )
        })
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

    /// Progress after a pass.
    fn publish_pass(&self, dirty_pages: u64, dirty_rate: f64, link_rate: f64, expected: Duration) {
        let c = &self.counters;
        let (bs, ps, zs) = (
            c.bytes.load(Ordering::Relaxed),
            c.pages.load(Ordering::Relaxed),
            c.zero.load(Ordering::Relaxed),
        );
        let thr = self.vm.throttle();
        let elapsed = self.t0.elapsed().as_secs_f64();
        self.ctl.update(|p| {
            p.bytes_sent = bs;
            p.pages_sent = ps;
            p.zero_pages = zs;
            p.remaining_pages = dirty_pages;
            p.remaining_bytes = dirty_pages * PAGE_SIZE;
            p.dirty_rate_mibs = dirty_rate / (1 << 20) as f64;
            p.bandwidth_mibs = link_rate / (1 << 20) as f64;
            p.expected_downtime_ms = ms(expected);
            p.throttle_pct = thr;
            p.elapsed_s = elapsed;
        });
    }
}
