//! The etcd backend, for clusters across machines, spoken through etcd's v3 JSON gateway
//! (`/v3/kv/*`, `/v3/lease/*`; no protobuf toolchain needed).
//!
//! Keys: `/ferry/nodes/<name>` (node info), `/ferry/alive/<name>` (attached to the node's lease:
//! it disappears when the agent stops refreshing it), `/ferry/vms/<name>` (version = the key's
//! `mod_revision`, compared in a transaction for every change), `/ferry/migrations/<id>`.

use crate::model::{MigrationRecord, NodeInfo, NodeStatus, Versioned, VmRecord};
use crate::store::{from_json, to_json, Result, Store, StoreError};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

const NODES: &str = "/ferry/nodes/";
const ALIVE: &str = "/ferry/alive/";
const VMS: &str = "/ferry/vms/";
const MIGRATIONS: &str = "/ferry/migrations/";

/// etcd-backed store.
pub struct EtcdStore {
    endpoints: Vec<String>,
    agent: ureq::Agent,
    leases: Mutex<HashMap<String, i64>>,
}

fn b64(s: &str) -> String {
    B64.encode(s.as_bytes())
}

fn unb64(v: &Value) -> Result<String> {
    let s = v.as_str().unwrap_or_default();
    let bytes = B64
        .decode(s)
        .map_err(|e| StoreError::Corrupt(format!("etcd base64: {e}")))?;
    String::from_utf8(bytes).map_err(|e| StoreError::Corrupt(format!("etcd value: {e}")))
}

/// gRPC-gateway encodes int64 as strings (and omits zero values).
fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

/// The key range end that covers every key starting with `prefix`.
fn prefix_end(prefix: &str) -> String {
    let mut b = prefix.as_bytes().to_vec();
    let last = b.len() - 1;
    b[last] += 1;
    B64.encode(b)
}

/// The HTTP settings of every etcd request.
pub(crate) fn agent_config() -> ureq::config::Config {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
}

impl EtcdStore {
    /// A client for these endpoints (`http://host:port`).
    pub fn new(endpoints: Vec<String>) -> Result<EtcdStore> {
        Ok(EtcdStore::with_agent(endpoints, agent_config().into()))
    }

    /// A client for these endpoints through `agent` (`https://host:port` with a TLS agent).
    pub fn with_agent(endpoints: Vec<String>, agent: ureq::Agent) -> EtcdStore {
        EtcdStore {
            endpoints,
            agent,
            leases: Mutex::new(HashMap::new()),
        }
    }

    /// POSTs `body` to the first endpoint that answers.
    fn call(&self, path: &str, body: Value) -> Result<Value> {
        let mut last = String::from("no endpoint");
        for ep in &self.endpoints {
            let url = format!("{ep}{path}");
            match self.agent.post(&url).send_json(&body) {
                Ok(mut resp) => {
                    return resp.body_mut().read_json::<Value>().map_err(|e| {
                        StoreError::Unavailable(format!("etcd {url}: unreadable answer: {e}"))
                    })
                }
                Err(e) => last = format!("etcd {url}: {e}"),
            }
        }
        Err(StoreError::Unavailable(last))
    }

    fn get(&self, key: &str) -> Result<Option<(String, i64)>> {
        let r = self.call("/v3/kv/range", json!({ "key": b64(key) }))?;
        match r["kvs"].as_array().and_then(|a| a.first()) {
            Some(kv) => Ok(Some((unb64(&kv["value"])?, int(&kv["mod_revision"])))),
            None => Ok(None),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, String, i64)>> {
        let r = self.call(
            "/v3/kv/range",
            json!({ "key": b64(prefix), "range_end": prefix_end(prefix) }),
        )?;
        let mut out = Vec::new();
        for kv in r["kvs"].as_array().cloned().unwrap_or_default() {
            out.push((
                unb64(&kv["key"])?,
                unb64(&kv["value"])?,
                int(&kv["mod_revision"]),
            ));
        }
        Ok(out)
    }

    fn put(&self, key: &str, value: &str, lease: Option<i64>) -> Result<()> {
        let mut body = json!({ "key": b64(key), "value": b64(value) });
        if let Some(l) = lease {
            body["lease"] = json!(l.to_string());
        }
        self.call("/v3/kv/put", body).map(|_| ())
    }

    fn delete_key(&self, key: &str) -> Result<()> {
        self.call("/v3/kv/deleterange", json!({ "key": b64(key) }))
            .map(|_| ())
    }

    /// A transaction: if `compare` holds, run `success`. Returns whether it held.
    fn txn(&self, compare: Value, success: Value) -> Result<bool> {
        let r = self.call(
            "/v3/kv/txn",
            json!({ "compare": [compare], "success": [success] }),
        )?;
        Ok(r["succeeded"].as_bool().unwrap_or(false))
    }

    fn grant(&self, ttl: Duration) -> Result<i64> {
        let r = self.call(
            "/v3/lease/grant",
            json!({ "TTL": ttl.as_secs().max(1).to_string() }),
        )?;
        let id = int(&r["ID"]);
        if id == 0 {
            return Err(StoreError::Unavailable(format!(
                "etcd did not grant a lease: {r}"
            )));
        }
        Ok(id)
    }

    fn attach_lease(&self, node: &str, ttl: Duration) -> Result<()> {
        let id = self.grant(ttl)?;
        self.put(&format!("{ALIVE}{node}"), "1", Some(id))?;
        self.leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.into(), id);
        Ok(())
    }
}

impl Store for EtcdStore {
    fn register_node(&self, info: &NodeInfo, ttl: Duration) -> Result<()> {
        crate::store::check_name("node", &info.name)?;
        self.put(&format!("{NODES}{}", info.name), &to_json(info), None)?;
        self.attach_lease(&info.name, ttl)
    }

    fn keepalive(&self, node: &str, ttl: Duration) -> Result<()> {
        let id = self
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .copied();
        if let Some(id) = id {
            let r = self.call("/v3/lease/keepalive", json!({ "ID": id.to_string() }))?;
            if int(&r["result"]["TTL"]) > 0 {
                return Ok(());
            }
        }
        // The lease expired (etcd was away longer than the TTL) or was never granted here.
        if self.get(&format!("{NODES}{node}"))?.is_none() {
            return Err(StoreError::UnknownNode(node.into()));
        }
        self.attach_lease(node, ttl)
    }

    fn set_schedulable(&self, node: &str, schedulable: bool) -> Result<()> {
        let key = format!("{NODES}{node}");
        loop {
            let Some((cur, rev)) = self.get(&key)? else {
                return Err(StoreError::UnknownNode(node.into()));
            };
            let mut info: NodeInfo = from_json("node", &cur)?;
            info.schedulable = schedulable;
            let ok = self.txn(
                json!({ "key": b64(&key), "target": "MOD", "result": "EQUAL", "mod_revision": rev.to_string() }),
                json!({ "request_put": { "key": b64(&key), "value": b64(&to_json(&info)) } }),
            )?;
            if ok {
                return Ok(());
            }
        }
    }

    fn nodes(&self) -> Result<Vec<NodeStatus>> {
        let alive: std::collections::BTreeSet<String> = self
            .list(ALIVE)?
            .into_iter()
            .map(|(k, _, _)| k.trim_start_matches(ALIVE).to_string())
            .collect();
        let mut out = Vec::new();
        for (k, v, _) in self.list(NODES)? {
            let name = k.trim_start_matches(NODES).to_string();
            out.push(NodeStatus {
                info: from_json("node", &v)?,
                alive: alive.contains(&name),
            });
        }
        out.sort_by(|a, b| a.info.name.cmp(&b.info.name));
        Ok(out)
    }

    fn create_vm(&self, rec: &VmRecord) -> Result<()> {
        crate::store::check_vm_record(&rec.spec.name, rec)?;
        let key = format!("{VMS}{}", rec.spec.name);
        let ok = self.txn(
            json!({ "key": b64(&key), "target": "CREATE", "result": "EQUAL", "create_revision": "0" }),
            json!({ "request_put": { "key": b64(&key), "value": b64(&to_json(rec)) } }),
        )?;
        if ok {
            Ok(())
        } else {
            Err(StoreError::Exists(format!("VM {:?}", rec.spec.name)))
        }
    }

    fn vm(&self, name: &str) -> Result<Option<Versioned<VmRecord>>> {
        self.get(&format!("{VMS}{name}"))?
            .map(|(v, rev)| {
                Ok(Versioned {
                    value: from_json("vm", &v)?,
                    version: rev as u64,
                })
            })
            .transpose()
    }

    fn vms(&self) -> Result<Vec<Versioned<VmRecord>>> {
        let mut out: Vec<Versioned<VmRecord>> = self
            .list(VMS)?
            .into_iter()
            .map(|(_, v, rev)| {
                Ok(Versioned {
                    value: from_json("vm", &v)?,
                    version: rev as u64,
                })
            })
            .collect::<Result<_>>()?;
        out.sort_by(|a, b| a.value.spec.name.cmp(&b.value.spec.name));
        Ok(out)
    }

    fn update_vm(&self, name: &str, expected: u64, rec: &VmRecord) -> Result<bool> {
        crate::store::check_vm_record(name, rec)?;
        let key = format!("{VMS}{name}");
        self.txn(
            json!({ "key": b64(&key), "target": "MOD", "result": "EQUAL", "mod_revision": expected.to_string() }),
            json!({ "request_put": { "key": b64(&key), "value": b64(&to_json(rec)) } }),
        )
    }

    fn delete_vm(&self, name: &str, expected: u64) -> Result<bool> {
        let key = format!("{VMS}{name}");
        self.txn(
            json!({ "key": b64(&key), "target": "MOD", "result": "EQUAL", "mod_revision": expected.to_string() }),
            json!({ "request_delete_range": { "key": b64(&key) } }),
        )
    }

    fn delete_migration(&self, id: &str) -> Result<()> {
        self.delete_key(&format!("{MIGRATIONS}{id}"))
    }

    fn put_migration(&self, m: &MigrationRecord) -> Result<()> {
        crate::store::check_migration_record(m)?;
        self.put(&format!("{MIGRATIONS}{}", m.id), &to_json(m), None)
    }

    fn migrations(&self) -> Result<Vec<MigrationRecord>> {
        let mut out: Vec<MigrationRecord> = self
            .list(MIGRATIONS)?
            .iter()
            .map(|(_, v, _)| from_json("migration", v))
            .collect::<Result<_>>()?;
        out.sort_by(|a, b| b.started_ms.cmp(&a.started_ms).then(b.id.cmp(&a.id)));
        Ok(out)
    }
}
