//! `ferry-vmm`: the per-VM worker process and its control client.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use contract::{MigrationParams, Progress, Summary};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vmm::{KernelSource, Vm, VmConfig};
use worker::api::{self, MigrateCommand, MigrateSession, Reply, Request};
use worker::security::{self, TlsArgs};
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
        /// This node's TLS identity for outgoing migrations, read now.
        #[command(flatten)]
        node_tls: security::NodeTlsArgs,
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
        /// Read every vCPU's state back after loading it and refuse the restore if anything
        /// differs from the snapshot (beyond a TSC that ran on and a LAPIC timer that counted
        /// down).
        #[arg(long)]
        verify_state: bool,
        #[command(flatten)]
        host: HostArgs,
        /// File with the VM configuration (JSON) the snapshot must hold; required with
        /// `--user`: its disks and TAPs (and the snapshot file) are opened before root is
        /// dropped, and a snapshot of any other VM is refused before anything is restored.
        #[arg(long)]
        expect_config: Option<PathBuf>,
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
        /// The cluster migration this receiver serves (shown in its status, so that a
        /// restarted agent can settle it from the store).
        #[arg(long)]
        migration_id: Option<String>,
        /// Accept wire protocol versions up to this one only (as a destination of an older
        /// build would).
        #[arg(long)]
        max_protocol: Option<u32>,
        /// Read every vCPU's state back after loading the received state and fail the
        /// migration (before the commit) if anything differs from what the source sent.
        #[arg(long)]
        verify_state: bool,
        #[command(flatten)]
        host: HostArgs,
        /// Mutual TLS with the source (`--peer-node`: the source node), or --insecure.
        #[command(flatten)]
        tls: TlsArgs,
        /// File with the one-time secret (64 hex digits) the source must present; required
        /// with TLS. It admits one session: a second one presenting it is refused as a replay.
        #[arg(long)]
        secret_file: Option<PathBuf>,
        /// File with the VM configuration (JSON) this receiver may take, as its agent
        /// planned it: a source offering any other (disks, NICs, memory, vCPUs, kernel) is
        /// refused in preflight, before anything is opened.
        #[arg(long)]
        expect_config: Option<PathBuf>,
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

/// Migration parameters (defaults: [`MigrationParams::default`]).
#[derive(clap::Args, Debug, Clone)]
struct ParamArgs {
    /// Switch over once the expected downtime is below this (default 50).
    #[arg(long)]
    max_downtime_ms: Option<u64>,
    /// Parallel TCP connections for memory, 1-16 (default 1).
    #[arg(long)]
    streams: Option<u16>,
    /// Page compression: none, lz4 or zstd (default none).
    #[arg(long)]
    compress: Option<contract::Compression>,
    /// Bandwidth cap in MiB/s.
    #[arg(long)]
    max_bandwidth_mibs: Option<u64>,
    /// Give up after this many seconds (the VM stays here).
    #[arg(long)]
    timeout_s: Option<f64>,
}

impl ParamArgs {
    fn params(&self) -> Result<MigrationParams> {
        let d = MigrationParams::default();
        let p = MigrationParams {
            max_downtime_ms: self.max_downtime_ms.unwrap_or(d.max_downtime_ms),
            streams: self.streams.unwrap_or(d.streams),
            compression: self.compress.unwrap_or(d.compression),
            max_bandwidth_mibs: self.max_bandwidth_mibs,
            timeout_s: self.timeout_s,
        };
        p.validate()?;
        Ok(p)
    }
}

/// Host-side device backends (not part of the VM: a migration destination brings its own).
#[derive(clap::Args, Debug, Clone)]
struct HostArgs {
    /// Backend of the next NIC: `bridge=<name>` (create a TAP on that bridge) or `tap=<name>`
    /// (repeatable, one per NIC in order; a single `bridge=` serves every NIC).
    #[arg(long = "net-backend")]
    net_backends: Vec<vmm::devices::virtio::NetBackend>,
    /// Disk images only beneath this directory: `DIR`, or `DIR,devices` to allow block
    /// devices there (repeatable).
    #[arg(long = "storage-root")]
    storage_roots: Vec<vmm::confine::RootSpec>,
    /// Kernels and initrds only beneath this directory (repeatable).
    #[arg(long = "boot-root")]
    boot_roots: Vec<vmm::confine::RootSpec>,
    /// Open host files for the VM only beneath `--storage-root` / `--boot-root` (implied by
    /// either, and by a TLS receiver); with no root of a kind, no file of that kind at all.
    #[arg(long)]
    confined: bool,
    /// The serial log is rotated when it reaches this size (MiB): the guest cannot fill the
    /// host's disk by printing.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    serial_log_max_mib: u64,
    /// Run without the seccomp filters (vmm::sandbox): only to diagnose a filter that
    /// refuses something it should not; prints a warning.
    #[arg(long)]
    no_seccomp: bool,
    /// Run without root: open what the VM needs first (/dev/kvm, its kernel, initrd and
    /// disks, its TAPs, the control socket), then become this user (NAME, UID or UID:GID) with
    /// no capabilities and open nothing else. The serial log's directory must be writable by
    /// that user. For `run` and `receive` (which then needs --expect-config).
    #[arg(long)]
    user: Option<vmm::privilege::User>,
    /// Rotated serial logs kept (`<log>.1` ..= `<log>.N`).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=100))]
    serial_log_keep: u32,
}

impl HostArgs {
    /// Sets this process's storage policy ([`vmm::confine`]), before anything is opened:
    /// confined if asked, if any root was given, or if `closed` (a receiver whose VM
    /// configuration comes from the network).
    fn confine(&self, closed: bool) -> Result<()> {
        let p = if self.confined
            || closed
            || !self.storage_roots.is_empty()
            || !self.boot_roots.is_empty()
        {
            vmm::confine::Policy::roots(&self.storage_roots, &self.boot_roots)?
        } else {
            vmm::confine::Policy::Unconfined
        };
        vmm::confine::install(p)?;
        Ok(())
    }

    /// Installs the worker's seccomp filters ([`vmm::sandbox`]) on every thread, before the
    /// VM's first byte is read from anywhere.
    fn sandbox(&self) -> Result<()> {
        if self.no_seccomp {
            eprintln!(
                "ferry-vmm: warning: --no-seccomp: this worker runs without its seccomp filters"
            );
            return Ok(());
        }
        vmm::sandbox::install()?;
        Ok(())
    }

    /// With `--user`: opens now, while still privileged, what a VM with `config` will need
    /// (what fails to open is reported when it is used, as before).
    fn preopen(&self, config: &VmConfig) -> Result<()> {
        use vmm::confine::Use;
        use vmm::privilege::preopen_file;
        if self.user.is_none() {
            return Ok(());
        }
        vmm::privilege::preopen_kvm()?;
        if let KernelSource::Path(p) = &config.kernel {
            preopen_file(p, false, Use::Kernel);
        }
        if let Some(i) = &config.initrd {
            preopen_file(i, false, Use::Initrd);
        }
        for d in &config.disks {
            preopen_file(&d.path, !d.read_only, Use::Disk);
        }
        vmm::privilege::preopen_taps(&self.net_backends, config.nics.len());
        Ok(())
    }

    /// With `--user`: becomes that user for good (after [`HostArgs::preopen`], before
    /// [`HostArgs::sandbox`], whose filters forbid changing IDs).
    fn drop_privileges(&self) -> Result<()> {
        if let Some(u) = self.user {
            vmm::privilege::drop_to(u)?;
            eprintln!("ferry-vmm: running as {u}, with no capabilities");
        }
        Ok(())
    }

    /// How the serial log at `path` is bounded.
    /// (Its directory is opened now: call before [`HostArgs::drop_privileges`].)
    fn rotation(&self, path: &Path) -> Result<vmm::devices::serial::Rotation> {
        vmm::devices::serial::Rotation::at(
            path,
            self.serial_log_max_mib << 20,
            self.serial_log_keep,
        )
        .with_context(|| format!("cannot create serial log {}", path.display()))
    }

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
        #[command(flatten)]
        params: ParamArgs,
        /// Only run the preflight checks and print the report.
        #[arg(long)]
        dry_run: bool,
        /// Output: text (progress lines and a summary) or json (JSON lines).
        #[arg(long, default_value = "text")]
        output: String,
        /// Offer at most this wire protocol version (versions are negotiated down to what the
        /// destination speaks anyway; this pins an older one).
        #[arg(long)]
        max_protocol: Option<u32>,
        /// Mutual TLS with the destination (`--peer-node`: the destination node), or
        /// --insecure. The files are read by the worker.
        #[command(flatten)]
        tls: Box<TlsArgs>,
        /// File with the destination's one-time secret.
        #[arg(long)]
        secret_file: Option<PathBuf>,
    },
    /// Cancel a running outgoing migration (the VM stays here).
    Cancel,
    /// (receive --external-commit) The VM's owner moved here: resume it.
    Commit,
    /// (receive --external-commit) The migration failed: discard the received VM.
    Abort,
}

fn main() {
    // A worker outlives its agent by design: when the agent dies, the worker's process group
    // is orphaned, and an orphaned group with a stopped member gets SIGHUP (then SIGCONT) from
    // the kernel. A hangup must not take the VM down.
    // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
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

/// The configuration a receiver may take (`--expect-config`), checked as a configuration.
fn read_expected_config(f: &std::path::Path) -> Result<VmConfig> {
    let text =
        std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
    let c: VmConfig = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a VM configuration", f.display()))?;
    c.validate()
        .with_context(|| format!("{}: invalid VM configuration", f.display()))?;
    Ok(c)
}

fn real_main(cli: Cli) -> Result<i32> {
    // (fault-injection builds) where a fault marker goes, opened while still privileged.
    contract::faults::hold_dir();
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
            node_tls,
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
            let rotation = host.rotation(&serial_log)?;
            host.confine(false)?;
            host.preopen(&config)?;
            if let Some(files) = node_tls.files()? {
                security::preload_tls(&files)?;
            }
            server::check_free(&api_socket)?;
            // An unprivileged worker binds its socket (in its agent's directory) before the
            // drop: its agent then waits for the socket to answer, not just to exist.
            let early = host
                .user
                .is_some()
                .then(|| server::bind(&api_socket))
                .transpose()?;
            host.drop_privileges()?;
            host.sandbox()?;
            let devices = host.devices(config.nics.len())?;
            let kvm = vmm::open_kvm()?;
            let serial = SerialLog::create(rotation)?;
            let vm = Vm::create(&kvm, config, &devices, serial.file()?)?;
            serial.commit()?;
            let listener = match early {
                Some(l) => l,
                None => server::bind(&api_socket)?,
            };
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
            verify_state,
            host,
            expect_config,
        } => {
            vmm::statecheck::enable(verify_state);
            let expected = match &expect_config {
                Some(f) => Some(read_expected_config(f)?),
                None if host.user.is_some() => bail!(
                    "--user needs --expect-config: an unprivileged restore opens the disks and TAPs of the VM it was told to expect before it drops root"
                ),
                None => None,
            };
            let rotation = host.rotation(&serial_log)?;
            host.confine(false)?;
            if let Some(c) = &expected {
                host.preopen(c)?;
            }
            // Opened while still privileged (the snapshot may be readable by root only).
            let file = std::fs::File::open(&snapshot)
                .with_context(|| format!("cannot open snapshot {}", snapshot.display()))?;
            server::check_free(&api_socket)?;
            let early_listener = match host.user {
                Some(_) => Some(server::bind(&api_socket)?),
                None => None,
            };
            host.drop_privileges()?;
            host.sandbox()?;
            let kvm = vmm::open_kvm()?;
            let state = vmm::snapshot::Reader::from_file(file.try_clone()?)
                .and_then(|mut r| r.read_state());
            if let (Some(want), Ok(st)) = (&expected, &state) {
                let d = migration::preflight::config_differences(want, &st.config);
                if !d.is_empty() {
                    let d: Vec<String> = d
                        .into_iter()
                        .map(|(what, e, o)| format!("{what} {o} in the snapshot, {e} expected"))
                        .collect();
                    bail!(
                        "snapshot {} holds another VM than --expect-config names: {}",
                        snapshot.display(),
                        d.join("; ")
                    );
                }
            }
            let nics = state.map(|s| s.config.nics.len()).unwrap_or(0);
            let host = host.devices(nics)?;
            let serial = SerialLog::create(rotation)?;
            let (vm, stats) =
                vmm::snapshot::restore_file(&kvm, file, &snapshot, &host, serial.file()?)?;
            serial.commit()?;
            let listener = match early_listener {
                Some(l) => l,
                None => server::bind(&api_socket)?,
            };
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
            migration_id,
            max_protocol,
            verify_state,
            host,
            tls,
            secret_file,
            expect_config,
        } => {
            vmm::statecheck::enable(verify_state);
            let transport = tls.transport()?;
            let server_tls = security::server_tls(&transport)?;
            // The same identity serves the VM's next migration out of here (read now: an
            // unprivileged worker could not read the node's key then).
            if let contract::trust::Transport::Tls { files, .. } = &transport {
                security::preload_tls(files)?;
            }
            if server_tls.is_none() {
                eprintln!("{}", security::INSECURE_WARNING);
            }
            let rotation = host.rotation(&serial_log)?;
            host.confine(server_tls.is_some())?;
            let expected = match &expect_config {
                Some(f) => Some(read_expected_config(f)?),
                None => None,
            };
            match &expected {
                Some(c) => host.preopen(c)?,
                None if host.user.is_some() => bail!(
                    "--user needs --expect-config: an unprivileged receiver opens the disks and TAPs of the VM its agent planned before it drops root"
                ),
                None => {}
            }
            let secret = match &secret_file {
                Some(f) => Some(security::read_secret(f)?),
                None if server_tls.is_some() => bail!(
                    "--secret-file is required with TLS: the one-time secret binds the receiver to its migration"
                ),
                None => None,
            };
            if let Some(p) = &host_profile {
                if !vmm::cpuid::PROFILE_NAMES.contains(&p.as_str()) {
                    bail!(
                        "unknown CPU profile {p:?} (known: {})",
                        vmm::cpuid::PROFILE_NAMES.join(", ")
                    );
                }
            }
            server::check_free(&api_socket)?;
            let tcp = std::net::TcpListener::bind(&listen)
                .with_context(|| format!("cannot listen on {listen}"))?;
            let listener = server::bind(&api_socket)?;
            host.drop_privileges()?;
            host.sandbox()?;
            let kvm = vmm::open_kvm()?;
            let serial = Arc::new(SerialLog::create(rotation)?);
            let incoming = Arc::new(migration::recv::ReceiveControl::default());
            // The common 1-vCPU case only: measuring more here would compete with the migration
            // itself (the VM's own vCPU count is measured, if not cached, during the handshake).
            migration::cost::warm_restore_costs(vec![1]);
            let decision = external_commit.then(|| Arc::new(migration::recv::Decision::default()));
            let mut ctx = server::Ctx::new(None, api_socket.clone(), Some(incoming.clone()));
            ctx.decision = decision.clone();
            ctx.listen = Some(tcp.local_addr()?.to_string());
            ctx.migration_id = migration_id;
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
                    expected,
                },
                external: decision,
                protocols: migration::wire::MIN_PROTOCOL_VERSION
                    ..=max_protocol.unwrap_or(migration::wire::PROTOCOL_VERSION),
                tls: server_tls,
                secret,
                // The guest prints into the VM's log from its first instruction here: a worker
                // killed right after the resume leaves its output where the VM's log is.
                before_resume: Some(migration::recv::BeforeResume({
                    let serial = serial.clone();
                    Arc::new(move || {
                        if let Err(e) = serial.commit() {
                            eprintln!("ferry-vmm: {e:#}");
                        }
                    })
                })),
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
                    params,
                    dry_run,
                    output,
                    max_protocol,
                    tls,
                    secret_file,
                },
        } => {
            let json = match output.as_str() {
                "json" => true,
                "text" => false,
                o => bail!("unknown output format {o:?} (text, json)"),
            };
            let cmd = MigrateCommand {
                to,
                params: params.params()?,
                dry_run,
                external_commit: false,
                handover: false,
                max_protocol,
                transport: tls.transport()?,
                secret: secret_file
                    .as_deref()
                    .map(security::read_secret)
                    .transpose()?,
            };
            let mut session = MigrateSession::start(&api_socket, cmd)?;
            loop {
                let r = session.next_reply()?;
                if json {
                    println!("{}", serde_json::to_string(&r).unwrap_or_default());
                }
                match r {
                    Reply::Progress(p) => {
                        if !json {
                            println!("{}", progress_line(&p));
                        }
                    }
                    Reply::Done(s) => {
                        if !json {
                            println!("{}", summary_text(&s));
                        }
                        return Ok(0);
                    }
                    Reply::Failed(f) => bail!("{f}"),
                    Reply::Error { error } => bail!("{error}"),
                    other => bail!("unexpected answer from the worker: {other:?}"),
                }
            }
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
                CtlCmd::Migrate { .. } => bail!("internal error: migrate is handled above"),
            };
            let reply = api::call(&api_socket, &req, Some(Duration::from_secs(600)))?;
            println!("{}", serde_json::to_string_pretty(&reply)?);
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
            match vmm::host::HostTsc::read(&kvm) {
                Ok(t) => println!(
                    "tsc: {} kHz, scaling {}",
                    t.khz,
                    if t.scaling { "yes" } else { "no" }
                ),
                Err(e) => println!("tsc: unknown: {e}"),
            }
            // The host's TSC and wall clock read together: two hosts' lines show how their
            // TSCs differ.
            // SAFETY: RDTSC reads a counter; it has no memory effects and every x86-64 CPU has it.
            let tsc = unsafe { std::arch::x86_64::_rdtsc() };
            println!("tsc now: {tsc} at realtime {} ns", vmm::vm::realtime_ns());
            match vmm::host::check_runs_linux() {
                Ok(()) => println!("linux guests: yes"),
                Err(e) => println!("linux guests: no: {e}"),
            }
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

/// The serial log is written to a fresh temporary file beside its final name (O_EXCL,
/// unguessable name, 0600: nothing planted there is followed) until the VM exists, then
/// renamed to it: a worker that fails to start leaves no log behind and does not clobber an
/// existing one. Everything happens in the directory the rotation holds open.
struct SerialLog {
    partial: std::ffi::OsString,
    file: File,
    rotation: vmm::devices::serial::Rotation,
    committed: AtomicBool,
}

impl SerialLog {
    fn create(rotation: vmm::devices::serial::Rotation) -> Result<SerialLog> {
        let (file, partial) = rotation
            .dir
            .create_temp(&rotation.name)
            .with_context(|| format!("cannot create serial log {}", rotation.path().display()))?;
        Ok(SerialLog {
            partial,
            file,
            rotation,
            committed: AtomicBool::new(false),
        })
    }

    /// The guest's console, bounded by the log's rotation (which works on the final name:
    /// the VM prints only after [`SerialLog::commit`]).
    fn file(&self) -> Result<vmm::devices::serial::ConsoleLog> {
        Ok(vmm::devices::serial::ConsoleLog::rotating(
            self.file.try_clone()?,
            self.rotation.clone(),
        ))
    }

    /// Makes the log the VM's (once; later calls do nothing).
    fn commit(&self) -> Result<()> {
        if self.committed.load(Ordering::SeqCst) {
            return Ok(());
        }
        let r = &self.rotation;
        r.dir
            .rename(&self.partial, &r.name)
            .with_context(|| format!("cannot create serial log {}", r.path().display()))?;
        self.committed.store(true, Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for SerialLog {
    fn drop(&mut self) {
        if !self.committed.load(Ordering::SeqCst) {
            let _ = self.rotation.dir.remove(&self.partial);
        }
    }
}

static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int) {
    TERMINATE.store(true, Ordering::SeqCst);
}

fn progress_line(p: &Progress) -> String {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    format!(
        "{:<26} pass {:>3}  sent {:>9.1} MiB  remaining {:>8.1} MiB  dirty {:>7.1} MiB/s  bandwidth {:>7.1} MiB/s  expected downtime {:>7.1} ms  throttle {:>2}%",
        p.phase.to_string(),
        p.pass,
        mib(p.bytes_sent),
        mib(p.remaining_bytes),
        p.dirty_rate_mibs,
        p.bandwidth_mibs,
        p.expected_downtime_ms,
        p.throttle_pct,
    )
}

fn summary_text(s: &Summary) -> String {
    let pre = &s.preflight;
    if s.dry_run {
        let d = &pre.destination;
        return format!(
            "preflight OK (dry run, nothing moved): destination {} {}, {} CPUs, {} MiB free; measured restore cost {:.2} ms",
            d.vendor,
            d.model,
            d.cpus,
            d.free_memory_mib,
            pre.restore_cost_us as f64 / 1e3
        );
    }
    let d = &s.downtime;
    format!(
        "migrated in {:.1} ms; downtime {:.2} ms (final memory {:.2}, state {:.2}, commit {:.2} incl. resume {:.2}); {} passes; {:.1} MiB on the wire ({} data pages, {} zero pages, state {} bytes); pass 0 at {:.0} MiB/s; max throttle {}%; protocol v{}",
        s.total_ms,
        s.downtime_ms,
        d.final_memory_ms,
        d.state_ms,
        d.commit_ms,
        d.resume_ms,
        s.passes,
        s.bytes_sent as f64 / (1 << 20) as f64,
        s.data_pages,
        s.zero_pages,
        s.state_bytes,
        s.pass0_mibs,
        s.max_throttle_pct,
        s.protocol,
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
    if contract::faults::sandbox_probe(contract::faults::SandboxProbe::Exec) {
        eprintln!("ferry-vmm: sandbox probe: executing /bin/true");
        let r = std::process::Command::new("/bin/true").status();
        eprintln!("ferry-vmm: sandbox probe: the filter let it through: {r:?}");
    }
    if contract::faults::sandbox_probe(contract::faults::SandboxProbe::Netlink) {
        eprintln!("ferry-vmm: sandbox probe: opening a netlink socket");
        // SAFETY: socket(2) takes no pointers; the probe expects the process to be killed.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, 0) };
        eprintln!("ferry-vmm: sandbox probe: the filter let it through: {fd}");
    }
    if contract::faults::sandbox_probe(contract::faults::SandboxProbe::Tiocsti) {
        eprintln!("ferry-vmm: sandbox probe: a TIOCSTI ioctl");
        let c = b'x';
        // SAFETY: TIOCSTI reads one byte from the pointer, which points at `c`; the probe
        // expects the process to be killed before the kernel looks at it.
        let r = unsafe { libc::ioctl(2, libc::TIOCSTI as _, &c as *const u8) };
        eprintln!("ferry-vmm: sandbox probe: the filter let it through: {r}");
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
