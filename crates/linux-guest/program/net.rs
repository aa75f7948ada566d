//! `ferry.workload=net-echo` on CPU 0: the UDP echo (the payload back to the sender's address
//! and port, from the port it was sent to) on `ferry.udp_port`; the kernel itself answers ARP
//! and ICMP echo for the address the init script gave eth0 (`ferry.ip`).

use crate::hb::Cpu;
use crate::out::line;
use std::io::ErrorKind;
use std::time::{Duration, Instant};

/// The kernel's count of ICMP echo replies sent (`Icmp: ... OutEchoReps` of /proc/net/snmp).
fn icmp_echo_replies() -> u64 {
    let s = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut rows = s.lines().filter(|l| l.starts_with("Icmp:"));
    let (Some(names), Some(values)) = (rows.next(), rows.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "OutEchoReps")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// The net-echo workload on CPU 0.
pub fn run(c: &mut Cpu) -> ! {
    let g = c.g;
    let sock = g.udp.as_ref().expect("net-echo without a socket");
    let ip = g.cfg.ip.unwrap_or([0; 4]);
    let mac = std::fs::read_to_string("/sys/class/net/eth0/address")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "none".to_string());
    line!(
        "net up mac={mac} ip={}.{}.{}.{} udp_port={}",
        ip[0],
        ip[1],
        ip[2],
        ip[3],
        g.opts.udp_port
    );
    let icmp0 = icmp_echo_replies();
    let (mut rx, mut tx, mut udp) = (0u64, 0u64, 0u64);
    let mut reported = (0, 0, 0, 0);
    let mut buf = vec![0u8; 65536];
    loop {
        c.heartbeat_if_due();
        let now = Instant::now();
        if now >= c.next_report {
            let counts = (rx, tx, icmp_echo_replies() - icmp0, udp);
            if counts != reported {
                line!(
                    "net rx={} tx={} icmp={} udp={}",
                    counts.0,
                    counts.1,
                    counts.2,
                    counts.3
                );
                reported = counts;
            }
            c.next_report = Instant::now() + Duration::from_secs(1);
        }
        let wait = c
            .next_hb()
            .min(c.next_report)
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let _ = sock.set_read_timeout(Some(wait));
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                rx += 1;
                if sock.send_to(&buf[..n], from).is_ok() {
                    tx += 1;
                    udp += 1;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                line!("net ERROR recv: {e}");
                c.idle()
            }
        }
    }
}
