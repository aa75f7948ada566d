//! Saving and restoring component state.
//!
//! Every stateful component implements [`Persist`]: the vCPU ([`crate::vcpu::Vcpu`]), the
//! VM-wide KVM devices ([`crate::vm::Platform`]: irqchip, PIT, kvmclock), the serial port
//! ([`crate::devices::serial::SerialDevice`]) and a VM's virtio devices as one set
//! ([`crate::devices::virtio::VirtioDevices`]); the i8042 holds no state. `save` produces a
//! plain, serializable value, and [`crate::vm::Vm::save_state`] collects them into a
//! [`crate::vm::MachineState`]; `restore` builds the component again from such a value.
//!
//! A whole VM is restored in two steps instead, because a migration destination builds its KVM
//! objects while memory is still arriving: [`crate::vm::Vm::prepare`] builds the vCPUs, the
//! platform devices and the virtio devices from the configuration, and
//! [`crate::vm::PreparedVm::finish`] loads the state into them with their `apply` methods
//! (`Vcpu::apply`, `Platform::apply`, `VirtioDevices::apply`: what their `restore` does after
//! building) and re-creates the serial port with its `restore`. The snapshot file and the
//! migration stream are just containers of these values.

use serde::{de::DeserializeOwned, Deserialize, Deserializer, Serialize, Serializer};

/// A component whose state can be captured and re-created.
pub trait Persist: Sized {
    /// The captured state.
    type State: Serialize + DeserializeOwned;
    /// What `restore` needs besides the state (file descriptors, handles, ...).
    type ConstructorArgs;
    /// What can go wrong.
    type Error: std::error::Error;

    /// Captures the component's state. The component must be quiescent (VM paused).
    fn save(&self) -> Result<Self::State, Self::Error>;

    /// Re-creates the component from `state`.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}

/// Serde adapter for KVM ABI structs: stored as their exact bytes; on load the length must
/// match the struct size exactly (kvm-bindings' own serde impl silently zero-pads short input,
/// which would hide a truncated or corrupt state).
pub mod kvm_bytes {
    use super::*;
    use zerocopy::{FromBytes, Immutable, IntoBytes};

    pub fn serialize<T: IntoBytes + Immutable, S: Serializer>(
        v: &T,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v.as_bytes())
    }

    pub fn deserialize<'de, T: FromBytes, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        let bytes: serde_bytes_buf::Buf = Deserialize::deserialize(d)?;
        T::read_from_bytes(&bytes.0).map_err(|_| {
            serde::de::Error::custom(format!(
                "KVM state struct is {} bytes, expected {}",
                bytes.0.len(),
                std::mem::size_of::<T>()
            ))
        })
    }

    mod serde_bytes_buf {
        use serde::de::{Deserialize, Deserializer, SeqAccess, Visitor};

        pub struct Buf(pub Vec<u8>);

        impl<'de> Deserialize<'de> for Buf {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = Buf;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str("bytes")
                    }
                    fn visit_bytes<E>(self, v: &[u8]) -> Result<Buf, E> {
                        Ok(Buf(v.to_vec()))
                    }
                    fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Buf, E> {
                        Ok(Buf(v))
                    }
                    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Buf, A::Error> {
                        let mut out = Vec::new();
                        while let Some(b) = seq.next_element()? {
                            out.push(b);
                        }
                        Ok(Buf(out))
                    }
                }
                d.deserialize_bytes(V)
            }
        }
    }
}
