//! Wall-clock agreement between test hosts: a minimal NTP-style exchange over UDP.
//!
//! Ferry carries a migrated guest's time by the wall-clock time that passed between the
//! source's save and the destination's load (as KVM's own KVM_CLOCK_REALTIME procedure does),
//! so two hosts must agree on CLOCK_REALTIME — real clusters run NTP or PTP for this. The
//! nested two-host test bed has neither (busybox has no ntpd; each L1 host reads its time from
//! an emulated RTC with one-second resolution), so `ferry clock` gives it the same property:
//! `serve` answers timestamp requests, `offset` measures the local clock against a server
//! (the sample with the shortest round trip of several: its error is at most half that round
//! trip) and can step the local clock to it.
//!
//! Wire format (big-endian): request = `MAGIC` + t1; reply = `MAGIC` + t1 + t2 (server time
//! at receipt) + t3 (server time at send). Times are CLOCK_REALTIME nanoseconds.

use anyhow::{bail, Context, Result};
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

const MAGIC: &[u8; 8] = b"FRYCLK01";

/// CLOCK_REALTIME in nanoseconds since the epoch.
pub fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// Answers timestamp requests on `listen` until the process ends.
pub fn serve(listen: SocketAddr) -> Result<()> {
    let s = UdpSocket::bind(listen).with_context(|| format!("cannot bind {listen}"))?;
    let mut buf = [0u8; 64];
    loop {
        let (n, peer) = s.recv_from(&mut buf)?;
        let t2 = now_ns() as u64;
        if n != 16 || &buf[..8] != MAGIC {
            continue;
        }
        let mut r = [0u8; 32];
        r[..16].copy_from_slice(&buf[..16]);
        r[16..24].copy_from_slice(&t2.to_be_bytes());
        let t3 = now_ns() as u64;
        r[24..32].copy_from_slice(&t3.to_be_bytes());
        let _ = s.send_to(&r, peer);
    }
}

/// One measurement: how far the server's clock is ahead of ours, and the round trip it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Offset {
    /// Server clock minus local clock, nanoseconds.
    pub offset_ns: i64,
    /// Network round trip of the sample (the offset's error is at most half of it).
    pub delay_ns: i64,
    /// Samples that were answered.
    pub samples: u32,
}

/// Measures the local clock against `server` with `samples` requests; keeps the one with the
/// shortest round trip.
pub fn measure(server: SocketAddr, samples: u32) -> Result<Offset> {
    let s = UdpSocket::bind(if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut best: Option<Offset> = None;
    let mut answered = 0;
    for _ in 0..samples {
        let t1 = now_ns() as u64;
        let mut q = [0u8; 16];
        q[..8].copy_from_slice(MAGIC);
        q[8..].copy_from_slice(&t1.to_be_bytes());
        s.send_to(&q, server)?;
        let mut r = [0u8; 64];
        let n = loop {
            match s.recv_from(&mut r) {
                Ok((n, from)) if from == server => break Some(n),
                Ok(_) => continue,
                Err(_) => break None,
            }
        };
        let t4 = now_ns();
        let Some(32) = n else { continue };
        let word = |i: usize| u64::from_be_bytes(r[i..i + 8].try_into().unwrap_or([0; 8])) as i128;
        if &r[..8] != MAGIC || word(8) != t1 as i128 {
            continue;
        }
        let (t1, t2, t3) = (t1 as i128, word(16), word(24));
        let offset = ((t2 - t1) + (t3 - t4)) / 2;
        let delay = (t4 - t1) - (t3 - t2);
        answered += 1;
        let o = Offset {
            offset_ns: offset as i64,
            delay_ns: delay as i64,
            samples: 0,
        };
        if best.is_none_or(|b| o.delay_ns < b.delay_ns) {
            best = Some(o);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    match best {
        Some(b) => Ok(Offset {
            samples: answered,
            ..b
        }),
        None => bail!("no answer from the clock server at {server}"),
    }
}

/// Steps CLOCK_REALTIME by `offset_ns` (needs CAP_SYS_TIME).
pub fn step(offset_ns: i64) -> Result<()> {
    let t = now_ns() + offset_ns as i128;
    let ts = libc::timespec {
        tv_sec: (t / 1_000_000_000) as libc::time_t,
        tv_nsec: (t % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: clock_settime reads the timespec we pass by reference; it lives for the call.
    let rc = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
    if rc != 0 {
        bail!("cannot set the clock: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_server_agrees_with_us() {
        let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        std::thread::spawn(move || serve(addr));
        std::thread::sleep(Duration::from_millis(100));
        let o = measure(addr, 10).unwrap();
        assert!(o.samples >= 8, "{o:?}");
        // Same clock: the offset is within the round trip.
        assert!(o.offset_ns.abs() <= o.delay_ns.max(1_000_000), "{o:?}");
    }

    #[test]
    fn a_silent_server_is_an_error() {
        let quiet = UdpSocket::bind("127.0.0.1:0").unwrap();
        let e = measure(quiet.local_addr().unwrap(), 2).unwrap_err();
        assert!(e.to_string().contains("no answer"), "{e}");
    }
}
