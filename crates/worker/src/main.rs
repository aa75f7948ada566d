//! `ferry-vmm`: the per-VM worker process and its control client.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vmm::{KernelSource, Vm, VmConfig};
use worker::api::{self, Request};
use worker::server;

mod bench;
mod bench_migrate;

#[derive(Parser, Debug)]
#[command(
    name = "ferry-vmm",
    version,
    about = "Ferry VM worker: runs one KVM virtual machine"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Boot a new VM and serve its control API until it stops.
    Run {
        /// Kernel: a PVH ELF or bzImage path, or `test-guest` for Ferry's built-in test guest.
        #[arg(long)]
        kernel: String,
        /// Kernel command line.
        #[arg(long, default_value = "")]
        cmdline: String,
        /// Initial ramdisk (bzImage kernels only).
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Guest RAM in MiB.
        #[arg(long, default_value_t = 256)]
        memory_mib: u64,
        /// Number of vCPUs (1-8).
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        /// CPU profile the guest CPUID is filtered through: host or baseline.
        #[arg(long, default_value = "host")]
        cpu_profile: String,
        /// A virtio-blk disk: a raw image `PATH` or `PATH,ro` (repeatable; the image is locked
        /// exclusively while the VM runs).
        #[arg(long = "disk")]
        disks: Vec<vmm::config::DiskConfig>,
        /// A virtio-net NIC with this MAC address, e.g. 52:54:00:12:34:56 (repeatable).
        #[arg(long = "nic")]
        nics: Vec<vmm::config::MacAddr>,
        #[command(flatten)]
        host: HostArgs,
        /// File the guest's serial console is written to.
        #[arg(long)]
        serial_log: PathBuf,
        /// Unix socket for the control API.
        #[arg(long)]
        api_socket: PathBuf,
    },
    /// Resume a VM from a snapshot file in this (new) process.
    Restore {
        /// Snapshot file written by `ctl snapshot`.
        #[arg(long)]
        snapshot: PathBuf,
        /// File the guest's serial console is written to from now on.
        #[arg(long)]
        serial_log: PathBuf,
        /// Unix socket for the control API.
        #[arg(long)]
        api_socket: PathBuf,
        /// Stay paused after restoring (resume through the API).
        #[arg(long)]
        paused: bool,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Wait for one VM to arrive by live migration, then run it (serving the control API).
    Receive {
        /// TCP address to listen on for the source, e.g. 127.0.0.1:7000 (port 0: any free port;
        /// the address is printed on stdout).
        #[arg(long)]
        listen: String,
        /// File the guest's serial console is written to.
        #[arg(long)]
        serial_log: PathBuf,
        /// Unix socket for the control API.
        #[arg(long)]
        api_socket: PathBuf,
        /// Claim only the CPU features of this profile (model a host with fewer features).
        #[arg(long)]
        host_profile: Option<String>,
        /// RAM this destination may give a VM, in MiB (default: the host's available memory).
        #[arg(long)]
        max_memory_mib: Option<u64>,
        /// vCPUs this destination may run (default: online CPUs).
        #[arg(long)]
        max_vcpus: Option<u32>,
        /// The commit is decided by this node's agent (`ctl commit` / `ctl abort`), not only by
        /// the source: a lost source then leaves the received VM paused until the agent decides.
        #[arg(long)]
        external_commit: bool,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Send a command to a running worker.
    Ctl {
        /// The worker's control socket.
        #[arg(long)]
        api_socket: PathBuf,
        #[command(subcommand)]
        cmd: CtlCmd,
    },
    /// Write the built-in test guest kernel (a PVH ELF) to a file, e.g. to boot it in QEMU.
    ExportGuest {
        /// Output path.
        path: PathBuf,
    },
    /// Print what this host's KVM offers: CPU vendor/model and the features of each profile.
    HostInfo,
    /// Run the benchmarks and print the results as Markdown.
    Bench(bench::BenchArgs),
}

/// Host-side device backends (not part of the VM: a migration destination brings its own).
#[derive(clap::Args, Debug, Clone)]
struct HostArgs {
    /// Backend of the next NIC: `bridge=<name>` (create a TAP on that bridge) or `tap=<name>`
    /// (repeatable, one per NIC in order; a single `bridge=` serves every NIC).
    #[arg(long = "net-backend")]
    net_backends: Vec<vmm::devices::virtio::NetBackend>,
}

impl HostArgs {
    fn devices(&self, nics: usize) -> Result<vmm::devices::virtio::HostDevices> {
        vmm::devices::virtio::HostDevices::for_nics(&self.net_backends, nics)
            .map_err(|e| anyhow::anyhow!("{e} (--net-backend)"))
    }
}

#[derive(Subcommand, Debug)]
enum CtlCmd {
    /// Run state and configuration.
    Status,
    /// Pause all vCPUs.
    Pause,
    /// Resume all vCPUs.
    Resume,
    /// Stop the VM and the worker.
    Shutdown,
    /// Write a snapshot of the whole VM (pauses briefly, then continues).
    Snapshot {
        /// Output file.
        path: PathBuf,
    },
    /// Live-migrate the VM to a `ferry-vmm receive` worker, printing progress.
    Migrate {
        /// Destination address host:port.
        #[arg(long)]
        to: String,
        /// Switch over once the expected downtime is below this.
        #[arg(long, default_value_t = 50)]
        max_downtime_ms: u64,
        /// Parallel TCP connections for memory.
        #[arg(long, default_value_t = 1)]
        streams: u16,
        /// Page compression: none, lz4 or zstd.
        #[arg(long, default_value = "none")]
        compress: String,
        /// Bandwidth cap in MiB/s.
        #[arg(long)]
        max_bandwidth_mibs: Option<u64>,
        /// Give up after this many seconds (the VM stays here).
        #[arg(long)]
        timeout_s: Option<f64>,
        /// Only run the preflight checks and print the report.
        #[arg(long)]
        dry_run: bool,
        /// Output: text (progress lines and a summary) or json (JSON lines).
        #[arg(long, default_value = "text")]
        output: String,
    },
    /// Cancel a running outgoing migration (the VM stays here).
    Cancel,
    /// (receive --external-commit) The VM's owner moved here: resume it.
    Commit,
    /// (receive --external-commit) The migration failed: discard the received VM.
    Abort,
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                std::process::exit(0);
            }
            // One line: what is wrong. `--help` has the rest.
            let text = e.render().to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("ferry-vmm: error: {first} (see ferry-vmm --help)");
            std::process::exit(2);
        }
    };
    match real_main(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ferry-vmm: error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn real_main(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Run {
            kernel,
            cmdline,
            initrd,
            memory_mib,
            vcpus,
            cpu_profile,
            disks,
            nics,
            host,
            serial_log,
            api_socket,
        } => {
            let config = VmConfig {
                vcpus,
                memory_mib,
                kernel: KernelSource::parse(&kernel),
                initrd,
                cmdline,
                cpu_profile,
                disks,
                nics: nics
                    .into_iter()
                    .map(|mac| vmm::config::NicConfig { mac })
                    .collect(),
            };
            config.validate()?;
            let host = host.devices(config.nics.len())?;
            if let KernelSource::Path(p) = &config.kernel {
                if !p.is_file() {
                    bail!("kernel {} does not exist or is not a file", p.display());
                }
            }
            let kvm = vmm::open_kvm()?;
            server::check_free(&api_socket)?;
            let serial = SerialLog::create(&serial_log)?;
            let vm = Vm::create(&kvm, config, &host, serial.file()?)?;
            serial.commit()?;
            let listener = server::bind(&api_socket)?;
            migration::send::warm_save_cost(vm.config().vcpus);
            let vm = Arc::new(vm);
            let ctx = Arc::new(server::Ctx::new(Some(vm.clone()), api_socket.clone(), None));
            server::serve(listener, ctx);
            serve_until_stopped(vm, api_socket, true)
        }
        Cmd::Restore {
            snapshot,
            serial_log,
            api_socket,
            paused,
            host,
        } => {
            let kvm = vmm::open_kvm()?;
            server::check_free(&api_socket)?;
            let nics = vmm::snapshot::Reader::open(&snapshot)
                .and_then(|mut r| r.read_state())
                .map(|s| s.config.nics.len())
                .unwrap_or(0);
            let host = host.devices(nics)?;
            let serial = SerialLog::create(&serial_log)?;
            let (vm, stats) = vmm::snapshot::restore(&kvm, &snapshot, &host, serial.file()?)?;
            serial.commit()?;
            let listener = server::bind(&api_socket)?;
            println!(
                "restored {} (format v{}): {} of {} pages, {:.1} MiB file, {:.1} ms",
                snapshot.display(),
                stats.format_version,
                stats.data_pages,
                stats.total_pages,
                stats.file_bytes as f64 / (1 << 20) as f64,
                stats.seconds * 1e3
            );
            migration::send::warm_save_cost(vm.config().vcpus);
            let vm = Arc::new(vm);
            let ctx = Arc::new(server::Ctx::new(Some(vm.clone()), api_socket.clone(), None));
            server::serve(listener, ctx);
            serve_until_stopped(vm, api_socket, !paused)
        }
        Cmd::Receive {
            listen,
            serial_log,
            api_socket,
            host_profile,
            max_memory_mib,
            max_vcpus,
            external_commit,
            host,
        } => {
            if let Some(p) = &host_profile {
                if !vmm::cpuid::PROFILE_NAMES.contains(&p.as_str()) {
                    bail!(
                        "unknown CPU profile {p:?} (known: {})",
                        vmm::cpuid::PROFILE_NAMES.join(", ")
                    );
                }
            }
            let kvm = vmm::open_kvm()?;
            server::check_free(&api_socket)?;
            let tcp = std::net::TcpListener::bind(&listen)
                .with_context(|| format!("cannot listen on {listen}"))?;
            let serial = SerialLog::create(&serial_log)?;
            let listener = server::bind(&api_socket)?;
            let incoming = Arc::new(migration::recv::ReceiveControl::default());
            // The common 1-vCPU case only: measuring more here would compete with the migration
            // itself (the VM's own vCPU count is measured, if not cached, during the handshake).
            migration::preflight::warm_restore_costs(vec![1]);
            let decision = external_commit.then(|| Arc::new(migration::recv::Decision::default()));
            let mut ctx = server::Ctx::new(None, api_socket.clone(), Some(incoming.clone()));
            ctx.decision = decision.clone();
            let ctx = Arc::new(ctx);
            server::serve(listener, ctx.clone());
            println!("receiving on {}", tcp.local_addr()?);
            use std::io::Write as _;
            let _ = std::io::stdout().flush();
            let opts = migration::recv::ReceiveOptions {
                limits: migration::preflight::DestinationLimits {
                    cpu_profile: host_profile,
                    max_memory_mib,
                    max_vcpus,
                    net_backends: host.net_backends.clone(),
                },
                external: decision,
            };
            let on_early = |m: &str| eprintln!("ferry-vmm: {m}; still waiting");
            match migration::recv::receive(&kvm, &tcp, &opts, serial.file()?, &incoming, &on_early)
            {
                Ok(vm) => {
                    serial.commit()?;
                    drop(tcp);
                    // It may leave again: know this host's save cost by then.
                    migration::send::warm_save_cost_after(
                        vm.config().vcpus,
                        std::time::Duration::from_secs(2),
                    );
                    let vm = Arc::new(vm);
                    *ctx.vm.lock().unwrap_or_else(|e| e.into_inner()) = Some(vm.clone());
                    eprintln!("ferry-vmm: VM received and running");
                    serve_until_stopped(vm, api_socket, false)
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&api_socket);
                    Err(anyhow::anyhow!("{e}"))
                }
            }
        }
        Cmd::Ctl {
            api_socket,
            cmd:
                CtlCmd::Migrate {
                    to,
                    max_downtime_ms,
                    streams,
                    compress,
                    max_bandwidth_mibs,
                    timeout_s,
                    dry_run,
                    output,
                },
        } => {
            let json = match output.as_str() {
                "json" => true,
                "text" => false,
                o => bail!("unknown output format {o:?} (text, json)"),
            };
            let req = Request::Migrate(api::MigrateArgs {
                to,
                max_downtime_ms,
                streams,
                compress,
                max_bandwidth_mibs,
                timeout_s,
                dry_run,
                external_commit: false,
            });
            let last = api::call_stream(&api_socket, &req, |r| {
                let event = r.data.get("event").and_then(|e| e.as_str()).unwrap_or("");
                if json {
                    println!("{}", serde_json::to_string(r).unwrap_or_default());
                } else if event == "progress" {
                    if let Some(p) = r.data.get("progress") {
                        println!("{}", progress_line(p));
                    }
                }
                event == "progress"
            })?;
            if !last.ok {
                bail!(
                    "{}",
                    last.error.unwrap_or_else(|| "migration failed".into())
                );
            }
            if !json {
                if let Some(s) = last.data.get("summary") {
                    println!("{}", summary_text(s));
                }
            }
            Ok(0)
        }
        Cmd::Ctl { api_socket, cmd } => {
            let req = match cmd {
                CtlCmd::Status => Request::Status,
                CtlCmd::Pause => Request::Pause,
                CtlCmd::Resume => Request::Resume,
                CtlCmd::Shutdown => Request::Shutdown,
                CtlCmd::Snapshot { path } => Request::Snapshot {
                    path: absolute(&path)?,
                },
                CtlCmd::Cancel => Request::Cancel,
                CtlCmd::Commit => Request::Commit,
                CtlCmd::Abort => Request::Abort,
                CtlCmd::Migrate { .. } => unreachable!("handled above"),
            };
            let resp = api::call(&api_socket, &req, Some(Duration::from_secs(600)))?;
            if !resp.ok {
                bail!(
                    "{}",
                    resp.error
                        .unwrap_or_else(|| "the worker reported a failure".into())
                );
            }
            println!("{}", serde_json::to_string_pretty(&resp.data)?);
            Ok(0)
        }
        Cmd::ExportGuest { path } => {
            std::fs::write(&path, guest::ELF)
                .with_context(|| format!("cannot write {}", path.display()))?;
            println!("wrote {} ({} bytes)", path.display(), guest::ELF.len());
            Ok(0)
        }
        Cmd::HostInfo => {
            let kvm = vmm::open_kvm()?;
            let supported = vmm::cpuid::supported(&kvm)?;
            let (vendor, brand) = vmm::cpuid::host_cpu_model();
            println!(
                "cpu vendor: {vendor}\ncpu model: {brand}\nkvm vendor: {}",
                supported.vendor()
            );
            for p in vmm::cpuid::PROFILE_NAMES {
                match vmm::cpuid::build(&supported, p) {
                    Ok(t) => {
                        let f: Vec<String> = t.features().into_iter().collect();
                        println!("profile {p}: {}", f.join(" "));
                    }
                    Err(e) => println!("profile {p}: unavailable: {e}"),
                }
            }
            Ok(0)
        }
        Cmd::Bench(args) => bench::run(args),
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    })
}

/// The serial log is written to `<path>.partial` until the VM exists, then renamed to `path`:
/// a worker that fails to start leaves no log behind and does not clobber an existing one.
struct SerialLog {
    path: PathBuf,
    partial: PathBuf,
    file: File,
    committed: std::cell::Cell<bool>,
}

impl SerialLog {
    fn create(path: &Path) -> Result<SerialLog> {
        let partial = PathBuf::from(format!("{}.partial", path.display()));
        let file = File::create(&partial)
            .with_context(|| format!("cannot create serial log {}", path.display()))?;
        Ok(SerialLog {
            path: path.to_path_buf(),
            partial,
            file,
            committed: false.into(),
        })
    }

    fn file(&self) -> Result<File> {
        Ok(self.file.try_clone()?)
    }

    fn commit(&self) -> Result<()> {
        std::fs::rename(&self.partial, &self.path)
            .with_context(|| format!("cannot create serial log {}", self.path.display()))?;
        self.committed.set(true);
        Ok(())
    }
}

impl Drop for SerialLog {
    fn drop(&mut self) {
        if !self.committed.get() {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int) {
    TERMINATE.store(true, Ordering::SeqCst);
}

fn f(v: &serde_json::Value, k: &str) -> f64 {
    v.get(k).and_then(|x| x.as_f64()).unwrap_or(0.0)
}

fn progress_line(p: &serde_json::Value) -> String {
    let mib = |b: f64| b / (1 << 20) as f64;
    format!(
        "{:<24} pass {:>3}  sent {:>9.1} MiB  remaining {:>8.1} MiB  dirty {:>7.1} MiB/s  bandwidth {:>7.1} MiB/s  expected downtime {:>7.1} ms  throttle {:>2}%",
        p.get("phase").and_then(|x| x.as_str()).unwrap_or(""),
        f(p, "pass"),
        mib(f(p, "bytes_sent")),
        mib(f(p, "remaining_bytes")),
        f(p, "dirty_rate_mibs"),
        f(p, "bandwidth_mibs"),
        f(p, "expected_downtime_ms"),
        f(p, "throttle_pct"),
    )
}

fn summary_text(s: &serde_json::Value) -> String {
    let pre = s.get("preflight").cloned().unwrap_or_default();
    if s.get("dry_run").and_then(|x| x.as_bool()).unwrap_or(false) {
        let d = pre.get("destination").cloned().unwrap_or_default();
        return format!(
            "preflight OK (dry run, nothing moved): destination {} {}, {} CPUs, {} MiB free; measured restore cost {:.2} ms",
            d.get("vendor").and_then(|x| x.as_str()).unwrap_or("?"),
            d.get("model").and_then(|x| x.as_str()).unwrap_or("?"),
            f(&d, "cpus"),
            f(&d, "free_memory_mib"),
            f(&pre, "restore_cost_us") / 1e3
        );
    }
    let d = s.get("downtime").cloned().unwrap_or_default();
    format!(
        "migrated in {:.1} ms; downtime {:.2} ms (final memory {:.2}, state {:.2}, commit {:.2} incl. resume {:.2}); {} passes; {:.1} MiB on the wire ({} data pages, {} zero pages, state {} bytes); pass 0 at {:.0} MiB/s; max throttle {}%",
        f(s, "total_ms"),
        f(s, "downtime_ms"),
        f(&d, "final_memory_ms"),
        f(&d, "state_ms"),
        f(&d, "commit_ms"),
        f(&d, "resume_ms"),
        f(s, "passes"),
        f(s, "bytes_sent") / (1 << 20) as f64,
        f(s, "data_pages"),
        f(s, "zero_pages"),
        f(s, "state_bytes"),
        f(s, "pass0_mibs"),
        f(s, "max_throttle_pct"),
    )
}

fn serve_until_stopped(vm: Arc<Vm>, socket: PathBuf, start: bool) -> Result<i32> {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGTERM,
            on_terminate as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGINT,
            on_terminate as *const () as libc::sighandler_t,
        );
    }
    if start {
        vm.start()?;
    }
    let event = loop {
        if let Some(e) = vm.wait_stopped(Some(Duration::from_millis(200))) {
            break e;
        }
        if TERMINATE.load(Ordering::SeqCst) {
            vm.request_stop();
        }
    };
    vm.stop();
    let _ = std::fs::remove_file(&socket);
    eprintln!("ferry-vmm: VM stopped: {event}");
    Ok(match event {
        vmm::vm::VmEvent::Crashed { .. } | vmm::vm::VmEvent::TripleFault { .. } => 1,
        _ => 0,
    })
}
