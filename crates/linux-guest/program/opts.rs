//! Where the command line comes from, and the options only the Linux workload has.
//!
//! The `ferry.*` options of the test guest are parsed by the test guest's own parser
//! (`crates/guest/kernel/cmdline.rs`, included unchanged); this adds the Linux-only keys, which
//! the test guest ignores (it ignores every unknown key):
//!
//! | key | values | default |
//! |---|---|---|
//! | `ferry.disk` | path of the disk-log device or file | `/dev/vda` |
//! | `ferry.udp_port` | 1 ..= 65535: the UDP port net-echo echoes on | 7 (`ferry netprobe`'s default) |

/// The environment variable that makes this a plain process (see main.rs: "Modes").
pub const CMDLINE_ENV: &str = "FERRY_CMDLINE";

/// Linux-only options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinuxOpts {
    pub disk: String,
    pub udp_port: u16,
}

/// A bad Linux-only item: (the item, why).
pub type Bad = (String, &'static str);

/// Parses the Linux-only keys of `cmdline` (last one wins, as in the test guest).
pub fn parse(cmdline: &str) -> Result<LinuxOpts, Bad> {
    let mut o = LinuxOpts {
        disk: "/dev/vda".to_string(),
        udp_port: 7,
    };
    for item in cmdline.split_ascii_whitespace() {
        let (key, value) = item.split_once('=').unwrap_or((item, ""));
        match key {
            "ferry.disk" => {
                if value.is_empty() {
                    return Err((item.to_string(), "empty value"));
                }
                o.disk = value.to_string();
            }
            "ferry.udp_port" => {
                o.udp_port = match value.parse::<u16>() {
                    Ok(p) if p != 0 && value.bytes().all(|c| c.is_ascii_digit()) => p,
                    _ => return Err((item.to_string(), "expected a port 1..=65535")),
                }
            }
            _ => {}
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_options() {
        let o = parse("console=ttyS0 ferry.workload=disk-log").unwrap();
        assert_eq!((o.disk.as_str(), o.udp_port), ("/dev/vda", 7));
        let o = parse("ferry.disk=/tmp/x ferry.udp_port=7777 ferry.disk=/dev/vdb").unwrap();
        assert_eq!((o.disk.as_str(), o.udp_port), ("/dev/vdb", 7777));
        for bad in [
            "ferry.udp_port=0",
            "ferry.udp_port=65536",
            "ferry.udp_port=+5",
            "ferry.udp_port=",
            "ferry.disk=",
        ] {
            assert_eq!(parse(bad).unwrap_err().0, bad);
        }
    }
}
