//! Reconciliation: every 200 ms this node's workers and the store are brought into agreement.
//! The store is the truth about who owns a VM; a worker's own status is the truth about what
//! it holds. Every rule is safe to run at any moment and any number of times.
//!
//! 1. Receivers found on disk that no thread follows (this agent restarted) are followed again:
//!    their commit decision comes from the store. A VM handed over to this node whose worker
//!    runs it here already is recorded as this node's (its source sent Commit); one whose
//!    receiver is gone is handed back.
//! 2. Workers whose process ended: their running VM is marked crashed, with the reason.
//! 3. Migrations of VMs this node owns that no thread of this agent runs (the agent restarted,
//!    or its thread gave up on a store that did not answer at the commit point) are settled:
//!    a worker still migrating is cancelled first (handed over, it is left to finish: it
//!    needs no agent any more); then the store CAS `migrating(id) →
//!    running` (or `crashed` if the worker is gone) decides "not moved" — a CAS from
//!    `migrating(id)`, so it can never undo a commit that happened. Handed over, only a
//!    worker that never sent Commit is rolled back; one that did moved the VM (the owner is
//!    recorded); without either the destination settles it first.
//! 4. Running VMs of this node without a known worker: a worker left from before a restart is
//!    adopted, otherwise the VM is marked crashed.
//! 5. A VM of this node, running in the store, whose worker holds it paused after a failed
//!    migration (its disks were still held by the destination) is resumed.
//! 6. Workers of VMs this node does not own (a source left paused by a migration that
//!    committed, a copy that must not run) are stopped — after re-reading the store.
//! 7. Migration records of this node left `running` by an agent that stopped after the VM's
//!    record was decided (the commit point passed, or reconciliation already rolled the VM
//!    back) are finished with the outcome the store shows.
//! 8. Housekeeping: old migrations leave the in-memory table; old records leave the store.

use crate::workers::{vm_dir, Worker};
use crate::Agent;
use cluster::{now_ms, MigrationOutcome, Phase, VmRecord, VmState};
use contract::worker::{self as wapi, Direction, Request, WorkerState, WorkerStatus};
use contract::CommitPoint;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Finished migration records older than this are pruned (the newest of each VM stay).
const RECORD_RETENTION_MS: u64 = 7 * 24 * 3600 * 1000;
/// Records kept per VM whatever their age.
const RECORDS_PER_VM: usize = 20;
/// How often housekeeping runs, in reconciliation rounds (200 ms each): every 5 minutes.
const HOUSEKEEPING_EVERY: u64 = 1500;
/// How often migration records left `running` are looked for, in rounds: every 2 s.
const RECORDS_EVERY: u64 = 10;

impl Agent {
    /// One reconciliation round.
    pub fn reconcile_once(self: &Arc<Self>) {
        static ROUND: AtomicU64 = AtomicU64::new(0);
        let round = ROUND.fetch_add(1, Ordering::Relaxed);
        self.follow_receivers();
        let Ok(vms) = self.store.vms() else { return };
        self.settle_handovers_here(&vms);
        let mine: HashMap<String, VmRecord> = vms
            .into_iter()
            .map(|v| v.value)
            .filter(|v| v.owner == self.name())
            .map(|v| (v.spec.name.clone(), v))
            .collect();
        self.reap_workers(&mine);
        for rec in mine.values() {
            if self.busy.contains(&rec.spec.name) {
                continue;
            }
            match rec.state {
                VmState::Migrating => self.settle_migration(rec),
                VmState::Running => self.check_running(rec),
                VmState::Stopped | VmState::Crashed => {}
            }
        }
        self.stop_foreign_workers(&mine);
        if round.is_multiple_of(RECORDS_EVERY) {
            self.finish_decided_records();
        }
        if round.is_multiple_of(HOUSEKEEPING_EVERY) {
            self.migrations.evict();
            match cluster::prune_migrations(
                self.store.as_ref(),
                now_ms(),
                RECORD_RETENTION_MS,
                RECORDS_PER_VM,
            ) {
                Ok(0) => {}
                Ok(n) => tracing::info!("pruned {n} old migration records"),
                Err(e) => tracing::warn!("cannot prune migration records: {e}"),
            }
        }
    }

    /// VM directories with a live worker socket: (VM name, status).
    fn local_workers(&self) -> Vec<(String, std::path::PathBuf, WorkerStatus)> {
        let Ok(dir) = std::fs::read_dir(self.cfg.data_dir.join("vms")) else {
            return vec![];
        };
        dir.flatten()
            .filter_map(|e| {
                let vm = e.file_name().to_string_lossy().to_string();
                let sock = e.path().join("api.sock");
                if !cluster::valid_name(&vm) || !sock.exists() {
                    return None;
                }
                let st = wapi::status(&sock, Some(Duration::from_secs(2))).ok()?;
                Some((vm, sock, st))
            })
            .collect()
    }

    /// Rule 1.
    fn follow_receivers(self: &Arc<Self>) {
        for (vm, _sock, st) in self.local_workers() {
            if st.state != WorkerState::Receiving {
                continue;
            }
            let followed = self
                .incoming
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&vm);
            if followed {
                continue;
            }
            let Some(id) = st.migration_id.clone() else {
                continue; // not started by an agent
            };
            if let Some(w) = self.workers.adopt(&self.cfg.data_dir, &vm) {
                // adopt() registers it as a VM worker: it is not one yet.
                self.workers.remove(&vm);
                tracing::info!(
                    vm,
                    migration = id,
                    "following a receiver left by an earlier agent"
                );
                self.watch_receiver(&vm, &id, w, self.receiving.take(usize::MAX));
            }
        }
    }

    /// Rule 1b: handovers to this node that no thread follows (this agent restarted). A
    /// worker running the VM here resumed on the source's Commit: record this node as the
    /// owner and supervise it. No worker left at all (nothing listens on its socket; a
    /// stopped process still would): hand the VM back to its source.
    fn settle_handovers_here(&self, vms: &[cluster::Versioned<VmRecord>]) {
        for v in vms {
            let rec = &v.value;
            let (Some(id), Some(to)) = (&rec.migration, &rec.handover_to) else {
                continue;
            };
            let name = &rec.spec.name;
            if to != self.name() {
                continue;
            }
            let followed = self
                .incoming
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(name);
            if followed {
                continue;
            }
            let sock = vm_dir(&self.cfg.data_dir, name).join("api.sock");
            if std::os::unix::net::UnixStream::connect(&sock).is_err() {
                self.hand_back(name, id, "no receiver found after an agent restart");
                continue;
            }
            let Ok(st) = wapi::status(&sock, Some(Duration::from_secs(2))) else {
                continue; // alive but not answering: wait
            };
            if st.state != WorkerState::Receiving && st.migration_id.as_deref() == Some(id) {
                if self.workers.get(name).is_none() {
                    self.workers.adopt(&self.cfg.data_dir, name);
                }
                match self.commit_to(name, id, self.name(), true) {
                    Ok(true) => tracing::warn!(
                        vm = name.as_str(),
                        migration = id.as_str(),
                        "recorded the arrival of a VM that resumed here while no agent ran"
                    ),
                    Ok(false) => {}
                    Err(e) => tracing::warn!("recording the arrival of {name}: {e}"),
                }
            }
        }
    }

    /// Rule 2.
    fn reap_workers(&self, mine: &HashMap<String, VmRecord>) {
        for w in self.workers.all() {
            if w.alive() {
                continue;
            }
            self.workers.remove(&w.vm);
            if w.expected_exit.load(Ordering::SeqCst) {
                continue;
            }
            let Some(rec) = mine.get(&w.vm) else { continue };
            if rec.state != VmState::Running {
                continue; // a migrating VM's worker: its migration is settled by rule 3
            }
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

    /// The worker of one of our VMs: known, or left from before a restart.
    fn find_worker(&self, name: &str) -> Option<Arc<Worker>> {
        self.worker_of(name).or_else(|| {
            let sock = vm_dir(&self.cfg.data_dir, name).join("api.sock");
            let st = wapi::status(&sock, Some(Duration::from_secs(2))).ok()?;
            if st.state == WorkerState::Receiving {
                return None;
            }
            self.workers.adopt(&self.cfg.data_dir, name)
        })
    }

    /// Rule 3: a migration of ours that no thread runs.
    fn settle_migration(&self, rec: &VmRecord) {
        let name = &rec.spec.name;
        let Some(id) = rec.migration.clone() else {
            return;
        };
        if self.migrations.active(&id) {
            return; // its thread decides
        }
        let worker = self.find_worker(name).filter(|w| w.alive());
        let status = worker.as_ref().and_then(|w| w.state());
        let outgoing = status.as_ref().and_then(|st| {
            st.migration
                .as_ref()
                .filter(|m| m.direction == Direction::Outgoing)
        });
        if let (Some(w), Some(m)) = (&worker, outgoing) {
            if m.active {
                if rec.handover_to.is_some() {
                    // Handed over, the worker needs no agent to finish: it commits (the
                    // destination records the new owner) or fails (settled below, later).
                    return;
                }
                // Still copying (or waiting for a decision nobody will give): stop it first.
                let _ = w.call(&Request::Cancel);
                return;
            }
        }
        if let Some(to) = &rec.handover_to {
            // Handed over: the destination may commit on its own, so only a worker that
            // never sent Commit may have the VM back (then the rollback below, and rule 5
            // resumes it); one that sent it moved the VM; otherwise the destination settles
            // it (it commits, or hands the VM back once its receiver is gone).
            let running_here = status
                .as_ref()
                .is_some_and(|st| st.state == WorkerState::Running);
            match outgoing.and_then(|m| m.failure.as_ref()).map(|f| f.commit) {
                Some(CommitPoint::After) => {
                    if let Err(e) = self.commit_to(name, &id, to, false) {
                        tracing::warn!("recording {to} as the owner of {name}: {e}");
                    }
                    return;
                }
                Some(CommitPoint::Before) => {}
                _ if running_here => {}
                _ => return,
            }
        }
        let record = self.store.migration(&id).ok().flatten();
        let phase = record.as_ref().map(|m| m.phase).unwrap_or(Phase::Setup);
        let why = if record.as_ref().is_some_and(|m| m.finished()) {
            "its agent gave up deciding it (the store did not answer at the commit point)"
        } else {
            "the agent that ran it stopped before deciding it"
        };
        // A worker that exists but does not answer (stopped, busy) still holds the VM: the
        // rollback says "runs here", and rule 5 resumes it once it answers.
        let alive = worker.is_some();
        if !self.roll_back(name, &id, phase, &format!("{why}; rolled back"), alive) {
            return;
        }
        tracing::warn!(
            vm = name.as_str(),
            migration = id,
            "settled: not moved ({why})"
        );
        if let Some(mut m) = record {
            if !m.finished() || m.settled_by.is_none() {
                m.outcome = MigrationOutcome::Failed;
                m.finished_ms = Some(now_ms());
                m.settled_by = Some(format!("reconciliation on {}", self.name()));
                m.reason = Some(match m.reason.take() {
                    Some(r) => format!("{r}; settled: not moved ({why})"),
                    None => format!("settled: not moved ({why})"),
                });
                let _ = self.store.put_migration(&m);
            }
        }
    }

    /// Rules 4 and 5: a running VM of ours.
    fn check_running(&self, rec: &VmRecord) {
        let name = &rec.spec.name;
        let receiving = self
            .incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(name);
        if receiving && self.workers.get(name).is_none() {
            return; // the receiver's watcher hands it over
        }
        let Some(w) = self.find_worker(name) else {
            let _ = self.update_vm(name, |r| {
                if r.owner == self.name() && r.state == VmState::Running {
                    r.state = VmState::Crashed;
                    r.last_error = Some("no worker found on the owner node".into());
                }
                Ok(())
            });
            return;
        };
        let Some(st) = w.state() else { return };
        let failed_here = st.migration.as_ref().is_some_and(|m| {
            m.direction == Direction::Outgoing
                && !m.active
                && m.failure
                    .as_ref()
                    .is_some_and(|f| f.commit != CommitPoint::After)
        });
        if st.state == WorkerState::Paused && failed_here {
            match w.call(&Request::Resume) {
                Ok(_) => tracing::info!(vm = name.as_str(), "resumed after a failed migration"),
                Err(e) => {
                    tracing::debug!(vm = name.as_str(), "resume after a failed migration: {e}")
                }
            }
        }
    }

    /// Rule 7: a migration record of ours that says `running` while no thread of this agent
    /// runs it and the VM's record no longer names it: its outcome is decided; write it.
    fn finish_decided_records(&self) {
        let Ok(running) = self.store.running_migrations() else {
            return;
        };
        for mut m in running {
            if m.from != self.name() || self.migrations.active(&m.id) {
                continue;
            }
            let vm = match self.store.vm(&m.vm) {
                Ok(v) => v.map(|v| v.value),
                Err(_) => continue,
            };
            if vm
                .as_ref()
                .is_some_and(|v| v.migration.as_deref() == Some(m.id.as_str()))
            {
                continue; // still undecided: rule 3 settles it on the owner
            }
            // Moved if the destination owns the VM, or if a later migration left from there.
            let later_from_dest = || {
                self.store.migrations_of(&m.vm, 50).is_ok_and(|ms| {
                    ms.iter()
                        .any(|o| o.started_ms > m.started_ms && o.from == m.to && o.id != m.id)
                })
            };
            let moved = vm.as_ref().is_some_and(|v| v.owner == m.to) || later_from_dest();
            let where_ = match &vm {
                Some(v) => format!("the store shows it {} on {}", v.state, v.owner),
                None => "the VM was deleted since".to_string(),
            };
            let why = format!("its agent stopped before recording the outcome; {where_}");
            m.outcome = if moved {
                MigrationOutcome::Succeeded
            } else {
                MigrationOutcome::Failed
            };
            m.finished_ms = Some(now_ms());
            m.settled_by = Some(format!("reconciliation on {}", self.name()));
            m.reason = Some(match m.reason.take() {
                Some(r) => format!("{r}; {why}"),
                None => why,
            });
            tracing::warn!(
                vm = m.vm.as_str(),
                migration = m.id.as_str(),
                moved,
                "finished a migration record left running"
            );
            let _ = self.store.put_migration(&m);
        }
    }

    /// Rule 6.
    fn stop_foreign_workers(&self, mine: &HashMap<String, VmRecord>) {
        for (vm, sock, st) in self.local_workers() {
            if mine.contains_key(&vm) || st.state == WorkerState::Receiving {
                continue;
            }
            let followed = self
                .incoming
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&vm);
            if followed {
                continue;
            }
            // `mine` may be stale: a receiver committed since then runs a VM that is ours now.
            match self.store.vm(&vm) {
                Ok(Some(v)) if v.value.owner == self.name() => continue,
                // Arrived by a handover whose new owner is not recorded yet (rule 1b).
                Ok(Some(v)) if v.value.handover_to.as_deref() == Some(self.name()) => continue,
                Err(_) => continue,
                _ => {}
            }
            tracing::warn!("stopping a worker for VM {vm}, which this node does not own");
            let _ = wapi::call(&sock, &Request::Shutdown, Some(Duration::from_secs(5)));
            if let Some(w) = self.workers.remove(&vm) {
                w.expected_exit.store(true, Ordering::SeqCst);
            }
        }
    }
}
