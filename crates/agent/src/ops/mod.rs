//! What an agent does, by concern. All blocking; the HTTP layer runs these on blocking
//! threads. A request for a VM owned by another node is forwarded to that node's agent: only
//! the owner runs, stops or migrates its VMs.
//!
//! * [`lifecycle`] — nodes view, create / start / stop / delete, the cluster CPU profile.
//! * [`source`] — a migration from this node: agent preflight, the lock in the store, the
//!   destination's receiver, the worker's migration, the commit point (the store's
//!   compare-and-swap of the owner), cancel.
//! * [`destination`] — a migration to this node: the receiver and its commit decision, taken
//!   from the store.
//! * [`drain`] — moving every VM off a node.
//! * [`reconcile`] — every 200 ms, workers and the store brought into agreement; a migration
//!   whose agent or worker died is driven to a decision from the store.

pub mod destination;
pub mod drain;
pub mod lifecycle;
pub mod reconcile;
pub mod source;

use crate::workers::Worker;
use crate::{Agent, AgentError};
use cluster::{now_ms, MigrationRecord, NodeStatus, Versioned, VmRecord, VmState};
use contract::Progress;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub(crate) type R<T> = Result<T, AgentError>;

/// A finished migration stays in the in-memory table this long (for `GET` and SSE clients that
/// come late); the store keeps the record.
const KEEP_FINISHED: Duration = Duration::from_secs(600);
/// How long an operation waits for a VM that just arrived to be handed over by its receiver.
const HANDOVER_WAIT: Duration = Duration::from_secs(10);

/// A live migration this agent runs or ran (as the source).
pub struct MigrationWatch {
    pub record: Mutex<MigrationRecord>,
    pub progress: Mutex<Option<Progress>>,
    pub done: AtomicBool,
    pub cancel: AtomicBool,
    finished_at: Mutex<Option<Instant>>,
}

impl MigrationWatch {
    pub(crate) fn new(record: MigrationRecord) -> MigrationWatch {
        MigrationWatch {
            record: Mutex::new(record),
            progress: Mutex::new(None),
            done: AtomicBool::new(false),
            cancel: AtomicBool::new(false),
            finished_at: Mutex::new(None),
        }
    }

    pub fn record(&self) -> MigrationRecord {
        self.record
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn progress(&self) -> Option<Progress> {
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn mark_done(&self) {
        *self.finished_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        self.done.store(true, Ordering::SeqCst);
    }
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

    /// Whether this agent's thread for migration `id` is still running.
    pub fn active(&self, id: &str) -> bool {
        self.get(id).is_some_and(|w| !w.done.load(Ordering::SeqCst))
    }

    fn insert(&self, w: Arc<MigrationWatch>) {
        let id = w.record().id;
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, w);
    }

    /// Forgets migrations that ended long ago.
    fn evict(&self) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, w| {
                w.finished_at
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_none_or(|t| t.elapsed() < KEEP_FINISHED)
            });
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// VMs with a life-cycle operation in progress on this agent.
#[derive(Default)]
pub struct Busy(Mutex<HashSet<String>>);

/// Holds a VM busy until dropped.
pub struct BusyGuard<'a> {
    busy: &'a Busy,
    vm: String,
}

impl Busy {
    /// Marks `vm` busy; `None` if another operation holds it.
    pub fn hold(&self, vm: &str) -> Option<BusyGuard<'_>> {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        s.insert(vm.to_string()).then(|| BusyGuard {
            busy: self,
            vm: vm.to_string(),
        })
    }

    pub fn contains(&self, vm: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(vm)
    }
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.busy
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.vm);
    }
}

/// A bounded number of slots (concurrent receivers, concurrent outgoing migrations): taken
/// before anything starts, held by the thread that follows the operation, given back when
/// that thread ends.
#[derive(Default)]
pub struct Slots(Arc<Mutex<usize>>);

/// One taken slot; dropping it gives it back.
pub struct Slot(Arc<Mutex<usize>>);

impl Slots {
    /// A slot if fewer than `max` are taken.
    pub fn take(&self, max: usize) -> Option<Slot> {
        let mut n = self.0.lock().unwrap_or_else(|e| e.into_inner());
        (*n < max).then(|| {
            *n += 1;
            Slot(self.0.clone())
        })
    }

    /// A slot, or 503 saying that `node` already `does` (`receives`, `sends`) as many
    /// migrations as its `flag` allows.
    pub fn take_or_busy(
        &self,
        max: usize,
        node: &str,
        does: &str,
        flag: &str,
    ) -> Result<Slot, AgentError> {
        self.take(max).ok_or_else(|| {
            AgentError::Unavailable(format!(
                "node {node} already {does} {} migrations ({flag} {max}): try again when one ends",
                self.used()
            ))
        })
    }

    /// Slots taken now.
    pub fn used(&self) -> usize {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut n = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_sub(1);
    }
}

pub(crate) fn new_id(vm: &str) -> String {
    let mut b = [0u8; 4];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    format!("{vm}-{}-{:08x}", now_ms(), u32::from_le_bytes(b))
}

/// Whether `path` lies under one of `roots`.
/// Whether every host file `spec` names (disk images, kernel, initrd) lies beneath the roots
/// node `node` was given (`storage` for disks, `boot` for kernels and initrds): checked as
/// written, where the VM is defined, started and received; the worker then opens each one
/// beneath its root ([`vmm::confine`]).
pub(crate) fn spec_paths_allowed(
    spec: &cluster::VmSpec,
    node: &str,
    storage: &[String],
    boot: &[String],
) -> Result<(), String> {
    use std::path::{Path, PathBuf};
    use vmm::confine::{check_lexical, Use};
    let storage: Vec<PathBuf> = storage.iter().map(PathBuf::from).collect();
    let boot: Vec<PathBuf> = boot.iter().map(PathBuf::from).collect();
    let on = |e: vmm::confine::ConfineError| format!("node {node}: {e}");
    for d in &spec.disks {
        check_lexical(&storage, Path::new(&d.path), Use::Disk).map_err(on)?;
    }
    if let vmm::KernelSource::Path(k) = vmm::KernelSource::parse(&spec.kernel) {
        check_lexical(&boot, &k, Use::Kernel).map_err(on)?;
    }
    if let Some(i) = &spec.initrd {
        check_lexical(&boot, Path::new(i), Use::Initrd).map_err(on)?;
    }
    Ok(())
}

pub(crate) fn reaches(roots: &[String], path: &str) -> bool {
    roots.iter().any(|r| {
        let r = r.trim_end_matches('/');
        path == r || path.starts_with(&format!("{r}/")) || r.is_empty()
    })
}

impl Agent {
    pub(crate) fn node_info(&self) -> cluster::NodeInfo {
        self.node.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn vm_or_404(&self, name: &str) -> R<Versioned<VmRecord>> {
        self.store
            .vm(name)?
            .ok_or_else(|| AgentError::NotFound(format!("unknown VM {name:?}")))
    }

    pub(crate) fn node_or_404(&self, name: &str) -> R<NodeStatus> {
        self.store
            .node(name)?
            .ok_or_else(|| AgentError::NotFound(format!("unknown node {name:?}")))
    }

    /// The agent address of `node`.
    pub(crate) fn address_of(&self, node: &str) -> R<String> {
        let n = self.node_or_404(node)?;
        if !n.alive {
            return Err(AgentError::Unavailable(format!(
                "node {node} is down (its lease expired)"
            )));
        }
        Ok(n.info.address)
    }

    /// CAS loop: applies `f` to the current record until the swap wins (or `f` refuses).
    /// One compare-and-swap decision on `name`'s record: `f` returns the record to write, or
    /// `None` to leave it as it is; a lost race reads again and asks `f` again. `Ok(true)`:
    /// written; `Ok(false)`: `f` declined (or the VM is gone).
    pub(crate) fn swap_vm(
        &self,
        name: &str,
        mut f: impl FnMut(&VmRecord) -> Option<VmRecord>,
    ) -> Result<bool, cluster::StoreError> {
        for _ in 0..100 {
            let Some(cur) = self.store.vm(name)? else {
                return Ok(false);
            };
            let Some(mut rec) = f(&cur.value) else {
                return Ok(false);
            };
            rec.updated_ms = now_ms();
            if self.store.update_vm(name, cur.version, &rec)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The new owner in the store: migration `id` of `name` moved the VM to `node` (a CAS
    /// from `migrating(id)`; with `handed_over`, only while the store names the handover to
    /// `node`). `Ok(true)` also when an earlier attempt already did it.
    pub(crate) fn commit_to(
        &self,
        name: &str,
        id: &str,
        node: &str,
        handed_over: bool,
    ) -> Result<bool, cluster::StoreError> {
        let mut done = false;
        let wrote = self.swap_vm(name, |r| {
            if r.owner == node && r.migration.is_none() {
                done = true; // an earlier attempt went through
                return None;
            }
            if r.migration.as_deref() != Some(id)
                || (handed_over && r.handover_to.as_deref() != Some(node))
            {
                return None;
            }
            let mut rec = r.clone();
            rec.owner = node.into();
            rec.state = VmState::Running;
            rec.migration = None;
            rec.handover_to = None;
            rec.last_error = None;
            Some(rec)
        })?;
        Ok(wrote || done)
    }

    pub(crate) fn update_vm(
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

    /// The worker running `name` here: a known one, or a received VM that runs now but whose
    /// receiver has not been handed to supervision yet.
    pub(crate) fn worker_of(&self, name: &str) -> Option<Arc<Worker>> {
        if let Some(w) = self.workers.get(name) {
            return Some(w);
        }
        let inc = self
            .incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .map(|(_, w)| w.clone())?;
        let st = inc.state()?;
        if st.state != contract::worker::WorkerState::Receiving {
            self.workers.insert(inc.clone());
            return Some(inc);
        }
        None
    }

    /// [`Agent::worker_of`] for an operation on a VM the store says runs here: a VM that has
    /// just arrived is committed in the store (and its source reports the migration done)
    /// a moment before its receiver says it runs, so a receiver of this VM that is still
    /// alive is waited for (up to [`HANDOVER_WAIT`]) rather than taken for "no worker".
    pub(crate) fn worker_for_op(&self, name: &str) -> Option<Arc<Worker>> {
        let t0 = Instant::now();
        loop {
            if let Some(w) = self.worker_of(name) {
                return Some(w);
            }
            let receiving = self
                .incoming
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(name)
                .is_some_and(|(_, w)| w.alive());
            if !receiving || t0.elapsed() >= HANDOVER_WAIT {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Cores, MiB and VM count `node` has committed: VMs it owns that run or migrate, plus VMs
/// migrating towards it.
pub fn usage(
    node: &str,
    vms: &[Versioned<VmRecord>],
    running: &[MigrationRecord],
) -> (u32, u64, usize) {
    let incoming: BTreeSet<&str> = running
        .iter()
        .filter(|m| m.to == node && !m.finished())
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
