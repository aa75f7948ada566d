//! Draining a node: every VM it owns moves to the nodes with the most free resources that pass
//! preflight, at most `concurrency` at once; the node is marked unschedulable first.

use super::source::wait_migration;
use super::{usage, R};
use crate::client;
use crate::Agent;
use cluster::{MigrationOutcome, NodeStatus, VmRecord, VmState};
use contract::api::{DrainItem, DrainReport, MigrateRequest, MigrationStarted};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

impl Agent {
    /// Moves every VM off `node`.
    pub fn drain(self: &Arc<Self>, node: &str, concurrency: usize) -> R<DrainReport> {
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
        let results: Mutex<Vec<DrainItem>> = Mutex::new(Vec::new());
        let queue: Mutex<Vec<VmRecord>> = Mutex::new(vms);
        let peak = AtomicUsize::new(0);
        let active = AtomicUsize::new(0);
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
        let vms = results.into_inner().unwrap_or_default();
        let failed = vms.iter().filter(|r| !r.ok).count();
        Ok(DrainReport {
            node: node.to_string(),
            moved: vms.iter().filter(|r| r.ok && r.to.is_some()).count(),
            failed,
            max_concurrent: peak.load(Ordering::SeqCst),
            concurrency_limit: concurrency,
            vms,
        })
    }

    fn drain_one(self: &Arc<Self>, vm: &VmRecord) -> DrainItem {
        let name = vm.spec.name.clone();
        let item = |ok: bool| DrainItem {
            vm: name.clone(),
            ok,
            to: None,
            migration: None,
            note: None,
            error: None,
            summary: None,
        };
        if vm.state != VmState::Running {
            return DrainItem {
                note: Some(format!("{} (not moved)", vm.state)),
                ..item(vm.state == VmState::Stopped)
            };
        }
        let err = |e: String| DrainItem {
            error: Some(e),
            ..item(false)
        };
        let nodes = match self.store.nodes() {
            Ok(n) => n,
            Err(e) => return err(e.to_string()),
        };
        // Candidates: most free memory first, then most free cores.
        let (vms, running) = (
            self.store.vms().unwrap_or_default(),
            self.store.running_migrations().unwrap_or_default(),
        );
        let mut cands: Vec<(NodeStatus, i64, i64)> = nodes
            .into_iter()
            .filter(|n| n.info.name != vm.owner && n.alive && n.info.schedulable)
            .map(|n| {
                let (c, m, _) = usage(&n.info.name, &vms, &running);
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
            Err(e) => return err(e.to_string()),
        };
        let mut refusals = Vec::new();
        for (n, _, _) in cands {
            let problems = self.preflight(vm, &n);
            if !problems.is_empty() {
                let reasons: Vec<String> =
                    problems.iter().map(|b| b.describe(&n.info.name)).collect();
                refusals.push(format!("{}: {}", n.info.name, reasons.join("; ")));
                continue;
            }
            let req = MigrateRequest {
                to: n.info.name.clone(),
                dry_run: false,
                params: Default::default(),
            };
            let started: Result<MigrationStarted, _> = client::post(
                client::node(&vm.owner, &owner),
                &format!("/v1/vms/{name}/migrate"),
                &req,
                Some(Duration::from_secs(60)),
            );
            let id = match started {
                Ok(s) => s.migration.id,
                Err(e) => {
                    refusals.push(format!("{}: {e}", n.info.name));
                    continue;
                }
            };
            let base = DrainItem {
                to: Some(n.info.name.clone()),
                migration: Some(id.clone()),
                ..item(false)
            };
            return match wait_migration(client::node(&vm.owner, &owner), &id) {
                Ok(m) if m.outcome == MigrationOutcome::Succeeded => DrainItem {
                    ok: true,
                    summary: m.summary,
                    ..base
                },
                Ok(m) => DrainItem {
                    error: m.reason,
                    ..base
                },
                Err(e) => DrainItem {
                    error: Some(e.to_string()),
                    ..base
                },
            };
        }
        err(format!(
            "no node can take it: {}",
            if refusals.is_empty() {
                "no other schedulable node is alive".to_string()
            } else {
                refusals.join(" | ")
            }
        ))
    }
}
