//! The worker's seccomp filters (seccompiler, from rust-vmm), installed when a `run`,
//! `restore` or `receive` worker starts, after it dropped root (`crate::privilege`) and before
//! it reads its VM's configuration or state from anywhere. The guest is untrusted: a VMM bug
//! it exploits should not give it the host. Allow-lists, one per thread kind, as Firecracker
//! and Cloud Hypervisor do; a system call not on the list kills the whole process
//! (`SECCOMP_RET_KILL_PROCESS`: a worker that tries is gone, its VM with it, and its agent
//! reports the crash):
//!
//! - **every thread** ([`install`], with TSYNC so threads that already run get it too):
//!   [`WORKER_ALLOWED`]: file and socket I/O on descriptors, memory management, threads,
//!   signals to itself, time; `ioctl` only with the requests of [`IOCTLS_ALLOWED`] and the KVM
//!   family (not, e.g., `TIOCSTI`). `clone` only with `CLONE_THREAD` (threads,
//!   not processes); `clone3`, whose flags a filter cannot read, answers `ENOSYS` (a second
//!   filter) so the C library creates threads with `clone`; `socket` only for Unix, IPv4 and
//!   IPv6. Not on it, among others: program execution and process creation, identity
//!   changes, namespaces and mounts, modules, `kexec`, `bpf`, `perf_event_open`, `ptrace`
//!   and cross-process memory access, keyrings, clock and host settings, port-I/O
//!   privileges, device nodes, file handles, `userfaultfd`, `io_uring`.
//! - **vCPU threads** ([`enter_vcpu_thread`], on top): [`VCPU_ALLOWED`], what running guest
//!   code and emulating its devices takes: KVM ioctls, reads and writes on open descriptors
//!   (disk images, TAPs, eventfds, the serial log), waiting and sleeping, memory that is
//!   never executable (`mmap`/`mprotect` without `PROT_EXEC`), threads (a device the guest
//!   activates starts its I/O thread here). No sockets; no file opened, only new ones created
//!   (`openat` with `O_CREAT | O_EXCL`: the serial log rotates on the thread the guest prints
//!   from).
//!
//! Both lists were learnt over the whole test suite with the filters in log mode
//! (`FERRY_SECCOMP_LEARN=1` in a fault-injection build: a call not on a list is logged by
//! the kernel as an audit record instead of killing the worker), then checked against what
//! each system call does.

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot build the {what} seccomp filter")]
    Build {
        what: &'static str,
        #[source]
        err: seccompiler::BackendError,
    },
    #[error("cannot install the {what} seccomp filter")]
    Install {
        what: &'static str,
        #[source]
        err: seccompiler::Error,
    },
}

static VCPU_FILTER: AtomicBool = AtomicBool::new(false);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// System calls any thread of a worker may make (`clone` and `socket` with the argument
/// checks of [`process_filter`]).
pub const WORKER_ALLOWED: &[libc::c_long] = &[
    // descriptors and files
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_chmod,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_statx,
    libc::SYS_lseek,
    // Which huge pages of guest RAM are allocated (hugetlbfs has no SEEK_DATA).
    libc::SYS_mincore,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_eventfd2,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rename,
    libc::SYS_getdents64,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getcwd,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_memfd_create,
    libc::SYS_copy_file_range,
    libc::SYS_sendfile,
    // waiting
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_futex,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_sched_yield,
    // sockets (TCP migration streams, the control socket)
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    // memory
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_membarrier,
    // threads and signals (its own)
    libc::SYS_clone3,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_set_tid_address,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_sched_getaffinity,
    libc::SYS_prctl,
    // more filters (a vCPU thread adds its own: only ever narrower)
    libc::SYS_seccomp,
    // facts
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_prlimit64,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
];

/// System calls a vCPU thread may make (on top of [`WORKER_ALLOWED`]'s filter: both apply).
/// `mmap` and `mprotect` never with `PROT_EXEC`, `clone` only for threads.
pub const VCPU_ALLOWED: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_ioctl,
    libc::SYS_fcntl,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_ftruncate,
    // (the serial log rotates where the guest prints: see `openat` in [`vcpu_filter`])
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_futex,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_clone3,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_sched_getaffinity,
    libc::SYS_prctl,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
];

fn arch() -> seccompiler::TargetArch {
    seccompiler::TargetArch::x86_64
}

fn cond(
    arg: u8,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
}

/// What a call off a list gets: the kill, or (learning mode) an audit record.
fn off_list() -> SeccompAction {
    if contract::faults::seccomp_learning() {
        SeccompAction::Log
    } else {
        SeccompAction::KillProcess
    }
}

/// An allow-list: the calls of `plain` with any arguments, those of `checked` only with their
/// rules; everything else gets [`off_list`].
fn allow_list(
    what: &'static str,
    plain: &[libc::c_long],
    checked: Vec<(libc::c_long, Vec<SeccompRule>)>,
) -> Result<BpfProgram, SandboxError> {
    let build = |err| SandboxError::Build { what, err };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = plain.iter().map(|&nr| (nr, vec![])).collect();
    rules.extend(checked);
    SeccompFilter::new(rules, off_list(), SeccompAction::Allow, arch())
        .and_then(BpfProgram::try_from)
        .map_err(build)
}

/// The `ioctl` requests a worker makes: the whole KVM family (`_IOC_TYPE` 0xAE: the system,
/// VM, vCPU and device descriptors), the TAP's (`TUNSETIFF`, `TUNSETVNETHDRSZ`,
/// `TUNSETCARRIER`), what `receive` workers without `--user` need to build a NIC on a bridge
/// after the filters are on (`SIOCGIFFLAGS`, `SIOCSIFFLAGS`, `SIOCGIFINDEX`, `SIOCBRADDIF`),
/// and the standard library's descriptor flags (`FIONBIO`, `FIOCLEX`, `FIONCLEX`) and terminal
/// queries (`TCGETS`, `TIOCGWINSZ`). Not, among others: `TIOCSTI` (typing into a terminal),
/// block-device, filesystem (`FICLONE`, `FS_IOC_*`) and other network-configuration requests.
/// The request is compared in its low 32 bits, which is all the kernel reads of it.
pub const IOCTL_KVM_TYPE: u64 = 0xAE;
pub const IOCTLS_ALLOWED: &[u64] = &[
    libc::TUNSETIFF,
    libc::TUNSETVNETHDRSZ,
    libc::TUNSETCARRIER,
    libc::SIOCGIFFLAGS,
    libc::SIOCSIFFLAGS,
    libc::SIOCGIFINDEX,
    crate::devices::tap::SIOCBRADDIF,
    libc::FIONBIO,
    libc::FIOCLEX,
    libc::FIONCLEX,
    libc::TCGETS,
    libc::TIOCGWINSZ,
];

fn ioctl_rules(what: &'static str) -> Result<(libc::c_long, Vec<SeccompRule>), SandboxError> {
    let build = |err| SandboxError::Build { what, err };
    let dword =
        |op, value| SeccompCondition::new(1, SeccompCmpArgLen::Dword, op, value).map_err(build);
    let mut rules = vec![SeccompRule::new(vec![dword(
        SeccompCmpOp::MaskedEq(0xff00),
        IOCTL_KVM_TYPE << 8,
    )?])
    .map_err(build)?];
    for &req in IOCTLS_ALLOWED {
        rules.push(SeccompRule::new(vec![dword(SeccompCmpOp::Eq, req)?]).map_err(build)?);
    }
    Ok((libc::SYS_ioctl, rules))
}

/// `clone` with `CLONE_THREAD` (a thread, never a process).
fn threads_only(what: &'static str) -> Result<(libc::c_long, Vec<SeccompRule>), SandboxError> {
    let build = |err| SandboxError::Build { what, err };
    let rule = SeccompRule::new(vec![cond(
        0,
        SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
        libc::CLONE_THREAD as u64,
    )
    .map_err(build)?])
    .map_err(build)?;
    Ok((libc::SYS_clone, vec![rule]))
}

/// The filter every thread gets.
pub fn process_filter() -> Result<BpfProgram, SandboxError> {
    let what = "worker";
    let build = |err| SandboxError::Build { what, err };
    let domain = |d: libc::c_int| -> Result<SeccompRule, SandboxError> {
        SeccompRule::new(vec![cond(0, SeccompCmpOp::Eq, d as u64).map_err(build)?]).map_err(build)
    };
    let sockets = vec![
        domain(libc::AF_UNIX)?,
        domain(libc::AF_INET)?,
        domain(libc::AF_INET6)?,
    ];
    allow_list(
        what,
        WORKER_ALLOWED,
        vec![
            threads_only(what)?,
            (libc::SYS_socket, sockets),
            ioctl_rules(what)?,
        ],
    )
}

/// `clone3` answers ENOSYS (its flags live in memory a filter cannot read), so threads are
/// created with `clone`, whose flags [`process_filter`] checks.
fn clone3_filter() -> Result<BpfProgram, SandboxError> {
    let build = |err| SandboxError::Build {
        what: "clone3",
        err,
    };
    let rules = [(libc::SYS_clone3, vec![])].into_iter().collect();
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch(),
    )
    .and_then(BpfProgram::try_from)
    .map_err(build)
}

/// The filter vCPU threads get on top of [`process_filter`].
pub fn vcpu_filter() -> Result<BpfProgram, SandboxError> {
    let what = "vCPU";
    let build = |err| SandboxError::Build { what, err };
    let no_exec = |arg| -> Result<Vec<SeccompRule>, SandboxError> {
        Ok(vec![SeccompRule::new(vec![cond(
            arg,
            SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )
        .map_err(build)?])
        .map_err(build)?])
    };
    // Files only created afresh (the serial log's next file when it rotates), never an
    // existing one opened.
    let excl = (libc::O_CREAT | libc::O_EXCL) as u64;
    let create_only = vec![SeccompRule::new(vec![
        cond(2, SeccompCmpOp::MaskedEq(excl), excl).map_err(build)?
    ])
    .map_err(build)?];
    allow_list(
        what,
        VCPU_ALLOWED,
        vec![
            threads_only(what)?,
            (libc::SYS_mmap, no_exec(2)?),
            (libc::SYS_mprotect, no_exec(2)?),
            (libc::SYS_openat, create_only),
        ],
    )
}

/// Installs the worker's filters on every thread of this process, and arms the vCPU filter
/// for vCPU threads started from now on. The filters cannot be removed.
pub fn install() -> Result<(), SandboxError> {
    let process = process_filter()?;
    let clone3 = clone3_filter()?;
    vcpu_filter()?;
    for (what, prog) in [("clone3", &clone3), ("worker", &process)] {
        seccompiler::apply_filter_all_threads(prog)
            .map_err(|err| SandboxError::Install { what, err })?;
    }
    VCPU_FILTER.store(true, Ordering::SeqCst);
    INSTALLED.store(true, Ordering::SeqCst);
    Ok(())
}

/// Whether [`install`] ran in this process.
pub fn installed() -> bool {
    INSTALLED.load(Ordering::SeqCst)
}

/// Called by each vCPU thread before it runs guest code: applies the vCPU filter if the
/// worker is sandboxed. A thread that cannot be confined does not run the guest.
pub fn enter_vcpu_thread() -> Result<(), SandboxError> {
    if VCPU_FILTER.load(Ordering::SeqCst) {
        let prog = vcpu_filter()?;
        seccompiler::apply_filter(&prog)
            .map_err(|err| SandboxError::Install { what: "vCPU", err })?;
    }
    if contract::faults::sandbox_probe(contract::faults::SandboxProbe::VcpuSocket) {
        // SAFETY: socket(2) takes no pointers; the probe expects the process to be killed.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    }
    if contract::faults::sandbox_probe(contract::faults::SandboxProbe::VcpuOpen) {
        eprintln!("ferry-vmm: sandbox probe: a vCPU thread opens /proc/self/status");
        let r = std::fs::File::open("/proc/self/status");
        eprintln!("ferry-vmm: sandbox probe: the filter let it through: {r:?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filters_compile() {
        assert!(!process_filter().unwrap().is_empty());
        assert!(!clone3_filter().unwrap().is_empty());
        assert!(!vcpu_filter().unwrap().is_empty());
    }
}
