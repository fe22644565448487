//! Which watched fds have become readable, seen without a system call: one-shot `io_uring`
//! polls, whose completions the kernel writes into memory this thread shares with it.
//!
//! A poll's completion is produced as task work of the thread that submitted it, and "io_uring
//! will process all outstanding work at the end of any system call" (`io_uring_setup(2)`, the
//! default that `IORING_SETUP_DEFER_TASKRUN` would turn off; `IORING_SETUP_COOP_TASKRUN` only
//! drops the interrupt of a thread running in user space). So once this thread returns from any
//! system call, every fd whose wake-up came before that return has its completion in the ring,
//! and [`PollRing::ready`] sees it with a few loads from memory.
//!
//! The price is that a wake-up also ends an interruptible wait of this thread (such a wait
//! returns `EINTR`, and the work is done on the way out).

use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, BorrowedFd};

use io_uring::{opcode, types, IoUring};

/// Completion slots: a burst of this many readinesses between two looks stays in the ring.
/// Beyond that the kernel keeps them aside (`IORING_FEAT_NODROP`) until the next look.
const COMPLETIONS: u32 = 1024;

/// Rounds of moving completions kept aside into the ring before giving up on them: each
/// moves up to [`COMPLETIONS`], so a burst of readinesses this many times the ring's size is
/// still reported one by one.
const FLUSHES: usize = 64;

/// Completions the kernel dropped, or kept aside and would not hand over: which fds were
/// readable is not known.
#[derive(Debug, thiserror::Error)]
#[error("io_uring lost completions (dropped, or kept aside and not handed over)")]
pub struct Lost;

/// A ring of one-shot polls, for the thread that made it. Not `Send`: completions are posted
/// by the work of the thread that submitted the polls, so only that thread may look.
pub struct PollRing {
    ring: IoUring,
    /// Completions the kernel reported dropped, as last seen.
    dropped: u32,
    _this_thread: PhantomData<*const ()>,
}

impl std::fmt::Debug for PollRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PollRing").field("fd", &self.ring.as_raw_fd()).finish_non_exhaustive()
    }
}

impl PollRing {
    /// A ring whose polls report to the calling thread. Fails where `io_uring` is missing,
    /// disabled (`kernel.io_uring_disabled`) or refused (a container's seccomp profile), and
    /// before Linux 5.19 (`IORING_SETUP_COOP_TASKRUN`).
    pub fn new() -> io::Result<PollRing> {
        let mut ring = IoUring::builder().setup_coop_taskrun().setup_cqsize(COMPLETIONS).build(8)?;
        if !ring.params().is_feature_nodrop() {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "io_uring without IORING_FEAT_NODROP"));
        }
        let dropped = ring.completion().overflow();
        Ok(PollRing { ring, dropped, _this_thread: PhantomData })
    }

    /// Report `tag` once `fd` polls readable (at once if it already does). The ring holds its
    /// own reference to the file: closing `fd` neither cancels nor fires the poll.
    pub fn watch(&mut self, fd: BorrowedFd<'_>, tag: u64) -> io::Result<()> {
        let poll = opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), libc::POLLIN as u32).build().user_data(tag);
        // SAFETY: a poll refers to no memory of ours, only to the fd, of which the kernel takes
        // its own reference when the entry is submitted, just below.
        if unsafe { self.ring.submission().push(&poll) }.is_err() {
            // Full with entries a failed submit left behind: send them first.
            self.ring.submit()?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(&poll) }
                .map_err(|_| io::Error::new(io::ErrorKind::WouldBlock, "io_uring submission queue full"))?;
        }
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Call `f` with the tag of each watched fd that has become readable since the last call
    /// (a completion with an error counts as readable: its poll is over either way). `Lost`
    /// when some may be missing: the kernel dropped completions, or kept some aside (the ring
    /// was full) and would not hand them over.
    pub fn ready(&mut self, mut f: impl FnMut(u64)) -> Result<(), Lost> {
        for _ in 0..FLUSHES {
            let kept_aside = self.ring.submission().cq_overflow();
            if kept_aside {
                // Have the kernel move what it kept aside into the ring (as much as fits).
                match self.ring.submit_and_wait(0) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return Err(Lost),
                }
            }
            let mut cq = self.ring.completion();
            for cqe in &mut cq {
                f(cqe.user_data());
            }
            let dropped = cq.overflow();
            drop(cq);
            if dropped != self.dropped {
                self.dropped = dropped;
                return Err(Lost);
            }
            if !kept_aside {
                return Ok(());
            }
        }
        Err(Lost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pidfd::Pidfd;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    fn ready(ring: &mut PollRing) -> Vec<u64> {
        let mut tags = Vec::new();
        ring.ready(|t| tags.push(t)).unwrap();
        tags
    }

    /// A child that sleeps until killed.
    fn child() -> u32 {
        // SAFETY: the child only calls async-signal-safe functions before it ends.
        match unsafe { libc::fork() } {
            0 => loop {
                // SAFETY: pause has no preconditions.
                unsafe { libc::pause() };
            },
            pid if pid > 0 => pid as u32,
            _ => panic!("fork: {}", io::Error::last_os_error()),
        }
    }

    fn kill_and_reap(pid: u32) {
        // SAFETY: our own child, by pid, not yet reaped.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
            libc::waitpid(pid as i32, std::ptr::null_mut(), 0);
        }
    }

    #[test]
    fn an_exit_is_in_the_ring_once_the_exiting_process_is_reaped() {
        let mut ring = PollRing::new().expect("io_uring (Linux 5.19+, not disabled)");
        let (a, b) = (child(), child());
        let (pa, pb) = (Pidfd::open(a).unwrap(), Pidfd::open(b).unwrap());
        ring.watch(pa.as_fd(), 1).unwrap();
        ring.watch(pb.as_fd(), 2).unwrap();
        drop(pb); // the ring keeps its own reference
        assert_eq!(ready(&mut ring), Vec::<u64>::new(), "both alive");
        kill_and_reap(b);
        // The reap returned from a system call: the wake-up's work is done, no look needed.
        assert_eq!(ready(&mut ring), vec![2]);
        assert_eq!(ready(&mut ring), Vec::<u64>::new(), "each readiness once");
        kill_and_reap(a);
        assert_eq!(ready(&mut ring), vec![1]);
    }

    #[test]
    fn an_fd_already_readable_is_reported_at_once() {
        let mut ring = PollRing::new().expect("io_uring");
        let a = child();
        let pa = Pidfd::open(a).unwrap();
        kill_and_reap(a);
        ring.watch(pa.as_fd(), 7).unwrap();
        assert_eq!(ready(&mut ring), vec![7]);
    }

    #[test]
    fn a_burst_larger_than_the_ring_is_all_reported() {
        let mut ring = PollRing::new().expect("io_uring");
        let n = COMPLETIONS as usize + 100;
        let mut fds = [0; 2];
        // SAFETY: pipe fills the two fds, which are then owned here.
        let (r, w) = unsafe {
            assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
            (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
        };
        for tag in 0..n as u64 {
            ring.watch(r.as_fd(), tag).unwrap();
        }
        assert!(ready(&mut ring).is_empty());
        // SAFETY: one byte from a live buffer to our own pipe.
        assert_eq!(unsafe { libc::write(w.as_raw_fd(), b"x".as_ptr().cast(), 1) }, 1);
        let mut tags = ready(&mut ring);
        tags.sort_unstable();
        assert_eq!(tags, (0..n as u64).collect::<Vec<_>>());
    }
}
