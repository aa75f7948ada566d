//! A migration to this node: a receiver worker waits for the VM; once the VM is complete here
//! (Ready), the source's Commit or the store decides: the VM is committed here as soon as the
//! store names this node its owner, and discarded once the store says the migration is over
//! without it. Handed over (`VmRecord::handover_to` = this node), a receiver whose source
//! vanished at Ready is committed here by this agent's own compare-and-swap, a VM that resumed
//! on the source's Commit is recorded as this node's, and a receiver gone without the VM hands
//! it back. So a source that dies at or after Ready cannot lose the VM, and an agent that
//! restarts settles its receivers from the store.

use super::R;
use crate::workers::Worker;
use crate::{Agent, AgentError};
use cluster::SpecExt;
use contract::api::{ReceiveReply, ReceiveRequest};
use contract::worker::{Request, WorkerState};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a receiver's state is looked at.
const WATCH_EVERY: Duration = Duration::from_millis(20);
/// How often an idle receiver checks the store whether its migration is still on.
const IDLE_CHECK_EVERY: Duration = Duration::from_millis(500);

/// What the store says a receiver should do.
enum Verdict {
    Commit,
    Abort,
    Wait,
}

impl Agent {
    /// Starts a worker waiting for the VM and returns where the source should connect.
    pub fn receive(self: &Arc<Self>, req: ReceiveRequest) -> R<ReceiveReply> {
        let name = req.vm.spec.name.clone();
        if !cluster::valid_name(&name) {
            return Err(AgentError::BadRequest(format!("invalid VM name {name:?}")));
        }
        if !cluster::valid_name(&req.from) {
            return Err(AgentError::BadRequest(format!(
                "invalid source node name {:?}",
                req.from
            )));
        }
        if !cluster::valid_migration_id(&req.migration) {
            return Err(AgentError::BadRequest(format!(
                "invalid migration id {:?}",
                req.migration
            )));
        }
        // Whether this node takes VMs is the store's word (a drain or undrain through any
        // agent changes it there; this agent's copy is only what it was at start-up).
        let me = self.node_or_404(self.name())?;
        if !me.info.schedulable {
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
        let slot = self.receiving.take_or_busy(
            self.cfg.max_incoming,
            self.name(),
            "receives",
            "--max-incoming",
        )?;
        // The store must agree that this migration is on, towards this node.
        let cur = self.vm_or_404(&name)?.value;
        if cur.migration.as_deref() != Some(req.migration.as_str()) {
            return Err(AgentError::Conflict(format!(
                "VM {name} is not migrating as {} in the store",
                req.migration
            )));
        }
        // The VM this node takes is the one in the store, not what the request (or later the
        // source's stream) says: the receiver gets the store's configuration and refuses any
        // other in preflight, and opens host files only beneath this node's roots.
        let spec = cur.spec.clone();
        let mine = self.node_info();
        super::spec_paths_allowed(&spec, self.name(), &mine.storage, &mine.boot)
            .map_err(AgentError::Conflict)?;
        self.drop_stale_receiver(&name, &req.migration)?;
        let dir = crate::workers::vm_dir(&self.cfg.data_dir, &name);
        crate::workers::create_vm_dir(&dir)
            .map_err(|e| AgentError::Internal(format!("{}: {e}", dir.display())))?;
        let expect = dir.join("receive.config.json");
        write_private(
            &expect,
            &serde_json::to_vec(&spec.vm_config("host")).unwrap_or_default(),
        )
        .map_err(|e| AgentError::Internal(format!("{}: {e}", expect.display())))?;
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
            "--migration-id".into(),
            req.migration.clone(),
            "--expect-config".into(),
            expect.display().to_string(),
        ];
        args.extend(self.cfg.confinement_args());
        // Mutual TLS with the source node the request names, and a fresh one-time secret
        // that only the source agent learns (in the reply); plaintext if this node has no
        // certificate.
        let secret = match &self.cfg.tls {
            Some(files) => {
                let secret = trust::secret::generate()
                    .map_err(|e| AgentError::Internal(format!("migration secret: {e}")))?;
                let file = dir.join("receive.secret");
                trust::secret::write_file(&file, &secret).map_err(|e| {
                    let cause = std::error::Error::source(&e).map(|c| format!(": {c}"));
                    AgentError::Internal(format!("{e}{}", cause.unwrap_or_default()))
                })?;
                for (k, v) in [
                    ("--tls-cert", &files.cert),
                    ("--tls-key", &files.key),
                    ("--tls-ca", &files.ca),
                    ("--secret-file", &file),
                ] {
                    args.extend([k.to_string(), v.display().to_string()]);
                }
                args.extend(["--peer-node".into(), req.from.clone()]);
                Some(secret)
            }
            None => {
                args.push("--insecure".into());
                None
            }
        };
        if let Some(p) = &self.cfg.cpu_limit {
            args.extend(["--host-profile".into(), p.clone()]);
        }
        args.extend(
            self.cfg
                .net_backend_args(&spec)
                .map_err(AgentError::Conflict)?,
        );
        let w = self
            .workers
            .spawn(
                &self.cfg.worker_bin,
                &self.cfg.data_dir,
                &name,
                &args,
                self.cfg.worker_uids,
            )
            .map_err(|e| AgentError::Internal(format!("{e:#}")))?;
        let address = match contract::worker::receiver_address(&w.socket, Duration::from_secs(10)) {
            Ok(a) => a,
            Err(e) => {
                w.stop();
                return Err(AgentError::Internal(format!(
                    "the receiving worker did not say where it listens: {e}"
                )));
            }
        };
        self.watch_receiver(&name, &req.migration, w, Some(slot));
        Ok(ReceiveReply { address, secret })
    }

    /// Registers a receiver and follows it in a thread of its own (which holds its
    /// `--max-incoming` slot until the receiver is settled).
    pub(crate) fn watch_receiver(
        self: &Arc<Self>,
        name: &str,
        id: &str,
        w: Arc<Worker>,
        slot: Option<super::Slot>,
    ) {
        self.incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), (id.to_string(), w.clone()));
        let a = self.clone();
        let (name, id) = (name.to_string(), id.to_string());
        let spawned = std::thread::Builder::new()
            .name(format!("incoming-{name}"))
            .spawn(move || {
                let _slot = slot;
                a.watch_incoming(&name, &id, w)
            });
        if let Err(e) = spawned {
            tracing::error!("cannot watch a receiver: {e}");
        }
    }

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

    /// The store's word on migration `id` of `name` to this node, for a receiver that holds
    /// the complete VM. `source_gone`: its source's connection closed without a decision; if
    /// the store names the handover to this node, this node then commits on its own (a
    /// compare-and-swap: a source that failed first and swapped the store back wins instead).
    fn verdict(&self, name: &str, id: &str, source_gone: bool) -> Verdict {
        match self.store.vm(name) {
            Ok(Some(v)) if v.value.owner == self.name() && v.value.migration.is_none() => {
                Verdict::Commit
            }
            Ok(Some(v)) if v.value.migration.as_deref() != Some(id) => Verdict::Abort,
            Ok(None) => Verdict::Abort,
            Ok(Some(v)) if source_gone && v.value.handover_to.as_deref() == Some(self.name()) => {
                match self.commit_to(name, id, self.name(), true) {
                    Ok(true) => {
                        tracing::warn!(
                            vm = name,
                            migration = id,
                            "the source vanished after the VM was complete here: committed it here"
                        );
                        Verdict::Commit
                    }
                    _ => Verdict::Wait, // decided otherwise meanwhile, or the store is away
                }
            }
            _ => Verdict::Wait, // still undecided, or the store is away
        }
    }

    /// A received VM runs here: if the store still names the handover to this node, record
    /// this node as the owner (the source's agent may do it first).
    fn record_arrival(&self, name: &str, id: &str) {
        let deadline = Instant::now() + self.cfg.commit_retry;
        // A no-op unless the store still names the handover to this node.
        while let Err(e) = self.commit_to(name, id, self.name(), true) {
            tracing::warn!("recording the arrival of {name}: {e}");
            if Instant::now() > deadline {
                return; // reconciliation records it once the store answers
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// A receiver of migration `id` of `name` is gone without having run the VM here: if the
    /// store still names the handover to this node, hand the VM back (the source's agent
    /// then settles it: it runs there again if the source never sent Commit, else it is
    /// crashed). A compare-and-swap: a commit that happened stays.
    pub(crate) fn hand_back(&self, name: &str, id: &str, why: &str) {
        let r = self.swap_vm(name, |r| {
            if r.migration.as_deref() != Some(id) || r.handover_to.as_deref() != Some(self.name()) {
                return None;
            }
            let mut rec = r.clone();
            rec.handover_to = None;
            rec.last_error = Some(format!(
                "migration {id}: the receiver on {} is gone ({why})",
                self.name()
            ));
            Some(rec)
        });
        match r {
            Ok(true) => tracing::warn!(vm = name, migration = id, "handed the VM back: {why}"),
            Ok(false) => {}
            Err(e) => tracing::warn!("cannot hand {name} back: {e}"),
        }
    }

    fn watch_incoming_inner(&self, name: &str, id: &str, w: &Arc<Worker>) {
        let mut last_check = Instant::now();
        loop {
            std::thread::sleep(WATCH_EVERY);
            if !w.alive() {
                // The migration failed and the worker discarded the VM (or it resumed and
                // died between two looks). Handing back is safe either way: the source runs
                // the VM again only if it never sent Commit, and without a Commit nothing
                // resumed here unless the store already named this node (then this is a no-op).
                self.hand_back(name, id, "it exited");
                return;
            }
            let Some(st) = w.state() else { continue };
            if st.state != WorkerState::Receiving {
                // The VM runs here now: supervise it.
                self.workers.insert(w.clone());
                self.record_arrival(name, id);
                return;
            }
            if st.awaiting_decision() {
                let source_gone = st.migration.as_ref().is_some_and(|m| !m.source_connected);
                match self.verdict(name, id, source_gone) {
                    Verdict::Commit => {
                        let _ = w.call(&Request::Commit);
                    }
                    Verdict::Abort => {
                        let _ = w.call(&Request::Abort);
                    }
                    Verdict::Wait => {}
                }
                continue;
            }
            // A receiver refused in preflight (or whose source vanished) keeps listening; once the
            // store says this migration is over and the VM is not ours, nothing can come of it
            // (a commit needs the record in `migrating(id)`): stop it so the node is free for the
            // next attempt. Until the commit decision the worker holds no running VM.
            if last_check.elapsed() >= IDLE_CHECK_EVERY {
                last_check = Instant::now();
                // Final: a record never returns to `migrating(id)` once it left it.
                if let Verdict::Abort = self.verdict(name, id, false) {
                    tracing::info!(
                        vm = name,
                        migration = id,
                        "migration over without this node: stopping the receiver"
                    );
                    w.stop();
                    return;
                }
            }
        }
    }
}

/// Writes a file only this user reads, created anew (`O_EXCL`, after removing an old one, so
/// a planted symlink is replaced, never followed).
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}
