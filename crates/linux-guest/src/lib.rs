//! `ferry-linux-guest`: Ferry's test guest workloads as a static x86-64 Linux program, for
//! stock Linux guests (run by a busybox initramfs, see `testbed::initramfs`).
//!
//! The program lives in `program/` and is compiled by `build.rs` with a direct `rustc`
//! invocation (std, glibc linked statically); this crate exposes the result. Its options, modes
//! and output lines are documented at the top of `program/main.rs`.

/// Path of the built `ferry-linux-guest` executable (inside this crate's build directory).
pub const PATH: &str = concat!(env!("OUT_DIR"), "/ferry-linux-guest");

/// The `ferry-linux-guest` executable.
pub const BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ferry-linux-guest"));

/// The environment variable that makes the program take its options from there instead of
/// `/proc/cmdline` (process mode, for tests; see `program/main.rs`).
pub const CMDLINE_ENV: &str = "FERRY_CMDLINE";

// The whole program (but its `main`) is compiled for the host test harness too, so its unit
// tests run and clippy sees it; the modules sit at the crate root as in the program.
#[cfg(test)]
#[path = "../program/boot.rs"]
#[allow(dead_code)]
mod boot;
#[cfg(test)]
#[path = "../../guest/kernel/cmdline.rs"]
#[allow(dead_code)]
mod cmdline;
#[cfg(test)]
#[path = "../program/disk.rs"]
#[allow(dead_code)]
mod disk;
#[cfg(test)]
#[path = "../../guest/kernel/disklog.rs"]
#[allow(dead_code)]
mod disklog;
#[cfg(test)]
#[path = "../program/hb.rs"]
#[allow(dead_code)]
mod hb;
#[cfg(test)]
#[path = "../program/net.rs"]
#[allow(dead_code)]
mod net;
#[cfg(test)]
#[path = "../program/opts.rs"]
mod opts;
#[cfg(test)]
#[path = "../program/out.rs"]
#[allow(dead_code)]
mod out;
#[cfg(test)]
#[path = "../program/sys.rs"]
#[allow(dead_code)]
mod sys;
#[cfg(test)]
#[path = "../../guest/kernel/verify_logic.rs"]
#[allow(dead_code)]
mod verify_logic;
#[cfg(test)]
#[path = "../program/work.rs"]
#[allow(dead_code)]
mod work;

#[cfg(test)]
mod tests {
    #[test]
    fn binary_is_a_static_x86_64_executable() {
        let elf = super::BINARY;
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(elf[4], 2, "ELF64");
        assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 62, "x86-64");
        let phoff = u64::from_le_bytes(elf[32..40].try_into().unwrap()) as usize;
        let phentsize = u16::from_le_bytes([elf[54], elf[55]]) as usize;
        let phnum = u16::from_le_bytes([elf[56], elf[57]]) as usize;
        for i in 0..phnum {
            let ph = &elf[phoff + i * phentsize..][..phentsize];
            let p_type = u32::from_le_bytes(ph[0..4].try_into().unwrap());
            assert_ne!(p_type, 3, "PT_INTERP: dynamically linked");
            assert_ne!(p_type, 2, "PT_DYNAMIC: dynamically linked");
        }
        assert_eq!(super::CMDLINE_ENV, super::opts::CMDLINE_ENV);
    }
}
