//! What this node is and offers, as registered in the store.

use cluster::{now_ms, NodeInfo};
use std::path::PathBuf;
use std::time::Duration;
pub use vmm::confine::RootSpec;

/// How an agent is configured (`ferry agent ...`).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Node name (unique in the cluster).
    pub node: String,
    /// Where the HTTP API listens (`host:port`); other agents and the CLI use it.
    pub listen: String,
    /// Cluster store URL.
    pub store: String,
    /// Where VM directories (sockets, serial logs) live.
    pub data_dir: PathBuf,
    /// The `ferry-vmm` binary.
    pub worker_bin: PathBuf,
    /// Claim only the CPU features of this profile (model a node with fewer features).
    pub cpu_limit: Option<String>,
    /// vCPUs this node may run (default: 4 per online CPU: vCPUs are overcommitted, as on
    /// any KVM host).
    pub cores: Option<u32>,
    /// RAM given to VMs in MiB (default: available memory).
    pub memory_mib: Option<u64>,
    /// Shared storage this node reaches: a VM's disk images must lie beneath one of these
    /// (`DIR,devices`: block devices there too), and workers open them only beneath them.
    pub storage: Vec<vmm::confine::RootSpec>,
    /// Where a VM's kernel and initrd may be read from on this node (none: only the built-in
    /// test guest boots here).
    pub boot_roots: Vec<vmm::confine::RootSpec>,
    /// Networks this node is attached to, each with the bridge its VMs' TAPs join.
    pub networks: Vec<(String, String)>,
    /// Lease TTL in the store.
    pub lease_ttl: Duration,
    /// Most migrations a drain runs at once (never more than `max_outgoing`).
    pub drain_concurrency: usize,
    /// Most migrations this node receives at once: one more receive request is refused
    /// (503) before any worker starts.
    pub max_incoming: usize,
    /// Most migrations this node sends at once: one more is refused (503) before the VM is
    /// locked.
    pub max_outgoing: usize,
    /// How long the commit point keeps trying a store that does not answer before it leaves
    /// the migration undecided (both sides paused; reconciliation settles it once the store
    /// is back).
    pub commit_retry: Duration,
    /// Keep the store's swap at the commit point, in the downtime (`--store-commit`): no
    /// handover ([`cluster::VmRecord::handover_to`]) from or to this node. For comparison
    /// (benchmarks, the fault matrix's rows for that protocol) and mixed clusters.
    pub store_commit: bool,
    /// This node's certificate and key and the cluster CA (`ferry pki issue --node`): the
    /// migrations between this node's workers and others' run over mutual TLS, each side
    /// checking the other is the node the plan names, with a one-time secret per receiver.
    /// `None`: plaintext (`--insecure` workers; the agent warns at start).
    pub tls: Option<contract::trust::TlsFiles>,
    /// The credentials the API accepts (`--api-tokens`, digests only): every request then needs
    /// a bearer token whose role allows it (`contract::auth`). `None`: the API is open (the
    /// agent warns at start).
    pub api_tokens: Option<contract::auth::TokensFile>,
    /// The UIDs workers run as, one per worker (`--worker-uids`): each drops root after
    /// opening its VM's resources. `None`: workers stay root (the agent warns at start).
    pub worker_uids: Option<crate::workers::UidRange>,
}

impl AgentConfig {
    /// Worker flags that confine it to this node's storage and boot roots: it opens no other
    /// host file for the VM ([`vmm::confine`]).
    pub fn confinement_args(&self) -> Vec<String> {
        let mut v = vec!["--confined".to_string()];
        for r in &self.storage {
            v.extend(["--storage-root".into(), r.to_string()]);
        }
        for r in &self.boot_roots {
            v.extend(["--boot-root".into(), r.to_string()]);
        }
        v
    }

    /// The bridge NICs on `network` attach to here.
    pub fn bridge_of(&self, network: &str) -> Option<&str> {
        self.networks
            .iter()
            .find(|(n, _)| n == network)
            .map(|(_, b)| b.as_str())
    }

    /// `--net-backend` arguments for a VM's NICs on this node.
    pub fn net_backend_args(&self, spec: &cluster::VmSpec) -> Result<Vec<String>, String> {
        let mut out = Vec::new();
        for n in &spec.nics {
            let br = self.bridge_of(&n.network).ok_or_else(|| {
                format!(
                    "node {} is not attached to network {}",
                    self.node, n.network
                )
            })?;
            out.push("--net-backend".to_string());
            out.push(format!("bridge={br}"));
        }
        Ok(out)
    }
}

/// Parses `--network NAME[=BRIDGE]` (the bridge defaults to the network's name).
pub fn parse_network(s: &str) -> Result<(String, String), String> {
    let (n, b) = s.split_once('=').unwrap_or((s, s));
    if n.is_empty() || b.is_empty() || b.len() > 15 {
        return Err(format!(
            "invalid network {s:?}: use NAME or NAME=BRIDGE (bridge names have at most 15 characters)"
        ));
    }
    Ok((n.to_string(), b.to_string()))
}

/// Default vCPU overcommit.
pub const VCPUS_PER_CPU: u32 = 4;

/// Describes this node from its KVM and configuration.
pub fn describe(cfg: &AgentConfig) -> anyhow::Result<NodeInfo> {
    let kvm = vmm::open_kvm()?;
    let supported = vmm::cpuid::supported(&kvm)?;
    let offer = match &cfg.cpu_limit {
        Some(p) => vmm::cpuid::build(&supported, p)?,
        None => supported,
    };
    let (_, model) = vmm::cpuid::host_cpu_model();
    Ok(NodeInfo {
        name: cfg.node.clone(),
        address: cfg.listen.clone(),
        cpu_vendor: offer.vendor(),
        cpu_model: model,
        cpu_features: offer.features().into_iter().collect(),
        cpu_limit: cfg.cpu_limit.clone(),
        cores: cfg
            .cores
            .unwrap_or_else(|| vmm::host::online_cpus() * VCPUS_PER_CPU),
        memory_mib: cfg.memory_mib.unwrap_or_else(vmm::host::free_memory_mib),
        storage: cfg
            .storage
            .iter()
            .map(|r| r.dir.display().to_string())
            .collect(),
        boot: cfg
            .boot_roots
            .iter()
            .map(|r| r.dir.display().to_string())
            .collect(),
        networks: cfg.networks.iter().map(|(n, _)| n.clone()).collect(),
        schedulable: true,
        started_ms: now_ms(),
        handover: !cfg.store_commit,
    })
}
