//! The same behaviour from both backends: the embedded SQLite store (also shared by two
//! handles, as two agents of one machine share it) and a real etcd server started for the test.

use cluster::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn node(name: &str) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        address: format!("127.0.0.1:{}", 7000 + name.len()),
        cpu_vendor: "AuthenticAMD".into(),
        cpu_model: "test".into(),
        cpu_features: vec!["sse2".into(), "lm".into()],
        cpu_limit: None,
        cores: 2,
        memory_mib: 4096,
        storage: vec!["/shared".into()],
        boot: vec![],
        networks: vec!["br0".into()],
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

/// Everything a backend must do. `ttl` is the shortest lease the backend supports.
fn suite(s: &dyn Store, other: &dyn Store, ttl: Duration) {
    // Nodes and leases.
    s.register_node(&node("n1"), ttl).unwrap();
    other.register_node(&node("n2"), ttl).unwrap();
    let ns = s.nodes().unwrap();
    assert_eq!(
        ns.iter().map(|n| n.info.name.as_str()).collect::<Vec<_>>(),
        vec!["n1", "n2"]
    );
    assert!(ns.iter().all(|n| n.alive));
    s.set_schedulable("n2", false).unwrap();
    assert!(!other.node("n2").unwrap().unwrap().info.schedulable);
    assert!(matches!(
        s.set_schedulable("nope", false),
        Err(StoreError::UnknownNode(_))
    ));
    // n1 keeps its lease alive, n2 does not: n2 is reported down once its lease expired.
    let deadline = Instant::now() + ttl * 3;
    while Instant::now() < deadline {
        s.keepalive("n1", ttl).unwrap();
        std::thread::sleep(ttl / 4);
    }
    let ns = other.nodes().unwrap();
    assert!(
        ns.iter().find(|n| n.info.name == "n1").unwrap().alive,
        "n1 kept its lease"
    );
    assert!(
        !ns.iter().find(|n| n.info.name == "n2").unwrap().alive,
        "n2's lease expired"
    );
    // A node that comes back refreshes its lease.
    other.keepalive("n2", ttl).unwrap();
    assert!(s.node("n2").unwrap().unwrap().alive);
    assert!(matches!(
        s.keepalive("ghost", ttl),
        Err(StoreError::UnknownNode(_))
    ));

    // VMs: create once, compare-and-swap by version.
    s.create_vm(&vm("a", "n1")).unwrap();
    assert!(matches!(
        other.create_vm(&vm("a", "n2")),
        Err(StoreError::Exists(_))
    ));
    // Names with `/` or `..` never reach a backend, whichever call carries them.
    for bad in ["..", "a/b", "../etc", "/x", "A"] {
        let invalid = |r: Result<(), StoreError>| matches!(r, Err(StoreError::InvalidName { .. }));
        let mut r = vm("a", "n1");
        r.spec.name = bad.into();
        assert!(invalid(s.create_vm(&r)), "{bad}");
        assert!(invalid(s.create_vm(&vm("c", bad))), "owner {bad}");
        assert!(invalid(s.register_node(&node(bad), ttl)), "node {bad}");
        let mut held = vm("a", "n1");
        held.migration = Some(bad.into());
        assert!(
            invalid(s.update_vm("a", 1, &held).map(|_| ())),
            "migration {bad}"
        );
        assert!(invalid(s.update_vm(bad, 1, &r).map(|_| ())), "update {bad}");
    }
    assert!(s.vm("c").unwrap().is_none());
    let v1 = other.vm("a").unwrap().unwrap();
    assert_eq!(v1.value.owner, "n1");
    let mut moved = v1.value.clone();
    moved.owner = "n2".into();
    assert!(s.update_vm("a", v1.version, &moved).unwrap());
    // The same stale version no longer matches.
    let mut back = v1.value.clone();
    back.owner = "n1".into();
    assert!(!other.update_vm("a", v1.version, &back).unwrap());
    let v2 = s.vm("a").unwrap().unwrap();
    assert_eq!(v2.value.owner, "n2");
    assert!(v2.version > v1.version);
    // Racing CAS from both handles: exactly one wins.
    let wins = std::thread::scope(|sc| {
        let h: Vec<_> = [s, other]
            .into_iter()
            .enumerate()
            .map(|(i, st)| {
                let mut r = v2.value.clone();
                r.owner = format!("racer{i}");
                sc.spawn(move || st.update_vm("a", v2.version, &r).unwrap())
            })
            .collect();
        h.into_iter()
            .map(|j| j.join().unwrap())
            .filter(|w| *w)
            .count()
    });
    assert_eq!(wins, 1, "exactly one compare-and-swap may win");
    assert!(s.vm("a").unwrap().unwrap().value.owner.starts_with("racer"));
    // Delete by version; deleting and re-creating never reuses a version.
    let cur = s.vm("a").unwrap().unwrap();
    assert!(!s.delete_vm("a", v1.version).unwrap());
    assert!(other.delete_vm("a", cur.version).unwrap());
    assert!(s.vm("a").unwrap().is_none());
    s.create_vm(&vm("a", "n1")).unwrap();
    let again = s.vm("a").unwrap().unwrap();
    assert!(
        again.version > cur.version,
        "re-created VM reused version {}",
        again.version
    );
    assert!(!s.update_vm("a", cur.version, &vm("a", "n2")).unwrap());
    s.create_vm(&vm("b", "n2")).unwrap();
    assert_eq!(
        other
            .vms()
            .unwrap()
            .iter()
            .map(|v| v.value.spec.name.as_str())
            .collect::<Vec<_>>(),
        vec!["a", "b"]
    );

    // Migration records, newest first.
    for (i, id) in ["m1", "m2", "m3"].iter().enumerate() {
        let m = MigrationRecord {
            id: id.to_string(),
            vm: "a".into(),
            from: "n1".into(),
            to: "n2".into(),
            started_ms: 1000 + i as u64,
            finished_ms: None,
            outcome: MigrationOutcome::Running,
            phase: cluster::Phase::Precopy,
            reason: None,
            summary: None,
            params: Default::default(),
            settled_by: None,
        };
        s.put_migration(&m).unwrap();
    }
    let mut m = s.migrations().unwrap()[0].clone();
    for bad in ["../m", "m/1", ""] {
        m.id = bad.into();
        assert!(matches!(
            s.put_migration(&m),
            Err(StoreError::InvalidName { .. })
        ));
    }
    assert_eq!(s.migrations().unwrap().len(), 3);
    let mut m2 = other
        .migrations()
        .unwrap()
        .into_iter()
        .find(|m| m.id == "m2")
        .unwrap();
    m2.outcome = MigrationOutcome::Failed;
    m2.reason = Some("destination died".into());
    other.put_migration(&m2).unwrap();
    let ms = s.migrations().unwrap();
    assert_eq!(
        ms.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        vec!["m3", "m2", "m1"]
    );
    assert_eq!(ms[1].outcome, MigrationOutcome::Failed);
    assert_eq!(other.migration("m2").unwrap().unwrap(), m2);
    assert!(other.migration("nope").unwrap().is_none());
    let running: Vec<String> = s
        .running_migrations()
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(running, vec!["m3", "m1"]);
    assert_eq!(s.migrations_of("a", 2).unwrap().len(), 2);
    assert!(s.migrations_of("zz", 10).unwrap().is_empty());
    // Retention: finished and old records go, except the newest per VM; running ones stay.
    let mut m1 = s.migration("m1").unwrap().unwrap();
    m1.outcome = MigrationOutcome::Succeeded;
    m1.finished_ms = Some(2000);
    s.put_migration(&m1).unwrap();
    m2.finished_ms = Some(2000);
    s.put_migration(&m2).unwrap();
    // m3 (running) is the newest: keep_per_vm = 1 keeps it; m2 and m1 are old and finished.
    assert_eq!(prune_migrations(s, 10_000_000, 1_000, 1).unwrap(), 2);
    let left: Vec<String> = other
        .migrations()
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(left, vec!["m3"]);
    s.delete_migration("m3").unwrap();
    assert!(other.migrations().unwrap().is_empty());
}

#[test]
fn sqlite_backend() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("cluster.db").display());
    let a = open(&url).unwrap();
    let b = open(&url).unwrap(); // a second agent on the same machine
    suite(a.as_ref(), b.as_ref(), Duration::from_millis(600));
}

#[test]
fn bad_urls_and_spec_errors() {
    for u in ["", "postgres://x", "sqlite://", "etcd://"] {
        assert!(matches!(open(u), Err(StoreError::BadUrl(_))), "{u}");
    }
    assert!(VmSpec::from_toml("name = \"Bad Name\"\nmemory_mib = 64")
        .unwrap_err()
        .to_string()
        .contains("invalid VM name"));
    assert!(
        VmSpec::from_toml("name = \"x\"\nmemory_mib = 64\nbogus = 1")
            .unwrap_err()
            .to_string()
            .contains("bogus")
    );
    assert!(VmSpec::from_toml("name = \"x\"\nmemory_mib = 1")
        .unwrap_err()
        .to_string()
        .contains("memory must be between"));
    assert!(
        VmSpec::from_toml("name = \"x\"\nmemory_mib = 64\ncpu_profile = \"fast\"")
            .unwrap_err()
            .to_string()
            .contains("cpu_profile")
    );
    assert!(
        VmSpec::from_toml("name = \"x\"\nmemory_mib = 64\n[[disks]]\npath = \"rel.img\"")
            .unwrap_err()
            .to_string()
            .contains("absolute")
    );
    let s = VmSpec::from_toml("name = \"x\"\nmemory_mib = 64\n[[disks]]\npath = \"/shared/x.img\"\n[[nics]]\nnetwork = \"br0\"").unwrap();
    assert_eq!(
        s.storage_needed().into_iter().collect::<Vec<_>>(),
        vec!["/shared".to_string()]
    );
    assert_eq!(s.vcpus, 1);
    assert_eq!(s.kernel, "test-guest");
    assert_eq!(s.initrd, None);
    // A Linux guest: kernel + initrd paths on the nodes; an initrd needs a Linux kernel.
    let l = VmSpec::from_toml(
        "name = \"l\"\nmemory_mib = 256\nkernel = \"/k/vmlinuz\"\ninitrd = \"/k/initrd\"",
    )
    .unwrap();
    assert_eq!(l.initrd.as_deref(), Some("/k/initrd"));
    assert!(VmSpec::from_toml(
        "name = \"l\"\nmemory_mib = 256\nkernel = \"/k/vmlinuz\"\ninitrd = \"k/initrd\""
    )
    .unwrap_err()
    .to_string()
    .contains("absolute"));
    assert!(
        VmSpec::from_toml("name = \"l\"\nmemory_mib = 256\ninitrd = \"/k/initrd\"")
            .unwrap_err()
            .to_string()
            .contains("initrd")
    );
    // A spec without an initrd serializes as before (older agents read it).
    assert!(!serde_json::to_string(&s).unwrap().contains("initrd"));
}

#[test]
fn etcd_backend() {
    let e = cluster::testing::Etcd::start();
    let a: Arc<dyn Store> = open(&e.url).unwrap().into();
    let b: Arc<dyn Store> = open(&e.url).unwrap().into();
    // etcd enforces a minimum lease TTL of a couple of seconds.
    suite(a.as_ref(), b.as_ref(), Duration::from_secs(2));
}

#[test]
fn etcd_unreachable_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let s = open(&format!("etcd://127.0.0.1:{port}")).unwrap();
    let err = s.nodes().unwrap_err().to_string();
    assert!(
        err.starts_with("cluster store unavailable: etcd http://127.0.0.1:"),
        "{err}"
    );
}

/// etcd with TLS and client-certificate authentication (`etcds://`): the whole suite over it
/// with two nodes' certificates; refused, with the reason, for a client without credentials,
/// one whose certificate is of another CA, one that trusts another CA (etcd's certificate is
/// then unknown), and a plaintext client on the TLS port.
#[test]
fn etcd_over_tls_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    trust::pki::init(&pki, false).unwrap();
    for n in ["node1", "node2"] {
        trust::pki::issue(
            &pki,
            &trust::Identity::node(n).unwrap(),
            &["127.0.0.1".into()],
            1,
        )
        .unwrap();
    }
    let e = cluster::testing::Etcd::start_tls(&pki, "node1");
    assert!(e.url.starts_with("etcds://127.0.0.1:"), "{}", e.url);
    let creds = |dir: &std::path::Path, n: &str| {
        trust::tls::Credentials::load(&trust::pki::node_files(dir, n)).unwrap()
    };
    let a: Arc<dyn Store> = cluster::open_with(&e.url, Some(&creds(&pki, "node1")))
        .unwrap()
        .into();
    let b: Arc<dyn Store> = cluster::open_with(&e.url, Some(&creds(&pki, "node2")))
        .unwrap()
        .into();
    suite(a.as_ref(), b.as_ref(), Duration::from_secs(2));

    // No credentials: refused before anything is sent.
    let err = open(&e.url)
        .err()
        .expect("etcds:// without credentials")
        .to_string();
    assert!(err.contains("needs this node's certificate"), "{err}");
    // Another CA's node1, presenting its certificate (etcd refuses it) and trusting its own CA
    // (this client refuses etcd's certificate).
    let evil = dir.path().join("evil");
    trust::pki::init(&evil, false).unwrap();
    trust::pki::issue(
        &evil,
        &trust::Identity::node("node1").unwrap(),
        &["127.0.0.1".into()],
        1,
    )
    .unwrap();
    let s = cluster::open_with(&e.url, Some(&creds(&evil, "node1"))).unwrap();
    let err = s.nodes().unwrap_err().to_string();
    assert!(err.contains("not signed by this cluster's CA"), "{err}");
    let mixed = trust::tls::Credentials::load(&contract::trust::TlsFiles {
        ca: pki.join("ca.pem"),
        ..trust::pki::node_files(&evil, "node1")
    })
    .unwrap();
    let s = cluster::open_with(&e.url, Some(&mixed)).unwrap();
    let err = s.nodes().unwrap_err().to_string();
    assert!(err.contains("cluster store unavailable"), "{err}");
    assert!(
        s.nodes().is_err() && a.nodes().is_ok(),
        "etcd took a certificate of another CA"
    );
    // A client that trusts the CA but presents no certificate: etcd requires one.
    let roots = trust::api::load_roots(&pki.join("ca.pem")).unwrap();
    let anonymous = trust::https::agent(
        ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .build(),
        trust::api::client_config(roots, None, trust::api::Expect::Address).unwrap(),
        None,
    );
    let endpoint = e.url.replacen("etcds://", "https://", 1);
    let s = cluster::etcd::EtcdStore::with_agent(vec![endpoint], anonymous);
    let err = s.nodes().unwrap_err().to_string();
    assert!(err.contains("cluster store unavailable"), "{err}");
    // Plaintext to the TLS port gets no store.
    let plain = open(&e.url.replacen("etcds://", "etcd://", 1)).unwrap();
    assert!(plain.nodes().is_err(), "plaintext answered on the TLS port");
}
