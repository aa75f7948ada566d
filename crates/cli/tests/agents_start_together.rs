//! Agents of one machine that start at the same instant on one fresh SQLite store (what `ferry
//! demo` does) all come up and register their nodes: none fails with "database is locked"
//! while another one switches the new file to WAL or creates the schema.

mod common;
use common::*;
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const AGENTS: usize = 6;
/// A round takes 50-200 ms. Without waiting on a busy database at open, about one round in 30
/// to 100 lost an agent (measured on 2 cores): 100 rounds catch that nearly every time.
const ROUNDS: usize = 100;

/// A loopback address of its own for agent `i` of round `round` (127.0.0.0/8 is all loopback),
/// with a port that was free there: nothing else on the machine binds such addresses, so the
/// agent can really bind it.
fn address(round: usize, i: usize) -> String {
    let ip = format!("127.77.{}.{}", round + 1, i + 1);
    let port = std::net::TcpListener::bind(format!("{ip}:0"))
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("cannot bind {ip}: {e}"))
        .port();
    format!("{ip}:{port}")
}

fn agent_cmd(c: &Cluster, name: &str, addr: &str) -> Command {
    let log = std::fs::File::create(c.dir.path().join(format!("{name}.log"))).unwrap();
    let mut cmd = Command::new(ferry_bin());
    cmd.args([
        "agent", "--node", name, "--listen", addr, "--store", &c.store,
    ])
    .arg("--data-dir")
    .arg(c.dir.path().join(name))
    .args(["--lease-ttl-s", "3"])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::from(log));
    cmd
}

/// One round: a fresh store, `AGENTS` agents spawned together, every one healthy and its node
/// registered and alive.
fn round(round: usize) {
    let mut c = Cluster::new(false);
    assert!(
        !c.dir.path().join("cluster.db").exists(),
        "the store must be fresh"
    );
    let names: Vec<String> = (1..=AGENTS).map(|i| format!("node{i}")).collect();
    let addrs: Vec<String> = (0..AGENTS).map(|i| address(round, i)).collect();
    let mut cmds: Vec<Command> = names
        .iter()
        .zip(&addrs)
        .map(|(n, a)| agent_cmd(&c, n, a))
        .collect();
    // Release every spawn at once.
    let barrier = Arc::new(Barrier::new(AGENTS));
    let spawned: Vec<_> = cmds
        .drain(..)
        .map(|mut cmd| {
            let b = barrier.clone();
            std::thread::spawn(move || {
                b.wait();
                cmd.spawn().expect("spawn ferry agent")
            })
        })
        .collect();
    for ((t, name), addr) in spawned.into_iter().zip(&names).zip(&addrs) {
        c.agents.push(AgentProc {
            name: name.clone(),
            addr: addr.clone(),
            data_dir: c.dir.path().join(name),
            args: vec![],
            env: vec![],
            child: Some(t.join().unwrap()),
        });
    }
    // Every agent answers its health check (an agent that failed to start exits).
    let t0 = Instant::now();
    for i in 0..AGENTS {
        loop {
            let (name, addr) = (c.agents[i].name.clone(), c.agents[i].addr.clone());
            if agent::client::get::<contract::api::Health>(&addr, "/v1/health").is_ok() {
                break;
            }
            let child = c.agents[i].child.as_mut().unwrap();
            if let Some(st) = child.try_wait().unwrap() {
                panic!(
                    "round {round}: agent {name} exited ({st}): {}",
                    c.agent_log(&name)
                );
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "round {round}: agent {name} did not come up: {}",
                c.agent_log(&name)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Every node is registered and alive, seen by the store and by every agent.
    let nodes = c.store().nodes().unwrap();
    let mut got: Vec<&str> = nodes.iter().map(|n| n.info.name.as_str()).collect();
    got.sort();
    assert_eq!(got, names, "round {round}: registered nodes");
    assert!(nodes.iter().all(|n| n.alive), "round {round}: {nodes:?}");
    for n in &names {
        let v = c.get(n, "/v1/nodes");
        let text = v.to_string();
        for m in &names {
            assert!(
                text.contains(&format!("\"{m}\"")),
                "round {round}: {n} does not list {m}: {text}"
            );
        }
    }
    for n in &names {
        let log = c.agent_log(n);
        assert!(
            !log.contains("database is locked") && !log.contains("store unavailable"),
            "round {round}: {n}: {log}"
        );
    }
}

#[test]
fn agents_starting_together_on_one_fresh_sqlite_store_all_come_up() {
    for r in 0..ROUNDS {
        round(r);
    }
}
