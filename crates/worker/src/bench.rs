//! `ferry-vmm bench`: the foundation benchmarks, each next to the comparison measured in the
//! same run.
//!
//! * boot: `ferry-vmm run` process start → first complete serial line, next to QEMU 7.2
//!   (`-M microvm`) booting the same ELF to its first line.
//! * snapshot/restore of 256 MiB, 1 GiB and 4 GiB guests, idle and with half the memory
//!   touched: time and bytes, next to a memcpy of the same bytes and a file write (+fsync) of
//!   the same bytes.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vmm::{KernelSource, Vm, VmConfig};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Which benchmarks: boot, snapshot, migrate, or all.
    #[arg(long, default_value = "all")]
    pub only: String,
    /// Guest sizes in MiB for the migration benchmark.
    #[arg(long, value_delimiter = ',', default_value = "256,1024,4096")]
    pub migrate_sizes: Vec<u64>,
    /// Downtime limit for both Ferry and QEMU in the migration benchmark.
    #[arg(long, default_value_t = 50)]
    pub max_downtime_ms: u64,
    /// Guest sizes in MiB for the snapshot benchmark.
    #[arg(long, value_delimiter = ',', default_value = "256,1024,4096")]
    pub sizes: Vec<u64>,
    /// Boot runs per system.
    #[arg(long, default_value_t = 10)]
    pub boot_runs: usize,
    /// Directory for snapshot files and logs (default: a fresh temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

pub fn run(args: BenchArgs) -> Result<i32> {
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            let d = std::env::temp_dir().join(format!("ferry-bench-{}", std::process::id()));
            std::fs::create_dir_all(&d)?;
            d
        }
    };
    println!("# Ferry foundation benchmarks\n");
    println!(
        "host: {}, {} CPUs; date: {}\n",
        vmm::cpuid::host_cpu_model().1,
        num_cpus(),
        date()
    );
    if args.only == "all" || args.only == "boot" {
        boot_bench(&dir, args.boot_runs)?;
    }
    if args.only == "all" || args.only == "snapshot" {
        snapshot_bench(&dir, &args.sizes)?;
    }
    if args.only == "all" || args.only == "migrate" {
        crate::bench_migrate::run(&dir, &args.migrate_sizes, args.max_downtime_ms)?;
    }
    if args.only == "migrate-tls" {
        crate::bench_migrate::run_tls(&dir, &args.migrate_sizes, 3, args.max_downtime_ms)?;
    }
    if !["all", "boot", "snapshot", "migrate", "migrate-tls"].contains(&args.only.as_str()) {
        bail!(
            "unknown benchmark {:?} (boot, snapshot, migrate, all)",
            args.only
        );
    }
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(0)
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn date() -> String {
    Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn first_line_time(log: &Path, t0: Instant, timeout: Duration) -> Option<Duration> {
    loop {
        if let Ok(s) = std::fs::read(log) {
            if s.contains(&b'\n') {
                return Some(t0.elapsed());
            }
        }
        if t0.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn boot_bench(dir: &Path, runs: usize) -> Result<()> {
    let exe = std::env::current_exe()?;
    let elf = dir.join("ferry-guest.elf");
    std::fs::write(&elf, guest::ELF)?;
    let mut ferry = Vec::new();
    for i in 0..runs {
        let log = dir.join(format!("boot{i}.serial"));
        let sock = dir.join(format!("boot{i}.sock"));
        let _ = std::fs::remove_file(&log);
        let t0 = Instant::now();
        let mut child = Command::new(&exe)
            .args([
                "run",
                "--kernel",
                "test-guest",
                "--memory-mib",
                "256",
                "--cmdline",
                "ferry.workload=idle",
            ])
            .arg("--serial-log")
            .arg(&log)
            .arg("--api-socket")
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let t = first_line_time(&log, t0, Duration::from_secs(20));
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_file(&sock);
        ferry.push(
            t.context("ferry-vmm printed no serial line within 20 s")?
                .as_secs_f64()
                * 1e3,
        );
    }
    let mut qemu = Vec::new();
    let have_qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok();
    if have_qemu {
        for i in 0..runs {
            let log = dir.join(format!("qboot{i}.serial"));
            let _ = std::fs::remove_file(&log);
            let t0 = Instant::now();
            let mut child = Command::new("qemu-system-x86_64")
                .args([
                    "-accel",
                    "kvm",
                    "-M",
                    "microvm",
                    "-cpu",
                    "host,-arch-capabilities",
                    "-smp",
                    "1",
                    "-m",
                    "256M",
                ])
                .args([
                    "-no-user-config",
                    "-nodefaults",
                    "-nographic",
                    "-display",
                    "none",
                    "-monitor",
                    "none",
                ])
                .arg("-kernel")
                .arg(&elf)
                .args(["-append", "ferry.workload=idle", "-serial"])
                .arg(format!("file:{}", log.display()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            let t = first_line_time(&log, t0, Duration::from_secs(20));
            let _ = child.kill();
            let _ = child.wait();
            qemu.push(
                t.context("QEMU printed no serial line within 20 s")?
                    .as_secs_f64()
                    * 1e3,
            );
        }
    }
    println!("## Boot: process start → first serial line (256 MiB, 1 vCPU, idle test guest, {runs} runs)\n");
    println!("| system | median ms | min ms | max ms |");
    println!("|---|---|---|---|");
    let row = |name: &str, v: &mut Vec<f64>| {
        let (mn, mx) = (
            v.iter().cloned().fold(f64::MAX, f64::min),
            v.iter().cloned().fold(0.0, f64::max),
        );
        let m = median(v);
        println!("| {name} | {m:.1} | {mn:.1} | {mx:.1} |");
        m
    };
    let fm = row("ferry-vmm run", &mut ferry);
    if have_qemu {
        let qm = row("qemu-system-x86_64 -M microvm", &mut qemu);
        println!(
            "\nFerry/QEMU median ratio: **{:.2}** (below 1 = Ferry faster)\n",
            fm / qm
        );
    } else {
        println!("\n(QEMU not installed: no comparison)\n");
    }
    Ok(())
}

/// Waits until the guest's serial log satisfies `pred`.
pub(crate) fn wait_serial(
    log: &Path,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&str) -> bool,
) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let s = std::fs::read_to_string(log).unwrap_or_default();
        if pred(&s) {
            return Ok(());
        }
        if s.contains("PANIC") {
            bail!("guest panicked waiting for {what}: {s}");
        }
        if t0.elapsed() > timeout {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// MiB the dirty workload wrote so far, all CPUs (from the latest `dirty cpu=K ... mib=N` line
/// of each CPU).
fn dirty_mib(s: &str) -> u64 {
    let mut per_cpu = std::collections::BTreeMap::new();
    for l in s.lines().filter(|l| l.starts_with("dirty ")) {
        let kv: std::collections::BTreeMap<&str, &str> = l
            .split_whitespace()
            .filter_map(|t| t.split_once('='))
            .collect();
        if let (Some(c), Some(m)) = (
            kv.get("cpu"),
            kv.get("mib").and_then(|m| m.parse::<u64>().ok()),
        ) {
            per_cpu.insert(c.to_string(), m);
        }
    }
    per_cpu.values().sum()
}

struct Baseline {
    memcpy_s: f64,
    write_s: f64,
}

/// memcpy and file write (+fsync) of `bytes` bytes, the same amount the snapshot moved.
fn baselines(dir: &Path, bytes: usize) -> Result<Baseline> {
    let mut src = vec![0x5au8; bytes];
    for (i, b) in src.iter_mut().enumerate().step_by(4096) {
        *b = i as u8;
    }
    let mut dst = vec![0u8; bytes];
    dst.iter_mut().step_by(4096).for_each(|b| *b = 1); // prefault
    let t0 = Instant::now();
    dst.copy_from_slice(&src);
    let memcpy_s = t0.elapsed().as_secs_f64();
    std::hint::black_box(&dst);
    drop(dst);
    let path = dir.join("baseline.bin");
    let t0 = Instant::now();
    let mut f = std::fs::File::create(&path)?;
    for c in src.chunks(1 << 20) {
        f.write_all(c)?;
    }
    f.sync_all()?;
    let write_s = t0.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(&path);
    Ok(Baseline { memcpy_s, write_s })
}

fn snapshot_bench(dir: &Path, sizes: &[u64]) -> Result<()> {
    let kvm = vmm::open_kvm()?;
    println!("## Snapshot and restore (1 vCPU test guest)\n");
    println!("Snapshot = pause + save state + write sparse file + fsync. Restore = read + verify checksums + fill a fresh VM's memfd RAM + set state (until the VM could run).");
    println!("Baselines move the same number of data bytes in the same run: memcpy between two prefaulted buffers, and write()+fsync of a file.\n");
    println!("| guest | touched | file MiB | snapshot ms | restore ms | memcpy ms | write+fsync ms | snapshot / write | restore / memcpy | snapshot GB/s |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for &mib in sizes {
        for touched in [false, true] {
            let wss = mib / 2;
            let cmdline = if touched {
                format!(
                    "ferry.workload=dirty ferry.wss_mib={wss} ferry.rate_mibs=0 ferry.rounds=1 ferry.hb_ms=200"
                )
            } else {
                "ferry.workload=idle ferry.hb_ms=200".to_string()
            };
            let log = dir.join(format!("snap{mib}{touched}.serial"));
            let cfg = VmConfig {
                vcpus: 1,
                memory_mib: mib,
                kernel: KernelSource::TestGuest,
                initrd: None,
                cmdline,
                cpu_profile: "host".into(),
                disks: vec![],
                nics: vec![],
            };
            let vm = Vm::create(&kvm, cfg, &Default::default(), std::fs::File::create(&log)?)?;
            vm.start()?;
            if touched {
                wait_serial(
                    &log,
                    Duration::from_secs(300),
                    "the working set to be written once",
                    |s| dirty_mib(s) >= wss,
                )?;
            } else {
                wait_serial(&log, Duration::from_secs(60), "heartbeats", |s| {
                    s.matches("\nhb ").count() >= 2
                })?;
            }
            let snap = dir.join(format!("bench-{mib}-{touched}.snap"));
            let t0 = Instant::now();
            let stats = vmm::snapshot::take(&vm, &snap)?;
            let snap_s = t0.elapsed().as_secs_f64();
            vm.stop();
            drop(vm);
            let t0 = Instant::now();
            let (vm2, rstats) = vmm::snapshot::restore(
                &kvm,
                &snap,
                &Default::default(),
                std::fs::File::create(dir.join("restored.serial"))?,
            )?;
            let restore_s = t0.elapsed().as_secs_f64();
            drop(vm2);
            let data = (stats.data_pages * 4096) as usize;
            assert_eq!(rstats.data_pages, stats.data_pages);
            let b = baselines(dir, data.max(4096))?;
            let _ = std::fs::remove_file(&snap);
            println!(
                "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} |",
                if mib >= 1024 {
                    format!("{} GiB", mib / 1024)
                } else {
                    format!("{mib} MiB")
                },
                if touched {
                    format!("{wss} MiB")
                } else {
                    "idle".into()
                },
                stats.file_bytes as f64 / (1 << 20) as f64,
                snap_s * 1e3,
                restore_s * 1e3,
                b.memcpy_s * 1e3,
                b.write_s * 1e3,
                snap_s / b.write_s,
                restore_s / b.memcpy_s,
                stats.file_bytes as f64 / snap_s / 1e9,
            );
        }
    }
    println!();
    Ok(())
}
