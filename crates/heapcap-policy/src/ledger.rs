//! The accounting: per-process upper bounds, quotas, and decisions.
//!
//! For each process (thread group) the ledger keeps `bound`, an upper bound of its counted heap:
//! the last exact figure read from `/proc/<pid>/maps` plus every growth let through since. A
//! request is let through at once while `bound + growth` stays within the quota (and within the
//! peak mark, so peaks are measured); otherwise the caller reads the exact figure and asks again.
//! Frees are never intercepted: they simply show up in the next exact read.
//!
//! Two things can make an exact read too low, and both are tracked:
//! - growth let through that is still in flight on another thread when the maps are read (the
//!   thread was woken but has not mapped yet). Each such growth is *pending* until the thread is
//!   seen to have moved on: it sent another notification, it sleeps in a different call, it is
//!   gone. Pending bytes are added to every exact read.
//! - `mremap` that moves memory while the maps are being read can hide it from the read, so a
//!   moving `mremap` stays pending for its full new size.
//!
//! `brk` is charged from the last known program break, which an `execve` replaces. An exec in
//! flight forces `brk` onto the exact path until the exec'ing thread is seen again or is gone.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use crate::maps::Maps;
use crate::syscall::{page_up, Request};

pub type Pid = u32;
pub type Tid = u32;

const MIB: u64 = 1 << 20;

/// Quotas. `None`: no quota of that kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// For each process.
    pub process: Option<u64>,
    /// For all processes together.
    pub total: Option<u64>,
}

/// Enforce quotas, or only observe. Written `enforce` and `audit` (annotations, the control
/// protocol, `heapcap ps`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

impl Mode {
    /// The name users write.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        }
    }
}

/// A name that is none of a mode's or a scope's; the message says what to write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{given}' is not a {what}: write {expected}")]
pub struct NameError {
    pub given: String,
    what: &'static str,
    expected: &'static str,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Mode {
    type Err = NameError;

    /// `enforce` or `audit`, exactly.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Mode::Enforce, Mode::Audit].into_iter().find(|m| m.name() == s).ok_or_else(|| NameError {
            given: s.to_string(),
            what: "mode",
            expected: "enforce or audit",
        })
    }
}

/// A syscall instance as the kernel shows it in `/proc/<tid>/syscall`: number and arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CallKey {
    pub nr: i64,
    pub args: [u64; 6],
}

/// What a thread is doing now, from `/proc/<tid>/syscall`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadState {
    /// Exited.
    Gone,
    /// Stopped or sleeping outside any syscall.
    Idle,
    /// Sleeping inside this syscall.
    InCall(CallKey),
    /// On a CPU: it may be anywhere.
    Busy,
}

/// The exact state of a process, read from `/proc`.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub maps: Maps,
    /// `start_brk` from `/proc/<pid>/stat`: the program break while the heap was never grown.
    pub start_brk: Option<u64>,
}

impl Snapshot {
    /// The page-aligned program break: the end of `[heap]`, or `start_brk` if it never grew.
    pub fn brk(&self, page: u64) -> Option<u64> {
        self.maps.heap_end().or_else(|| self.start_brk.and_then(|b| page_up(b, page)))
    }
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    tid: Tid,
    bytes: u64,
    key: CallKey,
}

/// One process's account.
#[derive(Debug, Clone)]
pub struct Account {
    pub command: String,
    /// Upper bound of the counted heap now.
    pub bound: u64,
    /// The counted heap at the last exact read.
    pub last_exact: u64,
    /// High-water mark of `bound`: an upper estimate of the peak heap, at most the larger of
    /// 1 MiB and 1/16 above the true peak (the fast path measures again past that).
    pub peak: u64,
    /// Highest counted heap actually measured: drives the peak mark.
    measured: u64,
    pub denials: u64,
    /// This process's own quota, when set apart from the ledger's.
    pub limit: Option<u64>,
    /// Page-aligned program break, when known for the current image.
    brk: Option<u64>,
    pending: Vec<Pending>,
    exec_by: Option<Tid>,
    /// An exec settled: the next exact read starts the new image's figures afresh.
    new_image: bool,
}

impl Account {
    fn in_flight(&self) -> u64 {
        self.pending.iter().map(|p| p.bytes).sum()
    }

    /// Threads with growth in flight, other than `except`.
    fn pending_threads(&self, except: Tid) -> Vec<Tid> {
        let mut tids: Vec<Tid> = self.pending.iter().map(|p| p.tid).filter(|&t| t != except).collect();
        tids.sort_unstable();
        tids.dedup();
        tids
    }

    fn retire(&mut self, states: &[(Tid, ThreadState)]) {
        self.pending.retain(|p| match states.iter().find(|(t, _)| *t == p.tid) {
            Some((_, ThreadState::Gone | ThreadState::Idle)) => false,
            Some((_, ThreadState::InCall(key))) => *key == p.key,
            Some((_, ThreadState::Busy)) | None => true,
        });
    }
}

/// The outcome of the fast path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fast {
    /// Let it through; already charged.
    Allow,
    /// Read the exact figure first. `refresh_others`: the total quota is in question, so the
    /// other processes' figures should be refreshed too.
    Exact { refresh_others: bool },
}

/// Which quota a denial hit. Written `process` and `total` (the control protocol, the logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Process,
    Total,
}

impl Scope {
    /// The name users read.
    pub fn name(self) -> &'static str {
        match self {
            Scope::Process => "process",
            Scope::Total => "total",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scope {
    type Err = NameError;

    /// `process` or `total`, exactly.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Scope::Process, Scope::Total].into_iter().find(|scope| scope.name() == s).ok_or_else(|| NameError {
            given: s.to_string(),
            what: "scope",
            expected: "process or total",
        })
    }
}

/// The answer to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny { scope: Scope, usage: u64, request: u64, limit: u64 },
}

/// A process's figures, for reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub pid: Pid,
    pub command: String,
    pub heap: u64,
    pub peak: u64,
    pub denials: u64,
    pub limit: Option<u64>,
}

/// Every process under one set of quotas (a `heapcap run` tree, or one container).
#[derive(Debug)]
pub struct Ledger {
    limits: Limits,
    mode: Mode,
    page: u64,
    accounts: HashMap<Pid, Account>,
    total_bound: u64,
}

/// Growth the fast path may let through before measuring a new peak.
fn peak_mark(peak: u64) -> u64 {
    peak.saturating_add((peak / 16).max(MIB))
}

impl Ledger {
    pub fn new(limits: Limits, mode: Mode, page: u64) -> Ledger {
        assert!(page.is_power_of_two(), "page size must be a power of two");
        Ledger { limits, mode, page, accounts: HashMap::new(), total_bound: 0 }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    pub fn set_mode(&mut self, mode: Mode) {
        self.mode = mode;
    }

    /// Upper bound of all processes' counted heap together.
    pub fn total_bound(&self) -> u64 {
        self.total_bound
    }

    pub fn contains(&self, pid: Pid) -> bool {
        self.accounts.contains_key(&pid)
    }

    pub fn account(&self, pid: Pid) -> Option<&Account> {
        self.accounts.get(&pid)
    }

    pub fn pids(&self) -> impl Iterator<Item = Pid> + '_ {
        self.accounts.keys().copied()
    }

    pub fn len(&self) -> usize {
        self.accounts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty()
    }

    /// A quota for one process, apart from the ledger's.
    pub fn set_process_limit(&mut self, pid: Pid, limit: Option<u64>) -> bool {
        self.accounts.get_mut(&pid).map(|a| a.limit = limit).is_some()
    }

    fn process_limit(&self, acct: &Account) -> Option<u64> {
        acct.limit.or(self.limits.process)
    }

    /// Start accounting a process first seen now, from an exact snapshot.
    pub fn admit(&mut self, pid: Pid, command: String, snap: &Snapshot) {
        let counted = snap.maps.counted();
        let acct = Account {
            command,
            bound: counted,
            last_exact: counted,
            peak: counted,
            measured: counted,
            denials: 0,
            limit: None,
            brk: snap.brk(self.page),
            pending: Vec::new(),
            exec_by: None,
            new_image: false,
        };
        if let Some(old) = self.accounts.insert(pid, acct) {
            self.total_bound -= old.bound;
        }
        self.total_bound += counted;
    }

    pub fn set_command(&mut self, pid: Pid, command: String) {
        if let Some(a) = self.accounts.get_mut(&pid) {
            a.command = command;
        }
    }

    /// A notification from `tid` arrived: its earlier calls are done. Returns true when this
    /// settles an exec (the caller should then measure exactly and refresh the command name).
    pub fn thread_seen(&mut self, pid: Pid, tid: Tid) -> bool {
        let Some(acct) = self.accounts.get_mut(&pid) else { return false };
        acct.pending.retain(|p| p.tid != tid);
        if acct.exec_by == Some(tid) {
            acct.exec_by = None;
            acct.brk = None;
            acct.new_image = true;
            return true;
        }
        false
    }

    /// `tid` of `pid` is calling `execve`.
    pub fn exec_started(&mut self, pid: Pid, tid: Tid) {
        if let Some(a) = self.accounts.get_mut(&pid) {
            a.exec_by = Some(tid);
        }
    }

    /// The thread whose exec is in flight, if any.
    pub fn exec_thread(&self, pid: Pid) -> Option<Tid> {
        self.accounts.get(&pid).and_then(|a| a.exec_by)
    }

    /// The exec'ing thread is gone (it took the leader's id, or died): the exec is settled.
    pub fn exec_thread_gone(&mut self, pid: Pid) {
        if let Some(a) = self.accounts.get_mut(&pid) {
            a.exec_by = None;
            a.brk = None;
            a.new_image = true;
        }
    }

    /// Threads of `pid` other than `tid` with growth in flight: read their state for the exact path.
    pub fn pending_threads(&self, pid: Pid, tid: Tid) -> Vec<Tid> {
        self.accounts.get(&pid).map(|a| a.pending_threads(tid)).unwrap_or_default()
    }

    /// Processes whose bound is above their last exact figure: worth refreshing for the total.
    pub fn stale(&self, except: Pid) -> Vec<Pid> {
        self.accounts
            .iter()
            .filter(|(p, a)| **p != except && (a.bound > a.last_exact || !a.pending.is_empty()))
            .map(|(p, _)| *p)
            .collect()
    }

    fn upper_growth(&self, acct: &Account, req: &Request) -> Option<u64> {
        Some(match *req {
            Request::Brk { addr } => {
                if acct.exec_by.is_some() {
                    return None;
                }
                page_up(addr, self.page)?.saturating_sub(acct.brk?)
            }
            Request::Map { len, .. } => len,
            Request::Remap { old_len, new_len, dontunmap, .. } if dontunmap || old_len == 0 => new_len,
            Request::Remap { old_len, new_len, .. } => new_len.saturating_sub(old_len),
            Request::Protect { len, .. } => len,
        })
    }

    fn missable(req: &Request, growth: u64) -> u64 {
        match *req {
            Request::Remap { moves: true, new_len, .. } => growth.max(new_len),
            _ => growth,
        }
    }

    fn track(acct: &mut Account, req: &Request, page: u64, tid: Tid, key: CallKey, growth: u64, missable: u64) {
        if let Request::Brk { addr } = *req {
            acct.brk = page_up(addr, page);
        }
        acct.bound += growth;
        acct.peak = acct.peak.max(acct.bound);
        if missable > 0 {
            acct.pending.push(Pending { tid, bytes: missable, key });
        }
    }

    /// The fast path: decide from the bound alone, or ask for an exact read.
    pub fn fast(&mut self, pid: Pid, tid: Tid, req: &Request, key: CallKey) -> Fast {
        let Some(acct) = self.accounts.get(&pid) else { return Fast::Exact { refresh_others: false } };
        let Some(growth) = self.upper_growth(acct, req) else { return Fast::Exact { refresh_others: false } };
        let mut cap = peak_mark(acct.measured);
        let mut total_ok = true;
        if self.mode == Mode::Enforce {
            if let Some(limit) = self.process_limit(acct) {
                cap = cap.min(limit);
            }
            if let Some(total) = self.limits.total {
                total_ok = self.total_bound.saturating_add(growth) <= total;
            }
        }
        if acct.bound.saturating_add(growth) > cap || !total_ok {
            return Fast::Exact { refresh_others: !total_ok };
        }
        let page = self.page;
        let missable = Self::missable(req, growth);
        let acct = self.accounts.get_mut(&pid).expect("checked above");
        Self::track(acct, req, page, tid, key, growth, missable);
        self.total_bound += growth;
        Fast::Allow
    }

    /// Whether [`Ledger::coarse`] can settle this request: the fast path refused it because of a
    /// quota (not to measure a new peak, which needs the exact figure), and its growth is known
    /// without the maps.
    pub fn coarse_useful(&self, pid: Pid, req: &Request) -> bool {
        let Some(acct) = self.accounts.get(&pid) else { return false };
        if self.mode != Mode::Enforce || acct.new_image {
            return false;
        }
        let Some(growth) = self.upper_growth(acct, req) else { return false };
        self.process_limit(acct).is_some_and(|l| acct.bound.saturating_add(growth) > l)
            || self.limits.total.is_some_and(|t| self.total_bound.saturating_add(growth) > t)
    }

    /// Near the quota, decide from an *upper* figure of the counted heap that is cheap to read
    /// whatever the number of mappings (the kernel's private writable total plus the stacks,
    /// `/proc/<pid>/statm`: it also holds private writable file mappings and the main stack, so
    /// it is never below the counted heap). `states` must be read before `upper`, as for
    /// [`Ledger::refresh`]. Returns true when the request fits even so: it is let through and
    /// charged. False: read the exact figure ([`Ledger::exact`]); nothing is lost either way
    /// (growth seen landed before `upper` was read is retired, and the bound only tightens).
    pub fn coarse(
        &mut self,
        pid: Pid,
        tid: Tid,
        req: &Request,
        key: CallKey,
        upper: u64,
        states: &[(Tid, ThreadState)],
    ) -> bool {
        let page = self.page;
        let (limit, total) = (self.limits.process, self.limits.total);
        let Some(acct) = self.accounts.get_mut(&pid) else { return false };
        acct.retire(states);
        let usage = acct.bound.min(upper.saturating_add(acct.in_flight()));
        self.total_bound = self.total_bound - acct.bound + usage;
        acct.bound = usage;
        let acct = &self.accounts[&pid];
        if self.mode != Mode::Enforce || acct.new_image {
            return false;
        }
        let Some(growth) = self.upper_growth(acct, req) else { return false };
        let within = |bound: u64, cap: Option<u64>| cap.is_none_or(|c| bound.saturating_add(growth) <= c);
        if !within(usage, acct.limit.or(limit)) || !within(self.total_bound, total) {
            return false;
        }
        // Past the peak mark the peak must be measured: that needs the exact figure.
        if usage.saturating_add(growth) > peak_mark(acct.measured) {
            return false;
        }
        let missable = Self::missable(req, growth);
        let acct = self.accounts.get_mut(&pid).expect("checked above");
        Self::track(acct, req, page, tid, key, growth, missable);
        self.total_bound += growth;
        true
    }

    /// Exact growth and the bytes a concurrent read could miss, from a snapshot.
    fn exact_growth(&self, req: &Request, snap: &Snapshot) -> (u64, u64) {
        let growth = match *req {
            Request::Brk { addr } => {
                let Some(up) = page_up(addr, self.page) else { return (0, 0) };
                snap.brk(self.page).map_or(up, |brk| up.saturating_sub(brk))
            }
            Request::Map { addr, len, fixed: true } => len - snap.maps.counted_in(addr, addr.saturating_add(len)),
            Request::Map { len, .. } => len,
            Request::Remap { old_addr, .. } if !snap.maps.containing(old_addr).is_some_and(|v| v.counted()) => {
                return (0, 0); // a file or shared mapping: never heap
            }
            Request::Remap { old_len, new_len, dontunmap, .. } if dontunmap || old_len == 0 => new_len,
            Request::Remap { old_len, new_len, .. } => new_len.saturating_sub(old_len),
            Request::Protect { addr, len } => snap.maps.protect_growth(addr, addr.saturating_add(len)),
        };
        (growth, Self::missable(req, growth))
    }

    /// Replace a process's bound with an exact figure (`states`: its threads with growth in flight).
    ///
    /// `states` must be read *before* `snap`: a thread seen past its allowed call then finished it
    /// before the maps were read. Read after, a growth landing between the two reads would be in
    /// neither figure.
    pub fn refresh(&mut self, pid: Pid, snap: &Snapshot, states: &[(Tid, ThreadState)]) {
        let page = self.page;
        let Some(acct) = self.accounts.get_mut(&pid) else { return };
        acct.retire(states);
        let counted = snap.maps.counted();
        let usage = counted + acct.in_flight();
        self.total_bound = self.total_bound - acct.bound + usage;
        acct.bound = usage;
        acct.last_exact = counted;
        if std::mem::take(&mut acct.new_image) {
            acct.measured = counted;
            acct.peak = usage;
        }
        acct.measured = acct.measured.max(counted);
        acct.peak = acct.peak.max(usage);
        if acct.exec_by.is_none() {
            acct.brk = snap.brk(page);
        }
    }

    /// The exact path: decide `req` of thread `tid` from a fresh snapshot of its process.
    /// `states` must be read before `snap` (see [`Ledger::refresh`]).
    pub fn exact(
        &mut self,
        pid: Pid,
        tid: Tid,
        req: &Request,
        key: CallKey,
        snap: &Snapshot,
        states: &[(Tid, ThreadState)],
    ) -> Decision {
        self.refresh(pid, snap, states);
        let Some(acct) = self.accounts.get(&pid) else { return Decision::Allow };
        let (growth, missable) = self.exact_growth(req, snap);
        let usage = acct.bound;
        if self.mode == Mode::Enforce {
            if let Some(limit) = self.process_limit(acct) {
                if usage.saturating_add(growth) > limit {
                    return self.deny(pid, Scope::Process, usage, growth, limit);
                }
            }
            if let Some(total) = self.limits.total {
                if self.total_bound.saturating_add(growth) > total {
                    let total_usage = self.total_bound;
                    return self.deny(pid, Scope::Total, total_usage, growth, total);
                }
            }
        }
        let page = self.page;
        let acct = self.accounts.get_mut(&pid).expect("refreshed above");
        Self::track(acct, req, page, tid, key, growth, missable);
        acct.measured = acct.measured.max(acct.last_exact + growth);
        self.total_bound += growth;
        Decision::Allow
    }

    fn deny(&mut self, pid: Pid, scope: Scope, usage: u64, request: u64, limit: u64) -> Decision {
        if let Some(a) = self.accounts.get_mut(&pid) {
            a.denials += 1;
        }
        Decision::Deny { scope, usage, request, limit }
    }

    /// The process is gone: its heap is given back.
    pub fn exit(&mut self, pid: Pid) -> Option<Summary> {
        let acct = self.accounts.remove(&pid)?;
        self.total_bound -= acct.bound;
        let limit = self.process_limit(&acct);
        Some(Summary { pid, command: acct.command, heap: 0, peak: acct.peak, denials: acct.denials, limit })
    }

    /// Figures of every live process.
    pub fn summaries(&self) -> Vec<Summary> {
        let mut v: Vec<Summary> = self
            .accounts
            .iter()
            .map(|(&pid, a)| Summary {
                pid,
                command: a.command.clone(),
                heap: a.bound,
                peak: a.peak,
                denials: a.denials,
                limit: self.process_limit(a),
            })
            .collect();
        v.sort_by_key(|s| s.pid);
        v
    }
}

#[cfg(test)]
mod tests;
