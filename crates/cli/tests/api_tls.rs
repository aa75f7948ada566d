//! The REST API over HTTPS (agents with `--pki-dir`): plain HTTP gets no answer; a client
//! without a credential -> 401; a user certificate's role decides (viewer reads, cannot create;
//! an admin creates, cannot call the internal endpoints); certificates of another CA are
//! refused in the handshake, both ways; a client that expects node2 and reaches node1 refuses
//! it by name; agents call each other with their node certificates (the migration below
//! needs node1 -> node2's internal receive), and the CLI migrates with `--ca` and `--cert`.

mod common;

use agent::client::{self, ClientTls};
use common::{Cluster, GUEST};
use contract::trust::{Role, TlsFiles};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use trust::Identity;

/// This process's requests: trusting `ca`, presenting `who` (if any).
fn as_client(ca: &Path, who: Option<&TlsFiles>) {
    client::set_tls(Some(ClientTls {
        roots: trust::api::load_roots(ca).unwrap(),
        creds: who.map(|f| trust::tls::Credentials::load(f).unwrap()),
    }));
}

fn err_text<T: std::fmt::Debug>(r: Result<T, agent::AgentError>) -> String {
    match r {
        Ok(v) => panic!("expected a refusal, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn the_api_is_https_and_certificates_are_credentials_checked_by_role_and_node() {
    let mut c = Cluster::new(false);
    let dir = c.dir.path().to_path_buf();
    let pki = dir.join("pki");
    trust::pki::init(&pki, false).unwrap();
    for n in ["node1", "node2"] {
        trust::pki::issue(&pki, &Identity::node(n).unwrap(), &["127.0.0.1".into()], 1).unwrap();
    }
    let user = |name: &str, role: Role| {
        trust::pki::issue(&pki, &Identity::user(name, role).unwrap(), &[], 1).unwrap()
    };
    let admin = user("alice", Role::Admin);
    let viewer = user("vic", Role::Viewer);
    // Another cluster's CA, with a node1 and an admin of its own.
    let evil = dir.join("evil");
    trust::pki::init(&evil, false).unwrap();
    let evil_node1 = trust::pki::issue(
        &evil,
        &Identity::node("node1").unwrap(),
        &["127.0.0.1".into()],
        1,
    )
    .unwrap();
    let evil_admin = trust::pki::issue(
        &evil,
        &Identity::user("mallory", Role::Admin).unwrap(),
        &[],
        1,
    )
    .unwrap();
    let ca = pki.join("ca.pem");

    // The harness's own requests (health checks, VM creation) are the admin's.
    as_client(&ca, Some(&admin));
    let pki_arg = pki.display().to_string();
    for n in ["node1", "node2"] {
        c.add(n, &["--pki-dir", &pki_arg]);
    }
    let a1 = c.addr("node1");

    // Plain HTTP on the HTTPS port: no HTTP answer.
    let mut s = std::net::TcpStream::connect(&a1).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(
        !buf.starts_with(b"HTTP/"),
        "plain HTTP answered: {}",
        String::from_utf8_lossy(&buf)
    );

    // HTTPS without a credential: 401 with the reason.
    as_client(&ca, None);
    let e = err_text(client::get::<Value>(&a1, "/v1/nodes"));
    assert!(
        e.contains("HTTP 401") && e.contains("client certificate"),
        "{e}"
    );

    // A viewer reads and cannot create.
    as_client(&ca, Some(&viewer));
    let nodes: Vec<Value> = client::get(&a1, "/v1/nodes").unwrap();
    assert_eq!(nodes.len(), 2);
    let spec = json!({ "toml": format!("name = \"alpha\"\n{GUEST}"), "node": "node1" });
    let e = err_text(client::post::<_, Value>(
        &a1,
        "/v1/vms",
        &spec,
        Some(Duration::from_secs(30)),
    ));
    assert!(
        e.contains("HTTP 403") && e.contains("user vic (viewer)"),
        "{e}"
    );
    let vms: Vec<Value> = client::get(&a1, "/v1/vms").unwrap();
    assert!(
        vms.is_empty(),
        "a refused create created something: {vms:?}"
    );

    // Another CA, either way: this client refuses node1's certificate (and the real node1
    // refuses a client certificate of the other CA) during the handshake.
    as_client(&evil.join("ca.pem"), Some(&evil_node1));
    let e = err_text(client::get::<Value>(&a1, "/v1/health"));
    assert!(e.contains("not signed by this cluster's CA"), "{e}");
    client::set_tls(Some(ClientTls {
        roots: trust::api::load_roots(&ca).unwrap(),
        creds: Some(
            trust::tls::Credentials::load(&TlsFiles {
                ca: evil.join("ca.pem"),
                ..evil_admin.clone()
            })
            .unwrap(),
        ),
    }));
    let e = err_text(client::get::<Value>(&a1, "/v1/health"));
    assert!(e.contains("refused this side's certificate"), "{e}");

    // The admin creates a VM; the internal endpoints are for nodes only; a client expecting
    // node2 that reaches node1's address refuses it by name.
    as_client(&ca, Some(&admin));
    c.vm("node1", "alpha", GUEST);
    c.assert_verify("node1", "alpha", 1);
    let e = err_text(client::post::<_, Value>(
        &a1,
        "/v1/internal/receive",
        &json!({}),
        Some(Duration::from_secs(30)),
    ));
    assert!(e.contains("HTTP 403") && e.contains("Internal"), "{e}");
    let e = err_text(client::get::<Value>(
        client::node("node2", &a1),
        "/v1/health",
    ));
    assert!(e.contains("node2") && e.contains("node1"), "{e}");

    // The CLI: without the CA it cannot talk to an HTTPS agent; with the CA but no
    // certificate it is refused (401); with the admin's certificate it migrates the VM, which
    // takes node1 -> node2 calls with node certificates over HTTPS.
    let ferry = |tls: &[&str], args: &[&str]| {
        let mut cmd = Command::new(common::ferry_bin());
        cmd.args(["--agent", &a1])
            .env_remove("FERRY_TOKEN")
            .env_remove("FERRY_CA")
            .env_remove("FERRY_CERT")
            .args(tls)
            .args(args);
        let o = cmd.output().unwrap();
        (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    };
    let ca_arg = ca.display().to_string();
    let admin_cert = admin.cert.display().to_string();
    let viewer_cert = viewer.cert.display().to_string();
    let (ok, out) = ferry(&[], &["vm", "list"]);
    assert!(!ok, "{out}");
    let (ok, out) = ferry(&["--ca", &ca_arg], &["vm", "list"]);
    assert!(!ok && out.contains("401"), "{out}");
    let (ok, out) = ferry(
        &["--ca", &ca_arg, "--cert", &admin_cert],
        &["vm", "migrate", "alpha", "--to", "node2"],
    );
    assert!(ok, "{out}");
    assert_eq!(c.assert_one_owner("alpha"), "node2");
    c.assert_verify("node2", "alpha", 1);
    let (ok, out) = ferry(
        &["--ca", &ca_arg, "--cert", &viewer_cert],
        &["vm", "show", "alpha"],
    );
    assert!(ok && out.contains("state running on node2"), "{out}");
    c.post("node2", "/v1/vms/alpha/stop", json!({}));
}
