//! The accounting: per-process upper bounds, quotas, and decisions.
//!
//! For each process (thread group) the ledger keeps `bound`, an upper bound of its counted heap:
//! the last figure read from `/proc` plus every growth let through since. A request is let
//! through at once while `bound + growth` stays within the quota (and within the peak mark, so
//! peaks are measured) by [`Ledger::fast`]; otherwise the caller reads a figure and hands it to
//! [`Ledger::decide`]. Frees are never intercepted: they show up in the next figure. Every path
//! holds a request against the quotas in one place ([`Ledger::check`]).
//!
//! The caller reads `/proc` *without* holding the ledger: it takes a [`Token`] first, reads, and
//! hands the figure back with it. What can make a figure too low is tracked:
//! - growth let through that is still in flight on another thread when the maps are read (the
//!   thread was woken but has not mapped yet). Each such growth is *pending* until the thread is
//!   seen to have moved on: it sent another notification, it sleeps in a different call, it is
//!   gone. Pending bytes are added to every figure, up to the bound held before it (which counts
//!   them already, so growth that has landed is not counted twice); growth let through after the
//!   token is never retired by it, whatever the thread states say.
//! - `mremap` that moves memory while the maps are being read can hide it from the read, so a
//!   moving `mremap` stays pending for its full new size.
//! - a figure read across an exec, or of a pid that another process took meanwhile, is refused
//!   as [`Verdict::Stale`].
//!
//! `brk` is charged from the last known program break, which an `execve` replaces. An exec in
//! flight forces `brk` onto the exact path until the exec'ing thread is seen again or is gone.
//!
//! Two kinds of process are held differently:
//! - *runtime* accounts ([`Ledger::admit`] with `runtime`): a container runtime's own code before
//!   it execs the container's program. Observed, never denied, left out of the total; at the
//!   exec the account starts afresh as the program's.
//! - *blind* accounts: the mappings cannot be read (a process that is not dumpable, seen by a
//!   supervisor without ptrace rights over it). Figures come from `statm` (never below the
//!   counted heap) or, failing that, from the notifications alone, so the bound only tightens
//!   when `statm` can be read; a request is decided on it, never on a figure that is not there.

mod account;
mod terms;

use std::collections::HashMap;

use rustc_hash::FxBuildHasher;

use crate::syscall::{page_up, Request};

pub use account::Account;
use account::Pending;
pub use terms::{
    CallKey, Counting, Deny, Figure, Limits, Mode, NameError, Need, Pid, Scope, Snapshot, Step, Summary, ThreadState,
    Tid, Token, Verdict,
};

/// Every process under one set of quotas (a `heapcap run` tree, or one container).
#[derive(Debug)]
pub struct Ledger {
    limits: Limits,
    mode: Mode,
    counting: Counting,
    page: u64,
    /// By pid (the kernel's numbers: a fast hash will do; it is read several times a decision).
    accounts: HashMap<Pid, Account, FxBuildHasher>,
    /// Upper bound of all non-runtime accounts' counted heap together.
    total_bound: u64,
    /// Counts growth let through ([`Token::seq`]).
    seq: u64,
    /// Hands out [`Account`] images.
    images: u64,
}

impl Ledger {
    pub fn new(limits: Limits, mode: Mode, page: u64) -> Ledger {
        assert!(page.is_power_of_two(), "page size must be a power of two");
        Ledger {
            limits,
            mode,
            counting: Counting::Heap,
            page,
            accounts: HashMap::default(),
            total_bound: 0,
            seq: 0,
            images: 0,
        }
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

    pub fn counting(&self) -> Counting {
        self.counting
    }

    /// What is counted from now on. Strict figures come from the mappings alone: `statm` is no
    /// upper figure of shared memory, so every [`Need`] is [`Need::Exact`] and upper figures
    /// handed back are taken as [`Figure::Unread`].
    pub fn set_counting(&mut self, counting: Counting) {
        self.counting = counting;
    }

    /// The figure to read for `need` under this ledger's counting.
    pub fn need(&self, need: Need) -> Need {
        match self.counting {
            Counting::Heap => need,
            Counting::Strict => Need::Exact,
        }
    }

    /// A figure as this ledger's counting can use it.
    fn usable<'f>(&self, figure: Figure<'f>) -> Figure<'f> {
        match (self.counting, figure) {
            (Counting::Strict, Figure::Upper(_) | Figure::Image { .. } | Figure::UpperOnly(_)) => Figure::Unread,
            (_, f) => f,
        }
    }

    /// Upper bound of all (non-runtime) processes' counted heap together.
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

    fn next_image(&mut self) -> u64 {
        self.images += 1;
        self.images
    }

    /// Start accounting a process first seen now, measured as `baseline`: the mappings; `statm`
    /// ([`Figure::Upper`]: cheap, an upper figure until an exact read); or, for a process whose
    /// mappings cannot be read, `statm` for good ([`Figure::UpperOnly`], a blind account).
    /// `runtime`: the process is the container runtime's own code, before the program's exec.
    /// Returns false (nothing opened) for a figure that is no baseline ([`Figure::Unread`]).
    pub fn admit(&mut self, pid: Pid, command: String, baseline: Figure<'_>, runtime: bool) -> bool {
        let (counted, brk, blind, offset) = match baseline {
            Figure::Exact(snap) => {
                let counted = snap.maps.counted_as(self.counting);
                (counted, snap.brk(self.page), false, snap.upper.map(|u| u.saturating_sub(counted)))
            }
            Figure::Upper(upper) => (upper, None, false, None),
            Figure::Image { upper, start_brk } => {
                (upper, start_brk.filter(|b| *b != 0).and_then(|b| page_up(b, self.page)), false, None)
            }
            Figure::UpperOnly(upper) => (upper, None, true, None),
            Figure::Unread => return false,
        };
        let image = self.next_image();
        let mut acct = Account::new(command, image, counted, brk);
        acct.runtime = runtime;
        acct.blind = blind;
        acct.offset = offset;
        self.close(pid);
        if !runtime {
            self.total_bound += counted;
        }
        self.accounts.insert(pid, acct);
        true
    }

    /// What a figure of `pid` read from now on must be handed back with.
    pub fn token(&self, pid: Pid) -> Option<Token> {
        self.accounts.get(&pid).map(|a| Token { image: a.image, seq: self.seq })
    }

    pub fn set_command(&mut self, pid: Pid, command: String) {
        if let Some(a) = self.accounts.get_mut(&pid) {
            a.command = command;
        }
    }

    /// The process's mappings cannot be read: decide from `statm` and the notifications.
    pub fn set_blind(&mut self, pid: Pid) {
        if let Some(a) = self.accounts.get_mut(&pid) {
            a.blind = true;
        }
    }

    /// A notification from `tid` arrived: its earlier calls are done. Returns true when this
    /// settles an exec (the caller should then measure afresh and refresh the command name).
    pub fn thread_seen(&mut self, pid: Pid, tid: Tid) -> bool {
        let Some(acct) = self.accounts.get_mut(&pid) else { return false };
        acct.pending.retain(|p| p.tid != tid);
        if acct.exec_by == Some(tid) {
            self.exec_settled(pid);
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
        self.exec_settled(pid);
    }

    /// A new image: its figures start afresh at the next read, where a runtime's account becomes
    /// the program's (held to the quotas, part of the total).
    fn exec_settled(&mut self, pid: Pid) {
        let image = self.next_image();
        let Some(a) = self.accounts.get_mut(&pid) else { return };
        a.exec_by = None;
        a.brk = None;
        a.new_image = true;
        a.image = image;
    }

    /// Threads of `pid` other than `tid` with growth in flight: read their state before a figure.
    pub fn pending_threads(&self, pid: Pid, tid: Tid) -> Vec<Tid> {
        self.accounts.get(&pid).map(|a| a.pending_threads(tid, 0)).unwrap_or_default()
    }

    /// The threads whose state to read before a figure of `pid` for `req` of thread `tid`
    /// ([`Ledger::refresh`]: each seen to have moved past its call settles its growth). Where a
    /// quota is in question, every thread with growth in flight: the decision may turn on them.
    /// Elsewhere they only sharpen the peak, and the threads with the least growth in flight
    /// are left out, up to the peak's own precision (the larger of 1 MiB and 1/16 of the heap)
    /// in all, their growth counted as still in flight: else a process of many threads would
    /// have one file read per thread at each look (64 threads calling at once: about 2 reads a
    /// decision, 40% of the listener's time).
    pub fn threads_to_ask(&self, pid: Pid, tid: Tid, req: &Request) -> Vec<Tid> {
        let Some(acct) = self.accounts.get(&pid) else { return Vec::new() };
        let decisive = self.upper_growth(acct, req).is_none_or(|g| self.check_account(acct, Some(g)).is_err());
        acct.pending_threads(tid, if decisive { 0 } else { acct.peak_precision() })
    }

    /// Processes (other than `except`) whose bound may be above their counted heap: worth
    /// refreshing when the total quota is in question.
    pub fn stale(&self, except: Pid) -> Vec<Pid> {
        self.accounts
            .iter()
            .filter(|(p, a)| **p != except && !a.runtime && (a.bound > a.last_exact || !a.pending.is_empty()))
            .map(|(p, _)| *p)
            .collect()
    }

    /// What `req` can add to the counted heap, from the account alone. `None`: unknown without
    /// the mappings (a `brk` whose base is not known, or while an exec is in flight).
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

    /// What `req` adds, from the mappings. `None`: a `brk` whose base the snapshot does not show.
    fn exact_growth(&self, req: &Request, snap: &Snapshot) -> Option<u64> {
        Some(match *req {
            Request::Brk { addr } => page_up(addr, self.page)?.saturating_sub(snap.brk(self.page)?),
            Request::Map { addr, len, fixed: true } => {
                len - snap.maps.counted_in_as(self.counting, addr, addr.saturating_add(len))
            }
            Request::Map { len, .. } => len,
            Request::Remap { old_addr, .. }
                if !snap.maps.containing(old_addr).is_some_and(|v| v.counts(self.counting)) =>
            {
                0 // a mapping that does not count
            }
            Request::Remap { old_len, new_len, dontunmap, .. } if dontunmap || old_len == 0 => new_len,
            Request::Remap { old_len, new_len, .. } => new_len.saturating_sub(old_len),
            Request::Protect { addr, len } => {
                snap.maps.protect_growth_as(self.counting, addr, addr.saturating_add(len))
            }
        })
    }

    /// The bytes a concurrent read could miss once `req` is let through with `growth`.
    fn missable(req: &Request, growth: u64) -> u64 {
        match *req {
            Request::Remap { moves: true, new_len, .. } => growth.max(new_len),
            _ => growth,
        }
    }

    /// Hold `growth` for `pid` against every quota that applies: the one place a request is
    /// checked. Audit mode and runtime accounts are never held.
    pub fn check(&self, pid: Pid, growth: u64) -> Result<(), Deny> {
        let Some(acct) = self.accounts.get(&pid) else { return Ok(()) };
        self.check_account(acct, Some(growth))
    }

    /// [`Ledger::check`] for an account; `growth` `None`: unknown, so any quota refuses it.
    fn check_account(&self, acct: &Account, growth: Option<u64>) -> Result<(), Deny> {
        if self.mode == Mode::Audit || acct.runtime {
            return Ok(());
        }
        let over = |usage: u64, limit: u64| growth.is_none_or(|g| usage.saturating_add(g) > limit);
        if let Some(limit) = self.process_limit(acct) {
            if over(acct.bound, limit) {
                return Err(Deny { scope: Scope::Process, usage: acct.bound, request: growth, limit });
            }
        }
        if let Some(limit) = self.limits.total {
            if over(self.total_bound, limit) {
                return Err(Deny { scope: Scope::Total, usage: self.total_bound, request: growth, limit });
            }
        }
        Ok(())
    }

    /// Charge growth let through.
    fn track(&mut self, pid: Pid, tid: Tid, req: &Request, key: CallKey, growth: u64) {
        self.seq += 1;
        let (seq, page) = (self.seq, self.page);
        let Some(acct) = self.accounts.get_mut(&pid) else { return };
        if let Request::Brk { addr } = *req {
            acct.brk = page_up(addr, page);
            acct.brk_seq = seq;
        }
        acct.bound += growth;
        acct.estimate += growth;
        acct.note_peak();
        let missable = Self::missable(req, growth);
        if missable > 0 {
            acct.pending.push(Pending { tid, bytes: missable, key, seq });
        }
        if !acct.runtime {
            self.total_bound += growth;
        }
    }

    fn deny(&mut self, pid: Pid, deny: Deny) -> Verdict {
        if let Some(a) = self.accounts.get_mut(&pid) {
            a.denials += 1;
        }
        Verdict::Deny(deny)
    }

    /// The fast path: decide from the bound alone, or say which figure to read.
    pub fn fast(&mut self, pid: Pid, tid: Tid, req: &Request, key: CallKey) -> Step {
        let Some(acct) = self.accounts.get(&pid) else {
            return Step::Measure { need: Need::Exact, refresh_others: false };
        };
        let Some(growth) = self.upper_growth(acct, req) else {
            // A break not known yet (a process admitted without `stat`, which most never need)
            // is where the image's break starts, or above it: `statm` and `stat` tell enough.
            // (A blind process's `stat` hides it too: its refusal says what could not be read.)
            let brk_base =
                matches!(req, Request::Brk { .. }) && acct.exec_by.is_none() && acct.brk.is_none() && !acct.blind;
            let need = if acct.new_image || brk_base { Need::Image } else { Need::Exact };
            return Step::Measure { need: self.need(need), refresh_others: false };
        };
        if acct.new_image {
            // The first call of a new image: its statm and start_brk.
            return Step::Measure { need: self.need(Need::Image), refresh_others: false };
        }
        if let Err(deny) = self.check_account(acct, Some(growth)) {
            // A quota is in question: statm may show that the request fits even so.
            return Step::Measure { need: self.need(Need::Upper), refresh_others: deny.scope == Scope::Total };
        }
        if !acct.blind && acct.estimate.saturating_add(growth) > acct.peak_mark() {
            // Perhaps a new peak: statm tells (through its offset) whether the heap really grew.
            return Step::Measure { need: self.need(Need::Upper), refresh_others: false };
        }
        self.track(pid, tid, req, key, growth);
        Step::Allow
    }

    /// Bring `pid`'s bound to `figure` (`states`: its threads with growth in flight, read before
    /// the figure; `token`: taken before both). Returns false, changing nothing, when the figure
    /// is stale (the process the token named has exec'd, or is gone).
    ///
    /// `states` must be read *before* the figure: a thread seen past its allowed call finished
    /// it before the figure was read. Read after, a growth landing between the two reads would
    /// be in neither.
    pub fn refresh(&mut self, pid: Pid, figure: Figure<'_>, states: &[(Tid, ThreadState)], token: Token) -> bool {
        let (page, counting) = (self.page, self.counting);
        let figure = self.usable(figure);
        let Some(acct) = self.accounts.get_mut(&pid).filter(|a| a.image == token.image) else { return false };
        acct.retire(states, token);
        // The bound counts every growth not settled by `states`; the estimate only what the
        // figure cannot have seen (let through after the token). Growth let through before it
        // and still unsettled (its thread running: landed or not, nothing tells) may be in the
        // figure already: in the estimate, it would keep it past the peak mark however often the
        // figure is read (a crowd of threads measured at every call). The peak adds it.
        let in_flight = acct.in_flight();
        let since = acct.in_flight_since(token.seq);
        if !matches!(figure, Figure::Unread) {
            acct.unresolved = in_flight.saturating_sub(since);
        }
        // A figure of a new image (any but a tentative upper one) makes a runtime's account the
        // program's.
        let joins = acct.runtime && acct.new_image && !matches!(figure, Figure::Upper(_));
        // A figure read after an exec is the new image's: its figures start afresh from it (the
        // old image's bound says nothing about it: its loader maps bss without any call).
        let fresh = acct.new_image && !matches!(figure, Figure::Unread);
        if fresh {
            acct.new_image = false;
            acct.peak = 0;
            acct.offset = None;
        }
        let (bound, estimate) = match figure {
            Figure::Exact(snap) => {
                let counted = snap.maps.counted_as(counting);
                acct.last_exact = counted;
                acct.measured = if fresh { counted } else { acct.measured.max(counted) };
                if let Some(upper) = snap.upper {
                    acct.offset = Some(upper.saturating_sub(counted));
                }
                // A break moved by a call let through after the token is newer than the snapshot's.
                if acct.exec_by.is_none() && acct.brk_seq <= token.seq {
                    acct.brk = snap.brk(page);
                }
                // Growth in flight may be in the figure already: added again, it would put the
                // bound (and the peak, and a denial's "heap") past what the process can hold.
                // The bound held until now covers every growth let through, so the new one is
                // no higher, unless the read shows more than it: memory no call asked for, and
                // then only the read is trusted.
                let read = counted.saturating_add(in_flight);
                let bound = match fresh || counted > acct.bound {
                    true => read,
                    false => read.min(acct.bound),
                };
                (bound, counted.saturating_add(since))
            }
            Figure::Upper(upper) | Figure::UpperOnly(upper) | Figure::Image { upper, .. } => {
                let usage = upper.saturating_add(in_flight);
                let heap = upper.saturating_sub(acct.offset.unwrap_or(0)).saturating_add(since);
                if let Figure::Image { start_brk, .. } = figure {
                    if acct.exec_by.is_none() && acct.brk_seq <= token.seq {
                        acct.brk = start_brk.filter(|b| *b != 0).and_then(|b| page_up(b, page));
                    }
                }
                if fresh || acct.blind {
                    // Nothing better will come for a blind process; a new image starts from it.
                    acct.measured = if fresh { heap } else { acct.measured.max(heap) };
                }
                if fresh {
                    (usage, heap)
                } else {
                    (acct.bound.min(usage), acct.estimate.min(heap))
                }
            }
            Figure::Unread => (acct.bound, acct.estimate),
        };
        if joins {
            acct.runtime = false;
            self.total_bound += bound;
        } else if !acct.runtime {
            self.total_bound = self.total_bound - acct.bound + bound;
        }
        acct.bound = bound;
        acct.estimate = estimate.min(bound);
        acct.note_peak();
        true
    }

    /// Decide `req` of thread `tid` from a figure of its process, read after [`Ledger::fast`]
    /// asked for one (`states` and `token` as for [`Ledger::refresh`]).
    ///
    /// An [`Figure::Upper`] figure only lets through what fits even so, and not past a peak to be
    /// measured: otherwise [`Verdict::MeasureExact`]. The exact figure, [`Figure::UpperOnly`] and
    /// [`Figure::Unread`] are final: a request whose growth they cannot tell (a `brk` with no
    /// known base) is refused wherever a quota applies, and let through uncharged where none does.
    #[allow(clippy::too_many_arguments)] // the request, its figure, and what the figure was read with
    pub fn decide(
        &mut self,
        pid: Pid,
        tid: Tid,
        req: &Request,
        key: CallKey,
        figure: Figure<'_>,
        states: &[(Tid, ThreadState)],
        token: Token,
    ) -> Verdict {
        if !self.refresh(pid, figure, states, token) {
            return Verdict::Stale;
        }
        let figure = self.usable(figure);
        let acct = &self.accounts[&pid];
        // Upper figures settle what fits even so; the rest needs the mappings.
        let tentative = matches!(figure, Figure::Upper(_) | Figure::Image { .. }) && !acct.blind;
        let growth = match figure {
            Figure::Exact(snap) => self.exact_growth(req, snap),
            _ => self.upper_growth(acct, req),
        };
        let Some(growth) = growth else {
            if tentative {
                return Verdict::MeasureExact;
            }
            return match self.check_account(acct, None) {
                Ok(()) => Verdict::Allow,
                Err(deny) => self.deny(pid, deny),
            };
        };
        if let Err(deny) = self.check_account(acct, Some(growth)) {
            return if tentative { Verdict::MeasureExact } else { self.deny(pid, deny) };
        }
        if tentative && acct.estimate.saturating_add(growth) > acct.peak_mark() {
            return Verdict::MeasureExact; // the heap really grows past its mark: a new peak to measure
        }
        let last_exact = acct.last_exact;
        self.track(pid, tid, req, key, growth);
        if let Figure::Exact(_) = figure {
            let acct = self.accounts.get_mut(&pid).expect("refreshed above");
            acct.measured = acct.measured.max(last_exact + growth);
        }
        Verdict::Allow
    }

    /// Close `pid`'s account, if any.
    fn close(&mut self, pid: Pid) -> Option<Account> {
        let acct = self.accounts.remove(&pid)?;
        if !acct.runtime {
            self.total_bound -= acct.bound;
        }
        Some(acct)
    }

    /// The process is gone: its heap is given back.
    pub fn exit(&mut self, pid: Pid) -> Option<Summary> {
        let acct = self.close(pid)?;
        Some(Summary { pid, heap: 0, ..self.summary(pid, &acct) })
    }

    fn summary(&self, pid: Pid, a: &Account) -> Summary {
        Summary {
            pid,
            command: a.command.clone(),
            heap: a.estimate,
            peak: a.peak,
            denials: a.denials,
            limit: self.process_limit(a),
            runtime: a.runtime,
            blind: a.blind,
        }
    }

    /// Figures of every live process.
    pub fn summaries(&self) -> Vec<Summary> {
        let mut v: Vec<Summary> = self.accounts.iter().map(|(&pid, a)| self.summary(pid, a)).collect();
        v.sort_by_key(|s| s.pid);
        v
    }
}

#[cfg(test)]
mod tests;
