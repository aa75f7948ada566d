//! `ferry.workload=net-echo`: a virtio-net driver (ring 3, CPU 0) answering ARP, ICMP echo and
//! UDP (packet logic in `netpkt.rs`). See the doc comment of main.rs for the behaviour and
//! output lines.

use crate::cmdline::{Config, DEFAULT_MAC};
use crate::line::Line;
use crate::netpkt::{gratuitous_arp, handle_frame, Kind, Me};
use crate::virtio::{self, dma_alloc, phys, Mmio};
use crate::virtq::{Buf, Used, Virtq};
use crate::heartbeat::heartbeat_if_due;
use crate::rt::{rdtsc, wait_until};
use crate::state::{PerCpu, Shared};

/// VIRTIO_NET_F_MAC.
const F_MAC: u64 = 1 << 5;
/// virtio-net header with VIRTIO_F_VERSION_1 (flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers): all zero on transmit, ignored on receive.
const HDR: usize = 12;
/// Bytes per RX/TX buffer (header + a 1514-byte frame, and some slack).
const BUF: usize = 2048;
const RX_BUFS: usize = 64;
const TX_BUFS: usize = 32;
/// RX descriptors consumed per pass before the loop looks at heartbeats again.
const RX_BUDGET: usize = 64;

#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct Counters {
    rx: u64,
    tx: u64,
    arp: u64,
    icmp: u64,
    udp: u64,
}

struct Net {
    dev: Mmio,
    rx: Virtq,
    tx: Virtq,
    features: u64,
    me: Me,
    rx_mem: *mut u8,
    tx_mem: *mut u8,
    /// Free TX buffer indices (a stack).
    tx_free: [u8; TX_BUFS],
    tx_nfree: usize,
    /// TX chains added since the last notification decision.
    tx_pending: bool,
    ip_id: u16,
    count: Counters,
    reported: Counters,
}

static mut NET: Net = Net {
    dev: Mmio::NONE,
    rx: Virtq::EMPTY,
    tx: Virtq::EMPTY,
    features: 0,
    me: Me {
        mac: [0; 6],
        ip: [0; 4],
    },
    rx_mem: core::ptr::null_mut(),
    tx_mem: core::ptr::null_mut(),
    tx_free: [0; TX_BUFS],
    tx_nfree: 0,
    tx_pending: false,
    ip_id: 0,
    count: Counters {
        rx: 0,
        tx: 0,
        arp: 0,
        icmp: 0,
        udp: 0,
    },
    reported: Counters {
        rx: 0,
        tx: 0,
        arp: 0,
        icmp: 0,
        udp: 0,
    },
};

fn net() -> &'static mut Net {
    let p = &raw mut NET;
    // SAFETY: written by the BSP in setup() before the APs are released, then used by CPU 0
    // alone (one call chain).
    unsafe { &mut *p }
}

/// Boot (BSP, before the boot line): finds and initializes the net device. PANIC line and Err
/// on any problem.
pub fn setup(cfg: &Config, mapped: u64) -> Result<(), ()> {
    let dev = virtio::find(cfg.virtio_devices(), virtio::ID_NET, "virtio-net", mapped)?;
    // the MAC (config bytes 0..6) must be inside the register window to be used
    let wanted = if dev.size >= 0x106 { F_MAC } else { 0 };
    let features = dev.begin_init(wanted)?;
    let rx = dev.setup_queue(0)?;
    let tx = dev.setup_queue(1)?;
    let mac = if features & F_MAC != 0 {
        dev.config_read(|m| core::array::from_fn(|i| m.config8(i as u64)))
    } else {
        cfg.mac.unwrap_or(DEFAULT_MAC)
    };
    dev.driver_ok()?;
    let ntx = TX_BUFS.min(usize::from(tx.size()));
    let n = net();
    *n = Net {
        dev,
        rx,
        tx,
        features,
        me: Me {
            mac,
            ip: cfg.ip.unwrap_or([0; 4]),
        },
        rx_mem: dma_alloc(RX_BUFS * BUF, 4096),
        tx_mem: dma_alloc(TX_BUFS * BUF, 4096),
        tx_free: core::array::from_fn(|i| i as u8),
        tx_nfree: ntx,
        tx_pending: false,
        ip_id: 0,
        count: Counters::default(),
        reported: Counters::default(),
    };
    Ok(())
}

/// Boot (BSP, after the boot line): `virtio-net base=0x<hex> irq=<n> features=0x<hex>
/// rxq=<size> txq=<size>`.
pub fn print_info() {
    let n = net();
    virtio::device_line(&n.dev, n.features)
        .str(" rxq=")
        .dec(u64::from(n.rx.size()))
        .str(" txq=")
        .dec(u64::from(n.tx.size()))
        .send();
}

fn mac_str(l: &mut Line, mac: &[u8; 6]) {
    for (i, &b) in mac.iter().enumerate() {
        if i != 0 {
            l.str(":");
        }
        if b < 16 {
            l.str("0");
        }
        l.hex(u64::from(b));
    }
}

fn ip_str(l: &mut Line, ip: &[u8; 4]) {
    for (i, &b) in ip.iter().enumerate() {
        if i != 0 {
            l.str(".");
        }
        l.dec(u64::from(b));
    }
}

impl Net {
    fn rx_post(&mut self, addr: u64) {
        let ok = self.rx.add(&[Buf {
            addr,
            len: BUF as u32,
            device_writes: true,
        }]);
        // as many RX descriptors as buffers at most: never full
        assert!(ok.is_some(), "virtio-net RX queue full");
    }

    fn tx_reclaim(&mut self) {
        while let Some(u) = self.tx.pop_used() {
            let i = ((u.addr - phys(self.tx_mem)) / BUF as u64) as usize;
            if i < TX_BUFS && self.tx_nfree < TX_BUFS {
                self.tx_free[self.tx_nfree] = i as u8;
                self.tx_nfree += 1;
            }
        }
    }

    /// Notifies the TX queue if chains were added and the device wants to hear about it.
    fn tx_kick(&mut self) {
        if self.tx_pending {
            self.tx_pending = false;
            if self.tx.needs_notify() {
                self.dev.notify(1);
            }
        }
    }

    /// A free TX buffer index: reclaims, and if all are in flight kicks the device and polls
    /// for up to 2 ms (then None: the caller drops its reply).
    fn tx_get(&mut self, sh: &Shared) -> Option<usize> {
        self.tx_reclaim();
        if self.tx_nfree == 0 {
            self.tx_kick();
            let end = rdtsc() + sh.tsc_khz * 2;
            while self.tx_nfree == 0 && rdtsc() < end {
                core::hint::spin_loop();
                self.tx_reclaim();
            }
        }
        if self.tx_nfree == 0 {
            return None;
        }
        self.tx_nfree -= 1;
        Some(usize::from(self.tx_free[self.tx_nfree]))
    }

    fn tx_buf(&mut self, i: usize) -> &'static mut [u8; BUF] {
        // SAFETY: TX buffer i is free (not owned by the device) and only used by this CPU.
        unsafe { &mut *self.tx_mem.add(i * BUF).cast::<[u8; BUF]>() }
    }

    /// Queues TX buffer `i` holding a frame of `len` bytes after the (zeroed) header.
    fn tx_send(&mut self, i: usize, len: usize) {
        self.tx_buf(i)[..HDR].fill(0);
        let ok = self.tx.add(&[Buf {
            addr: phys(self.tx_mem) + (i * BUF) as u64,
            len: (HDR + len) as u32,
            device_writes: false,
        }]);
        assert!(ok.is_some(), "virtio-net TX queue full");
        self.tx_pending = true;
        self.count.tx += 1;
    }

    /// Handles one received buffer and posts it again.
    fn receive(&mut self, u: Used, sh: &Shared) {
        self.count.rx += 1;
        let len = u.len as usize;
        if len > HDR && len <= BUF {
            // SAFETY: the device returned this RX buffer with `len` bytes written.
            let frame =
                unsafe { core::slice::from_raw_parts((u.addr as *const u8).add(HDR), len - HDR) };
            // built aside first, so frames that need no answer never wait for a TX buffer
            let mut reply = [0u8; BUF - HDR];
            if let Some((kind, n)) = handle_frame(&self.me, frame, self.ip_id, &mut reply) {
                if let Some(t) = self.tx_get(sh) {
                    self.tx_buf(t)[HDR..HDR + n].copy_from_slice(&reply[..n]);
                    match kind {
                        Kind::Arp => self.count.arp += 1,
                        Kind::Icmp => self.count.icmp += 1,
                        Kind::Udp => self.count.udp += 1,
                    }
                    if kind != Kind::Arp {
                        self.ip_id = self.ip_id.wrapping_add(1);
                    }
                    self.tx_send(t, n);
                }
            }
        }
        self.rx_post(u.addr);
    }
}

/// The net-echo workload on CPU 0.
pub fn run(cpu: usize, st: &mut PerCpu, sh: &Shared) -> ! {
    let n = net();
    let nrx = RX_BUFS.min(usize::from(n.rx.size()));
    for i in 0..nrx {
        n.rx_post(phys(n.rx_mem) + (i * BUF) as u64);
    }
    n.dev.notify(0);
    let mut l = Line::new();
    l.str("net up mac=");
    mac_str(&mut l, &n.me.mac);
    l.str(" ip=");
    ip_str(&mut l, &n.me.ip);
    l.send();
    if let Some(t) = n.tx_get(sh) {
        let me = n.me;
        let len = gratuitous_arp(&me, &mut n.tx_buf(t)[HDR..]);
        n.tx_send(t, len);
        n.tx_kick();
    }

    let spin = sh.tsc_khz; // keep polling 1 ms after the last frame
    let poll = sh.tsc_khz; // then look every 1 ms
    let mut last_active = rdtsc();
    loop {
        let now = rdtsc();
        heartbeat_if_due(cpu, st, sh, now);
        if now >= st.next_report || st.next_report > now.saturating_add(sh.sec_ticks) {
            if n.count != n.reported {
                let c = n.count;
                Line::new()
                    .str("net rx=")
                    .dec(c.rx)
                    .str(" tx=")
                    .dec(c.tx)
                    .str(" arp=")
                    .dec(c.arp)
                    .str(" icmp=")
                    .dec(c.icmp)
                    .str(" udp=")
                    .dec(c.udp)
                    .send();
                n.reported = c;
            }
            n.dev.check_alive();
            st.next_report = rdtsc() + sh.sec_ticks;
        }
        n.tx_reclaim();
        let mut got = 0;
        while got < RX_BUDGET {
            let Some(u) = n.rx.pop_used() else { break };
            n.receive(u, sh);
            got += 1;
        }
        if got != 0 && n.rx.needs_notify() {
            n.dev.notify(0);
        }
        n.tx_kick();
        if got != 0 {
            last_active = now;
            continue;
        }
        if now.wrapping_sub(last_active) < spin {
            core::hint::spin_loop();
            continue;
        }
        wait_until(sh, (now + poll).min(st.next_hb).min(st.next_report));
    }
}
