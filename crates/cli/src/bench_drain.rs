//! `ferry bench-drain`: a drain of N VMs off one node at several concurrencies, each on a fresh
//! local 3-node cluster (agents on loopback, the embedded store, real workers): the drain's
//! wall time and the downtime and total time of its migrations, from the drain report. The
//! guests dirty a small working set at a paced rate (they sleep between writes, so N of them
//! fit 2 CPUs) and print heartbeats.

use anyhow::{bail, Context, Result};
use cluster::VmRecord;
use contract::api::{CreateVm, DrainReport, DrainRequest};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Options {
    pub vms: usize,
    pub memory_mib: u64,
    pub concurrency: Vec<usize>,
    pub report: Option<PathBuf>,
    /// The agents run `--store-commit` (the store's swap at the commit point, in the downtime).
    pub store_commit: bool,
}

/// One drain.
pub struct Row {
    pub concurrency: usize,
    pub wall_ms: f64,
    pub moved: usize,
    pub failed: usize,
    pub max_concurrent: usize,
    pub worst_downtime_ms: f64,
    pub median_downtime_ms: f64,
    pub median_total_ms: f64,
    pub errors: Vec<String>,
}

/// A local cluster of agents on loopback (stopped, with their workers, when dropped).
pub(crate) struct Local {
    dir: PathBuf,
    /// (node, API address, process)
    pub agents: Vec<(String, String, Child)>,
}

impl Drop for Local {
    fn drop(&mut self) {
        for (name, _, _) in &self.agents {
            testbed::bed::shutdown_workers(&self.dir.join(name));
        }
        for (_, _, c) in &mut self.agents {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Local {
    /// Creates VM `name` on `node` (the test guest, `memory_mib`, kernel command line
    /// `cmdline`) and starts it.
    pub(crate) fn start_vm(
        &self,
        node: &str,
        name: &str,
        memory_mib: u64,
        cmdline: &str,
    ) -> Result<()> {
        let a = self.addr(node)?;
        let toml =
            format!("name = \"{name}\"\nmemory_mib = {memory_mib}\ncmdline = \"{cmdline}\"\n");
        let _: VmRecord = api(agent::client::post(
            a,
            "/v1/vms",
            &CreateVm {
                spec: None,
                toml: Some(toml),
                node: Some(node.into()),
            },
            Some(Duration::from_secs(30)),
        ))?;
        let _: VmRecord = api(agent::client::post(
            a,
            &format!("/v1/vms/{name}/start"),
            &json!({}),
            Some(Duration::from_secs(60)),
        ))?;
        Ok(())
    }

    /// Waits (until `since` + 60 s) for VM `name` on `node` to print its third heartbeat.
    pub(crate) fn await_heartbeats(&self, node: &str, name: &str, since: Instant) -> Result<()> {
        let log = self
            .dir
            .join(node)
            .join("vms")
            .join(name)
            .join("console/serial.log");
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("\nhb 0 3 ")
        {
            if since.elapsed() > Duration::from_secs(60) {
                bail!("{name} printed no heartbeats in 60 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn addr(&self, node: &str) -> Result<&str> {
        self.agents
            .iter()
            .find(|(n, _, _)| n == node)
            .map(|(_, a, _)| a.as_str())
            .ok_or_else(|| anyhow::anyhow!("no agent for {node}"))
    }
}

pub(crate) fn api<T>(r: Result<T, agent::AgentError>) -> Result<T> {
    r.map_err(|e| anyhow::anyhow!("{e}"))
}

fn start(dir: &Path, max: usize, store_commit: bool) -> Result<Local> {
    std::fs::create_dir_all(dir)?;
    let store = format!("sqlite://{}", dir.join("cluster.db").display());
    let max = max.to_string();
    let mut extra = vec!["--max-outgoing", &max, "--max-incoming", &max];
    if store_commit {
        extra.push("--store-commit");
    }
    start_local(dir, &["node1", "node2", "node3"], &store, &extra)
}

/// Starts one agent per name in `dir` on the store `store`, each with `extra` arguments.
pub(crate) fn start_local(
    dir: &Path,
    nodes: &[&str],
    store: &str,
    extra: &[&str],
) -> Result<Local> {
    let exe = std::env::current_exe()?;
    if !exe.with_file_name("ferry-vmm").is_file() {
        bail!("ferry-vmm is not next to {}", exe.display());
    }
    std::fs::create_dir_all(dir)?;
    let mut l = Local {
        dir: dir.to_path_buf(),
        agents: Vec::new(),
    };
    for &name in nodes {
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let addr_file = dir.join(format!("{name}.addr"));
        let mut child = Command::new(&exe)
            .args(["agent", "--node", name, "--listen", "127.0.0.1:0"])
            .args(["--store", store, "--data-dir"])
            .arg(dir.join(name))
            .args(extra)
            .args(["--lease-ttl-s", "5", "--address-file"])
            .arg(&addr_file)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .context("cannot start an agent")?;
        let Some(addr) = crate::wait_for_agent(name, &addr_file, &mut child) else {
            bail!("agent {name} did not come up (see {})", dir.display());
        };
        l.agents.push((name.into(), addr, child));
    }
    Ok(l)
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn drain_once(opts: &Options, c: usize) -> Result<Row> {
    let dir = std::env::temp_dir().join(format!("ferry-bench-drain-{}-{c}", std::process::id()));
    let l = start(&dir, c.max(4), opts.store_commit)?;
    let a1 = l.agents[0].1.clone();
    for i in 0..opts.vms {
        l.start_vm(
            "node1",
            &format!("vm{i}"),
            opts.memory_mib,
            "ferry.workload=dirty ferry.wss_mib=16 ferry.rate_mibs=20 ferry.hb_ms=100",
        )?;
    }
    // Every guest running its workload.
    let t0 = Instant::now();
    for i in 0..opts.vms {
        l.await_heartbeats("node1", &format!("vm{i}"), t0)?;
    }
    let t = Instant::now();
    let r: DrainReport = api(agent::client::post(
        &a1,
        "/v1/nodes/node1/drain",
        &DrainRequest {
            concurrency: Some(c),
        },
        None,
    ))?;
    let wall_ms = t.elapsed().as_secs_f64() * 1000.0;
    let sums: Vec<_> = r.vms.iter().filter_map(|v| v.summary.clone()).collect();
    Ok(Row {
        concurrency: c,
        wall_ms,
        moved: r.moved,
        failed: r.failed,
        max_concurrent: r.max_concurrent,
        worst_downtime_ms: sums.iter().map(|s| s.downtime_ms).fold(0.0, f64::max),
        median_downtime_ms: median(sums.iter().map(|s| s.downtime_ms).collect()),
        median_total_ms: median(sums.iter().map(|s| s.total_ms).collect()),
        errors: r
            .vms
            .iter()
            .filter_map(|v| v.error.as_ref().map(|e| format!("{}: {e}", v.vm)))
            .collect(),
    })
}

pub fn report(opts: &Options, rows: &[Row]) -> String {
    let mut s = format!(
        "## Drain of {} VMs ({} MiB each, dirtying 16 MiB at 20 MiB/s) off node1 of a local 3-node cluster{}\n\n\
         | concurrency | drain wall time | moved | failed | most at once | worst downtime | median downtime | median migration total |\n\
         |---|---|---|---|---|---|---|---|\n",
        opts.vms,
        opts.memory_mib,
        if opts.store_commit {
            " (--store-commit)"
        } else {
            ""
        }
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {:.0} ms | {} | {} | {} | {:.2} ms | {:.2} ms | {:.0} ms |\n",
            r.concurrency,
            r.wall_ms,
            r.moved,
            r.failed,
            r.max_concurrent,
            r.worst_downtime_ms,
            r.median_downtime_ms,
            r.median_total_ms
        ));
    }
    for r in rows {
        for e in &r.errors {
            s.push_str(&format!("\nconcurrency {}: {e}", r.concurrency));
        }
    }
    s
}

pub fn run(opts: &Options) -> Result<()> {
    if opts.vms == 0 || opts.concurrency.is_empty() || opts.concurrency.contains(&0) {
        bail!("give at least one VM and concurrencies of 1 or more");
    }
    let mut rows = Vec::new();
    for &c in &opts.concurrency {
        eprintln!("bench-drain: {} VMs at concurrency {c}", opts.vms);
        rows.push(drain_once(opts, c)?);
    }
    let text = report(opts, &rows);
    println!("{text}");
    if let Some(p) = &opts.report {
        std::fs::write(p, &text).with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}
