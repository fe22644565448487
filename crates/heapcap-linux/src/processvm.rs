//! Another process's memory, read and written with `process_vm_readv`/`process_vm_writev`: how
//! heapcap hands a call it carries out itself (`sysinfo`) its result, in the caller's buffer.
//!
//! Not `/proc/<pid>/mem`: its writes pass page protections (`FOLL_FORCE`), so a buffer in
//! read-only memory would be written where the kernel's own `copy_to_user` fails with `EFAULT`.
//! These calls fault as the kernel's copy does. They take a pid, not a handle: the caller checks
//! that the notification is still pending just before, while its thread cannot leave the call
//! but by dying, and a dead thread's id is not handed out again within that instant.

use std::io;

/// Why a write was not made.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Part of the range is not mapped, or not readable and writable: what the kernel's own copy
    /// would fail with `EFAULT`. Nothing was left written.
    #[error("the buffer at {addr:#x} ({len} bytes) is not writable memory of thread {tid}")]
    Fault { tid: u32, addr: u64, len: usize },
    /// The process could not be reached (gone, or not ours to write: `EPERM`, `ESRCH`).
    #[error("cannot reach the memory of thread {tid}")]
    Access {
        tid: u32,
        #[source]
        source: io::Error,
    },
}

fn transfer(tid: u32, addr: u64, buf: *mut libc::c_void, len: usize, write: bool) -> io::Result<usize> {
    let local = libc::iovec { iov_base: buf, iov_len: len };
    let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: len };
    // SAFETY: `local` describes `len` bytes of a live buffer of ours (read from for a write,
    // written to for a read, as the caller passes it); the remote range is only ever touched by
    // the kernel, which checks it against the other process's mappings.
    let n = unsafe {
        if write {
            libc::process_vm_writev(tid as libc::pid_t, &local, 1, &remote, 1, 0)
        } else {
            libc::process_vm_readv(tid as libc::pid_t, &local, 1, &remote, 1, 0)
        }
    };
    if n < 0 {
        Err(crate::last_error())
    } else {
        Ok(n as usize)
    }
}

/// Replace `bytes.len()` bytes at `addr` in thread `tid`'s address space with `bytes`, all or
/// nothing: the range is read first (unmapped or unreadable: [`VmError::Fault`], nothing
/// written), then written; a write that stops part way (a page that is not writable) puts back
/// what it overwrote and is a [`VmError::Fault`].
pub fn replace(tid: u32, addr: u64, bytes: &[u8]) -> Result<(), VmError> {
    let len = bytes.len();
    let fault = || VmError::Fault { tid, addr, len };
    let access = |source| VmError::Access { tid, source };
    if addr.checked_add(len as u64).is_none() {
        return Err(fault());
    }
    let mut before = vec![0u8; len];
    match transfer(tid, addr, before.as_mut_ptr().cast(), len, false) {
        Ok(n) if n == len => {}
        Ok(_) => return Err(fault()),
        Err(e) if e.raw_os_error() == Some(libc::EFAULT) => return Err(fault()),
        Err(e) => return Err(access(e)),
    }
    let written = match transfer(tid, addr, bytes.as_ptr().cast_mut().cast(), len, true) {
        Ok(n) if n == len => return Ok(()),
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::EFAULT) => 0,
        Err(e) => return Err(access(e)),
    };
    if written > 0 {
        // Put back what the partial write changed (that part is writable: it was just written).
        let _ = transfer(tid, addr, before.as_mut_ptr().cast(), written, true);
    }
    Err(fault())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tid() -> u32 {
        // SAFETY: gettid has no preconditions.
        (unsafe { libc::gettid() }) as u32
    }

    #[test]
    fn writes_all_or_nothing() {
        let mut buf = [0u8; 16];
        replace(tid(), buf.as_mut_ptr() as u64, &[7u8; 16]).expect("own memory");
        assert_eq!(std::hint::black_box(buf), [7u8; 16]);
        assert!(matches!(replace(tid(), 8, &[1u8; 16]), Err(VmError::Fault { .. })), "unmapped");
        assert!(matches!(replace(tid(), u64::MAX - 4, &[1u8; 16]), Err(VmError::Fault { .. })));
    }

    #[test]
    fn a_read_only_page_faults_and_is_left_as_it_was() {
        let page = crate::page_size() as usize;
        // SAFETY: a fresh anonymous mapping of two pages, ours alone until unmapped below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED);
        let base = map as *mut u8;
        // SAFETY: both pages are mapped writable; the second is then made read-only.
        unsafe {
            std::ptr::write_bytes(base, 0xaa, 2 * page);
            assert_eq!(libc::mprotect(base.add(page).cast(), page, libc::PROT_READ), 0);
        }
        let addr = base as u64 + page as u64 - 8;
        assert!(matches!(replace(tid(), addr, &[1u8; 16]), Err(VmError::Fault { .. })));
        // SAFETY: the range read is within the mapping, which is readable.
        let after = unsafe { std::slice::from_raw_parts(base.add(page - 8), 16) }.to_vec();
        // SAFETY: unmapping what was mapped above.
        unsafe { libc::munmap(map, 2 * page) };
        assert_eq!(after, vec![0xaa; 16], "the writable part was put back");
    }
}
