//! The Ferry node agent: one per node. It registers the node in the cluster store and keeps its
//! lease alive, runs one `ferry-vmm` worker per VM it owns, orchestrates live migrations (the
//! store's compare-and-swap of the owner is the commit point), drains nodes, and serves the REST
//! API the `ferry` CLI uses.

pub mod api;
pub mod client;
pub mod console;
pub mod https;
pub mod metrics;
pub mod node;
pub mod ops;
pub mod workers;

use cluster::{NodeInfo, Store};
use std::sync::Arc;

pub use node::AgentConfig;

/// Errors the API maps to HTTP statuses.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// 400: the request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// 404: no such VM, node or migration.
    #[error("{0}")]
    NotFound(String),
    /// 409: the state does not allow it (VM running, migration in progress, refused preflight).
    #[error("{0}")]
    Conflict(String),
    /// 503: the store or another agent did not answer.
    #[error("{0}")]
    Unavailable(String),
    /// 500.
    #[error("{0}")]
    Internal(String),
}

impl From<cluster::StoreError> for AgentError {
    fn from(e: cluster::StoreError) -> Self {
        match e {
            cluster::StoreError::Exists(_) => AgentError::Conflict(e.to_string()),
            cluster::StoreError::UnknownNode(_) => AgentError::NotFound(e.to_string()),
            cluster::StoreError::Unavailable(_) => AgentError::Unavailable(e.to_string()),
            cluster::StoreError::InvalidName { .. } => AgentError::BadRequest(e.to_string()),
            _ => AgentError::Internal(e.to_string()),
        }
    }
}

impl From<anyhow::Error> for AgentError {
    fn from(e: anyhow::Error) -> Self {
        AgentError::Internal(format!("{e:#}"))
    }
}

/// The agent's shared state.
pub struct Agent {
    pub cfg: AgentConfig,
    pub store: Arc<dyn Store>,
    pub node: std::sync::Mutex<NodeInfo>,
    pub workers: workers::Workers,
    pub migrations: ops::MigrationTable,
    /// Receiving workers not yet running a VM: VM name -> (migration id, worker).
    pub incoming:
        std::sync::Mutex<std::collections::HashMap<String, (String, Arc<workers::Worker>)>>,
    /// VMs with a life-cycle operation in progress here (start, stop, delete, the setup of a
    /// migration): reconciliation leaves them alone until it ends.
    pub busy: ops::Busy,
    /// Receivers this node runs for migrations it was asked to take (`max_incoming`).
    pub receiving: ops::Slots,
    /// Migrations this node sends (`max_outgoing`).
    pub sending: ops::Slots,
    pub metrics: metrics::Metrics,
}

impl Agent {
    /// Builds the agent: opens the store, describes and registers the node, adopts workers of
    /// VMs this node owns that are still running from before a restart.
    pub fn start(cfg: AgentConfig) -> anyhow::Result<Arc<Agent>> {
        if !cluster::valid_name(&cfg.node) {
            anyhow::bail!(
                "invalid node name {:?}: use a-z, 0-9 and '-', starting with a letter",
                cfg.node
            );
        }
        // etcd over TLS (`etcds://`) with this node's certificate.
        let creds = match &cfg.tls {
            Some(f) => Some(trust::tls::Credentials::load(f)?),
            None => None,
        };
        let store: Arc<dyn Store> = cluster::open_with(&cfg.store, creds.as_ref())?.into();
        let mut info = node::describe(&cfg)?;
        if let Some(old) = store.node(&cfg.node)? {
            info.schedulable = old.info.schedulable; // a drain survives a restart
        }
        store.register_node(&info, cfg.lease_ttl)?;
        std::fs::create_dir_all(cfg.data_dir.join("vms"))?;
        let agent = Arc::new(Agent {
            cfg,
            store,
            node: std::sync::Mutex::new(info),
            workers: Default::default(),
            migrations: Default::default(),
            incoming: Default::default(),
            busy: Default::default(),
            receiving: Default::default(),
            sending: Default::default(),
            metrics: Default::default(),
        });
        agent.reconcile_once();
        Ok(agent)
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.cfg.node
    }

    /// Background loops: lease keepalive and reconciliation.
    pub fn spawn_background(self: &Arc<Self>) {
        let a = self.clone();
        std::thread::Builder::new()
            .name("lease".into())
            .spawn(move || loop {
                std::thread::sleep(a.cfg.lease_ttl / 3);
                match a.store.keepalive(&a.cfg.node, a.cfg.lease_ttl) {
                    Ok(()) => {}
                    Err(cluster::StoreError::UnknownNode(_)) => {
                        let info = a.node.lock().unwrap_or_else(|e| e.into_inner()).clone();
                        let _ = a.store.register_node(&info, a.cfg.lease_ttl);
                    }
                    Err(e) => tracing::warn!("lease keepalive failed: {e}"),
                }
            })
            .expect("lease thread");
        let a = self.clone();
        std::thread::Builder::new()
            .name("reconcile".into())
            .spawn(move || loop {
                std::thread::sleep(std::time::Duration::from_millis(200));
                a.reconcile_once();
            })
            .expect("reconcile thread");
    }
}
