//! virtio-net over a TAP device.
//!
//! Queue 0 receives, queue 1 transmits. Transmit is synchronous (the frame goes to the TAP
//! while the notifying vCPU waits). A receive thread per NIC waits for frames on the TAP and
//! for the driver to post buffers, copies each frame into one guest buffer (no mergeable
//! buffers, no offloads: the driver must post buffers of at least 1526 bytes) and completes it.
//! While the VM is paused the thread leaves the TAP alone; frames that arrive meanwhile wait in
//! the TAP's queue (up to its length) and are delivered after resume. Saving the device state
//! first moves the frames waiting in the TAP into the device's own receive backlog, which is
//! part of the state: frames that reached the source while the VM was paused for a migration
//! are delivered by the destination instead of dying with the source's TAP. (Frames that reach
//! the source after that would be lost, but the destination announces the MAC as soon as it
//! hears that the source paused — well before the source saves the state — so from then on
//! frames queue in the destination's TAP until the VM resumes there.)

use super::{DeviceError, Kind, VirtioMmio, INT_VRING};
use crate::config::NicConfig;
use crate::devices::tap::{rarp_announce, Tap, VNET_HDR_LEN};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_queue::{QueueT, Reader, Writer};
use vmm_sys_util::eventfd::EventFd;

/// Receive and transmit queues of 256 entries.
pub(crate) const QUEUE_SIZES: &[u16] = &[256, 256];
/// The receive queue.
pub const RX_QUEUE: usize = 0;
/// The transmit queue.
pub const TX_QUEUE: usize = 1;
/// Largest frame (vnet header included) either direction accepts.
const MAX_FRAME: usize = VNET_HDR_LEN + 65535;
/// Frames delivered per lock hold before the receive thread lets the vCPUs in.
const RX_BATCH: usize = 64;
/// When the VMM announces a migrated VM's MAC, relative to resume.
const ANNOUNCE_SCHEDULE_MS: &[u64] = &[0, 50, 150, 300];
/// Most frames the receive backlog holds (read from the TAP, not yet given to the guest); with
/// 64 KiB frames at most that bounds the backlog in a saved state to 16 MiB.
pub const MAX_BACKLOG: usize = 256;

/// What the NIC carries across a migration besides the transport.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NetState {
    pub mac: [u8; 6],
    /// Received frames (virtio-net header included) not yet delivered to the guest, oldest
    /// first.
    pub rx_backlog: Vec<Vec<u8>>,
}

/// Counters of one NIC (this host only; they restart on a migration destination).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub tap: String,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames that did not fit the guest's buffer.
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames the TAP refused (queue full or link down) or that were malformed.
    pub tx_dropped: u64,
    pub announces: u64,
    /// Frames carried in saved state (on the source: taken from the TAP at the pause; on a
    /// destination: received with the VM).
    pub rx_carried: u64,
}

pub(crate) struct Net {
    mac: [u8; 6],
    pub(crate) tap: Arc<Tap>,
    wake: Arc<EventFd>,
    /// Frames read from the TAP that wait for receive buffers (at most [`MAX_BACKLOG`]).
    backlog: VecDeque<Vec<u8>>,
    stats: NetStats,
    announces: Arc<AtomicU64>,
}

impl Net {
    pub(crate) fn new(
        index: usize,
        nic: &NicConfig,
        backend: &super::NetBackend,
    ) -> Result<Net, DeviceError> {
        let err = |e: crate::devices::tap::TapError| DeviceError::Nic {
            index,
            msg: e.to_string(),
        };
        let tap = match (crate::privilege::tap(index), backend) {
            // Created before the worker dropped its privileges (or refused after the drop).
            (Some(t), _) => t.map_err(|e| DeviceError::Nic {
                index,
                msg: e.to_string(),
            })?,
            (None, super::NetBackend::Bridge(br)) => {
                Tap::on_bridge(&format!("fy{}n{index}", std::process::id()), br).map_err(err)?
            }
            (None, super::NetBackend::Tap(name)) => {
                let t = Tap::open(name).map_err(err)?;
                t.set_up().map_err(err)?;
                t
            }
        };
        Net::over_tap(nic, index, tap)
    }

    /// NIC number `index` over an open, up `tap`.
    fn over_tap(nic: &NicConfig, index: usize, tap: Tap) -> Result<Net, DeviceError> {
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| DeviceError::Nic {
            index,
            msg: format!("eventfd: {e}"),
        })?;
        Ok(Net {
            mac: nic.mac.0,
            stats: NetStats {
                tap: tap.name().to_string(),
                ..Default::default()
            },
            tap: Arc::new(tap),
            wake: Arc::new(wake),
            backlog: VecDeque::new(),
            announces: Arc::new(AtomicU64::new(0)),
        })
    }

    pub(crate) fn features(&self) -> u64 {
        1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS
    }

    /// `struct virtio_net_config`: mac, status.
    pub(crate) fn config_space(&self) -> Vec<u8> {
        let mut c = self.mac.to_vec();
        c.extend_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c
    }

    /// Saves the NIC (the VM is paused): the frames waiting in the TAP join the backlog first.
    pub(crate) fn state(&mut self) -> NetState {
        let before = self.backlog.len();
        self.fill_backlog(&mut vec![0u8; MAX_FRAME], MAX_BACKLOG);
        self.stats.rx_carried += (self.backlog.len() - before) as u64;
        NetState {
            mac: self.mac,
            rx_backlog: self.backlog.iter().cloned().collect(),
        }
    }

    /// Reads frames from the TAP (without waiting) until it is empty or the backlog holds
    /// `limit` frames. Returns false when nothing was there.
    fn fill_backlog(&mut self, buf: &mut [u8], limit: usize) -> bool {
        let mut any = false;
        while self.backlog.len() < limit {
            match self.tap.recv(buf) {
                Ok(Some(n)) if n >= VNET_HDR_LEN => {
                    self.backlog.push_back(buf[..n].to_vec());
                    any = true;
                }
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
        any
    }

    /// Checks saved NIC state against this NIC (untrusted input).
    pub(crate) fn check_state(&self, s: &NetState) -> Result<(), DeviceError> {
        if s.mac != self.mac {
            return Err(DeviceError::State(format!(
                "NIC MAC {} saved, {} configured",
                fmt_mac(s.mac),
                fmt_mac(self.mac)
            )));
        }
        if s.rx_backlog.len() > MAX_BACKLOG {
            return Err(DeviceError::State(format!(
                "{} received frames saved, at most {MAX_BACKLOG} are accepted",
                s.rx_backlog.len()
            )));
        }
        if let Some(f) = s
            .rx_backlog
            .iter()
            .find(|f| f.len() < VNET_HDR_LEN || f.len() > MAX_FRAME)
        {
            return Err(DeviceError::State(format!(
                "a saved received frame has {} bytes (valid: {VNET_HDR_LEN}..={MAX_FRAME})",
                f.len()
            )));
        }
        Ok(())
    }

    /// Loads checked saved state.
    pub(crate) fn restore(&mut self, s: &NetState) {
        self.backlog = s.rx_backlog.iter().cloned().collect();
        self.stats.rx_carried += self.backlog.len() as u64;
    }

    pub(crate) fn reset(&mut self) {
        self.backlog.clear();
    }

    pub(crate) fn wake_rx(&self) {
        let _ = self.wake.write(1);
    }

    pub(crate) fn tap_name(&self) -> &str {
        self.tap.name()
    }

    pub(crate) fn stats(&self) -> NetStats {
        NetStats {
            announces: self.announces.load(Ordering::Relaxed),
            ..self.stats.clone()
        }
    }

    /// Sends one RARP announcement of the MAC now.
    pub(crate) fn announce_once(&self) {
        if self.tap.send(&rarp_announce(self.mac)).unwrap_or(false) {
            self.announces.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sends RARP announcements of the MAC: one now, the rest from a background thread.
    pub(crate) fn announce(&self) {
        let frame = rarp_announce(self.mac);
        let (tap, count) = (self.tap.clone(), self.announces.clone());
        if tap.send(&frame).unwrap_or(false) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        let _ = std::thread::Builder::new()
            .name("announce".into())
            .spawn(move || {
                let mut prev = 0;
                for &at in &ANNOUNCE_SCHEDULE_MS[1..] {
                    std::thread::sleep(Duration::from_millis(at - prev));
                    prev = at;
                    if tap.send(&frame).unwrap_or(false) {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
    }
}

impl Net {
    /// Fuzzing hook: a NIC over an already open `tap` (see [`Tap::from_file_for_fuzzing`]).
    #[doc(hidden)]
    pub(crate) fn with_tap_for_fuzzing(nic: &NicConfig, tap: Tap) -> Result<Net, DeviceError> {
        Net::over_tap(nic, 0, tap)
    }
}

/// Fuzzing hook: one round of the receive thread's work on `dev`, under the same conditions
/// as `rx_loop` (a NIC, VM running, driver ready, receive queue ready).
#[doc(hidden)]
pub(crate) fn rx_round_for_fuzzing(dev: &mut VirtioMmio) {
    if !matches!(dev.kind, Kind::Net(_))
        || !dev.active
        || !dev.driver_ok()
        || !dev.queues[RX_QUEUE].ready()
    {
        return;
    }
    let mut buf = vec![0u8; MAX_FRAME];
    let _ = deliver(dev, &mut buf);
}

/// Formats a MAC address as `52:54:00:12:34:56`.
pub fn fmt_mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Sends every frame the driver queued on the transmit queue; true if any completed.
pub(crate) fn process_tx(dev: &mut VirtioMmio, q: usize) -> bool {
    if q != TX_QUEUE {
        return false;
    }
    let ram = dev.ram.clone();
    let mem = ram.memory();
    let Kind::Net(net) = &mut dev.kind else {
        return false;
    };
    let mut used = false;
    while let Some(chain) = dev.queues[q].pop_descriptor_chain(mem) {
        let head = chain.head_index();
        match Reader::new(mem, chain) {
            Ok(mut r) => {
                let n = r.available_bytes();
                let mut buf = vec![0u8; n.min(MAX_FRAME)];
                let ok = (VNET_HDR_LEN..=MAX_FRAME).contains(&n)
                    && std::io::Read::read_exact(&mut r, &mut buf).is_ok()
                    && net.tap.send(&buf).unwrap_or(false);
                if ok {
                    net.stats.tx_frames += 1;
                    net.stats.tx_bytes += (n - VNET_HDR_LEN) as u64;
                } else {
                    net.stats.tx_dropped += 1;
                }
            }
            Err(_) => net.stats.tx_dropped += 1,
        }
        if dev.queues[q].add_used(mem, head, 0).is_err() {
            dev.status |= virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
            break;
        }
        used = true;
    }
    used
}

/// Outcome of one delivery round.
enum Rx {
    /// The TAP is empty: wait for frames.
    Drained,
    /// The guest has no receive buffer: wait for it to post some.
    Starved,
    /// The batch limit was hit: go again.
    More,
}

fn deliver(dev: &mut VirtioMmio, buf: &mut [u8]) -> Rx {
    let ram = dev.ram.clone();
    let mem = ram.memory();
    let Kind::Net(net) = &mut dev.kind else {
        return Rx::Drained;
    };
    let mut used = false;
    let mut outcome = Rx::More;
    for _ in 0..RX_BATCH {
        if net.backlog.is_empty() && !net.fill_backlog(buf, 1) {
            outcome = Rx::Drained;
            break;
        }
        let Some(chain) = dev.queues[RX_QUEUE].pop_descriptor_chain(mem) else {
            outcome = Rx::Starved;
            break;
        };
        let head = chain.head_index();
        let mut frame = net.backlog.pop_front().expect("a backlog frame");
        // virtio_net_hdr_v1.num_buffers: one buffer per frame (no mergeable buffers).
        frame[10..12].copy_from_slice(&1u16.to_le_bytes());
        let written = Writer::new(mem, chain).ok().is_some_and(|mut w| {
            w.available_bytes() >= frame.len() && std::io::Write::write_all(&mut w, &frame).is_ok()
        });
        let len = if written {
            net.stats.rx_frames += 1;
            net.stats.rx_bytes += (frame.len() - VNET_HDR_LEN) as u64;
            frame.len() as u32
        } else {
            // Too small a buffer (the driver must post at least 1526 bytes) or not in RAM.
            net.stats.rx_dropped += 1;
            0
        };
        if dev.queues[RX_QUEUE].add_used(mem, head, len).is_err() {
            dev.status |= virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
            outcome = Rx::Starved;
            break;
        }
        used = true;
    }
    if used {
        dev.signal(INT_VRING);
    }
    outcome
}

/// The receive thread of one NIC.
pub(crate) struct RxThread {
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    join: std::thread::JoinHandle<()>,
}

impl RxThread {
    /// Starts the receive thread if `dev` is a NIC.
    pub(crate) fn spawn(dev: Arc<Mutex<VirtioMmio>>) -> Result<Option<RxThread>, DeviceError> {
        let (tap, wake) = match &dev.lock().unwrap_or_else(|e| e.into_inner()).kind {
            Kind::Net(n) => (n.tap.clone(), n.wake.clone()),
            Kind::Block(_) => return Ok(None),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let w = wake.clone();
        let join = std::thread::Builder::new()
            .name(format!("net-rx-{}", tap.name()))
            .spawn(move || rx_loop(dev, tap, w, s))
            .map_err(|e| DeviceError::Nic {
                index: 0,
                msg: format!("cannot start the receive thread: {e}"),
            })?;
        Ok(Some(RxThread { stop, wake, join }))
    }

    pub(crate) fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
        let _ = self.join.join();
    }
}

fn rx_loop(dev: Arc<Mutex<VirtioMmio>>, tap: Arc<Tap>, wake: Arc<EventFd>, stop: Arc<AtomicBool>) {
    let mut buf = vec![0u8; MAX_FRAME];
    let mut watch_tap = true;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: tap.file().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let (n, timeout) = if watch_tap { (2, -1) } else { (1, 20) };
        // SAFETY: `fds` is a valid array of at least `n` pollfds that outlives the call.
        unsafe { libc::poll(fds.as_mut_ptr(), n, timeout) };
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let _ = wake.read();
        let mut g = dev.lock().unwrap_or_else(|e| e.into_inner());
        if !g.active || !g.driver_ok() || !g.queues[RX_QUEUE].ready() {
            watch_tap = false;
            continue;
        }
        watch_tap = match deliver(&mut g, &mut buf) {
            Rx::Drained | Rx::More => true,
            // Poll the wake eventfd only; the 20 ms timeout also covers a driver that posts
            // buffers without notifying.
            Rx::Starved => false,
        };
    }
}
