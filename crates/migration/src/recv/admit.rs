//! Admission: every incoming connection is authenticated on a thread of its own before the
//! receiver sees it, so that a stranger can neither block nor end the wait for the real
//! source.
//!
//! Per connection, within [`HANDSHAKE_TIMEOUT`] in total (a watchdog shuts the socket down
//! when it passes): the TLS handshake (the peer's certificate must chain to the cluster CA
//! and name the expected source node), the `Hello` (version check), and from v4 on `Auth`
//! with the one-time secret (constant-time comparison). Frames before that are limited to
//! [`wire::PRE_AUTH_MAX_PAYLOAD`] bytes. At most [`MAX_PENDING`] connections are in admission
//! at once; more are closed at once. A refused connection is told why (`Refuse`, or a TLS
//! alert) and reported through `on_early`; the receiver goes on waiting.
//!
//! The secret admits one control session: the first that presents it spends it, and any
//! later one presenting it is refused as a replay.

use crate::wire::{self, Msg, Role};
use contract::trust::MigrationSecret;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use trust::tls::ServerConfig;
use trust::Conn;

/// Longest time from accept to an authenticated Hello.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections in admission at once.
pub const MAX_PENDING: usize = 16;

/// A connection that passed admission; it still waits for this side's final word
/// ([`Admitted::accept`] or [`Admitted::refuse`]).
pub(super) struct Admitted {
    pub(super) conn: Conn,
    pub(super) peer: SocketAddr,
    pub(super) protocol: u32,
    pub(super) session: u64,
    pub(super) role: Role,
}

impl Admitted {
    /// Accepts the connection: `AuthOk` (v4) or `HelloAck` (older versions, which have no
    /// authentication step).
    pub(super) fn accept(&mut self) -> Result<u64, wire::WireError> {
        if self.protocol >= wire::AUTH_PROTOCOL_VERSION {
            wire::send_msg(&mut self.conn, &Msg::AuthOk)
        } else {
            wire::send_msg(
                &mut self.conn,
                &Msg::HelloAck {
                    protocol: self.protocol,
                },
            )
        }
    }

    pub(super) fn refuse(mut self, reason: &str) {
        let _ = wire::send_msg(
            &mut self.conn,
            &Msg::Refuse {
                reason: reason.to_string(),
            },
        );
    }
}

struct Pending {
    tcp: TcpStream,
    deadline: Instant,
    done: Arc<AtomicBool>,
}

/// What admission needs to know.
#[derive(Clone)]
pub(super) struct Policy {
    pub(super) tls: Option<Arc<ServerConfig>>,
    pub(super) secret: Option<MigrationSecret>,
    pub(super) protocols: RangeInclusive<u32>,
}

pub(super) struct Admission {
    listener: TcpListener,
    policy: Policy,
    /// Who spent the secret (the first authenticated control session).
    spent: Arc<Mutex<Option<SocketAddr>>>,
    tx: Sender<Result<Admitted, String>>,
    rx: Receiver<Result<Admitted, String>>,
    pending: Vec<Pending>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        for p in &self.pending {
            let _ = p.tcp.shutdown(Shutdown::Both);
        }
    }
}

impl Admission {
    pub(super) fn new(listener: &TcpListener, policy: Policy) -> std::io::Result<Admission> {
        let listener = listener.try_clone()?;
        listener.set_nonblocking(true)?;
        let (tx, rx) = channel();
        Ok(Admission {
            listener,
            policy,
            spent: Arc::new(Mutex::new(None)),
            tx,
            rx,
            pending: Vec::new(),
        })
    }

    /// The next admitted connection, or `Ok(None)` once `deadline` passes. Connections
    /// refused on the way are reported through `on_refused`.
    pub(super) fn next(
        &mut self,
        deadline: Option<Instant>,
        on_refused: &dyn Fn(&str),
    ) -> std::io::Result<Option<Admitted>> {
        loop {
            self.accept_new(on_refused)?;
            self.reap();
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
            match self.rx.recv_timeout(Duration::from_millis(2)) {
                Ok(Ok(a)) => return Ok(Some(a)),
                Ok(Err(why)) => on_refused(&why),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => unreachable!("admission holds a sender"),
            }
        }
    }

    fn accept_new(&mut self, on_refused: &dyn Fn(&str)) -> std::io::Result<()> {
        loop {
            let (tcp, peer) = match self.listener.accept() {
                Ok(a) => a,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => continue,
                Err(e) => return Err(e),
            };
            if self.pending.len() >= MAX_PENDING {
                on_refused(&format!(
                    "connection from {peer} closed: {MAX_PENDING} connections are already authenticating"
                ));
                let _ = tcp.shutdown(Shutdown::Both);
                continue;
            }
            let watch = match tcp.set_nonblocking(false).and_then(|_| tcp.try_clone()) {
                Ok(w) => w,
                Err(e) => {
                    on_refused(&format!("connection from {peer} dropped: {e}"));
                    continue;
                }
            };
            let done = Arc::new(AtomicBool::new(false));
            let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
            self.pending.push(Pending {
                tcp: watch,
                // The thread bounds each wait by the deadline itself; the watchdog is the
                // backstop for a peer that trickles bytes.
                deadline: deadline + Duration::from_secs(1),
                done: done.clone(),
            });
            let (policy, spent, tx) = (self.policy.clone(), self.spent.clone(), self.tx.clone());
            let spawned = std::thread::Builder::new()
                .name("mig-admit".into())
                .spawn(move || {
                    let r = admit(tcp, peer, &policy, &spent, deadline)
                        .map_err(|why| format!("connection from {peer} refused: {why}"));
                    done.store(true, Ordering::SeqCst);
                    let _ = tx.send(r);
                });
            if let Err(e) = spawned {
                on_refused(&format!("connection from {peer} dropped: {e}"));
                if let Some(p) = self.pending.pop() {
                    let _ = p.tcp.shutdown(Shutdown::Both);
                }
            }
        }
    }

    /// Forgets finished admissions; cuts those past their deadline (their thread then fails
    /// its read and reports the timeout).
    fn reap(&mut self) {
        let now = Instant::now();
        self.pending.retain(|p| {
            if p.done.load(Ordering::SeqCst) {
                return false;
            }
            if now >= p.deadline {
                let _ = p.tcp.shutdown(Shutdown::Both);
            }
            true
        });
    }
}

fn remaining(deadline: Instant) -> Result<Duration, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(format!(
            "not authenticated within {} s",
            HANDSHAKE_TIMEOUT.as_secs()
        ));
    }
    Ok(left)
}

/// One frame from the stranger, within the deadline.
fn read_pre_auth(conn: &mut Conn, deadline: Instant) -> Result<Msg, String> {
    conn.set_read_timeout(Some(remaining(deadline)?))
        .map_err(|e| e.to_string())?;
    wire::recv_msg_pre_auth(conn).map_err(|e| match e {
        wire::WireError::Timeout => format!(
            "sent no complete Hello within {} s",
            HANDSHAKE_TIMEOUT.as_secs()
        ),
        wire::WireError::Eof | wire::WireError::Truncated if Instant::now() >= deadline => {
            format!("not authenticated within {} s", HANDSHAKE_TIMEOUT.as_secs())
        }
        e => e.to_string(),
    })
}

fn refuse(conn: &mut Conn, reason: String) -> String {
    let _ = wire::send_msg(
        conn,
        &Msg::Refuse {
            reason: reason.clone(),
        },
    );
    reason
}

fn admit(
    tcp: TcpStream,
    peer: SocketAddr,
    policy: &Policy,
    spent: &Mutex<Option<SocketAddr>>,
    deadline: Instant,
) -> Result<Admitted, String> {
    let _ = tcp.set_nodelay(true);
    tcp.set_write_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut conn = match &policy.tls {
        Some(cfg) => Conn::accept_tls(tcp, cfg.clone(), remaining(deadline)?)
            .map_err(|e| format!("TLS handshake failed: {e}"))?,
        None => Conn::plain(tcp),
    };
    let (protocol, session, role) = match read_pre_auth(&mut conn, deadline)? {
        Msg::Hello {
            protocol,
            session,
            role,
        } => (protocol, session, role),
        m => {
            return Err(refuse(
                &mut conn,
                format!("protocol violation: expected a Hello, got {}", m.name()),
            ))
        }
    };
    let ours = &policy.protocols;
    if !ours.contains(&protocol) {
        return Err(refuse(
            &mut conn,
            format!(
                "protocol version {protocol} is not supported (this destination speaks versions {}-{})",
                ours.start(),
                ours.end()
            ),
        ));
    }
    let admitted = |conn| Admitted {
        conn,
        peer,
        protocol,
        session,
        role,
    };
    if protocol < wire::AUTH_PROTOCOL_VERSION {
        if policy.secret.is_some() {
            return Err(refuse(
                &mut conn,
                format!(
                    "protocol version {protocol} is not supported: this destination requires the migration's one-time secret (versions {}-{})",
                    wire::AUTH_PROTOCOL_VERSION,
                    ours.end()
                ),
            ));
        }
        return Ok(admitted(conn));
    }
    wire::send_msg(&mut conn, &Msg::HelloAck { protocol }).map_err(|e| e.to_string())?;
    let presented = match read_pre_auth(&mut conn, deadline)? {
        Msg::Auth { secret } => secret,
        m => {
            return Err(refuse(
                &mut conn,
                format!("protocol violation: expected Auth, got {}", m.name()),
            ))
        }
    };
    if let Some(ours) = &policy.secret {
        match presented {
            None => {
                return Err(refuse(
                    &mut conn,
                    "this destination requires the migration's one-time secret; none was presented"
                        .into(),
                ))
            }
            Some(s) if !trust::secret::matches(&s, ours) => {
                return Err(refuse(&mut conn, "wrong migration secret".into()))
            }
            Some(_) if role == Role::Control => {
                let mut g = spent.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(first) = *g {
                    drop(g);
                    return Err(refuse(
                        &mut conn,
                        format!("replayed migration secret: it was already used by the session from {first}"),
                    ));
                }
                *g = Some(peer);
            }
            Some(_) => {}
        }
    }
    conn.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok(admitted(conn))
}
