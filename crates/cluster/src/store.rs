//! The store interface every backend implements.
//!
//! Ownership of a VM changes only through [`Store::update_vm`], a compare-and-swap on the
//! record's version: that CAS is a live migration's commit point.

use crate::model::{MigrationRecord, NodeInfo, NodeStatus, Versioned, VmRecord};
use std::time::Duration;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cluster store unavailable: {0}")]
    Unavailable(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("unknown node {0:?}")]
    UnknownNode(String),
    #[error("corrupt record in the cluster store: {0}")]
    Corrupt(String),
    #[error(
        "invalid store URL {0:?}: use sqlite:///path/to/cluster.db, etcd://host:port[,host:port] or etcds://host:port[,host:port] (TLS)"
    )]
    BadUrl(String),
    #[error("{url}: TLS to etcd needs this node's certificate and the cluster CA (ferry agent --pki-dir)")]
    NeedsCredentials { url: String },
    #[error("TLS client setup for etcd")]
    Tls(#[source] trust::TrustError),
    #[error("refused to store {what} {name:?}: not a valid name (1-63 of a-z, 0-9, '-', starting with a letter)")]
    InvalidName { what: &'static str, name: String },
}

/// Names become keys, URL segments and file names on every node: each backend refuses to
/// store a record whose names are not [`crate::model::valid_name`]s (whatever the caller
/// checked before).
pub(crate) fn check_name(what: &'static str, name: &str) -> Result<()> {
    let ok = if what == "migration id" {
        crate::model::valid_migration_id(name)
    } else {
        crate::model::valid_name(name)
    };
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidName {
            what,
            name: name.to_string(),
        })
    }
}

/// The names a VM record carries: its own, its owner's and its migration's.
pub(crate) fn check_vm_record(name: &str, rec: &VmRecord) -> Result<()> {
    check_name("VM", name)?;
    if rec.spec.name != name {
        return Err(StoreError::InvalidName {
            what: "VM record (its spec names another VM)",
            name: rec.spec.name.clone(),
        });
    }
    if !rec.owner.is_empty() {
        check_name("node", &rec.owner)?;
    }
    if let Some(m) = &rec.migration {
        check_name("migration id", m)?;
    }
    Ok(())
}

/// The names a migration record carries.
pub(crate) fn check_migration_record(m: &MigrationRecord) -> Result<()> {
    check_name("migration id", &m.id)?;
    check_name("VM", &m.vm)?;
    check_name("node", &m.from)?;
    check_name("node", &m.to)
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The cluster's single source of truth.
pub trait Store: Send + Sync {
    /// Registers (or refreshes) a node and starts its lease of `ttl`.
    fn register_node(&self, info: &NodeInfo, ttl: Duration) -> Result<()>;
    /// Keeps the node's lease alive for another `ttl`.
    fn keepalive(&self, node: &str, ttl: Duration) -> Result<()>;
    /// Marks a node (un)schedulable (drain / undrain).
    fn set_schedulable(&self, node: &str, schedulable: bool) -> Result<()>;
    /// Every node, with `alive` from its lease.
    fn nodes(&self) -> Result<Vec<NodeStatus>>;
    /// One node.
    fn node(&self, name: &str) -> Result<Option<NodeStatus>> {
        Ok(self.nodes()?.into_iter().find(|n| n.info.name == name))
    }
    /// Creates a VM record; fails with `Exists` if the name is taken.
    fn create_vm(&self, rec: &VmRecord) -> Result<()>;
    /// One VM with its version.
    fn vm(&self, name: &str) -> Result<Option<Versioned<VmRecord>>>;
    /// Every VM.
    fn vms(&self) -> Result<Vec<Versioned<VmRecord>>>;
    /// Replaces a VM record if its version is still `expected`; returns whether it did.
    fn update_vm(&self, name: &str, expected: u64, rec: &VmRecord) -> Result<bool>;
    /// Deletes a VM record if its version is still `expected`; returns whether it did.
    fn delete_vm(&self, name: &str, expected: u64) -> Result<bool>;
    /// Creates or replaces a migration record.
    fn put_migration(&self, m: &MigrationRecord) -> Result<()>;
    /// Migration records, newest first (at most the newest 1000 on the embedded backend; every
    /// running one is also in [`Store::running_migrations`]).
    fn migrations(&self) -> Result<Vec<MigrationRecord>>;
    /// One migration record.
    fn migration(&self, id: &str) -> Result<Option<MigrationRecord>> {
        Ok(self.migrations()?.into_iter().find(|m| m.id == id))
    }
    /// Every migration that has not ended, however old.
    fn running_migrations(&self) -> Result<Vec<MigrationRecord>> {
        Ok(self
            .migrations()?
            .into_iter()
            .filter(|m| !m.finished())
            .collect())
    }
    /// The newest `limit` migrations of one VM, newest first.
    fn migrations_of(&self, vm: &str, limit: usize) -> Result<Vec<MigrationRecord>> {
        Ok(self
            .migrations()?
            .into_iter()
            .filter(|m| m.vm == vm)
            .take(limit)
            .collect())
    }
    /// Deletes a migration record (retention).
    fn delete_migration(&self, id: &str) -> Result<()>;
}

/// Retention of migration records: finished records older than `max_age_ms` are deleted,
/// except the newest `keep_per_vm` of each VM (the history `vm show` displays). Returns how
/// many were deleted.
pub fn prune_migrations(
    store: &dyn Store,
    now_ms: u64,
    max_age_ms: u64,
    keep_per_vm: usize,
) -> Result<usize> {
    let mut seen: std::collections::HashMap<String, usize> = Default::default();
    let mut n = 0;
    for m in store.migrations()? {
        let k = seen.entry(m.vm.clone()).or_default();
        *k += 1;
        let old = m
            .finished_ms
            .is_some_and(|f| now_ms.saturating_sub(f) > max_age_ms);
        if m.finished() && old && *k > keep_per_vm {
            store.delete_migration(&m.id)?;
            n += 1;
        }
    }
    Ok(n)
}

/// Opens a store from its URL: `sqlite:///path` (embedded) or `etcd://host:port[,...]`
/// (plaintext etcd). `etcds://` needs credentials: see [`open_with`].
pub fn open(url: &str) -> Result<Box<dyn Store>> {
    open_with(url, None)
}

/// Opens a store from its URL; `etcds://host:port[,...]` is etcd over TLS 1.3 (its server
/// certificate must be of the cluster CA and name the host dialled; `tls` is presented as the
/// client certificate, for etcd's `--client-cert-auth`).
pub fn open_with(url: &str, tls: Option<&trust::tls::Credentials>) -> Result<Box<dyn Store>> {
    if let Some(hosts) = url.strip_prefix("etcds://") {
        let creds = tls.ok_or_else(|| StoreError::NeedsCredentials { url: url.into() })?;
        let endpoints: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("https://{h}"))
            .collect();
        if endpoints.is_empty() {
            return Err(StoreError::BadUrl(url.into()));
        }
        let config =
            trust::api::client_config(creds.roots(), Some(creds), trust::api::Expect::Address)
                .map_err(StoreError::Tls)?;
        let agent = trust::https::agent(crate::etcd::agent_config(), config, None);
        return Ok(Box::new(crate::etcd::EtcdStore::with_agent(
            endpoints, agent,
        )));
    }
    if let Some(path) = url.strip_prefix("sqlite://") {
        if path.is_empty() {
            return Err(StoreError::BadUrl(url.into()));
        }
        return Ok(Box::new(crate::sqlite::SqliteStore::open(
            std::path::Path::new(path),
        )?));
    }
    if let Some(hosts) = url.strip_prefix("etcd://") {
        let endpoints: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("http://{h}"))
            .collect();
        if endpoints.is_empty() {
            return Err(StoreError::BadUrl(url.into()));
        }
        return Ok(Box::new(crate::etcd::EtcdStore::new(endpoints)?));
    }
    Err(StoreError::BadUrl(url.into()))
}

pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("store records always serialize")
}

pub(crate) fn from_json<T: serde::de::DeserializeOwned>(what: &str, s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}
