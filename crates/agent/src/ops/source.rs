//! A migration from this node, as explicit phases:
//!
//! ```text
//! plan      agent preflight (alive, schedulable, vendor, CPU features, capacity, storage,
//!           networks), then the lock: store CAS  running → migrating(id)
//! setup     the destination agent starts a receiver (POST /v1/internal/receive)
//! transfer  this node's worker migrates (progress relayed)
//! handover  (both agents take part: NodeInfo.handover, no --store-commit) the worker reports
//!           HandoverReady after setup; store CAS  migrating(id) → + handover_to = destination;
//!           the worker is told, pauses only after that answer, and at Ready sends Commit
//!           itself — the commit point, with no store round trip in the downtime
//! commit    (otherwise) the worker reports CommitReady; store CAS  owner: here → destination
//!           — the commit point — then the worker is told commit (or abort if the swap lost)
//! finish    the worker reports done; handed over, the new owner is recorded (CAS; the
//!           destination agent does the same, whoever is first); the record is written
//! ```
//! Before the commit point every failure rolls the store back (the VM runs here again, or is
//! `crashed` with the reason if its worker died). Handed over, a worker paused by the
//! switchover waits for that rollback before it resumes (a destination whose source vanished
//! after Ready commits by CAS itself; the store lets one of them win), and a worker that may
//! have sent Commit is never rolled back: the destination commits or hands the VM back. A
//! store that does not answer at the store commit point leaves the migration undecided, both
//! sides paused, for reconciliation to settle from the store once it answers.

use super::{new_id, reaches, usage, MigrationWatch, R};
use crate::client;
use crate::{Agent, AgentError};
use cluster::{now_ms, MigrationOutcome, MigrationRecord, NodeStatus, Phase, VmRecord, VmState};
use contract::api::{
    Blocker, CancelOutcome, CancelReply, MigrateRequest, MigrationStarted, MigrationView,
    ReceiveReply, ReceiveRequest, TargetVerdict, Targets,
};
use contract::faults::{self, FaultPoint};
use contract::worker::{CommitDecision, MigrateCommand, MigrateSession, Reply, Request};
use contract::{CommitPoint, FailureKind, Summary};
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a migration ended, seen from the source agent.
enum Ended {
    /// The VM runs on the destination.
    Moved(Box<Summary>),
    /// The commit point passed; then the source lost contact (the destination owns the VM).
    MovedUnconfirmed(String),
    /// Before the commit point.
    Failed {
        phase: Phase,
        kind: FailureKind,
        reason: String,
    },
    /// Before the commit point, handed over, with the VM paused here: it resumes once the
    /// store takes the handover back.
    FailedPaused {
        phase: Phase,
        kind: FailureKind,
        reason: String,
    },
    /// The store did not answer at the commit point: nobody may resume anything until it does.
    Undecided(String),
}

impl Agent {
    /// Checks whether `dest` can take `vm` (the agent-level preflight).
    pub fn preflight(&self, vm: &VmRecord, dest: &NodeStatus) -> Vec<Blocker> {
        let mut problems = Vec::new();
        let src = self.node_info();
        if !dest.alive {
            problems.push(Blocker::Down);
        }
        if !dest.info.schedulable {
            problems.push(Blocker::Drained);
        }
        if dest.info.cpu_vendor != src.cpu_vendor {
            problems.push(Blocker::CpuVendor {
                here: src.cpu_vendor.clone(),
                there: dest.info.cpu_vendor.clone(),
            });
        }
        let have: BTreeSet<&String> = dest.info.cpu_features.iter().collect();
        let missing: Vec<String> = vm
            .cpu_features
            .iter()
            .filter(|f| !have.contains(f))
            .cloned()
            .collect();
        if !missing.is_empty() {
            problems.push(Blocker::CpuFeatures { missing });
        }
        if let (Ok(vms), Ok(running)) = (self.store.vms(), self.store.running_migrations()) {
            let (cores, mem, _) = usage(&dest.info.name, &vms, &running);
            if cores + vm.spec.vcpus as u32 > dest.info.cores {
                problems.push(Blocker::Cores {
                    free: dest.info.cores.saturating_sub(cores),
                    need: vm.spec.vcpus as u32,
                });
            }
            if mem + vm.spec.memory_mib > dest.info.memory_mib {
                problems.push(Blocker::Memory {
                    free_mib: dest.info.memory_mib.saturating_sub(mem),
                    need_mib: vm.spec.memory_mib,
                });
            }
        }
        for s in vm.spec.storage_needed() {
            if !reaches(&dest.info.storage, &s) {
                problems.push(Blocker::Storage { path: s });
            }
        }
        for n in vm.spec.networks_needed() {
            if !dest.info.networks.contains(&n) {
                problems.push(Blocker::Network { network: n });
            }
        }
        problems
    }

    /// Every other node's verdict for `name` (a dry run per node; nothing is recorded).
    /// Answered by the VM's owner, whose node the checks compare against.
    pub fn targets(&self, name: &str) -> R<Targets> {
        let v = self.vm_or_404(name)?;
        if v.value.owner != self.name() {
            let a = self.address_of(&v.value.owner)?;
            return client::get(
                client::node(&v.value.owner, &a),
                &format!("/v1/vms/{name}/targets"),
            );
        }
        let vms = self.store.vms()?;
        let running = self.store.running_migrations()?;
        let here = self.node_info();
        let mut targets = Vec::new();
        for dest in self.store.nodes()? {
            if dest.info.name == self.name() {
                continue;
            }
            let mut blockers = Vec::new();
            if v.value.state != VmState::Running {
                blockers.push(Blocker::NotRunning {
                    state: v.value.state,
                });
            }
            blockers.extend(self.preflight(&v.value, &dest));
            let mut warnings = Vec::new();
            if dest.info.cpu_model != here.cpu_model {
                warnings.push(format!(
                    "CPU model differs ({} here, {} there); the VM's CPU features are checked, not the model",
                    here.cpu_model,
                    dest.info.cpu_model
                ));
            }
            let (_, mem, _) = usage(&dest.info.name, &vms, &running);
            let after = mem + v.value.spec.memory_mib;
            if after <= dest.info.memory_mib && after * 10 > dest.info.memory_mib * 9 {
                warnings.push(format!(
                    "{} MiB of {} MiB would be in use there afterwards (over 90 %)",
                    after, dest.info.memory_mib
                ));
            }
            targets.push(TargetVerdict::new(&dest.info.name, blockers, warnings));
        }
        Ok(Targets {
            vm: name.into(),
            from: self.name().into(),
            targets,
        })
    }

    /// Starts a live migration of `name` to `req.to`; returns its record (running), or refuses
    /// right away when preflight does. Forwarded to the VM's owner.
    pub fn migrate(self: &Arc<Self>, name: &str, req: MigrateRequest) -> R<MigrationStarted> {
        req.params
            .validate()
            .map_err(|e| AgentError::BadRequest(e.to_string()))?;
        let v = self.vm_or_404(name)?;
        if v.value.owner != self.name() {
            let a = self.address_of(&v.value.owner)?;
            return client::post(
                client::node(&v.value.owner, &a),
                &format!("/v1/vms/{name}/migrate"),
                &req,
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
        if self.worker_for_op(name).is_none() {
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
            phase: Phase::Preflight,
            reason: None,
            summary: None,
            params: req.params.clone(),
            settled_by: None,
        };
        let problems = self.preflight(&v.value, &dest);
        if !problems.is_empty() {
            record.finished_ms = Some(now_ms());
            record.outcome = MigrationOutcome::Failed;
            let reasons: Vec<String> = problems.iter().map(|b| b.describe(&req.to)).collect();
            record.reason = Some(format!("preflight refused: {}", reasons.join("; ")));
            self.store.put_migration(&record)?;
            self.metrics.inc("ferry_migrations_refused_total");
            return Err(AgentError::Conflict(record.reason.unwrap_or_default()));
        }
        if req.dry_run {
            record.finished_ms = Some(now_ms());
            record.outcome = MigrationOutcome::Succeeded;
            return Ok(MigrationStarted {
                migration: record,
                agent: self.cfg.listen.clone(),
                dry_run: true,
            });
        }
        let slot = self.sending.take_or_busy(
            self.cfg.max_outgoing,
            self.name(),
            "sends",
            "--max-outgoing",
        )?;
        // This agent's thread owns the migration from before the lock on: reconciliation
        // leaves a migration alone while its thread is active.
        let watch = Arc::new(MigrationWatch::new(record.clone()));
        self.migrations.insert(watch.clone());
        // The lock: no other operation or migration may start on the VM.
        let locked = self.update_vm(name, |r| {
            if r.state != VmState::Running || r.owner != self.name() {
                return Err(AgentError::Conflict(format!(
                    "VM {name} is {} on {}",
                    r.state, r.owner
                )));
            }
            r.state = VmState::Migrating;
            r.migration = Some(id.clone());
            Ok(())
        });
        if let Err(e) = locked {
            watch.mark_done();
            return Err(e);
        }
        if let Err(e) = self.store.put_migration(&record) {
            self.roll_back(name, &id, Phase::Preflight, &e.to_string(), true);
            watch.mark_done();
            return Err(e.into());
        }
        self.metrics.inc("ferry_migrations_started_total");
        let a = self.clone();
        let name2 = name.to_string();
        std::thread::Builder::new()
            .name(format!("migrate-{name}"))
            .spawn(move || {
                let _slot = slot;
                a.run_migration(&name2, req, watch, dest)
            })
            .map_err(|e| AgentError::Internal(e.to_string()))?;
        Ok(MigrationStarted {
            migration: record,
            agent: self.cfg.listen.clone(),
            dry_run: false,
        })
    }

    fn set_phase(&self, w: &MigrationWatch, phase: Phase) {
        let mut r = w.record.lock().unwrap_or_else(|e| e.into_inner());
        if r.phase != phase {
            r.phase = phase;
            let _ = self.store.put_migration(&r);
        }
    }

    /// Writes the final record; keeps trying while the store is away (it is small).
    fn finish_migration(
        &self,
        w: &MigrationWatch,
        outcome: MigrationOutcome,
        reason: Option<String>,
        summary: Option<Summary>,
    ) {
        let mut r = w.record.lock().unwrap_or_else(|e| e.into_inner());
        r.outcome = outcome;
        r.reason = reason;
        r.summary = summary;
        r.finished_ms = Some(now_ms());
        let t0 = Instant::now();
        while self.store.put_migration(&r).is_err() && t0.elapsed() < self.cfg.commit_retry {
            std::thread::sleep(Duration::from_millis(200));
        }
        drop(r);
        w.mark_done();
    }

    fn run_migration(
        self: Arc<Self>,
        name: &str,
        req: MigrateRequest,
        w: Arc<MigrationWatch>,
        dest: NodeStatus,
    ) {
        let t0 = Instant::now();
        let id = w.record().id;
        faults::hit(FaultPoint::AgentLocked);
        let ended = self.drive(name, &id, &req, &w, &dest);
        let dest = &dest;
        match ended {
            Ended::Moved(summary) => {
                self.metrics.observe_downtime(summary.downtime_ms);
                self.metrics
                    .add("ferry_migration_bytes_total", summary.bytes_sent);
                self.metrics.inc("ferry_migrations_succeeded_total");
                self.metrics
                    .observe("ferry_migration_seconds", t0.elapsed().as_secs_f64());
                if let Some(wk) = self.workers.remove(name) {
                    wk.expected_exit.store(true, Ordering::SeqCst);
                }
                self.set_phase(&w, Phase::Resumed);
                self.finish_migration(&w, MigrationOutcome::Succeeded, None, Some(*summary));
            }
            Ended::MovedUnconfirmed(reason) => {
                self.metrics.inc("ferry_migrations_succeeded_total");
                // The store says the destination owns it: this copy never runs again.
                if let Some(wk) = self.workers.remove(name) {
                    wk.expected_exit.store(true, Ordering::SeqCst);
                    wk.stop();
                }
                self.finish_migration(&w, MigrationOutcome::Succeeded, Some(reason), None);
            }
            Ended::Failed {
                phase,
                kind,
                reason,
            } => {
                self.set_phase(&w, phase);
                // A worker that answers holds the VM (an exited one may still look alive to
                // kill(0) until its supervisor reaped it).
                let alive = self
                    .workers
                    .get(name)
                    .is_some_and(|wk| wk.alive() && wk.state().is_some());
                self.roll_back(name, &id, phase, &reason, alive);
                let outcome = if kind == FailureKind::Cancelled {
                    self.metrics.inc("ferry_migrations_cancelled_total");
                    MigrationOutcome::Cancelled
                } else {
                    self.metrics.inc("ferry_migrations_failed_total");
                    MigrationOutcome::Failed
                };
                self.finish_migration(&w, outcome, Some(reason), None);
            }
            Ended::FailedPaused {
                phase,
                kind,
                reason,
            } => {
                self.set_phase(&w, phase);
                let outcome = if kind == FailureKind::Cancelled {
                    MigrationOutcome::Cancelled
                } else {
                    MigrationOutcome::Failed
                };
                if self.roll_back(name, &id, phase, &reason, true) {
                    // The store says "runs here" again: nobody else may resume it now.
                    if let Some(wk) = self.workers.get(name) {
                        if let Err(e) = wk.call(&Request::Resume) {
                            // Its disks may still be held: reconciliation resumes it later.
                            tracing::warn!("resume of {name} after a failed migration: {e}");
                        }
                    }
                    self.metrics.inc(if outcome == MigrationOutcome::Cancelled {
                        "ferry_migrations_cancelled_total"
                    } else {
                        "ferry_migrations_failed_total"
                    });
                    self.finish_migration(&w, outcome, Some(reason), None);
                    return;
                }
                match self.store.vm(name) {
                    Ok(Some(v)) if v.value.owner == dest.info.name => {
                        // The destination committed first (its source seemed gone).
                        self.metrics.inc("ferry_migrations_succeeded_total");
                        if let Some(wk) = self.workers.remove(name) {
                            wk.expected_exit.store(true, Ordering::SeqCst);
                            wk.stop();
                        }
                        self.finish_migration(
                            &w,
                            MigrationOutcome::Succeeded,
                            Some(format!(
                                "{reason}; the destination committed the VM on its own"
                            )),
                            None,
                        );
                    }
                    _ => {
                        // The store did not answer: reconciliation takes the handover back.
                        self.metrics.inc("ferry_migrations_failed_total");
                        self.finish_migration(&w, outcome, Some(reason), None);
                    }
                }
            }
            Ended::Undecided(reason) => {
                self.metrics.inc("ferry_migrations_failed_total");
                self.finish_migration(&w, MigrationOutcome::Failed, Some(reason), None);
            }
        }
    }

    /// Setup → transfer → commit, until the worker's final word.
    fn drive(
        &self,
        name: &str,
        id: &str,
        req: &MigrateRequest,
        w: &MigrationWatch,
        dest: &NodeStatus,
    ) -> Ended {
        let failed = |phase, kind, reason: String| Ended::Failed {
            phase,
            kind,
            reason,
        };
        // Setup: the destination agent starts a worker waiting for the VM.
        self.set_phase(w, Phase::Setup);
        let vm = match self.vm_or_404(name) {
            Ok(v) => v.value,
            Err(e) => return failed(Phase::Setup, FailureKind::Local, e.to_string()),
        };
        let rr = ReceiveRequest {
            migration: id.to_string(),
            vm,
            from: self.name().into(),
        };
        let (addr, secret) = match client::post::<_, ReceiveReply>(
            client::node(&dest.info.name, &dest.info.address),
            "/v1/internal/receive",
            &rr,
            Some(Duration::from_secs(60)),
        ) {
            Ok(r) => (r.address, r.secret),
            Err(e) => {
                return failed(
                    Phase::Setup,
                    FailureKind::PeerLost,
                    format!("destination agent {}: {e}", dest.info.name),
                )
            }
        };
        let Some(worker) = self.worker_of(name) else {
            return failed(
                Phase::Setup,
                FailureKind::Local,
                "the VM's worker is gone".into(),
            );
        };
        // Transfer: the worker migrates; the commit is ours to decide, or handed over to the
        // stream when both agents take part in handovers.
        let handover = !self.cfg.store_commit && dest.info.handover;
        let cmd = MigrateCommand {
            to: addr,
            params: req.params.clone(),
            dry_run: false,
            external_commit: true,
            handover,
            max_protocol: None,
            // Mutual TLS: the destination's worker must be the node the plan names.
            transport: match &self.cfg.tls {
                Some(files) => contract::trust::Transport::Tls {
                    files: files.clone(),
                    peer_node: dest.info.name.clone(),
                },
                None => contract::trust::Transport::Insecure,
            },
            secret,
        };
        let mut session = match MigrateSession::start(&worker.socket, cmd) {
            Ok(s) => s,
            Err(e) => {
                return failed(
                    Phase::Setup,
                    FailureKind::Local,
                    format!("cannot reach the VM's worker: {e}"),
                )
            }
        };
        let to = dest.info.name.as_str();
        let mut committed = false;
        let mut handed_over = false;
        loop {
            if !committed && w.cancel.swap(false, Ordering::SeqCst) {
                let _ = worker.call(&Request::Cancel);
            }
            let phase = w.record().phase;
            let reply = match session.next_reply() {
                Ok(r) => r,
                Err(e) if committed => {
                    return Ended::MovedUnconfirmed(format!(
                        "the source worker was lost after the commit: {e}"
                    ))
                }
                Err(e) if handed_over => {
                    // It may have sent Commit: the destination settles it.
                    return self.await_destination(
                        name,
                        id,
                        to,
                        phase,
                        format!("lost the VM's worker after the commit was handed over: {e}"),
                    );
                }
                Err(e) => {
                    return failed(
                        phase,
                        FailureKind::PeerLost,
                        format!("lost the VM's worker during the migration: {e}"),
                    )
                }
            };
            match reply {
                Reply::Progress(p) => {
                    self.set_phase(w, p.phase);
                    *w.progress.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
                }
                Reply::CommitReady => {
                    self.set_phase(w, Phase::Ready);
                    match self.commit_cas(name, id, &dest.info.name) {
                        Some(true) => {
                            faults::hit(FaultPoint::AgentAfterCas);
                            committed = true;
                            self.set_phase(w, Phase::Commit);
                            let _ = session.decide(CommitDecision::Commit);
                        }
                        Some(false) => {
                            let _ = session.decide(CommitDecision::Abort);
                        }
                        None => {
                            // Unknown: leave both sides paused; reconciliation settles it.
                            return Ended::Undecided(format!(
                                "the cluster store did not answer at the commit point for {} s; the VM stays paused until its owner is settled",
                                self.cfg.commit_retry.as_secs()
                            ));
                        }
                    }
                }
                Reply::HandoverReady => {
                    // Out of the downtime: from now on the stream's Commit is the commit point.
                    let ok = handover && self.hand_over(name, id, to);
                    if ok {
                        handed_over = true;
                        faults::hit(FaultPoint::AgentHandover);
                    }
                    let _ = session.decide(if ok {
                        CommitDecision::Commit
                    } else {
                        CommitDecision::Abort
                    });
                }
                Reply::Done(summary) => {
                    if handed_over {
                        self.record_owner(name, id, to);
                    }
                    return Ended::Moved(Box::new(summary));
                }
                Reply::Failed(f) if committed || f.commit == CommitPoint::After => {
                    if handed_over {
                        self.record_owner(name, id, to);
                    }
                    return Ended::MovedUnconfirmed(f.reason());
                }
                Reply::Failed(f) if handed_over && f.commit == CommitPoint::Unknown => {
                    return self.await_destination(name, id, to, f.phase, f.reason());
                }
                Reply::Failed(f) if f.commit == CommitPoint::Unknown => {
                    return Ended::Undecided(f.reason());
                }
                Reply::Failed(f) if handed_over && !f.source_running => {
                    return Ended::FailedPaused {
                        phase: f.phase,
                        kind: f.kind,
                        reason: f.reason(),
                    }
                }
                Reply::Failed(f) => return failed(f.phase, f.kind, f.reason()),
                Reply::Error { error } => {
                    return if committed {
                        Ended::MovedUnconfirmed(error)
                    } else if handed_over {
                        self.await_destination(name, id, to, phase, error)
                    } else {
                        failed(phase, FailureKind::Local, error)
                    }
                }
                other => {
                    if !committed {
                        return failed(
                            phase,
                            FailureKind::Protocol,
                            format!("unexpected answer from the VM's worker: {other:?}"),
                        );
                    }
                }
            }
        }
    }

    /// The handover: the store records that migration `id`'s stream decides its commit
    /// (`handover_to = dest`), while the VM still runs here. False if the store refused or
    /// did not answer (the worker then fails the migration before pausing).
    fn hand_over(&self, name: &str, id: &str, dest: &str) -> bool {
        let r = self.swap_vm(name, |r| {
            if r.owner != self.name()
                || r.migration.as_deref() != Some(id)
                || r.state != VmState::Migrating
            {
                return None;
            }
            let mut rec = r.clone();
            rec.handover_to = Some(dest.into());
            Some(rec)
        });
        match r {
            Ok(ok) => ok,
            Err(e) => {
                tracing::warn!("handover of {name} to {dest}: {e}");
                false
            }
        }
    }

    /// After a handed-over migration reached its commit point: records `dest` as the owner
    /// (the destination's agent does the same; whoever is first). Best effort: with the store
    /// away the destination's agent and reconciliation write it later.
    fn record_owner(&self, name: &str, id: &str, dest: &str) {
        if self.commit_cas(name, id, dest).is_none() {
            tracing::warn!("recording {dest} as the owner of {name}: left to reconciliation");
        }
    }

    /// Handed over and then out of contact with the worker (or it could not say whether its
    /// Commit went out): the destination decides. It commits if the VM is complete there (its
    /// agent swaps the owner), or hands the VM back once its receiver is gone (clears the
    /// handover); this waits for either.
    fn await_destination(
        &self,
        name: &str,
        id: &str,
        dest: &str,
        phase: Phase,
        reason: String,
    ) -> Ended {
        let deadline = Instant::now() + self.cfg.commit_retry.max(Duration::from_secs(30));
        loop {
            match self.store.vm(name) {
                Ok(Some(v)) if v.value.owner == dest && v.value.migration.is_none() => {
                    return Ended::MovedUnconfirmed(format!(
                        "{reason}; the destination committed the VM"
                    ))
                }
                Ok(Some(v))
                    if v.value.migration.as_deref() == Some(id)
                        && v.value.handover_to.is_some() => {}
                Ok(Some(_)) | Ok(None) => {
                    // Handed back (or settled otherwise): not moved. Only a worker that never
                    // sent Commit may run the VM here again.
                    let resumable = self.worker_may_resume(name);
                    if resumable {
                        return Ended::FailedPaused {
                            phase,
                            kind: FailureKind::PeerLost,
                            reason: format!("{reason}; the destination handed the VM back"),
                        };
                    }
                    if let Some(wk) = self.workers.remove(name) {
                        wk.expected_exit.store(true, Ordering::SeqCst);
                        wk.stop();
                    }
                    return Ended::Failed {
                        phase,
                        kind: FailureKind::PeerLost,
                        reason: format!("{reason}; the destination handed the VM back"),
                    };
                }
                Err(e) => tracing::warn!("waiting for the destination of {name}: {e}"),
            }
            if Instant::now() > deadline {
                return Ended::Undecided(format!(
                    "{reason}; the destination has not settled the handover yet (reconciliation will)"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether this node's worker of `name` holds the VM and may run it again: it answers, and
    /// its migration failed before it sent Commit (or it never paused).
    fn worker_may_resume(&self, name: &str) -> bool {
        let Some(st) = self.workers.get(name).and_then(|w| w.state()) else {
            return false;
        };
        if st.state == contract::worker::WorkerState::Running {
            return true;
        }
        st.migration.as_ref().is_some_and(|m| {
            m.direction == contract::worker::Direction::Outgoing
                && !m.active
                && m.failure
                    .as_ref()
                    .is_some_and(|f| f.commit == CommitPoint::Before)
        })
    }

    /// The commit point: compare-and-swap the VM's owner from this node to `dest`. Returns
    /// Some(true) if the destination now owns the VM, Some(false) if the swap was refused, None
    /// if the store could not say (then nobody may resume anything yet).
    fn commit_cas(&self, name: &str, id: &str, dest: &str) -> Option<bool> {
        let deadline = Instant::now() + self.cfg.commit_retry;
        loop {
            // From `migrating(id)`, which only this node (the owner) set in its lock.
            match self.commit_to(name, id, dest, false) {
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

    /// The abort decision in the store: migration `id` of `name` did not happen. The VM runs
    /// here again (`worker_alive`) or is marked crashed with the reason. A compare-and-swap
    /// from `migrating(id)`, so it can never undo a commit. Returns whether it applied.
    pub(crate) fn roll_back(
        &self,
        name: &str,
        id: &str,
        phase: Phase,
        reason: &str,
        worker_alive: bool,
    ) -> bool {
        let mut applied = false;
        let r = self.update_vm(name, |r| {
            applied = false;
            if r.migration.as_deref() == Some(id) && r.owner == self.name() {
                r.migration = None;
                r.handover_to = None;
                r.state = if worker_alive {
                    VmState::Running
                } else {
                    VmState::Crashed
                };
                r.last_error = Some(if worker_alive {
                    format!("migration {id} failed in {phase}: {reason}")
                } else {
                    format!("the VM's worker died during migration {id} ({phase}): {reason}")
                });
                applied = true;
            }
            Ok(())
        });
        if let Err(e) = r {
            tracing::warn!("cannot roll back migration {id} of {name}: {e}");
        }
        applied
    }

    /// Cancels a running migration (before its commit point).
    pub fn cancel_migration(&self, id: &str) -> R<CancelReply> {
        if let Some(w) = self.migrations.get(id) {
            if w.done.load(Ordering::SeqCst) {
                let r = w.record();
                return Err(AgentError::Conflict(format!(
                    "migration {id} already ended: {}",
                    r.outcome
                )));
            }
            let phase = w.record().phase;
            if phase >= Phase::Commit {
                return Err(AgentError::Conflict(format!(
                    "migration {id} passed its commit point; it can no longer be cancelled"
                )));
            }
            w.cancel.store(true, Ordering::SeqCst);
            return Ok(CancelReply {
                migration: id.to_string(),
                outcome: CancelOutcome::Cancelling,
            });
        }
        let m = self
            .store
            .migration(id)?
            .ok_or_else(|| AgentError::NotFound(format!("unknown migration {id:?}")))?;
        if m.finished() {
            return Err(AgentError::Conflict(format!(
                "migration {id} already ended: {}",
                m.outcome
            )));
        }
        if m.from != self.name() {
            let a = self.address_of(&m.from)?;
            return client::post(
                client::node(&m.from, &a),
                &format!("/v1/migrations/{id}/cancel"),
                &serde_json::json!({}),
                Some(Duration::from_secs(30)),
            );
        }
        // Ours, but no thread runs it (this agent restarted): reconciliation settles it.
        Err(AgentError::Conflict(format!(
            "migration {id} is being settled by reconciliation after an agent restart; try again in a moment"
        )))
    }

    /// A migration record (live if running here).
    pub fn migration_view(&self, id: &str) -> R<MigrationView> {
        if let Some(w) = self.migrations.get(id) {
            return Ok(MigrationView {
                migration: w.record(),
                progress: w.progress(),
                done: w.done.load(Ordering::SeqCst),
            });
        }
        let m = self
            .store
            .migration(id)?
            .ok_or_else(|| AgentError::NotFound(format!("unknown migration {id:?}")))?;
        let done = m.finished();
        if !done && m.from != self.name() {
            // Running on another agent: its live progress is there (a console or CLI may
            // ask any agent). Unreachable: the store's record, without progress.
            if let Ok(a) = self.address_of(&m.from) {
                if let Ok(v) = client::get::<MigrationView>(
                    client::node(&m.from, &a),
                    &format!("/v1/migrations/{id}"),
                ) {
                    return Ok(v);
                }
            }
        }
        Ok(MigrationView {
            migration: m,
            progress: None,
            done,
        })
    }
}

/// Polls a migration on `agent` until it ends.
pub fn wait_migration<'a>(agent: impl Into<client::To<'a>>, id: &str) -> R<MigrationRecord> {
    let agent = agent.into();
    loop {
        let v: MigrationView = client::get(agent, &format!("/v1/migrations/{id}"))?;
        if v.done {
            return Ok(v.migration);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
