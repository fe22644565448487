//! Which process a thread belongs to, remembered safely and checked without a syscall per entry.
//!
//! A notification names the calling *thread*. Its process is read once from `/proc/<tid>/status`
//! and remembered together with a thread pidfd (`PIDFD_THREAD`, Linux 6.9+). A tid can only be
//! given to another thread (of this process or another: pid_max can be small) after the thread
//! that held it has been released, and the kernel wakes that thread's pidfd waiters when it
//! releases it, *before* the number is freed (`__unhash_process`; before 6.15 `__change_pid`):
//! a thread pidfd polls readable (`POLLIN`, then `POLLHUP`) once its thread has exited or is gone.
//!
//! So every remembered pidfd is watched, and before any lookup the threads that have exited
//! since the last one are collected and forgotten. A notification from a recycled tid can only
//! arrive after the old thread's release, hence after its wake-up: the lookup that serves it has
//! already forgotten the old entry and reads `/proc/<tid>/status` afresh.
//!
//! Two watches do it. A new thread's pidfd goes into one epoll set, and while any thread is
//! there each lookup makes one non-blocking `epoll_wait` (about 0.5 µs on this project's VM: a
//! third of what a fast-path decision cost with it). A thread still remembered after [`YOUNG`]
//! decisions moves to a ring of one-shot `io_uring` polls ([`PollRing`]): a wake-up's completion
//! is written into the ring before the listener thread returns from its next system call, and
//! the receive that brought the notification is one, so checking the ring is a few loads from
//! memory. The ring is not for everyone because each exit it sees wakes the listener once,
//! which costs a short process more than its few `epoll_wait`s. Where `io_uring` is refused (a
//! container's seccomp profile, `kernel.io_uring_disabled`, before Linux 5.19), the epoll set
//! keeps every thread.

use std::collections::{HashMap, VecDeque};

use heapcap_linux::pollring::PollRing;
use heapcap_policy::ledger::ThreadState;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use rustc_hash::FxBuildHasher;

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
    /// What its watch reports: the tid, and a count of watches in the high half (a watch of a
    /// forgotten entry can fire later, and must not take a newer entry of the same tid along).
    tag: u64,
    /// Watched by the epoll set (else by the ring).
    young: bool,
}

/// How many of the threads forgotten last are remembered as having exited.
const EXITED: usize = 8;

/// Decisions a thread stays in the epoll set before the ring watches it instead. While any
/// thread is there, each decision costs an `epoll_wait`; a ring-watched thread costs one
/// wake-up of the listener when it exits. Short processes (a shell loop's: a handful of calls
/// each) end young; a thread that keeps calling is moved after this many decisions.
const YOUNG: u64 = 32;

#[derive(Debug)]
pub(crate) struct Threads<T> {
    /// By tid (tids are the kernel's numbers, not chosen by callers: a fast hash will do).
    entries: HashMap<u32, Entry<T>, FxBuildHasher>,
    /// The threads forgotten last because they exited.
    exited_last: Recent<EXITED>,
    ring: Option<PollRing>,
    epoll: Option<Epoll>,
    /// Entries in the epoll set, oldest first, with the decision count when they were put
    /// there (some may be gone or replaced since: their tags tell). Kept only when there is a
    /// ring to move them to.
    young: VecDeque<(u64, u64)>,
    /// How many entries are in the epoll set.
    young_live: usize,
    /// Lookups so far: one per decision.
    decisions: u64,
    /// Watches made, for tags.
    watches: u32,
    /// The ring's reports, between reading and handling them.
    fired: Vec<u64>,
}

impl<T: Task> Default for Threads<T> {
    fn default() -> Self {
        let ring = PollRing::new()
            .inspect_err(|e| tracing::debug!(error = %e, "no io_uring for thread exits; one epoll_wait per decision"))
            .ok();
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .inspect_err(|e| tracing::warn!(error = %e, "no epoll for thread exits"))
            .ok();
        Threads::with(ring, epoll)
    }
}

impl<T: Task> Threads<T> {
    fn with(ring: Option<PollRing>, epoll: Option<Epoll>) -> Self {
        if ring.is_none() && epoll.is_none() {
            tracing::warn!("nothing can watch thread exits; every notification will read /proc");
        }
        Threads {
            entries: HashMap::default(),
            exited_last: Recent::default(),
            ring,
            epoll,
            young: VecDeque::new(),
            young_live: 0,
            decisions: 0,
            watches: 0,
            fired: Vec::new(),
        }
    }

    fn remove(&mut self, tid: u32) -> Option<Entry<T>> {
        let e = self.entries.remove(&tid)?;
        self.young_live -= usize::from(e.young);
        Some(e)
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.young.clear();
        self.young_live = 0;
    }

    /// Forget every remembered thread that has exited. If the kernel cannot be asked, forget
    /// everything (safe: the callers resolve again).
    fn forget_exited(&mut self) {
        let mut seen = Ok(());
        if let Some(ring) = &mut self.ring {
            let fired = &mut self.fired;
            seen = ring.ready(|tag| fired.push(tag)).map_err(|e| e.to_string());
            while let Some(tag) = self.fired.pop() {
                self.exited(tag);
            }
        }
        if seen.is_ok() && self.young_live > 0 {
            if let Some(ep) = self.epoll.take() {
                seen = self.epoll_exits(&ep);
                self.epoll = Some(ep);
            }
        }
        if let Err(e) = seen {
            tracing::warn!(error = %e, "cannot tell which threads exited; forgetting every thread");
            self.clear();
        }
    }

    /// Collect the exits the epoll set holds. Each forgotten entry closes its pidfd, which
    /// takes it out of the set: the next wait reports the next ones.
    fn epoll_exits(&mut self, ep: &Epoll) -> Result<(), String> {
        let mut events = [EpollEvent::empty(); 32];
        loop {
            match ep.wait(&mut events, EpollTimeout::ZERO) {
                Ok(n) => {
                    events[..n].iter().for_each(|ev| self.exited(ev.data()));
                    if n < events.len() {
                        return Ok(());
                    }
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// The watch tagged `tag` fired: its thread has exited.
    fn exited(&mut self, tag: u64) {
        let tid = tag as u32;
        if self.entries.get(&tid).is_some_and(|e| e.tag == tag) {
            // Its pidfd is closed with it (and so leaves the epoll set).
            self.remove(tid);
            self.exited_last.push(tid);
        }
    }

    /// Hand the threads that have been in the epoll set for [`YOUNG`] decisions to the ring.
    fn age(&mut self) {
        let (Some(ring), Some(ep)) = (&mut self.ring, &self.epoll) else { return };
        while let Some(&(tag, since)) = self.young.front() {
            if self.decisions - since < YOUNG {
                return;
            }
            self.young.pop_front();
            let Some(e) = self.entries.get_mut(&(tag as u32)).filter(|e| e.tag == tag && e.young) else { continue };
            let Some(fd) = e.handle.fd() else { continue };
            // The ring first: an exit in between is then reported by both (the second report
            // finds no entry), never by neither.
            // (Left in the set as well if it cannot be taken out: then it still counts there.)
            if ring.watch(fd, tag).is_ok() && ep.delete(fd).is_ok() {
                e.young = false;
                self.young_live -= 1;
            }
        }
    }

    /// The account of a thread we know and that is still the same thread, and whether the
    /// thread is another process's sharing that account's address space.
    pub(crate) fn lookup(&mut self, tid: u32) -> Option<(u32, bool)> {
        self.decisions += 1;
        self.forget_exited();
        self.age();
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
        self.remove(tid);
    }

    /// Forget every thread of other processes that shared `pid`'s address space: `pid` has a
    /// new one (an exec), so they are learnt again.
    pub(crate) fn forget_sharers(&mut self, pid: u32) {
        let gone: Vec<u32> = self.entries.iter().filter(|(_, e)| e.shared && e.pid == pid).map(|(t, _)| *t).collect();
        for tid in gone {
            self.remove(tid);
        }
    }

    /// Remember a thread (only after the notification check proved `handle` is the caller).
    /// Kernels without thread pidfds (before 6.9), and handles that cannot be watched, get no
    /// entry: the caller resolves each time.
    pub(crate) fn insert(&mut self, tid: u32, pid: u32, shared: bool, handle: Option<T>) {
        let Some(handle) = handle else { return };
        let Some(fd) = handle.fd() else { return };
        self.watches = self.watches.wrapping_add(1);
        let tag = u64::from(tid) | u64::from(self.watches) << 32;
        // Watched before it is remembered; a thread that has already exited is reported by the
        // next collection (both watches poll the fd when it is added). New threads go to the
        // epoll set, where an exit wakes no one.
        let (watched, young) = match (&self.epoll, &mut self.ring) {
            (Some(ep), _) => (ep.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, tag)).map_err(Into::into), true),
            (None, Some(ring)) => (ring.watch(fd, tag), false),
            (None, None) => return,
        };
        if let Err(e) = watched {
            tracing::debug!(tid, error = %e, "cannot watch a thread; not remembering it");
            return;
        }
        // A replaced entry's pidfd is closed here.
        self.remove(tid);
        if young {
            if self.ring.is_some() {
                self.young.push_back((tag, self.decisions));
            }
            self.young_live += 1;
        }
        self.entries.insert(tid, Entry { pid, shared, handle, tag, young });
    }

    /// What a remembered thread is doing, through the file its handle keeps (`None`: not
    /// remembered, or its handle keeps none). An entry whose thread has exited since the last
    /// collection reads `Gone`: the file stays its thread's, whoever gets the tid next.
    pub(crate) fn state(&self, tid: u32) -> Option<ThreadState> {
        self.entries.get(&tid)?.handle.state()
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
    fn two_remembered(
        watch: fn() -> Watches,
    ) -> (Threads<LinuxTask>, u32, mpsc::Sender<()>, std::thread::JoinHandle<()>, u32) {
        Pidfd::open_thread(gettid()).expect("thread pidfds (Linux 6.9+)");
        let mut threads = watched(watch);
        let (tid, end, h) = spawn_thread();
        threads.insert(tid, 4242, false, Some(Pidfd::open_thread(tid).unwrap().into()));
        let me = gettid();
        threads.insert(me, 4243, false, Some(Pidfd::open_thread(me).unwrap().into()));
        (threads, tid, end, h, me)
    }

    fn a_thread_that_exits_is_forgotten_before_its_tid_can_be_looked_up_again(watch: fn() -> Watches) {
        let (mut threads, tid, end, h, me) = two_remembered(watch);
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

    fn a_thread_that_exited_is_told_from_one_never_seen_and_one_alive(watch: fn() -> Watches) {
        let (mut threads, tid, end, h, me) = two_remembered(watch);
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

    fn many_exits_at_once_are_all_forgotten(watch: fn() -> Watches) {
        Pidfd::open_thread(gettid()).expect("thread pidfds (Linux 6.9+)");
        let mut threads = watched(watch);
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

    fn an_already_exited_thread_is_never_remembered_for_long(watch: fn() -> Watches) {
        Pidfd::open_thread(gettid()).expect("thread pidfds (Linux 6.9+)");
        let mut threads = watched(watch);
        let (tid, end, h) = spawn_thread();
        let handle = Pidfd::open_thread(tid).unwrap();
        end.send(()).unwrap();
        h.join().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        threads.insert(tid, 7, false, Some(handle.into()));
        assert_eq!(threads.lookup(tid), None);
    }

    fn a_late_watch_of_a_replaced_entry_leaves_the_new_one(watch: fn() -> Watches) {
        Pidfd::open_thread(gettid()).expect("thread pidfds (Linux 6.9+)");
        let mut threads = watched(watch);
        let (other, end, h) = spawn_thread();
        let me = gettid();
        // An entry for `me` watching another thread (as a replaced entry's watch lingers: a tid
        // learnt again keeps the first watch until its thread exits) ...
        threads.insert(me, 1, false, Some(Pidfd::open_thread(other).unwrap().into()));
        // ... replaced by one watching the right thread.
        threads.insert(me, 2, false, Some(Pidfd::open_thread(me).unwrap().into()));
        end.send(()).unwrap();
        h.join().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(threads.lookup(me), Some((2, false)), "the first watch fired, for the replaced entry only");
    }

    type Watches = (Option<PollRing>, Option<Epoll>);

    fn ring() -> Option<PollRing> {
        Some(PollRing::new().expect("io_uring (Linux 5.19+, not disabled)"))
    }

    fn epoll() -> Option<Epoll> {
        Some(Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap())
    }

    /// Threads watched with both (young threads in the epoll set, older ones in the ring) ...
    fn both() -> Watches {
        (ring(), epoll())
    }

    /// ... with the ring alone (no epoll: unlikely, but the code allows it) ...
    fn ring_only() -> Watches {
        (ring(), None)
    }

    /// ... and with the epoll set alone (io_uring refused).
    fn epoll_only() -> Watches {
        (None, epoll())
    }

    fn watched(watch: fn() -> Watches) -> Threads<LinuxTask> {
        let (ring, epoll) = watch();
        Threads::with(ring, epoll)
    }

    /// Each check, with each watch.
    macro_rules! with_each_watch {
        ($($name:ident),* $(,)?) => {$(
            mod $name {
                #[test]
                fn both() {
                    super::$name(super::both)
                }

                #[test]
                fn ring_only() {
                    super::$name(super::ring_only)
                }

                #[test]
                fn epoll_only() {
                    super::$name(super::epoll_only)
                }
            }
        )*};
    }

    with_each_watch!(
        a_thread_that_keeps_calling_moves_to_the_ring_and_its_exit_is_still_seen,
        a_thread_that_exits_is_forgotten_before_its_tid_can_be_looked_up_again,
        a_thread_that_exited_is_told_from_one_never_seen_and_one_alive,
        many_exits_at_once_are_all_forgotten,
        an_already_exited_thread_is_never_remembered_for_long,
        a_late_watch_of_a_replaced_entry_leaves_the_new_one
    );

    #[test]
    fn a_remembered_threads_state_is_read_through_the_file_its_handle_keeps() {
        let mut threads = watched(both);
        let (tid, end, h) = spawn_thread();
        let proc = heapcap_linux::procfs::ProcFs::default();
        threads.insert(tid, 4242, false, Some(LinuxTask::thread(Pidfd::open_thread(tid).unwrap(), proc, tid)));
        let me = gettid();
        threads.insert(me, 4243, false, Some(Pidfd::open_thread(me).unwrap().into()));
        // Waiting for the channel: in futex(2), the same through the kept file as afresh.
        let in_futex = |s: Option<ThreadState>| matches!(s, Some(ThreadState::InCall(k)) if k.nr == libc::SYS_futex);
        wait_until("the thread never waited in futex(2)", || in_futex(threads.state(tid)));
        assert!(in_futex(Some(heapcap_linux::procfs::ProcFs::default().thread_state(tid))), "read afresh");
        assert_eq!(threads.state(me), None, "a handle that keeps no file: read afresh by the caller");
        assert_eq!(threads.state(999_999), None, "never remembered");
        end.send(()).unwrap();
        h.join().unwrap();
        // Still remembered until the next collection, and seen to be gone.
        wait_until("the thread's exit never showed", || threads.state(tid) == Some(ThreadState::Gone));
    }

    fn a_thread_that_keeps_calling_moves_to_the_ring_and_its_exit_is_still_seen(watch: fn() -> Watches) {
        let (mut threads, tid, end, h, me) = two_remembered(watch);
        let both = threads.ring.is_some() && threads.epoll.is_some();
        assert_eq!(threads.young_live, if threads.epoll.is_some() { 2 } else { 0 });
        for _ in 0..YOUNG {
            assert_eq!(threads.lookup(me), Some((4243, false)));
        }
        if both {
            assert_eq!(threads.young_live, 0, "both moved to the ring: no epoll_wait per decision");
        }
        // A new thread starts in the epoll set while the old ones stay in the ring.
        let (young, end_young, h_young) = spawn_thread();
        threads.insert(young, 4244, false, Some(Pidfd::open_thread(young).unwrap().into()));
        if both {
            assert_eq!(threads.young_live, 1);
        }
        end.send(()).unwrap();
        h.join().unwrap();
        end_young.send(()).unwrap();
        h_young.join().unwrap();
        wait_until("exits not seen", || threads.lookup(tid).is_none() && threads.lookup(young).is_none());
        assert!(threads.just_exited(tid) && threads.just_exited(young));
        assert_eq!(threads.lookup(me), Some((4243, false)));
        let epoll_only = threads.ring.is_none();
        assert_eq!(threads.young_live, usize::from(epoll_only), "only the epoll set holds the survivor");
        assert!(!epoll_only || threads.young.is_empty(), "nothing to move them to: no queue kept");
    }
}
