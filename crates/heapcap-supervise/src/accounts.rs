//! The accounts of one container (or one `heapcap run` tree): its ledger, and a handle on each
//! live process. Shared by the container's listener threads, the exit watcher and whoever
//! reports or changes quotas.
//!
//! The lock is held only for pure work on the ledger: nothing under it reads `/proc`, writes a
//! socket or logs. The engine copies what it needs, releases, reads, and hands the figure back
//! with the [`heapcap_policy::ledger::Token`] it took before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use heapcap_policy::ledger::{Figure, Ledger, Limits, Mode, Summary};

use crate::procview::Task;

/// A live process and the generation its account was opened with.
struct Process {
    generation: u64,
    task: Arc<dyn Task>,
}

pub(crate) struct Inner {
    pub(crate) ledger: Ledger,
    procs: HashMap<u32, Process>,
    next_generation: u64,
    /// Processes that ended, if kept.
    finished: Vec<Summary>,
    keep_finished: bool,
}

/// Every process under one set of quotas.
pub struct Accounts {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounts").finish_non_exhaustive()
    }
}

impl Inner {
    /// The handle on `pid`'s process, if it is accounted.
    pub(crate) fn task(&self, pid: u32) -> Option<Arc<dyn Task>> {
        self.procs.get(&pid).filter(|_| self.ledger.contains(pid)).map(|p| p.task.clone())
    }

    /// Open `pid`'s account (closing one left by an earlier process with that pid); returns its
    /// generation, or `None` when `baseline` is no figure (nothing opened).
    pub(crate) fn open(
        &mut self,
        pid: u32,
        task: Arc<dyn Task>,
        command: String,
        baseline: Figure<'_>,
        runtime: bool,
    ) -> Option<u64> {
        if let Some(old) = self.procs.get(&pid).map(|p| p.generation) {
            self.exited(pid, old); // an earlier process's, whose exit was not seen yet
        }
        if !self.ledger.admit(pid, command, baseline, runtime) {
            return None;
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        self.procs.insert(pid, Process { generation, task });
        Some(generation)
    }

    /// Process `pid` (the account opened as `generation`) has exited: close its account.
    /// Returns its figures in audit mode, for the caller to log once the lock is released.
    pub(crate) fn exited(&mut self, pid: u32, generation: u64) -> Option<Summary> {
        if self.procs.get(&pid).is_none_or(|p| p.generation != generation) {
            return None; // already closed, or the pid now belongs to a newer account
        }
        self.procs.remove(&pid);
        let summary = self.ledger.exit(pid)?;
        if self.keep_finished {
            self.finished.push(summary.clone());
        }
        (self.ledger.mode() == Mode::Audit).then_some(summary)
    }

    /// Every live process's handle, with its pid and generation.
    pub(crate) fn processes(&self) -> Vec<(u32, u64, Arc<dyn Task>)> {
        self.procs.iter().map(|(pid, p)| (*pid, p.generation, p.task.clone())).collect()
    }
}

impl Accounts {
    pub fn new(ledger: Ledger) -> Accounts {
        let inner =
            Inner { ledger, procs: HashMap::new(), next_generation: 0, finished: Vec::new(), keep_finished: true };
        Accounts { inner: Mutex::new(inner) }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Work on the ledger under its lock: pure work only (no I/O, no logging), which every
    /// engine of the container waits for.
    pub fn with_ledger<R>(&self, f: impl FnOnce(&mut Ledger) -> R) -> R {
        f(&mut self.lock().ledger)
    }

    /// Whether a process's command line is wanted when it is first seen: its figures are kept
    /// after it ends (a final report), or its peak is logged then (audit mode). Else it is read
    /// when first needed (a denial, `ps`), while the process runs.
    pub(crate) fn wants_commands(&self) -> bool {
        let g = self.lock();
        g.keep_finished || g.ledger.mode() == Mode::Audit
    }

    /// Keep (or not) the figures of processes that ended, for a final report.
    pub fn keep_finished(&self, keep: bool) {
        self.lock().keep_finished = keep;
    }

    /// Figures of every live process, by pid.
    pub fn summaries(&self) -> Vec<Summary> {
        self.lock().ledger.summaries()
    }

    /// Figures of every process, ended (if kept) and live, by pid.
    pub fn report(&self) -> Vec<Summary> {
        let g = self.lock();
        let mut rows = g.finished.clone();
        rows.extend(g.ledger.summaries());
        rows.sort_by_key(|r| r.pid);
        rows
    }

    /// Processes accounted now.
    pub fn len(&self) -> usize {
        self.lock().ledger.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn limits(&self) -> Limits {
        self.lock().ledger.limits()
    }

    pub fn mode(&self) -> Mode {
        self.lock().ledger.mode()
    }

    pub fn set_limits(&self, limits: Limits) {
        self.lock().ledger.set_limits(limits);
    }

    /// A quota for one process; false if it is not accounted.
    pub fn set_process_limit(&self, pid: u32, limit: Option<u64>) -> bool {
        self.lock().ledger.set_process_limit(pid, limit)
    }

    /// Process `pid` (the account opened as `generation`) has exited: close its account; in
    /// audit mode, log its peak.
    pub(crate) fn exited(&self, pid: u32, generation: u64) {
        let ended = self.lock().exited(pid, generation);
        if let Some(s) = ended {
            tracing::info!(pid, command = %s.command, peak = s.peak, "process ended (audit)");
        }
    }

    /// Close the accounts of processes that have exited (the exit watcher may not have run yet).
    pub(crate) fn reap_dead(&self) {
        let processes = self.lock().processes();
        for (pid, generation, task) in processes {
            if task.exited() {
                self.exited(pid, generation);
            }
        }
    }

    /// Handles on every live process.
    pub(crate) fn tasks(&self) -> Vec<Arc<dyn Task>> {
        self.lock().processes().into_iter().map(|(_, _, t)| t).collect()
    }
}
