//! One container's (or one `heapcap run` tree's) supervisor: its accounts, the `/proc` view its
//! engines read through, and what it tells the outside (denials, metrics, warnings).

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use heapcap_policy::ledger::{Figure, Ledger, ThreadState};

use crate::accounts::Accounts;
use crate::emulate::Emulator;
use crate::exits::ExitWatcher;
use crate::procview::{checked, Checked, LinuxProc, ProcView, Reading, Task, Want};
use heapcap_policy::denial::Denial;

/// A figure read outside a decision.
enum Fresh {
    Exact(heapcap_policy::ledger::Snapshot),
    Upper(u64),
}

/// Counters, for reports and metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub notifications: AtomicU64,
    /// Decided from the bound alone.
    pub fast: AtomicU64,
    /// Decided after reading `/proc`.
    pub exact: AtomicU64,
    pub denied: AtomicU64,
    /// Callers that left before their answer (signals): normal, they retry.
    pub gone: AtomicU64,
}

/// How a notification was answered, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Denied,
    /// The caller left before its answer (a signal): it will retry.
    Gone,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allow",
            Outcome::Denied => "deny",
            Outcome::Gone => "gone",
        }
    }
}

/// Sees every decision (metrics).
pub trait Observer: Send + Sync {
    /// `syscall`: the call's name (`other` for one heapcap does not look at); `seconds`: from
    /// receiving the notification to handing the answer to the kernel.
    fn decided(&self, syscall: &'static str, outcome: Outcome, seconds: f64);
}

impl std::fmt::Debug for dyn Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

pub(crate) type DenialSink = Box<dyn Fn(&Denial) + Send + Sync>;

/// Warnings a container can trigger at will: at most [`WARNINGS_PER_SECOND`], the rest counted.
const WARNINGS_PER_SECOND: u32 = 10;

#[derive(Debug, Default)]
struct Window {
    start: Option<Instant>,
    said: u32,
    suppressed: u64,
}

/// Supervises the processes of one container, through one listener per filter it is handed.
pub struct Supervisor<P: ProcView = LinuxProc> {
    pub(crate) accounts: Arc<Accounts>,
    pub(crate) proc: P,
    exits: Option<Arc<ExitWatcher>>,
    pub(crate) page: u64,
    pub(crate) stats: Arc<Stats>,
    pub(crate) on_denial: DenialSink,
    pub(crate) observer: Option<Arc<dyn Observer>>,
    /// Carries out the calls heapcap answers itself; `None`: the kernel answers them.
    pub(crate) emulator: Option<Box<dyn Emulator>>,
    warnings: Mutex<Window>,
}

impl<P: ProcView> std::fmt::Debug for Supervisor<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor").field("stats", &self.stats).finish_non_exhaustive()
    }
}

impl Supervisor<LinuxProc> {
    /// A supervisor reading the real `/proc`; exits seen by `exits`; each denial handed to
    /// `on_denial`.
    pub fn new(ledger: Ledger, exits: Arc<ExitWatcher>, on_denial: Box<dyn Fn(&Denial) + Send + Sync>) -> Self {
        Supervisor::with_view(ledger, LinuxProc::default(), Some(exits), heapcap_linux::page_size(), on_denial)
    }
}

impl<P: ProcView> Supervisor<P> {
    /// A supervisor reading through `proc`. Without `exits`, a process's account is closed when
    /// its pid is seen again for another process, or when the listener hangs up.
    pub fn with_view(
        ledger: Ledger,
        proc: P,
        exits: Option<Arc<ExitWatcher>>,
        page: u64,
        on_denial: Box<dyn Fn(&Denial) + Send + Sync>,
    ) -> Self {
        Supervisor {
            accounts: Arc::new(Accounts::new(ledger)),
            proc,
            exits,
            page,
            stats: Arc::new(Stats::default()),
            on_denial,
            observer: None,
            emulator: None,
            warnings: Mutex::new(Window::default()),
        }
    }

    /// Report every decision to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Carry out the calls heapcap answers itself (`sysinfo` from a process that is to see its
    /// quota as its machine's memory) through `emulator`; without one the kernel answers them.
    pub fn with_emulator(mut self, emulator: Box<dyn Emulator>) -> Self {
        self.emulator = Some(emulator);
        self
    }

    pub fn accounts(&self) -> &Arc<Accounts> {
        &self.accounts
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Send a signal to every live process being accounted.
    pub fn signal_all(&self, sig: i32) {
        for task in self.accounts.tasks() {
            let _ = task.signal(sig);
        }
    }

    /// Bring every process's figure to an exact one now, and read the command lines not read yet
    /// (for `ps`), with no lock held.
    pub fn measure(&self) {
        let pids: Vec<u32> = self.accounts.lock().ledger.pids().collect();
        self.refresh(&pids);
        self.name_processes();
    }

    /// Read the command lines not read yet (commands are read when first needed: for `ps`, the
    /// metrics, a denial), with no lock held.
    pub fn name_processes(&self) {
        let unnamed: Vec<(u32, Arc<dyn Task>)> = {
            let g = self.accounts.lock();
            let pids: Vec<u32> = g.ledger.pids().collect();
            pids.into_iter()
                .filter(|p| g.ledger.account(*p).is_some_and(|a| a.command.is_empty()))
                .filter_map(|p| g.task(p).map(|t| (p, t)))
                .collect()
        };
        for (pid, task) in unnamed {
            if let Checked::Read(Reading::Command(command)) = checked(&self.proc, pid, Want::Command, || !task.exited())
            {
                self.accounts.lock().ledger.set_command(pid, command);
            }
        }
    }

    /// Fresh figures for `pids`: for each, copy what is needed under the lock, read without it
    /// (through the files its handle keeps, else opened afresh), hand the figure back with its
    /// token.
    pub(crate) fn refresh(&self, pids: &[u32]) {
        for &pid in pids {
            let (token, pending, task, blind) = {
                let g = self.accounts.lock();
                let (Some(token), Some(task)) = (g.ledger.token(pid), g.task(pid)) else { continue };
                let blind = g.ledger.account(pid).is_some_and(|a| a.blind);
                (token, g.ledger.pending_threads(pid, 0), task, blind)
            };
            let states: Vec<(u32, ThreadState)> = pending.into_iter().map(|t| (t, self.proc.thread_state(t))).collect();
            // Not about a notification: the process's own handle says whether files opened now
            // are still its own (alive after the open: the pid was not reused in between).
            let read = match (task.kept(), blind) {
                (Some(k), true) => k.upper().map(Fresh::Upper).ok(),
                (Some(k), false) => match k.maps(None) {
                    Some(read) => read.map(Fresh::Exact).ok(),
                    None => self.fresh(pid, &*task, false),
                },
                (None, blind) => self.fresh(pid, &*task, blind),
            };
            let figure = match &read {
                Some(Fresh::Exact(snap)) => Figure::Exact(snap),
                Some(Fresh::Upper(u)) => Figure::UpperOnly(*u),
                None => continue,
            };
            self.accounts.lock().ledger.refresh(pid, figure, &states, token);
        }
    }

    /// A figure of `pid` opened afresh, checked against its handle.
    fn fresh(&self, pid: u32, task: &dyn Task, blind: bool) -> Option<Fresh> {
        let want = if blind { Want::Upper } else { Want::Maps { range: None } };
        match checked(&self.proc, pid, want, || !task.exited()) {
            Checked::Read(Reading::Maps(s)) => Some(Fresh::Exact(s)),
            Checked::Read(Reading::Upper(u)) => Some(Fresh::Upper(u)),
            _ => None,
        }
    }

    /// Close now the accounts of processes whose exit the watcher has not handled yet (it
    /// handles them in batches).
    pub(crate) fn reap_exits(&self) {
        match &self.exits {
            Some(exits) => exits.drain(),
            None => self.accounts.reap_dead(),
        }
    }

    /// Close `pid`'s account (opened as `generation`) when its process exits.
    pub(crate) fn watch_exit(&self, pid: u32, generation: u64, task: Arc<dyn Task>) {
        let Some(exits) = &self.exits else { return };
        let accounts = self.accounts.clone();
        // Strong: the accounts must outlive the listener (which can hang up while its last
        // process is still inside exit) until the exit itself is seen.
        let on_exit = Box::new(move || accounts.exited(pid, generation));
        if let Err(e) = exits.watch(task, on_exit) {
            tracing::warn!(pid, error = %e, "cannot watch for the exit of a process");
        }
    }

    /// A process's mappings cannot be read (said once per process).
    pub(crate) fn warn_blind(&self, pid: u32, command: &str) {
        if self.may_warn() {
            tracing::warn!(
                pid,
                command,
                "cannot read the mappings of this process (it is not dumpable, or /proc is refused): its heap is \
                 counted from /proc/PID/statm and the calls let through; frees are seen only in statm"
            );
        }
    }

    /// A warning a container can trigger at will, rate-limited.
    pub(crate) fn warn(&self, tid: u32, pid: Option<u32>, message: &str) {
        if self.may_warn() {
            tracing::warn!(tid, pid, "{message}");
        }
    }

    fn may_warn(&self) -> bool {
        let now = Instant::now();
        let mut w = self.warnings.lock().unwrap_or_else(|e| e.into_inner());
        if w.start.is_none_or(|s| now.duration_since(s) >= Duration::from_secs(1)) {
            let suppressed = std::mem::take(&mut w.suppressed);
            *w = Window { start: Some(now), said: 0, suppressed: 0 };
            if suppressed > 0 {
                drop(w);
                tracing::warn!(suppressed, "more warnings not logged");
                w = self.warnings.lock().unwrap_or_else(|e| e.into_inner());
            }
        }
        if w.said < WARNINGS_PER_SECOND {
            w.said += 1;
            true
        } else {
            w.suppressed += 1;
            false
        }
    }
}
