//! The saved form of a virtio device (transport registers, queues, the device part) and how a
//! device is saved and restored.

use super::transport::Kind;
use super::{block, net, DeviceError, VirtioMmio};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

/// A queue's state in a form that serializes (mirrors [`QueueState`]; untrusted on restore).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueSnap {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnap {
    fn from(q: QueueState) -> QueueSnap {
        QueueSnap {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl QueueSnap {
    fn to_queue(self) -> Result<Queue, String> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(|e| format!("{e:?}"))
    }
}

/// What is specific to the device behind the transport.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum DeviceSnap {
    Block(block::BlockState),
    Net(net::NetState),
}

/// One virtio device's complete state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct VirtioState {
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub status: u32,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueSnap>,
    pub device: DeviceSnap,
}

impl VirtioMmio {
    /// Saves the device state. The VM must be paused.
    pub fn state(&mut self) -> VirtioState {
        VirtioState {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            status: self.status,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            device: match &mut self.kind {
                Kind::Block(b) => DeviceSnap::Block(b.state()),
                Kind::Net(n) => DeviceSnap::Net(n.state()),
            },
        }
    }

    /// Loads saved state (untrusted: everything is checked against this device first).
    pub fn restore(&mut self, s: &VirtioState) -> Result<(), DeviceError> {
        match (&self.kind, &s.device) {
            (Kind::Block(b), DeviceSnap::Block(bs)) => b.check_state(bs)?,
            (Kind::Net(n), DeviceSnap::Net(ns)) => n.check_state(ns)?,
            _ => return Err(DeviceError::State("saved device is of another type".into())),
        }
        if s.queues.len() != self.queues.len() {
            return Err(DeviceError::State(format!(
                "{} queues saved, the device has {}",
                s.queues.len(),
                self.queues.len()
            )));
        }
        // Until FEATURES_OK the driver's feature bits are only a proposal (a guest may write
        // any; the device then refuses FEATURES_OK): only accepted features must be offered.
        let accepted = s.status & virtio_bindings::virtio_config::VIRTIO_CONFIG_S_FEATURES_OK != 0;
        if accepted && s.driver_features & !self.kind.features() != 0 {
            return Err(DeviceError::State(format!(
                "driver features {:#x} are not all offered here ({:#x})",
                s.driver_features,
                self.kind.features()
            )));
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for (i, (qs, q)) in s.queues.iter().zip(&self.queues).enumerate() {
            if qs.max_size != q.max_size() {
                return Err(DeviceError::State(format!(
                    "queue {i} has maximum size {} saved, {} here",
                    qs.max_size,
                    q.max_size()
                )));
            }
            let nq = qs
                .to_queue()
                .map_err(|e| DeviceError::State(format!("queue {i}: {e}")))?;
            if nq.ready() && !nq.is_valid(self.ram.memory()) {
                return Err(DeviceError::State(format!(
                    "queue {i} rings lie outside guest RAM or are misaligned"
                )));
            }
            queues.push(nq);
        }
        self.queues = queues;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.status = s.status;
        self.queue_sel = s.queue_sel;
        self.interrupt_status = s.interrupt_status;
        self.config_generation = s.config_generation;
        if let (Kind::Net(n), DeviceSnap::Net(ns)) = (&mut self.kind, &s.device) {
            n.restore(ns);
        }
        Ok(())
    }
}
