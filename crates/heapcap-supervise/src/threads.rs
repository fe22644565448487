//! Which process a thread belongs to, remembered safely.
//!
//! A notification names the calling *thread*. Its process is read once from `/proc/<tid>/status`
//! and remembered together with a thread pidfd; every later use checks the pidfd first, so a tid
//! recycled by another process (pid_max can be small) is never charged to the wrong account.

use std::collections::HashMap;

use heapcap_linux::pidfd::Pidfd;

#[derive(Debug)]
struct Entry {
    pid: u32,
    handle: Pidfd,
}

#[derive(Debug, Default)]
pub(crate) struct Threads {
    entries: HashMap<u32, Entry>,
    since_sweep: u32,
}

impl Threads {
    /// The process of a thread we know and that is still the same thread.
    pub(crate) fn lookup(&mut self, tid: u32) -> Option<u32> {
        let entry = self.entries.get(&tid)?;
        if entry.handle.is_alive() {
            Some(entry.pid)
        } else {
            self.entries.remove(&tid);
            None
        }
    }

    /// Remember a thread (only after the notification check proved `handle` is the caller).
    /// Kernels without thread pidfds (before 6.9) get no entry: the caller resolves each time.
    pub(crate) fn insert(&mut self, tid: u32, pid: u32, handle: Option<Pidfd>) {
        if let Some(handle) = handle {
            self.entries.insert(tid, Entry { pid, handle });
        }
        self.since_sweep += 1;
        if self.since_sweep >= 256 {
            self.since_sweep = 0;
            self.entries.retain(|_, e| e.handle.is_alive());
        }
    }

    /// The thread is known and alive.
    pub(crate) fn alive(&self, tid: u32) -> bool {
        self.entries.get(&tid).is_some_and(|e| e.handle.is_alive())
    }
}
