//! heapcap's Linux layer: thin safe wrappers over the kernel objects heapcap uses.
//!
//! - [`filter`]: the heap-notify seccomp program (built with libseccomp) and loading it.
//! - [`mmshare`]: `kcmp(KCMP_VM)` (who shares an address space) and SysV segment sizes.
//! - [`journal`]: shared memory where the supervisor notes each call it is deciding, for its successor.
//! - [`inject`]: installing the filter into another process with ptrace (x86_64), for OCI hooks.
//! - [`notify`]: the seccomp listener fd: receive, answer, check a notification is still valid.
//! - [`pidfd`]: process and thread handles that cannot be fooled by pid reuse.
//! - [`pollring`]: which watched fds became readable, read from memory shared with the kernel (`io_uring`).
//! - [`procfs`]: `/proc/<pid>` readers (maps, stat, statm, status, syscall, mem).
//! - [`processvm`]: writing a call's result into the caller's memory (`process_vm_writev`).
//! - [`sysinfo`]: the kernel's `sysinfo(2)`, which heapcap answers for processes under a quota.
//! - [`procmap`]: `PROCMAP_QUERY` (6.11+), the mappings without the text of `/proc/<pid>/maps`.
//! - [`fdpass`]: passing fds over UNIX sockets (`SCM_RIGHTS`).
//! - [`peercred`]: a UNIX socket peer's credentials, and the root-only sockets' check of them.
//! - [`connect`]: connecting to heapcapd's socket with a timeout, for container start paths.
//! - [`spawn`]: starting a command under the filter.
//! - [`rlimit`]: the limit on open files, raised to the hard one; whether fds are plentiful.
//! - [`userns`]: the effective uid as the host sees it (rootless podman's hooks and runtime run as root
//!   in its user namespace), for default paths; whether this process reads every process's `/proc`.
//!
//! This is the only crate of heapcap with `unsafe` code; every block says why it is sound.

pub mod connect;
pub mod fdpass;
pub mod filter;
pub mod inject;
pub mod journal;
pub mod mmshare;
pub mod notify;
pub mod peercred;
pub mod pidfd;
pub mod pollring;
pub mod processvm;
pub mod procfs;
pub mod procmap;
pub mod rlimit;
pub mod spawn;
pub mod sysinfo;
pub mod userns;

/// The system page size.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions; _SC_PAGESIZE is always supported on Linux.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|s| s.is_power_of_two()).unwrap_or(4096)
}

/// The calling thread's last errno, as an `io::Error`.
pub(crate) fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}
