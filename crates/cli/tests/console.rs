//! The web console in a real browser: Debian's Chromium, driven by `web/e2e/console.mjs`
//! (playwright-core), against four real agents with real workers (node3 limited to the
//! baseline CPU), their API on HTTPS with the cluster CA's node certificates. Through the page: sign in with a token, drain a node, create and start a VM,
//! see each node's verdict (missing CPU features by name with the remedy, a drained node),
//! migrate and watch it finish, follow the remedy (stop, CPU profile `cluster`, start) and
//! migrate to the baseline node, cancel a throttled migration, kill the destination's worker
//! mid-way, drain the VM's node. Then this side checks the store and the guest: the records
//! the page showed, one running copy where the store says, the guest's memory verifier clean.
//! Screenshots of every step: `target/tmp/console-e2e/`.

mod common;

use common::Cluster;
use contract::auth::Grant;
use contract::trust::Role;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use trust::Identity;

fn web_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../web")
}

#[test]
fn an_administrator_migrates_cancels_and_drains_through_the_web_console() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).is_file(),
        "{chromium} is missing: scripts/install-deps.sh installs Debian's chromium"
    );
    assert!(
        web_dir().join("node_modules/playwright-core").is_dir(),
        "web/node_modules is missing: scripts/install-deps.sh runs npm ci in web/"
    );
    let mut c = Cluster::new(false);
    let dir = c.dir.path().to_path_buf();
    // The API is HTTPS with the node certificates of a cluster CA (agents call each other
    // with them); the browser signs in with an admin token, this side uses an admin
    // certificate.
    let pki = dir.join("pki");
    trust::pki::init(&pki, false).unwrap();
    let nodes = ["node1", "node2", "node3", "node4"];
    for n in nodes {
        trust::pki::issue(&pki, &Identity::node(n).unwrap(), &["127.0.0.1".into()], 1).unwrap();
    }
    let me = trust::pki::issue(
        &pki,
        &Identity::user("harness", Role::Admin).unwrap(),
        &[],
        1,
    )
    .unwrap();
    agent::client::set_tls(Some(agent::client::ClientTls {
        roots: trust::api::load_roots(&me.ca).unwrap(),
        creds: Some(trust::tls::Credentials::load(&me).unwrap()),
    }));
    let tokens = dir.join("tokens.json");
    let admin = trust::token::issue(&tokens, "console-admin", Grant::Admin).unwrap();
    let tokens_arg = tokens.display().to_string();
    let pki_arg = pki.display().to_string();
    for n in nodes {
        let mut args = vec!["--pki-dir", &pki_arg, "--api-tokens", &tokens_arg];
        if n == "node3" {
            args.extend(["--cpu-limit", "baseline"]);
        }
        c.add(n, &args);
    }
    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-e2e");
    let _ = std::fs::remove_dir_all(&artifacts);
    let mut child = Command::new("node")
        .arg("e2e/console.mjs")
        .current_dir(web_dir())
        .env("FERRY_URL", format!("https://{}/", c.addr("node1")))
        // The browser trusts node1's key alone (an SPKI pin); Node's fetch the cluster CA.
        .env(
            "FERRY_SERVER_CERT",
            trust::pki::node_files(&pki, "node1").cert,
        )
        .env("NODE_EXTRA_CA_CERTS", &me.ca)
        .env("FERRY_TOKEN", &admin)
        .env("FERRY_ARTIFACTS", &artifacts)
        .env("CHROMIUM", &chromium)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node (Node.js) must be installed");
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if t0.elapsed() > Duration::from_secs(480) {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    eprintln!("{out}{err}screenshots: {}", artifacts.display());
    let ok = out
        .lines()
        .find_map(|l| l.strip_prefix("CONSOLE-E2E ok "))
        .filter(|_| status.is_some_and(|s| s.success()));
    let Some(ok) = ok else {
        panic!(
            "the browser test failed ({}): {err}\nnode1 log tail: {}",
            status.map_or("timed out after 480 s".into(), |s| s.to_string()),
            c.agent_log("node1")
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .join("\n")
        );
    };
    // What the page showed is what the store holds.
    let ids: Vec<String> = serde_json::from_str::<serde_json::Value>(ok).unwrap()["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let store = c.store();
    let rec = |id: &str| store.migration(id).unwrap().expect("migration record");
    let want = [
        ("node1", "node2", "succeeded"),
        ("node2", "node3", "succeeded"),
        ("node3", "node1", "cancelled"),
        ("node3", "node1", "failed"),
    ];
    for (id, (from, to, outcome)) in ids.iter().zip(want) {
        let m = rec(id);
        assert_eq!(
            (
                m.from.as_str(),
                m.to.as_str(),
                m.outcome.to_string().as_str()
            ),
            (from, to, outcome),
            "{id}"
        );
        if outcome == "succeeded" {
            let s = m.summary.expect("a summary");
            assert!(s.downtime_ms > 0.0 && s.total_ms > s.downtime_ms, "{s:?}");
        }
    }
    let owner = c.assert_one_owner("web");
    assert!(owner == "node1" || owner == "node2", "drained to {owner}");
    c.assert_verify(&owner, "web", 2);
    let shots = std::fs::read_dir(&artifacts).unwrap().count();
    assert!(
        shots >= 14,
        "{shots} screenshots in {}",
        artifacts.display()
    );
}
