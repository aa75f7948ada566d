//! What a host supplies to a VM's virtio devices besides the configuration.

use serde::{Deserialize, Serialize};

/// Where a NIC's frames go on this host. Host-local: a migration destination brings its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetBackend {
    /// Create a TAP and make it a port of this bridge.
    Bridge(String),
    /// Use this (existing or to-be-created) TAP as it is.
    Tap(String),
}

impl std::str::FromStr for NetBackend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some(("bridge", b)) if !b.is_empty() => Ok(NetBackend::Bridge(b.to_string())),
            Some(("tap", t)) if !t.is_empty() => Ok(NetBackend::Tap(t.to_string())),
            _ => Err(format!(
                "invalid network backend {s:?}: use bridge=<name> or tap=<name>"
            )),
        }
    }
}

/// Host-side resources of a VM's devices that are not part of its configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostDevices {
    /// One backend per NIC, in order.
    pub nets: Vec<NetBackend>,
}

impl HostDevices {
    /// Resolves backends given on a command line for a VM with `nics` NICs: one per NIC in
    /// order, or a single `bridge=` for all of them.
    pub fn for_nics(backends: &[NetBackend], nics: usize) -> Result<HostDevices, String> {
        let nets = match backends {
            [one @ NetBackend::Bridge(_)] => vec![one.clone(); nics],
            many if many.len() == nics => many.to_vec(),
            [] => {
                return Err(format!(
                    "the VM has {nics} NICs and this host was given no network backend for them"
                ))
            }
            many => {
                return Err(format!(
                    "the VM has {nics} NICs but {} network backends were given",
                    many.len()
                ))
            }
        };
        Ok(HostDevices { nets })
    }
}
