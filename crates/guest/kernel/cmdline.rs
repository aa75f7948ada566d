//! Kernel command line parsing (pure code: used by the guest in ring 3 and by host unit tests).
//!
//! The command line is a list of `key=value` items separated by ASCII whitespace. Keys this
//! guest knows are below; every other item is ignored. If a key appears twice the last wins.
//!
//! | key | values | default |
//! |---|---|---|
//! | `ferry.workload` | `idle`, `dirty`, `verify` | `idle` |
//! | `ferry.wss_mib` | 1 ..= 1048576 (MiB) | 64 |
//! | `ferry.rate_mibs` | 0 ..= 1048576 (MiB/s over all CPUs; 0 = unlimited) | 0 |
//! | `ferry.hb_ms` | 1 ..= 86400000 (ms) | 100 |
//! | `ferry.reset_after_ms` | 0 ..= 86400000 (ms; CPU 0 resets the machine via the i8042; 0 = never) | 0 |
//! | `ferry.rounds` | 0 ..= 2^40 (dirty: stop writing after this many rounds; 0 = never) | 0 |
//! | `ferry.tsc_khz` | 1000 ..= 100000000 (kHz) | measured |

/// The workload every CPU runs in ring 3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    Idle,
    Dirty,
    Verify,
}

impl Workload {
    /// The name used on the command line and in the boot line.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Idle => "idle",
            Workload::Dirty => "dirty",
            Workload::Verify => "verify",
        }
    }
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
    };
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

/// Parses the command line (see the module doc).
pub fn parse(cmdline: &[u8]) -> Result<Config, BadItem<'_>> {
    let mut cfg = Config::DEFAULT;
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
                cfg.workload = match value {
                    b"idle" => Workload::Idle,
                    b"dirty" => Workload::Dirty,
                    b"verify" => Workload::Verify,
                    _ => return Err(bad("unknown workload; expected idle, dirty or verify")),
                }
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
            _ => {}
        }
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
                tsc_khz: Some(2_600_000)
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
}
