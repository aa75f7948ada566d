//! Many connections on one fresh SQLite file at the same instant, as the agents of one machine
//! starting together: every open (WAL switch, schema), read and write must wait for the others
//! instead of failing with "database is locked".

use cluster::sqlite::SqliteStore;
use cluster::*;
use std::sync::{Arc, Barrier};
use std::time::Duration;

const THREADS: usize = 8;
const ROUNDS: usize = 20;
const WRITES: usize = 10;

fn node(name: &str) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        address: "127.0.0.1:1".into(),
        cpu_vendor: "AuthenticAMD".into(),
        cpu_model: "test".into(),
        cpu_features: vec!["sse2".into()],
        cpu_limit: None,
        cores: 2,
        memory_mib: 4096,
        storage: vec![],
        boot: vec![],
        networks: vec![],
        schedulable: true,
        started_ms: now_ms(),
        handover: true,
    }
}

fn vm(name: &str, owner: &str) -> VmRecord {
    VmRecord {
        spec: VmSpec::from_toml(&format!("name = \"{name}\"\nmemory_mib = 64\n")).unwrap(),
        owner: owner.into(),
        state: VmState::Stopped,
        cpu_features: vec![],
        migration: None,
        handover_to: None,
        last_error: None,
        updated_ms: now_ms(),
    }
}

/// What one connection (one "agent") does: open the fresh file, register, then a mix of
/// reads, compare-and-swap updates of a shared VM record and writes of its own.
fn agent(path: &std::path::Path, i: usize, barrier: &Barrier) -> Result<(), String> {
    let name = format!("n{i}");
    barrier.wait();
    let s = SqliteStore::open(path).map_err(|e| format!("{name}: open: {e}"))?;
    let step =
        |what: &str, r: Result<(), StoreError>| r.map_err(|e| format!("{name}: {what}: {e}"));
    step(
        "register",
        s.register_node(&node(&name), Duration::from_secs(30)),
    )?;
    // Everyone tries to create the shared VM; exactly one wins, the others see Exists.
    match s.create_vm(&vm("shared", &name)) {
        Ok(()) | Err(StoreError::Exists(_)) => {}
        Err(e) => return Err(format!("{name}: create shared: {e}")),
    }
    step("create own", s.create_vm(&vm(&format!("vm-{i}"), &name)))?;
    for k in 0..WRITES {
        step("keepalive", s.keepalive(&name, Duration::from_secs(30)))?;
        step("nodes", s.nodes().map(|_| ()))?;
        // Take the shared VM by compare-and-swap until the swap wins.
        loop {
            let cur = s
                .vm("shared")
                .map_err(|e| format!("{name}: read shared: {e}"))?
                .ok_or_else(|| format!("{name}: the shared VM is gone"))?;
            let mut rec = cur.value.clone();
            rec.owner = name.clone();
            if s.update_vm("shared", cur.version, &rec)
                .map_err(|e| format!("{name}: update shared: {e}"))?
            {
                break;
            }
        }
        step(
            "put migration",
            s.put_migration(&MigrationRecord {
                id: format!("m-{i}-{k}"),
                vm: "shared".into(),
                from: name.clone(),
                to: name.clone(),
                started_ms: now_ms(),
                finished_ms: None,
                outcome: MigrationOutcome::Running,
                phase: cluster::Phase::Precopy,
                reason: None,
                summary: None,
                params: Default::default(),
                settled_by: None,
            }),
        )?;
        step("vms", s.vms().map(|_| ()))?;
    }
    Ok(())
}

#[test]
fn many_connections_open_and_write_one_fresh_database_at_once() {
    for round in 0..ROUNDS {
        let dir = tempfile::tempdir().unwrap();
        let path = Arc::new(dir.path().join("cluster.db"));
        let barrier = Arc::new(Barrier::new(THREADS));
        let threads: Vec<_> = (0..THREADS)
            .map(|i| {
                let (path, barrier) = (path.clone(), barrier.clone());
                std::thread::spawn(move || agent(&path, i, &barrier))
            })
            .collect();
        let errors: Vec<String> = threads
            .into_iter()
            .filter_map(|t| t.join().unwrap().err())
            .collect();
        assert!(errors.is_empty(), "round {round}: {errors:#?}");
        // Everything every connection wrote is there, once.
        let s = SqliteStore::open(&path).unwrap();
        let nodes = s.nodes().unwrap();
        assert_eq!(nodes.len(), THREADS, "round {round}");
        assert!(nodes.iter().all(|n| n.alive));
        let vms = s.vms().unwrap();
        assert_eq!(vms.len(), THREADS + 1, "round {round}");
        let mut versions: Vec<u64> = vms.iter().map(|v| v.version).collect();
        versions.sort();
        versions.dedup();
        assert_eq!(versions.len(), vms.len(), "versions repeat: {vms:?}");
        // 1 + THREADS creates and THREADS * WRITES swaps: the version counter counted every
        // one of them, and the shared VM went through every swap.
        assert_eq!(
            *versions.last().unwrap(),
            (1 + THREADS + THREADS * WRITES) as u64,
            "round {round}"
        );
        let shared = s.vm("shared").unwrap().unwrap();
        assert!(shared.version > (THREADS * WRITES) as u64);
        assert_eq!(s.migrations().unwrap().len(), THREADS * WRITES);
    }
}
