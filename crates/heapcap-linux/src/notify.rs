//! The seccomp listener fd (`SECCOMP_FILTER_FLAG_NEW_LISTENER`): receive notifications,
//! answer them, and check that one is still valid before trusting anything read about it.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// A notification: thread `pid` (in the receiver's pid namespace) is blocked in syscall `nr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notification {
    pub id: u64,
    /// The calling thread's id.
    pub pid: u32,
    pub arch: u32,
    pub nr: i32,
    pub args: [u64; 6],
}

/// What a receive gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recv {
    Notification(Notification),
    /// The caller was interrupted (e.g. by a signal) before we got it; it will retry. Normal.
    Interrupted,
    /// Every process under the filter is gone.
    HungUp,
}

/// How an answer went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answered {
    Yes,
    /// The caller went away first (signal, exit): nothing to answer.
    Gone,
}

/// Errors a caller can send back instead of running the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Errno {
    NoMem,
    /// A bad address, as the kernel answers a call whose buffer is not writable memory.
    Fault,
}

impl Errno {
    fn raw(self) -> i32 {
        match self {
            Errno::NoMem => libc::ENOMEM,
            Errno::Fault => libc::EFAULT,
        }
    }
}

/// A seccomp listener fd.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
}

fn ioctl<T>(fd: BorrowedFd<'_>, request: libc::Ioctl, arg: *mut T) -> io::Result<()> {
    // SAFETY: callers pass a seccomp ioctl request together with a pointer to the exact type
    // that request reads or writes, valid for the duration of the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), request, arg) } == 0 {
        Ok(())
    } else {
        Err(crate::last_error())
    }
}

impl Listener {
    /// Take ownership of a listener fd. Use [`Listener::verify`] when the fd came from outside.
    pub fn new(fd: OwnedFd) -> Listener {
        Listener { fd }
    }

    /// Check that the fd really is a seccomp listener: only a listener answers
    /// `SECCOMP_IOCTL_NOTIF_ID_VALID` with ENOENT for an unknown id; anything else says ENOTTY/EINVAL.
    pub fn verify(fd: OwnedFd) -> Result<Listener, OwnedFd> {
        let mut id: u64 = u64::MAX;
        match ioctl(fd.as_fd(), libc::SECCOMP_IOCTL_NOTIF_ID_VALID, &mut id) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(Listener { fd }),
            _ => Err(fd),
        }
    }

    /// Ask the kernel to wake the caller and the supervisor on each other's CPU (`on`), or to
    /// place them as it places any wake-up (`SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP`, Linux 6.6+;
    /// it can be switched at any time). Returns false on older kernels.
    pub fn set_sync_wakeup(&self, on: bool) -> io::Result<bool> {
        const SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP: libc::c_ulong = 1;
        let flags = if on { SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP } else { 0 };
        // SAFETY: SET_FLAGS takes the flag value itself as its argument, not a pointer.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_SET_FLAGS, flags) };
        match rc {
            0 => Ok(true),
            _ => match crate::last_error() {
                e if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTTY)) => Ok(false),
                e => Err(e),
            },
        }
    }

    /// Block until a notification arrives (or the filter's last user is gone).
    pub fn recv(&self) -> io::Result<Recv> {
        // SAFETY: seccomp_notif is plain data; all-zero is a valid value (and the kernel
        // requires the buffer to be zeroed).
        let mut n: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        match ioctl(self.fd.as_fd(), libc::SECCOMP_IOCTL_NOTIF_RECV, &mut n) {
            Ok(()) => Ok(Recv::Notification(Notification {
                id: n.id,
                pid: n.pid,
                arch: n.data.arch,
                nr: n.data.nr,
                args: n.data.args,
            })),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(Recv::Interrupted),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                Ok(if self.is_hung_up() { Recv::HungUp } else { Recv::Interrupted })
            }
            Err(e) => Err(e),
        }
    }

    fn send(&self, id: u64, error: i32, flags: u32) -> io::Result<Answered> {
        self.send_value(id, 0, error, flags)
    }

    fn send_value(&self, id: u64, val: i64, error: i32, flags: u32) -> io::Result<Answered> {
        let mut resp = libc::seccomp_notif_resp { id, val, error, flags };
        match ioctl(self.fd.as_fd(), libc::SECCOMP_IOCTL_NOTIF_SEND, &mut resp) {
            Ok(()) => Ok(Answered::Yes),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(Answered::Gone),
            Err(e) => Err(e),
        }
    }

    /// Let the kernel carry the call out.
    pub fn allow(&self, id: u64) -> io::Result<Answered> {
        self.send(id, 0, libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32)
    }

    /// Skip the call and make it return `value` (how a refused `brk` answers: with the
    /// unchanged program break, never an errno).
    pub fn return_value(&self, id: u64, value: i64) -> io::Result<Answered> {
        self.send_value(id, value, 0, 0)
    }

    /// Fail the call with `errno` (the kernel wants it negative; this does that).
    pub fn fail(&self, id: u64, errno: Errno) -> io::Result<Answered> {
        self.send(id, -errno.raw(), 0)
    }

    /// The notification is still pending: its thread has not left the syscall, so anything
    /// opened or read about that pid since it arrived really is about the caller.
    pub fn id_valid(&self, id: u64) -> bool {
        let mut id = id;
        ioctl(self.fd.as_fd(), libc::SECCOMP_IOCTL_NOTIF_ID_VALID, &mut id).is_ok()
    }

    /// No process uses the filter any more.
    pub fn is_hung_up(&self) -> bool {
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, zero timeout.
        let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
        rc > 0 && pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
