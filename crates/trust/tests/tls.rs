//! Mutual TLS between two nodes over real sockets: identities checked on both sides, and a
//! session that reads and writes concurrently from clones.

use contract::trust::Role;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;
use trust::pki::{self, Ca};
use trust::tls::{self, Credentials};
use trust::{Conn, Identity};

const T: Duration = Duration::from_secs(5);

fn creds(ca: &Ca, id: &Identity) -> Credentials {
    creds_trusting(ca, id, ca)
}

/// A certificate of `ca` that trusts `roots`.
fn creds_trusting(ca: &Ca, id: &Identity, roots: &Ca) -> Credentials {
    let addrs: Vec<String> = match id {
        Identity::Node(_) => vec!["127.0.0.1".into()],
        Identity::User { .. } => vec![],
    };
    let i = ca.issue(id, &addrs, 1).unwrap();
    let p = Path::new("mem");
    Credentials::from_pem(
        (p, i.cert_pem.as_bytes()),
        (p, i.key_pem.as_bytes()),
        (p, roots.cert_pem.as_bytes()),
    )
    .unwrap()
}

fn node(n: &str) -> Identity {
    Identity::node(n).unwrap()
}

/// Server (as node `srv`, expecting client node `want_client`) and client (as `cli`,
/// expecting server node `want_server`); returns both handshake results as strings.
fn pair(
    srv: &Credentials,
    want_client: &str,
    cli: &Credentials,
    want_server: &str,
) -> (Result<Conn, String>, Result<Conn, String>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let scfg = tls::node_server_config(srv, want_client).unwrap();
    let server = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut s = Conn::accept_tls(s, scfg, T).map_err(|e| e.to_string())?;
        // The server's handshake ends before it has checked the client's certificate's use.
        let mut b = [0u8; 1];
        s.read_exact(&mut b).map_err(|e| e.to_string())?;
        s.write_all(b"y").map_err(|e| e.to_string())?;
        Ok(s)
    });
    let ccfg = tls::node_client_config(cli, want_server).unwrap();
    let c = Conn::connect_tls(
        TcpStream::connect(addr).unwrap(),
        ccfg,
        tls::node_server_name(want_server).unwrap(),
        T,
    )
    .map_err(|e| e.to_string());
    // The client's handshake ends before the server has checked the client's certificate.
    let c = c.and_then(|mut c| {
        c.write_all(b"x").map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        match c.read(&mut b) {
            Ok(1) => Ok(c),
            Ok(_) => Err("closed".to_string()),
            Err(e) => Err(e.to_string()),
        }
    });
    let s = server.join().unwrap();
    (s, c)
}

#[test]
fn each_side_checks_the_other_names_the_expected_node() {
    let ca = Ca::generate("test").unwrap();
    let other_ca = Ca::generate("other").unwrap();
    let (a, b, c) = (
        creds(&ca, &node("a")),
        creds(&ca, &node("b")),
        creds(&ca, &node("c")),
    );
    let a_other = creds(&other_ca, &node("a"));
    // Signed by another CA, but trusting this cluster's (to get as far as it can).
    let a_forged = creds_trusting(&other_ca, &node("a"), &ca);
    let user = creds(&ca, &Identity::user("a", Role::Admin).unwrap());
    assert_eq!(a.identity(), Some(node("a")));

    // b serves, a connects: both named as expected.
    let (s, cl) = pair(&b, "a", &a, "b");
    let (s, cl) = (s.unwrap(), cl.unwrap());
    assert_eq!(s.peer_identity(), Some(&node("a")));
    assert_eq!(cl.peer_identity(), Some(&node("b")));

    // The server is a valid node of the cluster, but not the one the client expects.
    let (_, cl) = pair(&c, "a", &a, "b");
    let e = cl.unwrap_err();
    assert!(e.contains("names node c, not the expected node b"), "{e}");

    // The client is a valid node, but not the one the server expects.
    let (s, cl) = pair(&b, "a", &c, "b");
    let e = s.unwrap_err();
    assert!(e.contains("names node c, not the expected node a"), "{e}");
    assert!(cl.is_err());

    // A user certificate is not a node's (and lacks server use).
    let (s, _) = pair(&b, "a", &user, "b");
    let e = s.unwrap_err();
    assert!(
        e.contains("names user a (admin), not the expected node a"),
        "{e}"
    );

    // Another CA's certificate for the right name.
    let (s, cl) = pair(&b, "a", &a_forged, "b");
    let e = s.unwrap_err();
    assert!(e.contains("not signed by this cluster's CA"), "{e}");
    assert!(cl.is_err());
    let (_, cl) = pair(&a_other, "a", &a, "a");
    let e = cl.unwrap_err();
    assert!(e.contains("not signed by this cluster's CA"), "{e}");
}

#[test]
fn clones_read_and_write_at_once_without_blocking_each_other() {
    let ca = Ca::generate("test").unwrap();
    let (a, b) = (creds(&ca, &node("a")), creds(&ca, &node("b")));
    let (s, c) = pair(&b, "a", &a, "b");
    let (s, c) = (s.unwrap(), c.unwrap());
    // Both sides send 32 MiB while reading what the other sends: with one lock held across
    // socket calls this would deadlock once both sockets' buffers are full.
    const N: usize = 32 << 20;
    let run = |conn: Conn, seed: u8| {
        let mut w = conn.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let data: Vec<u8> = (0..N).map(|i| (i as u8).wrapping_mul(seed)).collect();
            for chunk in data.chunks(1 << 20) {
                w.write_all(chunk).unwrap();
            }
        });
        let mut r = conn;
        let reader = std::thread::spawn(move || {
            let other = if seed == 3 { 5u8 } else { 3 };
            let mut got = vec![0u8; N];
            r.read_exact(&mut got).unwrap();
            assert!(got
                .iter()
                .enumerate()
                .all(|(i, &b)| b == (i as u8).wrapping_mul(other)));
            r
        });
        (writer, reader)
    };
    let (w1, r1) = run(s, 3);
    let (w2, r2) = run(c, 5);
    w1.join().unwrap();
    w2.join().unwrap();
    let mut s = r1.join().unwrap();
    let c = r2.join().unwrap();
    // The last handle gone, the peer reads a clean end.
    drop(c);
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap(), 0);
}

#[test]
fn pki_files_and_key_modes() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let ca = pki::init(d.path(), false).unwrap();
    assert!(
        pki::init(d.path(), false).is_err(),
        "an existing CA was replaced"
    );
    let files = pki::issue(
        d.path(),
        &node("n1"),
        &["10.0.0.1".into(), "n1.example".into()],
        30,
    )
    .unwrap();
    let files_u = pki::issue(
        d.path(),
        &Identity::user("bob", Role::Viewer).unwrap(),
        &[],
        30,
    )
    .unwrap();
    for k in [&d.path().join(pki::CA_KEY), &files.key, &files_u.key] {
        let mode = std::fs::metadata(k).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", k.display());
    }
    assert_eq!(files.ca, ca);
    let c = Credentials::load(&files).unwrap();
    assert_eq!(c.identity(), Some(node("n1")));
    assert_eq!(
        Credentials::load(&files_u).unwrap().identity(),
        Some(Identity::user("bob", Role::Viewer).unwrap())
    );
    assert!(pki::issue(
        d.path(),
        &Identity::user("bob", Role::Viewer).unwrap(),
        &["1.2.3.4".into()],
        30
    )
    .is_err());
}
