//! `ferry-vmm`: the per-VM worker process and its control client.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm::{KernelSource, Vm, VmConfig};
use worker::api::{self, Request};
use worker::server;

mod bench;


#[derive(Parser, Debug)]
#[command(name = "ferry-vmm", version, about = "Ferry VM worker: runs one KVM virtual machine")]
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
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand) {
                let _ = e.print();
                std::process::exit(0);
            }
            // One line: what is wrong. `--help` has the rest.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ");
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
        Cmd::Run { kernel, cmdline, initrd, memory_mib, vcpus, cpu_profile, serial_log, api_socket } => {
            let config = VmConfig {
                vcpus,
                memory_mib,
                kernel: KernelSource::parse(&kernel),
                initrd,
                cmdline,
                cpu_profile,
            };
            config.validate()?;
            if let KernelSource::Path(p) = &config.kernel {
                if !p.is_file() {
                    bail!("kernel {} does not exist or is not a file", p.display());
                }
            }
            let kvm = vmm::open_kvm()?;
            server::check_free(&api_socket)?;
            let serial = SerialLog::create(&serial_log)?;
            let vm = Vm::create(&kvm, config, serial.file()?)?;
            serial.commit()?;
            let listener = server::bind(&api_socket)?;
            serve_until_stopped(Arc::new(vm), listener, api_socket, true)
        }
        Cmd::Restore { snapshot, serial_log, api_socket, paused } => {
            let kvm = vmm::open_kvm()?;
            server::check_free(&api_socket)?;
            let serial = SerialLog::create(&serial_log)?;
            let (vm, stats) = vmm::snapshot::restore(&kvm, &snapshot, serial.file()?)?;
            serial.commit()?;
            let listener = server::bind(&api_socket)?;
            println!(
                "restored {}: {} of {} pages, {:.1} MiB file, {:.1} ms",
                snapshot.display(),
                stats.data_pages,
                stats.total_pages,
                stats.file_bytes as f64 / (1 << 20) as f64,
                stats.seconds * 1e3
            );
            serve_until_stopped(Arc::new(vm), listener, api_socket, !paused)
        }
        Cmd::Ctl { api_socket, cmd } => {
            let req = match cmd {
                CtlCmd::Status => Request::Status,
                CtlCmd::Pause => Request::Pause,
                CtlCmd::Resume => Request::Resume,
                CtlCmd::Shutdown => Request::Shutdown,
                CtlCmd::Snapshot { path } => Request::Snapshot { path: absolute(&path)? },
            };
            let resp = api::call(&api_socket, &req, Some(Duration::from_secs(600)))?;
            if !resp.ok {
                bail!("{}", resp.error.unwrap_or_else(|| "the worker reported a failure".into()));
            }
            println!("{}", serde_json::to_string_pretty(&resp.data)?);
            Ok(0)
        }
        Cmd::ExportGuest { path } => {
            std::fs::write(&path, guest::ELF).with_context(|| format!("cannot write {}", path.display()))?;
            println!("wrote {} ({} bytes)", path.display(), guest::ELF.len());
            Ok(0)
        }
        Cmd::HostInfo => {
            let kvm = vmm::open_kvm()?;
            let supported = vmm::cpuid::supported(&kvm)?;
            let (vendor, brand) = vmm::cpuid::host_cpu_model();
            println!("cpu vendor: {vendor}\ncpu model: {brand}\nkvm vendor: {}", supported.vendor());
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
    Ok(if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir()?.join(p) })
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
        let file = File::create(&partial).with_context(|| format!("cannot create serial log {}", path.display()))?;
        Ok(SerialLog { path: path.to_path_buf(), partial, file, committed: false.into() })
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

fn serve_until_stopped(vm: Arc<Vm>, listener: std::os::unix::net::UnixListener, socket: PathBuf, start: bool) -> Result<i32> {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_terminate as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_terminate as *const () as libc::sighandler_t);
    }
    let ctx = Arc::new(server::Ctx { vm: vm.clone(), started: Instant::now(), socket: socket.clone() });
    server::serve(listener, ctx);
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
