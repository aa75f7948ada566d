//! TAP devices: the host end of a virtio-net NIC.
//!
//! A TAP is opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and a 12-byte vnet header (the
//! `virtio_net_hdr_v1` a VERSION_1 driver uses), so frames move between the guest's buffers
//! and the TAP without reformatting. A TAP Ferry creates itself is attached to a bridge and
//! brought up; it disappears when the worker exits (it is not persistent).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// Size of the virtio-net header both the guest and the TAP use.
pub const VNET_HDR_LEN: usize = 12;
pub(crate) const SIOCBRADDIF: libc::c_ulong = 0x89a2;

/// TAP errors.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    #[error("interface name {0:?} is invalid (1-15 characters, no '/', ':' or whitespace)")]
    Name(String),
    #[error("cannot create TAP {name}: {err}")]
    Create { name: String, err: io::Error },
    #[error("TAP {name}: {op} failed: {err}")]
    Ioctl {
        name: String,
        op: &'static str,
        err: io::Error,
    },
    #[error("cannot attach TAP {tap} to bridge {bridge}: {err}")]
    Bridge {
        tap: String,
        bridge: String,
        err: io::Error,
    },
}

/// An open TAP device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

fn ifreq_named(name: &str) -> Result<libc::ifreq, TapError> {
    if name.is_empty()
        || name.len() >= libc::IFNAMSIZ
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
    {
        return Err(TapError::Name(name.to_string()));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(req)
}

fn ctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Tap {
    /// Opens (creating if needed) TAP `name`; `%d` in the name lets the kernel pick a number.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let mut req = ifreq_named(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as _, &mut req) };
        if r < 0 {
            return Err(TapError::Create {
                name: name.to_string(),
                err: io::Error::last_os_error(),
            });
        }
        let actual: Vec<u8> = req
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        let name = String::from_utf8_lossy(&actual).to_string();
        let hdr: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ as _, &hdr) };
        if r < 0 {
            return Err(TapError::Ioctl {
                name,
                op: "TUNSETVNETHDRSZ",
                err: io::Error::last_os_error(),
            });
        }
        Ok(Tap { file, name })
    }

    /// Creates a TAP, attaches it to `bridge` and brings it up.
    pub fn on_bridge(name: &str, bridge: &str) -> Result<Tap, TapError> {
        let tap = Tap::open(name)?;
        tap.attach(bridge)?;
        tap.set_up()?;
        Ok(tap)
    }

    /// The interface name.
    /// Fuzzing hook (the `ferry-fuzz` crate): a `Tap` over any open file, e.g. one end of a
    /// socket pair standing in for `/dev/net/tun`. Not for production use.
    #[doc(hidden)]
    pub fn from_file_for_fuzzing(file: File, name: &str) -> Tap {
        Tap {
            file,
            name: name.to_string(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The TAP file (non-blocking; each read or write is one frame with its vnet header).
    pub fn file(&self) -> &File {
        &self.file
    }

    fn ioctl_err(&self, op: &'static str) -> TapError {
        TapError::Ioctl {
            name: self.name.clone(),
            op,
            err: io::Error::last_os_error(),
        }
    }

    /// Sets the interface up.
    pub fn set_up(&self) -> Result<(), TapError> {
        let sock = ctl_socket().map_err(|err| TapError::Ioctl {
            name: self.name.clone(),
            op: "socket",
            err,
        })?;
        let mut req = ifreq_named(&self.name)?;
        // SAFETY: SIOCGIFFLAGS fills the flags member of one ifreq.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) } < 0 {
            return Err(self.ioctl_err("SIOCGIFFLAGS"));
        }
        // SAFETY: the kernel just filled ifru_flags.
        unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as i16 };
        // SAFETY: SIOCSIFFLAGS reads one ifreq.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req) } < 0 {
            return Err(self.ioctl_err("SIOCSIFFLAGS"));
        }
        Ok(())
    }

    /// The interface index.
    pub fn index(&self) -> Result<i32, TapError> {
        let sock = ctl_socket().map_err(|err| TapError::Ioctl {
            name: self.name.clone(),
            op: "socket",
            err,
        })?;
        let mut req = ifreq_named(&self.name)?;
        // SAFETY: SIOCGIFINDEX fills the ifindex member of one ifreq.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFINDEX as _, &mut req) } < 0 {
            return Err(self.ioctl_err("SIOCGIFINDEX"));
        }
        // SAFETY: the kernel just filled ifru_ifindex.
        Ok(unsafe { req.ifr_ifru.ifru_ifindex })
    }

    /// Turns the TAP's carrier on or off (`TUNSETCARRIER`; the descriptor's owner may, with
    /// no capability): with the carrier off a bridge forwards nothing to this port.
    pub fn set_carrier(&self, on: bool) -> Result<(), TapError> {
        let v: libc::c_int = on.into();
        // SAFETY: TUNSETCARRIER reads one int.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETCARRIER as _, &v) } < 0 {
            return Err(self.ioctl_err("TUNSETCARRIER"));
        }
        Ok(())
    }

    /// Makes the TAP a port of `bridge`.
    pub fn attach(&self, bridge: &str) -> Result<(), TapError> {
        let index = self.index()?;
        let err = |err| TapError::Bridge {
            tap: self.name.clone(),
            bridge: bridge.to_string(),
            err,
        };
        let sock = ctl_socket().map_err(err)?;
        let mut req = ifreq_named(bridge)?;
        req.ifr_ifru.ifru_ifindex = index;
        // SAFETY: SIOCBRADDIF reads one ifreq naming the bridge and the port's index.
        if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCBRADDIF as _, &req) } < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Writes one frame (vnet header included). `Ok(false)`: the TAP queue is full and the
    /// frame was dropped, as a NIC drops on a full transmit queue.
    pub fn send(&self, frame: &[u8]) -> io::Result<bool> {
        match (&self.file).write(frame) {
            // A TAP takes a frame whole or not at all.
            Ok(n) => Ok(n == frame.len()),
            Err(e) => match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::ENOBUFS) => Ok(false),
                // The interface is down (e.g. the bridge port was removed): the frame is lost.
                Some(libc::EIO) => Ok(false),
                _ => Err(e),
            },
        }
    }

    /// Reads one frame (vnet header included) into `buf`. `Ok(None)`: nothing queued.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match (&self.file).read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Whether a network interface of this name exists in this network namespace.
pub fn interface_exists(name: &str) -> bool {
    let Ok(mut req) = ifreq_named(name) else {
        return false;
    };
    let Ok(sock) = ctl_socket() else {
        return false;
    };
    // SAFETY: SIOCGIFINDEX fills the ifindex member of one ifreq.
    unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFINDEX as _, &mut req) >= 0 }
}

/// Builds a RARP "reverse request" from `mac`, the frame QEMU and others send after a
/// migration so that switches learn where the MAC now lives (vnet header included).
pub fn rarp_announce(mac: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&[0xff; 6]); // broadcast
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x80, 0x35]); // ETH_P_RARP
    f.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4]); // Ethernet, IPv4, hlen, plen
    f.extend_from_slice(&[0x00, 0x03]); // reverse request
    f.extend_from_slice(&mac); // sender hardware address
    f.extend_from_slice(&[0; 4]); // sender protocol address
    f.extend_from_slice(&mac); // target hardware address
    f.extend_from_slice(&[0; 4]); // target protocol address
    f.resize(VNET_HDR_LEN + 60, 0); // minimum Ethernet frame without FCS
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(matches!(ifreq_named(""), Err(TapError::Name(_))));
        assert!(matches!(
            ifreq_named("a-name-that-is-too-long"),
            Err(TapError::Name(_))
        ));
        assert!(matches!(ifreq_named("a b"), Err(TapError::Name(_))));
        assert!(ifreq_named("fy123n0").is_ok());
    }

    #[test]
    fn rarp_frame_layout() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let f = rarp_announce(mac);
        assert_eq!(f.len(), VNET_HDR_LEN + 60);
        let e = &f[VNET_HDR_LEN..];
        assert_eq!(&e[0..6], &[0xff; 6]);
        assert_eq!(&e[6..12], &mac);
        assert_eq!(&e[12..14], &[0x80, 0x35]);
        assert_eq!(&e[20..22], &[0, 3]);
        assert_eq!(&e[22..28], &mac);
        assert_eq!(&e[32..38], &mac);
    }
}
