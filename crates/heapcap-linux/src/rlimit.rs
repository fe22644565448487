//! The limit on open files (`RLIMIT_NOFILE`): a supervisor holds a few fds per supervised process
//! and thread, so it takes its hard limit, and keeps optional files only while fds are plentiful.

use std::io;

fn nofile() -> io::Result<libc::rlimit> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into the struct passed, which lives across the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim)
}

/// The soft limit now: the lowest fd number an open cannot get.
pub fn fd_limit() -> io::Result<u64> {
    nofile().map(|l| l.rlim_cur)
}

/// Raise the soft limit to the hard one (a process started since keeps the limit it inherited);
/// the soft limit then.
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut lim = nofile()?;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads one rlimit from the struct passed, which lives across the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// Whether `fd`, just opened, leaves at least half the limit free: an optional file (one kept
/// only to save later opens) is kept only then, so it never takes the fds the reads need.
pub fn plentiful(fd: i32) -> bool {
    fd_limit().is_ok_and(|limit| (fd as u64) < limit / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_rises_to_the_hard_one() {
        let hard = nofile().unwrap().rlim_max;
        assert_eq!(raise_fd_limit().unwrap(), hard);
        assert_eq!(fd_limit().unwrap(), hard);
        assert!(plentiful(3));
        assert!(!plentiful(i32::try_from(hard).unwrap_or(i32::MAX)));
    }
}
