//! Boot: options, CPUs, working set and devices, the boot lines, then one thread per CPU.

use crate::out::line;
use crate::{cmdline, disk, hb, opts, sys, work};
use std::cell::Cell;
use std::net::UdpSocket;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const PAGE_SIZE: u64 = 4096;
const MIB: u64 = 1 << 20;

/// Everything the CPUs share (set up before the boot line, read-only afterwards).
pub struct Guest {
    pub cfg: cmdline::Config,
    pub opts: opts::LinuxOpts,
    /// True when the options came from `FERRY_CMDLINE` (process mode).
    pub process: bool,
    pub cpus: Vec<usize>,
    pub tsc_khz: u64,
    pub hb: Duration,
    pub wss_base: usize,
    pub wss_pages: u64,
    /// CPUs sharing the working set.
    pub wss_cpus: u64,
    pub reset_at: Option<Instant>,
    pub disk: Option<disk::Disk>,
    pub udp: Option<UdpSocket>,
}

static GUEST: OnceLock<Guest> = OnceLock::new();

thread_local! {
    /// The CPU index of this thread, for the panic line.
    static CPU: Cell<Option<usize>> = const { Cell::new(None) };
}

/// `ferry.reset_after_ms` is due (CPU 0).
pub fn reset(g: &Guest) -> ! {
    if g.process {
        // The last line: no other CPU's heartbeat may follow it.
        crate::out::exit_after_line(format_args!("reset requested"), 100);
    }
    line!("reset requested");
    let e = sys::restart_machine();
    line!("PANIC reset failed: {e}");
    std::process::exit(1);
}

fn fail(msg: std::fmt::Arguments<'_>) -> ! {
    line!("PANIC {msg}");
    std::process::exit(1);
}

fn mem_mib() -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (kib + 512) / 1024
}

pub fn main() {
    std::panic::set_hook(Box::new(|info| {
        let cpu = CPU.with(|c| c.get());
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        match cpu {
            Some(k) => line!("PANIC cpu={k} rust panic at {at}: {msg}"),
            None => line!("PANIC rust panic at {at}: {msg}"),
        }
    }));

    let (text, process) = match std::env::var(opts::CMDLINE_ENV) {
        Ok(t) => (t, true),
        Err(_) => match std::fs::read_to_string("/proc/cmdline") {
            Ok(t) => (t, false),
            Err(e) => fail(format_args!("cannot read /proc/cmdline: {e}")),
        },
    };
    let cfg = match cmdline::parse(text.as_bytes()) {
        Ok(c) => c,
        Err(bad) => fail(format_args!(
            "bad cmdline: {} ({})",
            String::from_utf8_lossy(bad.item),
            bad.reason
        )),
    };
    let opts = match opts::parse(&text) {
        Ok(o) => o,
        Err((item, reason)) => fail(format_args!("bad cmdline: {item} ({reason})")),
    };
    let cpus = match sys::online_cpus() {
        Ok(c) if !c.is_empty() => c,
        Ok(_) => fail(format_args!("no CPUs in the affinity mask")),
        Err(e) => fail(format_args!("sched_getaffinity failed: {e}")),
    };
    let n = cpus.len() as u64;
    let tsc_khz = cfg.tsc_khz.unwrap_or_else(hb::measure_tsc_khz);
    if tsc_khz == 0 {
        fail(format_args!(
            "unknown TSC frequency: pass ferry.tsc_khz=<kHz>"
        ));
    }

    let wss_mib = if cfg.workload.uses_wss() {
        cfg.wss_mib
    } else if cfg.workload.drives_device() {
        cfg.load_mib
    } else {
        0
    };
    let (mut wss_base, mut wss_pages, mut locked) = (0usize, 0u64, true);
    if wss_mib > 0 {
        wss_pages = wss_mib * (MIB / PAGE_SIZE);
        match sys::map_anonymous((wss_mib * MIB) as usize) {
            Ok((p, l)) => {
                wss_base = p as usize;
                locked = l.is_ok();
            }
            Err(e) => {
                let key = if cfg.workload.uses_wss() {
                    "ferry.wss_mib"
                } else {
                    "ferry.load_mib"
                };
                fail(format_args!(
                    "bad cmdline: {key}={wss_mib} (cannot map it: {e})"
                ))
            }
        }
    }

    // Devices: before the boot line, so a problem is a boot PANIC instead of it.
    let disk = match cfg.workload {
        cmdline::Workload::DiskLog => match disk::open(&opts.disk) {
            Ok(d) => Some(d),
            Err(e) => fail(format_args!("cannot open disk {}: {e}", opts.disk)),
        },
        _ => None,
    };
    let udp = match cfg.workload {
        cmdline::Workload::NetEcho => match UdpSocket::bind(("0.0.0.0", opts.udp_port)) {
            Ok(s) => Some(s),
            Err(e) => fail(format_args!("cannot bind UDP port {}: {e}", opts.udp_port)),
        },
        _ => None,
    };

    line!(
        "ferry-guest boot cpus={n} mem_mib={} tsc_khz={tsc_khz} workload={} wss_mib={} rate_mibs={} hb_ms={} load_mib={} os=linux",
        mem_mib(),
        cfg.workload.name(),
        cfg.wss_mib,
        cfg.rate_mibs,
        cfg.hb_ms,
        if cfg.workload.drives_device() { cfg.load_mib } else { 0 }
    );
    if wss_pages > 0 {
        line!(
            "linux-wss va=0x{wss_base:x} pages={wss_pages} pid={} locked={}",
            std::process::id(),
            u8::from(locked)
        );
        if let Ok(Some(pa)) = sys::physical_address(wss_base) {
            line!("linux-wss-phys page=0 pa=0x{pa:x}");
        }
    }
    if let Some(d) = &disk {
        line!(
            "linux-disk path={} sectors={} direct={}",
            d.path,
            d.sectors,
            u8::from(d.direct)
        );
    }

    let g = Guest {
        wss_cpus: if cfg.workload.drives_device() {
            n.saturating_sub(1).max(1)
        } else {
            n
        },
        hb: Duration::from_millis(cfg.hb_ms),
        reset_at: (cfg.reset_after_ms != 0)
            .then(|| Instant::now() + Duration::from_millis(cfg.reset_after_ms)),
        cfg,
        opts,
        process,
        cpus,
        tsc_khz,
        wss_base,
        wss_pages,
        disk,
        udp,
    };
    let g: &'static Guest = GUEST.get_or_init(|| g);
    let threads: Vec<_> = g
        .cpus
        .iter()
        .enumerate()
        .map(|(k, &cpu)| {
            std::thread::Builder::new()
                .name(format!("cpu{k}"))
                .spawn(move || {
                    CPU.with(|c| c.set(Some(k)));
                    if let Err(e) = sys::pin_to(cpu) {
                        panic!("cannot pin to CPU {cpu}: {e}");
                    }
                    work::run(hb::Cpu::new(k, g))
                })
                .unwrap_or_else(|e| fail(format_args!("cannot start the thread of cpu {k}: {e}")))
        })
        .collect();
    // The CPUs run forever; a thread that ends panicked (and said so). The others go on.
    for t in threads {
        let _ = t.join();
    }
    fail(format_args!("every CPU stopped"));
}
