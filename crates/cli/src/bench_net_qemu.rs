//! The QEMU side of `ferry bench-net`: the same test guest (`ferry.workload=net-echo`) booted
//! under QEMU 7.2 (`-M microvm`) with a virtio-net NIC on a TAP of a test-bed node's `br0`,
//! live-migrated with QEMU's own migration to a QEMU in another node's namespace and back,
//! while `ferry netprobe` in the client namespace pings and UDP-echoes it through the switch.
//!
//! Machine: `-M microvm,acpi=off -cpu host,-arch-capabilities` (plain `-cpu host` aborts on
//! some AMD hosts) and `-global virtio-mmio.force-legacy=false`. The guest finds its devices
//! only through `virtio_mmio.device=<size>@<base>:<irq>` entries of its command line: microvm
//! appends one for every populated virtio-mmio transport by itself (`auto-kernel-cmdline`,
//! the default), but only with `acpi=off` (otherwise the guest PANICs with "no virtio net
//! device (0 virtio_mmio.device entries ...)"); and microvm's transports are legacy
//! (version 1) unless `force-legacy=false` (otherwise the guest refuses the device). With
//! both, the guest reports `virtio-net base=0xfeb00e00 irq=12 ...` and `net up mac=.. ip=..`.
//!
//! Announcements: QEMU's defaults are kept (`announce-initial` 50 ms, `announce-max` 550 ms,
//! `announce-rounds` 5, `announce-step` 100 ms). The guest does not negotiate
//! `VIRTIO_NET_F_GUEST_ANNOUNCE`, so the destination QEMU sends the RARP announcements (from the
//! NIC's MAC) itself: the first one as soon as the incoming migration completes, then 4 more at
//! 50, 150, 250 and 350 ms later. The switch learns the VM's new port from the first one that
//! arrives. The guest itself sends one gratuitous ARP, at boot only.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use testbed::bed::Testbed;
use testbed::netprobe::ProbeReport;
use worker::qmp::Qmp;

/// One QEMU live migration of the benchmark.
#[derive(Debug, Clone)]
pub struct QemuNetRun {
    /// QEMU's reported downtime (query-migrate "downtime"), ms.
    pub downtime_ms: Option<f64>,
    /// QEMU's reported total migration time, ms.
    pub total_ms: f64,
    /// The prober's report covering this one migration (started ~1 s before, stopped ~1 s after).
    pub probe: ProbeReport,
}

/// The downtime limit given to QEMU (`downtime-limit`), ms.
const DOWNTIME_LIMIT_MS: u64 = 50;
/// `max-bandwidth` given to QEMU, bytes/s: effectively no cap.
const MAX_BANDWIDTH: u64 = 100 << 30;
/// First TCP port the destination QEMUs listen on (one more per migration).
const BASE_PORT: u16 = 4444;
/// How long the prober runs before the migration starts and after it completed.
const PROBE_MARGIN: Duration = Duration::from_secs(1);
/// How long one migration may take.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);

/// Tells the TAPs and files of concurrent runs apart.
static SEQ: AtomicU32 = AtomicU32::new(0);

/// One QEMU process in a node's namespace with its TAP on the node's `br0`. Dropping it kills
/// QEMU and deletes the TAP.
struct Qemu {
    node: String,
    netns: String,
    tap: String,
    serial: PathBuf,
    stderr: PathBuf,
    child: Option<Child>,
    qmp: Option<Qmp>,
}

/// What every QEMU of a run shares.
struct Spec<'a> {
    guest_elf: &'a Path,
    cmdline: &'a str,
    mac: &'a str,
    memory_mib: u64,
    vcpus: u32,
    dir: PathBuf,
    run: u32,
}

fn ip_cmd(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Qemu {
    /// Creates a TAP on node `node`'s `br0` and starts QEMU in the node's namespace on it;
    /// `incoming`: waits for a migration (`-incoming defer`) instead of booting the guest.
    fn start(tb: &Testbed, spec: &Spec, node: &str, k: usize, incoming: bool) -> Result<Qemu> {
        let netns = tb.node(node).netns.clone();
        let tag = format!("{}-{k}-{node}", spec.run);
        let mut q = Qemu {
            node: node.to_string(),
            netns,
            tap: format!("fyq{}t{k}", spec.run % 10_000),
            serial: spec.dir.join(format!("{tag}.serial")),
            stderr: spec.dir.join(format!("{tag}.stderr")),
            child: None,
            qmp: None,
        };
        let qmp = spec.dir.join(format!("{tag}.qmp"));
        for p in [&q.serial, &q.stderr, &qmp] {
            let _ = std::fs::remove_file(p);
        }
        ip_cmd(&[
            "-n", &q.netns, "tuntap", "add", "name", &q.tap, "mode", "tap",
        ])
        .with_context(|| format!("cannot create TAP {} on {node}", q.tap))?;
        // From here on, Drop deletes the TAP (and kills QEMU once there is one).
        ip_cmd(&["-n", &q.netns, "link", "set", &q.tap, "master", "br0", "up"])?;
        let mut cmd = Testbed::command_in(&q.netns, Path::new("qemu-system-x86_64"));
        cmd.args(["-accel", "kvm", "-M", "microvm,acpi=off"])
            .args(["-cpu", "host,-arch-capabilities"])
            .args(["-smp", &spec.vcpus.to_string()])
            .args(["-m", &format!("{}M", spec.memory_mib)])
            .args(["-no-user-config", "-nodefaults", "-nographic"])
            .args(["-display", "none", "-monitor", "none"])
            .args(["-global", "virtio-mmio.force-legacy=false"])
            .arg("-kernel")
            .arg(spec.guest_elf)
            .args(["-append", spec.cmdline])
            .args(["-serial", &format!("file:{}", q.serial.display())])
            .args([
                "-qmp",
                &format!("unix:{},server=on,wait=off", qmp.display()),
            ])
            .args([
                "-netdev",
                &format!(
                    "tap,id=n0,ifname={},script=no,downscript=no,vhost=off",
                    q.tap
                ),
            ])
            .args([
                "-device",
                &format!("virtio-net-device,netdev=n0,mac={}", spec.mac),
            ]);
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
        let err = std::fs::File::create(&q.stderr)?;
        q.child = Some(
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(err))
                .spawn()
                .context("cannot start qemu-system-x86_64")?,
        );
        let qmp = Qmp::connect(&qmp, || q.check_alive().map_err(|e| e.to_string()))
            .with_context(|| format!("QEMU on {node}: {}", q.stderr_text()))?;
        q.qmp = Some(qmp);
        // The same tuning on both sides, like `ferry-vmm bench --only migrate`.
        q.cmd(
            "migrate-set-capabilities",
            json!({ "capabilities": [{ "capability": "auto-converge", "state": true }] }),
        )?;
        q.cmd(
            "migrate-set-parameters",
            json!({ "max-bandwidth": MAX_BANDWIDTH, "downtime-limit": DOWNTIME_LIMIT_MS }),
        )?;
        Ok(q)
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr)
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// Fails if QEMU exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            bail!(
                "QEMU on {} exited ({st}): {}",
                self.node,
                self.stderr_text()
            );
        }
        Ok(())
    }

    fn cmd(&mut self, name: &str, args: Value) -> Result<Value> {
        let node = self.node.clone();
        self.qmp
            .as_mut()
            .ok_or_else(|| anyhow!("no QMP connection"))?
            .cmd(name, args)
            .with_context(|| format!("QEMU on {node}"))
    }

    /// Waits until the guest's serial log holds `net up` (fails on a PANIC line, if QEMU
    /// exits, or after `timeout`).
    fn wait_net_up(&mut self, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        loop {
            let s = std::fs::read_to_string(&self.serial).unwrap_or_default();
            if s.lines().any(|l| l.starts_with("net up ")) {
                return Ok(());
            }
            if let Some(l) = s.lines().find(|l| l.contains("PANIC")) {
                bail!("the guest under QEMU panicked: {l}");
            }
            self.check_alive()?;
            if t0.elapsed() > timeout {
                bail!(
                    "the guest under QEMU did not bring its network up in {timeout:?}; serial: {}",
                    s.trim()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Heartbeat lines (`hb ...`) the guest printed to this QEMU's serial log (a destination's
    /// log holds only what the guest printed after it resumed there).
    fn heartbeats(&self) -> (usize, String) {
        let s = std::fs::read_to_string(&self.serial).unwrap_or_default();
        let n = s.lines().filter(|l| l.starts_with("hb ")).count();
        let tail: Vec<&str> = s.lines().rev().take(4).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        (n, tail.join(" | "))
    }

    /// Asks QEMU to quit, waits up to 5 s, then kills it; deletes the TAP.
    fn quit(mut self) {
        if self.qmp.is_some() {
            let _ = self.cmd("quit", json!({}));
        }
        if let Some(c) = self.child.as_mut() {
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(5) {
                if c.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // Drop kills it if it is still there and deletes the TAP.
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.qmp = None;
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = ip_cmd(&["-n", &self.netns, "link", "del", &self.tap]);
    }
}

/// A running prober; dropping it without [`Probe::finish`] stops and reaps it.
struct Probe<'a> {
    tb: &'a Testbed,
    child: Option<Child>,
    stop: PathBuf,
}

impl<'a> Probe<'a> {
    fn start(
        tb: &'a Testbed,
        ferry: &Path,
        target: &str,
        interval_ms: u64,
        stop: PathBuf,
    ) -> Result<Probe<'a>> {
        let _ = std::fs::remove_file(&stop);
        let child = tb.start_probe(ferry, target, interval_ms, &stop)?;
        Ok(Probe {
            tb,
            child: Some(child),
            stop,
        })
    }

    fn finish(mut self) -> Result<ProbeReport> {
        let child = self.child.take().expect("the prober runs");
        self.tb.stop_probe(child, &self.stop)
    }
}

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = std::fs::write(&self.stop, b"stop");
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Pings `target` from the client namespace until it answers (ARP resolved, path through the
/// switch learned), for up to `timeout`, with Ferry's own ICMP prober on a thread that joined
/// the client namespace (no external `ping`). Not being able to probe at all (the namespace
/// cannot be entered, no raw socket) is a different error from a guest that does not answer.
fn wait_reachable(tb: &Testbed, target: &str, timeout: Duration) -> Result<()> {
    let ip: std::net::Ipv4Addr = target
        .parse()
        .with_context(|| format!("the guest address {target:?} is not an IPv4 address"))?;
    let answered = testbed::bed::in_netns(&tb.client_ns, move || {
        testbed::netprobe::wait_echo(ip, Duration::from_millis(50), timeout)
    })
    .with_context(|| {
        format!(
            "cannot probe {target}: cannot enter the client namespace {}",
            tb.client_ns
        )
    })?
    .with_context(|| {
        format!(
            "cannot probe {target} from the client namespace (no raw ICMP socket; it needs root)"
        )
    })?;
    if answered.is_none() {
        bail!(
            "the guest under QEMU ({target}) does not answer pings (ICMP echo) from the client \
             namespace in {timeout:?}"
        );
    }
    Ok(())
}

/// Migrates `src` into `dst` (which waits with `-incoming defer` on node `dst_ip`), port
/// `port`; returns QEMU's (downtime, total time) in ms.
fn migrate(src: &mut Qemu, dst: &mut Qemu, dst_ip: &str, port: u16) -> Result<(Option<f64>, f64)> {
    let uri = format!("tcp:{dst_ip}:{port}");
    dst.cmd("migrate-incoming", json!({ "uri": uri }))?;
    src.cmd("migrate", json!({ "uri": uri }))?;
    let t0 = Instant::now();
    let info = loop {
        let i = src.cmd("query-migrate", json!({}))?;
        match i["status"].as_str() {
            Some("completed") => break i,
            Some(s @ ("failed" | "cancelled")) => bail!(
                "QEMU migration {} -> {} {s}: {}",
                src.node,
                dst.node,
                i.get("error-desc").unwrap_or(&i)
            ),
            _ => {}
        }
        if t0.elapsed() > MIGRATION_TIMEOUT {
            let _ = src.cmd("migrate_cancel", json!({}));
            bail!(
                "QEMU migration {} -> {} did not finish in {MIGRATION_TIMEOUT:?}: {i}",
                src.node,
                dst.node
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // The destination resumes the guest by itself (no -S); make sure it did.
    let t1 = Instant::now();
    loop {
        let st = dst.cmd("query-status", json!({}))?;
        if st["status"] == "running" {
            break;
        }
        if t1.elapsed() > Duration::from_secs(10) {
            bail!("the guest on {} did not resume: {st}", dst.node);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let total = info["total-time"]
        .as_f64()
        .ok_or_else(|| anyhow!("query-migrate without total-time: {info}"))?;
    Ok((info["downtime"].as_f64(), total))
}

/// The guest's address: `ferry.ip=` of its command line.
fn guest_ip(cmdline: &str) -> Result<String> {
    cmdline
        .split_whitespace()
        .find_map(|t| t.strip_prefix("ferry.ip="))
        .map(String::from)
        .ok_or_else(|| anyhow!("the guest command line has no ferry.ip= ({cmdline:?})"))
}

/// Boots the test guest under QEMU on node `from`, then live-migrates it `migrations` times,
/// ping-ponging between `from` and `to` (from->to, to->from, ...), each time with a fresh
/// prober (`interval_ms`) in the client namespace running from ~1 s before the migration to
/// ~1 s after it completed. Per move: the destination QEMU starts in the target node's
/// namespace with its own TAP on that node's `br0` (`-incoming defer`, then `migrate-incoming
/// tcp:<node ip>:<port>`); both sides get auto-converge, `downtime-limit` 50 ms and no
/// bandwidth cap; the source migrates, is polled with `query-migrate` until completed (a failed
/// migration is an error), then quits and its TAP is deleted.
///
/// `cmdline` is the full guest command line (it must hold `ferry.ip=`; QEMU appends the
/// `virtio_mmio.device=` entries), `mac` the NIC's MAC. Files (serial logs, QEMU stderr, QMP
/// sockets) go to `<tb.dir>/qemu-net`. A guest that prints no heartbeat in the second after it
/// resumed on a destination is an error (checked when `ferry.hb_ms` <= 500). Every QEMU and TAP
/// is gone when this returns, on errors too.
#[allow(clippy::too_many_arguments)]
pub fn run(
    tb: &Testbed,
    ferry: &Path,
    guest_elf: &Path,
    cmdline: &str,
    mac: &str,
    memory_mib: u64,
    vcpus: u32,
    from: &str,
    to: &str,
    migrations: usize,
    interval_ms: u64,
) -> Result<Vec<QemuNetRun>> {
    let target = guest_ip(cmdline)?;
    let hb_ms: u64 = cmdline
        .split_whitespace()
        .find_map(|t| t.strip_prefix("ferry.hb_ms="))
        .map_or(Ok(100), str::parse)
        .context("ferry.hb_ms")?;
    // Fail early (instead of panicking in Testbed::node) on unknown nodes.
    for n in [from, to] {
        if !tb.nodes.iter().any(|x| x.name == n) {
            bail!("the test bed has no node {n}");
        }
    }
    if from == to {
        bail!("cannot migrate from {from} to itself");
    }
    let spec = Spec {
        guest_elf,
        cmdline,
        mac,
        memory_mib,
        vcpus,
        dir: tb.dir.join("qemu-net"),
        run: std::process::id() % 1000 * 10 + SEQ.fetch_add(1, Ordering::SeqCst) % 10,
    };
    std::fs::create_dir_all(&spec.dir)?;
    let mut cur = Qemu::start(tb, &spec, from, 0, false)?;
    cur.wait_net_up(Duration::from_secs(30))?;
    wait_reachable(tb, &target, Duration::from_secs(10))?;
    // Let the neighbour entries and the switch settle before the first measurement.
    std::thread::sleep(Duration::from_millis(500));
    let mut runs = Vec::with_capacity(migrations);
    for k in 0..migrations {
        let dst_node = if k % 2 == 0 { to } else { from };
        let dst_ip = tb.node(dst_node).ip.clone();
        let mut dst = Qemu::start(tb, &spec, dst_node, k + 1, true)?;
        let probe = Probe::start(
            tb,
            ferry,
            &target,
            interval_ms,
            spec.dir.join(format!("{}-{k}.probe-stop", spec.run)),
        )?;
        std::thread::sleep(PROBE_MARGIN);
        let (downtime_ms, total_ms) = migrate(&mut cur, &mut dst, &dst_ip, BASE_PORT + k as u16)
            .with_context(|| format!("migration {} of {migrations}", k + 1))?;
        std::thread::sleep(PROBE_MARGIN);
        let probe = probe.finish()?;
        // A guest that stopped running would make the probe numbers meaningless (every probe
        // lost, move after move): refuse them.
        if hb_ms <= 500 {
            let (beats, tail) = dst.heartbeats();
            if beats == 0 {
                bail!(
                    "migration {} of {migrations}: the guest printed no heartbeat in the \
                     {PROBE_MARGIN:?} after it resumed on {dst_node} (its vCPUs stopped running; \
                     ICMP {}/{} replies in this probe); last serial lines: {tail:?}",
                    k + 1,
                    probe.icmp.received,
                    probe.icmp.sent
                );
            }
        }
        std::mem::replace(&mut cur, dst).quit();
        runs.push(QemuNetRun {
            downtime_ms,
            total_ms,
            probe,
        });
    }
    cur.quit();
    Ok(runs)
}
