//! `ferry demo`: a local 3-node cluster (agents on loopback, embedded store, temp directory), a
//! test-guest VM verifying its memory, live-migrated node1 -> node2 -> node3, with proof that
//! the guest kept running.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Cluster {
    dir: PathBuf,
    agents: Vec<(String, String, Child)>,
    keep: bool,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Stop the VM's worker first (agents leave workers running by design).
        for (name, _, _) in &self.agents {
            let sock = self
                .dir
                .join(name)
                .join("vms")
                .join("demo")
                .join("api.sock");
            if sock.exists() {
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

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
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

pub fn run(keep: bool) -> Result<()> {
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
    for i in 1..=3 {
        let name = format!("node{i}");
        let addr = format!("127.0.0.1:{}", free_port()?);
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let child = Command::new(&exe)
            .args([
                "agent",
                "--node",
                &name,
                "--listen",
                &addr,
                "--store",
                &store,
                "--data-dir",
            ])
            .arg(dir.join(&name))
            .args(["--lease-ttl-s", "3"])
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .context("cannot start an agent")?;
        cl.agents.push((name, addr, child));
    }
    for (name, addr, _) in &cl.agents {
        let t0 = Instant::now();
        while agent::client::get(addr, "/v1/health").is_err() {
            if t0.elapsed() > Duration::from_secs(20) {
                let log =
                    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
                bail!(
                    "agent {name} did not come up: {}",
                    log.lines().last().unwrap_or("")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let a1 = cl.agents[0].1.clone();
    for n in api(agent::client::get(&a1, "/v1/nodes"))?
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        println!(
            "   {} up at {} ({} cores, {} MiB for VMs)",
            n["name"].as_str().unwrap_or(""),
            n["address"].as_str().unwrap_or(""),
            n["cores"],
            n["memory_mib"]
        );
    }
    let spec = "name = \"demo\"\nvcpus = 2\nmemory_mib = 256\nkernel = \"test-guest\"\ncmdline = \"ferry.workload=verify ferry.wss_mib=64 ferry.hb_ms=100\"\ncpu_profile = \"cluster\"\n";
    println!("\n== creating VM demo on node1 (2 vCPUs, 256 MiB, the guest rewrites and verifies 64 MiB; CPU profile 'cluster')");
    api(agent::client::post(
        &a1,
        "/v1/vms",
        &json!({ "toml": spec, "node": "node1" }),
        Some(Duration::from_secs(30)),
    ))?;
    api(agent::client::post(
        &a1,
        "/v1/vms/demo/start",
        &json!({}),
        Some(Duration::from_secs(60)),
    ))?;
    let serial = |node: &str| dir.join(node).join("vms").join("demo").join("serial.log");
    wait_log(&serial("node1"), "the guest's verifier", |s| {
        s.matches("\nverify ok").count() >= 2
    })?;
    std::thread::sleep(Duration::from_secs(1));
    println!(
        "   guest on node1: {}",
        last_line(&serial("node1"), "verify ok")
    );

    let mut rows: Vec<(String, Value)> = Vec::new();
    for (to, extra) in [
        ("node2", json!({})),
        ("node3", json!({ "streams": 4, "compress": "lz4" })),
    ] {
        let mut body = json!({ "to": to });
        for (k, v) in extra.as_object().cloned().unwrap_or_default() {
            body[k] = v;
        }
        println!(
            "\n== live-migrating demo to {to} {}",
            if extra.as_object().is_some_and(|o| !o.is_empty()) {
                "(4 streams, lz4)"
            } else {
                ""
            }
        );
        let started = api(agent::client::post(
            &a1,
            "/v1/vms/demo/migrate",
            &body,
            Some(Duration::from_secs(60)),
        ))?;
        let id = started["migration"]["id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let runner = started["agent"].as_str().unwrap_or(&a1).to_string();
        let m = crate::follow_migration(&runner, &id, "demo", to, false)?;
        if m["outcome"] != "succeeded" {
            bail!(
                "migration to {to} failed in {}: {}",
                m["phase"].as_str().unwrap_or("?"),
                m["reason"].as_str().unwrap_or("")
            );
        }
        println!("   {}", crate::summary_line("demo", &m));
        let owner = api(agent::client::get(&a1, "/v1/vms/demo"))?["vm"]["owner"]
            .as_str()
            .unwrap_or("")
            .to_string();
        println!("   the store says demo is owned by {owner}");
        wait_log(&serial(to), "the guest on the new node", |s| {
            s.matches("\nverify ok").count() >= 2 || s.starts_with("verify ok")
        })?;
        println!("   guest on {to}: {}", last_line(&serial(to), "verify ok"));
        rows.push((to.to_string(), m));
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
    for (_, m) in &rows {
        let s = &m["summary"];
        println!(
            "{:<7} {:<7} {:>10.0} {:>12.2} {:>10.1} {:>7}",
            m["from"].as_str().unwrap_or(""),
            m["to"].as_str().unwrap_or(""),
            s["total_ms"].as_f64().unwrap_or(0.0),
            s["downtime_ms"].as_f64().unwrap_or(0.0),
            s["bytes_sent"].as_f64().unwrap_or(0.0) / 1048576.0,
            s["passes"]
        );
    }
    api(agent::client::post(
        &a1,
        "/v1/vms/demo/stop",
        &json!({}),
        Some(Duration::from_secs(60)),
    ))?;
    api(agent::client::delete(&a1, "/v1/vms/demo"))?;
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
