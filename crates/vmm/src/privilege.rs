//! Running a worker without root.
//!
//! A worker needs root (or capabilities) only to *open* things: `/dev/kvm` (mode 0600 on many
//! hosts), its disk images and kernel (often root's files), and its TAPs (creating one and
//! making it a bridge port needs `CAP_NET_ADMIN`). Everything it does afterwards (KVM ioctls,
//! guest RAM, reads and writes on those descriptors, TCP, its control socket) works for any
//! user. So a worker given `--user` opens all of that first ([`preopen_kvm`],
//! [`preopen_file`], [`preopen_taps`]), then becomes that user with no capabilities at all
//! ([`drop_to`]), and only then reads anything untrusted (the snapshot, the migration stream,
//! the guest). From then on the VMM's own opening functions ([`crate::open_kvm`],
//! [`crate::confine::open`], the NIC constructor) hand out what was opened before, and refuse
//! everything else with a clear error ([`ConfineError::NotPreopened`], [`PrivilegeError::NoTap`]): a worker cannot be
//! talked into opening a file or a TAP its agent did not give it, even one its new user could
//! open.
//!
//! The table is process-wide: a worker serves one VM.

use crate::confine::{self, ConfineError, Use};
use crate::devices::tap::{Tap, TapError};
use crate::devices::virtio::NetBackend;
use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("unknown user {0:?} (give a user name, UID or UID:GID)")]
    UnknownUser(String),
    #[error("refusing to run the worker as root with --user (give an unprivileged user)")]
    Root,
    #[error("the TAP of NIC {0} was not created before the worker dropped its privileges, so it cannot be created now")]
    NoTap(usize),
    #[error("{0}")]
    Nics(String),
    #[error("cannot drop privileges ({step}): {err}")]
    Drop {
        step: &'static str,
        err: std::io::Error,
    },
    #[error("privileges were not dropped: {0}")]
    StillPrivileged(String),
    #[error("cannot open /dev/kvm: {0}")]
    Kvm(std::io::Error),
    #[error(transparent)]
    Tap(#[from] TapError),
}

/// The unprivileged identity a worker becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
}

impl std::str::FromStr for User {
    type Err = PrivilegeError;
    /// `NAME` (its primary group from the user database), `UID` (group = the same number)
    /// or `UID:GID`.
    fn from_str(s: &str) -> Result<User, PrivilegeError> {
        let bad = || PrivilegeError::UnknownUser(s.to_string());
        let user = if let Some((u, g)) = s.split_once(':') {
            User {
                uid: u.parse().map_err(|_| bad())?,
                gid: g.parse().map_err(|_| bad())?,
            }
        } else if let Ok(uid) = s.parse::<u32>() {
            User { uid, gid: uid }
        } else {
            lookup_name(s).ok_or_else(bad)?
        };
        // uid/gid -1 means "unchanged" to the set*id calls.
        if user.uid == u32::MAX || user.gid == u32::MAX {
            return Err(bad());
        }
        if user.uid == 0 || user.gid == 0 {
            return Err(PrivilegeError::Root);
        }
        Ok(user)
    }
}

impl std::fmt::Display for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.uid, self.gid)
    }
}

fn lookup_name(name: &str) -> Option<User> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: passwd is plain old data; all-zero is a valid (empty) value.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwnam_r writes into `pw` and `buf` (of the length given) and sets `out` to
    // `&pw` on success; all pointers are valid for the call.
    let r = unsafe { libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
    (r == 0 && !out.is_null()).then_some(User {
        uid: pw.pw_uid,
        gid: pw.pw_gid,
    })
}

static SEALED: AtomicBool = AtomicBool::new(false);
static KVM: OnceLock<OwnedFd> = OnceLock::new();
static FILES: Mutex<Vec<Preopened>> = Mutex::new(Vec::new());
static TAPS: Mutex<Vec<Option<Result<Tap, String>>>> = Mutex::new(Vec::new());

/// A file opened before the drop, or why it could not be: the error is given (as text: it
/// was an OS error at that time) to whoever asks for the file later, e.g. a migration's
/// preflight, which reports it as it would have then.
struct Preopened {
    path: PathBuf,
    write: bool,
    what: Use,
    file: Result<File, String>,
}

/// Whether this process dropped its privileges (and opens nothing new).
pub fn sealed() -> bool {
    SEALED.load(Ordering::SeqCst)
}

/// Opens `/dev/kvm` now, for [`crate::open_kvm`] to use later.
pub fn preopen_kvm() -> Result<(), PrivilegeError> {
    if KVM.get().is_some() {
        return Ok(());
    }
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/kvm")
        .map_err(PrivilegeError::Kvm)?;
    let _ = KVM.set(OwnedFd::from(f));
    Ok(())
}

/// The pre-opened `/dev/kvm` (a new descriptor of it), if there is one.
pub(crate) fn kvm() -> Option<Result<kvm_ioctls::Kvm, std::io::Error>> {
    let fd = KVM.get()?;
    Some(fd.try_clone().map(|fd| {
        // SAFETY: `fd` is a fresh descriptor of /dev/kvm that the Kvm object now owns.
        unsafe { kvm_ioctls::Kvm::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) }
    }))
}

/// Opens `path` now under the storage policy (as [`confine::open`] will be asked to later).
pub fn preopen_file(path: &Path, write: bool, what: Use) {
    let file = confine::policy()
        .open(path, write, what)
        .map_err(|e| e.to_string());
    FILES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Preopened {
            path: path.to_path_buf(),
            write,
            what,
            file,
        });
}

/// What [`confine::open`] gets after the drop: a new descriptor of the file opened before
/// (the same open file description, so also read-write where a read-write file was opened
/// and a read-only one is asked for), or a refusal. `None`: nothing was pre-opened and the
/// process still has its privileges, so open as usual.
pub(crate) fn file(path: &Path, write: bool, what: Use) -> Option<Result<File, ConfineError>> {
    let files = FILES.lock().unwrap_or_else(|e| e.into_inner());
    let found = files
        .iter()
        // A read-write file serves reads too (e.g. a migration source sizing its own disk).
        .find(|p| p.path == path && (p.write || !write) && p.what == what);
    match found {
        Some(p) => Some(match &p.file {
            Ok(f) => f.try_clone().map_err(|err| ConfineError::Open {
                what,
                path: path.display().to_string(),
                err,
            }),
            Err(e) => Err(ConfineError::Earlier(e.clone())),
        }),
        None if sealed() => Some(Err(ConfineError::NotPreopened {
            what,
            path: path.display().to_string(),
        })),
        None => None,
    }
}

/// Creates the TAPs of a VM with `nics` NICs now, with their carrier off (a bridge forwards
/// nothing to them yet): one per NIC in order, as [`crate::devices::virtio::HostDevices`]
/// resolves `backends`. The NIC constructor takes them later and turns the carrier on; a TAP
/// that cannot be created is reported there (e.g. in a migration's setup), as before.
pub fn preopen_taps(backends: &[NetBackend], nics: usize) {
    let taps = match crate::devices::virtio::HostDevices::for_nics(backends, nics) {
        Err(e) => (0..nics).map(|_| Some(Err(e.clone()))).collect(),
        Ok(host) => host
            .nets
            .iter()
            .enumerate()
            .map(|(i, b)| Some(create_tap(i, b).map_err(|e| e.to_string())))
            .collect(),
    };
    *TAPS.lock().unwrap_or_else(|e| e.into_inner()) = taps;
}

fn create_tap(index: usize, backend: &NetBackend) -> Result<Tap, TapError> {
    let (t, bridge) = match backend {
        NetBackend::Bridge(br) => (
            Tap::open(&format!("fy{}n{index}", std::process::id()))?,
            Some(br),
        ),
        NetBackend::Tap(name) => (Tap::open(name)?, None),
    };
    t.set_carrier(false)?;
    if let Some(br) = bridge {
        t.attach(br)?;
    }
    t.set_up()?;
    Ok(t)
}

/// The TAP of NIC `index` created before the drop (carrier on from now), or a refusal once
/// the process is unprivileged; `None`: create it as usual.
pub(crate) fn tap(index: usize) -> Option<Result<Tap, PrivilegeError>> {
    let mut taps = TAPS.lock().unwrap_or_else(|e| e.into_inner());
    match taps.get_mut(index).and_then(Option::take) {
        Some(Ok(t)) => Some(t.set_carrier(true).map(|_| t).map_err(Into::into)),
        Some(Err(e)) => Some(Err(PrivilegeError::Nics(e))),
        None if sealed() => Some(Err(PrivilegeError::NoTap(index))),
        None => None,
    }
}

fn os(step: &'static str, r: libc::c_int) -> Result<(), PrivilegeError> {
    if r < 0 {
        return Err(PrivilegeError::Drop {
            step,
            err: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Becomes `user` for good: no supplementary groups, real/effective/saved IDs all `user`,
/// no capabilities (permitted, effective, inheritable, ambient), no new privileges, not
/// dumpable (another process of the same user cannot read this one's memory). Then checks
/// that it worked, and that root cannot be regained. From here on nothing new is opened
/// (see the module documentation).
pub fn drop_to(user: User) -> Result<(), PrivilegeError> {
    // SAFETY: plain system calls with integer arguments or null pointers; results checked.
    unsafe {
        os(
            "PR_SET_KEEPCAPS",
            libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0),
        )?;
        os(
            "PR_CAP_AMBIENT_CLEAR_ALL",
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ),
        )?;
        os("setgroups", libc::setgroups(0, std::ptr::null()))?;
        os("setresgid", libc::setresgid(user.gid, user.gid, user.gid))?;
        os("setresuid", libc::setresuid(user.uid, user.uid, user.uid))?;
        os(
            "PR_SET_NO_NEW_PRIVS",
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
        )?;
        os(
            "PR_SET_DUMPABLE",
            libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0),
        )?;
    }
    SEALED.store(true, Ordering::SeqCst);
    check_dropped(user)
}

/// Verifies what [`drop_to`] promises, from the kernel's point of view.
fn check_dropped(user: User) -> Result<(), PrivilegeError> {
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: getresuid/getresgid write three integers through valid pointers.
    unsafe { libc::getresuid(&mut r, &mut e, &mut s) };
    if [r, e, s] != [user.uid; 3] {
        return Err(PrivilegeError::StillPrivileged(format!("uids {r}/{e}/{s}")));
    }
    // SAFETY: as above.
    unsafe { libc::getresgid(&mut r, &mut e, &mut s) };
    if [r, e, s] != [user.gid; 3] {
        return Err(PrivilegeError::StillPrivileged(format!("gids {r}/{e}/{s}")));
    }
    // SAFETY: getgroups(0, NULL) only returns the count.
    let groups = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    if groups != 0 {
        return Err(PrivilegeError::StillPrivileged(format!(
            "{groups} supplementary groups"
        )));
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    for key in ["CapPrm:", "CapEff:", "CapInh:", "CapAmb:"] {
        let v = status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
            .unwrap_or("?");
        if u64::from_str_radix(v, 16) != Ok(0) {
            return Err(PrivilegeError::StillPrivileged(format!("{key} {v}")));
        }
    }
    // SAFETY: setuid(0) must fail now; if it did not, the check below reports it.
    if unsafe { libc::setuid(0) } == 0 {
        return Err(PrivilegeError::StillPrivileged(
            "setuid(0) succeeded".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_parse() {
        assert_eq!(
            "1234".parse::<User>().unwrap(),
            User {
                uid: 1234,
                gid: 1234
            }
        );
        assert_eq!(
            "1234:99".parse::<User>().unwrap(),
            User { uid: 1234, gid: 99 }
        );
        assert_eq!(
            "nobody".parse::<User>().unwrap(),
            User {
                uid: 65534,
                gid: 65534
            }
        );
        assert!(matches!("0".parse::<User>(), Err(PrivilegeError::Root)));
        assert!(matches!("root".parse::<User>(), Err(PrivilegeError::Root)));
        assert!(matches!("5:0".parse::<User>(), Err(PrivilegeError::Root)));
        for bad in ["no-such-user-here", "1:x", "4294967295", "", "-1"] {
            assert!(
                matches!(bad.parse::<User>(), Err(PrivilegeError::UnknownUser(_))),
                "{bad}"
            );
        }
    }
}
