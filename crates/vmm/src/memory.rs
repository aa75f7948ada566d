//! Guest RAM: one memfd holding all of it (so a second process can map the same pages later),
//! mapped into this process with vm-memory and registered with KVM as one memory slot per RAM
//! region. Writes made through vm-memory (device emulation) are recorded in an [`AtomicBitmap`],
//! the VMM-side dirty bitmap that migration merges with KVM's.

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Guest memory as the VMM sees it.
pub type GuestMem = GuestMemoryMmap<AtomicBitmap>;

/// Guest page size.
pub const PAGE_SIZE: u64 = 4096;
/// RAM below 4 GiB ends here; [3 GiB, 4 GiB) is the MMIO hole (LAPIC, IOAPIC, ...).
pub const LOW_RAM_END: u64 = 0xC000_0000;
/// RAM that does not fit below the hole continues here.
pub const HIGH_RAM_START: u64 = 1 << 32;
/// KVM memory slot flag: log dirty pages.
pub const KVM_MEM_LOG_DIRTY_PAGES: u32 = 1;

/// Memory errors.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memfd_create failed: {0}")]
    Memfd(std::io::Error),
    #[error("cannot size guest RAM memfd to {size} bytes: {err}")]
    Truncate { size: u64, err: std::io::Error },
    #[error("cannot map guest RAM: {0}")]
    Map(String),
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} failed: {err}")]
    SetRegion { slot: u32, err: kvm_ioctls::Error },
    #[error("invalid memory layout: {0}")]
    Layout(String),
    #[error("guest address {0:#x} is not in RAM")]
    BadAddress(u64),
}

/// One RAM region: guest-physical start, size, and offset in the memfd.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    pub gpa: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// The VM's RAM layout. Part of the VM state (snapshots and migration carry it).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MemoryLayout {
    pub regions: Vec<RamRegion>,
}

impl MemoryLayout {
    /// The layout Ferry uses for `bytes` of RAM: up to 3 GiB at 0, the rest above 4 GiB.
    pub fn for_size(bytes: u64) -> MemoryLayout {
        let low = bytes.min(LOW_RAM_END);
        let mut regions = vec![RamRegion {
            gpa: 0,
            size: low,
            file_offset: 0,
        }];
        if bytes > low {
            regions.push(RamRegion {
                gpa: HIGH_RAM_START,
                size: bytes - low,
                file_offset: low,
            });
        }
        MemoryLayout { regions }
    }

    /// Total RAM in bytes.
    pub fn total_bytes(&self) -> u64 {
        // Saturating: an unvalidated layout (straight from a file) must not overflow.
        self.regions
            .iter()
            .fold(0u64, |t, r| t.saturating_add(r.size))
    }

    /// Total RAM in pages.
    pub fn total_pages(&self) -> u64 {
        self.total_bytes() / PAGE_SIZE
    }

    /// Checks a layout that came from outside (snapshot file, migration stream).
    pub fn validate(&self, max_bytes: u64) -> Result<(), MemoryError> {
        let bad = |m: String| Err(MemoryError::Layout(m));
        if self.regions.is_empty() || self.regions.len() > 64 {
            return bad(format!("{} regions (expected 1..=64)", self.regions.len()));
        }
        let mut next_off = 0u64;
        let mut prev_end = 0u64;
        for (i, r) in self.regions.iter().enumerate() {
            if r.size == 0 || r.gpa % PAGE_SIZE != 0 || r.size % PAGE_SIZE != 0 {
                return bad(format!("region {i} is empty or not page-aligned"));
            }
            let Some(end) = r.gpa.checked_add(r.size) else {
                return bad(format!("region {i} overflows the address space"));
            };
            if i > 0 && r.gpa < prev_end {
                return bad(format!("region {i} overlaps or is out of order"));
            }
            if r.gpa < HIGH_RAM_START && end > LOW_RAM_END {
                return bad(format!("region {i} overlaps the MMIO hole"));
            }
            if r.file_offset != next_off {
                return bad(format!("region {i} file offset is not contiguous"));
            }
            next_off += r.size;
            prev_end = end;
        }
        if next_off > max_bytes {
            return bad(format!(
                "{next_off} bytes of RAM exceeds the limit of {max_bytes}"
            ));
        }
        Ok(())
    }

    /// Index of the page that holds `gpa` in the RAM (0-based over all regions), if any.
    pub fn page_index(&self, gpa: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            (gpa >= r.gpa && gpa < r.gpa + r.size)
                .then(|| (r.file_offset + gpa - r.gpa) / PAGE_SIZE)
        })
    }

    /// Guest-physical address of RAM page `index`.
    pub fn page_gpa(&self, index: u64) -> Option<u64> {
        let off = index.checked_mul(PAGE_SIZE)?;
        self.regions
            .iter()
            .find(|r| off >= r.file_offset && off < r.file_offset + r.size)
            .map(|r| r.gpa + off - r.file_offset)
    }
}

/// Guest RAM backed by one memfd.
pub struct GuestRam {
    file: File,
    mem: GuestMem,
    layout: MemoryLayout,
    huge: bool,
}

/// Huge page size of the hugetlb memfds Ferry makes.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// Which huge pages guest RAM may use, from `FERRY_HUGEPAGES` (for before/after comparisons):
/// unset, the hugetlb pool while it holds the guest, else transparent huge pages; `thp`, only
/// transparent huge pages; `never` (`off`, `0`), 4 KiB pages only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HugePages {
    Any,
    ThpOnly,
    Never,
}

impl HugePages {
    pub fn from_env() -> HugePages {
        match std::env::var("FERRY_HUGEPAGES").as_deref() {
            Ok("never" | "off" | "0") => HugePages::Never,
            Ok("thp") => HugePages::ThpOnly,
            _ => HugePages::Any,
        }
    }
}

/// Whether guest RAM may use huge pages of any kind (`FERRY_HUGEPAGES=never` turns them off).
pub fn huge_pages_allowed() -> bool {
    HugePages::from_env() != HugePages::Never
}

/// Whether this kernel gives shared memory (Ferry's memfd RAM) transparent huge pages where a
/// mapping asks for them (`/sys/kernel/mm/transparent_hugepage/shmem_enabled` is `advise`,
/// `within_size`, `always` or `force`; Debian's default is `never`, which
/// `scripts/install-deps.sh` sets to `advise`).
pub fn shmem_thp_available() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled").is_ok_and(|s| {
        ["[advise]", "[within_size]", "[always]", "[force]"]
            .iter()
            .any(|m| s.contains(m))
    })
}

/// A hugetlb memfd (2 MiB pages) for all of `layout`, its pages reserved in the pool now, or
/// `None` (no pool, a pool too small, a layout not in whole huge pages,
/// `FERRY_HUGEPAGES=never`): then the caller uses 4 KiB pages. The reservation is made by
/// one shared mapping without `MAP_NORESERVE` (vm-memory's own mappings have it): a shared
/// hugetlb mapping reserves its pages for the file, and the reservation outlives the mapping,
/// so a pool emptied later by another VM cannot kill this one with SIGBUS on a first touch.
/// Pages are still allocated on first touch, so an untouched guest costs nothing and
/// [`GuestRam::data_extents`] finds what was touched (with `mincore`: hugetlbfs has no
/// SEEK_DATA). First touch of a pool page the host already backs is 10-30x faster than of a
/// fresh 4 KiB page on these machines, which is what a migration destination does to all of
/// its RAM during pass 0.
fn huge_memfd(layout: &MemoryLayout) -> Option<File> {
    if HugePages::from_env() != HugePages::Any
        || layout
            .regions
            .iter()
            .any(|r| r.size % HUGE_PAGE_SIZE != 0 || r.file_offset % HUGE_PAGE_SIZE != 0)
    {
        return None;
    }
    let name = c"ferry-guest-ram-2m";
    // SAFETY: `name` is a valid NUL-terminated string; the return value is checked.
    let fd = unsafe {
        libc::memfd_create(
            name.as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    let size = layout.total_bytes();
    file.set_len(size).ok()?;
    // SAFETY: a new read-only shared mapping of a file this function owns, of its whole
    // size; checked, and unmapped at once (nothing reads it). ENOMEM: the pool is short, and
    // dropping the file returns nothing it did not take.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        if p == libc::MAP_FAILED {
            return None;
        }
        libc::munmap(p, size as usize);
    }
    Some(file)
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("layout", &self.layout)
            .finish()
    }
}

impl GuestRam {
    /// Creates a memfd of the layout's size and maps every region: 2 MiB huge pages when
    /// the node's hugetlb pool holds the whole guest ([`huge_memfd`]), else shared memory
    /// whose mappings ask for transparent huge pages (see [`GuestRam::map`]).
    pub fn new(layout: MemoryLayout) -> Result<GuestRam, MemoryError> {
        if let Some(file) = huge_memfd(&layout) {
            return Self::map(file, layout, true);
        }
        let name = c"ferry-guest-ram";
        // SAFETY: `name` is a valid NUL-terminated string; the return value is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        let size = layout.total_bytes();
        file.set_len(size)
            .map_err(|err| MemoryError::Truncate { size, err })?;
        Self::map(file, layout, false)
    }

    /// Maps an existing memfd (e.g. received from another process) with `layout`; `huge`: the
    /// memfd is on hugetlbfs.
    ///
    /// The mappings of a 4 KiB-page memfd ask for transparent huge pages (`MADV_HUGEPAGE`, as
    /// QEMU does for its guest RAM): where the kernel gives them to shared memory
    /// ([`shmem_thp_available`]) a first touch allocates 2 MiB at once, and a migration's
    /// destination, which touches all of its RAM during pass 0, takes a fault per 2 MiB
    /// instead of per 4 KiB; elsewhere, or when no 2 MiB block is free, it gets 4 KiB pages as
    /// before. Off with `FERRY_HUGEPAGES=never`.
    pub fn map(file: File, layout: MemoryLayout, huge: bool) -> Result<GuestRam, MemoryError> {
        let mut ranges = Vec::with_capacity(layout.regions.len());
        for r in &layout.regions {
            let dup = file
                .try_clone()
                .map_err(|e| MemoryError::Map(e.to_string()))?;
            ranges.push((
                GuestAddress(r.gpa),
                r.size as usize,
                Some(FileOffset::new(dup, r.file_offset)),
            ));
        }
        let mem = GuestMem::from_ranges_with_files(ranges)
            .map_err(|e| MemoryError::Map(e.to_string()))?;
        let ram = GuestRam {
            file,
            mem,
            layout,
            huge,
        };
        if !huge && huge_pages_allowed() {
            for i in 0..ram.layout.regions.len() {
                let (p, len) = ram.region_raw(i);
                // SAFETY: `p..p+len` is exactly one of this RAM's own mappings; MADV_HUGEPAGE
                // changes only how its future page faults are served, never its contents. A
                // kernel without transparent huge pages answers EINVAL: nothing changes.
                unsafe { libc::madvise(p.cast(), len, libc::MADV_HUGEPAGE) };
            }
        }
        Ok(ram)
    }

    /// Whether the RAM is on 2 MiB huge pages (hugetlb).
    pub fn huge_pages(&self) -> bool {
        self.huge
    }

    /// The vm-memory view (with the VMM-side dirty bitmap).
    pub fn memory(&self) -> &GuestMem {
        &self.mem
    }

    /// The layout.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// The memfd holding all RAM.
    pub fn memfd(&self) -> &File {
        &self.file
    }

    /// Registers every region with KVM (slot i = region i).
    pub fn register(&self, vm: &kvm_ioctls::VmFd, flags: u32) -> Result<(), MemoryError> {
        for (slot, region) in self.mem.iter().enumerate() {
            let slot = slot as u32;
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| MemoryError::Map(e.to_string()))?;
            let r = kvm_bindings::kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the mapping behind `host` lives as long as `self.mem`, which outlives the
            // VM (the Vm struct drops its VmFd before its GuestRam), and has exactly `len` bytes.
            unsafe { vm.set_user_memory_region(r) }
                .map_err(|err| MemoryError::SetRegion { slot, err })?;
        }
        Ok(())
    }

    /// Clears the VMM-side dirty bitmap (writes made through vm-memory).
    pub fn reset_vmm_dirty(&self) {
        for r in self.mem.iter() {
            r.get_mmap().bitmap().reset();
        }
    }

    /// Returns and clears the VMM-side dirty bitmap of region `i` (one bit per 4 KiB page,
    /// 64 pages per word).
    pub fn take_vmm_dirty(&self, i: usize) -> Vec<u64> {
        self.mem
            .iter()
            .nth(i)
            .map(|r| r.get_mmap().bitmap().get_and_reset())
            .unwrap_or_default()
    }

    /// Host view of region `i` as raw parts (pointer, length).
    pub fn region_raw(&self, i: usize) -> (*mut u8, usize) {
        let region = self.mem.iter().nth(i).expect("region index in range");
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .expect("region start is mapped");
        (host, region.len() as usize)
    }

    /// Byte ranges of the memfd that hold data (everything else was never written and reads as
    /// zeroes). Uses SEEK_DATA/SEEK_HOLE (or, on huge pages, `mincore` of the mapping), so a
    /// large untouched guest costs nothing to scan.
    pub fn data_extents(&self) -> Vec<(u64, u64)> {
        if self.huge {
            return self.huge_extents();
        }
        let total = self.layout.total_bytes();
        let fd = self.file.as_raw_fd();
        let mut out = Vec::new();
        let mut pos: i64 = 0;
        while (pos as u64) < total {
            // SAFETY: lseek on a valid fd we own; errors are handled below.
            let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
            if data < 0 {
                break; // ENXIO: no more data
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let end = if hole < 0 { total as i64 } else { hole };
            out.push((data as u64, (end.min(total as i64)) as u64));
            pos = end;
        }
        if out.is_empty() && total > 0 {
            // A filesystem without SEEK_DATA support reports nothing; fall back to "all data".
            // SAFETY: as above.
            let probe = unsafe { libc::lseek(fd, 0, libc::SEEK_DATA) };
            if probe < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO) {
                out.push((0, total));
            }
        }
        out
    }

    /// [`Self::data_extents`] on huge pages: the 2 MiB pages `mincore` says are allocated.
    fn huge_extents(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let per_page = PAGE_SIZE as usize;
        for (i, r) in self.layout.regions.iter().enumerate() {
            let (p, len) = self.region_raw(i);
            let mut vec = vec![0u8; len.div_ceil(per_page)];
            // SAFETY: `p..p+len` is this region's mapping (page aligned); `vec` has one byte
            // per 4 KiB page of it.
            if unsafe { libc::mincore(p.cast(), len, vec.as_mut_ptr()) } != 0 {
                out.push((r.file_offset, r.file_offset + r.size));
                continue;
            }
            let step = (HUGE_PAGE_SIZE as usize) / per_page;
            for (k, chunk) in vec.chunks(step).enumerate() {
                if chunk.iter().any(|b| b & 1 != 0) {
                    let start = r.file_offset + k as u64 * HUGE_PAGE_SIZE;
                    let end = (start + HUGE_PAGE_SIZE).min(r.file_offset + r.size);
                    match out.last_mut() {
                        Some(last) if last.1 == start => last.1 = end,
                        _ => out.push((start, end)),
                    }
                }
            }
        }
        out
    }

    /// Raw pointer to the byte at memfd offset `off` (i.e. RAM page index × 4096 + offset).
    pub fn ptr_at_offset(&self, off: u64) -> Option<*mut u8> {
        self.layout.regions.iter().enumerate().find_map(|(i, r)| {
            (off >= r.file_offset && off < r.file_offset + r.size).then(|| {
                let (p, _) = self.region_raw(i);
                // SAFETY: `off - file_offset` is within the region's mapping.
                unsafe { p.add((off - r.file_offset) as usize) }
            })
        })
    }
}

/// True if `page` is all zero bytes.
pub fn is_zero(page: &[u8]) -> bool {
    // SAFETY: u128 has no invalid bit patterns; align_to only reinterprets the aligned middle.
    let (pre, mid, post) = unsafe { page.align_to::<u128>() };
    // 256-byte blocks: the OR inside a block vectorizes, and a data page usually stops the
    // scan in its first block.
    pre.iter().all(|&b| b == 0)
        && post.iter().all(|&b| b == 0)
        && mid
            .chunks(16)
            .all(|c| c.iter().fold(0u128, |a, &w| a | w) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn layout_splits_at_the_hole() {
        let l = MemoryLayout::for_size(4 << 30);
        assert_eq!(l.regions.len(), 2);
        assert_eq!(l.regions[0].size, LOW_RAM_END);
        assert_eq!(l.regions[1].gpa, HIGH_RAM_START);
        assert_eq!(l.total_bytes(), 4 << 30);
        assert_eq!(
            l.page_gpa(l.page_index(HIGH_RAM_START + 8192).unwrap()),
            Some(HIGH_RAM_START + 8192)
        );
        l.validate(8 << 30).unwrap();
        assert!(l.validate(1 << 30).is_err());
        let mut bad = l.clone();
        bad.regions[1].gpa = 0xD000_0000;
        assert!(bad
            .validate(8 << 30)
            .unwrap_err()
            .to_string()
            .contains("MMIO hole"));
    }

    /// The `ShmemPmdMapped` KiB of the mapping of this process that starts at `addr`.
    fn shmem_pmd_kib(addr: usize) -> Option<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let head = format!("{addr:x}-");
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&head));
        lines.next()?;
        lines
            .take_while(|l| {
                l.split_whitespace()
                    .next()
                    .is_some_and(|t| t.ends_with(':'))
            })
            .find_map(|l| l.strip_prefix("ShmemPmdMapped:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    #[test]
    fn small_page_ram_asks_for_transparent_huge_pages() {
        if !shmem_thp_available() || !huge_pages_allowed() {
            eprintln!("skipped: shared memory gets no transparent huge pages on this kernel");
            return;
        }
        // A 4 KiB-page memfd, as GuestRam::new makes when the hugetlb pool cannot hold a guest.
        // SAFETY: a valid NUL-terminated name; the result is checked and owned at once.
        let fd = unsafe { libc::memfd_create(c"test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` was just created and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        let layout = MemoryLayout::for_size(64 << 20);
        file.set_len(layout.total_bytes()).unwrap();
        let ram = GuestRam::map(file, layout, false).unwrap();
        assert!(!ram.huge_pages());
        for off in (0..8u64 << 20).step_by(4096) {
            ram.memory().write_obj(1u8, GuestAddress(off)).unwrap();
        }
        let (p, _) = ram.region_raw(0);
        let pmd = shmem_pmd_kib(p as usize).expect("the RAM mapping in smaps");
        assert!(pmd >= 2048, "8 MiB touched, {pmd} KiB of it on huge pages");
        // A write per 4 KiB page is still what the data extents and the page scan see.
        let ext = ram.data_extents();
        assert_eq!(ext, vec![(0, 8 << 20)]);
    }

    #[test]
    fn memfd_ram_is_shared_and_sparse() {
        let ram = GuestRam::new(MemoryLayout::for_size(64 << 20)).unwrap();
        assert!(ram.data_extents().is_empty());
        ram.memory()
            .write_obj(0xdead_beef_u64, GuestAddress(0x20_0000))
            .unwrap();
        let ext = ram.data_extents();
        assert_eq!(ext.len(), 1);
        assert!(ext[0].0 <= 0x20_0000 && ext[0].1 > 0x20_0000);
        // The VMM-side bitmap saw the write.
        let region = ram.memory().iter().next().unwrap();
        assert!(vm_memory::bitmap::Bitmap::dirty_at(
            &region.bitmap(),
            0x20_0000
        ));
        assert!(is_zero(&[0u8; 4096]));
        let mut p = [0u8; 4096];
        p[4095] = 1;
        assert!(!is_zero(&p));
    }
}
