//! `ferry bench-commit`: what the cluster store's commit costs inside the downtime. For each
//! store (the embedded SQLite file, etcd) and each commit protocol — the handover (the store
//! names the stream's `Commit` as the commit point before the pause; the default) and
//! `--store-commit` (the store's compare-and-swap at Ready, inside the downtime) — a fresh
//! local 2-node cluster moves one running VM back and forth N times through the agents. Per
//! migration the engine's downtime breakdown gives the downtime, the part spent waiting for
//! the commit decision (the store's swap, when it sits in the downtime) and the total time.

use crate::bench_drain::{api, median, start_local};
use anyhow::{bail, Context, Result};
use cluster::MigrationOutcome;
use contract::api::{MigrateRequest, MigrationStarted};
use contract::Summary;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub struct Options {
    pub migrations: usize,
    pub stores: Vec<String>,
    pub memory_mib: u64,
    pub report: Option<PathBuf>,
}

/// One store and protocol.
pub struct Row {
    pub store: String,
    pub handover: bool,
    pub summaries: Vec<Summary>,
}

impl Row {
    fn med(&self, f: impl Fn(&Summary) -> f64) -> f64 {
        median(self.summaries.iter().map(f).collect())
    }
}

fn run_one(opts: &Options, store: &str, handover: bool) -> Result<Row> {
    let dir = std::env::temp_dir().join(format!(
        "ferry-bench-commit-{}-{store}-{}",
        std::process::id(),
        if handover { "handover" } else { "store" }
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    // Declared before the cluster: dropped after it.
    let mut etcd = None;
    let url = match store {
        "sqlite" => format!("sqlite://{}", dir.join("cluster.db").display()),
        "etcd" => {
            let e = cluster::testing::Etcd::start();
            let u = e.url.clone();
            etcd = Some(e);
            u
        }
        other => bail!("unknown store {other:?} (sqlite, etcd)"),
    };
    let extra: &[&str] = if handover { &[] } else { &["--store-commit"] };
    let l = start_local(&dir, &["node1", "node2"], &url, extra)?;
    let a1 = l.agents[0].1.clone();
    l.start_vm(
        "node1",
        "vm",
        opts.memory_mib,
        "ferry.workload=dirty ferry.wss_mib=32 ferry.rate_mibs=50 ferry.hb_ms=100",
    )?;
    l.await_heartbeats("node1", "vm", Instant::now())?;
    let mut summaries = Vec::new();
    for i in 0..opts.migrations {
        let to = if i % 2 == 0 { "node2" } else { "node1" };
        let started: MigrationStarted = api(agent::client::post(
            &a1,
            "/v1/vms/vm/migrate",
            &MigrateRequest {
                to: to.into(),
                dry_run: false,
                params: Default::default(),
            },
            Some(Duration::from_secs(60)),
        ))?;
        let rec = api(agent::ops::source::wait_migration(
            started.agent.as_str(),
            &started.migration.id,
        ))?;
        if rec.outcome != MigrationOutcome::Succeeded {
            bail!(
                "migration {} to {to} ended {}: {}",
                i + 1,
                rec.outcome,
                rec.reason.unwrap_or_default()
            );
        }
        let s = rec
            .summary
            .with_context(|| format!("migration {} has no summary", i + 1))?;
        summaries.push(s);
        // The store names the new owner (with the handover it is written after the resume).
        let t = Instant::now();
        loop {
            let v = api(agent::client::get::<contract::api::VmView>(
                &a1,
                "/v1/vms/vm",
            ))?
            .vm;
            if v.owner == to && v.migration.is_none() {
                break;
            }
            if t.elapsed() > Duration::from_secs(10) {
                bail!("the store did not name {to} the owner within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    drop(l);
    drop(etcd);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Row {
        store: store.into(),
        handover,
        summaries,
    })
}

pub fn report(opts: &Options, rows: &[Row]) -> String {
    let mut s = format!(
        "## The store's commit in the downtime: {} migrations of a running VM ({} MiB, dirtying 32 MiB at 50 MiB/s) back and forth between two local agents\n\n\
         Medians. \"commit decision\" is the part of the downtime between Ready and the decision (the store's compare-and-swap when it sits there).\n\n\
         | store | commit protocol | downtime | commit decision | final memory | state | commit + resume | total | passes | pass 0 |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        opts.migrations, opts.memory_mib
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {:.2} ms | {:.3} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.0} ms | {:.0} | {:.0} MiB/s |\n",
            r.store,
            if r.handover {
                "handover (default)"
            } else {
                "--store-commit"
            },
            r.med(|s| s.downtime_ms),
            r.med(|s| s.downtime.decision_ms),
            r.med(|s| s.downtime.final_memory_ms),
            r.med(|s| s.downtime.state_ms),
            r.med(|s| s.downtime.commit_ms),
            r.med(|s| s.total_ms),
            r.med(|s| s.passes as f64),
            r.med(|s| s.pass0_mibs),
        ));
    }
    for store in &opts.stores {
        let h = rows.iter().find(|r| &r.store == store && r.handover);
        let c = rows.iter().find(|r| &r.store == store && !r.handover);
        if let (Some(h), Some(c)) = (h, c) {
            s.push_str(&format!(
                "\n{store}: the store adds {:.3} ms (median decision wait) to the downtime with the handover, {:.2} ms with --store-commit; median downtime {:.2} -> {:.2} ms ({:.2}x)",
                h.med(|s| s.downtime.decision_ms),
                c.med(|s| s.downtime.decision_ms),
                c.med(|s| s.downtime_ms),
                h.med(|s| s.downtime_ms),
                h.med(|s| s.downtime_ms) / c.med(|s| s.downtime_ms).max(1e-9),
            ));
        }
    }
    s.push('\n');
    s
}

pub fn run(opts: &Options) -> Result<()> {
    if opts.migrations == 0 || opts.stores.is_empty() {
        bail!("give at least one migration and one store");
    }
    let mut rows = Vec::new();
    for store in &opts.stores {
        // Interleaved: both protocols under the same conditions.
        for handover in [true, false] {
            eprintln!(
                "bench-commit: {} migrations, {store}, {}",
                opts.migrations,
                if handover { "handover" } else { "store commit" }
            );
            rows.push(run_one(opts, store, handover)?);
        }
    }
    let text = report(opts, &rows);
    println!("{text}");
    if let Some(p) = &opts.report {
        std::fs::write(p, &text).with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}
