//! How the kernel wakes the caller and the supervisor: chosen from what each listener sees.
//!
//! With `SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP` the kernel wakes the supervisor on the caller's CPU
//! and, when it answers, the caller on the supervisor's. For one thread calling in a tight loop
//! that is a hand-off on one CPU (measured on this project's 2-CPU VM: about 2.6 µs per call
//! instead of 9-40 µs when the wake-up crosses to an idle CPU). For several callers it is a
//! trap: an answer wakes its caller on whatever CPU the supervisor is on, often the CPU of
//! another caller that is runnable there, and two threads that had a CPU each end up taking
//! turns on one (the scheduler's balancer does not pull apart tasks that ran within the last
//! 0.5 ms, and each call puts them back together). Measured with a minimal listener, two threads
//! each looping over mmap 64 KiB, touch, 190 µs of work, munmap: 1.17 s bare, 2.0 s with the
//! sync wake-up, 1.37 s without it, 1.12 s switching by what the listener sees.
//!
//! So the listener keeps the sync wake-up while its calls come from one thread at a time, and
//! drops it while they come from several threads interleaved. What tells them apart is whether
//! callers *come back*: a switch counts when both the caller switched to and the one switched
//! away from made calls before, in one of the last few runs of calls. Two threads or processes
//! calling at once come back all the time (A B A B); a chain of processes started one after the
//! other does not, even when each makes only a few calls between its parent's (a shell or
//! `posix_spawn` loop: P C1 P C2 P C3, where each child is new and never seen again). Of the
//! last 32 calls, 8 or more counted switches turn the sync wake-up off, 2 or fewer turn it back
//! on.

/// Of the last [`WINDOW`] calls, this many caller switches turn the sync wake-up off ...
const OFF_AT: u32 = 8;
/// ... and this many or fewer turn it back on.
const ON_AT: u32 = 2;
const WINDOW: u32 = 32;
/// How many earlier runs of calls (a run: consecutive calls from one thread) a caller is
/// remembered for.
const RUNS: usize = 8;

/// The wake-up mode a listener's traffic calls for.
#[derive(Debug, Clone)]
pub struct WakeUp {
    /// Bit i: call i back switched from a thread that came back to one that came back.
    switches: u32,
    last: Option<u32>,
    /// The threads of the runs before the current one, the latest first (0: none).
    runs: [u32; RUNS],
    sync: bool,
}

impl Default for WakeUp {
    fn default() -> Self {
        WakeUp { switches: 0, last: None, runs: [0; RUNS], sync: true }
    }
}

impl WakeUp {
    /// Note a call from thread `tid`; returns the mode to switch to, if it changes.
    pub fn observe(&mut self, tid: u32) -> Option<bool> {
        let switched = match self.last {
            Some(from) if from != tid => {
                let back = self.runs.contains(&tid) && self.runs.contains(&from);
                self.runs.copy_within(..RUNS - 1, 1);
                self.runs[0] = from;
                back
            }
            _ => false,
        };
        self.last = Some(tid);
        self.switches = self.switches << 1 | u32::from(switched);
        let n = (self.switches & (u32::MAX >> (32 - WINDOW))).count_ones();
        let want = if self.sync { n < OFF_AT } else { n <= ON_AT };
        (want != self.sync).then(|| {
            self.sync = want;
            want
        })
    }

    /// The mode now.
    pub fn sync(&self) -> bool {
        self.sync
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(tids: impl IntoIterator<Item = u32>) -> (WakeUp, usize) {
        let mut w = WakeUp::default();
        let changes = tids.into_iter().filter_map(|t| w.observe(t)).count();
        (w, changes)
    }

    #[test]
    fn one_thread_keeps_the_sync_wake_up() {
        let (w, changes) = run(std::iter::repeat_n(7, 1000));
        assert!(w.sync());
        assert_eq!(changes, 0);
    }

    #[test]
    fn interleaved_callers_turn_it_off_and_a_single_one_back_on() {
        let (mut w, changes) = run((0..100).map(|i| i % 2));
        assert!(!w.sync(), "two threads taking turns");
        assert_eq!(changes, 1, "switched once, not back and forth");
        let back = (0..WINDOW).filter_map(|_| w.observe(5)).collect::<Vec<_>>();
        assert_eq!(back, vec![true], "one caller for a while: back on");
    }

    #[test]
    fn a_chain_of_short_processes_keeps_it() {
        // A shell loop: each process makes about ten calls, one after the other.
        let (w, changes) = run((0..2000).map(|i| i / 10));
        assert!(w.sync());
        assert_eq!(changes, 0);
        // A posix_spawn loop of /bin/true: the parent's one call (the child's stack), then the
        // child's four (its exec, the loader's mappings); every child is new.
        let (w, changes) = run((0..2000).map(|i| if i % 5 == 0 { 1 } else { 100 + i / 5 }));
        assert!(w.sync());
        assert_eq!(changes, 0);
        // make -j2: two chains at once, interleaving every call or two.
        let (w, _) = run((0..2000).map(|i| if i % 3 == 0 { 1000 + i / 30 } else { i / 30 }));
        assert!(!w.sync());
    }

    #[test]
    fn three_threads_in_turn_turn_it_off() {
        let (w, _) = run((0..300).map(|i| i % 3));
        assert!(!w.sync());
        // ... and long turns (runs of 12 calls) leave it on.
        let (w, _) = run((0..3000).map(|i| (i / 12) % 2));
        assert!(w.sync());
    }
}
