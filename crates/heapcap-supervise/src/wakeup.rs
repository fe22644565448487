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
//! drops it while they come from several threads interleaved: of the last 32 calls, 8 or more
//! from a different thread than the call before turn it off, 2 or fewer turn it back on. A
//! sequential chain of processes (a shell loop, `make -j1`) switches callers only every few
//! calls and keeps it; two threads or processes calling at once switch almost every call.

/// Of the last [`WINDOW`] calls, this many caller switches turn the sync wake-up off ...
const OFF_AT: u32 = 8;
/// ... and this many or fewer turn it back on.
const ON_AT: u32 = 2;
const WINDOW: u32 = 32;

/// The wake-up mode a listener's traffic calls for.
#[derive(Debug, Clone)]
pub struct WakeUp {
    /// Bit i: call i back came from a different thread than the call before it.
    switches: u32,
    last: Option<u32>,
    sync: bool,
}

impl Default for WakeUp {
    fn default() -> Self {
        WakeUp { switches: 0, last: None, sync: true }
    }
}

impl WakeUp {
    /// Note a call from thread `tid`; returns the mode to switch to, if it changes.
    pub fn observe(&mut self, tid: u32) -> Option<bool> {
        let switched = self.last.is_some_and(|t| t != tid);
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
        // make -j2: two chains at once, interleaving every call or two.
        let (w, _) = run((0..2000).map(|i| if i % 3 == 0 { 1000 + i / 30 } else { i / 30 }));
        assert!(!w.sync());
    }
}
