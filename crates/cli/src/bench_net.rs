//! `ferry bench-net`: the network-visible downtime of live migrations, measured from outside
//! the VM, next to the downtime the engine reports, with QEMU measured the same way in the
//! same run.
//!
//! It builds the network-namespace test bed (`agent::testbed`: two nodes with their agents,
//! bridges and TAPs, a switch, a client), boots a `net-echo` test-guest VM and live-migrates it
//! back and forth while `ferry netprobe` in the client namespace sends an ICMP echo and a UDP
//! echo every interval and verifies every reply. Per migration it records the probes lost and
//! the longest gap between two consecutive replies; the *outage* is that gap minus the
//! interval (the time the VM was unreachable beyond the normal spacing of replies). Scenarios:
//! an idle VM; a VM whose other vCPU dirties memory (`ferry.load_mib`); an idle VM under a
//! second probe stream at 1 ms with 1 KiB payloads (network load). QEMU (`-M microvm`, the
//! same guest ELF, virtio-net on a TAP on the same bridges, its own migration and
//! self-announce) runs the same idle and memory-load scenarios.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use testbed::bed::{vm_ip, Testbed};
use testbed::netprobe::ProbeReport;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub migrations: usize,
    pub interval_ms: u64,
    pub qemu: bool,
    /// Write the report (Markdown) here too.
    pub report: Option<PathBuf>,
}

/// One measured migration.
#[derive(Debug, Clone)]
pub struct Row {
    pub system: &'static str,
    pub scenario: &'static str,
    pub from: String,
    pub to: String,
    /// Downtime the migration engine reports (Ferry: pause -> resumed, by phase; QEMU:
    /// query-migrate "downtime").
    pub downtime_ms: Option<f64>,
    pub total_ms: f64,
    pub probe: ProbeReport,
}

impl Row {
    fn outage_ms(&self, interval: f64) -> f64 {
        let udp = self.probe.udp.as_ref().map(|u| u.max_gap_ms).unwrap_or(0.0);
        (self.probe.icmp.max_gap_ms.max(udp) - interval).max(0.0)
    }
    fn lost(&self) -> u64 {
        self.probe.icmp.lost + self.probe.udp.as_ref().map(|u| u.lost).unwrap_or(0)
    }
    fn corrupt(&self) -> u64 {
        self.probe.icmp.corrupt + self.probe.udp.as_ref().map(|u| u.corrupt).unwrap_or(0)
    }
}

struct Scenario {
    name: &'static str,
    memory_mib: u64,
    vcpus: u32,
    extra_cmdline: &'static str,
    /// A second prober at 1 ms with 1 KiB payloads runs during the whole scenario.
    flood: bool,
    qemu: bool,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "idle",
        memory_mib: 256,
        vcpus: 1,
        extra_cmdline: "",
        flood: false,
        qemu: true,
    },
    Scenario {
        name: "memory load (vCPU 1 dirties 64 MiB at 200 MiB/s)",
        memory_mib: 256,
        vcpus: 2,
        extra_cmdline: "ferry.load_mib=64 ferry.rate_mibs=200",
        flood: false,
        qemu: true,
    },
    Scenario {
        name: "network load (+1 ms probe stream, 1 KiB)",
        memory_mib: 256,
        vcpus: 1,
        extra_cmdline: "",
        flood: true,
        qemu: false,
    },
];

/// Runs the benchmark and prints (and optionally writes) the report.
pub fn run(opts: &Options) -> Result<()> {
    if !Path::new("/dev/kvm").exists() {
        bail!("/dev/kvm is missing: the benchmark needs KVM");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench-net builds network namespaces, bridges and TAPs: run it as root");
    }
    if opts.migrations == 0 || opts.interval_ms == 0 {
        bail!("--migrations and --interval-ms must be at least 1");
    }
    let ferry = std::env::current_exe().context("cannot find the ferry binary")?;
    let dir = tempdir()?;
    let result = run_in(opts, &ferry, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    let rows = result?;
    let report = report(opts, &rows);
    print!("{report}");
    if let Some(p) = &opts.report {
        std::fs::write(p, &report).with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}

fn tempdir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!(
        "ferry-bench-net-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn run_in(opts: &Options, ferry: &Path, dir: &Path) -> Result<Vec<Row>> {
    let mut tb = Testbed::create(dir, 2).context("cannot build the test bed")?;
    for n in ["n1", "n2"] {
        tb.start_agent(n, ferry, &[])?;
    }
    let mut rows = Vec::new();
    for (k, sc) in SCENARIOS.iter().enumerate() {
        eprintln!("bench-net: Ferry, {}", sc.name);
        rows.extend(ferry_scenario(&tb, ferry, opts, sc, k)?);
    }
    if opts.qemu {
        let elf = dir.join("guest.elf");
        let vmm = ferry.with_file_name("ferry-vmm");
        let st = std::process::Command::new(&vmm)
            .arg("export-guest")
            .arg(&elf)
            .status()
            .with_context(|| format!("cannot run {}", vmm.display()))?;
        if !st.success() {
            bail!("ferry-vmm export-guest failed");
        }
        for (k, sc) in SCENARIOS.iter().enumerate().filter(|(_, s)| s.qemu) {
            eprintln!("bench-net: QEMU, {}", sc.name);
            let ip = vm_ip(20 + k);
            let cmdline = format!("ferry.workload=net-echo ferry.ip={ip} {}", sc.extra_cmdline);
            let runs = crate::bench_net_qemu::run(
                &tb,
                ferry,
                &elf,
                cmdline.trim(),
                &format!("02:f6:00:00:00:{:02x}", 0x20 + k),
                sc.memory_mib,
                sc.vcpus,
                "n1",
                "n2",
                opts.migrations,
                opts.interval_ms,
            )
            .with_context(|| format!("QEMU, {}", sc.name))?;
            for (i, r) in runs.into_iter().enumerate() {
                let (from, to) = if i % 2 == 0 {
                    ("n1", "n2")
                } else {
                    ("n2", "n1")
                };
                rows.push(Row {
                    system: "QEMU",
                    scenario: sc.name,
                    from: from.into(),
                    to: to.into(),
                    downtime_ms: r.downtime_ms,
                    total_ms: r.total_ms,
                    probe: r.probe,
                });
            }
        }
    }
    tb.stop_all();
    Ok(rows)
}

fn ferry_scenario(
    tb: &Testbed,
    ferry: &Path,
    opts: &Options,
    sc: &Scenario,
    k: usize,
) -> Result<Vec<Row>> {
    let name = format!("bench{k}");
    let ip = vm_ip(10 + k);
    let toml = format!(
        "name = \"{name}\"\nmemory_mib = {}\nvcpus = {}\ncmdline = \"ferry.workload=net-echo ferry.ip={ip} {}\"\n[[nics]]\nnetwork = \"lan\"\n",
        sc.memory_mib, sc.vcpus, sc.extra_cmdline
    );
    tb.post("n1", "/v1/vms", json!({ "toml": toml, "node": "n1" }))?;
    tb.post("n1", &format!("/v1/vms/{name}/start"), json!({}))?;
    wait_for(&tb.serial("n1", &name), "net up", Duration::from_secs(30))?;
    let flood_stop = tb.dir.join(format!("{name}.flood.stop"));
    let flood = if sc.flood {
        let c = Testbed::command_in(&tb.client_ns, ferry)
            .args(["--output", "json", "netprobe", &ip, "--udp-port", "7"])
            .args(["--interval-ms", "1", "--payload", "1024", "--stop-file"])
            .arg(&flood_stop)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("cannot start the load stream")?;
        Some(c)
    } else {
        None
    };
    // Let ARP settle and the load (if any) reach its steady state.
    std::thread::sleep(Duration::from_millis(1000));
    let mut rows = Vec::new();
    let mut at = "n1";
    for i in 0..opts.migrations {
        let to = if at == "n1" { "n2" } else { "n1" };
        let stop = tb.dir.join(format!("{name}.{i}.stop"));
        let probe = tb.start_probe(ferry, &ip, opts.interval_ms, &stop)?;
        std::thread::sleep(Duration::from_millis(1000));
        let t0 = Instant::now();
        let m = tb.migrate(at, &name, to);
        let wall = t0.elapsed();
        std::thread::sleep(Duration::from_millis(1000));
        let report = tb.stop_probe(probe, &stop)?;
        let m = m.map_err(|e| anyhow!("{name} {at} -> {to}: {e}"))?;
        rows.push(Row {
            system: "Ferry",
            scenario: sc.name,
            from: at.into(),
            to: to.into(),
            downtime_ms: m.summary.as_ref().map(|s| s.downtime_ms),
            total_ms: m
                .summary
                .as_ref()
                .map(|s| s.total_ms)
                .unwrap_or(wall.as_secs_f64() * 1e3),
            probe: report,
        });
        at = to;
    }
    if let Some(c) = flood {
        std::fs::write(&flood_stop, b"stop")?;
        let out = c.wait_with_output()?;
        let r: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        eprintln!(
            "bench-net: load stream: {} ICMP + {} UDP probes sent, {} + {} lost",
            r["icmp"]["sent"], r["udp"]["sent"], r["icmp"]["lost"], r["udp"]["lost"]
        );
    }
    tb.post(at, &format!("/v1/vms/{name}/stop"), json!({}))?;
    Ok(rows)
}

fn wait_for(log: &Path, what: &str, timeout: Duration) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let s = std::fs::read_to_string(log).unwrap_or_default();
        if s.contains(what) {
            return Ok(());
        }
        if let Some(p) = s.lines().find(|l| l.starts_with("PANIC")) {
            bail!("the guest failed: {p}");
        }
        if t0.elapsed() > timeout {
            bail!("no {what:?} in {} after {timeout:?}", log.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into())
}

/// The Markdown report: a summary per system and scenario, ratios Ferry/QEMU, then every
/// migration.
pub fn report(opts: &Options, rows: &[Row]) -> String {
    let iv = opts.interval_ms as f64;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "## Network-visible downtime ({} migrations per scenario, probes every {} ms)\n",
        opts.migrations, opts.interval_ms
    );
    let _ = writeln!(
        o,
        "| system | scenario | engine downtime ms (median) | outage ms (median) | outage ms (max) | probes lost (total) | corrupt | migration ms (median) |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|");
    let mut summary: Vec<(&str, &str, f64, u64)> = Vec::new();
    for sys in ["Ferry", "QEMU"] {
        for sc in SCENARIOS {
            let rs: Vec<&Row> = rows
                .iter()
                .filter(|r| r.system == sys && r.scenario == sc.name)
                .collect();
            if rs.is_empty() {
                continue;
            }
            let outages: Vec<f64> = rs.iter().map(|r| r.outage_ms(iv)).collect();
            let down = median(rs.iter().filter_map(|r| r.downtime_ms).collect());
            let lost: u64 = rs.iter().map(|r| r.lost()).sum();
            let med = median(outages.clone());
            let _ = writeln!(
                o,
                "| {sys} | {} | {down:.1} | {med:.1} | {:.1} | {lost} | {} | {:.0} |",
                sc.name,
                outages.iter().cloned().fold(0.0, f64::max),
                rs.iter().map(|r| r.corrupt()).sum::<u64>(),
                median(rs.iter().map(|r| r.total_ms).collect()),
            );
            summary.push((sys, sc.name, med, lost));
        }
    }
    let ratios: Vec<String> = SCENARIOS
        .iter()
        .filter_map(|sc| {
            let f = summary.iter().find(|s| s.0 == "Ferry" && s.1 == sc.name)?;
            let q = summary.iter().find(|s| s.0 == "QEMU" && s.1 == sc.name)?;
            Some(format!(
                "| {} | {:.2} | {} / {} |",
                sc.name,
                f.2 / q.2,
                f.3,
                q.3
            ))
        })
        .collect();
    if !ratios.is_empty() {
        let _ = writeln!(
            o,
            "\n| scenario | **outage Ferry / QEMU** (medians) | probes lost Ferry / QEMU |\n|---|---|---|"
        );
        for r in ratios {
            let _ = writeln!(o, "{r}");
        }
    }
    let _ = writeln!(
        o,
        "\nOutage = longest gap between two consecutive replies (ICMP or UDP) minus the probe interval; the goal is an outage below one interval, i.e. no probe lost.\n"
    );
    let _ = writeln!(
        o,
        "| system | scenario | move | engine downtime ms | ICMP lost | ICMP gap ms | UDP lost | UDP gap ms | migration ms |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let u = r.probe.udp.clone().unwrap_or_default();
        let _ = writeln!(
            o,
            "| {} | {} | {} → {} | {} | {} | {:.1} | {} | {:.1} | {:.0} |",
            r.system,
            r.scenario,
            r.from,
            r.to,
            fmt_opt(r.downtime_ms),
            r.probe.icmp.lost,
            r.probe.icmp.max_gap_ms,
            u.lost,
            u.max_gap_ms,
            r.total_ms
        );
    }
    o
}
