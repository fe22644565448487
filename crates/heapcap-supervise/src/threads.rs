//! Which process a thread belongs to, remembered safely and checked without a syscall per entry.
//!
//! A notification names the calling *thread*. Its process is read once from `/proc/<tid>/status`
//! and remembered together with a thread pidfd (`PIDFD_THREAD`, Linux 6.9+). A tid can only be
//! given to another thread (of this process or another: pid_max can be small) after the thread
//! that held it has been released, and the kernel wakes that thread's pidfd waiters when it
//! releases it, *before* the number is freed (`__unhash_process`; before 6.15 `__change_pid`):
//! a thread pidfd polls readable (`POLLIN`, then `POLLHUP`) once its thread has exited or is gone.
//!
//! So every remembered pidfd sits in one epoll set, and before any lookup one non-blocking
//! `epoll_wait` collects the threads that have exited since the last one and forgets them. A
//! notification from a recycled tid can only arrive after the old thread's release, hence after
//! its readiness was queued: the lookup that serves it has already forgotten the old entry and
//! reads `/proc/<tid>/status` afresh. One cheap syscall per decision whatever the number of
//! threads, instead of one `pidfd_send_signal` per lookup (a permission check, audit and LSM
//! hooks: about 3x the cost on this project's VM).

use std::collections::HashMap;
use std::os::fd::AsRawFd;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use crate::procview::Task;
use crate::recent::Recent;

#[derive(Debug)]
struct Entry<T> {
    /// The process whose account the thread's calls go to.
    pid: u32,
    /// The thread is in another process that shares `pid`'s address space (`clone(CLONE_VM)`
    /// without `CLONE_THREAD`, a vfork child before its exec).
    shared: bool,
    handle: T,
}

/// How many of the threads forgotten last are remembered as having exited.
const EXITED: usize = 8;

#[derive(Debug)]
pub(crate) struct Threads<T> {
    entries: HashMap<u32, Entry<T>>,
    /// The threads forgotten last because they exited.
    exited_last: Recent<EXITED>,
    /// Every entry's pidfd, registered with `tid | fd << 32` as its data. `None` if no epoll
    /// could be made: then nothing is remembered and every lookup resolves afresh.
    exited: Option<Epoll>,
}

impl<T: Task> Default for Threads<T> {
    fn default() -> Self {
        let exited = match Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC) {
            Ok(ep) => Some(ep),
            Err(e) => {
                tracing::warn!(error = %e, "no epoll for thread exits; every notification will read /proc");
                None
            }
        };
        Threads { entries: HashMap::new(), exited_last: Recent::default(), exited }
    }
}

/// `None` for a handle that cannot be watched.
fn tag<T: Task>(tid: u32, handle: &T) -> Option<u64> {
    handle.fd().map(|fd| u64::from(tid) | (fd.as_raw_fd() as u64) << 32)
}

impl<T: Task> Threads<T> {
    /// Forget every remembered thread that has exited. If the kernel cannot be asked, forget
    /// everything (safe: the callers resolve again).
    fn forget_exited(&mut self) {
        let Some(ep) = &self.exited else { return };
        if self.entries.is_empty() {
            return;
        }
        let mut events = [EpollEvent::empty(); 32];
        loop {
            let n = match ep.wait(&mut events, EpollTimeout::ZERO) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot poll thread exits; forgetting every thread");
                    self.entries.clear();
                    return;
                }
            };
            for ev in &events[..n] {
                let tid = ev.data() as u32;
                if self.entries.get(&tid).is_some_and(|e| tag(tid, &e.handle) == Some(ev.data())) {
                    // Closing the pidfd (its only reference) takes it out of the epoll set too.
                    self.entries.remove(&tid);
                    self.exited_last.push(tid);
                }
            }
            if n < events.len() {
                return;
            }
        }
    }

    /// The account of a thread we know and that is still the same thread, and whether the
    /// thread is another process's sharing that account's address space.
    pub(crate) fn lookup(&mut self, tid: u32) -> Option<(u32, bool)> {
        self.forget_exited();
        self.entries.get(&tid).map(|e| (e.pid, e.shared))
    }

    /// Thread `tid` was remembered and has exited since (among the last few to): a caller that
    /// handed over to the next by ending, as a child does to the parent waiting for it.
    pub(crate) fn just_exited(&mut self, tid: u32) -> bool {
        self.forget_exited();
        !self.entries.contains_key(&tid) && self.exited_last.contains(tid)
    }

    /// Forget a thread (it execs away from the address space it shared).
    pub(crate) fn forget(&mut self, tid: u32) {
        self.entries.remove(&tid);
    }

    /// Forget every thread of other processes that shared `pid`'s address space: `pid` has a
    /// new one (an exec), so they are learnt again.
    pub(crate) fn forget_sharers(&mut self, pid: u32) {
        self.entries.retain(|_, e| !(e.shared && e.pid == pid));
    }

    /// Remember a thread (only after the notification check proved `handle` is the caller).
    /// Kernels without thread pidfds (before 6.9), and handles that cannot be watched, get no
    /// entry: the caller resolves each time.
    pub(crate) fn insert(&mut self, tid: u32, pid: u32, shared: bool, handle: Option<T>) {
        let (Some(handle), Some(ep)) = (handle, &self.exited) else { return };
        let (Some(data), Some(fd)) = (tag(tid, &handle), handle.fd()) else { return };
        // Registered before it is remembered; a thread that has already exited is reported by
        // the next wait (epoll polls the fd when it is added).
        let event = EpollEvent::new(EpollFlags::EPOLLIN, data);
        if let Err(e) = ep.add(fd, event) {
            tracing::debug!(tid, error = %e, "cannot watch a thread; not remembering it");
            return;
        }
        // A replaced entry's pidfd is closed here, which also unregisters it.
        self.entries.insert(tid, Entry { pid, shared, handle });
    }

    /// The thread is known and has not exited (rare: an exec in flight).
    pub(crate) fn alive(&mut self, tid: u32) -> bool {
        self.forget_exited();
        self.entries.get(&tid).is_some_and(|e| !e.handle.exited())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::procview::LinuxTask;
    use heapcap_linux::pidfd::Pidfd;
    use std::sync::mpsc;

    fn gettid() -> u32 {
        nix::unistd::gettid().as_raw() as u32
    }

    /// A thread that runs until told to end; its tid.
    fn spawn_thread() -> (u32, mpsc::Sender<()>, std::thread::JoinHandle<()>) {
        let (tid_tx, tid_rx) = mpsc::channel();
        let (end_tx, end_rx) = mpsc::channel::<()>();
        let h = std::thread::spawn(move || {
            tid_tx.send(gettid()).unwrap();
            let _ = end_rx.recv();
        });
        (tid_rx.recv().unwrap(), end_tx, h)
    }

    /// Wait (at most 10 s) until `done`: a thread's release comes shortly after its join (join
    /// returns once the thread cleared its tid, which can be before the kernel released it).
    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// A thread of ours remembered as in process 4242, and this thread as in 4243.
    fn two_remembered() -> (Threads<LinuxTask>, u32, mpsc::Sender<()>, std::thread::JoinHandle<()>, u32) {
        Pidfd::open_thread(gettid()).expect("thread pidfds (Linux 6.9+)");
        let mut threads = Threads::<LinuxTask>::default();
        let (tid, end, h) = spawn_thread();
        threads.insert(tid, 4242, false, Some(Pidfd::open_thread(tid).unwrap().into()));
        let me = gettid();
        threads.insert(me, 4243, false, Some(Pidfd::open_thread(me).unwrap().into()));
        (threads, tid, end, h, me)
    }

    #[test]
    fn a_thread_that_exits_is_forgotten_before_its_tid_can_be_looked_up_again() {
        let (mut threads, tid, end, h, me) = two_remembered();
        assert_eq!(threads.lookup(tid), Some((4242, false)));
        assert!(threads.alive(tid));
        end.send(()).unwrap();
        h.join().unwrap();
        // A recycled tid could only come after the release waited for.
        wait_until("exited thread still remembered", || threads.lookup(tid).is_none());
        assert!(!threads.alive(tid));
        assert_eq!(threads.lookup(me), Some((4243, false)), "live threads are kept");
        assert_eq!(threads.len(), 1);
    }

    #[test]
    fn a_thread_that_exited_is_told_from_one_never_seen_and_one_alive() {
        let (mut threads, tid, end, h, me) = two_remembered();
        assert!(!threads.just_exited(tid), "alive");
        end.send(()).unwrap();
        h.join().unwrap();
        wait_until("exit not seen", || threads.just_exited(tid));
        assert!(!threads.just_exited(me), "alive");
        assert!(!threads.just_exited(999_999), "never seen");
        // Seen again (a new thread given the same id): no longer an exited one.
        threads.insert(tid, 4244, false, Some(Pidfd::open_thread(me).unwrap().into()));
        assert!(!threads.just_exited(tid));
    }

    #[test]
    fn many_exits_at_once_are_all_forgotten() {
        Pidfd::open_thread(gettid()).expect("thread pidfds (Linux 6.9+)");
        let mut threads = Threads::<LinuxTask>::default();
        let spawned: Vec<_> = (0..100).map(|_| spawn_thread()).collect();
        for (tid, _, _) in &spawned {
            threads.insert(*tid, 1, false, Some(Pidfd::open_thread(*tid).unwrap().into()));
        }
        let tids: Vec<u32> = spawned.iter().map(|s| s.0).collect();
        for (_, end, h) in spawned {
            end.send(()).unwrap();
            h.join().unwrap();
        }
        wait_until("exited threads still remembered", || tids.iter().all(|t| threads.lookup(*t).is_none()));
        assert_eq!(threads.len(), 0);
    }

    #[test]
    fn an_already_exited_thread_is_never_remembered_for_long() {
        Pidfd::open_thread(gettid()).expect("thread pidfds (Linux 6.9+)");
        let mut threads = Threads::<LinuxTask>::default();
        let (tid, end, h) = spawn_thread();
        let handle = Pidfd::open_thread(tid).unwrap();
        end.send(()).unwrap();
        h.join().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        threads.insert(tid, 7, false, Some(handle.into()));
        assert_eq!(threads.lookup(tid), None);
    }
}
