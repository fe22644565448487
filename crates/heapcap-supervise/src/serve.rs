//! The notification loop: receive, decide, answer.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use heapcap_linux::journal::{Orphan, Slot};
use heapcap_linux::notify::{Errno, Listener, Notification, Recv};
use heapcap_linux::pidfd::Pidfd;
use heapcap_linux::procfs::{ProcError, ProcFs};
use heapcap_policy::ledger::{CallKey, Decision, Fast, Ledger, Mode, Scope, Snapshot, Summary, ThreadState};
use heapcap_policy::syscall::{MemCall, Request};

use crate::exits::ExitWatcher;
use crate::threads::Threads;

/// A growth that was refused.
#[derive(Debug, Clone)]
pub struct Denial {
    pub time: SystemTime,
    pub pid: u32,
    pub tid: u32,
    pub command: String,
    pub syscall: &'static str,
    pub request: u64,
    pub usage: u64,
    pub limit: u64,
    pub scope: Scope,
    /// For a refused `brk`: the unchanged program break the call returns (the kernel's `brk`
    /// reports failure that way, never with an errno; 0 makes libc ask again).
    pub brk_return: Option<u64>,
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

/// State shared by a listener's loop, the exit watcher and whoever reports.
#[derive(Debug)]
pub struct Shared {
    pub ledger: Ledger,
    /// Live processes and the generation their account was opened with.
    procs: HashMap<u32, (u64, Arc<Pidfd>)>,
    next_generation: u64,
    /// Processes that ended, if kept.
    pub finished: Vec<Summary>,
    pub keep_finished: bool,
}

impl Shared {
    /// Process `pid` (the account opened as `generation`) has exited: close its account.
    fn exited(&mut self, pid: u32, generation: u64) {
        if self.procs.get(&pid).is_none_or(|(g, _)| *g != generation) {
            return; // already closed, or the pid now belongs to a newer account
        }
        self.procs.remove(&pid);
        let audit = self.ledger.mode() == Mode::Audit;
        if let Some(summary) = self.ledger.exit(pid) {
            if audit {
                tracing::info!(pid, command = %summary.command, peak = summary.peak, "process ended (audit)");
            }
            if self.keep_finished {
                self.finished.push(summary);
            }
        }
    }

    /// Close the accounts of processes that have exited (the exit watcher may not have run yet).
    fn reap_dead(&mut self) {
        let dead: Vec<(u32, u64)> =
            self.procs.iter().filter(|(_, (_, pidfd))| pidfd.has_exited()).map(|(pid, (g, _))| (*pid, *g)).collect();
        tracing::debug!(live = self.procs.len(), dead = dead.len(), "listener hung up");
        for (pid, generation) in dead {
            self.exited(pid, generation);
        }
    }
}

type DenialSink = Box<dyn Fn(&Denial) + Send + Sync>;

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

/// Supervises the processes of one listener (a `heapcap run` tree, or one container).
pub struct Supervisor {
    shared: Arc<Mutex<Shared>>,
    exits: Arc<ExitWatcher>,
    proc: ProcFs,
    page: u64,
    stats: Arc<Stats>,
    on_denial: DenialSink,
    observer: Option<Arc<dyn Observer>>,
}

impl std::fmt::Debug for dyn Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor").field("stats", &self.stats).finish_non_exhaustive()
    }
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What one notification needs answered.
enum Answer {
    Allow,
    Deny(Denial),
    /// The caller is gone: nothing to answer.
    Drop,
}

impl Supervisor {
    pub fn new(ledger: Ledger, exits: Arc<ExitWatcher>, on_denial: DenialSink) -> Supervisor {
        let shared =
            Shared { ledger, procs: HashMap::new(), next_generation: 0, finished: Vec::new(), keep_finished: true };
        Supervisor {
            shared: Arc::new(Mutex::new(shared)),
            exits,
            proc: ProcFs::default(),
            page: heapcap_linux::page_size(),
            stats: Arc::new(Stats::default()),
            on_denial,
            observer: None,
        }
    }

    /// Report every decision to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Supervisor {
        self.observer = Some(observer);
        self
    }

    /// Keep (or not) the figures of processes that ended, for a final report.
    pub fn keep_finished(&self, keep: bool) {
        lock(&self.shared).keep_finished = keep;
    }

    /// Bring every process's figure to an exact one now (for `ps`).
    pub fn measure(&self) {
        let mut shared = lock(&self.shared);
        let pids: Vec<u32> = shared.ledger.pids().collect();
        self.refresh(&mut shared, pids, &mut String::new());
    }

    pub fn shared(&self) -> Arc<Mutex<Shared>> {
        self.shared.clone()
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Send a signal to every live process being accounted.
    pub fn signal_all(&self, sig: i32) {
        let pidfds: Vec<Arc<Pidfd>> = lock(&self.shared).procs.values().map(|(_, p)| p.clone()).collect();
        for p in pidfds {
            let _ = p.signal(sig);
        }
    }

    /// Answer `listener` until every process under its filter is gone.
    pub fn serve(&self, listener: &Listener) -> io::Result<()> {
        self.serve_journaled(listener, None)
    }

    /// [`Supervisor::serve`], noting each call in `slot` before deciding it, so that a successor
    /// can answer it if this process dies first (see [`Supervisor::resume`]).
    pub fn serve_journaled(&self, listener: &Listener, slot: Option<&Slot>) -> io::Result<()> {
        if let Err(e) = listener.set_sync_wakeup() {
            tracing::debug!(error = %e, "no synchronous wake-up");
        }
        let mut threads = Threads::default();
        // Grown on the first read of the maps as text (most containers never need one: 6.11+ has
        // PROCMAP_QUERY), not reserved up front for every container.
        let mut buf = String::new();
        loop {
            let n = match listener.recv()? {
                Recv::Notification(n) => n,
                Recv::Interrupted => continue,
                Recv::HungUp => {
                    lock(&self.shared).reap_dead();
                    return Ok(());
                }
            };
            if let Some(slot) = slot {
                slot.record(&n);
            }
            self.answer(listener, &mut threads, &mut buf, &n)?;
        }
    }

    /// Answer the call a previous supervisor of `listener` took but never answered (it died), so
    /// that its caller does not wait forever. A noted call is decided like any other. One taken
    /// in the instant before it could be noted (a supervisor killed while it waits for calls
    /// wakes, takes one and dies) is known by id only: if exactly one thread of `pids` sits in a
    /// call heapcap decides, that is its caller and the call is decided from what `/proc` shows;
    /// otherwise it is let through. Returns whether there was one.
    pub fn resume(&self, listener: &Listener, slot: &Slot, pids: &[u32]) -> io::Result<bool> {
        let n = match slot.orphan(listener) {
            None => return Ok(false),
            Some(Orphan::Noted(n)) => n,
            Some(Orphan::Unnoted(id)) => match self.sole_caller(id, pids) {
                Some(n) => n,
                None => {
                    tracing::warn!(id, "letting through a call the previous supervisor took but did not note");
                    listener.allow(id)?;
                    return Ok(true);
                }
            },
        };
        tracing::info!(id = n.id, tid = n.pid, "answering the call the previous supervisor left");
        self.answer(listener, &mut Threads::default(), &mut String::new(), &n)?;
        Ok(true)
    }

    /// The one thread of `pids` inside a call heapcap decides, as notification `id`; `None` if
    /// there are several (or none).
    fn sole_caller(&self, id: u64, pids: &[u32]) -> Option<Notification> {
        let arch = if cfg!(target_arch = "x86_64") {
            heapcap_policy::syscall::AUDIT_ARCH_X86_64
        } else if cfg!(target_arch = "aarch64") {
            heapcap_policy::syscall::AUDIT_ARCH_AARCH64
        } else {
            return None;
        };
        let mut found = None;
        for pid in pids {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { continue };
            for tid in tasks.flatten().filter_map(|t| t.file_name().to_str()?.parse::<u32>().ok()) {
                let ThreadState::InCall(key) = self.proc.thread_state(tid) else { continue };
                let Ok(nr) = i32::try_from(key.nr) else { continue };
                if MemCall::decode(arch, nr, key.args).is_none() {
                    continue;
                }
                if found.is_some() {
                    return None;
                }
                found = Some(Notification { id, pid: tid, arch, nr, args: key.args });
            }
        }
        found
    }

    /// Open accounts for processes already under the filter (a supervisor taking over from one
    /// that died), so totals count them before they next grow. Pids that are gone, or already
    /// known, are skipped.
    pub fn adopt(&self, pids: &[u32]) {
        let mut shared = lock(&self.shared);
        let mut buf = String::new();
        for &pid in pids {
            if shared.ledger.contains(pid) {
                continue;
            }
            let Ok(pidfd) = Pidfd::open(pid) else { continue };
            let snap = self.proc.snapshot(pid, &mut buf);
            // Read first, then check: a live pidfd opened before the read means the pid was not
            // recycled in between, so the figures are that process's.
            let (Ok(snap), true) = (snap, pidfd.is_alive()) else { continue };
            let Ok(watch) = pidfd.try_clone() else { continue };
            self.open_account(&mut shared, pid, pidfd, watch, &snap);
        }
    }

    fn answer(&self, listener: &Listener, threads: &mut Threads, buf: &mut String, n: &Notification) -> io::Result<()> {
        self.stats.notifications.fetch_add(1, Ordering::Relaxed);
        // Timed only for an observer (heapcapd's metrics): `heapcap run` saves the two clock reads.
        let started = self.observer.is_some().then(Instant::now);
        let call = MemCall::decode(n.arch, n.nr, n.args);
        let answer = self.decide(listener, threads, buf, n, call);
        // The caller waits until the answer is handed to the kernel. The send wakes it on this CPU
        // (synchronous wake-up), and the time this thread then waits to run again is not its wait.
        let decided = started.map(|t| t.elapsed());
        let mut outcome = Outcome::Allowed;
        let sent = match answer {
            Answer::Allow => listener.allow(n.id),
            Answer::Deny(d) => {
                outcome = Outcome::Denied;
                self.stats.denied.fetch_add(1, Ordering::Relaxed);
                let sent = match d.brk_return {
                    Some(brk) => listener.return_value(n.id, brk as i64),
                    None => listener.fail(n.id, Errno::NoMem),
                };
                (self.on_denial)(&d);
                sent
            }
            Answer::Drop => Ok(heapcap_linux::notify::Answered::Gone),
        };
        match sent {
            Ok(heapcap_linux::notify::Answered::Yes) => {}
            Ok(heapcap_linux::notify::Answered::Gone) => {
                outcome = Outcome::Gone;
                self.stats.gone.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => return Err(e),
        }
        if let (Some(observer), Some(decided)) = (&self.observer, decided) {
            let syscall = call.map_or("other", |c| c.name());
            observer.decided(syscall, outcome, decided.as_secs_f64());
        }
        Ok(())
    }

    fn decide(
        &self,
        listener: &Listener,
        threads: &mut Threads,
        buf: &mut String,
        n: &Notification,
        call: Option<MemCall>,
    ) -> Answer {
        let Some(call) = call else { return Answer::Allow };
        let key = CallKey { nr: i64::from(n.nr), args: n.args };
        let call = match call {
            MemCall::OldMmap { args_ptr } => match self.old_mmap_args(listener, n, args_ptr) {
                Ok(Some(c)) => c,
                Ok(None) => return Answer::Drop,
                Err(e) => return self.unreadable(n, "old mmap arguments", &e),
            },
            c => c,
        };
        let pid = match threads.lookup(n.pid) {
            Some(pid) => pid,
            None => match self.resolve_thread(listener, threads, n) {
                Ok(Some(pid)) => pid,
                Ok(None) => return Answer::Drop,
                Err(e) => return self.unreadable(n, "thread status", &e),
            },
        };
        let mut shared = lock(&self.shared);
        let mut fresh: Option<Snapshot> = None;
        if !shared.ledger.contains(pid) {
            match self.admit(listener, &mut shared, pid, n, buf) {
                Ok(Some(snap)) => fresh = Some(snap),
                Ok(None) => return Answer::Drop,
                Err(e) => return self.unreadable(n, "process maps", &e),
            }
        }
        let mut settled = shared.ledger.thread_seen(pid, n.pid);
        if let Some(t) = shared.ledger.exec_thread(pid) {
            if t != n.pid && !threads.alive(t) {
                shared.ledger.exec_thread_gone(pid);
                settled = true;
            }
        }
        if call == MemCall::Exec {
            shared.ledger.exec_started(pid, n.pid);
            return Answer::Allow;
        }
        let Some(req) = call.request(self.page) else { return Answer::Allow };
        let refresh_others = match (&fresh, settled) {
            (None, false) => match shared.ledger.fast(pid, n.pid, &req, key) {
                Fast::Allow => {
                    self.stats.fast.fetch_add(1, Ordering::Relaxed);
                    return Answer::Allow;
                }
                Fast::Exact { refresh_others } => refresh_others,
            },
            _ => false,
        };
        self.stats.exact.fetch_add(1, Ordering::Relaxed);
        if refresh_others {
            self.refresh_others(&mut shared, pid, buf);
        }
        // Thread states first, maps second: a thread seen to have moved past its allowed call
        // finished it before the maps were read, so its growth is in them. (The other order can
        // miss a growth that lands between the two reads, and retire it: an under-count.)
        let states = self.thread_states(&shared, pid, n.pid);
        // Near the quota, an upper figure that costs the same whatever the number of mappings
        // settles most requests that fit; the maps are read for the rest (and for every denial).
        if fresh.is_none() && !settled && shared.ledger.coarse_useful(pid, &req) {
            match self.upper_figure(listener, pid, n) {
                Ok(Some(upper)) if shared.ledger.coarse(pid, n.pid, &req, key, upper, &states) => return Answer::Allow,
                Ok(None) => return Answer::Drop,
                _ => {}
            }
        }
        let snap = match fresh {
            Some(s) => s,
            None => {
                let opened = match self.proc.open_snapshot(pid) {
                    Ok(o) => o,
                    Err(e) => return self.unreadable(n, "process maps", &e),
                };
                if !listener.id_valid(n.id) {
                    return Answer::Drop;
                }
                // An mprotect looks at memory not counted yet: the query reads that range too.
                let range = match req {
                    Request::Protect { addr, len } => Some((addr, addr.saturating_add(len))),
                    _ => None,
                };
                match self.proc.read_snapshot_for(opened, buf, range) {
                    Ok(s) => s,
                    Err(e) => return self.unreadable(n, "process maps", &e),
                }
            }
        };
        if settled {
            shared.ledger.set_command(pid, self.proc.command(pid));
        }
        match shared.ledger.exact(pid, n.pid, &req, key, &snap, &states) {
            Decision::Allow => Answer::Allow,
            Decision::Deny { scope, usage, request, limit } => Answer::Deny(Denial {
                time: SystemTime::now(),
                pid,
                tid: n.pid,
                command: shared.ledger.account(pid).map(|a| a.command.clone()).unwrap_or_default(),
                syscall: req.name(),
                request,
                usage,
                limit,
                scope,
                brk_return: matches!(req, Request::Brk { .. }).then(|| snap.brk(self.page).unwrap_or(0)),
            }),
        }
    }

    fn thread_states(&self, shared: &Shared, pid: u32, tid: u32) -> Vec<(u32, ThreadState)> {
        shared.ledger.pending_threads(pid, tid).into_iter().map(|t| (t, self.proc.thread_state(t))).collect()
    }

    /// `statm`'s upper figure of the caller's process heap, opened before the validity check.
    fn upper_figure(&self, listener: &Listener, pid: u32, n: &Notification) -> Result<Option<u64>, ProcError> {
        let opened = self.proc.open_statm(pid)?;
        if !listener.id_valid(n.id) {
            return Ok(None);
        }
        self.proc.read_upper(opened, self.page).map(Some)
    }

    /// i386 `old_mmap`: read its argument block from the caller, after the validity check.
    fn old_mmap_args(&self, listener: &Listener, n: &Notification, ptr: u64) -> Result<Option<MemCall>, ProcError> {
        let mem = self.proc.open_mem(n.pid)?;
        if !listener.id_valid(n.id) {
            return Ok(None);
        }
        let mut raw = [0u8; 24];
        self.proc.read_mem(&mem, ptr, &mut raw)?;
        let mut words = [0u32; 6];
        for (w, c) in words.iter_mut().zip(raw.chunks_exact(4)) {
            *w = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(Some(MemCall::from_old_mmap_args(words)))
    }

    /// Learn a new thread's process. `Ok(None)`: the caller is gone.
    fn resolve_thread(
        &self,
        listener: &Listener,
        threads: &mut Threads,
        n: &Notification,
    ) -> Result<Option<u32>, ProcError> {
        let status = self.proc.open_status(n.pid)?;
        let handle = Pidfd::open_thread(n.pid).ok();
        if !listener.id_valid(n.id) {
            return Ok(None);
        }
        let pid = self.proc.read_tgid(status)?;
        threads.insert(n.pid, pid, handle);
        Ok(Some(pid))
    }

    /// Open an account for a process seen for the first time (or whose pid was recycled).
    fn admit(
        &self,
        listener: &Listener,
        shared: &mut Shared,
        pid: u32,
        n: &Notification,
        buf: &mut String,
    ) -> Result<Option<Snapshot>, ProcError> {
        let opened = self.proc.open_snapshot(pid)?;
        let pidfd_err = |source| ProcError::Io { path: format!("pidfd of {pid}").into(), source };
        // Opened before the validity check, so it is the caller's process, not a recycled pid.
        let pidfd = Pidfd::open(pid).map_err(pidfd_err)?;
        let watch = pidfd.try_clone().map_err(pidfd_err)?;
        if !listener.id_valid(n.id) {
            return Ok(None);
        }
        let snap = self.proc.read_snapshot(opened, buf)?;
        self.open_account(shared, pid, pidfd, watch, &snap);
        Ok(Some(snap))
    }

    /// Open the account of `pid`, measured as `snap`, and watch for its exit.
    fn open_account(&self, shared: &mut Shared, pid: u32, pidfd: Pidfd, watch: Pidfd, snap: &Snapshot) {
        let command = self.proc.command(pid);
        tracing::debug!(pid, command = %command, heap = snap.maps.counted(), "new process");
        shared.ledger.admit(pid, command, snap);
        let generation = shared.next_generation;
        shared.next_generation += 1;
        shared.procs.insert(pid, (generation, Arc::new(pidfd)));
        let shared_for_exit = self.shared.clone();
        // Strong: the accounts must outlive the listener (which can hang up while its last
        // process is still inside exit) until the exit itself is seen.
        let on_exit = Box::new(move || lock(&shared_for_exit).exited(pid, generation));
        if let Err(e) = self.exits.watch(watch, on_exit) {
            tracing::warn!(pid, error = %e, "cannot watch for the exit of a process");
        }
    }

    /// Bring the other processes' bounds to exact figures (the total quota is in question).
    fn refresh_others(&self, shared: &mut Shared, pid: u32, buf: &mut String) {
        let stale = shared.ledger.stale(pid);
        self.refresh(shared, stale, buf);
    }

    /// Exact figures for `pids`.
    fn refresh(&self, shared: &mut Shared, pids: Vec<u32>, buf: &mut String) {
        for other in pids {
            let Some((_, pidfd)) = shared.procs.get(&other).cloned() else { continue };
            let states = self.thread_states(shared, other, 0); // before the maps: see decide()
            let snap = self.proc.snapshot(other, buf);
            // Read first, then check the process is still the one we account: a live pidfd
            // means the pid was not recycled, so the snapshot was of the right process.
            if !pidfd.is_alive() {
                continue;
            }
            if let Ok(snap) = snap {
                shared.ledger.refresh(other, &snap, &states);
            }
        }
    }

    /// A `/proc` read failed for a live caller: never let growth through unchecked when enforcing.
    fn unreadable(&self, n: &Notification, what: &str, e: &ProcError) -> Answer {
        if e.is_gone() {
            return Answer::Drop;
        }
        let mode = lock(&self.shared).ledger.mode();
        tracing::warn!(tid = n.pid, error = %e, "cannot read {what}");
        match mode {
            Mode::Audit => Answer::Allow,
            Mode::Enforce => Answer::Deny(Denial {
                time: SystemTime::now(),
                pid: n.pid,
                tid: n.pid,
                command: String::new(),
                syscall: "unknown",
                request: 0,
                usage: 0,
                limit: 0,
                scope: Scope::Process,
                brk_return: matches!(MemCall::decode(n.arch, n.nr, n.args), Some(MemCall::Brk { .. })).then_some(0),
            }),
        }
    }
}
