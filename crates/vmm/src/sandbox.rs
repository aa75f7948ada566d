//! The worker's seccomp filters (seccompiler, from rust-vmm), installed when a `run`,
//! `restore` or `receive` worker starts, before it reads its VM's configuration or state from
//! anywhere (nothing it needs later is denied). The guest is untrusted: a VMM bug it exploits should not give it the
//! host. Two kinds of filter, both killing the whole process on a match
//! (`SECCOMP_RET_KILL_PROCESS`: a worker that tries is gone, its VM with it, and its agent
//! reports the crash):
//!
//! - **every thread** ([`install`], with TSYNC so threads that already run get it too): no
//!   program execution or process creation (`execve`, `execveat`, `fork`, `vfork`, and
//!   `clone` without `CLONE_THREAD`; `clone3`, whose flags a filter cannot read, answers
//!   `ENOSYS` so the C library creates threads with `clone`), no privilege or identity
//!   changes (`set*uid`/`set*gid`/`setgroups`), no namespaces or mounts (`unshare`, `setns`,
//!   `mount`, the new mount API, `pivot_root`, `chroot`), no kernel modules, `kexec`, `bpf`,
//!   `perf_event_open`, `ptrace` or cross-process memory access, no keyrings, no clock or
//!   host setting (`settimeofday`, `clock_settime`, `adjtimex`, `reboot`, `swapon`,
//!   `sethostname`), no port I/O privileges (`iopl`, `ioperm`), no device nodes (`mknod`),
//!   no file handles by number (`open_by_handle_at`).
//! - **vCPU threads** ([`enter_vcpu_thread`], on top): the threads that run guest code and
//!   emulate its devices open no network sockets (`socket`, `socketpair`, `connect`, `bind`,
//!   `listen`, `accept*`) and never make memory executable (`mmap`/`mprotect` with
//!   `PROT_EXEC`).
//!
//! This is a deny-list: system calls a VMM has no use for, and those that would turn a
//! compromised worker into a compromised host. An allow-list per thread kind (Firecracker's
//! model) is tighter and is the next step (README, "Trust").

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

/// System calls no thread of a worker makes.
const DENIED: &[libc::c_long] = &[
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_fork,
    libc::SYS_vfork,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_pidfd_getfd,
    libc::SYS_setuid,
    libc::SYS_setgid,
    libc::SYS_setreuid,
    libc::SYS_setregid,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
    libc::SYS_setgroups,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_fsopen,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_sethostname,
    libc::SYS_setdomainname,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_mknod,
    libc::SYS_mknodat,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_syslog,
    libc::SYS_personality,
    libc::SYS_vhangup,
    libc::SYS_uselib,
    libc::SYS_userfaultfd,
];

/// System calls vCPU threads do not make (beyond [`DENIED`]).
const DENIED_ON_VCPUS: &[libc::c_long] = &[
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
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

fn compile(
    what: &'static str,
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    on_match: SeccompAction,
) -> Result<BpfProgram, SandboxError> {
    let build = |err| SandboxError::Build { what, err };
    SeccompFilter::new(rules, SeccompAction::Allow, on_match, arch())
        .and_then(BpfProgram::try_from)
        .map_err(build)
}

/// The filter every thread gets (kill the process on a match).
pub fn process_filter() -> Result<BpfProgram, SandboxError> {
    let build = |err| SandboxError::Build {
        what: "worker",
        err,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|&nr| (nr, vec![])).collect();
    // clone(flags, ...) without CLONE_THREAD creates a process.
    let no_thread = SeccompRule::new(vec![cond(
        0,
        SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
        0,
    )
    .map_err(build)?])
    .map_err(build)?;
    rules.insert(libc::SYS_clone, vec![no_thread]);
    compile("worker", rules, SeccompAction::KillProcess)
}

/// `clone3` answers ENOSYS (its flags live in memory a filter cannot read), so threads are
/// created with `clone`, whose flags [`process_filter`] checks.
fn clone3_filter() -> Result<BpfProgram, SandboxError> {
    let rules = [(libc::SYS_clone3, vec![])].into_iter().collect();
    compile("clone3", rules, SeccompAction::Errno(libc::ENOSYS as u32))
}

/// The filter vCPU threads get on top of [`process_filter`].
pub fn vcpu_filter() -> Result<BpfProgram, SandboxError> {
    let build = |err| SandboxError::Build { what: "vCPU", err };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED_ON_VCPUS.iter().map(|&nr| (nr, vec![])).collect();
    let exec = |arg| -> Result<Vec<SeccompRule>, SandboxError> {
        Ok(vec![SeccompRule::new(vec![cond(
            arg,
            SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
            libc::PROT_EXEC as u64,
        )
        .map_err(build)?])
        .map_err(build)?])
    };
    rules.insert(libc::SYS_mmap, exec(2)?);
    rules.insert(libc::SYS_mprotect, exec(2)?);
    rules.insert(libc::SYS_pkey_mprotect, exec(2)?);
    compile("vCPU", rules, SeccompAction::KillProcess)
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
