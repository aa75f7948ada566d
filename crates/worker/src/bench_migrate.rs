//! `ferry-vmm bench --only migrate`: live migration over loopback, Ferry next to QEMU 7.2
//! migrating the same test-guest ELF with the same workloads, plus the loopback TCP limit, all
//! measured in the same run.

use crate::bench::wait_serial;
use anyhow::{anyhow, bail, Result};
use contract::MigrationParams;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use worker::api::{self, MigrateCommand, MigrateSession, Reply, Request};
use worker::qmp::Qmp;

/// One guest workload of the matrix.
#[derive(Clone, Debug)]
pub struct Workload {
    pub name: String,
    pub cmdline: String,
    /// Seconds to let the guest run before migrating.
    pub warmup: f64,
}

pub fn workloads(mem_mib: u64) -> Vec<Workload> {
    let half = mem_mib / 2;
    let w = |name: String, cmdline: String, warmup: f64| Workload {
        name,
        cmdline,
        warmup,
    };
    vec![
        w("idle".into(), "ferry.workload=idle".into(), 0.5),
        w(
            format!("{half} MiB written once"),
            format!("ferry.workload=dirty ferry.wss_mib={half} ferry.rounds=1"),
            1.0 + half as f64 / 400.0,
        ),
        w(
            "dirty 64 MiB @ 100 MiB/s".into(),
            "ferry.workload=dirty ferry.wss_mib=64 ferry.rate_mibs=100".into(),
            1.0,
        ),
        w(
            "dirty 64 MiB @ 400 MiB/s".into(),
            "ferry.workload=dirty ferry.wss_mib=64 ferry.rate_mibs=400".into(),
            1.0,
        ),
        w(
            "dirty 64 MiB @ max".into(),
            "ferry.workload=dirty ferry.wss_mib=64 ferry.rate_mibs=0".into(),
            1.0,
        ),
    ]
}

/// What one migration measured.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub total_ms: f64,
    pub downtime_ms: f64,
    pub phases: String,
    pub wire_mib: f64,
    pub passes: f64,
    pub throttle: f64,
    pub pass0_mibs: f64,
}

fn kill(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

/// Migrates a Ferry VM between two `ferry-vmm` processes (with `tls`: a PKI directory with
/// nodes `src` and `dst`, mutual TLS; without: `--insecure`).
#[allow(clippy::too_many_arguments)] // the benchmark matrix's axes, one argument each
pub fn ferry_once(
    exe: &Path,
    dir: &Path,
    mem_mib: u64,
    w: &Workload,
    streams: u16,
    compress: &str,
    max_downtime_ms: u64,
    tls: Option<&Path>,
) -> Result<Outcome> {
    let (slog, ssock) = (dir.join("fsrc.serial"), dir.join("fsrc.sock"));
    let (dlog, dsock) = (dir.join("fdst.serial"), dir.join("fdst.sock"));
    for p in [&ssock, &dsock] {
        let _ = std::fs::remove_file(p);
    }
    let src = Command::new(exe)
        .args([
            "run",
            "--kernel",
            "test-guest",
            "--vcpus",
            "1",
            "--memory-mib",
            &mem_mib.to_string(),
        ])
        .args(["--cmdline", &w.cmdline, "--serial-log"])
        .arg(&slog)
        .arg("--api-socket")
        .arg(&ssock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    // Plaintext, or mutual TLS between nodes `src` and `dst` of the PKI in `tls` with a
    // fresh one-time secret.
    let mut security: Vec<String> = Vec::new();
    let (transport, secret) = match tls {
        None => {
            security.push("--insecure".into());
            (contract::trust::Transport::Insecure, None)
        }
        Some(pki) => {
            let f = trust::pki::node_files(pki, "dst");
            let secret = trust::secret::generate()?;
            let sfile = dir.join("fdst.secret");
            std::fs::write(&sfile, secret.to_hex())?;
            for (k, v) in [
                ("--tls-cert", &f.cert),
                ("--tls-key", &f.key),
                ("--tls-ca", &f.ca),
                ("--secret-file", &sfile),
            ] {
                security.extend([k.to_string(), v.display().to_string()]);
            }
            security.extend(["--peer-node".into(), "src".into()]);
            (
                contract::trust::Transport::Tls {
                    files: trust::pki::node_files(pki, "src"),
                    peer_node: "dst".into(),
                },
                Some(secret),
            )
        }
    };
    let dst = Command::new(exe)
        .args(["receive", "--listen", "127.0.0.1:0"])
        .args(&security)
        .arg("--serial-log")
        .arg(&dlog)
        .arg("--api-socket")
        .arg(&dsock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let addr = contract::worker::receiver_address(&dsock, Duration::from_secs(30))
        .map_err(|e| anyhow!("the receiving worker: {e}"))?;
    let result = (|| -> Result<Outcome> {
        wait_serial(&slog, Duration::from_secs(30), "the guest to start", |s| {
            s.contains("\nhb ")
        })?;
        std::thread::sleep(Duration::from_secs_f64(w.warmup));
        let cmd = MigrateCommand {
            to: addr,
            params: MigrationParams {
                max_downtime_ms,
                streams,
                compression: compress.parse()?,
                max_bandwidth_mibs: None,
                timeout_s: Some(120.0),
            },
            dry_run: false,
            external_commit: false,
            handover: false,
            max_protocol: None,
            transport,
            secret,
        };
        let mut session = MigrateSession::start(&ssock, cmd)?;
        let s = loop {
            match session.next_reply()? {
                Reply::Progress(_) => continue,
                Reply::Done(s) => break s,
                other => bail!(
                    "ferry migration failed: {}",
                    other.error_text().unwrap_or_else(|| format!("{other:?}"))
                ),
            }
        };
        let d = &s.downtime;
        Ok(Outcome {
            total_ms: s.total_ms,
            downtime_ms: s.downtime_ms,
            phases: format!(
                "{:.2}/{:.2}/{:.2}/{:.2}",
                d.final_memory_ms,
                d.state_ms,
                d.commit_ms - d.resume_ms,
                d.resume_ms
            ),
            wire_mib: s.bytes_sent as f64 / (1 << 20) as f64,
            passes: s.passes as f64,
            pass0_mibs: s.pass0_mibs,
            throttle: s.max_throttle_pct as f64,
        })
    })();
    let _ = api::call(&dsock, &Request::Shutdown, Some(Duration::from_secs(5)));
    kill(src);
    kill(dst);
    result
}

fn qemu_args(elf: &Path, mem_mib: u64, cmdline: &str, serial: &Path, qmp: &Path) -> Vec<String> {
    let mut a: Vec<String> = [
        "-accel",
        "kvm",
        "-M",
        "microvm",
        "-cpu",
        "host,-arch-capabilities",
        "-smp",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(["-m".into(), format!("{mem_mib}M")]);
    a.extend(
        [
            "-no-user-config",
            "-nodefaults",
            "-nographic",
            "-display",
            "none",
            "-monitor",
            "none",
        ]
        .map(String::from),
    );
    a.extend([
        "-kernel".into(),
        elf.display().to_string(),
        "-append".into(),
        cmdline.into(),
    ]);
    a.extend(["-serial".into(), format!("file:{}", serial.display())]);
    a.extend([
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp.display()),
    ]);
    a
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Migrates the same guest between two QEMU processes, tuned for its best: no bandwidth cap,
/// the same downtime limit, auto-converge on, multifd with `channels` channels when > 1.
pub fn qemu_once(
    elf: &Path,
    dir: &Path,
    mem_mib: u64,
    w: &Workload,
    channels: u16,
    max_downtime_ms: u64,
) -> Result<Outcome> {
    let (slog, sqmp) = (dir.join("qsrc.serial"), dir.join("qsrc.qmp"));
    let (dlog, dqmp) = (dir.join("qdst.serial"), dir.join("qdst.qmp"));
    for p in [&sqmp, &dqmp, &slog] {
        let _ = std::fs::remove_file(p);
    }
    let port = free_port()?;
    let src = Command::new("qemu-system-x86_64")
        .args(qemu_args(elf, mem_mib, &w.cmdline, &slog, &sqmp))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let dst = Command::new("qemu-system-x86_64")
        .args(qemu_args(elf, mem_mib, &w.cmdline, &dlog, &dqmp))
        .args(["-incoming", "defer"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let result = (|| -> Result<Outcome> {
        let mut qs = Qmp::connect(&sqmp, || Ok(()))?;
        let mut qd = Qmp::connect(&dqmp, || Ok(()))?;
        wait_serial(&slog, Duration::from_secs(30), "the guest to start", |s| {
            s.contains("\nhb ")
        })?;
        std::thread::sleep(Duration::from_secs_f64(w.warmup));
        let mut caps = vec![json!({"capability": "auto-converge", "state": true})];
        if channels > 1 {
            caps.push(json!({"capability": "multifd", "state": true}));
        }
        for q in [&mut qs, &mut qd] {
            q.cmd("migrate-set-capabilities", json!({ "capabilities": caps }))?;
            let mut params =
                json!({"max-bandwidth": 100u64 << 30, "downtime-limit": max_downtime_ms});
            if channels > 1 {
                params["multifd-channels"] = json!(channels);
            }
            q.cmd("migrate-set-parameters", params)?;
        }
        qd.cmd(
            "migrate-incoming",
            json!({ "uri": format!("tcp:127.0.0.1:{port}") }),
        )?;
        qs.cmd("migrate", json!({ "uri": format!("tcp:127.0.0.1:{port}") }))?;
        let t0 = Instant::now();
        let info = loop {
            let i = qs.cmd("query-migrate", json!({}))?;
            match i["status"].as_str() {
                Some("completed") => break i,
                Some("failed") | Some("cancelled") => bail!("QEMU migration {}: {i}", i["status"]),
                _ => {}
            }
            if t0.elapsed() > Duration::from_secs(120) {
                bail!("QEMU migration did not finish in 120 s");
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
        Ok(Outcome {
            total_ms: f(&info, "total-time"),
            downtime_ms: f(&info, "downtime"),
            phases: "-".into(),
            wire_mib: f(&info["ram"], "transferred") / (1 << 20) as f64,
            passes: f(&info["ram"], "dirty-sync-count"),
            throttle: f(&info, "cpu-throttle-percentage"),
            pass0_mibs: 0.0,
        })
    })();
    kill(src);
    kill(dst);
    result
}

/// Loopback TCP throughput with `streams` connections, GiB/s.
pub fn loopback_tcp(streams: usize) -> Result<f64> {
    let total: usize = 2 << 30;
    let per = total / streams;
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let rx = std::thread::spawn(move || -> std::io::Result<()> {
        let mut hs = Vec::new();
        for _ in 0..streams {
            let (mut s, _) = l.accept()?;
            hs.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 20];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                }
            }));
        }
        for h in hs {
            let _ = h.join();
        }
        Ok(())
    });
    let socks: Vec<TcpStream> = (0..streams)
        .map(|_| TcpStream::connect(addr))
        .collect::<std::io::Result<_>>()?;
    let t0 = Instant::now();
    let hs: Vec<_> = socks
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || {
                let buf = vec![0x5au8; 1 << 20];
                let mut sent = 0;
                while sent < per {
                    if s.write_all(&buf).is_err() {
                        break;
                    }
                    sent += buf.len();
                }
            })
        })
        .collect();
    for h in hs {
        let _ = h.join();
    }
    let _ = rx.join();
    Ok(total as f64 / t0.elapsed().as_secs_f64() / (1u64 << 30) as f64)
}

fn row(label: &str, o: &Result<Outcome>) -> String {
    match o {
        Ok(o) => format!(
            "| {label} | {:.0} | {:.2} | {} | {:.1} | {:.0} | {:.0} | {} |",
            o.total_ms,
            o.downtime_ms,
            o.phases,
            o.wire_mib,
            o.passes,
            o.throttle,
            if o.pass0_mibs > 0.0 {
                format!("{:.0}", o.pass0_mibs)
            } else {
                "–".into()
            }
        ),
        Err(e) => format!(
            "| {label} | failed: {} | | | | | | |",
            e.to_string().replace('|', "/")
        ),
    }
}

fn ratio(a: &Result<Outcome>, b: &Result<Outcome>, f: impl Fn(&Outcome) -> f64) -> String {
    match (a, b) {
        (Ok(a), Ok(b)) if f(b) > 0.0 => format!("{:.2}", f(a) / f(b)),
        (Ok(_), Ok(_)) => "n/a (QEMU 0)".into(),
        _ => "-".into(),
    }
}

/// Runs the migration matrix and prints Markdown.
pub fn run(dir: &Path, sizes: &[u64], max_downtime_ms: u64) -> Result<()> {
    let exe = std::env::current_exe()?;
    let elf: PathBuf = dir.join("ferry-guest.elf");
    std::fs::write(&elf, guest::ELF)?;
    let have_qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok();
    println!("## Live migration over loopback (1 vCPU test guest, downtime limit {max_downtime_ms} ms for both)\n");
    let t1 = loopback_tcp(1)?;
    let t4 = loopback_tcp(4)?;
    println!("Loopback TCP, measured in this run: **{t1:.2} GiB/s** with 1 stream, **{t4:.2} GiB/s** with 4 streams.\n");
    println!("{}\n", guest_ram_note());
    println!("Ferry columns: downtime phases = final memory / state / commit / resume (ms). QEMU: `-M microvm`, auto-converge, max-bandwidth 100 GiB/s, multifd with 4 channels for the 4-stream rows.\n");
    for &mem in sizes {
        let size = if mem >= 1024 {
            format!("{} GiB", mem / 1024)
        } else {
            format!("{mem} MiB")
        };
        println!("### {size} guest\n");
        println!("| run | total ms | downtime ms | downtime phases | wire MiB | passes | max throttle % | pass 0 MiB/s |");
        println!("|---|---|---|---|---|---|---|---|");
        let mut ratios = Vec::new();
        for w in workloads(mem) {
            let f1 = ferry_once(&exe, dir, mem, &w, 1, "none", max_downtime_ms, None);
            println!("{}", row(&format!("{}: Ferry 1 stream", w.name), &f1));
            let f4 = ferry_once(&exe, dir, mem, &w, 4, "none", max_downtime_ms, None);
            println!("{}", row(&format!("{}: Ferry 4 streams", w.name), &f4));
            let fl = ferry_once(&exe, dir, mem, &w, 1, "lz4", max_downtime_ms, None);
            println!("{}", row(&format!("{}: Ferry 1 stream lz4", w.name), &fl));
            let fz = ferry_once(&exe, dir, mem, &w, 4, "zstd", max_downtime_ms, None);
            println!("{}", row(&format!("{}: Ferry 4 streams zstd", w.name), &fz));
            if have_qemu {
                let q1 = qemu_once(&elf, dir, mem, &w, 1, max_downtime_ms);
                println!("{}", row(&format!("{}: QEMU", w.name), &q1));
                let q4 = qemu_once(&elf, dir, mem, &w, 4, max_downtime_ms);
                println!("{}", row(&format!("{}: QEMU multifd 4", w.name), &q4));
                ratios.push(format!(
                    "| {} | {} | {} | {} | {} |",
                    w.name,
                    ratio(&f1, &q1, |o| o.total_ms),
                    ratio(&f1, &q1, |o| o.downtime_ms),
                    ratio(&f4, &q4, |o| o.total_ms),
                    ratio(&f4, &q4, |o| o.downtime_ms)
                ));
            }
        }
        if !ratios.is_empty() {
            println!("\nFerry/QEMU ratios ({size}; below 1 = Ferry better):\n");
            println!("| workload | total, 1 stream | downtime, 1 stream | total, 4 streams | downtime, 4 streams |");
            println!("|---|---|---|---|---|");
            for r in ratios {
                println!("{r}");
            }
        }
        println!();
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// `ferry-vmm bench --only migrate-tls`: the same migrations with mutual TLS and in plaintext,
/// interleaved in one run (`reps` of each, medians), 1 and 4 streams, per guest size.
pub fn run_tls(dir: &Path, sizes: &[u64], reps: usize, max_downtime_ms: u64) -> Result<()> {
    let exe = std::env::current_exe()?;
    let pki = dir.join("bench-pki");
    trust::pki::init(&pki, true)?;
    for n in ["src", "dst"] {
        trust::pki::issue(&pki, &trust::Identity::node(n)?, &["127.0.0.1".into()], 1)?;
    }
    println!("## Migration with mutual TLS against plaintext (same run, loopback)\n");
    println!("1 vCPU test guest, downtime limit {max_downtime_ms} ms, no compression; TLS 1.3 (rustls, ring) on the control and every data connection, both node identities checked, one-time secret. Medians of {reps} runs each, TLS and plaintext interleaved.\n");
    for &mem in sizes {
        let size = if mem >= 1024 {
            format!("{} GiB", mem / 1024)
        } else {
            format!("{mem} MiB")
        };
        println!("### {size} guest\n");
        println!(
            "| workload | streams | transport | total ms | downtime ms | pass-0 MiB/s | passes |"
        );
        println!("|---|---|---|---|---|---|---|");
        let mut cost = Vec::new();
        for w in workloads(mem).into_iter().take(2) {
            for streams in [1u16, 4] {
                let (mut plain, mut tls) = (Vec::new(), Vec::new());
                for _ in 0..reps {
                    for (secure, out) in [(false, &mut plain), (true, &mut tls)] {
                        let pk = secure.then_some(pki.as_path());
                        match ferry_once(&exe, dir, mem, &w, streams, "none", max_downtime_ms, pk) {
                            Ok(o) => out.push(o),
                            Err(e) => eprintln!("{} {streams} streams tls={secure}: {e:#}", w.name),
                        }
                    }
                }
                let med = |v: &[Outcome], f: fn(&Outcome) -> f64| median(v.iter().map(f).collect());
                let row = |label: &str, v: &[Outcome]| {
                    println!(
                        "| {} | {streams} | {label} | {:.0} | {:.2} | {:.0} | {:.0} |",
                        w.name,
                        med(v, |o| o.total_ms),
                        med(v, |o| o.downtime_ms),
                        med(v, |o| o.pass0_mibs),
                        med(v, |o| o.passes),
                    );
                };
                row("plaintext", &plain);
                row("mTLS", &tls);
                cost.push(format!(
                    "| {} | {streams} | {:+.1} % | {:+.2} ms | {:+.1} % |",
                    w.name,
                    (med(&tls, |o| o.total_ms) / med(&plain, |o| o.total_ms) - 1.0) * 100.0,
                    med(&tls, |o| o.downtime_ms) - med(&plain, |o| o.downtime_ms),
                    (med(&tls, |o| o.pass0_mibs) / med(&plain, |o| o.pass0_mibs) - 1.0) * 100.0,
                ));
            }
        }
        println!("\nWhat TLS costs ({size}):\n");
        println!("| workload | streams | total time | downtime | pass-0 throughput |");
        println!("|---|---|---|---|---|");
        for c in cost {
            println!("{c}");
        }
        println!();
    }
    Ok(())
}

/// What backs Ferry's guest RAM in this run (`vmm::memory`: 2 MiB pages while the hugetlb
/// pool holds the guest, else a 4 KiB-page memfd that asks for transparent huge pages;
/// `FERRY_HUGEPAGES=never` forces 4 KiB, `thp` skips the pool).
fn guest_ram_note() -> String {
    let thp = if vmm::memory::shmem_thp_available() {
        "transparent huge pages (2 MiB while the kernel has free blocks)"
    } else {
        "4 KiB pages (this kernel gives shared memory no transparent huge pages)"
    };
    use vmm::memory::HugePages;
    match HugePages::from_env() {
        HugePages::Never => "Ferry's guest RAM: 4 KiB pages (FERRY_HUGEPAGES=never).".into(),
        HugePages::ThpOnly => format!(
            "Ferry's guest RAM: {thp}; the hugetlb pool is not used (FERRY_HUGEPAGES=thp)."
        ),
        HugePages::Any => format!(
            "Ferry's guest RAM: 2 MiB huge pages while the pool holds a guest ({} MiB free at the start; both sides of a migration draw on it), else {thp}.",
            vmm::host::huge_pages_free_mib()
        ),
    }
}
