//! Who shares an address space, and how big a SysV segment is: what strict mode and the shared
//! accounts ask the kernel that `/proc` does not say.
//!
//! - [`same_vm`]: `kcmp(KCMP_VM)`, the kernel's own answer to "do these two tasks use one
//!   `mm_struct`" (threads do, a `clone(CLONE_VM)` child without `CLONE_THREAD` does, a vfork
//!   child does until it execs). It needs ptrace read access to both (a supervisor that may read
//!   their maps has it). It is asked with pids, so the caller must check afterwards that both
//!   are still the tasks it meant (a pending notification, a pidfd not exited).
//! - [`segment_size`]: `shmctl(IPC_STAT)` in the caller's IPC namespace, entered on a short-lived
//!   thread with `setns` when it is not the supervisor's own. A segment's size never changes.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

const KCMP_VM: libc::c_int = 1;

/// Whether tasks `a` and `b` use the same address space.
pub fn same_vm(a: u32, b: u32) -> io::Result<bool> {
    // SAFETY: kcmp takes two pids, a type and two unused integer arguments; no memory is passed.
    let rc = unsafe { libc::syscall(libc::SYS_kcmp, a as libc::pid_t, b as libc::pid_t, KCMP_VM, 0, 0) };
    match rc {
        0 => Ok(true),
        r if r > 0 => Ok(false),
        _ => Err(crate::last_error()),
    }
}

/// The size in bytes of SysV shared memory segment `shmid` in the IPC namespace `ipc_ns` (an
/// open `/proc/<pid>/ns/ipc`); `None` when there is no such segment (the kernel's `shmat` fails
/// on it too).
pub fn segment_size(ipc_ns: &File, shmid: u64) -> io::Result<Option<u64>> {
    let Ok(id) = libc::c_int::try_from(shmid) else { return Ok(None) };
    let ours = std::fs::metadata("/proc/thread-self/ns/ipc")?;
    let theirs = ipc_ns.metadata()?;
    if (ours.dev(), ours.ino()) == (theirs.dev(), theirs.ino()) {
        return stat(id);
    }
    let fd = ipc_ns.as_raw_fd();
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: `fd` is an open namespace fd borrowed from `ipc_ns`, which outlives this
            // scoped thread; setns changes only this thread's IPC namespace, and the thread ends
            // right after (nothing else ever runs on it).
            if unsafe { libc::setns(fd, libc::CLONE_NEWIPC) } != 0 {
                return Err(crate::last_error());
            }
            stat(id)
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the IPC namespace thread panicked")))
    })
}

fn stat(id: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: shmid_ds is plain old data; all zeroes is a valid value to be overwritten.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: IPC_STAT writes one `shmid_ds` to the pointer, which points at `ds`, live and
    // exclusively borrowed for the call.
    if unsafe { libc::shmctl(id, libc::IPC_STAT, &mut ds) } == 0 {
        return Ok(Some(ds.shm_segsz as u64));
    }
    let e = crate::last_error();
    match e.raw_os_error() {
        Some(libc::EINVAL | libc::EIDRM) => Ok(None),
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_shares_its_vm_with_itself_and_not_with_its_parent() {
        let me = std::process::id();
        assert!(same_vm(me, me).expect("kcmp(KCMP_VM) (CONFIG_KCMP)"));
        let parent = std::os::unix::process::parent_id();
        assert!(!same_vm(me, parent).unwrap_or(false));
    }

    #[test]
    fn segment_sizes_are_read_from_the_namespace() {
        // SAFETY: a private segment of 3 pages; removed below.
        let id = unsafe { libc::shmget(libc::IPC_PRIVATE, 3 * 4096, libc::IPC_CREAT | 0o600) };
        assert!(id >= 0, "shmget: {}", io::Error::last_os_error());
        let ns = File::open("/proc/self/ns/ipc").unwrap();
        let size = segment_size(&ns, id as u64);
        // SAFETY: removes the segment made above.
        unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
        assert_eq!(size.unwrap(), Some(3 * 4096));
        assert_eq!(segment_size(&ns, id as u64).unwrap(), None, "removed");
    }
}
