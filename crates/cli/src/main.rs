//! `ferry`: the Ferry command line. Talks to a node agent's REST API; `ferry agent` runs one;
//! `ferry demo` runs a whole local cluster and live-migrates a VM across it.

use anyhow::{anyhow, bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

mod bench_net;
mod bench_net_qemu;
mod demo;

#[derive(Parser, Debug)]
#[command(
    name = "ferry",
    version,
    about = "Ferry: a cluster of KVM hosts that live-migrates running VMs"
)]
struct Cli {
    /// Agent to talk to (host:port); default $FERRY_AGENT or 127.0.0.1:7100.
    #[arg(long, global = true)]
    agent: Option<String>,
    /// Output: text or json.
    #[arg(long, global = true, default_value = "text")]
    output: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a node agent (registers the node, runs VM workers, serves the API).
    Agent(AgentArgs),
    /// Nodes of the cluster.
    Node {
        #[command(subcommand)]
        cmd: NodeCmd,
    },
    /// Virtual machines.
    Vm {
        #[command(subcommand)]
        cmd: VmCmd,
    },
    /// Print shell completions.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Probe a VM over the network: ICMP echo and a UDP echo stream at a fixed interval,
    /// every reply verified; prints losses and the longest gap between replies.
    Netprobe {
        /// The VM's IPv4 address.
        target: std::net::Ipv4Addr,
        /// Milliseconds between probes.
        #[arg(long, default_value_t = 10)]
        interval_ms: u64,
        /// UDP echo port (0: ICMP only).
        #[arg(long, default_value_t = 7)]
        udp_port: u16,
        /// Payload bytes per probe.
        #[arg(long, default_value_t = 64)]
        payload: usize,
        /// Stop once this file exists.
        #[arg(long)]
        stop_file: Option<PathBuf>,
        /// Stop after this many seconds.
        #[arg(long)]
        duration_s: Option<f64>,
    },
    /// Benchmark the network-visible downtime of live migrations (root: builds a network
    /// namespace test bed), next to the engine's downtime, with QEMU measured the same way.
    BenchNet {
        /// Migrations per scenario (the VM moves back and forth between two nodes).
        #[arg(long, default_value_t = 6)]
        migrations: usize,
        /// Milliseconds between probes.
        #[arg(long, default_value_t = 10)]
        interval_ms: u64,
        /// Skip the QEMU comparison.
        #[arg(long)]
        no_qemu: bool,
        /// Also write the Markdown report to this file.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Start a local 3-node cluster, run a VM and live-migrate it across the nodes.
    Demo {
        /// Keep the cluster's directory (logs, store) instead of deleting it.
        #[arg(long)]
        keep: bool,
    },
}

#[derive(clap::Args, Debug)]
struct AgentArgs {
    /// Node name (a-z, 0-9, '-').
    #[arg(long)]
    node: String,
    /// Address of the HTTP API, e.g. 127.0.0.1:7100.
    #[arg(long)]
    listen: String,
    /// Cluster store: sqlite:///path/cluster.db (embedded) or etcd://host:port[,host:port].
    #[arg(long)]
    store: String,
    /// Directory for VM sockets and logs.
    #[arg(long)]
    data_dir: PathBuf,
    /// The ferry-vmm binary (default: next to this one).
    #[arg(long)]
    worker_bin: Option<PathBuf>,
    /// Claim only the CPU features of this profile (e.g. baseline).
    #[arg(long)]
    cpu_limit: Option<String>,
    /// vCPUs this node may run (default: 4 per online CPU).
    #[arg(long)]
    cores: Option<u32>,
    /// RAM given to VMs in MiB (default: available memory).
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Shared storage path this node reaches (repeatable).
    #[arg(long)]
    storage: Vec<String>,
    /// Network this node is attached to, `NAME` or `NAME=BRIDGE`: VMs' NICs on it get a TAP
    /// on that bridge (default: a bridge named like the network) (repeatable).
    #[arg(long, value_parser = agent::node::parse_network)]
    network: Vec<(String, String)>,
    /// Node lease TTL in seconds.
    #[arg(long, default_value_t = 5)]
    lease_ttl_s: u64,
    /// Most migrations a drain runs at once.
    #[arg(long, default_value_t = 2)]
    drain_concurrency: usize,
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// Nodes, liveness and use.
    List,
    /// Live-migrate every VM off a node.
    Drain {
        node: String,
        /// Most migrations at once (default: the agent's, 2).
        #[arg(long)]
        concurrency: Option<usize>,
    },
    /// Return a drained node to service.
    Undrain { node: String },
}

#[derive(Subcommand, Debug)]
enum VmCmd {
    /// Create a VM from a TOML spec.
    Create {
        /// The spec file.
        spec: PathBuf,
        /// Owner node (default: the agent's node).
        #[arg(long)]
        node: Option<String>,
    },
    /// VMs.
    List,
    /// One VM, its worker and its migrations.
    Show { vm: String },
    /// Start a VM on its owner node.
    Start { vm: String },
    /// Stop a VM.
    Stop { vm: String },
    /// Delete a stopped VM.
    Delete { vm: String },
    /// Live-migrate a VM to another node (progress bar, then a summary).
    Migrate {
        vm: String,
        /// Destination node.
        #[arg(long, required_unless_present = "cancel")]
        to: Option<String>,
        #[arg(long, default_value_t = 50)]
        max_downtime_ms: u64,
        #[arg(long, default_value_t = 1)]
        streams: u16,
        /// none, lz4 or zstd.
        #[arg(long, default_value = "none")]
        compress: String,
        /// Only run the preflight checks.
        #[arg(long)]
        dry_run: bool,
        /// Bandwidth cap in MiB/s.
        #[arg(long)]
        max_bandwidth_mibs: Option<u64>,
        /// Cancel the VM's running migration instead.
        #[arg(long)]
        cancel: bool,
    },
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                std::process::exit(0);
            }
            let text = e.render().to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("ferry: error: {first} (see ferry --help)");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(cli) {
        eprintln!("ferry: error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}

fn agent_addr(cli: &Cli) -> String {
    cli.agent
        .clone()
        .or_else(|| std::env::var("FERRY_AGENT").ok())
        .unwrap_or_else(|| "127.0.0.1:7100".into())
}

fn json_out(cli: &Cli) -> Result<bool> {
    match cli.output.as_str() {
        "json" => Ok(true),
        "text" => Ok(false),
        o => bail!("unknown output format {o:?} (text, json)"),
    }
}

fn api<T>(r: Result<T, agent::AgentError>) -> Result<T> {
    r.map_err(|e| anyhow!("{e}"))
}

fn run(cli: Cli) -> Result<()> {
    let json = json_out(&cli)?;
    let addr = agent_addr(&cli);
    match &cli.cmd {
        Cmd::Agent(a) => run_agent(a),
        Cmd::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "ferry", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Demo { keep } => demo::run(*keep),
        Cmd::BenchNet {
            migrations,
            interval_ms,
            no_qemu,
            report,
        } => bench_net::run(&bench_net::Options {
            migrations: *migrations,
            interval_ms: *interval_ms,
            qemu: !*no_qemu,
            report: report.clone(),
        }),
        Cmd::Netprobe {
            target,
            interval_ms,
            udp_port,
            payload,
            stop_file,
            duration_s,
        } => {
            if stop_file.is_none() && duration_s.is_none() {
                bail!("give --duration-s or --stop-file");
            }
            let r = agent::netprobe::run(&agent::netprobe::ProbeConfig {
                target: *target,
                interval: Duration::from_millis((*interval_ms).max(1)),
                udp_port: *udp_port,
                payload: (*payload).clamp(16, 1400),
                stop_file: stop_file.clone(),
                duration: duration_s.map(Duration::from_secs_f64),
            })
            .context("cannot probe (raw ICMP sockets need root)")?;
            if json_out(&cli)? {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                for (name, s) in
                    std::iter::once(("icmp", &r.icmp)).chain(r.udp.iter().map(|u| ("udp", u)))
                {
                    println!(
                        "{name}: {} sent, {} received, {} lost (longest run {}), {} corrupt, {} duplicate; longest gap {:.1} ms at {:.0} ms; rtt avg {:.2} ms max {:.2} ms",
                        s.sent, s.received, s.lost, s.max_consecutive_lost, s.corrupt, s.duplicates, s.max_gap_ms, s.max_gap_at_ms, s.rtt_avg_ms, s.rtt_max_ms
                    );
                }
            }
            Ok(())
        }
        Cmd::Node { cmd } => match cmd {
            NodeCmd::List => {
                let v = api(agent::client::get(&addr, "/v1/nodes"))?;
                if json {
                    println!("{v}");
                } else {
                    println!(
                        "{:<12} {:<6} {:<12} {:>11} {:>15} {:>4}  ADDRESS",
                        "NODE", "STATE", "SCHEDULABLE", "VCPUS USED", "MEMORY USED", "VMS"
                    );
                    for n in v.as_array().cloned().unwrap_or_default() {
                        println!(
                            "{:<12} {:<6} {:<12} {:>11} {:>15} {:>4}  {}",
                            n["name"].as_str().unwrap_or(""),
                            if n["alive"] == true { "up" } else { "down" },
                            if n["schedulable"] == true {
                                "yes"
                            } else {
                                "drained"
                            },
                            format!("{}/{}", n["cores_used"], n["cores"]),
                            format!("{}/{} MiB", n["memory_used_mib"], n["memory_mib"]),
                            n["vms"],
                            n["address"].as_str().unwrap_or("")
                        );
                    }
                }
                Ok(())
            }
            NodeCmd::Drain { node, concurrency } => {
                let body = match concurrency {
                    Some(c) => json!({ "concurrency": c }),
                    None => json!({}),
                };
                let v = api(agent::client::post(
                    &addr,
                    &format!("/v1/nodes/{node}/drain"),
                    &body,
                    None,
                ))?;
                if json {
                    println!("{v}");
                } else {
                    for r in v["vms"].as_array().cloned().unwrap_or_default() {
                        match r["ok"] == true {
                            true => println!(
                                "  {:<12} -> {:<10} {}",
                                r["vm"].as_str().unwrap_or(""),
                                r["to"].as_str().unwrap_or("-"),
                                r["note"].as_str().unwrap_or("moved")
                            ),
                            false => println!(
                                "  {:<12} FAILED: {}",
                                r["vm"].as_str().unwrap_or(""),
                                r["error"].as_str().unwrap_or("")
                            ),
                        }
                    }
                    println!(
                        "{node} drained: {} moved, {} failed (at most {} at once)",
                        v["moved"], v["failed"], v["max_concurrent"]
                    );
                }
                if v["failed"].as_u64().unwrap_or(0) > 0 {
                    bail!("{} VMs could not be moved off {node}", v["failed"]);
                }
                Ok(())
            }
            NodeCmd::Undrain { node } => {
                let v = api(agent::client::post(
                    &addr,
                    &format!("/v1/nodes/{node}/undrain"),
                    &json!({}),
                    Some(Duration::from_secs(30)),
                ))?;
                if json {
                    println!("{v}");
                } else {
                    println!("{node} is schedulable again");
                }
                Ok(())
            }
        },
        Cmd::Vm { cmd } => vm_cmd(&addr, json, cmd),
    }
}

fn vm_cmd(addr: &str, json: bool, cmd: &VmCmd) -> Result<()> {
    let print = |v: &Value, text: String| {
        if json {
            println!("{v}");
        } else {
            println!("{text}");
        }
    };
    match cmd {
        VmCmd::Create { spec, node } => {
            let toml = std::fs::read_to_string(spec)
                .with_context(|| format!("cannot read {}", spec.display()))?;
            let mut body = json!({ "toml": toml });
            if let Some(n) = node {
                body["node"] = json!(n);
            }
            let v = api(agent::client::post(
                addr,
                "/v1/vms",
                &body,
                Some(Duration::from_secs(30)),
            ))?;
            print(
                &v,
                format!(
                    "created VM {} on {}",
                    v["spec"]["name"].as_str().unwrap_or(""),
                    v["owner"].as_str().unwrap_or("")
                ),
            );
        }
        VmCmd::List => {
            let v = api(agent::client::get(addr, "/v1/vms"))?;
            if json {
                println!("{v}");
            } else {
                println!(
                    "{:<14} {:<10} {:<10} {:>5} {:>8}  LAST ERROR",
                    "VM", "STATE", "NODE", "VCPUS", "MEMORY"
                );
                for r in v.as_array().cloned().unwrap_or_default() {
                    println!(
                        "{:<14} {:<10} {:<10} {:>5} {:>5} MiB  {}",
                        r["spec"]["name"].as_str().unwrap_or(""),
                        r["state"].as_str().unwrap_or(""),
                        r["owner"].as_str().unwrap_or(""),
                        r["spec"]["vcpus"],
                        r["spec"]["memory_mib"],
                        r["last_error"].as_str().unwrap_or("")
                    );
                }
            }
        }
        VmCmd::Show { vm } => {
            let v = api(agent::client::get(addr, &format!("/v1/vms/{vm}")))?;
            if json {
                println!("{v}");
            } else {
                let r = &v["vm"];
                println!(
                    "VM {} ({} vCPUs, {} MiB, kernel {}, cpu profile {})",
                    vm,
                    r["spec"]["vcpus"],
                    r["spec"]["memory_mib"],
                    r["spec"]["kernel"].as_str().unwrap_or(""),
                    r["spec"]["cpu_profile"].as_str().unwrap_or("")
                );
                println!(
                    "  state {} on {}",
                    r["state"].as_str().unwrap_or(""),
                    r["owner"].as_str().unwrap_or("")
                );
                if let Some(e) = r["last_error"].as_str() {
                    println!("  last error: {e}");
                }
                if let Some(w) = v["worker"].as_object() {
                    println!(
                        "  worker: pid {} state {} uptime {:.1} s",
                        w.get("pid").cloned().unwrap_or_default(),
                        w.get("state").and_then(|s| s.as_str()).unwrap_or(""),
                        w.get("uptime_s").and_then(|s| s.as_f64()).unwrap_or(0.0)
                    );
                }
                for m in v["migrations"].as_array().cloned().unwrap_or_default() {
                    println!(
                        "  migration {} {} -> {}: {} ({}){}",
                        m["id"].as_str().unwrap_or(""),
                        m["from"].as_str().unwrap_or(""),
                        m["to"].as_str().unwrap_or(""),
                        m["outcome"].as_str().unwrap_or(""),
                        m["phase"].as_str().unwrap_or(""),
                        m["reason"]
                            .as_str()
                            .map(|r| format!(": {r}"))
                            .unwrap_or_default()
                    );
                }
            }
        }
        VmCmd::Start { vm } => {
            let v = api(agent::client::post(
                addr,
                &format!("/v1/vms/{vm}/start"),
                &json!({}),
                Some(Duration::from_secs(60)),
            ))?;
            print(
                &v,
                format!("VM {vm} running on {}", v["owner"].as_str().unwrap_or("")),
            );
        }
        VmCmd::Stop { vm } => {
            let v = api(agent::client::post(
                addr,
                &format!("/v1/vms/{vm}/stop"),
                &json!({}),
                Some(Duration::from_secs(60)),
            ))?;
            print(&v, format!("VM {vm} stopped"));
        }
        VmCmd::Delete { vm } => {
            let v = api(agent::client::delete(addr, &format!("/v1/vms/{vm}")))?;
            print(&v, format!("VM {vm} deleted"));
        }
        VmCmd::Migrate {
            vm,
            to,
            max_downtime_ms,
            streams,
            compress,
            dry_run,
            max_bandwidth_mibs,
            cancel,
        } => {
            if *cancel {
                let v = api(agent::client::get(addr, &format!("/v1/vms/{vm}")))?;
                let id = v["vm"]["migration"]
                    .as_str()
                    .ok_or_else(|| anyhow!("VM {vm} has no running migration"))?
                    .to_string();
                let r = api(agent::client::post(
                    addr,
                    &format!("/v1/migrations/{id}/cancel"),
                    &json!({}),
                    Some(Duration::from_secs(30)),
                ))?;
                print(&r, format!("cancelling migration {id}"));
                return Ok(());
            }
            let to = to.clone().expect("required by clap");
            let body = json!({
                "to": to,
                "max_downtime_ms": max_downtime_ms,
                "streams": streams,
                "compress": compress,
                "dry_run": dry_run,
                "max_bandwidth_mibs": max_bandwidth_mibs,
            });
            let started = api(agent::client::post(
                addr,
                &format!("/v1/vms/{vm}/migrate"),
                &body,
                Some(Duration::from_secs(60)),
            ))?;
            if *dry_run {
                print(
                    &started,
                    format!("preflight OK: VM {vm} can move to {to} (dry run, nothing moved)"),
                );
                return Ok(());
            }
            let id = started["migration"]["id"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let runner = started["agent"].as_str().unwrap_or(addr).to_string();
            let record = follow_migration(&runner, &id, vm, &to, json)?;
            if record["outcome"] != "succeeded" {
                bail!(
                    "migration of {vm} to {to} failed in {}: {}",
                    record["phase"].as_str().unwrap_or("?"),
                    record["reason"].as_str().unwrap_or("unknown reason")
                );
            }
            if !json {
                println!("{}", summary_line(vm, &record));
            }
        }
    }
    Ok(())
}

/// Follows a migration's events with a progress bar (text) or as JSON lines; returns the final
/// record.
pub fn follow_migration(agent: &str, id: &str, vm: &str, to: &str, json: bool) -> Result<Value> {
    use indicatif::{ProgressBar, ProgressStyle};
    let bar = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(1000)
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{vm} -> {to}"));
    let mut last = Value::Null;
    api(agent::client::follow_events(
        agent,
        &format!("/v1/migrations/{id}/events"),
        |ev| {
            if json {
                println!("{ev}");
            }
            match ev["event"].as_str() {
                Some("progress") => {
                    let p = &ev["progress"];
                    let sent = p["pages_sent"].as_f64().unwrap_or(0.0);
                    let rem = p["remaining_pages"].as_f64().unwrap_or(0.0);
                    if sent + rem > 0.0 {
                        bar.set_position(((sent / (sent + rem)) * 1000.0).min(1000.0) as u64);
                    }
                    bar.set_message(format!(
                    "{} pass {} | {:.1} MiB sent, {:.1} MiB left | dirty {:.0} MiB/s | {:.0} MiB/s | expect {:.1} ms down | throttle {}%",
                    ev["phase"].as_str().unwrap_or(""),
                    p["pass"].as_u64().unwrap_or(0),
                    p["bytes_sent"].as_f64().unwrap_or(0.0) / 1048576.0,
                    p["remaining_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
                    p["dirty_rate_mibs"].as_f64().unwrap_or(0.0),
                    p["bandwidth_mibs"].as_f64().unwrap_or(0.0),
                    p["expected_downtime_ms"].as_f64().unwrap_or(0.0),
                    p["throttle_pct"].as_u64().unwrap_or(0),
                ));
                    true
                }
                Some("done") => {
                    last = ev["migration"].clone();
                    false
                }
                _ => {
                    last = ev.clone();
                    false
                }
            }
        },
    ))?;
    bar.set_position(1000);
    bar.finish_and_clear();
    if last.is_null() {
        // The stream ended early (agent restarted): read the record.
        last =
            api(agent::client::get(agent, &format!("/v1/migrations/{id}")))?["migration"].clone();
    }
    Ok(last)
}

/// One line describing a finished migration.
pub fn summary_line(vm: &str, m: &Value) -> String {
    let s = &m["summary"];
    let d = &s["downtime"];
    format!(
        "migrated {vm} {} -> {} in {:.0} ms: downtime {:.2} ms (final memory {:.2}, state {:.2}, commit {:.2}), {} passes, {:.1} MiB",
        m["from"].as_str().unwrap_or(""),
        m["to"].as_str().unwrap_or(""),
        s["total_ms"].as_f64().unwrap_or(0.0),
        s["downtime_ms"].as_f64().unwrap_or(0.0),
        d["final_memory_ms"].as_f64().unwrap_or(0.0),
        d["state_ms"].as_f64().unwrap_or(0.0),
        d["commit_ms"].as_f64().unwrap_or(0.0),
        s["passes"],
        s["bytes_sent"].as_f64().unwrap_or(0.0) / 1048576.0,
    )
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

fn run_agent(a: &AgentArgs) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let worker_bin = match &a.worker_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("ferry-vmm"),
    };
    if !worker_bin.is_file() {
        bail!("worker binary {} not found (build it with cargo build -p worker, or pass --worker-bin)", worker_bin.display());
    }
    let cfg = agent::AgentConfig {
        node: a.node.clone(),
        listen: a.listen.clone(),
        store: a.store.clone(),
        data_dir: a.data_dir.clone(),
        worker_bin,
        cpu_limit: a.cpu_limit.clone(),
        cores: a.cores,
        memory_mib: a.memory_mib,
        storage: a.storage.clone(),
        networks: a.network.clone(),
        lease_ttl: Duration::from_secs(a.lease_ttl_s.max(1)),
        drain_concurrency: a.drain_concurrency.max(1),
    };
    if let Some(p) = &cfg.cpu_limit {
        if !["host", "baseline"].contains(&p.as_str()) {
            bail!("unknown CPU profile {p:?} for --cpu-limit (host, baseline)");
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&cfg.listen)
            .await
            .with_context(|| format!("cannot listen on {}", cfg.listen))?;
        let agent = tokio::task::spawn_blocking(move || agent::Agent::start(cfg)).await??;
        agent.spawn_background();
        tracing::info!(
            "node {} agent listening on {}",
            agent.name(),
            agent.cfg.listen
        );
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
            libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        }
        let app = agent::api::router(agent);
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                while !STOP.load(std::sync::atomic::Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
            .await?;
        tracing::info!("agent stopped; VM workers keep running");
        Ok::<(), anyhow::Error>(())
    })
}
