//! The REST API with `--api-tokens`: no credential or an unknown token -> 401, a role that does
//! not allow the request -> 403, both with a JSON error and nothing changed; viewers read,
//! operators migrate, admins create; the internal endpoints only for peer agents' node tokens,
//! which the agents present to each other (the migration below needs node1 -> node2 calls).

mod common;

use common::{Cluster, GUEST};
use contract::auth::Grant;
use serde_json::{json, Value};
use std::process::Command;

fn with_auth<B>(r: ureq::RequestBuilder<B>, token: Option<&str>) -> ureq::RequestBuilder<B> {
    match token {
        Some(t) => r.header("Authorization", format!("Bearer {t}")),
        None => r,
    }
}

/// A raw request: (status, JSON body).
fn call(method: &str, url: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = match method {
        "GET" => with_auth(agent.get(url), token).call(),
        "DELETE" => with_auth(agent.delete(url), token).call(),
        "PUT" => with_auth(agent.put(url), token).send_json(body.unwrap_or(json!({}))),
        _ => with_auth(agent.post(url), token).send_json(body.unwrap_or(json!({}))),
    }
    .unwrap();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    (
        resp.status().as_u16(),
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[test]
fn every_request_needs_a_token_whose_role_allows_it_and_agents_use_node_tokens() {
    let mut c = Cluster::new(false);
    let dir = c.dir.path().to_path_buf();
    let tokens = dir.join("tokens.json");
    let issue = |name: &str, g: Grant| trust::token::issue(&tokens, name, g).unwrap();
    for n in ["node1", "node2"] {
        let t = issue(n, Grant::Node);
        std::fs::write(dir.join(format!("{n}.token")), t).unwrap();
    }
    let admin = issue("alice", Grant::Admin);
    let operator = issue("olga", Grant::Operator);
    let viewer = issue("vic", Grant::Viewer);
    // The harness's own requests (health checks, VM creation) are the admin's.
    agent::client::set_token(Some(admin.clone()));
    let tokens_arg = tokens.display().to_string();
    for n in ["node1", "node2"] {
        let nt = dir.join(format!("{n}.token")).display().to_string();
        c.add(n, &["--api-tokens", &tokens_arg, "--node-token-file", &nt]);
    }
    let base = format!("http://{}", c.addr("node1"));

    // No credential, a malformed one, an unknown token: 401 with a JSON reason.
    let (s, b) = call("GET", &format!("{base}/v1/health"), None, None);
    assert_eq!(s, 401, "{b}");
    assert!(b["error"].as_str().unwrap().contains("credential"), "{b}");
    let (s, b) = call("GET", &format!("{base}/v1/vms"), Some("ferry_00"), None);
    assert_eq!(
        (s, b["error"].as_str()),
        (401, Some("unknown token")),
        "{b}"
    );
    let (s, _) = call("GET", &format!("{base}/metrics"), None, None);
    assert_eq!(s, 401);
    // The web console's page and files need no credential (its login page asks for one);
    // nothing else is reachable through their paths.
    let (s, b) = call("GET", &format!("{base}/"), None, None);
    assert_eq!(s, 200);
    assert!(
        b.as_str()
            .unwrap()
            .contains("<title>Ferry cluster console</title>"),
        "{b}"
    );
    let (s, _) = call("GET", &format!("{base}/assets/x.js"), None, None);
    assert_eq!(s, 404, "an unknown console file");
    for path in ["/assets/%2e%2e%2fv1%2fvms", "/assets/..%2Fv1%2Fvms"] {
        let (s, _) = call("GET", &format!("{base}{path}"), None, None);
        assert_eq!(
            s, 401,
            "{path} is not a console file: it needs a credential"
        );
    }
    let (s, _) = call("GET", &format!("{base}/v1/vms/x/targets"), None, None);
    assert_eq!(s, 401);

    // A viewer reads, and cannot create, start, migrate or call an internal endpoint.
    let (s, b) = call("GET", &format!("{base}/v1/nodes"), Some(&viewer), None);
    assert_eq!(s, 200, "{b}");
    assert_eq!(b.as_array().map(Vec::len), Some(2), "{b}");
    let spec = json!({ "toml": format!("name = \"alpha\"\n{GUEST}"), "node": "node1" });
    for (who, t) in [("viewer", &viewer), ("operator", &operator)] {
        let (s, b) = call(
            "POST",
            &format!("{base}/v1/vms"),
            Some(t),
            Some(spec.clone()),
        );
        assert_eq!(s, 403, "{who} create: {b}");
        assert!(b["error"].as_str().unwrap().contains("Administer"), "{b}");
    }
    let (s, b) = call("GET", &format!("{base}/v1/vms"), Some(&viewer), None);
    assert_eq!(
        (s, b.clone()),
        (200, json!([])),
        "a refused create created something"
    );

    // The admin creates and starts a VM; a viewer cannot stop it or migrate it, nor can the
    // admin reach the internal receive endpoint (peer agents only).
    c.vm("node1", "alpha", GUEST);
    c.assert_verify("node1", "alpha", 1);
    for path in ["/v1/vms/alpha/stop", "/v1/vms/alpha/migrate"] {
        let (s, b) = call("POST", &format!("{base}{path}"), Some(&viewer), None);
        assert_eq!(s, 403, "{path}: {b}");
    }
    let (s, b) = call(
        "POST",
        &format!("{base}/v1/internal/receive"),
        Some(&admin),
        Some(json!({})),
    );
    assert_eq!(s, 403, "{b}");
    let (s, b) = call(
        "DELETE",
        &format!("{base}/v1/vms/alpha"),
        Some(&operator),
        None,
    );
    assert_eq!(s, 403, "operator delete: {b}");
    let (s, b) = call(
        "PUT",
        &format!("{base}/v1/vms/alpha"),
        Some(&operator),
        Some(json!({ "vcpus": 2 })),
    );
    assert_eq!(s, 403, "operator edit: {b}");

    // The CLI with the operator's token migrates it: node1's agent asks node2's for a
    // receiver with its node token. Without a token the CLI says why it was refused.
    let ferry = |token: Option<&str>, args: &[&str]| {
        let mut cmd = Command::new(common::ferry_bin());
        cmd.args(["--agent", &c.addr("node1")])
            .env_remove("FERRY_TOKEN");
        if let Some(t) = token {
            cmd.args(["--token", t]);
        }
        cmd.args(args).output().unwrap()
    };
    let o = ferry(None, &["vm", "list"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = ferry(
        Some(&operator),
        &["vm", "migrate", "alpha", "--to", "node2"],
    );
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(c.assert_one_owner("alpha"), "node2");
    c.assert_verify("node2", "alpha", 1);
    let o = ferry(Some(&viewer), &["vm", "show", "alpha"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("state running on node2"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    c.post("node2", "/v1/vms/alpha/stop", json!({}));
}
