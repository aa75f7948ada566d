//! Ferry's test guest kernel.
//!
//! The kernel itself lives in `kernel/` and is compiled by `build.rs` with a direct `rustc`
//! invocation (no_std, static, PVH ELF note). This crate only embeds the resulting ELF so the
//! `ferry-vmm` binary can boot it as `--kernel test-guest`.

/// The test guest kernel: a PVH-bootable x86-64 ELF.
pub const ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ferry-guest.elf"));
