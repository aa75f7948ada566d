//! Host files a VM may use: its kernel, initrd and disk images lie under the *storage roots*
//! this process was given, and nothing else on the host is opened on a VM's behalf.
//!
//! A path from a VM's configuration (which, on a migration destination or in a cluster, comes
//! from outside) is untrusted. Under [`Policy::Roots`]:
//! - it must be absolute, without `..` components, and lie lexically under a root (as given
//!   or as canonicalized when the policy was made);
//! - it is opened with `openat2(root, rest, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` from a
//!   descriptor of the root taken when the policy was made, so no symlink, `..` or rename
//!   race leads out of the root (the kernel refuses with `EXDEV`);
//! - it is opened with `O_NONBLOCK | O_NOCTTY` (a FIFO cannot hang the worker, a terminal
//!   cannot become its controlling one) and then must be a regular file; a block device only
//!   if its root was given with `,devices`; anything else (directories, character devices,
//!   FIFOs, sockets) is refused.
//!
//! [`Policy::Unconfined`] (a user's own `ferry-vmm run` without `--storage-root`) opens what
//! it is told, as before. The policy is process-wide: a worker serves one VM, and it installs
//! its policy once at start-up, before it opens anything ([`install`]).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

/// What a file is opened for (the error names it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    Kernel,
    Initrd,
    Disk,
}

impl std::fmt::Display for Use {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Use::Kernel => "kernel",
            Use::Initrd => "initrd",
            Use::Disk => "disk image",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("{what} {path}: this host was given no roots for it ({kind}), so it opens no such file for a VM")]
    NoRoots {
        what: Use,
        path: String,
        kind: &'static str,
    },
    #[error("{what} {path} is not under this host's storage roots ({roots})")]
    Outside {
        what: Use,
        path: String,
        roots: String,
    },
    #[error("{what} {path}: {why}")]
    BadPath {
        what: Use,
        path: String,
        why: &'static str,
    },
    #[error(
        "{what} {path} leads out of storage root {root} (a symlink or `..` points outside it)"
    )]
    Escapes {
        what: Use,
        path: String,
        root: String,
    },
    #[error("{what} {path} is {kind}: only regular files{devices} may be used")]
    Type {
        what: Use,
        path: String,
        kind: &'static str,
        devices: &'static str,
    },
    #[error("{what} {path} does not exist")]
    Missing { what: Use, path: String },
    /// The OS error is part of the message (not a `source`), so that error-chain printers
    /// do not show it twice.
    #[error("{what} {path}: cannot open: {err}")]
    Open {
        what: Use,
        path: String,
        err: io::Error,
    },
    #[error("storage root {root}: {err}")]
    Root { root: String, err: io::Error },
    #[error("invalid storage root {0:?}: use DIR or DIR,devices (an absolute directory)")]
    RootSpec(String),
    #[error("{what} {path} was not opened before the worker dropped its privileges, so it cannot be opened now")]
    NotPreopened { what: Use, path: String },
    /// Opening it failed before the worker dropped its privileges; this is what it said.
    #[error("{0}")]
    Earlier(String),
    #[error("the storage policy was already set")]
    AlreadySet,
}

/// The error for a failed open: a missing file is said so plainly.
fn opening(what: Use, path: String, err: io::Error) -> ConfineError {
    if err.kind() == io::ErrorKind::NotFound {
        ConfineError::Missing { what, path }
    } else {
        ConfineError::Open { what, path, err }
    }
}

/// `DIR` or `DIR,devices`, as given on a command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootSpec {
    pub dir: PathBuf,
    /// Block devices under this root may be used as disks.
    pub devices: bool,
}

impl std::str::FromStr for RootSpec {
    type Err = ConfineError;
    fn from_str(s: &str) -> Result<RootSpec, ConfineError> {
        let (dir, devices) = match s.rsplit_once(',') {
            Some((d, "devices")) => (d, true),
            Some(_) => return Err(ConfineError::RootSpec(s.into())),
            None => (s, false),
        };
        if !dir.starts_with('/') {
            return Err(ConfineError::RootSpec(s.into()));
        }
        Ok(RootSpec {
            dir: dir.into(),
            devices,
        })
    }
}

impl std::fmt::Display for RootSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.dir.display())?;
        if self.devices {
            f.write_str(",devices")?;
        }
        Ok(())
    }
}

/// A storage root, held open.
#[derive(Debug)]
pub struct Root {
    /// As given.
    pub given: PathBuf,
    /// Canonical (symlinks of the path itself resolved once, when the root was opened).
    pub canonical: PathBuf,
    pub devices: bool,
    dir: OwnedFd,
}

/// Which host files a VM may use.
#[derive(Debug)]
pub enum Policy {
    /// Anything the configuration names (a user's own command line).
    Unconfined,
    /// Disk images only under `disks` (the node's storage), kernels and initrds only under
    /// `boot`; an empty list: none of that kind at all.
    Roots { disks: Vec<Root>, boot: Vec<Root> },
}

static POLICY: OnceLock<Policy> = OnceLock::new();

/// Sets this process's policy; before anything is opened, once.
pub fn install(p: Policy) -> Result<(), ConfineError> {
    POLICY.set(p).map_err(|_| ConfineError::AlreadySet)
}

/// This process's policy (unconfined if none was installed).
pub fn policy() -> &'static Policy {
    POLICY.get_or_init(|| Policy::Unconfined)
}

/// Opens `path` under this process's policy.
///
/// In a worker that dropped its privileges ([`crate::privilege`]) this is a new descriptor
/// of the file opened before the drop, and nothing else.
pub fn open(path: &Path, write: bool, what: Use) -> Result<File, ConfineError> {
    if let Some(f) = crate::privilege::file(path, write, what) {
        return f;
    }
    policy().open(path, write, what)
}

impl Policy {
    /// Opens the roots (each must be an existing directory): `disks` for disk images,
    /// `boot` for kernels and initrds.
    pub fn roots(disks: &[RootSpec], boot: &[RootSpec]) -> Result<Policy, ConfineError> {
        Ok(Policy::Roots {
            disks: open_roots(disks)?,
            boot: open_roots(boot)?,
        })
    }

    /// Whether `path` may be used at all (lexically: absolute, no `..`, under a root); what
    /// an agent checks when a VM is defined. Opening checks the same and more.
    pub fn check(&self, path: &Path, what: Use) -> Result<(), ConfineError> {
        match self {
            Policy::Unconfined => Ok(()),
            Policy::Roots { .. } => locate(self.roots_for(what), path, what).map(|_| ()),
        }
    }

    fn roots_for(&self, what: Use) -> &[Root] {
        match (self, what) {
            (Policy::Unconfined, _) => &[],
            (Policy::Roots { disks, .. }, Use::Disk) => disks,
            (Policy::Roots { boot, .. }, _) => boot,
        }
    }

    /// Opens `path` (read-write if `write`) under this policy.
    pub fn open(&self, path: &Path, write: bool, what: Use) -> Result<File, ConfineError> {
        let shown = || path.display().to_string();
        let access = if write { libc::O_RDWR } else { libc::O_RDONLY };
        let stat = |f: &File| {
            f.metadata().map_err(|source| ConfineError::Open {
                what,
                path: shown(),
                err: source,
            })
        };
        let file = match self {
            Policy::Unconfined => {
                use std::os::unix::fs::OpenOptionsExt;
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(write)
                    .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK)
                    .open(path)
                    .map_err(|source| opening(what, shown(), source))?;
                check_type(&stat(&f)?, path, what, true)?;
                f
            }
            Policy::Roots { .. } => {
                let (root, rest) = locate(self.roots_for(what), path, what)?;
                let beneath = |flags| {
                    openat2_beneath(&root.dir, &rest, flags).map_err(|e| match e.raw_os_error() {
                        Some(libc::EXDEV) | Some(libc::ELOOP) => ConfineError::Escapes {
                            what,
                            path: shown(),
                            root: root.given.display().to_string(),
                        },
                        _ => opening(what, shown(), e),
                    })
                };
                // What it is, before opening it for I/O (an O_PATH descriptor opens nothing:
                // a device refused here was never opened).
                let seen = stat(&beneath(libc::O_PATH)?)?;
                check_type(&seen, path, what, root.devices)?;
                let f = beneath(access | libc::O_NOCTTY | libc::O_NONBLOCK)?;
                let now = stat(&f)?;
                use std::os::unix::fs::MetadataExt;
                if (now.dev(), now.ino()) != (seen.dev(), seen.ino()) {
                    return Err(ConfineError::BadPath {
                        what,
                        path: shown(),
                        why: "was replaced while it was being opened",
                    });
                }
                f
            }
        };
        // Back to blocking I/O for the device's reads and writes.
        // SAFETY: F_GETFL/F_SETFL on a descriptor this function owns.
        unsafe {
            let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            if fl >= 0 {
                libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
            }
        }
        Ok(file)
    }
}

/// Regular files always; block devices only as disks and only if `devices`.
fn check_type(
    meta: &std::fs::Metadata,
    path: &Path,
    what: Use,
    devices: bool,
) -> Result<(), ConfineError> {
    let t = meta.file_type();
    let kind = if t.is_file() || (t.is_block_device() && what == Use::Disk && devices) {
        return Ok(());
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    Err(ConfineError::Type {
        what,
        path: path.display().to_string(),
        kind,
        devices: match (what, devices) {
            (Use::Disk, false) => " (block devices only under a root given with ,devices)",
            (Use::Disk, true) => " and block devices",
            _ => "",
        },
    })
}

/// Opens each root (an existing directory) as a lookup base.
fn open_roots(specs: &[RootSpec]) -> Result<Vec<Root>, ConfineError> {
    let mut roots = Vec::new();
    for s in specs {
        let err = |err| ConfineError::Root {
            root: s.dir.display().to_string(),
            err,
        };
        let canonical = std::fs::canonicalize(&s.dir).map_err(err)?;
        let c = std::ffi::CString::new(canonical.as_os_str().as_encoded_bytes())
            .map_err(|_| ConfineError::RootSpec(s.to_string()))?;
        // SAFETY: `c` is a NUL-terminated path; the flags ask for a directory descriptor
        // usable only as a lookup base (O_PATH); the result is checked.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        roots.push(Root {
            given: s.dir.clone(),
            canonical,
            devices: s.devices,
            // SAFETY: `fd` was just returned by open and is owned by nobody else.
            dir: unsafe { OwnedFd::from_raw_fd(fd) },
        });
    }
    Ok(roots)
}

fn describe(roots: &[Root]) -> String {
    roots
        .iter()
        .map(|r| r.given.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The root `path` lies under and the rest of the path below it.
fn locate<'a>(
    roots: &'a [Root],
    path: &Path,
    what: Use,
) -> Result<(&'a Root, PathBuf), ConfineError> {
    let bases: Vec<(usize, &Path)> = roots
        .iter()
        .enumerate()
        .flat_map(|(i, r)| [(i, r.canonical.as_path()), (i, r.given.as_path())])
        .collect();
    let (i, rest) = split(&bases, path, what, &|| describe(roots))?;
    Ok((&roots[i], rest))
}

/// Whether `path` lies under one of `roots` as written (absolute, no `..`, not a root
/// itself): what an agent checks of a VM definition against another node's roots, which it
/// cannot open. Opening under a [`Policy`] checks this and more.
pub fn check_lexical(roots: &[PathBuf], path: &Path, what: Use) -> Result<(), ConfineError> {
    let bases: Vec<(usize, &Path)> = roots.iter().map(|r| (0, r.as_path())).collect();
    let shown = || {
        roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    split(&bases, path, what, &shown).map(|_| ())
}

fn split(
    bases: &[(usize, &Path)],
    path: &Path,
    what: Use,
    describe: &dyn Fn() -> String,
) -> Result<(usize, PathBuf), ConfineError> {
    let shown = || path.display().to_string();
    if bases.is_empty() {
        return Err(ConfineError::NoRoots {
            kind: match what {
                Use::Disk => "--storage-root",
                _ => "--boot-root",
            },
            what,
            path: shown(),
        });
    }
    if !path.is_absolute() {
        return Err(ConfineError::BadPath {
            what,
            path: shown(),
            why: "must be an absolute path",
        });
    }
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(ConfineError::BadPath {
            what,
            path: shown(),
            why: "must not contain `..`",
        });
    }
    // Normalized (`.` and repeated slashes gone) for the prefix comparison.
    let norm: PathBuf = path.components().collect();
    for (i, base) in bases {
        let base: PathBuf = base.components().collect();
        if let Ok(rest) = norm.strip_prefix(&base) {
            if rest.as_os_str().is_empty() {
                return Err(ConfineError::BadPath {
                    what,
                    path: shown(),
                    why: "is a storage root itself",
                });
            }
            return Ok((*i, rest.to_path_buf()));
        }
    }
    Err(ConfineError::Outside {
        what,
        path: shown(),
        roots: describe(),
    })
}

/// `openat2(dir, rest, O_CLOEXEC | flags, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`.
fn openat2_beneath(dir: &OwnedFd, rest: &Path, flags: libc::c_int) -> io::Result<File> {
    let c = std::ffi::CString::new(rest.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open_how is plain old data; all-zero is valid (no mode, no resolve flags).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_CLOEXEC | flags) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 reads a NUL-terminated path and one open_how of the size passed, both
    // valid for the call; `dir` is an open directory descriptor; the result is checked.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor (fits c_int) that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd as libc::c_int) })
}

/// A directory held open by descriptor: files in it are created, renamed and removed by
/// name, relative to the descriptor. What happens to the path above it later does not matter,
/// nor whether the process can still reach it by path (a worker that dropped root cannot pass
/// its agent's private directories, but still writes its logs in the directory it was given).
#[derive(Debug)]
pub struct DirHandle {
    fd: OwnedFd,
    path: PathBuf,
}

fn cstr(name: &std::ffi::OsStr) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    if name.is_empty() || name.as_bytes().contains(&b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a file name"),
        ));
    }
    std::ffi::CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a file name"))
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl DirHandle {
    /// Opens the directory `path` (`O_PATH`: for the `*at` calls only).
    pub fn open(path: &Path) -> io::Result<DirHandle> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(path)?;
        Ok(DirHandle {
            fd: f.into(),
            path: path.to_path_buf(),
        })
    }

    /// The directory of the file `path` and the file's name.
    pub fn of_file(path: &Path) -> io::Result<(DirHandle, std::ffi::OsString)> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let name = path.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} names no file", path.display()),
            )
        })?;
        Ok((DirHandle::open(dir)?, name.to_os_string()))
    }

    /// The path it was opened by (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A new temporary file for `name` in this directory: `.<name>.<pid>.<random>.tmp`,
    /// created with `O_CREAT | O_EXCL | O_NOFOLLOW` and mode 0600. Nothing that already
    /// exists at that name is opened, truncated or followed, and the name cannot be guessed
    /// in advance. Returns the file and its name.
    pub fn create_temp(&self, name: &std::ffi::OsStr) -> io::Result<(File, std::ffi::OsString)> {
        let mut rnd = [0u8; 8];
        // SAFETY: getrandom writes at most `rnd.len()` bytes into the buffer it is given.
        let n = unsafe { libc::getrandom(rnd.as_mut_ptr().cast(), rnd.len(), 0) };
        if n != rnd.len() as isize {
            return Err(io::Error::last_os_error());
        }
        let tmp = std::ffi::OsString::from(format!(
            ".{}.{}.{:016x}.tmp",
            name.to_string_lossy(),
            std::process::id(),
            u64::from_le_bytes(rnd)
        ));
        let c = cstr(&tmp)?;
        // SAFETY: openat with a valid directory descriptor and a NUL-terminated name; the
        // result is checked and owned by the File.
        let fd = check(unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600 as libc::c_uint,
            )
        })?;
        // SAFETY: a fresh descriptor nothing else owns.
        Ok((unsafe { File::from_raw_fd(fd) }, tmp))
    }

    /// Renames `from` to `to`, both in this directory (replacing `to`).
    pub fn rename(&self, from: &std::ffi::OsStr, to: &std::ffi::OsStr) -> io::Result<()> {
        let (a, b) = (cstr(from)?, cstr(to)?);
        let d = self.fd.as_raw_fd();
        // SAFETY: renameat with valid descriptors and NUL-terminated names.
        check(unsafe { libc::renameat(d, a.as_ptr(), d, b.as_ptr()) }).map(|_| ())
    }

    /// Removes the file `name` of this directory.
    pub fn remove(&self, name: &std::ffi::OsStr) -> io::Result<()> {
        let c = cstr(name)?;
        // SAFETY: unlinkat with a valid descriptor and a NUL-terminated name.
        check(unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) }).map(|_| ())
    }
}

/// The PID of the process that made a temporary file of [`DirHandle::create_temp`]
/// (`.NAME.PID.HEX16.tmp`), or `None` for any other name.
pub fn temp_creator_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let mut parts = rest.rsplitn(3, '.');
    let rnd = parts.next()?;
    let pid = parts.next()?;
    parts.next().filter(|n| !n.is_empty())?;
    (rnd.len() == 16 && rnd.bytes().all(|b| b.is_ascii_hexdigit())).then_some(())?;
    pid.parse().ok()
}

/// A new temporary file beside `path` (same directory, so a rename moves it into place), as
/// [`DirHandle::create_temp`] makes it; returns the file and its path.
pub fn create_temp_beside(path: &Path) -> io::Result<(File, PathBuf)> {
    let (dir, name) = DirHandle::of_file(path)?;
    let (file, tmp) = dir.create_temp(&name)?;
    Ok((file, dir.path().join(tmp)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn temp_names_name_their_creator() {
        let d = DirHandle::of_file(&std::env::temp_dir().join("x"))
            .unwrap()
            .0;
        let (_f, name) = d.create_temp(std::ffi::OsStr::new("serial.log")).unwrap();
        assert_eq!(
            super::temp_creator_pid(name.to_str().unwrap()),
            Some(std::process::id())
        );
        let _ = d.remove(&name);
        use super::temp_creator_pid as p;
        assert_eq!(p("serial.log"), None);
        assert_eq!(p(".serial.log.4242.0123.tmp"), None);
        assert_eq!(p(".serial.log.x.0123456789abcdef.tmp"), None);
        assert_eq!(p("..4242.0123456789abcdef.tmp"), None);
    }

    use super::*;
    use std::os::unix::fs::symlink;

    fn spec(d: &Path, devices: bool) -> RootSpec {
        RootSpec {
            dir: d.into(),
            devices,
        }
    }

    #[test]
    fn root_specs_parse() {
        assert_eq!(
            "/srv/images".parse::<RootSpec>().unwrap(),
            spec(Path::new("/srv/images"), false)
        );
        assert_eq!(
            "/dev/vg0,devices".parse::<RootSpec>().unwrap(),
            spec(Path::new("/dev/vg0"), true)
        );
        for bad in ["images", "/srv,rw", ""] {
            assert!(bad.parse::<RootSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn only_regular_files_beneath_a_root_are_opened() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("vm")).unwrap();
        std::fs::write(root.join("vm/disk.img"), vec![0u8; 4096]).unwrap();
        std::fs::write(t.path().join("secret"), b"outside").unwrap();
        symlink(t.path().join("secret"), root.join("vm/escape")).unwrap();
        symlink("../../secret", root.join("vm/dotdot")).unwrap();
        symlink("disk.img", root.join("vm/inside")).unwrap();
        std::fs::create_dir(root.join("dir")).unwrap();
        let p = Policy::roots(&[spec(&root, false)], &[spec(&root, false)]).unwrap();

        let f = p.open(&root.join("vm/disk.img"), true, Use::Disk).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 4096);
        // A symlink that stays inside the root is followed; the root's own path (with `.`
        // and doubled slashes) is normalized.
        p.open(&root.join("vm/inside"), false, Use::Disk).unwrap();
        let odd = PathBuf::from(format!("{}//./vm/disk.img", root.display()));
        p.open(&odd, false, Use::Disk).unwrap();

        let e = |path: &Path| p.open(path, true, Use::Disk).unwrap_err().to_string();
        assert!(e(&root.join("vm/escape")).contains("leads out of storage root"));
        assert!(e(&root.join("vm/dotdot")).contains("leads out of storage root"));
        assert!(e(&t.path().join("secret")).contains("is not under this host's storage roots"));
        assert!(e(&root.join("vm/../../secret")).contains("must not contain `..`"));
        assert!(e(Path::new("vm/disk.img")).contains("absolute"));
        assert!(e(&root).contains("is a storage root itself"));
        assert!(e(&root.join("dir")).contains("is a directory"));
        assert!(e(&root.join("vm/missing")).contains("does not exist"));
        assert!(e(Path::new("/etc/shadow")).contains("not under"));
        assert!(e(Path::new("/dev/sda")).contains("not under"));
        // Lexically fine, checked the same way without opening.
        p.check(&root.join("vm/new.img"), Use::Disk).unwrap();
        let roots = [PathBuf::from("/srv/a/"), PathBuf::from("/srv/b")];
        check_lexical(&roots, Path::new("/srv/a/x.img"), Use::Disk).unwrap();
        check_lexical(&roots, Path::new("/srv/b/./y/x.img"), Use::Disk).unwrap();
        for bad in [
            "/srv/ab/x.img",
            "/srv/a/../c",
            "/srv/b",
            "srv/a/x",
            "/etc/shadow",
        ] {
            assert!(
                check_lexical(&roots, Path::new(bad), Use::Disk).is_err(),
                "{bad}"
            );
        }
        assert!(check_lexical(&[], Path::new("/srv/a/x"), Use::Kernel).is_err());
        assert!(p.check(Path::new("/etc/passwd"), Use::Kernel).is_err());

        // Disk roots and boot roots are separate: a disk root serves no kernel.
        let disks_only = Policy::roots(&[spec(&root, false)], &[]).unwrap();
        disks_only
            .open(&root.join("vm/disk.img"), false, Use::Disk)
            .unwrap();
        let e = disks_only
            .open(&root.join("vm/disk.img"), false, Use::Initrd)
            .unwrap_err();
        assert!(e.to_string().contains("initrd"), "{e}");

        let none = Policy::roots(&[], &[]).unwrap();
        let e = none
            .open(&root.join("vm/disk.img"), false, Use::Kernel)
            .unwrap_err();
        assert!(
            e.to_string().contains("no roots for it (--boot-root)"),
            "{e}"
        );
    }

    #[test]
    fn fifos_and_devices_are_refused_without_hanging() {
        let t = tempfile::tempdir().unwrap();
        let fifo = t.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path; mkfifo creates a FIFO there.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let p = Policy::roots(&[spec(t.path(), true)], &[spec(t.path(), true)]).unwrap();
        // Read-only: without O_NONBLOCK this open would wait for a writer forever.
        let e = p.open(&fifo, false, Use::Disk).unwrap_err().to_string();
        assert!(e.contains("is a FIFO"), "{e}");
        // A block device node under a root without `,devices` is refused before it is
        // opened (this one names loop0).
        let blk = t.path().join("blk");
        let c = std::ffi::CString::new(blk.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path; mknod creates a device node there (needs root).
        let made = unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o600, libc::makedev(7, 0)) };
        assert_eq!(made, 0, "mknod: {}", io::Error::last_os_error());
        let plain = Policy::roots(&[spec(t.path(), false)], &[]).unwrap();
        let e = plain.open(&blk, true, Use::Disk).unwrap_err().to_string();
        assert!(
            e.contains("is a block device") && e.contains(",devices"),
            "{e}"
        );
        let e = p.open(&blk, false, Use::Kernel).unwrap_err().to_string();
        assert!(
            e.contains("kernel") && e.contains("is a block device"),
            "{e}"
        );
        // A character device, even under a root that allows (block) devices.
        let dev = Policy::roots(&[spec(Path::new("/dev"), true)], &[]).unwrap();
        let e = dev
            .open(Path::new("/dev/null"), true, Use::Disk)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is a character device"), "{e}");
        // Unconfined refuses the same types.
        let e = Policy::Unconfined
            .open(Path::new("/dev/null"), false, Use::Kernel)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is a character device"), "{e}");
    }
}
