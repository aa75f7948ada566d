//! The destination side of a live migration.
//!
//! State machine: `AwaitHello → AwaitPreflight → AwaitBegin → Precopy (PassDone/PassAck
//! barriers) → AwaitVmState → Ready (VM restored, not running) → Running`. A handshake refusal,
//! a refused preflight or a dry run ends the session before any memory moved, and the
//! destination goes back to waiting for the next source. From `Precopy` on, any failure
//! (malformed or out-of-order message, lost connection, Abort from the source) discards
//! everything and is final.

use crate::preflight::{self, DestinationLimits, PreflightRequest};
use crate::wire::{self, Msg, Role, WireError};
use crate::{MigrationError, Phase, Progress};
use std::fs::File;
use std::io::BufReader;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use vmm::memory::{GuestRam, PAGE_SIZE};
use vmm::Vm;

/// Destination options.
#[derive(Debug, Clone, Default)]
pub struct ReceiveOptions {
    pub limits: DestinationLimits,
    /// In a cluster the commit point is the store's ownership change, not the source's word:
    /// once Ready, this destination also accepts the decision from here (its agent), and if the
    /// source disappears it waits for it instead of discarding the VM.
    pub external: Option<Arc<Decision>>,
}

/// A commit/abort decision made outside the migration stream.
#[derive(Debug, Default)]
pub struct Decision {
    state: Mutex<Option<bool>>,
    cv: Condvar,
}

impl Decision {
    /// Records the decision (the first one wins); returns the one in force.
    pub fn set(&self, commit: bool) -> bool {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let d = *g.get_or_insert(commit);
        self.cv.notify_all();
        d
    }

    /// The decision, if one was made.
    pub fn get(&self) -> Option<bool> {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait(&self, timeout: Duration) -> Option<bool> {
        let g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |d| d.is_none())
            .unwrap_or_else(|e| e.into_inner());
        *g
    }
}

/// How long the destination waits for the source between messages before giving up.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long to wait for the data connections after `Begin`.
const STREAMS_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecvState {
    AwaitHello,
    AwaitPreflight,
    AwaitBegin,
    Precopy,
    AwaitVmState,
    Ready,
}

impl RecvState {
    fn phase(self) -> Phase {
        match self {
            RecvState::AwaitHello => Phase::Handshake,
            RecvState::AwaitPreflight | RecvState::AwaitBegin => Phase::Preflight,
            RecvState::Precopy => Phase::Precopy,
            RecvState::AwaitVmState => Phase::State,
            RecvState::Ready => Phase::Commit,
        }
    }
}

/// Progress of the receiving side (for `ctl status`).
#[derive(Default)]
pub struct ReceiveControl {
    pub progress: Mutex<Progress>,
}

struct StreamShared {
    /// Every connection of the session: a failing data stream shuts them all down, so that the
    /// control loop and the source learn about it at once instead of at the next barrier.
    sockets: Mutex<Vec<TcpStream>>,
    applied: Vec<AtomicU64>,
    error: Mutex<Option<String>>,
    cv: Condvar,
    lock: Mutex<()>,
    bytes: AtomicU64,
    pages: AtomicU64,
}

/// Outcome of one session that ended before memory moved.
enum Early {
    /// Try again with the next source.
    Retry(String),
    /// Final failure.
    Fatal(MigrationError),
}

fn err(phase: Phase, reason: impl Into<String>) -> MigrationError {
    MigrationError {
        phase,
        reason: reason.into(),
        vm_on_source: true,
    }
}

fn wire_err(phase: Phase) -> impl Fn(WireError) -> MigrationError {
    move |e| {
        let reason = match e {
            WireError::Eof => "the source closed the connection".to_string(),
            other => other.to_string(),
        };
        err(phase, reason)
    }
}

/// Waits for a source on `listener` and receives one VM. Sessions that end before memory moves
/// (refused version, refused preflight, dry run) are reported through `on_early` and the
/// destination keeps listening. Returns the running VM.
pub fn receive(
    kvm: &kvm_ioctls::Kvm,
    listener: &TcpListener,
    opts: &ReceiveOptions,
    serial: File,
    ctl: &ReceiveControl,
    on_early: &dyn Fn(&str),
) -> Result<Vm, MigrationError> {
    loop {
        let (sock, peer) = listener
            .accept()
            .map_err(|e| err(Phase::Connect, format!("accept failed: {e}")))?;
        let _ = sock.set_nodelay(true);
        let serial = serial
            .try_clone()
            .map_err(|e| err(Phase::Setup, e.to_string()))?;
        match session(kvm, listener, sock, opts, serial, ctl) {
            Ok(vm) => return Ok(vm),
            Err(Early::Retry(why)) => on_early(&format!(
                "session from {peer} ended before memory moved: {why}"
            )),
            Err(Early::Fatal(e)) => return Err(e),
        }
    }
}

fn set_phase(ctl: &ReceiveControl, phase: &str) {
    ctl.progress.lock().unwrap_or_else(|e| e.into_inner()).phase = phase.to_string();
}

fn session(
    kvm: &kvm_ioctls::Kvm,
    listener: &TcpListener,
    mut control: TcpStream,
    opts: &ReceiveOptions,
    serial: File,
    ctl: &ReceiveControl,
) -> Result<Vm, Early> {
    let t0 = Instant::now();
    let retry = |e: MigrationError| Early::Retry(e.reason);
    let mut state = RecvState::AwaitHello;
    control
        .set_read_timeout(Some(IDLE_TIMEOUT))
        .map_err(|e| Early::Retry(e.to_string()))?;
    set_phase(ctl, "handshake");

    // Handshake.
    let session = match wire::recv_msg(&mut control)
        .map_err(wire_err(state.phase()))
        .map_err(retry)?
    {
        Msg::Hello {
            protocol,
            session,
            role: Role::Control,
        } => {
            if protocol != wire::PROTOCOL_VERSION {
                let reason = format!(
                    "protocol version {protocol} is not supported (this destination speaks version {})",
                    wire::PROTOCOL_VERSION
                );
                let _ = wire::send_msg(
                    &mut control,
                    &Msg::Refuse {
                        reason: reason.clone(),
                    },
                );
                return Err(Early::Retry(reason));
            }
            session
        }
        m => {
            let reason = format!(
                "protocol violation: expected a control Hello, got {}",
                m.name()
            );
            let _ = wire::send_msg(
                &mut control,
                &Msg::Refuse {
                    reason: reason.clone(),
                },
            );
            return Err(Early::Retry(reason));
        }
    };
    wire::send_msg(
        &mut control,
        &Msg::HelloAck {
            protocol: wire::PROTOCOL_VERSION,
        },
    )
    .map_err(wire_err(state.phase()))
    .map_err(retry)?;
    state = RecvState::AwaitPreflight;

    // Preflight.
    set_phase(ctl, "preflight");
    let req: PreflightRequest = match wire::recv_msg(&mut control)
        .map_err(wire_err(state.phase()))
        .map_err(retry)?
    {
        Msg::Preflight(r) => r,
        m => {
            return Err(Early::Retry(format!(
                "protocol violation: expected Preflight, got {}",
                m.name()
            )))
        }
    };
    let report = preflight::check(kvm, &req, &opts.limits);
    wire::send_msg(&mut control, &Msg::PreflightReport(report.clone()))
        .map_err(wire_err(state.phase()))
        .map_err(retry)?;
    if !report.ok {
        return Err(Early::Retry(format!(
            "preflight refused: {}",
            report.problems.join("; ")
        )));
    }
    // Measure this host's switchover share while the source gets ready.
    let vcpus = req.config.vcpus;
    let measure = std::thread::spawn(move || preflight::restore_cost(vcpus));
    state = RecvState::AwaitBegin;
    let (streams, _compression) = match wire::recv_msg(&mut control)
        .map_err(wire_err(state.phase()))
        .map_err(retry)?
    {
        Msg::Begin {
            streams,
            compression,
        } if (1..=16).contains(&streams) => (streams, compression),
        Msg::Begin { streams, .. } => {
            return Err(Early::Retry(format!(
                "protocol violation: {streams} data streams"
            )))
        }
        Msg::Abort { reason, .. } => {
            return Err(Early::Retry(format!("source ended the session: {reason}")))
        }
        m => {
            return Err(Early::Retry(format!(
                "protocol violation: expected Begin, got {}",
                m.name()
            )))
        }
    };

    // From here on memory moves: every failure is final.
    state = RecvState::Precopy;
    let fatal = Early::Fatal;
    set_phase(ctl, "setup");
    let ram = Arc::new(
        GuestRam::new(req.layout.clone()).map_err(|e| fatal(err(Phase::Setup, e.to_string())))?,
    );
    // The KVM VM, its vCPUs and devices are built while pre-copy runs; the state only has to
    // be loaded into them at switchover.
    let host = vmm::devices::virtio::HostDevices::for_nics(
        &opts.limits.net_backends,
        req.config.nics.len(),
    )
    .map_err(|e| fatal(err(Phase::Setup, e)))?;
    let prepare = {
        let (config, cpuid, ram) = (req.config.clone(), req.cpuid.clone(), ram.clone());
        std::thread::spawn(move || {
            let kvm = vmm::open_kvm().map_err(|e| e.to_string())?;
            Vm::prepare(&kvm, &config, &cpuid, ram, &host).map_err(|e| e.to_string())
        })
    };
    let restore_us = match measure.join() {
        Ok(Ok(us)) => us,
        Ok(Err(e)) => {
            return Err(fatal(err(
                Phase::Setup,
                format!("cannot create a VM here: {e}"),
            )))
        }
        Err(_) => {
            return Err(fatal(err(
                Phase::Setup,
                "the switchover cost measurement crashed",
            )))
        }
    };
    let total_pages = req.layout.total_pages();
    let shared = Arc::new(StreamShared {
        sockets: Mutex::new(control.try_clone().into_iter().collect()),
        applied: (0..streams).map(|_| AtomicU64::new(0)).collect(),
        error: Mutex::new(None),
        cv: Condvar::new(),
        lock: Mutex::new(()),
        bytes: AtomicU64::new(0),
        pages: AtomicU64::new(0),
    });
    let current_pass = Arc::new(AtomicU64::new(0));
    let mut joins = Vec::new();
    let mut seen = vec![false; streams as usize];
    listener
        .set_nonblocking(true)
        .map_err(|e| fatal(err(Phase::Setup, e.to_string())))?;
    let deadline = Instant::now() + STREAMS_TIMEOUT;
    let accept_result = (|| -> Result<(), MigrationError> {
        while seen.iter().any(|s| !s) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false)
                        .map_err(|e| err(Phase::Setup, e.to_string()))?;
                    let _ = s.set_nodelay(true);
                    s.set_read_timeout(Some(IDLE_TIMEOUT))
                        .map_err(|e| err(Phase::Setup, e.to_string()))?;
                    match wire::recv_msg(&mut s).map_err(wire_err(Phase::Setup))? {
                        Msg::Hello {
                            protocol,
                            session: sid,
                            role: Role::Data { index },
                        } if protocol == wire::PROTOCOL_VERSION
                            && sid == session
                            && (index as usize) < seen.len()
                            && !seen[index as usize] =>
                        {
                            wire::send_msg(&mut s, &Msg::HelloAck { protocol })
                                .map_err(wire_err(Phase::Setup))?;
                            seen[index as usize] = true;
                            if let Ok(c) = s.try_clone() {
                                shared
                                    .sockets
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .push(c);
                            }
                            let (ram, sh, cp) = (ram.clone(), shared.clone(), current_pass.clone());
                            let j = std::thread::Builder::new()
                                .name(format!("mig-rx{index}"))
                                .spawn(move || {
                                    stream_rx(s, index as usize, ram, total_pages, sh, cp)
                                })
                                .map_err(|e| err(Phase::Setup, e.to_string()))?;
                            joins.push(j);
                        }
                        _ => {
                            let _ = wire::send_msg(
                                &mut s,
                                &Msg::Refuse {
                                    reason: "busy with another migration".into(),
                                },
                            );
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(err(
                            Phase::Setup,
                            "the source did not open its data streams",
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(err(Phase::Setup, format!("accept failed: {e}"))),
            }
        }
        Ok(())
    })();
    let _ = listener.set_nonblocking(false);
    accept_result.map_err(fatal)?;
    wire::send_msg(&mut control, &Msg::BeginAck { restore_us })
        .map_err(wire_err(Phase::Setup))
        .map_err(fatal)?;

    // Control loop.
    let mut control_r = Some(BufReader::with_capacity(
        1 << 20,
        control
            .try_clone()
            .map_err(|e| fatal(err(Phase::Setup, e.to_string())))?,
    ));
    let mut vm: Option<Vm> = None;
    let mut prepare = Some(prepare);
    let mut prepared: Option<vmm::vm::PreparedVm> = None;
    let mut serial = Some(serial);
    let mut buf = Vec::new();
    let result = loop {
        set_phase(ctl, &state.phase().to_string());
        if state == RecvState::Ready {
            if let Some(ext) = opts.external.clone() {
                // From here the decision may come from the source (Commit/Abort) or from this
                // node's agent; if the source is lost, only the agent can decide.
                let reader = control_r.take().expect("control reader");
                match await_decision(reader, &ext, ctl) {
                    true => {
                        let v = vm.take().expect("restored VM");
                        break resume(v, &mut control, ctl);
                    }
                    false => {
                        break Err(err(
                            Phase::Commit,
                            "the migration was aborted before the commit",
                        ))
                    }
                }
            }
        }
        let (kind, _) =
            match wire::read_frame_into(control_r.as_mut().expect("control reader"), &mut buf) {
                Ok(k) => k,
                Err(e) => {
                    // A data stream failure shuts the control connection down: report its cause.
                    let stream_err = shared
                        .error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone();
                    break Err(match stream_err {
                        Some(se) => err(state.phase(), se),
                        None => wire_err(state.phase())(e),
                    });
                }
            };
        if kind == wire::KIND_STATE {
            if state != RecvState::AwaitVmState {
                break Err(err(
                    state.phase(),
                    "protocol violation: VM state out of order",
                ));
            }
            let t = Instant::now();
            // In the version the source announced (and preflight accepted).
            let st = match vmm::snapshot::decode_state(req.state_version, &buf) {
                Ok(s) => s,
                Err(e) => break Err(err(Phase::State, e.to_string())),
            };
            if st.config != req.config || st.layout != req.layout {
                break Err(err(
                    Phase::State,
                    "the VM state does not match the preflighted configuration",
                ));
            }
            let p = match (prepared.take(), prepare.take()) {
                (Some(p), _) => p,
                (None, Some(handle)) => match handle.join() {
                    Ok(Ok(p)) => p,
                    Ok(Err(e)) => {
                        break Err(err(Phase::State, format!("cannot create the VM here: {e}")))
                    }
                    Err(_) => break Err(err(Phase::State, "creating the VM crashed")),
                },
                (None, None) => {
                    break Err(err(Phase::State, "protocol violation: VM state sent twice"))
                }
            };
            match p.finish(&st, serial.take().expect("serial used once")) {
                Ok(v) => {
                    // vCPU threads exist but stay parked until the commit.
                    if let Err(e) = v.start_paused() {
                        break Err(err(Phase::State, format!("cannot start vCPU threads: {e}")));
                    }
                    // The source flushed and released the disks before sending the state:
                    // take them now, so that Ready means "can run here".
                    if let Err(e) = v.acquire_storage(Duration::from_secs(5)) {
                        break Err(err(Phase::State, format!("cannot take the disks: {e}")));
                    }
                    vm = Some(v);
                }
                Err(e) => {
                    break Err(err(
                        Phase::State,
                        format!("cannot restore the VM here: {e}"),
                    ))
                }
            }
            // Frames for the VM now queue in this host's TAPs (delivered after the resume)
            // rather than reaching the paused source, where they would be lost; if the source
            // resumes after all, it announces again.
            if let Some(v) = &vm {
                v.virtio().announce_once();
            }
            let restore_us = t.elapsed().as_micros() as u64;
            if let Err(e) = wire::send_msg(&mut control, &Msg::Ready { restore_us }) {
                break Err(wire_err(Phase::State)(e));
            }
            state = RecvState::Ready;
            continue;
        }
        let msg = match wire::decode_msg(&wire::Frame {
            kind,
            flags: 0,
            payload: std::mem::take(&mut buf),
        }) {
            Ok(m) => m,
            Err(e) => break Err(err(state.phase(), e.to_string())),
        };
        match (state, msg) {
            (_, Msg::Ping) => {}
            (
                RecvState::Precopy | RecvState::AwaitVmState,
                Msg::PassDone {
                    pass,
                    frames,
                    pages,
                },
            ) => {
                if frames.len() != streams as usize {
                    break Err(err(
                        state.phase(),
                        "protocol violation: PassDone for the wrong number of streams",
                    ));
                }
                current_pass.store(pass as u64, Ordering::SeqCst);
                // The VM must be fully built before the source may pause it: finish that here,
                // at a pre-copy barrier, so it never counts as downtime.
                if state == RecvState::Precopy {
                    if let Some(handle) = prepare.take() {
                        match handle.join() {
                            Ok(Ok(p)) => prepared = Some(p),
                            Ok(Err(e)) => {
                                break Err(err(
                                    Phase::Precopy,
                                    format!("cannot create the VM here: {e}"),
                                ))
                            }
                            Err(_) => break Err(err(Phase::Precopy, "creating the VM crashed")),
                        }
                    }
                }
                if let Err(e) = wait_applied(&shared, &frames) {
                    break Err(err(state.phase(), e));
                }
                {
                    let mut p = ctl.progress.lock().unwrap_or_else(|e| e.into_inner());
                    p.pass = pass;
                    p.pages_sent = shared.pages.load(Ordering::Relaxed);
                    p.bytes_sent = shared.bytes.load(Ordering::Relaxed);
                    p.elapsed_s = t0.elapsed().as_secs_f64();
                    let _ = pages;
                }
                current_pass.store(pass as u64 + 1, Ordering::SeqCst);
                if let Err(e) = wire::send_msg(&mut control, &Msg::PassAck { pass }) {
                    break Err(wire_err(state.phase())(e));
                }
            }
            (RecvState::Precopy, Msg::Paused) => {
                // The source stopped its VM: from now on frames for it are better queued in
                // this host's TAPs (delivered after the resume) than at the source, whose TAP
                // is drained into the device state only once. Announce the MACs now; if the
                // switchover fails, the source announces again when it resumes.
                if let Some(p) = &prepared {
                    p.virtio().announce_once();
                }
                state = RecvState::AwaitVmState
            }
            (RecvState::Ready, Msg::Commit) => {
                let v = vm.take().expect("restored VM");
                break resume(v, &mut control, ctl);
            }
            (_, Msg::Abort { phase, reason }) => {
                break Err(err(
                    state.phase(),
                    format!("the source aborted in {phase}: {reason}"),
                ))
            }
            (s, m) => {
                break Err(err(
                    s.phase(),
                    format!("protocol violation: unexpected {} in state {s:?}", m.name()),
                ))
            }
        }
    };
    // Stop the data stream threads (they end on EOF; shut the sockets down to be sure).
    drop(control_r);
    let _ = control.shutdown(std::net::Shutdown::Both);
    {
        let mut e = shared.error.lock().unwrap_or_else(|e| e.into_inner());
        if e.is_none() {
            *e = Some("session over".into());
        }
    }
    match result {
        Ok(v) => {
            // Data streams are closed by the source when it finishes; do not wait for them.
            drop(joins);
            Ok(v)
        }
        Err(e) => {
            drop(vm); // never started
            let _ = wire::send_msg(
                &mut control,
                &Msg::Abort {
                    phase: e.phase.to_string(),
                    reason: e.reason.clone(),
                },
            );
            Err(Early::Fatal(e))
        }
    }
}

/// Resumes the received VM and tells the source (best effort: after the commit the source's
/// fate does not matter).
fn resume(v: Vm, control: &mut TcpStream, ctl: &ReceiveControl) -> Result<Vm, MigrationError> {
    let t = Instant::now();
    if let Err(e) = v.resume() {
        return Err(err(Phase::Commit, format!("cannot resume the VM: {e}")));
    }
    // Report "resumed" only once every vCPU is back in the guest loop, so the downtime the
    // source reports covers the whole pause the guest sees.
    // Tell the network where the VM is now.
    v.virtio().announce();
    v.wait_running(Duration::from_secs(1));
    let resume_us = t.elapsed().as_micros() as u64;
    let _ = wire::send_msg(control, &Msg::Resumed { resume_us });
    set_phase(ctl, "done");
    Ok(v)
}

/// Waits, in Ready state with an external decision maker, for Commit/Abort from the source or
/// a decision from `ext`. A lost source does not decide anything: only `ext` can then.
fn await_decision(
    mut reader: BufReader<TcpStream>,
    ext: &Arc<Decision>,
    ctl: &ReceiveControl,
) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let r = loop {
            match wire::read_frame_into(&mut reader, &mut buf) {
                Ok((wire::KIND_CONTROL, _)) => {
                    match wire::decode_msg(&wire::Frame {
                        kind: wire::KIND_CONTROL,
                        flags: 0,
                        payload: buf.clone(),
                    }) {
                        Ok(Msg::Ping) => continue,
                        Ok(Msg::Commit) => break Some(true),
                        Ok(Msg::Abort { .. }) => break Some(false),
                        _ => break None,
                    }
                }
                _ => break None,
            }
        };
        let _ = tx.send(r);
    });
    loop {
        if let Some(d) = ext.get() {
            return d;
        }
        match rx.recv_timeout(Duration::from_millis(5)) {
            Ok(Some(d)) => return ext.set(d),
            Ok(None) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                // The source is gone or spoke nonsense: wait for this node's agent, however long.
                set_phase(ctl, "awaiting commit decision");
                loop {
                    if let Some(d) = ext.wait(Duration::from_secs(1)) {
                        return d;
                    }
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
}

fn wait_applied(shared: &StreamShared, frames: &[u64]) -> Result<(), String> {
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

fn stream_rx(
    sock: TcpStream,
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
