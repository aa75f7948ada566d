//! virtio-blk over a raw disk image on shared storage.
//!
//! Exactly one VM may write an image: the owner holds an exclusive open-file-description lock
//! (`F_OFD_SETLK`, which NFSv4 and cluster filesystems carry across hosts) on the whole file
//! while it runs. Read-only disks take a shared lock. Taking a lock on NFS also revalidates the
//! client's cache, so a migration destination that takes the lock after the source flushed and
//! released it reads what the source wrote.
//!
//! Requests complete synchronously (see the module above); write-back caching is offered with
//! `VIRTIO_BLK_F_FLUSH`, and a flush request is an `fdatasync` of the image.

use super::{DeviceError, Kind, VirtioMmio};
use crate::config::DiskConfig;
use crate::memory::GuestMem;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::{DescriptorChain, QueueT, Reader, Writer};

/// One request queue of 256 entries.
pub(crate) const QUEUE_SIZES: &[u16] = &[256];
/// Sector size of the virtio-blk protocol.
pub const SECTOR: u64 = 512;
/// Largest data transfer one request may ask for (larger ones fail with an I/O error).
pub const MAX_REQUEST_BYTES: usize = 16 << 20;
const ID_BYTES: usize = 20;

/// What the device carries across a migration besides the transport: the geometry both sides
/// must agree on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BlockState {
    pub capacity_sectors: u64,
    pub read_only: bool,
}

/// Counters of one disk.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub errors: u64,
}

pub(crate) struct Block {
    file: File,
    path: PathBuf,
    read_only: bool,
    capacity: u64,
    locked: bool,
    id: [u8; ID_BYTES],
    pub(crate) stats: BlockStats,
}

fn disk_err(path: &Path, msg: impl Into<String>) -> DeviceError {
    DeviceError::Disk {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

/// Opens an image and returns it with its size in bytes.
fn open_image(path: &Path, write: bool) -> Result<(File, u64), DeviceError> {
    // Under this process's storage policy: beneath a storage root, a regular file or (if
    // the root allows it) a block device, nothing else.
    let mut file = crate::confine::open(path, write, crate::confine::Use::Disk)?;
    let meta = file
        .metadata()
        .map_err(|e| disk_err(path, format!("cannot stat: {e}")))?;
    use std::os::unix::fs::FileTypeExt;
    let size = if meta.is_file() {
        meta.len()
    } else if meta.file_type().is_block_device() {
        file.seek(SeekFrom::End(0))
            .map_err(|e| disk_err(path, format!("cannot size: {e}")))?
    } else {
        return Err(disk_err(path, "not a regular file or block device"));
    };
    if size < SECTOR {
        return Err(disk_err(
            path,
            format!("image is {size} bytes, smaller than one sector"),
        ));
    }
    Ok((file, size))
}

fn ofd_lock(file: &File, kind: libc::c_short) -> std::io::Result<()> {
    // SAFETY: flock is plain old data; all-zero is valid (whole file from offset 0).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: F_OFD_SETLK reads one struct flock from a valid pointer.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether some other open file description holds a lock on the image that conflicts with
/// writing it (i.e. a running VM owns it).
fn ofd_conflict(file: &File) -> std::io::Result<bool> {
    // SAFETY: as in `ofd_lock`.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: F_OFD_GETLK reads and writes one struct flock.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// What a migration destination finds when it looks at an image before accepting a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageProbe {
    /// Size in bytes.
    pub size: u64,
    /// A running VM (the source) holds the image's lock, as seen from here: proof that this
    /// host sees the same file, and its locks, as the source.
    pub locked_elsewhere: bool,
}

/// Opens an image the way the device would (read-write unless `read_only`) and reports its
/// size and whether another host's VM holds it. Used by migration preflight.
pub fn probe_image(path: &Path, read_only: bool) -> Result<ImageProbe, DeviceError> {
    let (file, size) = open_image(path, !read_only)?;
    let locked_elsewhere =
        ofd_conflict(&file).map_err(|e| disk_err(path, format!("cannot query its lock: {e}")))?;
    Ok(ImageProbe {
        size,
        locked_elsewhere,
    })
}

impl Block {
    pub(crate) fn open(d: &DiskConfig) -> Result<Block, DeviceError> {
        let (file, size) = open_image(&d.path, !d.read_only)?;
        let mut id = [0u8; ID_BYTES];
        let name = d
            .path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        for (o, b) in id.iter_mut().zip(name.bytes()) {
            *o = b;
        }
        Ok(Block {
            file,
            path: d.path.clone(),
            read_only: d.read_only,
            capacity: size / SECTOR,
            locked: false,
            id,
            stats: BlockStats::default(),
        })
    }

    pub(crate) fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_BLK_F_FLUSH;
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    /// `struct virtio_blk_config`: only `capacity` (sectors) is meaningful here.
    pub(crate) fn config_space(&self) -> Vec<u8> {
        let mut c = vec![0u8; 0x40];
        c[..8].copy_from_slice(&self.capacity.to_le_bytes());
        c
    }

    pub(crate) fn state(&self) -> BlockState {
        BlockState {
            capacity_sectors: self.capacity,
            read_only: self.read_only,
        }
    }

    pub(crate) fn check_state(&self, s: &BlockState) -> Result<(), DeviceError> {
        if s.capacity_sectors != self.capacity || s.read_only != self.read_only {
            return Err(disk_err(
                &self.path,
                format!(
                    "the VM saw {} sectors ({}), this host sees {} sectors ({})",
                    s.capacity_sectors,
                    if s.read_only {
                        "read-only"
                    } else {
                        "read-write"
                    },
                    self.capacity,
                    if self.read_only {
                        "read-only"
                    } else {
                        "read-write"
                    }
                ),
            ));
        }
        Ok(())
    }

    /// Takes the image lock, retrying while it is held elsewhere for up to `wait`.
    pub(crate) fn lock(&mut self, wait: Duration) -> Result<(), DeviceError> {
        if self.locked {
            return Ok(());
        }
        let kind = if self.read_only {
            libc::F_RDLCK
        } else {
            libc::F_WRLCK
        } as libc::c_short;
        let deadline = Instant::now() + wait;
        loop {
            match ofd_lock(&self.file, kind) {
                Ok(()) => {
                    self.locked = true;
                    return Ok(());
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => {
                    if Instant::now() >= deadline {
                        return Err(DeviceError::DiskLocked {
                            path: self.path.display().to_string(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(disk_err(&self.path, format!("cannot lock: {e}"))),
            }
        }
    }

    pub(crate) fn unlock(&mut self) -> Result<(), DeviceError> {
        if !self.locked {
            return Ok(());
        }
        ofd_lock(&self.file, libc::F_UNLCK as libc::c_short)
            .map_err(|e| disk_err(&self.path, format!("cannot unlock: {e}")))?;
        self.locked = false;
        Ok(())
    }

    pub(crate) fn flush(&mut self) -> Result<(), DeviceError> {
        if self.read_only {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| disk_err(&self.path, format!("flush failed: {e}")))
    }

    /// Range check: `bytes` at `sector` lie inside the disk.
    fn in_range(&self, sector: u64, bytes: usize) -> bool {
        let sectors = (bytes as u64).div_ceil(SECTOR);
        sector
            .checked_add(sectors)
            .is_some_and(|end| end <= self.capacity)
    }

    /// Performs one request; returns the bytes written into the chain (data + status).
    fn handle(&mut self, mem: &GuestMem, chain: DescriptorChain<&GuestMem>) -> u32 {
        let (Ok(mut r), Ok(mut w)) = (Reader::new(mem, chain.clone()), Writer::new(mem, chain))
        else {
            self.stats.errors += 1;
            return 0;
        };
        let total_w = w.available_bytes();
        if total_w == 0 {
            // Nowhere to put the status: the request cannot be answered.
            self.stats.errors += 1;
            return 0;
        }
        let Ok(mut status_w) = w.split_at(total_w - 1) else {
            return 0;
        };
        let mut hdr = [0u8; 16];
        let (status, written) = if r.read_exact(&mut hdr).is_err() {
            (VIRTIO_BLK_S_IOERR, 0)
        } else {
            let kind = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
            let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));
            self.execute(kind, sector, &mut r, &mut w)
        };
        if status != VIRTIO_BLK_S_OK {
            self.stats.errors += 1;
        }
        if status_w.write_all(&[status as u8]).is_err() {
            return written;
        }
        written + 1
    }

    fn execute<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        kind: u32,
        sector: u64,
        r: &mut Reader<'_, B>,
        w: &mut Writer<'_, B>,
    ) -> (u32, u32) {
        match kind {
            VIRTIO_BLK_T_IN => {
                let n = w.available_bytes();
                if n > MAX_REQUEST_BYTES || !self.in_range(sector, n) {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let mut buf = vec![0u8; n];
                let mut done = 0;
                while done < n {
                    match self
                        .file
                        .read_at(&mut buf[done..], sector * SECTOR + done as u64)
                    {
                        Ok(0) => break, // past the end of a shrunk file: zeroes
                        Ok(k) => done += k,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => return (VIRTIO_BLK_S_IOERR, 0),
                    }
                }
                if w.write_all(&buf).is_err() {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                self.stats.reads += 1;
                (VIRTIO_BLK_S_OK, n as u32)
            }
            VIRTIO_BLK_T_OUT => {
                let n = r.available_bytes();
                if self.read_only || n > MAX_REQUEST_BYTES || !self.in_range(sector, n) {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let mut buf = vec![0u8; n];
                if r.read_exact(&mut buf).is_err()
                    || self.file.write_all_at(&buf, sector * SECTOR).is_err()
                {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                self.stats.writes += 1;
                (VIRTIO_BLK_S_OK, 0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if self.flush().is_err() {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                self.stats.flushes += 1;
                (VIRTIO_BLK_S_OK, 0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = w.available_bytes().min(ID_BYTES);
                if w.write_all(&self.id[..n]).is_err() {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                (VIRTIO_BLK_S_OK, n as u32)
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }
}

/// Serves every available request of queue `q`; true if any completed.
pub(crate) fn process(dev: &mut VirtioMmio, q: usize) -> bool {
    let ram = dev.ram.clone();
    let mem = ram.memory();
    let mut used = false;
    while let Some(chain) = dev.queues[q].pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let len = match &mut dev.kind {
            Kind::Block(b) => b.handle(mem, chain),
            Kind::Net(_) => 0,
        };
        if dev.queues[q].add_used(mem, head, len).is_err() {
            // The used ring is not writable: the driver broke the queue.
            dev.status |= virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
            break;
        }
        used = true;
    }
    used
}
