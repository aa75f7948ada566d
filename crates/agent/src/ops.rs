//! VM life cycle, migration orchestration, drains and reconciliation. All blocking; the HTTP
//! layer runs these on blocking threads.
//!
//! A request for a VM owned by another node is forwarded to that node's agent: only the owner
//! runs, stops or migrates its VMs.

use crate::client;
use crate::workers::Worker;
use crate::{Agent, AgentError};
use cluster::{
    now_ms, MigrationOutcome, MigrationRecord, NodeStatus, Versioned, VmRecord, VmSpec, VmState,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use worker::api::{CommitDecision, MigrateArgs, MigrateSession, Request};

type R<T> = Result<T, AgentError>;

/// A migration request (API body).
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// Destination node.
    pub to: String,
    #[serde(default = "default_downtime")]
    pub max_downtime_ms: u64,
    #[serde(default = "default_streams")]
    pub streams: u16,
    #[serde(default = "default_compress")]
    pub compress: String,
    #[serde(default)]
    pub dry_run: bool,
    /// Bandwidth cap for the memory copy, MiB/s.
    #[serde(default)]
    pub max_bandwidth_mibs: Option<u64>,
}

fn default_downtime() -> u64 {
    50
}
fn default_streams() -> u16 {
    1
}
fn default_compress() -> String {
    "none".into()
}

/// The destination side's instruction (agent to agent).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ReceiveRequest {
    pub migration: String,
    pub vm: VmRecord,
    pub from: String,
}

/// A live migration this agent runs or ran (as the source).
pub struct MigrationWatch {
    pub record: Mutex<MigrationRecord>,
    pub progress: Mutex<Value>,
    pub done: AtomicBool,
    pub cancel: AtomicBool,
}

/// Migrations by id.
#[derive(Default)]
pub struct MigrationTable {
    map: Mutex<HashMap<String, Arc<MigrationWatch>>>,
}

impl MigrationTable {
    pub fn get(&self, id: &str) -> Option<Arc<MigrationWatch>> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }
    fn insert(&self, w: Arc<MigrationWatch>) {
        let id = w
            .record
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .id
            .clone();
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, w);
    }
}

fn new_id(vm: &str) -> String {
    let mut b = [0u8; 4];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    format!("{vm}-{}-{:08x}", now_ms(), u32::from_le_bytes(b))
}

/// Whether `path` lies under one of `roots`.
fn reaches(roots: &[String], path: &str) -> bool {
    roots.iter().any(|r| {
        let r = r.trim_end_matches('/');
        path == r || path.starts_with(&format!("{r}/")) || r.is_empty()
    })
}

impl Agent {
    fn node_info(&self) -> cluster::NodeInfo {
        self.node.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn vm_or_404(&self, name: &str) -> R<Versioned<VmRecord>> {
        self.store
            .vm(name)?
            .ok_or_else(|| AgentError::NotFound(format!("unknown VM {name:?}")))
    }

    fn node_or_404(&self, name: &str) -> R<NodeStatus> {
        self.store
            .node(name)?
            .ok_or_else(|| AgentError::NotFound(format!("unknown node {name:?}")))
    }

    /// The agent address of `node`.
    fn address_of(&self, node: &str) -> R<String> {
        let n = self.node_or_404(node)?;
        if !n.alive {
            return Err(AgentError::Unavailable(format!(
                "node {node} is down (its lease expired)"
            )));
        }
        Ok(n.info.address)
    }

    /// CAS loop: applies `f` to the current record until the swap wins (or `f` refuses).
    fn update_vm(
        &self,
        name: &str,
        mut f: impl FnMut(&mut VmRecord) -> R<()>,
    ) -> R<Versioned<VmRecord>> {
        for _ in 0..100 {
            let cur = self.vm_or_404(name)?;
            let mut rec = cur.value.clone();
            f(&mut rec)?;
            rec.updated_ms = now_ms();
            if self.store.update_vm(name, cur.version, &rec)? {
                return self.vm_or_404(name);
            }
        }
        Err(AgentError::Conflict(format!(
            "VM {name} is changing too fast; try again"
        )))
    }

    // ------------------------------------------------------------------------------------
    // Nodes

    /// Nodes with their use.
    pub fn nodes_view(&self) -> R<Vec<Value>> {
        let vms = self.store.vms()?;
        let migs = self.store.migrations()?;
        Ok(self
            .store
            .nodes()?
            .into_iter()
            .map(|n| {
                let (cores, mem, count) = usage(&n.info.name, &vms, &migs);
                json!({
                    "name": n.info.name,
                    "address": n.info.address,
                    "alive": n.alive,
                    "schedulable": n.info.schedulable,
                    "cpu_vendor": n.info.cpu_vendor,
                    "cpu_model": n.info.cpu_model,
                    "cpu_features": n.info.cpu_features,
                    "cores": n.info.cores,
                    "memory_mib": n.info.memory_mib,
                    "cores_used": cores,
                    "memory_used_mib": mem,
                    "vms": count,
                    "storage": n.info.storage,
                    "networks": n.info.networks,
                })
            })
            .collect())
    }

    /// Features every alive node offers: the `cluster` CPU profile.
    pub fn cluster_features(&self) -> R<BTreeSet<String>> {
        let nodes = self.store.nodes()?;
        let mut it = nodes
            .iter()
            .filter(|n| n.alive)
            .map(|n| n.info.cpu_features.iter().cloned().collect::<BTreeSet<_>>());
        let first = it.next().unwrap_or_default();
        Ok(it.fold(first, |a, b| a.intersection(&b).cloned().collect()))
    }

    // ------------------------------------------------------------------------------------
    // VM life cycle

    /// Creates a VM (stopped) owned by `node` (default: this node).
    pub fn create_vm(&self, spec: VmSpec, node: Option<String>) -> R<VmRecord> {
        spec.validate()
            .map_err(|e| AgentError::BadRequest(e.to_string()))?;
        let owner = node.unwrap_or_else(|| self.name().to_string());
        self.node_or_404(&owner)?;
        let rec = VmRecord {
            spec,
            owner,
            state: VmState::Stopped,
            cpu_features: vec![],
            migration: None,
            last_error: None,
            updated_ms: now_ms(),
        };
        self.store.create_vm(&rec)?;
        self.metrics.inc("ferry_vms_created_total");
        Ok(rec)
    }

    /// The VM with what its worker says.
    pub fn vm_view(&self, name: &str) -> R<Value> {
        let v = self.vm_or_404(name)?;
        let worker = if v.value.owner == self.name() {
            self.workers.get(name).and_then(|w| w.state())
        } else {
            self.address_of(&v.value.owner)
                .ok()
                .and_then(|a| client::get(&a, &format!("/v1/vms/{name}")).ok())
                .and_then(|x| x.get("worker").cloned())
        };
        let migs: Vec<MigrationRecord> = self
            .store
            .migrations()?
            .into_iter()
            .filter(|m| m.vm == name)
            .take(10)
            .collect();
        Ok(json!({ "vm": v.value, "version": v.version, "worker": worker, "migrations": migs }))
    }

    /// Lets the owner node's agent do a VM operation (`path`, POST without a body).
    fn forward_to_owner(&self, owner: &str, path: &str) -> R<VmRecord> {
        let a = self.address_of(owner)?;
        let r = client::post(&a, path, &json!({}), Some(Duration::from_secs(60)))?;
        serde_json::from_value(r).map_err(|e| AgentError::Internal(e.to_string()))
    }

    /// Starts a stopped (or crashed) VM on its owner node.
    pub fn start_vm(&self, name: &str) -> R<VmRecord> {
        let v = self.vm_or_404(name)?;
        if v.value.owner != self.name() {
            return self.forward_to_owner(&v.value.owner, &format!("/v1/vms/{name}/start"));
        }
        match v.value.state {
            VmState::Stopped | VmState::Crashed => {}
            s => return Err(AgentError::Conflict(format!("VM {name} is {s}"))),
        }
        let spec = v.value.spec.clone();
        // Resolve the CPU profile on this node.
        let mine = self.node_info();
        let profile = match spec.cpu_profile.as_str() {
            "baseline" => "baseline".to_string(),
            "cluster" => format!(
                "features={}",
                self.cluster_features()?
                    .into_iter()
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            _ if self.cfg.cpu_limit.is_some() => {
                format!("features={}", mine.cpu_features.join(","))
            }
            _ => "host".to_string(),
        };
        let features = {
            let kvm = vmm::open_kvm().map_err(|e| AgentError::Internal(e.to_string()))?;
            let supported =
                vmm::cpuid::supported(&kvm).map_err(|e| AgentError::Internal(e.to_string()))?;
            vmm::cpuid::build(&supported, &profile)
                .map_err(|e| AgentError::Conflict(format!("VM {name} cannot run here: {e}")))?
                .features()
                .into_iter()
                .collect::<Vec<_>>()
        };
        let (cores, mem, _) = usage(self.name(), &self.store.vms()?, &self.store.migrations()?);
        if cores + spec.vcpus as u32 > mine.cores || mem + spec.memory_mib > mine.memory_mib {
            return Err(AgentError::Conflict(format!(
                "node {} has {} cores and {} MiB free, VM {name} needs {} and {} MiB",
                self.name(),
                mine.cores.saturating_sub(cores),
                mine.memory_mib.saturating_sub(mem),
                spec.vcpus,
                spec.memory_mib
            )));
        }
        let backends = self
            .cfg
            .net_backend_args(&spec)
            .map_err(AgentError::Conflict)?;
        // Claim the VM (so no other start races this one), then start the worker.
        self.update_vm(name, |r| {
            if !matches!(r.state, VmState::Stopped | VmState::Crashed) || r.owner != self.name() {
                return Err(AgentError::Conflict(format!("VM {name} changed meanwhile")));
            }
            r.state = VmState::Running;
            r.cpu_features = features.clone();
            r.last_error = None;
            Ok(())
        })?;
        let vm_cfg = spec.vm_config(&profile);
        let mut args: Vec<String> = vec![
            "run".into(),
            "--kernel".into(),
            spec.kernel.clone(),
            "--cmdline".into(),
            spec.cmdline.clone(),
            "--vcpus".into(),
            spec.vcpus.to_string(),
            "--memory-mib".into(),
            spec.memory_mib.to_string(),
            "--cpu-profile".into(),
            profile,
        ];
        for d in &vm_cfg.disks {
            args.push("--disk".into());
            args.push(format!(
                "{}{}",
                d.path.display(),
                if d.read_only { ",ro" } else { "" }
            ));
        }
        for n in &vm_cfg.nics {
            args.push("--nic".into());
            args.push(n.mac.to_string());
        }
        args.extend(backends);
        match self
            .workers
            .spawn(&self.cfg.worker_bin, &self.cfg.data_dir, name, &args)
        {
            Ok((w, _)) => {
                self.workers.insert(w);
                self.metrics.inc("ferry_vms_started_total");
                Ok(self.vm_or_404(name)?.value)
            }
            Err(e) => {
                let msg = format!("{e:#}");
                let _ = self.update_vm(name, |r| {
                    r.state = VmState::Stopped;
                    r.last_error = Some(msg.clone());
                    Ok(())
                });
                Err(AgentError::Internal(msg))
            }
        }
    }

    /// Stops a running VM.
    pub fn stop_vm(&self, name: &str) -> R<VmRecord> {
        let v = self.vm_or_404(name)?;
        if v.value.owner != self.name() {
            return self.forward_to_owner(&v.value.owner, &format!("/v1/vms/{name}/stop"));
        }
        match v.value.state {
            VmState::Running | VmState::Crashed => {}
            VmState::Migrating => {
                return Err(AgentError::Conflict(format!(
                    "VM {name} is migrating: cancel the migration first"
                )))
            }
            VmState::Stopped => return Ok(v.value),
        }
        if let Some(w) = self.workers.remove(name) {
            w.stop();
        }
        Ok(self
            .update_vm(name, |r| {
                r.state = VmState::Stopped;
                Ok(())
            })?
            .value)
    }

    /// Deletes a stopped VM.
    pub fn delete_vm(&self, name: &str) -> R<()> {
        let v = self.vm_or_404(name)?;
        if !matches!(v.value.state, VmState::Stopped | VmState::Crashed) {
            return Err(AgentError::Conflict(format!(
                "VM {name} is {}: stop it first",
                v.value.state
            )));
        }
        if v.value.state == VmState::Crashed && v.value.owner == self.name() {
            if let Some(w) = self.workers.remove(name) {
                w.stop();
            }
        }
        if !self.store.delete_vm(name, v.version)? {
            return Err(AgentError::Conflict(format!(
                "VM {name} changed meanwhile; try again"
            )));
        }
        Ok(())
    }

    // ------------------------------------------------------------------------------------
    // Migration, source side

    /// Checks whether `dest` can take `vm` (the agent-level preflight).
    pub fn preflight(&self, vm: &VmRecord, dest: &NodeStatus) -> Vec<String> {
        let mut problems = Vec::new();
        let src = self.node_info();
        if !dest.alive {
            problems.push(format!(
                "node {} is down (its lease expired)",
                dest.info.name
            ));
        }
        if !dest.info.schedulable {
            problems.push(format!("node {} is drained", dest.info.name));
        }
        if dest.info.cpu_vendor != src.cpu_vendor {
            problems.push(format!(
                "CPU vendor differs: {} here, {} on {}",
                src.cpu_vendor, dest.info.cpu_vendor, dest.info.name
            ));
        }
        let have: BTreeSet<&String> = dest.info.cpu_features.iter().collect();
        let missing: Vec<&str> = vm
            .cpu_features
            .iter()
            .filter(|f| !have.contains(f))
            .map(|f| f.as_str())
            .collect();
        if !missing.is_empty() {
            problems.push(format!(
                "node {} lacks CPU features the VM uses: {}",
                dest.info.name,
                missing.join(", ")
            ));
        }
        if let (Ok(vms), Ok(migs)) = (self.store.vms(), self.store.migrations()) {
            let (cores, mem, _) = usage(&dest.info.name, &vms, &migs);
            if cores + vm.spec.vcpus as u32 > dest.info.cores {
                problems.push(format!(
                    "not enough cores on {}: {} free, the VM needs {}",
                    dest.info.name,
                    dest.info.cores.saturating_sub(cores),
                    vm.spec.vcpus
                ));
            }
            if mem + vm.spec.memory_mib > dest.info.memory_mib {
                problems.push(format!(
                    "not enough memory on {}: {} MiB free, the VM needs {} MiB",
                    dest.info.name,
                    dest.info.memory_mib.saturating_sub(mem),
                    vm.spec.memory_mib
                ));
            }
        }
        for s in vm.spec.storage_needed() {
            if !reaches(&dest.info.storage, &s) {
                problems.push(format!(
                    "node {} does not reach storage {s}",
                    dest.info.name
                ));
            }
        }
        for n in vm.spec.networks_needed() {
            if !dest.info.networks.contains(&n) {
                problems.push(format!(
                    "node {} is not attached to network {n}",
                    dest.info.name
                ));
            }
        }
        problems
    }

    /// Starts a live migration of `name` to `req.to`; returns its record (running, or failed
    /// right away when preflight refused). Forwarded to the VM's owner.
    pub fn migrate(self: &Arc<Self>, name: &str, req: MigrateRequest) -> R<Value> {
        let v = self.vm_or_404(name)?;
        if v.value.owner != self.name() {
            let a = self.address_of(&v.value.owner)?;
            return client::post(
                &a,
                &format!("/v1/vms/{name}/migrate"),
                &serde_json::to_value(&req).unwrap_or_default(),
                Some(Duration::from_secs(60)),
            );
        }
        if req.to == self.name() {
            return Err(AgentError::BadRequest(format!(
                "VM {name} already runs on {}",
                req.to
            )));
        }
        let dest = self.node_or_404(&req.to)?;
        if v.value.state != VmState::Running {
            return Err(AgentError::Conflict(format!(
                "VM {name} is {}: only a running VM can be live-migrated",
                v.value.state
            )));
        }
        if self.workers.get(name).is_none() {
            return Err(AgentError::Conflict(format!(
                "VM {name} has no worker on {}",
                self.name()
            )));
        }
        let id = new_id(name);
        let mut record = MigrationRecord {
            id: id.clone(),
            vm: name.into(),
            from: self.name().into(),
            to: req.to.clone(),
            started_ms: now_ms(),
            finished_ms: None,
            outcome: MigrationOutcome::Running,
            phase: "preflight".into(),
            reason: None,
            summary: None,
        };
        let problems = self.preflight(&v.value, &dest);
        if !problems.is_empty() || req.dry_run {
            record.finished_ms = Some(now_ms());
            record.outcome = if problems.is_empty() {
                MigrationOutcome::Succeeded
            } else {
                MigrationOutcome::Failed
            };
            record.reason = (!problems.is_empty())
                .then(|| format!("preflight refused: {}", problems.join("; ")));
            if !problems.is_empty() {
                self.store.put_migration(&record)?;
                self.metrics.inc("ferry_migrations_refused_total");
                return Err(AgentError::Conflict(
                    record.reason.clone().unwrap_or_default(),
                ));
            }
            if req.dry_run {
                return Ok(
                    json!({ "migration": record, "dry_run": true, "agent": self.cfg.listen }),
                );
            }
        }
        // Lock the VM for this migration: no other operation or migration may start.
        self.update_vm(name, |r| {
            if r.state != VmState::Running || r.owner != self.name() {
                return Err(AgentError::Conflict(format!(
                    "VM {name} is {} on {}",
                    r.state, r.owner
                )));
            }
            r.state = VmState::Migrating;
            r.migration = Some(id.clone());
            Ok(())
        })?;
        self.store.put_migration(&record)?;
        self.metrics.inc("ferry_migrations_started_total");
        let watch = Arc::new(MigrationWatch {
            record: Mutex::new(record.clone()),
            progress: Mutex::new(Value::Null),
            done: AtomicBool::new(false),
            cancel: AtomicBool::new(false),
        });
        self.migrations.insert(watch.clone());
        let a = self.clone();
        let name = name.to_string();
        std::thread::Builder::new()
            .name(format!("migrate-{name}"))
            .spawn(move || a.run_migration(&name, req, watch, dest))
            .map_err(|e| AgentError::Internal(e.to_string()))?;
        Ok(json!({ "migration": record, "agent": self.cfg.listen }))
    }

    fn set_phase(&self, w: &MigrationWatch, phase: &str) {
        let mut r = w.record.lock().unwrap_or_else(|e| e.into_inner());
        if r.phase != phase {
            r.phase = phase.to_string();
            let _ = self.store.put_migration(&r);
        }
    }

    fn finish_migration(
        &self,
        w: &MigrationWatch,
        outcome: MigrationOutcome,
        reason: Option<String>,
        summary: Option<Value>,
    ) {
        let mut r = w.record.lock().unwrap_or_else(|e| e.into_inner());
        r.outcome = outcome;
        r.reason = reason;
        r.summary = summary;
        r.finished_ms = Some(now_ms());
        // The record must reach the store; keep trying while it is away (it is small).
        let t0 = Instant::now();
        while self.store.put_migration(&r).is_err() && t0.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(200));
        }
        drop(r);
        w.done.store(true, Ordering::SeqCst);
    }

    fn run_migration(
        self: Arc<Self>,
        name: &str,
        req: MigrateRequest,
        w: Arc<MigrationWatch>,
        dest: NodeStatus,
    ) {
        let t0 = Instant::now();
        let id = w
            .record
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .id
            .clone();
        let fail = |phase: &str, reason: String, vm_here: bool| {
            self.set_phase(&w, phase);
            if vm_here {
                // The VM never left: it runs here, as before.
                let _ = self.update_vm(name, |r| {
                    if r.migration.as_deref() == Some(&id) {
                        r.state = VmState::Running;
                        r.migration = None;
                        r.last_error = Some(format!(
                            "migration to {} failed in {phase}: {reason}",
                            dest.info.name
                        ));
                    }
                    Ok(())
                });
            }
            self.metrics.inc("ferry_migrations_failed_total");
            self.finish_migration(&w, MigrationOutcome::Failed, Some(reason), None);
        };
        // 1. The destination agent starts a worker waiting for the VM.
        self.set_phase(&w, "setup");
        let vm = match self.vm_or_404(name) {
            Ok(v) => v.value,
            Err(e) => return fail("setup", e.to_string(), true),
        };
        let rr = ReceiveRequest {
            migration: id.clone(),
            vm: vm.clone(),
            from: self.name().into(),
        };
        let addr = match client::post(
            &dest.info.address,
            "/v1/internal/receive",
            &serde_json::to_value(&rr).unwrap_or_default(),
            Some(Duration::from_secs(60)),
        ) {
            Ok(v) => v["address"].as_str().unwrap_or_default().to_string(),
            Err(e) => {
                return fail(
                    "setup",
                    format!("destination agent {}: {e}", dest.info.name),
                    true,
                )
            }
        };
        let Some(worker) = self.workers.get(name) else {
            return fail("setup", "the VM's worker is gone".into(), true);
        };
        // 2. The worker migrates; the commit is ours to decide.
        let args = MigrateArgs {
            to: addr,
            max_downtime_ms: req.max_downtime_ms,
            streams: req.streams,
            compress: req.compress.clone(),
            max_bandwidth_mibs: req.max_bandwidth_mibs,
            timeout_s: None,
            dry_run: false,
            external_commit: true,
        };
        let mut session = match MigrateSession::start(&worker.socket, args) {
            Ok(s) => s,
            Err(e) => return fail("setup", format!("cannot reach the VM's worker: {e}"), true),
        };
        let mut committed = false;
        loop {
            if w.cancel.swap(false, Ordering::SeqCst) && !committed {
                let _ = worker.call(&Request::Cancel);
            }
            let line = match session.next_line() {
                Ok(l) => l,
                Err(e) => {
                    // The worker is gone. If we committed, the destination owns the VM.
                    if committed {
                        self.metrics.inc("ferry_migrations_succeeded_total");
                        self.workers.remove(name);
                        return self.finish_migration(
                            &w,
                            MigrationOutcome::Succeeded,
                            Some(format!("source worker lost after the commit: {e}")),
                            None,
                        );
                    }
                    return fail("transfer", format!("lost the source worker: {e}"), false);
                }
            };
            match line.data.get("event").and_then(|e| e.as_str()) {
                Some("progress") => {
                    let p = line.data.get("progress").cloned().unwrap_or_default();
                    if let Some(ph) = p.get("phase").and_then(|x| x.as_str()) {
                        self.set_phase(&w, ph);
                    }
                    *w.progress.lock().unwrap_or_else(|e| e.into_inner()) = p;
                }
                Some("commit-ready") => {
                    self.set_phase(&w, "commit");
                    let decision = self.commit_cas(name, &id, &dest.info.name);
                    if std::env::var_os("FERRY_TEST_CRASH_AFTER_CAS").is_some()
                        && decision == Some(true)
                    {
                        // Fault injection for the tests: the agent dies right after the commit
                        // point, before telling anyone.
                        std::process::exit(86);
                    }
                    match decision {
                        Some(true) => {
                            committed = true;
                            let _ = session.decide(CommitDecision::Commit);
                        }
                        Some(false) => {
                            let _ = session.decide(CommitDecision::Abort);
                        }
                        None => {
                            // Unknown: leave both sides waiting; reconciliation settles it.
                            drop(session);
                            return self.finish_migration(&w, MigrationOutcome::Failed, Some("the cluster store did not answer at the commit point; the VM stays paused until its owner is settled".into()), None);
                        }
                    }
                }
                Some("done") => {
                    let summary = line.data.get("summary").cloned();
                    if let Some(s) = &summary {
                        if let Some(d) = s.get("downtime_ms").and_then(|d| d.as_f64()) {
                            self.metrics.observe_downtime(d);
                        }
                        if let Some(b) = s.get("bytes_sent").and_then(|d| d.as_u64()) {
                            self.metrics.add("ferry_migration_bytes_total", b);
                        }
                    }
                    self.metrics.inc("ferry_migrations_succeeded_total");
                    self.metrics
                        .observe("ferry_migration_seconds", t0.elapsed().as_secs_f64());
                    if let Some(wk) = self.workers.remove(name) {
                        wk.expected_exit.store(true, Ordering::SeqCst);
                    }
                    return self.finish_migration(&w, MigrationOutcome::Succeeded, None, summary);
                }
                Some("failed") | None => {
                    let reason = line
                        .data
                        .get("reason")
                        .and_then(|r| r.as_str())
                        .map(String::from)
                        .or(line.error.clone())
                        .unwrap_or_else(|| "migration failed".into());
                    let phase = line
                        .data
                        .get("phase")
                        .and_then(|p| p.as_str())
                        .unwrap_or("transfer")
                        .to_string();
                    let here = line
                        .data
                        .get("vm_on_source")
                        .and_then(|b| b.as_bool())
                        .unwrap_or(true);
                    if committed {
                        // The store says the destination owns it: the failure was after the commit.
                        self.metrics.inc("ferry_migrations_succeeded_total");
                        if let Some(wk) = self.workers.remove(name) {
                            wk.expected_exit.store(true, Ordering::SeqCst);
                            wk.stop();
                        }
                        return self.finish_migration(
                            &w,
                            MigrationOutcome::Succeeded,
                            Some(reason),
                            None,
                        );
                    }
                    return fail(&phase, reason, here);
                }
                Some(_) => {}
            }
        }
    }

    /// The commit point: compare-and-swap the VM's owner from this node to `dest`. Returns
    /// Some(true) if the destination now owns the VM, Some(false) if the swap was refused, None
    /// if the store could not say (then nobody may resume anything yet).
    fn commit_cas(&self, name: &str, id: &str, dest: &str) -> Option<bool> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let attempt = (|| -> Result<bool, cluster::StoreError> {
                let Some(cur) = self.store.vm(name)? else {
                    return Ok(false);
                };
                if cur.value.owner == dest && cur.value.migration.is_none() {
                    return Ok(true); // an earlier attempt went through
                }
                if cur.value.owner != self.name() || cur.value.migration.as_deref() != Some(id) {
                    return Ok(false);
                }
                let mut rec = cur.value.clone();
                rec.owner = dest.into();
                rec.state = VmState::Running;
                rec.migration = None;
                rec.updated_ms = now_ms();
                if self.store.update_vm(name, cur.version, &rec)? {
                    return Ok(true);
                }
                // Lost a race: read again and decide from what is there.
                let now = self.store.vm(name)?;
                Ok(now.map(|n| n.value.owner == dest).unwrap_or(false))
            })();
            match attempt {
                Ok(d) => return Some(d),
                Err(e) => {
                    tracing::warn!("commit of {name} to {dest}: store unavailable, retrying: {e}");
                    if Instant::now() > deadline {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
        }
    }

    /// Cancels a running migration (before its commit point).
    pub fn cancel_migration(&self, id: &str) -> R<Value> {
        if let Some(w) = self.migrations.get(id) {
            w.cancel.store(true, Ordering::SeqCst);
            return Ok(json!({ "cancelling": id }));
        }
        let m = self
            .store
            .migrations()?
            .into_iter()
            .find(|m| m.id == id)
            .ok_or_else(|| AgentError::NotFound(format!("unknown migration {id:?}")))?;
        if m.from != self.name() {
            let a = self.address_of(&m.from)?;
            return client::post(
                &a,
                &format!("/v1/migrations/{id}/cancel"),
                &json!({}),
                Some(Duration::from_secs(30)),
            );
        }
        Err(AgentError::Conflict(format!(
            "migration {id} is not running"
        )))
    }

    /// A migration record (live if running here).
    pub fn migration_view(&self, id: &str) -> R<Value> {
        if let Some(w) = self.migrations.get(id) {
            let r = w.record.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let p = w.progress.lock().unwrap_or_else(|e| e.into_inner()).clone();
            return Ok(
                json!({ "migration": r, "progress": p, "done": w.done.load(Ordering::SeqCst) }),
            );
        }
        let m = self
            .store
            .migrations()?
            .into_iter()
            .find(|m| m.id == id)
            .ok_or_else(|| AgentError::NotFound(format!("unknown migration {id:?}")))?;
        let done = m.outcome != MigrationOutcome::Running;
        Ok(json!({ "migration": m, "progress": Value::Null, "done": done }))
    }

    // ------------------------------------------------------------------------------------
    // Migration, destination side

    /// Starts a worker waiting for the VM and returns where the source should connect.
    pub fn receive(self: &Arc<Self>, req: ReceiveRequest) -> R<Value> {
        let name = req.vm.spec.name.clone();
        let mine = self.node_info();
        if !mine.schedulable {
            return Err(AgentError::Conflict(format!(
                "node {} is drained",
                self.name()
            )));
        }
        if self.workers.get(&name).is_some() {
            return Err(AgentError::Conflict(format!(
                "VM {name} already has a worker on {}",
                self.name()
            )));
        }
        self.drop_stale_receiver(&name, &req.migration)?;
        let host = self
            .cfg
            .listen
            .rsplit_once(':')
            .map(|(h, _)| h.to_string())
            .unwrap_or_else(|| "127.0.0.1".into());
        let mut args: Vec<String> = vec![
            "receive".into(),
            "--listen".into(),
            format!("{host}:0"),
            "--external-commit".into(),
        ];
        if let Some(p) = &self.cfg.cpu_limit {
            args.extend(["--host-profile".into(), p.clone()]);
        }
        args.extend(
            self.cfg
                .net_backend_args(&req.vm.spec)
                .map_err(AgentError::Conflict)?,
        );
        let (w, first) = self
            .workers
            .spawn(&self.cfg.worker_bin, &self.cfg.data_dir, &name, &args)
            .map_err(|e| AgentError::Internal(format!("{e:#}")))?;
        let address = first
            .strip_prefix("receiving on ")
            .unwrap_or_default()
            .to_string();
        if address.is_empty() {
            w.stop();
            return Err(AgentError::Internal(
                "the receiving worker did not say where it listens".into(),
            ));
        }
        self.incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.clone(), (req.migration.clone(), w.clone()));
        let a = self.clone();
        std::thread::Builder::new()
            .name(format!("incoming-{name}"))
            .spawn(move || a.watch_incoming(&name, &req.migration, w))
            .map_err(|e| AgentError::Internal(e.to_string()))?;
        Ok(json!({ "address": address }))
    }

    /// Follows an incoming VM until it runs here or is gone; settles a destination left waiting
    /// for the commit decision from the store's word on the owner.
    /// A receiver left idle by an earlier attempt for this VM (refused in preflight, its source
    /// gone before sending anything) still holds the VM's socket: when the store shows that a
    /// new migration `id` replaced it, that attempt is over, so stop the old receiver now.
    fn drop_stale_receiver(&self, name: &str, id: &str) -> R<()> {
        let old = self
            .incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned();
        let Some((old_id, w)) = old else {
            return Ok(());
        };
        if old_id == id || !w.alive() {
            return Ok(());
        }
        let current = self.store.vm(name)?.and_then(|v| v.value.migration);
        if current.as_deref() != Some(id) {
            return Err(AgentError::Conflict(format!(
                "VM {name} is not migrating as {id} in the store"
            )));
        }
        tracing::info!(
            vm = name,
            old = old_id,
            new = id,
            "stopping the receiver of an earlier attempt"
        );
        w.stop();
        Ok(())
    }

    fn watch_incoming(&self, name: &str, id: &str, w: Arc<Worker>) {
        self.watch_incoming_inner(name, id, &w);
        let mut inc = self.incoming.lock().unwrap_or_else(|e| e.into_inner());
        if inc.get(name).is_some_and(|(i, _)| i == id) {
            inc.remove(name);
        }
    }

    fn watch_incoming_inner(&self, name: &str, id: &str, w: &Arc<Worker>) {
        let mut last_check = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(50));
            if !w.alive() {
                return; // the migration failed and the worker discarded the VM
            }
            let Some(st) = w.state() else { continue };
            if st.get("state").and_then(|s| s.as_str()) == Some("running") {
                // The VM runs here now: supervise it.
                self.workers.insert(w.clone());
                return;
            }
            let phase = st["migration"]["progress"]["phase"].as_str().unwrap_or("");
            if phase != "awaiting commit decision" {
                // A receiver refused in preflight (or whose source vanished before sending
                // anything) keeps listening; once the store says this migration is over and
                // the VM is not ours, nothing will come: stop it so the node is free for the
                // next attempt. Until the commit decision the worker holds no running VM.
                if last_check.elapsed() >= Duration::from_millis(500) {
                    last_check = Instant::now();
                    let over = match self.store.vm(name) {
                        Ok(Some(v)) => {
                            v.value.migration.as_deref() != Some(id) && v.value.owner != self.name()
                        }
                        Ok(None) => true,
                        Err(_) => false,
                    };
                    // Nor can it start running now: only a commit does that, and the store
                    // says the VM did not become ours.
                    if over {
                        tracing::info!(
                            vm = name,
                            migration = id,
                            "migration over: stopping the idle receiver"
                        );
                        w.stop();
                        return;
                    }
                }
                continue;
            }
            match self.store.vm(name) {
                Ok(Some(v)) if v.value.owner == self.name() => {
                    let _ = w.call(&Request::Commit);
                }
                Ok(Some(v)) if v.value.migration.as_deref() != Some(id) => {
                    // The migration is over and the VM did not become ours.
                    let _ = w.call(&Request::Abort);
                }
                Ok(None) => {
                    let _ = w.call(&Request::Abort);
                }
                _ => {} // still undecided, or the store is away: wait
            }
        }
    }

    // ------------------------------------------------------------------------------------
    // Drain

    /// Moves every VM off `node` (at most `concurrency` at once) to the nodes with the most free
    /// resources that pass preflight; marks the node unschedulable first.
    pub fn drain(self: &Arc<Self>, node: &str, concurrency: usize) -> R<Value> {
        self.node_or_404(node)?;
        self.store.set_schedulable(node, false)?;
        let vms: Vec<VmRecord> = self
            .store
            .vms()?
            .into_iter()
            .map(|v| v.value)
            .filter(|v| v.owner == node)
            .collect();
        let concurrency = concurrency.max(1);
        let results: Mutex<Vec<Value>> = Mutex::new(Vec::new());
        let queue: Mutex<Vec<VmRecord>> = Mutex::new(vms);
        let peak = std::sync::atomic::AtomicUsize::new(0);
        let active = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..concurrency {
                s.spawn(|| loop {
                    let Some(vm) = queue.lock().unwrap_or_else(|e| e.into_inner()).pop() else {
                        return;
                    };
                    let n = active.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(n, Ordering::SeqCst);
                    let r = self.drain_one(&vm);
                    active.fetch_sub(1, Ordering::SeqCst);
                    results.lock().unwrap_or_else(|e| e.into_inner()).push(r);
                });
            }
        });
        let results = results.into_inner().unwrap_or_default();
        let failed = results.iter().filter(|r| r["ok"] != true).count();
        Ok(json!({
            "node": node,
            "moved": results.len() - failed,
            "failed": failed,
            "max_concurrent": peak.load(Ordering::SeqCst),
            "concurrency_limit": concurrency,
            "vms": results,
        }))
    }

    fn drain_one(self: &Arc<Self>, vm: &VmRecord) -> Value {
        let name = vm.spec.name.clone();
        if vm.state != VmState::Running {
            return json!({ "vm": name, "ok": vm.state == VmState::Stopped, "note": format!("{} (not moved)", vm.state) });
        }
        let nodes = match self.store.nodes() {
            Ok(n) => n,
            Err(e) => return json!({ "vm": name, "ok": false, "error": e.to_string() }),
        };
        // Candidates: most free memory first, then most free cores.
        let (vms, migs) = (
            self.store.vms().unwrap_or_default(),
            self.store.migrations().unwrap_or_default(),
        );
        let mut cands: Vec<(NodeStatus, i64, i64)> = nodes
            .into_iter()
            .filter(|n| n.info.name != vm.owner && n.alive && n.info.schedulable)
            .map(|n| {
                let (c, m, _) = usage(&n.info.name, &vms, &migs);
                let (fm, fc) = (
                    n.info.memory_mib as i64 - m as i64,
                    n.info.cores as i64 - c as i64,
                );
                (n, fm, fc)
            })
            .collect();
        cands.sort_by_key(|c| std::cmp::Reverse((c.1, c.2)));
        let owner = match self.address_of(&vm.owner) {
            Ok(a) => a,
            Err(e) => return json!({ "vm": name, "ok": false, "error": e.to_string() }),
        };
        let mut refusals = Vec::new();
        for (n, _, _) in cands {
            let problems = self.preflight(vm, &n);
            if !problems.is_empty() {
                refusals.push(format!("{}: {}", n.info.name, problems.join("; ")));
                continue;
            }
            let req = MigrateRequest {
                to: n.info.name.clone(),
                max_downtime_ms: 50,
                streams: 1,
                compress: "none".into(),
                dry_run: false,
                max_bandwidth_mibs: None,
            };
            let started = client::post(
                &owner,
                &format!("/v1/vms/{name}/migrate"),
                &serde_json::to_value(&req).unwrap_or_default(),
                Some(Duration::from_secs(60)),
            );
            let id = match started {
                Ok(v) => v["migration"]["id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                Err(e) => {
                    refusals.push(format!("{}: {e}", n.info.name));
                    continue;
                }
            };
            let outcome = wait_migration(&owner, &id);
            return match outcome {
                Ok(m) if m["outcome"] == "succeeded" => {
                    json!({ "vm": name, "ok": true, "to": n.info.name, "migration": id, "summary": m["summary"] })
                }
                Ok(m) => {
                    json!({ "vm": name, "ok": false, "to": n.info.name, "migration": id, "error": m["reason"] })
                }
                Err(e) => {
                    json!({ "vm": name, "ok": false, "to": n.info.name, "migration": id, "error": e.to_string() })
                }
            };
        }
        json!({ "vm": name, "ok": false, "error": format!("no node can take it: {}", if refusals.is_empty() { "no other schedulable node is alive".to_string() } else { refusals.join(" | ") }) })
    }

    // ------------------------------------------------------------------------------------
    // Reconciliation

    /// Brings local workers and the store into agreement (runs every 200 ms).
    pub fn reconcile_once(&self) {
        let Ok(vms) = self.store.vms() else { return };
        let mine: HashMap<String, VmRecord> = vms
            .into_iter()
            .map(|v| v.value)
            .filter(|v| v.owner == self.name())
            .map(|v| (v.spec.name.clone(), v))
            .collect();
        // Workers whose process ended.
        for w in self.workers.all() {
            if w.alive() {
                continue;
            }
            self.workers.remove(&w.vm);
            if w.expected_exit.load(Ordering::SeqCst) {
                continue;
            }
            if let Some(rec) = mine.get(&w.vm) {
                if rec.state == VmState::Running {
                    let reason = w
                        .exit_reason
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone()
                        .unwrap_or_else(|| "worker exited".into());
                    tracing::warn!("VM {} crashed: {reason}", w.vm);
                    self.metrics.inc("ferry_vm_crashes_total");
                    let _ = self.update_vm(&w.vm, |r| {
                        if r.owner == self.name() && r.state == VmState::Running {
                            r.state = VmState::Crashed;
                            r.last_error = Some(reason.clone());
                        }
                        Ok(())
                    });
                }
            }
        }
        // Running VMs of this node without a known worker: adopt one left from before a
        // restart, or report the VM crashed.
        for (name, rec) in &mine {
            if rec.state == VmState::Running
                && self.workers.get(name).is_none()
                && self.workers.adopt(&self.cfg.data_dir, name).is_none()
            {
                {
                    let _ = self.update_vm(name, |r| {
                        if r.owner == self.name() && r.state == VmState::Running {
                            r.state = VmState::Crashed;
                            r.last_error = Some("no worker found on the owner node".into());
                        }
                        Ok(())
                    });
                }
            }
        }
        // Workers of VMs this node no longer owns (moved away while we were not looking, or a
        // source left paused by an unsettled commit): the store is the truth.
        if let Ok(dir) = std::fs::read_dir(self.cfg.data_dir.join("vms")) {
            for e in dir.flatten() {
                let vm = e.file_name().to_string_lossy().to_string();
                if mine.contains_key(&vm) {
                    continue;
                }
                let sock = e.path().join("api.sock");
                if !sock.exists()
                    || self.workers.get(&vm).is_some_and(|w| {
                        w.state()
                            .map(|s| s["state"] == "receiving")
                            .unwrap_or(false)
                    })
                {
                    continue;
                }
                if let Ok(st) =
                    worker::api::call(&sock, &Request::Status, Some(Duration::from_secs(2)))
                {
                    if st.data.get("state").and_then(|s| s.as_str()) == Some("receiving") {
                        continue; // an incoming migration
                    }
                    if let Ok(Some(v)) = self.store.vm(&vm) {
                        if v.value.migration.is_some() && v.value.owner != self.name() {
                            continue; // a migration towards us is in flight
                        }
                    }
                    tracing::warn!("stopping a worker for VM {vm}, which this node does not own");
                    let _ =
                        worker::api::call(&sock, &Request::Shutdown, Some(Duration::from_secs(5)));
                    self.workers.remove(&vm);
                }
            }
        }
    }
}

/// Polls a migration on `agent` until it ends.
pub fn wait_migration(agent: &str, id: &str) -> R<Value> {
    loop {
        let v = client::get(agent, &format!("/v1/migrations/{id}"))?;
        if v["done"] == true {
            return Ok(v["migration"].clone());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Cores, MiB and VM count `node` has committed: VMs it owns that run or migrate, plus VMs
/// migrating towards it.
pub fn usage(
    node: &str,
    vms: &[Versioned<VmRecord>],
    migs: &[MigrationRecord],
) -> (u32, u64, usize) {
    let incoming: BTreeSet<&str> = migs
        .iter()
        .filter(|m| m.to == node && m.outcome == MigrationOutcome::Running)
        .map(|m| m.vm.as_str())
        .collect();
    let mut cores = 0u32;
    let mut mem = 0u64;
    let mut count = 0usize;
    for v in vms {
        let r = &v.value;
        let active = matches!(r.state, VmState::Running | VmState::Migrating);
        if (r.owner == node && active)
            || (incoming.contains(r.spec.name.as_str()) && r.state == VmState::Migrating)
        {
            cores += r.spec.vcpus as u32;
            mem += r.spec.memory_mib;
        }
        if r.owner == node {
            count += 1;
        }
    }
    (cores, mem, count)
}
