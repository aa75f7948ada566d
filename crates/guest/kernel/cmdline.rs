//! Kernel command line parsing (pure code: used by the guest in ring 3 and by host unit tests).
//!
//! The command line is a list of `key=value` items separated by ASCII whitespace. Keys this
//! guest knows are below; every other item is ignored. If a key appears twice the last wins.
//!
//! | key | values | default |
//! |---|---|---|
//! | `ferry.workload` | `idle`, `dirty`, `verify`, `disk-log`, `net-echo` | `idle` |
//! | `ferry.wss_mib` | 1 ..= 1048576 (MiB) | 64 |
//! | `ferry.rate_mibs` | 0 ..= 1048576 (MiB/s over all CPUs; 0 = unlimited) | 0 |
//! | `ferry.hb_ms` | 1 ..= 86400000 (ms) | 100 |
//! | `ferry.reset_after_ms` | 0 ..= 86400000 (ms; CPU 0 resets the machine via the i8042; 0 = never) | 0 |
//! | `ferry.rounds` | 0 ..= 2^40 (dirty: stop writing after this many rounds; 0 = never) | 0 |
//! | `ferry.tsc_khz` | 1000 ..= 100000000 (kHz) | measured |
//! | `ferry.disk_rate` | 0 ..= 1000000 (disk-log: records appended per second; 0 = as fast as possible) | 100 |
//! | `ferry.disk_flush` | 0 ..= 2^32 (disk-log: a flush request after every n-th record, if the device offers VIRTIO_BLK_F_FLUSH; 0 = never) | 0 |
//! | `ferry.ip` | `a.b.c.d` (net-echo: the guest's IPv4 address; unicast, not 0/8, 127/8 or >= 224.0.0.0) | none; required by net-echo |
//! | `ferry.load_mib` | 0 ..= 1048576 (disk-log, net-echo: CPUs 1.. run the dirty workload over a working set of this many MiB at `ferry.rate_mibs`, while CPU 0 drives the device; 0 = they idle) | 0 |
//! | `ferry.mac` | `xx:xx:xx:xx:xx:xx` (net-echo: MAC used if the device offers none; unicast) | `02:46:52:59:00:01` |
//! | `virtio_mmio.device` | `<size>@<base>:<irq>[:<id>]` (Linux syntax: size decimal or `0x` hex with optional `K`/`M`/`G`, >= 0x100; base decimal or `0x` hex, != 0; irq and id decimal; id ignored). Repeatable (up to 8); each one is a virtio-mmio transport | none |
//!
//! `ferry.workload=net-echo` without `ferry.ip` is an error (reported on the workload item).

/// The workload every CPU runs in ring 3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    Idle,
    Dirty,
    Verify,
    /// CPU 0 drives a virtio block device (append-only record log); the others idle.
    DiskLog,
    /// CPU 0 drives a virtio net device (ARP / ICMP echo / UDP echo); the others idle.
    NetEcho,
}

impl Workload {
    /// The name used on the command line and in the boot line.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Idle => "idle",
            Workload::Dirty => "dirty",
            Workload::Verify => "verify",
            Workload::DiskLog => "disk-log",
            Workload::NetEcho => "net-echo",
        }
    }

    /// True for the workloads that use the working set (WSS).
    pub fn uses_wss(self) -> bool {
        matches!(self, Workload::Dirty | Workload::Verify)
    }

    /// True for the workloads whose CPU 0 drives a virtio device (the other CPUs idle, or
    /// write a `ferry.load_mib` working set).
    pub fn drives_device(self) -> bool {
        matches!(self, Workload::DiskLog | Workload::NetEcho)
    }
}

/// Most `virtio_mmio.device=` entries accepted.
pub const MAX_VIRTIO_MMIO: usize = 8;

/// Smallest virtio-mmio register window accepted (the common registers end at 0x100).
pub const VIRTIO_MMIO_MIN_SIZE: u64 = 0x100;

/// MAC used by net-echo when the device offers none and `ferry.mac` is not given (locally
/// administered, unicast).
pub const DEFAULT_MAC: [u8; 6] = [0x02, 0x46, 0x52, 0x59, 0x00, 0x01];

/// One `virtio_mmio.device=<size>@<base>:<irq>` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmio {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

/// Parsed command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub workload: Workload,
    pub wss_mib: u64,
    pub rate_mibs: u64,
    pub hb_ms: u64,
    /// Dirty workload: rounds over the working set before it stops writing (0 = forever).
    pub rounds: u64,
    /// Reset the machine this long after boot (0 = never).
    pub reset_after_ms: u64,
    /// `ferry.tsc_khz` override, if given.
    pub tsc_khz: Option<u64>,
    /// disk-log: records per second (0 = unlimited).
    pub disk_rate: u64,
    /// disk-log: flush after every n-th record (0 = never).
    pub disk_flush: u64,
    /// disk-log/net-echo: MiB of working set CPUs 1.. keep dirtying (0 = none).
    pub load_mib: u64,
    /// net-echo: the guest's IPv4 address.
    pub ip: Option<[u8; 4]>,
    /// net-echo: `ferry.mac`, if given.
    pub mac: Option<[u8; 6]>,
    /// The `virtio_mmio.device=` entries, in command line order (`virtio_count` used).
    pub virtio: [VirtioMmio; MAX_VIRTIO_MMIO],
    pub virtio_count: usize,
}

impl Config {
    pub const DEFAULT: Config = Config {
        workload: Workload::Idle,
        wss_mib: 64,
        rate_mibs: 0,
        hb_ms: 100,
        rounds: 0,
        reset_after_ms: 0,
        tsc_khz: None,
        disk_rate: 100,
        disk_flush: 0,
        load_mib: 0,
        ip: None,
        mac: None,
        virtio: [VirtioMmio {
            base: 0,
            size: 0,
            irq: 0,
        }; MAX_VIRTIO_MMIO],
        virtio_count: 0,
    };

    /// The virtio-mmio transports given on the command line.
    pub fn virtio_devices(&self) -> &[VirtioMmio] {
        &self.virtio[..self.virtio_count]
    }
}

/// A command line item that could not be accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadItem<'a> {
    /// The whole `key=value` item.
    pub item: &'a [u8],
    /// Why.
    pub reason: &'static str,
}

fn parse_u64(v: &[u8], min: u64, max: u64) -> Result<u64, &'static str> {
    if v.is_empty() {
        return Err("empty value");
    }
    let mut n: u64 = 0;
    for &c in v {
        if !c.is_ascii_digit() {
            return Err("not a decimal number");
        }
        n = match n
            .checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(c - b'0')))
        {
            Some(n) => n,
            None => return Err("out of range"),
        };
    }
    if n < min || n > max {
        return Err("out of range");
    }
    Ok(n)
}

/// A number in decimal or, with a `0x`/`0X` prefix, hexadecimal (no range check).
fn parse_num(v: &[u8]) -> Result<u64, &'static str> {
    let (digits, radix) = match v {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (v, 10),
    };
    if digits.is_empty() {
        return Err("empty number");
    }
    let mut n: u64 = 0;
    for &c in digits {
        let d = match (c as char).to_digit(radix) {
            Some(d) => u64::from(d),
            None => return Err("bad number"),
        };
        n = n
            .checked_mul(u64::from(radix))
            .and_then(|n| n.checked_add(d))
            .ok_or("number out of range")?;
    }
    Ok(n)
}

/// `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` (the value part).
pub fn parse_virtio_mmio(v: &[u8]) -> Result<VirtioMmio, &'static str> {
    let at = v
        .iter()
        .position(|&c| c == b'@')
        .ok_or("expected <size>@<base>:<irq>")?;
    let (size_s, rest) = (&v[..at], &v[at + 1..]);
    let (size_num, shift) = match size_s.last() {
        Some(b'k' | b'K') => (&size_s[..size_s.len() - 1], 10),
        Some(b'm' | b'M') => (&size_s[..size_s.len() - 1], 20),
        Some(b'g' | b'G') => (&size_s[..size_s.len() - 1], 30),
        _ => (size_s, 0),
    };
    let size = parse_num(size_num)?;
    let size = size.checked_mul(1 << shift).ok_or("size out of range")?;
    if size < VIRTIO_MMIO_MIN_SIZE {
        return Err("size below 0x100");
    }
    let mut parts = rest.split(|&c| c == b':');
    let base = parse_num(parts.next().unwrap_or(b""))?;
    if base == 0 || base.checked_add(size).is_none() {
        return Err("bad base address");
    }
    let irq = parts.next().ok_or("expected <size>@<base>:<irq>")?;
    let irq = parse_u64(irq, 0, u64::from(u32::MAX)).map_err(|_| "bad irq")? as u32;
    if let Some(id) = parts.next() {
        parse_u64(id, 0, u64::from(u32::MAX)).map_err(|_| "bad device id")?;
    }
    if parts.next().is_some() {
        return Err("trailing characters");
    }
    Ok(VirtioMmio { base, size, irq })
}

/// Dotted-quad IPv4 address that can be a host's own unicast address.
pub fn parse_ip(v: &[u8]) -> Result<[u8; 4], &'static str> {
    let mut ip = [0u8; 4];
    let mut n = 0;
    for part in v.split(|&c| c == b'.') {
        if n == 4 || part.is_empty() || part.len() > 3 {
            return Err("expected a.b.c.d");
        }
        ip[n] = parse_u64(part, 0, 255).map_err(|_| "expected a.b.c.d")? as u8;
        n += 1;
    }
    if n != 4 {
        return Err("expected a.b.c.d");
    }
    if ip[0] == 0 || ip[0] == 127 || ip[0] >= 224 {
        return Err("not a unicast host address");
    }
    Ok(ip)
}

/// `xx:xx:xx:xx:xx:xx` (hex), unicast.
pub fn parse_mac(v: &[u8]) -> Result<[u8; 6], &'static str> {
    let mut mac = [0u8; 6];
    let mut n = 0;
    for part in v.split(|&c| c == b':') {
        if n == 6 || part.len() != 2 {
            return Err("expected xx:xx:xx:xx:xx:xx");
        }
        let hi = (part[0] as char).to_digit(16);
        let lo = (part[1] as char).to_digit(16);
        match (hi, lo) {
            (Some(hi), Some(lo)) => mac[n] = (hi * 16 + lo) as u8,
            _ => return Err("expected xx:xx:xx:xx:xx:xx"),
        }
        n += 1;
    }
    if n != 6 {
        return Err("expected xx:xx:xx:xx:xx:xx");
    }
    if mac[0] & 1 != 0 {
        return Err("multicast MAC");
    }
    Ok(mac)
}

/// Parses the command line (see the module doc).
pub fn parse(cmdline: &[u8]) -> Result<Config, BadItem<'_>> {
    let mut cfg = Config::DEFAULT;
    let mut workload_item: &[u8] = b"";
    for item in cmdline
        .split(|c| c.is_ascii_whitespace())
        .filter(|i| !i.is_empty())
    {
        let (key, value) = match item.iter().position(|&c| c == b'=') {
            Some(eq) => (&item[..eq], &item[eq + 1..]),
            None => (item, &item[item.len()..]),
        };
        let bad = |reason| BadItem { item, reason };
        match key {
            b"ferry.workload" => {
                cfg.workload =
                    match value {
                        b"idle" => Workload::Idle,
                        b"dirty" => Workload::Dirty,
                        b"verify" => Workload::Verify,
                        b"disk-log" => Workload::DiskLog,
                        b"net-echo" => Workload::NetEcho,
                        _ => return Err(bad(
                            "unknown workload; expected idle, dirty, verify, disk-log or net-echo",
                        )),
                    };
                workload_item = item;
            }
            b"ferry.wss_mib" => cfg.wss_mib = parse_u64(value, 1, 1 << 20).map_err(bad)?,
            b"ferry.rate_mibs" => cfg.rate_mibs = parse_u64(value, 0, 1 << 20).map_err(bad)?,
            b"ferry.hb_ms" => cfg.hb_ms = parse_u64(value, 1, 86_400_000).map_err(bad)?,
            b"ferry.reset_after_ms" => {
                cfg.reset_after_ms = parse_u64(value, 0, 86_400_000).map_err(bad)?
            }
            b"ferry.rounds" => cfg.rounds = parse_u64(value, 0, 1 << 40).map_err(bad)?,
            b"ferry.tsc_khz" => {
                cfg.tsc_khz = Some(parse_u64(value, 1000, 100_000_000).map_err(bad)?)
            }
            b"ferry.disk_rate" => cfg.disk_rate = parse_u64(value, 0, 1_000_000).map_err(bad)?,
            b"ferry.disk_flush" => cfg.disk_flush = parse_u64(value, 0, 1 << 32).map_err(bad)?,
            b"ferry.load_mib" => cfg.load_mib = parse_u64(value, 0, 1 << 20).map_err(bad)?,
            b"ferry.ip" => cfg.ip = Some(parse_ip(value).map_err(bad)?),
            b"ferry.mac" => cfg.mac = Some(parse_mac(value).map_err(bad)?),
            b"virtio_mmio.device" => {
                let dev = parse_virtio_mmio(value).map_err(bad)?;
                if cfg.virtio_count == MAX_VIRTIO_MMIO {
                    return Err(bad("too many virtio_mmio.device entries (at most 8)"));
                }
                cfg.virtio[cfg.virtio_count] = dev;
                cfg.virtio_count += 1;
            }
            _ => {}
        }
    }
    if cfg.workload == Workload::NetEcho && cfg.ip.is_none() {
        return Err(BadItem {
            item: workload_item,
            reason: "net-echo requires ferry.ip=<a.b.c.d>",
        });
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_values() {
        assert_eq!(parse(b""), Ok(Config::DEFAULT));
        assert_eq!(
            parse(b"  console=ttyS0 foo ferry.unknown=3 "),
            Ok(Config::DEFAULT)
        );
        let c = parse(b"ferry.workload=verify ferry.wss_mib=32\tferry.rate_mibs=10 ferry.hb_ms=250 ferry.tsc_khz=2600000\n")
            .unwrap();
        assert_eq!(
            c,
            Config {
                workload: Workload::Verify,
                wss_mib: 32,
                rate_mibs: 10,
                hb_ms: 250,
                rounds: 0,
                reset_after_ms: 0,
                tsc_khz: Some(2_600_000),
                ..Config::DEFAULT
            }
        );
        assert_eq!(
            parse(b"ferry.workload=dirty ferry.workload=idle")
                .unwrap()
                .workload,
            Workload::Idle
        );
        assert_eq!(parse(b"ferry.rate_mibs=0").unwrap().rate_mibs, 0);
    }

    #[test]
    fn bad_values() {
        let e = parse(b"a=b ferry.wss_mib=12x ferry.hb_ms=5").unwrap_err();
        assert_eq!(
            e,
            BadItem {
                item: b"ferry.wss_mib=12x",
                reason: "not a decimal number"
            }
        );
        assert_eq!(
            parse(b"ferry.workload=busy").unwrap_err().item,
            b"ferry.workload=busy"
        );
        assert_eq!(parse(b"ferry.hb_ms=0").unwrap_err().reason, "out of range");
        assert_eq!(parse(b"ferry.hb_ms=").unwrap_err().reason, "empty value");
        assert_eq!(parse(b"ferry.wss_mib").unwrap_err().reason, "empty value");
        assert_eq!(
            parse(b"ferry.wss_mib=-1").unwrap_err().reason,
            "not a decimal number"
        );
        assert_eq!(
            parse(b"ferry.rate_mibs=99999999999999999999999")
                .unwrap_err()
                .reason,
            "out of range"
        );
        assert_eq!(
            parse(b"ferry.tsc_khz=0").unwrap_err().reason,
            "out of range"
        );
    }

    #[test]
    fn new_workloads_and_keys() {
        let c = parse(b"ferry.workload=disk-log ferry.disk_rate=0 ferry.disk_flush=10").unwrap();
        assert_eq!(c.workload, Workload::DiskLog);
        assert_eq!((c.disk_rate, c.disk_flush), (0, 10));
        assert!(!c.workload.uses_wss());
        assert!(c.workload.drives_device());
        assert_eq!(c.load_mib, 0);
        assert_eq!(Config::DEFAULT.disk_rate, 100);
        let c = parse(b"ferry.workload=disk-log ferry.load_mib=24").unwrap();
        assert_eq!(c.load_mib, 24);
        assert_eq!(
            parse(b"ferry.load_mib=x").unwrap_err().item,
            b"ferry.load_mib=x"
        );
        let c = parse(b"ferry.workload=net-echo ferry.ip=10.77.0.5 ferry.mac=52:54:00:AB:cd:0f")
            .unwrap();
        assert_eq!(c.workload, Workload::NetEcho);
        assert_eq!(c.workload.name(), "net-echo");
        assert_eq!(c.ip, Some([10, 77, 0, 5]));
        assert_eq!(c.mac, Some([0x52, 0x54, 0, 0xab, 0xcd, 0x0f]));
        // net-echo needs an address; the error names the workload item
        let e = parse(b"x ferry.workload=net-echo y").unwrap_err();
        assert_eq!(e.item, b"ferry.workload=net-echo");
        assert_eq!(e.reason, "net-echo requires ferry.ip=<a.b.c.d>");
        // ... given anywhere on the line
        assert!(parse(b"ferry.ip=192.168.1.254 ferry.workload=net-echo").is_ok());
    }

    #[test]
    fn ip_and_mac_syntax() {
        for bad in [
            &b"10.0.0"[..],
            b"10.0.0.1.2",
            b"10.0.0.256",
            b"10..0.1",
            b"10.0.0.x",
            b"0.1.2.3",
            b"127.0.0.1",
            b"224.0.0.1",
            b"255.255.255.255",
            b"",
            b"1.2.3.0004",
        ] {
            assert!(parse_ip(bad).is_err(), "{:?}", core::str::from_utf8(bad));
        }
        assert_eq!(parse_ip(b"1.2.3.4"), Ok([1, 2, 3, 4]));
        for bad in [
            &b"52:54:00:12:34"[..],
            b"52:54:00:12:34:56:78",
            b"52:54:00:12:34:5",
            b"52:54:00:12:34:5g",
            b"01:00:5e:00:00:01",
            b"52-54-00-12-34-56",
        ] {
            assert!(parse_mac(bad).is_err(), "{:?}", core::str::from_utf8(bad));
        }
        assert_eq!(
            parse(b"ferry.mac=01:00:5e:00:00:01").unwrap_err().reason,
            "multicast MAC"
        );
        assert_eq!(
            parse(b"ferry.ip=1.2.3").unwrap_err().item,
            b"ferry.ip=1.2.3"
        );
    }

    #[test]
    fn virtio_mmio_entries() {
        let c = parse(
            b"console=ttyS0 virtio_mmio.device=512@0xfeb00e00:12 virtio_mmio.device=4K@0xd0001000:5 \
              virtio_mmio.device=0x1000@3489660928:6:2",
        )
        .unwrap();
        assert_eq!(
            c.virtio_devices(),
            &[
                VirtioMmio {
                    base: 0xfeb0_0e00,
                    size: 512,
                    irq: 12
                },
                VirtioMmio {
                    base: 0xd000_1000,
                    size: 4096,
                    irq: 5
                },
                VirtioMmio {
                    base: 0xd000_0000,
                    size: 4096,
                    irq: 6
                },
            ]
        );
        assert_eq!(parse_virtio_mmio(b"1M@0x1000:0").unwrap().size, 1 << 20);
        assert_eq!(parse_virtio_mmio(b"0x2k@0X1000:0").unwrap().size, 2048);
        for bad in [
            &b"512"[..],
            b"512@",
            b"512@0xfeb00000",
            b"512@0xfeb00000:",
            b"512@0xfeb00000:x",
            b"512@0xfeb00000:1:2:3",
            b"512@0xfeb00000:1:z",
            b"255@0xfeb00000:1",
            b"0@0xfeb00000:1",
            b"@0xfeb00000:1",
            b"4Q@0xfeb00000:1",
            b"512@0:1",
            b"512@0x:1",
            b"512@0xfffffffffffffff0:1",
            b"99999999999999999999G@0x1000:1",
        ] {
            assert!(
                parse_virtio_mmio(bad).is_err(),
                "{:?}",
                core::str::from_utf8(bad)
            );
        }
        let nine = b"virtio_mmio.device=4K@0x1000:1 ".repeat(9);
        let e = parse(&nine).unwrap_err();
        assert_eq!(e.reason, "too many virtio_mmio.device entries (at most 8)");
        assert_eq!(parse(&nine[..nine.len() - 31]).unwrap().virtio_count, 8);
    }
}
