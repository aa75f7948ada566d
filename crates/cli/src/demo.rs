//! `ferry demo`: a local 3-node cluster (agents on loopback, embedded store, temp directory), a
//! test-guest VM verifying its memory, live-migrated node1 -> node2 -> node3, with proof that
//! the guest kept running.

use anyhow::{bail, Context, Result};
use cluster::{MigrationOutcome, MigrationRecord, VmRecord};
use contract::api::{CreateVm, Deleted, MigrateRequest, MigrationStarted, NodeView, VmView};
use contract::{Compression, MigrationParams};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

struct Cluster {
    dir: PathBuf,
    agents: Vec<(String, String, Child)>,
    keep: bool,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Stop the VMs' workers first (agents leave workers running by design): the demo's
        // VM, and any a console user created (`--serve`).
        for (name, _, _) in &self.agents {
            let vms = self.dir.join(name).join("vms");
            for e in std::fs::read_dir(&vms).into_iter().flatten().flatten() {
                let sock = e.path().join("api.sock");
                if !sock.exists() {
                    continue;
                }
                let _ = Command::new(
                    std::env::current_exe()
                        .unwrap_or_default()
                        .with_file_name("ferry-vmm"),
                )
                .args(["ctl", "--api-socket"])
                .arg(&sock)
                .arg("shutdown")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            }
        }
        for (_, _, c) in &mut self.agents {
            // SAFETY: plain kill(2) of our own child process.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        for (_, _, c) in &mut self.agents {
            let _ = c.wait();
        }
        if self.keep {
            eprintln!("cluster directory kept: {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn api<T>(r: Result<T, agent::AgentError>) -> Result<T> {
    r.map_err(|e| anyhow::anyhow!("{e}"))
}

fn wait_log(path: &Path, what: &str, pred: impl Fn(&str) -> bool) -> Result<String> {
    let t0 = Instant::now();
    loop {
        let s = std::fs::read_to_string(path).unwrap_or_default();
        if pred(&s) {
            return Ok(s);
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn run(keep: bool, serve: bool) -> Result<()> {
    let exe = std::env::current_exe()?;
    let dir = std::env::temp_dir().join(format!("ferry-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let store = format!("sqlite://{}", dir.join("cluster.db").display());
    let mut cl = Cluster {
        dir: dir.clone(),
        agents: Vec::new(),
        keep,
    };
    println!(
        "== starting a 3-node cluster on loopback (embedded store {})",
        dir.join("cluster.db").display()
    );
    // Each agent binds a free port itself (`--listen 127.0.0.1:0`) and writes the address it
    // serves on to a file: no port is picked here and then raced for.
    // The cluster's own PKI: a CA and a certificate per node, so that every migration runs
    // over mutual TLS with the nodes' identities checked.
    let pki = dir.join("pki");
    trust::pki::init(&pki, false)?;
    for i in 1..=3 {
        trust::pki::issue(
            &pki,
            &trust::Identity::node(&format!("node{i}"))?,
            &["127.0.0.1".into()],
            30,
        )?;
    }
    println!(
        "   cluster CA and node certificates in {}: every migration runs over mutual TLS, each worker checking the other is the node the plan names, with a one-time secret per receiver",
        pki.display()
    );
    // The agents' API is HTTPS with their node certificates; agents call each other with
    // them. This demo's own requests are an admin user's, by certificate; a viewer token
    // shows the other kind of credential (read-only).
    let admin = trust::pki::issue(
        &pki,
        &trust::Identity::user("demo-admin", contract::trust::Role::Admin)?,
        &[],
        30,
    )?;
    agent::client::set_tls(Some(agent::client::ClientTls {
        roots: trust::api::load_roots(&admin.ca)?,
        creds: Some(trust::tls::Credentials::load(&admin)?),
    }));
    let tokens = dir.join("tokens.json");
    let viewer = trust::token::issue(&tokens, "demo-viewer", contract::auth::Grant::Viewer)?;
    trust::secret::write_private(&dir.join("viewer.token"), viewer.as_bytes())?;
    // --serve: the browser's credential (a browser has no client certificate of this CA).
    let console_token = if serve {
        let t = trust::token::issue(&tokens, "demo-console", contract::auth::Grant::Admin)?;
        trust::secret::write_private(&dir.join("console.token"), t.as_bytes())?;
        Some(t)
    } else {
        None
    };
    println!(
        "   the API is HTTPS and needs a credential: the admin's certificate {} (ferry --ca {} --cert ...), or a token of {} (a viewer's is in viewer.token)",
        admin.cert.display(),
        admin.ca.display(),
        tokens.display()
    );
    let mut pending = Vec::new();
    for i in 1..=3 {
        let name = format!("node{i}");
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let addr_file = dir.join(format!("{name}.addr"));
        let child = Command::new(&exe)
            .args([
                "agent",
                "--node",
                &name,
                "--listen",
                "127.0.0.1:0",
                "--store",
                &store,
                "--data-dir",
            ])
            .arg(dir.join(&name))
            .arg("--pki-dir")
            .arg(&pki)
            .arg("--api-tokens")
            .arg(&tokens)
            .args(["--lease-ttl-s", "3", "--address-file"])
            .arg(&addr_file)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .context("cannot start an agent")?;
        pending.push((name, addr_file, child));
    }
    for (name, addr_file, mut child) in pending {
        let Some(addr) = crate::wait_for_agent(&name, &addr_file, &mut child) else {
            let log = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
            bail!(
                "agent {name} did not come up: {}",
                log.lines().last().unwrap_or("")
            );
        };
        cl.agents.push((name, addr, child));
    }
    let a1 = cl.agents[0].1.clone();
    let nodes: Vec<NodeView> = api(agent::client::get(&a1, "/v1/nodes"))?;
    for n in nodes {
        println!(
            "   {} up at {} ({} cores, {} MiB for VMs)",
            n.name, n.address, n.cores, n.memory_mib
        );
    }
    let spec = "name = \"demo\"\nvcpus = 2\nmemory_mib = 256\nkernel = \"test-guest\"\ncmdline = \"ferry.workload=verify ferry.wss_mib=64 ferry.hb_ms=100\"\ncpu_profile = \"cluster\"\n";
    println!("\n== creating VM demo on node1 (2 vCPUs, 256 MiB, the guest rewrites and verifies 64 MiB; CPU profile 'cluster')");
    let _: VmRecord = api(agent::client::post(
        &a1,
        "/v1/vms",
        &CreateVm {
            spec: None,
            toml: Some(spec.into()),
            node: Some("node1".into()),
        },
        Some(Duration::from_secs(30)),
    ))?;
    let _: VmRecord = api(agent::client::post(
        &a1,
        "/v1/vms/demo/start",
        &json!({}),
        Some(Duration::from_secs(60)),
    ))?;
    let serial = |node: &str| {
        dir.join(node)
            .join("vms")
            .join("demo")
            .join("console")
            .join("serial.log")
    };
    wait_log(&serial("node1"), "the guest's verifier", |s| {
        s.matches("\nverify ok").count() >= 2
    })?;
    std::thread::sleep(Duration::from_secs(1));
    println!(
        "   guest on node1: {}",
        last_line(&serial("node1"), "verify ok")
    );

    let mut rows: Vec<MigrationRecord> = Vec::new();
    let four_lz4 = MigrationParams {
        streams: 4,
        compression: Compression::Lz4,
        ..Default::default()
    };
    for (to, params) in [("node2", MigrationParams::default()), ("node3", four_lz4)] {
        println!(
            "\n== live-migrating demo to {to} {}",
            if params.streams > 1 {
                "(4 streams, lz4)"
            } else {
                ""
            }
        );
        let body = MigrateRequest {
            to: to.into(),
            dry_run: false,
            params,
        };
        let started: MigrationStarted = api(agent::client::post(
            &a1,
            "/v1/vms/demo/migrate",
            &body,
            Some(Duration::from_secs(60)),
        ))?;
        let id = started.migration.id.clone();
        let m = crate::follow_migration(&[started.agent.as_str(), &a1], &id, "demo", to, false)?;
        if m.outcome != MigrationOutcome::Succeeded {
            bail!(
                "migration to {to} {} in {}: {}",
                m.outcome,
                m.phase,
                m.reason.as_deref().unwrap_or("")
            );
        }
        println!("   {}", crate::summary_line("demo", &m));
        let v: VmView = api(agent::client::get(&a1, "/v1/vms/demo"))?;
        println!("   the store says demo is owned by {}", v.vm.owner);
        wait_log(&serial(to), "the guest on the new node", |s| {
            s.matches("\nverify ok").count() >= 2 || s.starts_with("verify ok")
        })?;
        println!("   guest on {to}: {}", last_line(&serial(to), "verify ok"));
        rows.push(m);
    }

    // The guest's own account, across the three nodes.
    let text: String = ["node1", "node2", "node3"]
        .iter()
        .map(|n| std::fs::read_to_string(serial(n)).unwrap_or_default())
        .collect();
    let (jumps, per_cpu, ok, bad) = guest_report(&text);
    println!("\n== the guest across node1, node2, node3");
    println!(
        "   heartbeat counters: {} ({})",
        if jumps == 0 {
            "continuous, no reset"
        } else {
            "BROKEN"
        },
        per_cpu
            .iter()
            .map(|(c, n)| format!("cpu {c}: 1..{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("   memory verifier: {ok} clean sweeps, {bad} corrupt");
    println!(
        "\n{:<7} {:<7} {:>10} {:>12} {:>10} {:>7}",
        "from", "to", "total ms", "downtime ms", "MiB", "passes"
    );
    for m in &rows {
        let s = m.summary.clone().unwrap_or_default();
        println!(
            "{:<7} {:<7} {:>10.0} {:>12.2} {:>10.1} {:>7}",
            m.from,
            m.to,
            s.total_ms,
            s.downtime_ms,
            s.bytes_sent as f64 / 1048576.0,
            s.passes
        );
    }
    if let Some(token) = console_token {
        if jumps != 0 || bad != 0 {
            println!("\n!! the guest noticed: {jumps} heartbeat jumps, {bad} corrupt sweeps");
        }
        println!("\n== the cluster keeps running, VM demo on node3: the web console");
        for (name, addr, _) in &cl.agents {
            println!("   {name}: https://{addr}/");
        }
        println!(
            "   sign in with the admin token {token} (also in {}); the certificate is the cluster CA's ({}): import it into the browser, or accept the warning",
            dir.join("console.token").display(),
            pki.join("ca.pem").display()
        );
        println!("   press Enter (or Ctrl-C) to stop the cluster");
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
            libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        }
        std::thread::spawn(|| {
            // A closed stdin (`< /dev/null`, a service) is no request to stop: then only a
            // signal stops the cluster.
            let mut line = String::new();
            if matches!(std::io::stdin().read_line(&mut line), Ok(n) if n > 0) {
                STOP.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        });
        while !STOP.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
        println!("\n== stopping the cluster");
        return Ok(());
    }
    let _: VmRecord = api(agent::client::post(
        &a1,
        "/v1/vms/demo/stop",
        &json!({}),
        Some(Duration::from_secs(60)),
    ))?;
    let _: Deleted = api(agent::client::delete(&a1, "/v1/vms/demo"))?;
    println!("\n== VM stopped and deleted; shutting the cluster down");
    if jumps != 0 || bad != 0 {
        bail!("the guest noticed: {jumps} heartbeat jumps, {bad} corrupt sweeps");
    }
    Ok(())
}

fn last_line(path: &Path, prefix: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .rev()
        .find(|l| l.starts_with(prefix))
        .unwrap_or("")
        .to_string()
}

/// (heartbeat counter jumps, last counter per CPU, clean sweeps, bad sweeps).
fn guest_report(text: &str) -> (usize, Vec<(u32, u64)>, usize, usize) {
    let mut last: std::collections::BTreeMap<u32, u64> = Default::default();
    let mut jumps = 0;
    let (mut ok, mut bad) = (0, 0);
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() == 4 && f[0] == "hb" {
            if let (Ok(c), Ok(n)) = (f[1].parse::<u32>(), f[2].parse::<u64>()) {
                if let Some(p) = last.get(&c) {
                    if n != p + 1 {
                        jumps += 1;
                    }
                } else if n != 1 {
                    jumps += 1;
                }
                last.insert(c, n);
            }
        } else if l.starts_with("verify ok") {
            ok += 1;
        } else if l.starts_with("verify CORRUPT") || l.starts_with("verify bad") {
            bad += 1;
        }
    }
    (jumps, last.into_iter().collect(), ok, bad)
}
