//! Ferry's test guest kernel.
//!
//! The kernel itself lives in `kernel/` and is compiled by `build.rs` with a direct `rustc`
//! invocation (no_std, static, PVH ELF note). This crate only embeds the resulting ELF so the
//! `ferry-vmm` binary can boot it as `--kernel test-guest`.
//!
//! The kernel's design, boot protocol, memory layout, system calls, command line and the exact
//! formats of its serial output lines are documented at the top of `kernel/main.rs`.

/// The test guest kernel: a PVH-bootable x86-64 ELF.
pub const ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ferry-guest.elf"));

// The kernel's pure logic (verifier page format and writer/checker state machine, command line
// parser, disk-log record format, packet handling of net-echo, split virtqueue) is also compiled
// for the host so it can be unit tested here.
#[cfg(test)]
#[path = "../kernel/verify_logic.rs"]
mod verify_logic;

#[cfg(test)]
#[path = "../kernel/cmdline.rs"]
#[allow(dead_code)]
mod cmdline;

#[cfg(test)]
#[path = "../kernel/disklog.rs"]
#[allow(dead_code)]
mod disklog;

#[cfg(test)]
#[path = "../kernel/netpkt.rs"]
#[allow(dead_code)]
mod netpkt;

#[cfg(test)]
#[path = "../kernel/virtq.rs"]
#[allow(dead_code)]
mod virtq;

#[cfg(test)]
mod tests {
    #[test]
    fn elf_is_a_pvh_kernel_loaded_at_1mib() {
        let elf = super::ELF;
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(elf[4], 2, "ELF64");
        assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 62, "x86-64");
        // program headers: one PT_NOTE with the Xen PHYS32_ENTRY note; PT_LOADs at >= 1 MiB
        let phoff = u64::from_le_bytes(elf[32..40].try_into().unwrap()) as usize;
        let phentsize = u16::from_le_bytes([elf[54], elf[55]]) as usize;
        let phnum = u16::from_le_bytes([elf[56], elf[57]]) as usize;
        let mut entry = None;
        for i in 0..phnum {
            let ph = &elf[phoff + i * phentsize..][..phentsize];
            let p_type = u32::from_le_bytes(ph[0..4].try_into().unwrap());
            let off = u64::from_le_bytes(ph[8..16].try_into().unwrap()) as usize;
            let paddr = u64::from_le_bytes(ph[24..32].try_into().unwrap());
            let filesz = u64::from_le_bytes(ph[32..40].try_into().unwrap()) as usize;
            match p_type {
                1 => assert!(paddr >= 0x10_0000, "PT_LOAD below 1 MiB"),
                4 => {
                    let note = &elf[off..off + filesz];
                    let namesz = u32::from_le_bytes(note[0..4].try_into().unwrap());
                    let descsz = u32::from_le_bytes(note[4..8].try_into().unwrap());
                    let ty = u32::from_le_bytes(note[8..12].try_into().unwrap());
                    if namesz == 4 && &note[12..16] == b"Xen\0" && ty == 18 && descsz == 4 {
                        entry = Some(u32::from_le_bytes(note[16..20].try_into().unwrap()));
                    }
                }
                _ => {}
            }
        }
        let entry = entry.expect("no XEN_ELFNOTE_PHYS32_ENTRY note");
        assert!((0x10_0000..0x100_0000).contains(&entry));
    }
}
