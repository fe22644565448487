//! Starting a command under the heap-notify filter.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use crate::fdpass;
use crate::filter::{LoadFlags, Program};

/// Make `cmd`'s child load `program` just before `execve` and send the listener fd over `sock`
/// (the message carries the bytes `heapcap`). The child keeps no copy of the listener.
///
/// The `execve` itself is notified, so a supervisor must be receiving on the other end of
/// `sock` before `cmd.spawn()` is called, or the spawn waits forever.
pub fn under_filter(cmd: &mut Command, program: Program, sock: OwnedFd, flags: LoadFlags) {
    let hook = move || -> std::io::Result<()> {
        // SAFETY: an all-empty signal set is valid; sigprocmask only reads it. The parent may
        // block signals for its signalfd; the command must start with none blocked.
        unsafe {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        }
        let listener = program.load_with_listener(flags)?;
        // SAFETY: `listener` was just returned by seccomp() and is open until closed below.
        let borrowed = unsafe { BorrowedFd::borrow_raw(listener) };
        let sent = fdpass::send_fd(sock.as_fd(), borrowed, b"heapcap");
        // SAFETY: we own `listener` and nothing uses it after this point.
        unsafe { libc::close(listener) };
        // SAFETY: `sock`'s fd is closed here, in the child only; the parent's copy stays open.
        unsafe { libc::close(sock.as_raw_fd()) };
        sent
    };
    // SAFETY: the hook runs between fork and exec. It only makes raw system calls (sigprocmask,
    // prctl, seccomp, sendmsg, close) and allocates nothing, so it is async-signal-safe even
    // though the parent has other threads.
    unsafe { cmd.pre_exec(hook) };
}
