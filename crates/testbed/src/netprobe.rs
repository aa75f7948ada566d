//! A network prober: pings a VM (ICMP echo over a raw socket) and runs a UDP echo stream
//! against it at a fixed interval, verifies every reply byte for byte, and reports losses and
//! the longest gap between replies, which during a live migration is the network-visible
//! downtime.

use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What to probe and how.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    pub target: Ipv4Addr,
    pub interval: Duration,
    /// UDP echo port (0: no UDP stream).
    pub udp_port: u16,
    /// Payload bytes per probe (at least 16).
    pub payload: usize,
    /// Stop when this file exists...
    pub stop_file: Option<PathBuf>,
    /// ...or after this long.
    pub duration: Option<Duration>,
}

/// One protocol's results.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ProtoStats {
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicates: u64,
    /// Replies whose payload differed from what was sent.
    pub corrupt: u64,
    /// Longest run of consecutive probes without a reply.
    pub max_consecutive_lost: u64,
    /// Longest time between two consecutive replies.
    pub max_gap_ms: f64,
    /// When that gap started, from the start of probing.
    pub max_gap_at_ms: f64,
    /// Every gap longer than 2.5 intervals: (start ms, length ms).
    pub gaps: Vec<(f64, f64)>,
    pub rtt_avg_ms: f64,
    pub rtt_max_ms: f64,
}

/// The prober's report.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ProbeReport {
    pub target: String,
    pub interval_ms: f64,
    pub duration_s: f64,
    pub icmp: ProtoStats,
    pub udp: Option<ProtoStats>,
}

struct Track {
    sent_at: Vec<Instant>,
    replies: Vec<Option<Instant>>,
    duplicates: u64,
    corrupt: u64,
}

impl Track {
    fn new() -> Track {
        Track {
            sent_at: Vec::new(),
            replies: Vec::new(),
            duplicates: 0,
            corrupt: 0,
        }
    }

    fn reply(&mut self, seq: u64, ok: bool, at: Instant) {
        let i = seq as usize;
        if i >= self.sent_at.len() {
            self.corrupt += 1;
            return;
        }
        if !ok {
            self.corrupt += 1;
            return;
        }
        if self.replies[i].is_some() {
            self.duplicates += 1;
        } else {
            self.replies[i] = Some(at);
        }
    }

    fn stats(&self, t0: Instant, interval: Duration) -> ProtoStats {
        let sent = self.sent_at.len() as u64;
        let mut arrivals: Vec<Instant> = self.replies.iter().flatten().copied().collect();
        arrivals.sort();
        let received = arrivals.len() as u64;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let mut s = ProtoStats {
            sent,
            received,
            lost: sent - received,
            duplicates: self.duplicates,
            corrupt: self.corrupt,
            ..Default::default()
        };
        for w in arrivals.windows(2) {
            let g = ms(w[1] - w[0]);
            if g > s.max_gap_ms {
                s.max_gap_ms = g;
                s.max_gap_at_ms = ms(w[0] - t0);
            }
            if g > 2.5 * ms(interval) {
                s.gaps.push((ms(w[0] - t0), g));
            }
        }
        let mut run = 0;
        for r in &self.replies {
            if r.is_none() {
                run += 1;
                s.max_consecutive_lost = s.max_consecutive_lost.max(run);
            } else {
                run = 0;
            }
        }
        let rtts: Vec<f64> = self
            .replies
            .iter()
            .zip(&self.sent_at)
            .filter_map(|(r, s)| r.map(|r| ms(r - *s)))
            .collect();
        if !rtts.is_empty() {
            s.rtt_avg_ms = rtts.iter().sum::<f64>() / rtts.len() as f64;
            s.rtt_max_ms = rtts.iter().cloned().fold(0.0, f64::max);
        }
        s
    }
}

/// The payload of probe `seq`: the sequence number, then a pattern derived from it.
fn payload(seq: u64, len: usize) -> Vec<u8> {
    let mut p = seq.to_le_bytes().to_vec();
    p.extend((8..len).map(|i| (seq.wrapping_mul(31) as usize + i * 7) as u8));
    p
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += w as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn icmp_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 20_000,
    };
    // SAFETY: SO_RCVTIMEO takes a timeval of the given size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    Ok(fd)
}

fn icmp_send(fd: &OwnedFd, target: Ipv4Addr, id: u16, seq: u64, len: usize) -> bool {
    let mut pkt = vec![8u8, 0, 0, 0];
    pkt.extend_from_slice(&id.to_be_bytes());
    pkt.extend_from_slice(&(seq as u16).to_be_bytes());
    pkt.extend_from_slice(&payload(seq, len));
    let c = checksum(&pkt);
    pkt[2..4].copy_from_slice(&c.to_be_bytes());
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(target.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sends a valid buffer to a valid sockaddr_in of the given size.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            pkt.as_ptr() as *const libc::c_void,
            pkt.len(),
            0,
            &sa as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    n == pkt.len() as isize
}

/// Tells the echo ids of this process's [`wait_echo`] calls apart.
static ECHO_SEQ: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);

/// Pings `target` (ICMP echo over a raw socket, in the calling thread's network namespace)
/// every `interval` until one reply with the payload that was sent comes back, or `timeout`
/// passes: `Ok(Some(time until the first reply))` or `Ok(None)`. `Err` only when it cannot
/// probe at all (no raw ICMP socket: it needs root or CAP_NET_RAW). No external `ping`.
pub fn wait_echo(
    target: Ipv4Addr,
    interval: Duration,
    timeout: Duration,
) -> std::io::Result<Option<Duration>> {
    const LEN: usize = 56;
    let fd = icmp_socket()?;
    // Not `run`'s id (the process id), so a prober of this process is never confused with it.
    let id = (std::process::id() as u16 ^ 0x8000).wrapping_add(
        ECHO_SEQ
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x0101),
    );
    let interval = interval.max(Duration::from_millis(1));
    let t0 = Instant::now();
    let mut buf = vec![0u8; 65536];
    let mut seq: u64 = 0;
    while t0.elapsed() < timeout {
        // A failed send (no route yet, neighbour unresolved) is a probe without an answer.
        icmp_send(&fd, target, id, seq, LEN);
        seq += 1;
        let next = (t0 + interval * seq as u32).min(t0 + timeout);
        while Instant::now() < next {
            // SAFETY: reads into a valid buffer; the socket has a 20 ms receive timeout.
            let n = unsafe {
                libc::recv(
                    fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                )
            };
            if n < 20 {
                continue;
            }
            let p = &buf[..n as usize];
            let ihl = (p[0] & 0xf) as usize * 4;
            if p.len() < ihl + 8 + 8 || p[12..16] != target.octets() {
                continue;
            }
            let icmp = &p[ihl..];
            if icmp[0] != 0 || u16::from_be_bytes([icmp[4], icmp[5]]) != id {
                continue;
            }
            let data = &icmp[8..];
            let s = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
            if s < seq && data == payload(s, LEN).as_slice() {
                return Ok(Some(t0.elapsed()));
            }
        }
    }
    Ok(None)
}

/// Runs the probe until the stop file appears or the duration passes.
pub fn run(cfg: &ProbeConfig) -> std::io::Result<ProbeReport> {
    let len = cfg.payload.max(16);
    let id = (std::process::id() & 0xffff) as u16;
    let icmp = Arc::new(icmp_socket()?);
    let udp = if cfg.udp_port != 0 {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect(SocketAddrV4::new(cfg.target, cfg.udp_port))?;
        s.set_read_timeout(Some(Duration::from_millis(20)))?;
        Some(Arc::new(s))
    } else {
        None
    };
    let icmp_track = Arc::new(Mutex::new(Track::new()));
    let udp_track = Arc::new(Mutex::new(Track::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();

    let icmp_rx = {
        let (fd, track, stop, target) =
            (icmp.clone(), icmp_track.clone(), stop.clone(), cfg.target);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::SeqCst) {
                // SAFETY: reads into a valid buffer.
                let n = unsafe {
                    libc::recv(
                        fd.as_raw_fd(),
                        buf.as_mut_ptr() as *mut libc::c_void,
                        buf.len(),
                        0,
                    )
                };
                let at = Instant::now();
                if n < 20 {
                    continue;
                }
                let p = &buf[..n as usize];
                let ihl = (p[0] & 0xf) as usize * 4;
                if p.len() < ihl + 8 || p[12..16] != target.octets() {
                    continue;
                }
                let icmp = &p[ihl..];
                if icmp[0] != 0 || u16::from_be_bytes([icmp[4], icmp[5]]) != id {
                    continue;
                }
                let data = &icmp[8..];
                if data.len() < 8 {
                    continue;
                }
                let seq = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
                let ok = data == payload(seq, data.len()).as_slice() && data.len() == len;
                track
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .reply(seq, ok, at);
            }
        })
    };
    let udp_rx = udp.clone().map(|s| {
        let (track, stop) = (udp_track.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::SeqCst) {
                let Ok(n) = s.recv(&mut buf) else { continue };
                let at = Instant::now();
                if n < 8 {
                    continue;
                }
                let data = &buf[..n];
                let seq = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
                let ok = n == len && data == payload(seq, n).as_slice();
                track
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .reply(seq, ok, at);
            }
        })
    });

    let mut seq: u64 = 0;
    loop {
        let due = t0 + cfg.interval * seq as u32;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        if cfg.duration.is_some_and(|d| t0.elapsed() >= d)
            || cfg.stop_file.as_ref().is_some_and(|f| f.exists())
        {
            break;
        }
        {
            let mut t = icmp_track.lock().unwrap_or_else(|e| e.into_inner());
            t.sent_at.push(Instant::now());
            t.replies.push(None);
        }
        icmp_send(&icmp, cfg.target, id, seq, len);
        if let Some(s) = &udp {
            {
                let mut t = udp_track.lock().unwrap_or_else(|e| e.into_inner());
                t.sent_at.push(Instant::now());
                t.replies.push(None);
            }
            let _ = s.send(&payload(seq, len));
        }
        seq += 1;
    }
    // Let the last replies arrive.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let _ = icmp_rx.join();
    if let Some(j) = udp_rx {
        let _ = j.join();
    }
    let duration = t0.elapsed();
    let icmp = icmp_track
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .stats(t0, cfg.interval);
    let udp = udp.map(|_| {
        udp_track
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stats(t0, cfg.interval)
    });
    Ok(ProbeReport {
        target: cfg.target.to_string(),
        interval_ms: cfg.interval.as_secs_f64() * 1e3,
        duration_s: duration.as_secs_f64(),
        icmp,
        udp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_a_known_packet() {
        // Echo request id 1 seq 1, no data: checksum 0xf7fd.
        let p = [8u8, 0, 0, 0, 0, 1, 0, 1];
        assert_eq!(checksum(&p), 0xf7fd);
    }

    #[test]
    fn gaps_and_losses_are_counted_from_replies() {
        let t0 = Instant::now();
        let iv = Duration::from_millis(10);
        let mut t = Track::new();
        for i in 0..10u64 {
            t.sent_at.push(t0 + iv * i as u32);
            t.replies.push(None);
        }
        // Replies to 0..=3 and 7..=9; 4, 5, 6 lost; 2 answered twice; 8 corrupt.
        for i in [0u64, 1, 2, 3, 7, 9] {
            t.reply(i, true, t0 + iv * i as u32 + Duration::from_millis(1));
        }
        t.reply(2, true, t0 + Duration::from_millis(25));
        t.reply(8, false, t0 + Duration::from_millis(81));
        let s = t.stats(t0, iv);
        assert_eq!((s.sent, s.received, s.lost), (10, 6, 4));
        assert_eq!((s.duplicates, s.corrupt), (1, 1));
        assert_eq!(s.max_consecutive_lost, 3);
        assert!((s.max_gap_ms - 40.0).abs() < 0.01, "{}", s.max_gap_ms);
        assert!((s.max_gap_at_ms - 31.0).abs() < 0.01);
        assert_eq!(s.gaps.len(), 1);
    }

    /// Runs `f` on a thread in a network namespace of its own (loopback down); `None` without
    /// the privilege to make one.
    fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        std::thread::spawn(move || {
            // SAFETY: unshare(2) only moves this thread into a new network namespace.
            (unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0).then(f)
        })
        .join()
        .unwrap()
    }

    #[test]
    fn wait_echo_sees_an_answer_and_reports_none_without_one() {
        let lo = Ipv4Addr::LOCALHOST;
        match wait_echo(lo, Duration::from_millis(20), Duration::from_secs(5)) {
            Ok(r) => assert!(r.is_some(), "the loopback did not answer"),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                eprintln!("skipped: no raw ICMP socket without root ({e})");
                return;
            }
            Err(e) => panic!("{e}"),
        }
        // In a namespace whose loopback is down, nothing answers: None after the timeout.
        let t0 = Instant::now();
        let r = in_new_netns(move || {
            wait_echo(lo, Duration::from_millis(20), Duration::from_millis(300))
        });
        if let Some(r) = r {
            assert_eq!(r.unwrap(), None);
            assert!(t0.elapsed() >= Duration::from_millis(300));
        }
    }

    #[test]
    fn payloads_differ_per_sequence_number() {
        assert_ne!(payload(1, 64), payload(2, 64));
        assert_eq!(payload(5, 64).len(), 64);
        assert_eq!(&payload(5, 64)[..8], &5u64.to_le_bytes());
    }
}
