//! A multi-node test bed made of real network and mount namespaces on one machine.
//!
//! ```text
//!  client ns (10.77.0.2) ──┐
//!                          ├── switch ns: bridge "sw" ── node ns i: veth "eth0" ┐
//!                          │                                    bridge br0 (10.77.0.1i)
//!                          │                                    ├── TAPs of the VMs on node i
//! ```
//! Every node namespace runs its own `ferry agent` (API and migrations on its 10.77.0.1i
//! address), whose workers attach VM NICs to the node's `br0`. The client namespace reaches the
//! VMs only through the switch, so a VM that moves between nodes is found again only once the
//! switch learns its MAC behind the new port: exactly what a real ToR switch does.
//!
//! Shared storage: a directory bind-mounted, in each agent's own mount namespace, at the same
//! path on every node. [`Testbed::cut_storage`] unmounts it on one node (the node "loses its
//! link" to the storage) and [`Testbed::restore_storage`] mounts it again.
//!
//! Only addresses inside these namespaces are used; nothing on the host's own network changes.
//! Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN), `ip` (iproute2), `unshare` and `nsenter`.

use anyhow::{anyhow, bail, Context, Result};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The test bed's subnet (each test bed is its own isolated L2/L3 world, so they may repeat).
pub const SUBNET: &str = "10.77.0";
/// The client's address.
pub const CLIENT_IP: &str = "10.77.0.2";
/// The port every agent's API listens on (each in its own namespace).
pub const AGENT_PORT: u16 = 7070;

/// Address of node `i` (0-based).
pub fn node_ip(i: usize) -> String {
    format!("{SUBNET}.{}", 11 + i)
}

/// A suggested address for the `k`-th VM (0-based).
pub fn vm_ip(k: usize) -> String {
    format!("{SUBNET}.{}", 100 + k)
}

/// One node of the test bed.
pub struct TbNode {
    pub name: String,
    pub netns: String,
    pub ip: String,
    pub data_dir: PathBuf,
    pub agent: Option<Child>,
}

impl TbNode {
    /// `host:port` of the node's agent API.
    pub fn api(&self) -> String {
        format!("{}:{AGENT_PORT}", self.ip)
    }
}

/// The namespaces, links and agents of one test bed.
pub struct Testbed {
    pub prefix: String,
    pub dir: PathBuf,
    pub switch_ns: String,
    pub client_ns: String,
    pub nodes: Vec<TbNode>,
    /// Where shared storage is mounted on every node.
    pub shared: PathBuf,
    /// What backs the shared storage (also reachable from the host at this path).
    pub shared_backing: PathBuf,
    /// The cluster store URL all agents use.
    pub store: String,
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}

fn ns_ip(ns: &str, args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(["-n", ns]).args(args))
}

/// Runs `f` on a thread that joined network namespace `ns` (this process stays where it is),
/// e.g. to call an agent's API from a test.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || -> Result<T> {
        let file = std::fs::File::open(&path).with_context(|| format!("cannot open {path}"))?;
        // SAFETY: setns on a valid namespace fd; it only changes this (short-lived) thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(anyhow!(
                "setns({path}): {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow!("the thread in {ns} panicked"))?
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Testbed {
    /// Creates the namespaces and links of a test bed with `nodes` nodes under `dir`.
    pub fn create(dir: &Path, nodes: usize) -> Result<Testbed> {
        for tool in ["ip", "unshare", "nsenter"] {
            if Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_err()
            {
                bail!("the test bed needs `{tool}` (run scripts/install-deps.sh)");
            }
        }
        let prefix = format!(
            "fy{}x{}",
            std::process::id() % 100_000,
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let shared = dir.join("shared");
        let shared_backing = dir.join("shared-backing");
        std::fs::create_dir_all(&shared)?;
        std::fs::create_dir_all(&shared_backing)?;
        let mut tb = Testbed {
            switch_ns: format!("{prefix}-sw"),
            client_ns: format!("{prefix}-cl"),
            prefix: prefix.clone(),
            dir: dir.to_path_buf(),
            nodes: Vec::new(),
            shared,
            shared_backing,
            store: format!("sqlite://{}", dir.join("cluster.db").display()),
        };
        // From here on, Drop cleans up whatever was made.
        tb.build(nodes)?;
        Ok(tb)
    }

    fn build(&mut self, nodes: usize) -> Result<()> {
        let sw = self.switch_ns.clone();
        ip(&["netns", "add", &sw])?;
        ns_ip(&sw, &["link", "set", "lo", "up"])?;
        ns_ip(&sw, &["link", "add", "sw", "type", "bridge"])?;
        // Learn MACs quickly and never stall a new port: a moved VM must be reachable as soon
        // as its announcement passes.
        ns_ip(
            &sw,
            &["link", "set", "sw", "type", "bridge", "forward_delay", "0"],
        )?;
        ns_ip(&sw, &["link", "set", "sw", "up"])?;
        let cl = self.client_ns.clone();
        ip(&["netns", "add", &cl])?;
        ns_ip(&cl, &["link", "set", "lo", "up"])?;
        ns_ip(
            &sw,
            &[
                "link", "add", "cl", "type", "veth", "peer", "name", "eth0", "netns", &cl,
            ],
        )?;
        ns_ip(&sw, &["link", "set", "cl", "master", "sw", "up"])?;
        ns_ip(
            &cl,
            &["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"],
        )?;
        ns_ip(&cl, &["link", "set", "eth0", "up"])?;
        for i in 0..nodes {
            let name = format!("n{}", i + 1);
            let ns = format!("{}-{name}", self.prefix);
            ip(&["netns", "add", &ns])?;
            let node = TbNode {
                name: name.clone(),
                netns: ns.clone(),
                ip: node_ip(i),
                data_dir: self.dir.join(&name),
                agent: None,
            };
            self.nodes.push(node);
            ns_ip(&ns, &["link", "set", "lo", "up"])?;
            ns_ip(
                &sw,
                &[
                    "link", "add", &name, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            )?;
            ns_ip(&sw, &["link", "set", &name, "master", "sw", "up"])?;
            // A fixed bridge MAC: otherwise the bridge takes the lowest MAC of its ports, and
            // every TAP that comes or goes with a VM could change the node's own MAC under the
            // neighbours' ARP caches.
            ns_ip(
                &ns,
                &[
                    "link",
                    "add",
                    "br0",
                    "address",
                    &format!("02:77:00:00:00:{:02x}", 0x11 + i),
                    "type",
                    "bridge",
                ],
            )?;
            ns_ip(
                &ns,
                &["link", "set", "br0", "type", "bridge", "forward_delay", "0"],
            )?;
            ns_ip(&ns, &["link", "set", "eth0", "master", "br0", "up"])?;
            ns_ip(
                &ns,
                &["addr", "add", &format!("{}/24", node_ip(i)), "dev", "br0"],
            )?;
            ns_ip(&ns, &["link", "set", "br0", "up"])?;
        }
        Ok(())
    }

    /// Node by name (`n1`, `n2`, ...).
    pub fn node(&self, name: &str) -> &TbNode {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    fn node_mut(&mut self, name: &str) -> &mut TbNode {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// A command that runs `program` inside namespace `ns`.
    pub fn command_in(ns: &str, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// Starts node `name`'s agent: in the node's network namespace and in a mount namespace of
    /// its own where the shared storage is mounted. `extra` are more `ferry agent` flags.
    pub fn start_agent(&mut self, name: &str, ferry: &Path, extra: &[String]) -> Result<()> {
        let (ns, ip_addr, data_dir) = {
            let n = self.node(name);
            (n.netns.clone(), n.ip.clone(), n.data_dir.clone())
        };
        std::fs::create_dir_all(&data_dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))?;
        let mut script = format!(
            "mount --bind '{}' '{}' && exec '{}' agent --node {name} --listen {ip_addr}:{AGENT_PORT} --store '{}' --data-dir '{}' --network lan=br0 --storage '{}' --lease-ttl-s 3",
            self.shared_backing.display(),
            self.shared.display(),
            ferry.display(),
            self.store,
            data_dir.display(),
            self.shared.display(),
        );
        for e in extra {
            script.push_str(&format!(" '{e}'"));
        }
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "unshare",
                "--mount",
                "--propagation",
                "private",
            ])
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .context("cannot start the agent")?;
        self.node_mut(name).agent = Some(child);
        let api = self.node(name).api();
        let t0 = Instant::now();
        loop {
            let a = api.clone();
            if in_netns(&ns, move || {
                agent::client::get::<contract::api::Health>(&a, "/v1/health").is_ok()
            })? {
                return Ok(());
            }
            if let Some(st) = self
                .node_mut(name)
                .agent
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("agent {name} exited ({st}): {}", self.agent_log(name));
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("agent {name} did not come up: {}", self.agent_log(name));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's log.
    pub fn agent_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// PID of the agent process itself (the shell `exec`s into it).
    fn agent_pid(&self, name: &str) -> Result<u32> {
        self.node(name)
            .agent
            .as_ref()
            .map(|c| c.id())
            .ok_or_else(|| anyhow!("agent {name} is not running"))
    }

    /// Node `name` loses its link to the shared storage (unmounted in its agent's namespace;
    /// images its VMs already have open stay open, as with a lazy unmount).
    pub fn cut_storage(&self, name: &str) -> Result<()> {
        let pid = self.agent_pid(name)?.to_string();
        run(Command::new("nsenter")
            .args(["-t", &pid, "-m", "umount", "-l"])
            .arg(&self.shared))
    }

    /// Node `name` reaches the shared storage again.
    pub fn restore_storage(&self, name: &str) -> Result<()> {
        let pid = self.agent_pid(name)?.to_string();
        run(Command::new("nsenter")
            .args(["-t", &pid, "-m", "mount", "--bind"])
            .arg(&self.shared_backing)
            .arg(&self.shared))
    }

    /// Calls node `name`'s agent API (GET) from inside the client network.
    pub fn get(&self, name: &str, path: &str) -> Result<serde_json::Value> {
        let (api, p) = (self.node(name).api(), path.to_string());
        in_netns(&self.client_ns, move || agent::client::get(&api, &p))?
            .map_err(|e| anyhow!("GET {path}: {e}"))
    }

    /// Calls node `name`'s agent API (POST) from inside the client network.
    pub fn post(
        &self,
        name: &str,
        path: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value> {
        let (api, p) = (self.node(name).api(), path.to_string());
        in_netns(&self.client_ns, move || {
            agent::client::post::<_, serde_json::Value>(
                &api,
                &p,
                &body,
                Some(Duration::from_secs(300)),
            )
        })?
        .map_err(|e| anyhow!("POST {path}: {e}"))
    }

    /// Live-migrates `vm` to node `to` through node `via`'s agent and waits for the outcome:
    /// the migration record on success, `phase: reason` on failure.
    pub fn migrate(
        &self,
        via: &str,
        vm: &str,
        to: &str,
    ) -> Result<cluster::MigrationRecord, String> {
        let started = self
            .post(
                via,
                &format!("/v1/vms/{vm}/migrate"),
                serde_json::json!({ "to": to }),
            )
            .map_err(|e| e.to_string())?;
        let started: contract::api::MigrationStarted =
            serde_json::from_value(started).map_err(|e| e.to_string())?;
        let (runner, id) = (started.agent, started.migration.id);
        let m = in_netns(&self.client_ns, move || {
            agent::ops::source::wait_migration(&runner, &id)
        })
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        if m.outcome == cluster::MigrationOutcome::Succeeded {
            Ok(m)
        } else {
            Err(format!("{}: {}", m.phase, m.reason.unwrap_or_default()))
        }
    }

    /// The serial log of `vm`'s worker on node `node`.
    pub fn serial(&self, node: &str, vm: &str) -> PathBuf {
        agent::workers::console_dir(&agent::workers::vm_dir(&self.node(node).data_dir, vm))
            .join("serial.log")
    }

    /// Starts `ferry netprobe` against `target` in the client namespace; it stops (and prints
    /// its JSON report) once `stop_file` exists.
    pub fn start_probe(
        &self,
        ferry: &Path,
        target: &str,
        interval_ms: u64,
        stop_file: &Path,
    ) -> Result<Child> {
        Testbed::command_in(&self.client_ns, ferry)
            .args(["--output", "json", "netprobe", target, "--udp-port", "7"])
            .args(["--interval-ms", &interval_ms.to_string()])
            .arg("--stop-file")
            .arg(stop_file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start the prober")
    }

    /// Stops a prober started with [`Testbed::start_probe`] and returns its report.
    pub fn stop_probe(
        &self,
        probe: Child,
        stop_file: &Path,
    ) -> Result<crate::netprobe::ProbeReport> {
        std::fs::write(stop_file, b"stop")?;
        let out = probe.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "the prober failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).context("the prober's report")
    }

    /// Stops every worker (through its control socket) and every agent.
    pub fn stop_all(&mut self) {
        for n in &self.nodes {
            shutdown_workers(&n.data_dir);
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.agent.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Asks every worker under an agent's data directory to shut down (tests and benchmarks
/// tearing down a cluster; workers outlive their agents by design).
pub fn shutdown_workers(data_dir: &Path) {
    let Ok(rd) = std::fs::read_dir(data_dir.join("vms")) else {
        return;
    };
    for e in rd.flatten() {
        let sock = e.path().join("api.sock");
        if sock.exists() {
            let _ = contract::worker::call(
                &sock,
                &contract::worker::Request::Shutdown,
                Some(Duration::from_secs(5)),
            );
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.stop_all();
        for n in &self.nodes {
            let _ = ip(&["netns", "del", &n.netns]);
        }
        let _ = ip(&["netns", "del", &self.client_ns]);
        let _ = ip(&["netns", "del", &self.switch_ns]);
    }
}
