//! Loopback throughput of one `trust::Conn`, plaintext against mutual TLS, in the same run, and
//! of the cipher alone: `cargo run --release -p trust --example conn_throughput [MiB]`.
//! Prints MiB/s and the ratio (docs/BENCHMARKS.md, "Migration with mutual TLS").

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};
use trust::pki::Ca;
use trust::tls::{self, Credentials};
use trust::{Conn, Identity};

const CHUNK: usize = 1 << 20;

fn creds(ca: &Ca, node: &str) -> Credentials {
    let id = Identity::node(node).unwrap();
    let i = ca.issue(&id, &["127.0.0.1".into()], 1).unwrap();
    let p = Path::new("mem");
    Credentials::from_pem(
        (p, i.cert_pem.as_bytes()),
        (p, i.key_pem.as_bytes()),
        (p, ca.cert_pem.as_bytes()),
    )
    .unwrap()
}

fn run(mib: usize, tls: bool, ca: &Ca) -> f64 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (a, b) = (creds(ca, "a"), creds(ca, "b"));
    let scfg = tls::node_server_config(&b, "a").unwrap();
    let ccfg = tls::node_client_config(&a, "b").unwrap();
    let t = Duration::from_secs(5);
    let rx = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut s = if tls {
            Conn::accept_tls(s, scfg, t).unwrap()
        } else {
            Conn::plain(s)
        };
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0usize;
        while got < mib * CHUNK {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "closed early");
            got += n;
        }
        got
    });
    let tcp = TcpStream::connect(addr).unwrap();
    let mut c = if tls {
        Conn::connect_tls(tcp, ccfg, tls::node_server_name("b").unwrap(), t).unwrap()
    } else {
        Conn::plain(tcp)
    };
    let data: Vec<u8> = (0..CHUNK).map(|i| (i * 7 + i / 4096) as u8).collect();
    let t0 = Instant::now();
    for _ in 0..mib {
        c.write_all(&data).unwrap();
    }
    let got = rx.join().unwrap();
    let s = t0.elapsed().as_secs_f64();
    assert_eq!(got, mib * CHUNK);
    mib as f64 / s
}

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(2048);
    ring_gcm(1024);
    let ca = Ca::generate("bench").unwrap();
    for round in 0..3 {
        let p = run(mib, false, &ca);
        let t = run(mib, true, &ca);
        println!(
            "round {round}: plain {p:.0} MiB/s, mTLS {t:.0} MiB/s, mTLS/plain {:.2}",
            t / p
        );
    }
}

/// ring's AES-128-GCM alone, in 16 KiB records (TLS's size): the cipher's share of the cost.
fn ring_gcm(mib: usize) {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[7u8; 16]).unwrap());
    let mut rec = vec![1u8; 16384];
    let t0 = Instant::now();
    let n = mib * 64;
    for i in 0..n {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&(i as u64).to_be_bytes());
        let tag = key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut rec)
            .unwrap();
        std::hint::black_box(&tag);
    }
    let s = t0.elapsed().as_secs_f64();
    println!(
        "ring AES-128-GCM seal, 16 KiB records: {:.0} MiB/s",
        mib as f64 / s
    );
}
