//! `ferry`: the Ferry command line. Talks to a node agent's REST API; `ferry agent` runs one;
//! `ferry demo` runs a whole local cluster and live-migrates a VM across it.

use anyhow::{anyhow, bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use cluster::{MigrationOutcome, MigrationRecord, VmRecord};
use contract::api::{
    CancelReply, CreateVm, Deleted, DrainReport, DrainRequest, MigrateRequest, MigrationEvent,
    MigrationStarted, MigrationView, NodeView, Schedulable, VmView,
};
use contract::MigrationParams;
use serde::Serialize;
use serde_json::json;
use std::path::PathBuf;
use std::time::Duration;

mod bench_commit;
mod bench_drain;
mod bench_net;
mod bench_net_qemu;
mod chaos;
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
    /// API token to present to the agent (`ferry token issue`); default $FERRY_TOKEN.
    #[arg(long, global = true)]
    token: Option<String>,
    /// The cluster CA (`ca.pem` of `ferry pki init`): talk HTTPS to agents started with
    /// --pki-dir, accepting only an agent whose node certificate names the address given;
    /// default $FERRY_CA.
    #[arg(long, global = true)]
    ca: Option<PathBuf>,
    /// A user certificate to present (`ferry pki issue --user NAME --role ROLE`; its key is
    /// the same path with `.key`); needs --ca; default $FERRY_CERT.
    #[arg(long, global = true)]
    cert: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// Issue an API token: its SHA-256 goes into the tokens file FILE (created 0600; an entry of
    /// the same name is replaced), the token is printed once and kept nowhere else. Agents
    /// started with `--api-tokens FILE` accept it.
    Issue {
        #[arg(long)]
        file: PathBuf,
        /// The credential's name (a-z, 0-9, '-').
        #[arg(long)]
        name: String,
        /// viewer (reads), operator (also start, stop, migrate, drain), admin (also create and
        /// delete VMs), or node (a peer agent: operator and the internal endpoints).
        #[arg(long)]
        role: contract::auth::Grant,
    },
}

#[derive(Subcommand, Debug)]
enum ClockCmd {
    /// Answer timestamp requests (UDP) until killed.
    Serve {
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
    /// Measure this host's clock against a `ferry clock serve` (shortest of several round
    /// trips); with --set, step this host's clock to it (root).
    Offset {
        server: std::net::SocketAddr,
        #[arg(long, default_value_t = 20)]
        samples: u32,
        #[arg(long)]
        set: bool,
    },
}

#[derive(Subcommand, Debug)]
enum PkiCmd {
    /// Create the cluster CA in DIR (ca.pem, and ca.key readable by root only).
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Replace an existing CA (every certificate it issued stops being accepted).
        #[arg(long)]
        force: bool,
    },
    /// Issue a node certificate (SAN NAME.node.ferry plus its addresses) or a user
    /// certificate (SAN USER.ROLE.user.ferry) signed by DIR's CA; the key is written 0600.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// A node's name (a DNS label: a-z, 0-9, '-').
        #[arg(long, conflicts_with = "user", required_unless_present = "user")]
        node: Option<String>,
        /// The node's addresses (IP or DNS; repeatable), for clients that dial an address.
        #[arg(long = "address", requires = "node")]
        addresses: Vec<String>,
        /// A user's name (a DNS label).
        #[arg(long, requires = "role")]
        user: Option<String>,
        /// The user's role: viewer, operator or admin.
        #[arg(long)]
        role: Option<contract::trust::Role>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = trust::pki::CERT_DAYS)]
        days: i64,
    },
}

// Parsed once per process: the size of the agent's arguments does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Cmd {
    /// The cluster's PKI: a CA, node certificates and user certificates with roles.
    Pki {
        #[command(subcommand)]
        cmd: PkiCmd,
    },
    /// Run a node agent (registers the node, runs VM workers, serves the API).
    Agent(AgentArgs),
    /// API tokens for the agents' REST API.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
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
    /// Wall-clock agreement between hosts without NTP (test beds): Ferry moves a migrated
    /// guest's time on by the wall-clock time between the source's save and the
    /// destination's load, so the two hosts' clocks must agree.
    Clock {
        #[command(subcommand)]
        cmd: ClockCmd,
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
    /// A drain of N VMs off one node of a fresh local 3-node cluster at each concurrency
    /// (root, /dev/kvm): drain wall time, worst and median downtime.
    BenchDrain {
        #[arg(long, default_value_t = 8)]
        vms: usize,
        #[arg(long, default_value_t = 128)]
        memory_mib: u64,
        /// Concurrencies to measure, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
        concurrency: Vec<usize>,
        /// Also write the Markdown report to this file.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Run the agents with --store-commit (the store's swap inside the downtime).
        #[arg(long)]
        store_commit: bool,
    },
    /// What the cluster store's commit costs inside the downtime (root, /dev/kvm): N
    /// migrations of one VM between two local agents per store and commit protocol (the
    /// handover, and --store-commit); median downtime, commit decision wait, total.
    BenchCommit {
        #[arg(long, default_value_t = 20)]
        migrations: usize,
        /// Stores to measure, comma-separated (sqlite, etcd).
        #[arg(long, value_delimiter = ',', default_value = "sqlite,etcd")]
        stores: Vec<String>,
        #[arg(long, default_value_t = 256)]
        memory_mib: u64,
        /// Also write the Markdown report to this file.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Seeded random faults against a local 3-node cluster (root, /dev/kvm): migrations and
    /// drains while a random worker or agent is SIGKILLed or SIGSTOPped at a random moment,
    /// then the invariants checked; prints outcomes per fault and phase, and the seed of any
    /// failing trial (`--seed N --trials 1` replays it).
    Chaos {
        /// Seed of the first trial (trial i uses seed + i).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Trials, each on a fresh cluster.
        #[arg(long, default_value_t = 10)]
        trials: usize,
        /// Then this many back-to-back migrations (a drain every tenth) without faults,
        /// counting refusals and reporting the agents' memory and file descriptors.
        #[arg(long, default_value_t = 0)]
        soak: usize,
        /// Keep the directories of failed trials (logs, store, serial output).
        #[arg(long)]
        keep: bool,
        /// Also write the Markdown report to this file.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Start a local 3-node cluster, run a VM and live-migrate it across the nodes.
    Demo {
        /// Keep the cluster's directory (logs, store) instead of deleting it.
        #[arg(long)]
        keep: bool,
        /// After the migrations, keep the cluster and its VM running and print the web
        /// console's address and an admin token for it; Enter stops it.
        #[arg(long)]
        serve: bool,
    },
}

#[derive(clap::Args, Debug)]
struct AgentArgs {
    /// Node name (a-z, 0-9, '-').
    #[arg(long)]
    node: String,
    /// The cluster PKI directory (`ferry pki init/issue`): this node's certificate
    /// `node-NAME.pem`, its key and `ca.pem`. The REST API is then HTTPS and takes a client
    /// certificate of the CA as a credential (a user's role, or a peer node's), calls to peer
    /// agents and migrations use mutual TLS naming the peer node. Without it all of these run
    /// in plaintext (warned).
    #[arg(long)]
    pki_dir: Option<PathBuf>,
    /// Address of the API (HTTP, or HTTPS with --pki-dir), e.g. 127.0.0.1:7100.
    #[arg(long)]
    listen: String,
    /// Cluster store: sqlite:///path/cluster.db (embedded), etcd://host:port[,host:port], or
    /// etcds://host:port[,...] (etcd over TLS, with this node's certificate from --pki-dir).
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
    /// Shared storage this node reaches (repeatable): `DIR`, or `DIR,devices` to allow block
    /// devices beneath it. A VM's disk images must lie beneath one of these; its workers open
    /// no disk anywhere else.
    #[arg(long)]
    storage: Vec<agent::node::RootSpec>,
    /// A directory VM kernels and initrds may be read from on this node (repeatable; none:
    /// only the built-in test guest boots here).
    #[arg(long = "boot-root")]
    boot_roots: Vec<agent::node::RootSpec>,
    /// Network this node is attached to, `NAME` or `NAME=BRIDGE`: VMs' NICs on it get a TAP
    /// on that bridge (default: a bridge named like the network) (repeatable).
    #[arg(long, value_parser = agent::node::parse_network)]
    network: Vec<(String, String)>,
    /// Node lease TTL in seconds.
    #[arg(long, default_value_t = 5)]
    lease_ttl_s: u64,
    /// Most migrations a drain runs at once (at most --max-outgoing).
    #[arg(long, default_value_t = 2)]
    drain_concurrency: usize,
    /// Most migrations this node receives at once (more are refused with 503).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    max_incoming: u16,
    /// Most migrations this node sends at once (more are refused with 503).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    max_outgoing: u16,
    /// Seconds the commit point keeps retrying a store that does not answer before it leaves
    /// the migration to reconciliation (both sides stay paused meanwhile).
    #[arg(long, default_value_t = 120)]
    commit_retry_s: u64,
    /// Keep the store's compare-and-swap at the commit point, inside the downtime, instead of
    /// handing the commit over to the migration stream before the pause (for comparison, and
    /// for clusters with agents from before the handover).
    #[arg(long)]
    store_commit: bool,
    /// Write the address the API really listens on to this file once the agent serves
    /// (with `--listen HOST:0` the agent picks a free port itself).
    #[arg(long)]
    address_file: Option<PathBuf>,
    /// The tokens file (`ferry token issue`): every API request then needs one of its tokens,
    /// with a role that allows it (401/403 otherwise). Without it the API is open (warned).
    #[arg(long)]
    api_tokens: Option<PathBuf>,
    /// A file holding this node's own token (role node) that it presents to peer agents.
    #[arg(long)]
    node_token_file: Option<PathBuf>,
    /// UIDs for the workers, `START-END`: each worker opens its VM's resources as root, then
    /// runs as its own UID from this range with no capabilities. `root`: workers keep root
    /// (warned).
    #[arg(long, default_value = agent::workers::DEFAULT_WORKER_UIDS)]
    worker_uids: String,
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
    /// Change a stopped VM: vCPUs, memory, CPU profile (processor compatibility).
    Set {
        vm: String,
        #[arg(long)]
        vcpus: Option<u8>,
        #[arg(long)]
        memory_mib: Option<u64>,
        /// host, baseline or cluster.
        #[arg(long)]
        cpu_profile: Option<String>,
    },
    /// Every other node's preflight verdict for a VM (nothing moves).
    Targets { vm: String },
    /// Live-migrate a VM to another node (progress bar, then a summary).
    Migrate {
        vm: String,
        /// Destination node.
        #[arg(long, required_unless_present = "cancel")]
        to: Option<String>,
        /// Switch over once the expected downtime fits this budget (default 50).
        #[arg(long)]
        max_downtime_ms: Option<u64>,
        /// Parallel data connections, 1-16 (default 1).
        #[arg(long)]
        streams: Option<u16>,
        /// Page compression: none, lz4 or zstd (default none).
        #[arg(long)]
        compress: Option<contract::Compression>,
        /// Only run the preflight checks.
        #[arg(long)]
        dry_run: bool,
        /// Bandwidth cap in MiB/s.
        #[arg(long)]
        max_bandwidth_mibs: Option<u64>,
        /// Give up after this many seconds (the VM stays on its node).
        #[arg(long)]
        timeout_s: Option<f64>,
        /// Cancel the VM's running migration instead.
        #[arg(long)]
        cancel: bool,
    },
}

fn main() {
    // A closed pipe (`ferry vm show x | head -2`) ends the process quietly, as for any
    // command-line tool, instead of a panic on the next println.
    // SAFETY: restoring the default disposition of SIGPIPE has no preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
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

fn run_pki(cmd: &PkiCmd) -> Result<()> {
    match cmd {
        PkiCmd::Init { dir, force } => {
            let cert = trust::pki::init(dir, *force)?;
            println!(
                "cluster CA: {} (key {})",
                cert.display(),
                dir.join(trust::pki::CA_KEY).display()
            );
        }
        PkiCmd::Issue {
            dir,
            node,
            addresses,
            user,
            role,
            days,
        } => {
            let id = match (node, user, role) {
                (Some(n), None, _) => trust::Identity::node(n)?,
                (None, Some(u), Some(r)) => trust::Identity::user(u, *r)?,
                _ => bail!("give --node NAME, or --user NAME with --role ROLE"),
            };
            let files = trust::pki::issue(dir, &id, addresses, *days)?;
            println!(
                "{id} ({}): certificate {}, key {}, CA {}",
                id.dns_name(),
                files.cert.display(),
                files.key.display(),
                files.ca.display()
            );
        }
    }
    Ok(())
}

/// HTTPS for the CLI's requests when it has the cluster CA (--ca / $FERRY_CA), presenting a
/// user certificate when given one (--cert / $FERRY_CERT).
fn set_client_tls(cli: &Cli) -> Result<()> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let ca = cli.ca.clone().or_else(|| env("FERRY_CA"));
    let cert = cli.cert.clone().or_else(|| env("FERRY_CERT"));
    let Some(ca) = ca else {
        if let Some(c) = cert {
            bail!(
                "--cert {} needs --ca (the cluster CA that signed the agents' certificates)",
                c.display()
            );
        }
        agent::client::set_tls(None);
        return Ok(());
    };
    let roots = trust::api::load_roots(&ca).with_context(|| format!("--ca {}", ca.display()))?;
    let creds = match cert {
        Some(c) => {
            let files = contract::trust::TlsFiles {
                key: c.with_extension("key"),
                cert: c.clone(),
                ca: ca.clone(),
            };
            Some(
                trust::tls::Credentials::load(&files)
                    .with_context(|| format!("--cert {}", c.display()))?,
            )
        }
        None => None,
    };
    agent::client::set_tls(Some(agent::client::ClientTls { roots, creds }));
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let json = json_out(&cli)?;
    let addr = agent_addr(&cli);
    agent::client::set_token(
        cli.token
            .clone()
            .or_else(|| std::env::var("FERRY_TOKEN").ok())
            .filter(|t| !t.is_empty()),
    );
    if !matches!(cli.cmd, Cmd::Agent(_)) {
        set_client_tls(&cli)?;
    }
    match &cli.cmd {
        Cmd::Agent(a) => run_agent(a),
        Cmd::Token {
            cmd: TokenCmd::Issue { file, name, role },
        } => {
            let token = trust::token::issue(file, name, *role)?;
            eprintln!(
                "token {name:?} ({role}) added to {}; it is shown once:",
                file.display()
            );
            println!("{token}");
            Ok(())
        }
        Cmd::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "ferry", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Demo { keep, serve } => demo::run(*keep, *serve),
        Cmd::Chaos {
            seed,
            trials,
            soak,
            keep,
            report,
        } => chaos::run(&chaos::Options {
            seed: *seed,
            trials: *trials,
            soak: *soak,
            keep: *keep,
            report: report.clone(),
        }),
        Cmd::Pki { cmd } => run_pki(cmd),
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
        Cmd::BenchDrain {
            vms,
            memory_mib,
            concurrency,
            report,
            store_commit,
        } => bench_drain::run(&bench_drain::Options {
            vms: *vms,
            memory_mib: *memory_mib,
            concurrency: concurrency.clone(),
            report: report.clone(),
            store_commit: *store_commit,
        }),
        Cmd::BenchCommit {
            migrations,
            stores,
            memory_mib,
            report,
        } => bench_commit::run(&bench_commit::Options {
            migrations: *migrations,
            stores: stores.clone(),
            memory_mib: *memory_mib,
            report: report.clone(),
        }),
        Cmd::Clock { cmd } => match cmd {
            ClockCmd::Serve { listen } => {
                testbed::clock::serve(*listen)?;
                Ok(())
            }
            ClockCmd::Offset {
                server,
                samples,
                set,
            } => {
                let o = testbed::clock::measure(*server, (*samples).max(1))?;
                if *set {
                    testbed::clock::step(o.offset_ns)?;
                }
                if json_out(&cli)? {
                    println!("{}", serde_json::to_string(&o)?);
                } else {
                    println!(
                        "offset {:.3} ms (server minus local), round trip {:.3} ms, {} samples{}",
                        o.offset_ns as f64 / 1e6,
                        o.delay_ns as f64 / 1e6,
                        o.samples,
                        if *set { "; clock stepped" } else { "" }
                    );
                }
                Ok(())
            }
        },
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
            let r = testbed::netprobe::run(&testbed::netprobe::ProbeConfig {
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
        Cmd::Node { cmd } => node_cmd(&addr, json, cmd),
        Cmd::Vm { cmd } => vm_cmd(&addr, json, cmd),
    }
}

/// Prints `v` as JSON, or `text`.
fn out<T: Serialize>(json: bool, v: &T, text: impl FnOnce() -> String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(v)?);
    } else {
        println!("{}", text());
    }
    Ok(())
}

fn node_cmd(addr: &str, json: bool, cmd: &NodeCmd) -> Result<()> {
    match cmd {
        NodeCmd::List => {
            let nodes: Vec<NodeView> = api(agent::client::get(addr, "/v1/nodes"))?;
            out(json, &nodes, || {
                let mut t = format!(
                    "{:<12} {:<6} {:<12} {:>11} {:>15} {:>4}  ADDRESS",
                    "NODE", "STATE", "SCHEDULABLE", "VCPUS USED", "MEMORY USED", "VMS"
                );
                for n in &nodes {
                    t.push_str(&format!(
                        "\n{:<12} {:<6} {:<12} {:>11} {:>15} {:>4}  {}",
                        n.name,
                        if n.alive { "up" } else { "down" },
                        if n.schedulable { "yes" } else { "drained" },
                        format!("{}/{}", n.cores_used, n.cores),
                        format!("{}/{} MiB", n.memory_used_mib, n.memory_mib),
                        n.vms,
                        n.address
                    ));
                }
                t
            })
        }
        NodeCmd::Drain { node, concurrency } => {
            let r: DrainReport = api(agent::client::post(
                addr,
                &format!("/v1/nodes/{node}/drain"),
                &DrainRequest {
                    concurrency: *concurrency,
                },
                None,
            ))?;
            out(json, &r, || {
                let mut t = String::new();
                for i in &r.vms {
                    if i.ok {
                        t.push_str(&format!(
                            "  {:<12} -> {:<10} {}\n",
                            i.vm,
                            i.to.as_deref().unwrap_or("-"),
                            i.note.as_deref().unwrap_or("moved")
                        ));
                    } else {
                        t.push_str(&format!(
                            "  {:<12} FAILED: {}\n",
                            i.vm,
                            i.error.as_deref().or(i.note.as_deref()).unwrap_or("")
                        ));
                    }
                }
                t.push_str(&format!(
                    "{node} drained: {} moved, {} failed (at most {} at once)",
                    r.moved, r.failed, r.max_concurrent
                ));
                t
            })?;
            if r.failed > 0 {
                bail!("{} VMs could not be moved off {node}", r.failed);
            }
            Ok(())
        }
        NodeCmd::Undrain { node } => {
            let r: Schedulable = api(agent::client::post(
                addr,
                &format!("/v1/nodes/{node}/undrain"),
                &json!({}),
                Some(Duration::from_secs(30)),
            ))?;
            out(json, &r, || format!("{node} is schedulable again"))
        }
    }
}

fn vm_cmd(addr: &str, json: bool, cmd: &VmCmd) -> Result<()> {
    match cmd {
        VmCmd::Create { spec, node } => {
            let toml = std::fs::read_to_string(spec)
                .with_context(|| format!("cannot read {}", spec.display()))?;
            let body = CreateVm {
                spec: None,
                toml: Some(toml),
                node: node.clone(),
            };
            let r: VmRecord = api(agent::client::post(
                addr,
                "/v1/vms",
                &body,
                Some(Duration::from_secs(30)),
            ))?;
            out(json, &r, || {
                format!("created VM {} on {}", r.spec.name, r.owner)
            })
        }
        VmCmd::List => {
            let vms: Vec<VmRecord> = api(agent::client::get(addr, "/v1/vms"))?;
            out(json, &vms, || {
                let mut t = format!(
                    "{:<14} {:<10} {:<10} {:>5} {:>8}  LAST ERROR",
                    "VM", "STATE", "NODE", "VCPUS", "MEMORY"
                );
                for r in &vms {
                    t.push_str(&format!(
                        "\n{:<14} {:<10} {:<10} {:>5} {:>5} MiB  {}",
                        r.spec.name,
                        r.state.to_string(),
                        r.owner,
                        r.spec.vcpus,
                        r.spec.memory_mib,
                        r.last_error.as_deref().unwrap_or("")
                    ));
                }
                t
            })
        }
        VmCmd::Show { vm } => {
            let v: VmView = api(agent::client::get(addr, &format!("/v1/vms/{vm}")))?;
            out(json, &v, || {
                let r = &v.vm;
                let mut t = format!(
                    "VM {} ({} vCPUs, {} MiB, kernel {}, cpu profile {})\n  state {} on {}",
                    vm,
                    r.spec.vcpus,
                    r.spec.memory_mib,
                    r.spec.kernel,
                    r.spec.cpu_profile,
                    r.state,
                    r.owner
                );
                if let Some(m) = &r.migration {
                    t.push_str(&format!("\n  migration in progress: {m}"));
                    if let Some(to) = &r.handover_to {
                        t.push_str(&format!(
                            " (its commit handed over to the stream: {to} takes it at the Commit)"
                        ));
                    }
                }
                if let Some(e) = &r.last_error {
                    t.push_str(&format!("\n  last error: {e}"));
                }
                match &v.worker {
                    Some(w) => t.push_str(&format!(
                        "\n  worker: pid {} state {} uptime {:.1} s",
                        w.pid, w.state, w.uptime_s
                    )),
                    None => t.push_str("\n  worker: none answers"),
                }
                for m in &v.migrations {
                    t.push_str(&format!(
                        "\n  migration {} {} -> {}: {} ({}){}",
                        m.id,
                        m.from,
                        m.to,
                        m.outcome,
                        m.phase,
                        m.reason
                            .as_deref()
                            .map(|r| format!(": {r}"))
                            .unwrap_or_default()
                    ));
                }
                t
            })
        }
        VmCmd::Start { vm } => {
            let r: VmRecord = api(agent::client::post(
                addr,
                &format!("/v1/vms/{vm}/start"),
                &json!({}),
                Some(Duration::from_secs(60)),
            ))?;
            out(json, &r, || format!("VM {vm} running on {}", r.owner))
        }
        VmCmd::Stop { vm } => {
            let r: VmRecord = api(agent::client::post(
                addr,
                &format!("/v1/vms/{vm}/stop"),
                &json!({}),
                Some(Duration::from_secs(60)),
            ))?;
            out(json, &r, || format!("VM {vm} stopped"))
        }
        VmCmd::Delete { vm } => {
            let r: Deleted = api(agent::client::delete(addr, &format!("/v1/vms/{vm}")))?;
            out(json, &r, || format!("VM {vm} deleted"))
        }
        VmCmd::Set {
            vm,
            vcpus,
            memory_mib,
            cpu_profile,
        } => {
            let edit = contract::api::VmEdit {
                vcpus: *vcpus,
                memory_mib: *memory_mib,
                cpu_profile: cpu_profile.clone(),
            };
            if edit.is_empty() {
                bail!("nothing to change: give --vcpus, --memory-mib or --cpu-profile");
            }
            let r: VmRecord = api(agent::client::put(addr, &format!("/v1/vms/{vm}"), &edit))?;
            out(json, &r, || {
                format!(
                    "VM {vm}: {} vCPUs, {} MiB, cpu profile {} (applied at its next start)",
                    r.spec.vcpus, r.spec.memory_mib, r.spec.cpu_profile
                )
            })
        }
        VmCmd::Targets { vm } => {
            let t: contract::api::Targets =
                api(agent::client::get(addr, &format!("/v1/vms/{vm}/targets")))?;
            out(json, &t, || {
                let mut s = format!("VM {} on {}:", t.vm, t.from);
                for v in &t.targets {
                    s.push_str(&format!("\n  {v}"));
                }
                s
            })
        }
        VmCmd::Migrate {
            vm,
            to,
            max_downtime_ms,
            streams,
            compress,
            dry_run,
            max_bandwidth_mibs,
            timeout_s,
            cancel,
        } => {
            if *cancel {
                let v: VmView = api(agent::client::get(addr, &format!("/v1/vms/{vm}")))?;
                let id =
                    v.vm.migration
                        .ok_or_else(|| anyhow!("VM {vm} has no running migration"))?;
                let r: CancelReply = api(agent::client::post(
                    addr,
                    &format!("/v1/migrations/{id}/cancel"),
                    &json!({}),
                    Some(Duration::from_secs(30)),
                ))?;
                return out(json, &r, || format!("cancelling migration {id}"));
            }
            let to = to.clone().ok_or_else(|| anyhow!("--to is required"))?;
            let d = MigrationParams::default();
            let params = MigrationParams {
                max_downtime_ms: max_downtime_ms.unwrap_or(d.max_downtime_ms),
                streams: streams.unwrap_or(d.streams),
                compression: compress.unwrap_or(d.compression),
                max_bandwidth_mibs: *max_bandwidth_mibs,
                timeout_s: *timeout_s,
            };
            params.validate()?;
            let body = MigrateRequest {
                to: to.clone(),
                dry_run: *dry_run,
                params,
            };
            let started: MigrationStarted = api(agent::client::post(
                addr,
                &format!("/v1/vms/{vm}/migrate"),
                &body,
                Some(Duration::from_secs(60)),
            ))?;
            if *dry_run {
                return out(json, &started, || {
                    format!("preflight OK: VM {vm} can move to {to} (dry run, nothing moved)")
                });
            }
            let id = started.migration.id.clone();
            let record = follow_migration(&[started.agent.as_str(), addr], &id, vm, &to, json)?;
            if record.outcome != MigrationOutcome::Succeeded {
                bail!(
                    "migration of {vm} to {to} {} in {}: {}",
                    record.outcome,
                    record.phase,
                    record.reason.as_deref().unwrap_or("unknown reason")
                );
            }
            if !json {
                println!("{}", summary_line(vm, &record));
            }
            Ok(())
        }
    }
}

/// A progress position that never runs backwards: each phase owns a slice of the bar, and
/// within pre-copy the share of pages sent so far.
fn bar_position(phase: contract::Phase, p: &contract::Progress, last: u64) -> u64 {
    use contract::Phase as P;
    let pos = match phase {
        P::Connect | P::Handshake | P::Preflight => 10,
        P::Setup => 30,
        P::Precopy => {
            let (sent, rem) = (p.pages_sent as f64, p.remaining_pages as f64);
            let f = if sent + rem > 0.0 {
                sent / (sent + rem)
            } else {
                0.0
            };
            50 + (f * 850.0) as u64
        }
        P::Pause | P::FinalPages => 920,
        P::DeviceState => 950,
        P::Ready => 970,
        P::Commit => 990,
        P::Resumed => 1000,
    };
    pos.max(last)
}

/// Follows a migration's events with a progress bar (text) or as JSON lines; returns the final
/// record. `agents`: the one that runs the migration first, others to fall back on if it
/// stops answering (the record is in the store).
pub fn follow_migration(
    agents: &[&str],
    id: &str,
    vm: &str,
    to: &str,
    json: bool,
) -> Result<MigrationRecord> {
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
    let mut last: Option<MigrationRecord> = None;
    let mut pos = 0u64;
    let mut errors = Vec::new();
    // Agents to fall back on: the given ones, then every node's agent.
    let mut known: Vec<String> = agents.iter().map(|a| a.to_string()).collect();
    known = refresh_agents(&known);
    for agent in agents {
        let r = agent::client::follow_events(
            *agent,
            &format!("/v1/migrations/{id}/events"),
            |ev: MigrationEvent| {
                if json {
                    println!("{}", serde_json::to_string(&ev).unwrap_or_default());
                }
                match ev {
                    MigrationEvent::Progress { phase, progress: p } => {
                        pos = bar_position(phase, &p, pos);
                        bar.set_position(pos);
                        bar.set_message(format!(
                            "{} pass {} | {:.1} MiB sent, {:.1} MiB left | dirty {:.0} MiB/s | {:.0} MiB/s | expect {:.1} ms down | throttle {}%",
                            phase,
                            p.pass,
                            p.bytes_sent as f64 / 1048576.0,
                            p.remaining_bytes as f64 / 1048576.0,
                            p.dirty_rate_mibs,
                            p.bandwidth_mibs,
                            p.expected_downtime_ms,
                            p.throttle_pct,
                        ));
                        true
                    }
                    MigrationEvent::Done { migration } => {
                        last = Some(*migration);
                        false
                    }
                    MigrationEvent::Error { error } => {
                        errors.push(error);
                        false
                    }
                }
            },
        );
        if let Err(e) = r {
            errors.push(format!("{agent}: {e}"));
        }
        if last.is_some() {
            break;
        }
        // The stream ended early (the agent restarted or died): read the record, from any
        // agent (they share the store), until it is final. A restarted agent listens on a new
        // address: every node's current one is asked for again from whichever agent answers.
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        while std::time::Instant::now() < deadline {
            known = refresh_agents(&known);
            let v = known.iter().find_map(|a| {
                agent::client::get::<MigrationView>(a, &format!("/v1/migrations/{id}")).ok()
            });
            match v {
                Some(v) if v.done => {
                    last = Some(v.migration);
                    break;
                }
                Some(_) => std::thread::sleep(Duration::from_millis(200)),
                None => std::thread::sleep(Duration::from_millis(500)),
            }
        }
        if last.is_some() {
            break;
        }
    }
    bar.finish_and_clear();
    last.ok_or_else(|| anyhow!("lost track of migration {id}: {}", errors.join("; ")))
}

/// `known` followed by the address of every node's agent that one of them lists (alive
/// nodes only), without duplicates.
fn refresh_agents(known: &[String]) -> Vec<String> {
    let mut out: Vec<String> = known.to_vec();
    for a in known {
        if let Ok(nodes) = agent::client::get::<Vec<NodeView>>(a, "/v1/nodes") {
            for n in nodes.into_iter().filter(|n| n.alive) {
                if !out.contains(&n.address) {
                    out.push(n.address);
                }
            }
            break;
        }
    }
    out
}

/// One line describing a finished migration.
pub fn summary_line(vm: &str, m: &MigrationRecord) -> String {
    let Some(s) = &m.summary else {
        return format!("migrated {vm} {} -> {}", m.from, m.to);
    };
    let d = &s.downtime;
    format!(
        "migrated {vm} {} -> {} in {:.0} ms: downtime {:.2} ms (final memory {:.2}, state {:.2}, commit {:.2}), {} passes, {:.1} MiB",
        m.from,
        m.to,
        s.total_ms,
        s.downtime_ms,
        d.final_memory_ms,
        d.state_ms,
        d.commit_ms,
        s.passes,
        s.bytes_sent as f64 / 1048576.0,
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
    let tls = match &a.pki_dir {
        Some(d) => {
            let files = trust::pki::node_files(d, &a.node);
            for f in [&files.cert, &files.key, &files.ca] {
                if !f.is_file() {
                    bail!(
                        "{} is missing (ferry pki issue --dir {} --node {})",
                        f.display(),
                        d.display(),
                        a.node
                    );
                }
            }
            Some(files)
        }
        None => {
            eprintln!("ferry agent: WARNING: no --pki-dir: this node's migrations run in plaintext and unauthenticated (ferry-vmm --insecure)");
            None
        }
    };
    let api_tokens = match &a.api_tokens {
        Some(p) => {
            Some(trust::token::load(p).with_context(|| format!("--api-tokens {}", p.display()))?)
        }
        None => {
            if a.pki_dir.is_none() {
                eprintln!("ferry agent: WARNING: no --api-tokens and no --pki-dir: the REST API accepts every request without a credential");
            }
            None
        }
    };
    match &a.node_token_file {
        Some(p) => {
            let t = std::fs::read_to_string(p)
                .with_context(|| format!("--node-token-file {}", p.display()))?;
            agent::client::set_token(Some(t.trim().to_string()));
        }
        None => {
            // Never a user's $FERRY_TOKEN: peers get this node's own credential or none.
            agent::client::set_token(None);
            if api_tokens.is_some() && a.pki_dir.is_none() {
                eprintln!("ferry agent: WARNING: --api-tokens without --node-token-file: peer agents that check tokens refuse this node's calls");
            }
        }
    }
    // With the PKI: the API is HTTPS (this node's certificate), and calls to peer agents
    // present it and require the peer's.
    let https = match &tls {
        Some(files) => {
            let creds = trust::tls::Credentials::load(files)?;
            let server = trust::api::server_config(&creds)?;
            agent::client::set_tls(Some(agent::client::ClientTls {
                roots: creds.roots(),
                creds: Some(creds),
            }));
            Some(server)
        }
        None => {
            eprintln!("ferry agent: WARNING: no --pki-dir: the REST API is plain HTTP");
            agent::client::set_tls(None);
            None
        }
    };
    let cfg = agent::AgentConfig {
        api_tokens,
        node: a.node.clone(),
        listen: a.listen.clone(),
        store: a.store.clone(),
        data_dir: a.data_dir.clone(),
        worker_bin,
        cpu_limit: a.cpu_limit.clone(),
        cores: a.cores,
        memory_mib: a.memory_mib,
        storage: a.storage.clone(),
        boot_roots: a.boot_roots.clone(),
        networks: a.network.clone(),
        lease_ttl: Duration::from_secs(a.lease_ttl_s.max(1)),
        drain_concurrency: a.drain_concurrency.clamp(1, a.max_outgoing as usize),
        max_incoming: a.max_incoming as usize,
        max_outgoing: a.max_outgoing as usize,
        commit_retry: Duration::from_secs(a.commit_retry_s.max(1)),
        store_commit: a.store_commit,
        tls,
        worker_uids: match a.worker_uids.as_str() {
            "root" => {
                eprintln!("ferry agent: WARNING: --worker-uids root: workers run as root");
                None
            }
            r => Some(r.parse().map_err(anyhow::Error::msg)?),
        },
    };
    for r in cfg.storage.iter().chain(&cfg.boot_roots) {
        if !r.dir.is_dir() {
            bail!(
                "{} (--storage / --boot-root) is not a directory on this node",
                r.dir.display()
            );
        }
    }
    if let Some(p) = &cfg.cpu_limit {
        if !["host", "baseline"].contains(&p.as_str()) {
            bail!("unknown CPU profile {p:?} for --cpu-limit (host, baseline)");
        }
    }
    let address_file = a.address_file.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&cfg.listen)
            .await
            .with_context(|| format!("cannot listen on {}", cfg.listen))?;
        // The address other agents and the CLI reach: the one bound (port 0 picks one).
        let mut cfg = cfg;
        cfg.listen = listener.local_addr()?.to_string();
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
        let app = agent::api::router(agent.clone());
        if let Some(f) = &address_file {
            let tmp = f.with_extension("tmp");
            std::fs::write(&tmp, &agent.cfg.listen)
                .and_then(|_| std::fs::rename(&tmp, f))
                .with_context(|| format!("cannot write {}", f.display()))?;
        }
        let stop = async {
            while !STOP.load(std::sync::atomic::Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        match https {
            Some(server) => agent::https::serve(listener, app, server, stop).await?,
            None => {
                axum::serve(listener, app)
                    .with_graceful_shutdown(stop)
                    .await?
            }
        }
        tracing::info!("agent stopped; VM workers keep running");
        Ok::<(), anyhow::Error>(())
    })
}

/// Waits until the agent `child` (node `name`, started with `--address-file addr_file`)
/// answers its health check as that node; its address. `None` if it exited or took longer than
/// 30 s (it is then killed and reaped).
pub(crate) fn wait_for_agent(
    name: &str,
    addr_file: &std::path::Path,
    child: &mut std::process::Child,
) -> Option<String> {
    let t0 = std::time::Instant::now();
    loop {
        if let Ok(a) = std::fs::read_to_string(addr_file) {
            if agent::client::get::<contract::api::Health>(&a, "/v1/health")
                .is_ok_and(|h| h.node == name)
            {
                return Some(a);
            }
        }
        if child.try_wait().ok().flatten().is_some() || t0.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
