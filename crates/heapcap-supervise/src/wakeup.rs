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
//! drops it while they come from several threads at once. What tells them apart is a switch to
//! a caller that *comes back* (it made calls in one of the last few runs of calls) from one that
//! is still there. Two threads or processes calling at once do that all the time (A B A B, or a
//! long compiler process between short ones: A X A Y). A chain of processes started one after
//! the other never does, even when each makes only a few calls between its parent's (a shell or
//! `posix_spawn` loop: P C1 P C2 P, where each child is new and hands back to its parent by
//! exiting). Of the last 32 calls, 8 or more such switches turn the sync wake-up off; it comes
//! back on when 2 or fewer of them switched callers at all (hand-overs by exiting aside) and no
//! caller came back for 512 calls, so a parallel build does not flip it back on each time one
//! of its processes starts while the other computes (make -j2 of 31 files, 8 rounds: 0.659 s
//! against 0.694 s when it could come back after 32 calls; never on: 0.699 s against 0.711 s in
//! another run; bare about 0.6 s).

use crate::recent::Recent;

/// Of the last [`WINDOW`] calls, this many caller switches turn the sync wake-up off ...
const OFF_AT: u32 = 8;
/// ... and this many or fewer turn it back on.
const ON_AT: u32 = 2;
const WINDOW: u32 = 32;
/// ... once this many calls have been made since the last switch to a returning caller: a
/// parallel program has quiet spells (one process starting while the other computes), and
/// each return to the sync wake-up draws its processes back onto one CPU for a while.
const CALM: u32 = 512;
/// How many earlier runs of calls (a run: consecutive calls from one thread) a caller is
/// remembered for.
const RUNS: usize = 8;

/// The wake-up mode a listener's traffic calls for.
#[derive(Debug, Clone)]
pub struct WakeUp {
    /// Bit i: call i back switched from a thread still there to one that came back.
    concurrent: u32,
    /// Bit i: call i back switched from a thread still there.
    switches: u32,
    /// Calls since the last switch to a returning caller (saturating).
    calm: u32,
    last: Option<u32>,
    /// The threads of the runs before the current one.
    runs: Recent<RUNS>,
    sync: bool,
}

impl Default for WakeUp {
    fn default() -> Self {
        WakeUp { concurrent: 0, switches: 0, calm: 0, last: None, runs: Recent::default(), sync: true }
    }
}

impl WakeUp {
    /// The caller of the last call.
    pub fn last(&self) -> Option<u32> {
        self.last
    }

    /// Note a call from thread `tid`; `handed_over`: the caller before it has exited since its
    /// call. Returns the mode to switch to, if it changes.
    pub fn observe(&mut self, tid: u32, handed_over: bool) -> Option<bool> {
        let (switched, back) = match self.last {
            Some(from) if from != tid => {
                let back = !handed_over && self.runs.contains(tid);
                self.runs.push(from);
                (!handed_over, back)
            }
            _ => (false, false),
        };
        self.last = Some(tid);
        self.concurrent = self.concurrent << 1 | u32::from(back);
        self.switches = self.switches << 1 | u32::from(switched);
        self.calm = if back { 0 } else { self.calm.saturating_add(1) };
        let count = |bits: u32| (bits & (u32::MAX >> (32 - WINDOW))).count_ones();
        let want = match self.sync {
            true => count(self.concurrent) < OFF_AT,
            false => count(self.switches) <= ON_AT && self.calm >= CALM,
        };
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

    /// Calls as (thread, whether the caller before it handed over by exiting).
    fn run_with(calls: impl IntoIterator<Item = (u32, bool)>) -> (WakeUp, usize) {
        let mut w = WakeUp::default();
        let changes = calls.into_iter().filter_map(|(t, h)| w.observe(t, h)).count();
        (w, changes)
    }

    fn run(tids: impl IntoIterator<Item = u32>) -> (WakeUp, usize) {
        run_with(tids.into_iter().map(|t| (t, false)))
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
        let back = (0..CALM).filter_map(|_| w.observe(5, false)).collect::<Vec<_>>();
        assert_eq!(back, vec![true], "one caller for a while: back on");
    }

    #[test]
    fn a_chain_of_short_processes_keeps_it() {
        // A shell loop: each process makes about ten calls, one after the other.
        let (w, changes) = run((0..2000).map(|i| i / 10));
        assert!(w.sync());
        assert_eq!(changes, 0);
        // A posix_spawn loop of /bin/true: the parent's one call (the child's stack), then the
        // child's four (its exec, the loader's mappings); every child is new, and the parent
        // calls again once it has exited.
        let (w, changes) = run_with((0..2000).map(|i| if i % 5 == 0 { (1, i > 0) } else { (100 + i / 5, false) }));
        assert!(w.sync());
        assert_eq!(changes, 0);
    }

    #[test]
    fn callers_at_once_turn_it_off() {
        // make -j2: two chains at once, interleaving every call or two.
        let (w, _) = run((0..2000).map(|i| if i % 3 == 0 { 1000 + i / 30 } else { i / 30 }));
        assert!(!w.sync());
        // A long compiler process between short ones still running (A X A Y ...).
        let (w, _) = run((0..2000).map(|i| if i % 2 == 0 { 1 } else { 100 + i / 4 }));
        assert!(!w.sync());
        // Three threads in turn.
        let (w, _) = run((0..300).map(|i| i % 3));
        assert!(!w.sync());
    }

    #[test]
    fn long_turns_leave_it_on() {
        // Two threads taking turns of 12 calls each.
        let (w, _) = run((0..3000).map(|i| (i / 12) % 2));
        assert!(w.sync());
    }
}
