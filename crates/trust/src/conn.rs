//! A blocking TCP connection, TLS or plaintext, whose clones share one session so that one
//! thread can read while another writes (as the migration's control connection needs).
//!
//! TLS state lives behind a mutex that is never held across a socket operation: a reader
//! receives ciphertext without it and decrypts under it; a writer encrypts under it into its
//! own buffer and sends without it (writers are serialized by a second lock, taken first, so
//! records leave in order). Neither side can block the other on a full or empty socket.
//!
//! A peer that closes its TCP connection without a TLS `close_notify` is read as an ordinary
//! end of stream: every Ferry message is framed with its own length and checksum, so a
//! truncated frame is still detected by the reader of frames.

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::identity::Identity;

const READ_CHUNK: usize = 64 << 10;
/// Plaintext encrypted per lock hold (a few TLS records).
const WRITE_CHUNK: usize = 256 << 10;

struct ReadState {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
}

struct Tls {
    conn: Mutex<Connection>,
    /// Held by the one reader at a time; owns the received, not yet decrypted bytes.
    read: Mutex<ReadState>,
    /// Held by the one writer at a time (before `conn`); owns the encrypted, unsent bytes.
    write: Mutex<Vec<u8>>,
    peer: Option<Identity>,
    tcp: TcpStream,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn tls_err(e: rustls::Error) -> io::Error {
    crate::tls::tls_io_error(e)
}

impl Drop for Tls {
    fn drop(&mut self) {
        // The last handle: say goodbye (best effort, never blocking long).
        let c = self.conn.get_mut().unwrap_or_else(|e| e.into_inner());
        c.send_close_notify();
        let mut out = Vec::new();
        while c.wants_write() {
            if c.write_tls(&mut out).is_err() {
                break;
            }
        }
        let _ = self.tcp.set_write_timeout(Some(Duration::from_millis(100)));
        let _ = (&self.tcp).write_all(&out);
    }
}

/// One connection (clones share it).
pub struct Conn {
    tcp: TcpStream,
    tls: Option<Arc<Tls>>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("peer", &self.tcp.peer_addr().ok())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Drives a handshake to its end within `deadline` (each socket wait bounded by what is left).
fn handshake(tcp: &TcpStream, conn: &mut Connection, deadline: Instant) -> io::Result<()> {
    let saved = (tcp.read_timeout()?, tcp.write_timeout()?);
    let result = (|| {
        let mut s = tcp;
        while conn.is_handshaking() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TLS handshake timed out",
                ));
            }
            tcp.set_read_timeout(Some(left))?;
            tcp.set_write_timeout(Some(left))?;
            let (rd, _) = conn.complete_io(&mut s).map_err(|e| match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                }
                _ => e,
            })?;
            if rd == 0 && conn.is_handshaking() && !conn.wants_write() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection during the TLS handshake",
                ));
            }
        }
        // Flush what the handshake left (the client's Finished).
        while conn.wants_write() {
            conn.write_tls(&mut s)?;
        }
        Ok(())
    })();
    tcp.set_read_timeout(saved.0)?;
    tcp.set_write_timeout(saved.1)?;
    result
}

/// Half-closes `tcp` and drains what the peer still sends, for at most a second.
fn linger(tcp: &TcpStream) {
    let _ = tcp.shutdown(Shutdown::Write);
    let _ = tcp.set_read_timeout(Some(Duration::from_millis(200)));
    let t = Instant::now();
    let mut sink = [0u8; 4096];
    let mut s = tcp;
    while t.elapsed() < Duration::from_secs(1) {
        match s.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

impl Conn {
    /// A plaintext connection.
    pub fn plain(tcp: TcpStream) -> Conn {
        Conn { tcp, tls: None }
    }

    fn wrap(tcp: TcpStream, mut conn: Connection, deadline: Instant) -> io::Result<Conn> {
        handshake(&tcp, &mut conn, deadline).map_err(crate::tls::explain_io)?;
        conn.set_buffer_limit(None);
        let peer = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| Identity::of_cert(c));
        let tls = Tls {
            conn: Mutex::new(conn),
            read: Mutex::new(ReadState {
                buf: vec![0; READ_CHUNK],
                start: 0,
                end: 0,
                eof: false,
            }),
            write: Mutex::new(Vec::new()),
            peer,
            tcp: tcp.try_clone()?,
        };
        Ok(Conn {
            tcp,
            tls: Some(Arc::new(tls)),
        })
    }

    /// The client end of a TLS session over `tcp`, handshake completed within `timeout`.
    pub fn connect_tls(
        tcp: TcpStream,
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
        timeout: Duration,
    ) -> io::Result<Conn> {
        let c = ClientConnection::new(config, name).map_err(tls_err)?;
        Conn::wrap(tcp, Connection::Client(c), Instant::now() + timeout)
    }

    /// The server end of a TLS session over `tcp`, handshake completed within `timeout`.
    ///
    /// A refused client learns why: the alert is sent, then the connection is half-closed and
    /// what the client still sends (its first message: in TLS 1.3 a client's handshake ends
    /// before the server has checked its certificate) is read and dropped for a moment, so
    /// that closing does not reset the connection and discard the alert unread.
    pub fn accept_tls(
        tcp: TcpStream,
        config: Arc<ServerConfig>,
        timeout: Duration,
    ) -> io::Result<Conn> {
        let c = ServerConnection::new(config).map_err(tls_err)?;
        let keep = tcp.try_clone()?;
        Conn::wrap(tcp, Connection::Server(c), Instant::now() + timeout).inspect_err(|e| {
            if e.kind() != io::ErrorKind::TimedOut {
                linger(&keep);
            }
        })
    }

    /// Another handle on the same connection.
    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(Conn {
            tcp: self.tcp.try_clone()?,
            tls: self.tls.clone(),
        })
    }

    /// The underlying socket (to shut it down or set options).
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The Ferry identity the peer's (verified) certificate names.
    pub fn peer_identity(&self) -> Option<&Identity> {
        self.tls.as_ref().and_then(|t| t.peer.as_ref())
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.peer_addr()
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp.set_read_timeout(t)
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp.set_write_timeout(t)
    }

    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.tcp.set_nodelay(on)
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.tcp.shutdown(how)
    }

    /// Without blocking: `Ok(n > 0)` if something can be read now, `Ok(0)` if the peer closed,
    /// `Err(WouldBlock)` if nothing arrived (as a non-blocking `peek` on a TCP socket). While
    /// another thread is reading this connection the answer is `WouldBlock`.
    pub fn poll_readable(&self) -> io::Result<usize> {
        let mut b = [0u8; 1];
        let Some(t) = &self.tls else {
            self.tcp.set_nonblocking(true)?;
            let r = self.tcp.peek(&mut b);
            self.tcp.set_nonblocking(false)?;
            return r;
        };
        let Ok(rs) = t.read.try_lock() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        if rs.start < rs.end
            || lock(&t.conn)
                .process_new_packets()
                .map_err(tls_err)?
                .plaintext_bytes_to_read()
                > 0
        {
            return Ok(1);
        }
        if rs.eof {
            return Ok(0);
        }
        self.tcp.set_nonblocking(true)?;
        let r = self.tcp.peek(&mut b);
        self.tcp.set_nonblocking(false)?;
        r
    }
}

impl Tls {
    /// Sends whatever the TLS state wants to send (alerts, key updates).
    fn flush_pending(&self) -> io::Result<()> {
        let mut out = lock(&self.write);
        {
            let mut c = lock(&self.conn);
            while c.wants_write() {
                c.write_tls(&mut *out)?;
            }
        }
        let r = (&self.tcp).write_all(&out);
        out.clear();
        r
    }

    fn read(&self, dst: &mut [u8]) -> io::Result<usize> {
        if dst.is_empty() {
            return Ok(0);
        }
        let mut rs = lock(&self.read);
        loop {
            let mut wants_write = false;
            {
                let mut c = lock(&self.conn);
                loop {
                    match c.reader().read(dst) {
                        Ok(n) => return Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        // The TCP connection ended without close_notify: see the module doc.
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                        Err(e) => return Err(e),
                    }
                    if rs.start == rs.end {
                        if rs.eof {
                            return Ok(0);
                        }
                        break;
                    }
                    let ReadState {
                        buf, start, end, ..
                    } = &mut *rs;
                    let mut pending = &buf[*start..*end];
                    let n = c.read_tls(&mut pending)?;
                    *start += n;
                    let state = c.process_new_packets().map_err(tls_err);
                    wants_write |= c.wants_write();
                    if let Err(e) = state {
                        drop(c);
                        // Tell the peer why (the alert rustls queued).
                        let _ = self.flush_pending();
                        return Err(e);
                    }
                    if state.is_ok_and(|s| s.peer_has_closed()) && n == 0 {
                        return Ok(0);
                    }
                }
            }
            if wants_write {
                self.flush_pending()?;
            }
            // Nothing decrypted is left: wait for more ciphertext, without the TLS lock.
            let n = loop {
                match (&self.tcp).read(&mut rs.buf) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => break r?,
                }
            };
            rs.start = 0;
            rs.end = n;
            if n == 0 {
                rs.eof = true;
                let mut c = lock(&self.conn);
                let _ = c.read_tls(&mut &[][..]);
                let _ = c.process_new_packets();
            }
        }
    }

    fn write(&self, data: &[u8]) -> io::Result<usize> {
        let mut out = lock(&self.write);
        let n = {
            let mut c = lock(&self.conn);
            let n = c.writer().write(&data[..data.len().min(WRITE_CHUNK)])?;
            while c.wants_write() {
                c.write_tls(&mut *out)?;
            }
            n
        };
        let r = (&self.tcp).write_all(&out);
        out.clear();
        r.map(|_| n)
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.tls {
            Some(t) => t.read(buf),
            None => self.tcp.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &self.tls {
            Some(t) => t.write(buf),
            None => self.tcp.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        // Every write leaves the process before it returns.
        match &self.tls {
            Some(_) => Ok(()),
            None => self.tcp.flush(),
        }
    }
}
