//! Handles on processes and threads that stay true across pid reuse.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// A pidfd (`pidfd_open(2)`).
#[derive(Debug)]
pub struct Pidfd {
    fd: OwnedFd,
}

fn pidfd_open(pid: u32, flags: libc::c_uint) -> io::Result<Pidfd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, flags) };
    if fd < 0 {
        return Err(crate::last_error());
    }
    // SAFETY: the kernel just returned this fd; nothing else owns it.
    Ok(Pidfd { fd: unsafe { OwnedFd::from_raw_fd(fd as RawFd) } })
}

impl Pidfd {
    /// A process (thread-group leader). Readable (`POLLIN`) once it has exited.
    pub fn open(pid: u32) -> io::Result<Pidfd> {
        pidfd_open(pid, 0)
    }

    /// One thread (`PIDFD_THREAD`, Linux 6.9+; EINVAL before).
    pub fn open_thread(tid: u32) -> io::Result<Pidfd> {
        pidfd_open(tid, libc::PIDFD_THREAD)
    }

    /// Another handle on the same process.
    pub fn try_clone(&self) -> io::Result<Pidfd> {
        Ok(Pidfd { fd: self.fd.try_clone()? })
    }

    /// The process or thread has not exited.
    pub fn is_alive(&self) -> bool {
        // SAFETY: signal 0 only checks existence and permission; a null siginfo is allowed.
        let rc = unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, self.fd.as_raw_fd(), 0, std::ptr::null::<libc::siginfo_t>(), 0)
        };
        rc == 0 || crate::last_error().raw_os_error() != Some(libc::ESRCH)
    }

    /// The process has exited (a zombie counts: a pidfd polls readable once it exits, while
    /// [`Pidfd::is_alive`] still succeeds on a zombie).
    pub fn has_exited(&self) -> bool {
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, zero timeout.
        let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
        rc > 0 && pfd.revents & (libc::POLLIN | libc::POLLHUP) != 0
    }

    /// A copy of the process's open file `fd` (`pidfd_getfd(2)`: the same open file, not a new
    /// open of it, so it works for pipes and sockets whatever their owner). Needs ptrace access to
    /// the process (EPERM without).
    pub fn get_fd(&self, fd: RawFd) -> io::Result<OwnedFd> {
        // SAFETY: pidfd_getfd takes a pidfd, a target fd number and flags 0 and returns a new fd.
        let rc = unsafe { libc::syscall(libc::SYS_pidfd_getfd, self.fd.as_raw_fd(), fd, 0) };
        if rc < 0 {
            return Err(crate::last_error());
        }
        // SAFETY: the kernel just installed this fd in our table; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(rc as RawFd) })
    }

    /// Send a signal.
    pub fn signal(&self, sig: i32) -> io::Result<()> {
        // SAFETY: as above, with a real signal number; a null siginfo is allowed.
        let rc = unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, self.fd.as_raw_fd(), sig, std::ptr::null::<libc::siginfo_t>(), 0)
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(crate::last_error())
        }
    }
}

impl AsFd for Pidfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
