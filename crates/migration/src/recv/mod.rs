//! The destination side of a live migration: the mirror image of [`crate::send`], one method
//! per phase, run by [`receive`].
//!
//! `handshake → preflight → (await Begin) → setup → precopy (PassDone/PassAck barriers until
//! Paused) → final-pages (until the STATE frame) → device-state (VM restored, disks taken,
//! Ready) → commit decision → resume`. A refused handshake or preflight, a dry run, or a source
//! that leaves before `Begin` ends the session before any memory moved, and the destination
//! waits for the next source. From `setup` on, any failure (malformed or out-of-order message,
//! lost connection, the source giving up) discards everything and is final.
//!
//! With an external decision ([`ReceiveOptions::external`], a cluster agent deciding from the
//! store), a VM that reached Ready waits for a decision from the agent if the source goes
//! away: whether the commit happened is the store's to say, not the connection's.

mod admit;
mod decision;
mod streams;

pub use admit::{HANDSHAKE_TIMEOUT, MAX_PENDING};

pub use decision::Decision;

use crate::preflight::{self, DestinationLimits, PreflightRequest};
use crate::wire::{self, Msg, Role, WireError};
use admit::{Admission, Admitted};
use contract::trust::MigrationSecret;
use contract::{FailureKind, MigrationFailure, Phase, Progress};
use std::io::BufReader;
use std::net::TcpListener;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use streams::{stream_rx, wait_applied, StreamShared};
use trust::tls::ServerConfig;
use trust::Conn;
use vmm::devices::serial::ConsoleLog;
use vmm::memory::GuestRam;
use vmm::vm::PreparedVm;
use vmm::Vm;

/// Destination options.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    pub limits: DestinationLimits,
    /// In a cluster the commit point is the store's ownership change, not the source's word:
    /// once Ready, this destination also accepts the decision from here (its agent), and if the
    /// source disappears it waits for it instead of discarding the VM.
    pub external: Option<Arc<Decision>>,
    /// Wire protocol versions accepted.
    pub protocols: RangeInclusive<u32>,
    /// Mutual TLS on every connection (the configuration names the source node it accepts);
    /// `None`: plaintext (the caller asked for it explicitly).
    pub tls: Option<Arc<ServerConfig>>,
    /// The one-time secret the source must present (v4 `Auth`).
    pub secret: Option<MigrationSecret>,
    /// Called once the VM is committed here, right before its vCPUs resume: what must be in
    /// place before the guest runs on this host (the worker makes its serial log the VM's, so
    /// that what the guest prints from its first instruction here is in the VM's log even if
    /// this process dies right after).
    pub before_resume: Option<BeforeResume>,
}

/// See [`ReceiveOptions::before_resume`].
#[derive(Clone)]
pub struct BeforeResume(pub Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for BeforeResume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BeforeResume")
    }
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        ReceiveOptions {
            limits: Default::default(),
            external: None,
            protocols: wire::MIN_PROTOCOL_VERSION..=wire::PROTOCOL_VERSION,
            tls: None,
            secret: None,
            before_resume: None,
        }
    }
}

/// How long the destination waits for the source between messages before giving up.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long to wait for the data connections after `Begin`.
const STREAMS_TIMEOUT: Duration = Duration::from_secs(20);

/// What the receiving side shows (for `ctl status`).
#[derive(Default)]
pub struct ReceiveControl {
    pub progress: Mutex<Progress>,
    /// The VM is complete here and waits for the commit decision.
    pub awaiting_decision: AtomicBool,
    /// The current source's control connection is open.
    pub source_connected: AtomicBool,
    /// How the migration failed, once it did.
    pub failure: Mutex<Option<MigrationFailure>>,
}

impl ReceiveControl {
    fn phase(&self, phase: Phase) {
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .phase = phase;
    }

    /// The progress now.
    pub fn snapshot(&self) -> Progress {
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

type F = MigrationFailure;

/// Outcome of a session that ended before memory moved.
enum Early {
    /// Try again with the next source.
    Retry(String),
    /// Final failure.
    Fatal(F),
}

fn fail(phase: Phase, kind: FailureKind, msg: impl Into<String>) -> F {
    MigrationFailure::before(phase, kind, msg)
}

fn wire_fail(phase: Phase) -> impl Fn(WireError) -> F {
    move |e| match e {
        WireError::Eof => fail(
            phase,
            FailureKind::PeerLost,
            "the source closed the connection",
        ),
        WireError::Truncated => fail(
            phase,
            FailureKind::PeerLost,
            "the source closed the connection inside a frame",
        ),
        WireError::Timeout => fail(
            phase,
            FailureKind::PeerLost,
            format!("the source sent nothing for {} s", IDLE_TIMEOUT.as_secs()),
        ),
        WireError::Io(io) if trust::tls::is_tls_failure(&io) => fail(
            phase,
            FailureKind::Unauthenticated,
            "the TLS session with the source failed",
        )
        .caused_by(io),
        WireError::Io(io) => fail(
            phase,
            FailureKind::PeerLost,
            "lost the connection to the source",
        )
        .caused_by(io),
        other => fail(
            phase,
            FailureKind::Protocol,
            "the source sent a corrupt stream",
        )
        .caused_by(other),
    }
}

fn violation(phase: Phase, got: &Msg) -> F {
    fail(
        phase,
        FailureKind::Protocol,
        format!("protocol violation: unexpected {} in {phase}", got.name()),
    )
}

/// Waits for a source on `listener` and receives one VM. Sessions that end before memory moves
/// (refused version, refused preflight, dry run) are reported through `on_early` and the
/// destination keeps listening. Returns the running VM.
pub fn receive(
    kvm: &kvm_ioctls::Kvm,
    listener: &TcpListener,
    opts: &ReceiveOptions,
    serial: impl Into<ConsoleLog>,
    ctl: &ReceiveControl,
    on_early: &dyn Fn(&str),
) -> Result<Vm, F> {
    let serial = serial.into();
    let policy = admit::Policy {
        tls: opts.tls.clone(),
        secret: opts.secret.clone(),
        protocols: opts.protocols.clone(),
    };
    let result = match Admission::new(listener, policy) {
        Ok(mut admission) => receive_from(kvm, &mut admission, opts, serial, ctl, on_early),
        Err(e) => Err(fail(Phase::Connect, FailureKind::Local, "listener").caused_by(e)),
    };
    let _ = listener.set_nonblocking(false);
    ctl.source_connected.store(false, Ordering::SeqCst);
    ctl.awaiting_decision.store(false, Ordering::SeqCst);
    if let Err(f) = &result {
        *ctl.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(f.clone());
    }
    result
}

fn receive_from(
    kvm: &kvm_ioctls::Kvm,
    admission: &mut Admission,
    opts: &ReceiveOptions,
    serial: ConsoleLog,
    ctl: &ReceiveControl,
    on_early: &dyn Fn(&str),
) -> Result<Vm, F> {
    loop {
        let a = match admission.next(None, on_early) {
            Ok(Some(a)) => a,
            Ok(None) => continue,
            Err(e) => {
                return Err(fail(Phase::Connect, FailureKind::Local, "accept failed").caused_by(e))
            }
        };
        let peer = a.peer;
        if a.role != Role::Control {
            on_early(&format!(
                "data connection from {peer} refused: no migration session is open"
            ));
            a.refuse("no migration session is open");
            continue;
        }
        let serial = serial
            .try_clone()
            .map_err(|e| fail(Phase::Setup, FailureKind::Local, "serial log").caused_by(e))?;
        let mut s = match Incoming::new(kvm, admission, a, opts, ctl) {
            Ok(s) => s,
            Err(e) => {
                on_early(&format!("session from {peer} could not start: {e}"));
                continue;
            }
        };
        match s.run(serial, on_early) {
            Ok(vm) => return Ok(vm),
            Err(Early::Retry(why)) => {
                ctl.source_connected.store(false, Ordering::SeqCst);
                on_early(&format!(
                    "session from {peer} ended before memory moved: {why}"
                ))
            }
            Err(Early::Fatal(e)) => return Err(e),
        }
    }
}

/// How the destination VM is being built: in the background during pre-copy, awaited at the
/// first barrier, consumed by the state.
enum VmBuild {
    Building(JoinHandle<Result<PreparedVm, String>>),
    Built(Box<PreparedVm>),
}

impl VmBuild {
    /// Waits for the build (once); the VM objects stay here.
    fn wait(self, phase: Phase) -> Result<PreparedVm, F> {
        match self {
            VmBuild::Built(p) => Ok(*p),
            VmBuild::Building(h) => match h.join() {
                Ok(Ok(p)) => Ok(p),
                Ok(Err(e)) => {
                    Err(fail(phase, FailureKind::Local, "cannot create the VM here").caused_by(e))
                }
                Err(_) => Err(fail(phase, FailureKind::Local, "creating the VM crashed")),
            },
        }
    }
}

/// Memory is moving: what pre-copy and the switchover work on.
struct Receiving {
    req: PreflightRequest,
    streams: u16,
    shared: Arc<StreamShared>,
    current_pass: Arc<AtomicU64>,
    _joins: Vec<JoinHandle<()>>,
    reader: BufReader<Conn>,
    buf: Vec<u8>,
}

/// One source's session.
struct Incoming<'a> {
    kvm: &'a kvm_ioctls::Kvm,
    admission: &'a mut Admission,
    control: Conn,
    /// The authenticated control connection, until the handshake accepts it.
    admitted: Option<Admitted>,
    opts: &'a ReceiveOptions,
    ctl: &'a ReceiveControl,
    t0: Instant,
    /// Agreed in the handshake.
    protocol: u32,
    session: u64,
}

impl<'a> Incoming<'a> {
    fn new(
        kvm: &'a kvm_ioctls::Kvm,
        admission: &'a mut Admission,
        admitted: Admitted,
        opts: &'a ReceiveOptions,
        ctl: &'a ReceiveControl,
    ) -> std::io::Result<Incoming<'a>> {
        let control = admitted.conn.try_clone()?;
        control.set_nodelay(true)?;
        control.set_read_timeout(Some(IDLE_TIMEOUT))?;
        control.set_write_timeout(Some(IDLE_TIMEOUT))?;
        Ok(Incoming {
            kvm,
            admission,
            control,
            admitted: Some(admitted),
            opts,
            ctl,
            t0: Instant::now(),
            protocol: *opts.protocols.end(),
            session: 0,
        })
    }

    fn run(&mut self, serial: ConsoleLog, on_early: &dyn Fn(&str)) -> Result<Vm, Early> {
        self.handshake()?;
        let req = self.preflight()?;
        let streams = self.await_begin()?;
        // From here on memory moves: every failure is final.
        let result = self.transfer(req, streams, serial, on_early);
        match &result {
            Err(f) => {
                let _ = wire::send_msg(&mut self.control, &wire::failure_msg(self.protocol, f));
                let _ = self.control.shutdown(std::net::Shutdown::Both);
            }
            Ok(_) => {
                // Resumed is sent. With an external decision the VM may have resumed on this
                // node's agent's word while the source's Commit is still on its way: close only
                // the sending side, so that the Commit arriving is taken (by the decision
                // reader, which then ends) instead of answered with a reset that could cost
                // the source the Resumed it has not read yet; the reader gives up after a
                // few seconds of a silent source.
                let _ = self.control.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = self.control.shutdown(std::net::Shutdown::Write);
            }
        }
        result.map_err(Early::Fatal)
    }

    fn transfer(
        &mut self,
        req: PreflightRequest,
        streams: u16,
        serial: ConsoleLog,
        on_early: &dyn Fn(&str),
    ) -> Result<Vm, F> {
        let (r, build) = self.setup(req, streams, on_early)?;
        let shared = r.shared.clone();
        let result = self.switchover(r, build, serial);
        // Stop the data stream threads: they end on EOF; shut the sockets down to be sure.
        {
            let mut e = shared.error.lock().unwrap_or_else(|e| e.into_inner());
            if e.is_none() {
                *e = Some("session over".into());
            }
        }
        if result.is_err() {
            for s in shared
                .sockets
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
            {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
        result
    }

    /// Pre-copy to resume.
    fn switchover(
        &mut self,
        mut r: Receiving,
        build: VmBuild,
        serial: ConsoleLog,
    ) -> Result<Vm, F> {
        let prepared = self.precopy(&mut r, build)?;
        let state = self.final_pages(&mut r)?;
        let vm = self.device_state(&r, prepared, &state, serial)?;
        self.commit(vm, r.reader)
    }

    fn recv(&mut self, phase: Phase) -> Result<Msg, Early> {
        wire::recv_msg(&mut self.control).map_err(|e| Early::Retry(wire_fail(phase)(e).reason()))
    }

    // -----------------------------------------------------------------------------------------
    // Phases before memory moves (a failure here waits for the next source)

    /// The connection was authenticated in admission (version, TLS identity, secret):
    /// accept it.
    fn handshake(&mut self) -> Result<(), Early> {
        self.ctl.phase(Phase::Handshake);
        self.ctl.source_connected.store(true, Ordering::SeqCst);
        let Some(mut a) = self.admitted.take() else {
            return Err(Early::Retry("no admitted connection".into()));
        };
        self.protocol = a.protocol;
        self.session = a.session;
        a.accept().map_err(|e| Early::Retry(e.to_string()))?;
        Ok(())
    }

    fn preflight(&mut self) -> Result<PreflightRequest, Early> {
        self.ctl.phase(Phase::Preflight);
        let req = match self.recv(Phase::Preflight)? {
            Msg::Preflight(r) => r,
            m => {
                return Err(Early::Retry(format!(
                    "protocol violation: expected Preflight, got {}",
                    m.name()
                )))
            }
        };
        let report = preflight::check(self.kvm, &req, &self.opts.limits);
        wire::send_msg(&mut self.control, &Msg::PreflightReport(report.clone()))
            .map_err(|e| Early::Retry(e.to_string()))?;
        if !report.ok {
            return Err(Early::Retry(format!(
                "preflight refused: {}",
                report.problems.join("; ")
            )));
        }
        Ok(req)
    }

    /// `Begin` starts the transfer; a dry run or a source that gives up ends the session.
    fn await_begin(&mut self) -> Result<u16, Early> {
        match self.recv(Phase::Preflight)? {
            Msg::Begin { streams, .. }
                if (1..=contract::migration::MAX_STREAMS).contains(&streams) =>
            {
                Ok(streams)
            }
            Msg::Begin { streams, .. } => Err(Early::Retry(format!(
                "protocol violation: {streams} data streams"
            ))),
            m if wire::peer_failure(&m).is_some() => {
                let (_, _, reason) = wire::peer_failure(&m).unwrap_or_default();
                Err(Early::Retry(format!("source ended the session: {reason}")))
            }
            m => Err(Early::Retry(format!(
                "protocol violation: expected Begin, got {}",
                m.name()
            ))),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Phases while memory moves (a failure here is final)

    /// RAM, the VM objects (in the background) and the data streams.
    fn setup(
        &mut self,
        req: PreflightRequest,
        streams: u16,
        on_early: &dyn Fn(&str),
    ) -> Result<(Receiving, VmBuild), F> {
        self.ctl.phase(Phase::Setup);
        // Measure this host's switchover share while the source opens its streams.
        let vcpus = req.config.vcpus;
        let measure = std::thread::spawn(move || crate::cost::restore_cost(vcpus));
        let ram = Arc::new(GuestRam::new(req.layout.clone()).map_err(|e| {
            fail(
                Phase::Setup,
                FailureKind::Local,
                "cannot allocate guest RAM",
            )
            .caused_by(e)
        })?);
        // The KVM VM, its vCPUs and devices are built while pre-copy runs; the state only has
        // to be loaded into them at switchover.
        let host = vmm::devices::virtio::HostDevices::for_nics(
            &self.opts.limits.net_backends,
            req.config.nics.len(),
        )
        .map_err(|e| fail(Phase::Setup, FailureKind::Local, e))?;
        let build = {
            let (config, cpuid, ram) = (req.config.clone(), req.cpuid.clone(), ram.clone());
            std::thread::spawn(move || {
                let kvm = vmm::open_kvm().map_err(|e| e.to_string())?;
                Vm::prepare(&kvm, &config, &cpuid, ram, &host).map_err(|e| e.to_string())
            })
        };
        let restore_us = match measure.join() {
            Ok(Ok(us)) => us,
            Ok(Err(e)) => {
                return Err(
                    fail(Phase::Setup, FailureKind::Local, "cannot create a VM here").caused_by(e),
                )
            }
            Err(_) => {
                return Err(fail(
                    Phase::Setup,
                    FailureKind::Local,
                    "the switchover cost measurement crashed",
                ))
            }
        };
        let shared = Arc::new(StreamShared {
            sockets: Mutex::new(self.control.tcp().try_clone().into_iter().collect()),
            applied: (0..streams).map(|_| AtomicU64::new(0)).collect(),
            error: Mutex::new(None),
            cv: Condvar::new(),
            lock: Mutex::new(()),
            bytes: AtomicU64::new(0),
            pages: AtomicU64::new(0),
        });
        let current_pass = Arc::new(AtomicU64::new(0));
        let joins = self.accept_streams(streams, &ram, &shared, &current_pass, on_early)?;
        wire::send_msg(&mut self.control, &Msg::BeginAck { restore_us })
            .map_err(wire_fail(Phase::Setup))?;
        let reader = BufReader::with_capacity(
            1 << 20,
            self.control
                .try_clone()
                .map_err(|e| fail(Phase::Setup, FailureKind::Local, "socket").caused_by(e))?,
        );
        let r = Receiving {
            req,
            streams,
            shared,
            current_pass,
            _joins: joins,
            reader,
            buf: Vec::new(),
        };
        Ok((r, VmBuild::Building(build)))
    }

    /// Accepts the session's data connections (each, authenticated in admission, names this
    /// session and an unused stream index; anything else is refused).
    fn accept_streams(
        &mut self,
        streams: u16,
        ram: &Arc<GuestRam>,
        shared: &Arc<StreamShared>,
        current_pass: &Arc<AtomicU64>,
        on_early: &dyn Fn(&str),
    ) -> Result<Vec<JoinHandle<()>>, F> {
        let setup_err = |what: &str, e: std::io::Error| {
            fail(Phase::Setup, FailureKind::Local, what.to_string()).caused_by(e)
        };
        let total_pages = ram.layout().total_pages();
        let mut joins = Vec::new();
        let mut seen = vec![false; streams as usize];
        let deadline = Instant::now() + STREAMS_TIMEOUT;
        while seen.iter().any(|s| !s) {
            let mut a = match self.admission.next(Some(deadline), on_early) {
                Ok(Some(a)) => a,
                Ok(None) => {
                    return Err(fail(
                        Phase::Setup,
                        FailureKind::PeerLost,
                        "the source did not open its data streams",
                    ))
                }
                Err(e) => return Err(setup_err("accept failed", e)),
            };
            let index = match a.role {
                Role::Data { index }
                    if a.protocol == self.protocol
                        && a.session == self.session
                        && (index as usize) < seen.len()
                        && !seen[index as usize] =>
                {
                    index
                }
                _ => {
                    on_early(&format!(
                        "connection from {} refused: busy with another migration",
                        a.peer
                    ));
                    a.refuse("busy with another migration");
                    continue;
                }
            };
            a.conn
                .set_read_timeout(Some(IDLE_TIMEOUT))
                .map_err(|e| setup_err("socket", e))?;
            a.accept().map_err(wire_fail(Phase::Setup))?;
            seen[index as usize] = true;
            if let Ok(c) = a.conn.tcp().try_clone() {
                shared
                    .sockets
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(c);
            }
            let (ram, sh, cp) = (ram.clone(), shared.clone(), current_pass.clone());
            let s = a.conn;
            let j = std::thread::Builder::new()
                .name(format!("mig-rx{index}"))
                .spawn(move || {
                    stream_rx(
                        s,
                        index as usize,
                        streams as usize,
                        ram,
                        total_pages,
                        sh,
                        cp,
                    )
                })
                .map_err(|e| setup_err("cannot start a stream thread", e))?;
            joins.push(j);
        }
        Ok(joins)
    }

    /// The next control frame on the session reader: `Ok(None)` for a STATE frame (left in
    /// `r.buf`), `Ok(Some(msg))` for a control message. A data stream failure shuts the control
    /// connection down: then its cause is reported.
    fn next_frame(&mut self, r: &mut Receiving, phase: Phase) -> Result<Option<Msg>, F> {
        loop {
            let kind = match wire::read_frame_into(&mut r.reader, &mut r.buf) {
                Ok((k, _)) => k,
                Err(e) => {
                    let stream_err = r
                        .shared
                        .error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone();
                    return Err(match stream_err {
                        Some(se) => fail(phase, FailureKind::PeerLost, se),
                        None => wire_fail(phase)(e),
                    });
                }
            };
            if kind == wire::KIND_STATE {
                return Ok(None);
            }
            let msg = wire::decode_msg(&wire::Frame {
                kind,
                flags: 0,
                payload: std::mem::take(&mut r.buf),
            })
            .map_err(|e| {
                fail(phase, FailureKind::Protocol, "undecodable control message").caused_by(e)
            })?;
            if let Some((p, _, reason)) = wire::peer_failure(&msg) {
                return Err(fail(
                    phase,
                    FailureKind::PeerAborted,
                    format!("the source gave up in {p}: {reason}"),
                ));
            }
            if msg != Msg::Ping {
                return Ok(Some(msg));
            }
        }
    }

    /// The per-pass barrier: waits until every frame of the pass is applied, then acknowledges.
    fn barrier(&mut self, r: &Receiving, phase: Phase, pass: u32, frames: &[u64]) -> Result<(), F> {
        if frames.len() != r.streams as usize {
            return Err(fail(
                phase,
                FailureKind::Protocol,
                "protocol violation: PassDone for the wrong number of streams",
            ));
        }
        r.current_pass.store(pass as u64, Ordering::SeqCst);
        wait_applied(&r.shared, frames).map_err(|e| fail(phase, FailureKind::PeerLost, e))?;
        {
            let mut p = self.ctl.progress.lock().unwrap_or_else(|e| e.into_inner());
            p.pass = pass;
            p.pages_sent = r.shared.pages.load(Ordering::Relaxed);
            p.bytes_sent = r.shared.bytes.load(Ordering::Relaxed);
            p.elapsed_s = self.t0.elapsed().as_secs_f64();
        }
        r.current_pass.store(pass as u64 + 1, Ordering::SeqCst);
        wire::send_msg(&mut self.control, &Msg::PassAck { pass }).map_err(wire_fail(phase))?;
        Ok(())
    }

    /// Pass after pass until the source says it paused. The VM objects must be complete before
    /// the source may pause: that is waited for at the first barrier, so it never counts as
    /// downtime.
    fn precopy(&mut self, r: &mut Receiving, build: VmBuild) -> Result<PreparedVm, F> {
        self.ctl.phase(Phase::Precopy);
        let mut vm = build;
        loop {
            match self.next_frame(r, Phase::Precopy)? {
                Some(Msg::PassDone { pass, frames, .. }) => {
                    vm = VmBuild::Built(Box::new(vm.wait(Phase::Precopy)?));
                    self.barrier(r, Phase::Precopy, pass, &frames)?;
                }
                Some(Msg::Paused) => {
                    let p = vm.wait(Phase::Pause)?;
                    // The source stopped its VM: from now on frames for it are better queued in
                    // this host's TAPs (delivered after the resume) than at the source, whose TAP
                    // is drained into the device state only once. If the switchover fails, the
                    // source announces again when it resumes.
                    p.virtio().announce_once();
                    return Ok(p);
                }
                Some(m) => return Err(violation(Phase::Precopy, &m)),
                None => {
                    return Err(fail(
                        Phase::Precopy,
                        FailureKind::Protocol,
                        "protocol violation: VM state before the source paused",
                    ))
                }
            }
        }
    }

    /// The last pages, until the state frame arrives (returned).
    fn final_pages(&mut self, r: &mut Receiving) -> Result<Vec<u8>, F> {
        self.ctl.phase(Phase::FinalPages);
        loop {
            match self.next_frame(r, Phase::FinalPages)? {
                Some(Msg::PassDone { pass, frames, .. }) => {
                    self.barrier(r, Phase::FinalPages, pass, &frames)?
                }
                Some(m) => return Err(violation(Phase::FinalPages, &m)),
                None => return Ok(std::mem::take(&mut r.buf)),
            }
        }
    }

    /// Loads the state into the prepared VM, takes the disks, says Ready.
    fn device_state(
        &mut self,
        r: &Receiving,
        prepared: PreparedVm,
        state: &[u8],
        serial: ConsoleLog,
    ) -> Result<Vm, F> {
        let phase = Phase::DeviceState;
        self.ctl.phase(phase);
        let t = Instant::now();
        // In the version the source announced (and preflight accepted).
        let st = vmm::snapshot::decode_state(r.req.state_version, state)
            .map_err(|e| fail(phase, FailureKind::Protocol, "undecodable VM state").caused_by(e))?;
        if st.config != r.req.config || st.layout != r.req.layout {
            return Err(fail(
                phase,
                FailureKind::Protocol,
                "the VM state does not match the preflighted configuration",
            ));
        }
        let since_save_ms = st.platform.elapsed_since_save(vmm::vm::realtime_ns()) as f64 / 1e6;
        let vm = prepared
            .finish(&st, serial, vmm::vm::GuestTime::Elapsed)
            .map_err(|e| {
                fail(phase, FailureKind::Local, "cannot restore the VM here").caused_by(e)
            })?;
        // What the guest sees of its pause is this plus the wait for the commit.
        eprintln!(
            "ferry-vmm: guest clocks moved on by {since_save_ms:.1} ms (the time since the source saved them)"
        );
        // vCPU threads exist but stay parked until the commit.
        vm.start_paused().map_err(|e| {
            fail(phase, FailureKind::Local, "cannot start vCPU threads").caused_by(e)
        })?;
        // The source flushed and released the disks before sending the state: take them now, so
        // that Ready means "can run here".
        vm.acquire_storage(Duration::from_secs(5))
            .map_err(|e| fail(phase, FailureKind::Local, "cannot take the disks").caused_by(e))?;
        // Frames for the VM queue in this host's TAPs (delivered after the resume).
        vm.virtio().announce_once();
        let restore_us = t.elapsed().as_micros() as u64;
        wire::send_msg(&mut self.control, &Msg::Ready { restore_us }).map_err(wire_fail(phase))?;
        Ok(vm)
    }

    /// Waits for the commit: the source's `Commit`, or (external decision) the agent's word.
    fn commit(&mut self, vm: Vm, reader: BufReader<Conn>) -> Result<Vm, F> {
        self.ctl.phase(Phase::Ready);
        let commit = match &self.opts.external {
            Some(ext) => {
                self.ctl.awaiting_decision.store(true, Ordering::SeqCst);
                let d = decision::await_decision(reader, ext, &self.ctl.source_connected);
                self.ctl.awaiting_decision.store(false, Ordering::SeqCst);
                d
            }
            None => {
                let mut reader = reader;
                let mut buf = Vec::new();
                loop {
                    match decision::read_decision(&mut reader, &mut buf) {
                        Ok(Some(d)) => break d,
                        Ok(None) => continue,
                        Err(e) => return Err(e),
                    }
                }
            }
        };
        if !commit {
            return Err(fail(
                Phase::Ready,
                FailureKind::PeerAborted,
                "the migration was aborted before the commit",
            ));
        }
        self.resume(vm)
    }

    /// Resumes the received VM and tells the source (best effort: after the commit the source's
    /// fate does not matter).
    fn resume(&mut self, vm: Vm) -> Result<Vm, F> {
        self.ctl.phase(Phase::Commit);
        let t = Instant::now();
        if let Some(BeforeResume(f)) = &self.opts.before_resume {
            f();
        }
        if let Err(e) = vm.resume() {
            let mut f =
                fail(Phase::Commit, FailureKind::Local, "cannot resume the VM").caused_by(e);
            f.commit = contract::CommitPoint::After;
            f.source_running = false;
            return Err(f);
        }
        // Tell the network where the VM is now.
        vm.virtio().announce();
        // Report "resumed" only once every vCPU is back in the guest loop, so the downtime the
        // source reports covers the whole pause the guest sees.
        vm.wait_running(Duration::from_secs(1));
        let resume_us = t.elapsed().as_micros() as u64;
        let _ = wire::send_msg(&mut self.control, &Msg::Resumed { resume_us });
        self.ctl.phase(Phase::Resumed);
        Ok(vm)
    }
}
