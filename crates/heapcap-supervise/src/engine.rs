//! The decision engine: notification -> decision -> answer, in one place.
//!
//! For each notification of one listener:
//! 1. decode the call (and, for i386's old `mmap`, read its arguments from the caller, only
//!    when nothing but the caller can change them; for `shmat` in strict mode, the segment's
//!    size);
//! 2. learn the caller's account (remembered per thread, with a thread pidfd): its process's,
//!    or that of a process whose address space it shares (`kcmp(KCMP_VM)`);
//! 3. open an account for a process seen for the first time (its mappings, or `statm` when they
//!    are not readable);
//! 4. note what the call tells about the process's threads (an exec settling, growth landed);
//! 5. let it through on the fast path when the bound says it fits, or read a figure and decide
//!    on it ([`heapcap_policy::ledger`]).
//!
//! Every read of `/proc` is open, check the notification, read ([`checked`]), and happens with
//! no lock held; the ledger is locked only to decide. A notification is dropped unanswered only
//! when the kernel says it is no longer pending: every other failure is answered, with a denial
//! that says what could not be read (or, in audit mode and where no quota applies, by letting
//! the call through).

use std::time::SystemTime;

use heapcap_linux::notify::Notification;
use heapcap_linux::procfs::ProcError;
use heapcap_policy::ledger::{
    CallKey, Counting, Deny, Figure, Mode, Need, Scope, Snapshot, Step, ThreadState, Verdict,
};
use heapcap_policy::syscall::{MemCall, Request};

use crate::notifier::Notifier;
use crate::procview::{checked, Baseline, Checked, Kept, ProcView, Reading, Want};
use crate::supervisor::Supervisor;
use crate::threads::Threads;
use heapcap_policy::denial::Denial;

mod machine;

/// What a notification needs answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Allow,
    /// Refused (boxed: denials are rare, and decisions pass answers around).
    Deny(Box<Denial>),
    /// The call is no longer pending (its caller left or died): nothing to answer.
    Drop,
    /// heapcap carried the call out itself (`sysinfo`): answer with this.
    Reply(crate::notifier::Reply),
}

/// Why a read gave nothing.
#[derive(Debug)]
enum Miss {
    /// The notification is no longer pending.
    Dead,
    Failed(ProcError),
}

/// A figure read, owned.
#[derive(Debug)]
enum Read {
    Exact(Snapshot),
    Upper(u64),
    Image { upper: u64, start_brk: Option<u64> },
    UpperOnly(u64),
    Unread,
}

impl Read {
    fn figure(&self) -> Figure<'_> {
        match self {
            Read::Exact(s) => Figure::Exact(s),
            Read::Upper(u) => Figure::Upper(*u),
            Read::Image { upper, start_brk } => Figure::Image { upper: *upper, start_brk: *start_brk },
            Read::UpperOnly(u) => Figure::UpperOnly(*u),
            Read::Unread => Figure::Unread,
        }
    }
}

/// How many times a figure is read again when an exec or a pid reuse made it stale.
const STALE_RETRIES: usize = 3;

/// The engine of one listener.
pub struct Engine<'s, P: ProcView> {
    sup: &'s Supervisor<P>,
    threads: Threads<P::Task>,
    /// Processes of this listener are still the container runtime's own code: the listener was
    /// made before the runtime exec'd the container's program, which it has not yet done.
    runtime: bool,
}

impl<P: ProcView> std::fmt::Debug for Engine<'_, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("runtime", &self.runtime).finish_non_exhaustive()
    }
}

fn pick<T>(reading: Reading<T>, want: Want) -> Result<Reading<T>, Miss> {
    let fits = matches!(
        (&reading, want),
        (Reading::Thread { .. }, Want::Thread)
            | (Reading::Admission { .. }, Want::Admission { .. })
            | (Reading::Maps(_), Want::Maps { .. })
            | (Reading::Upper(_), Want::Upper)
            | (Reading::Memory(_), Want::Memory { .. })
            | (Reading::Command(_), Want::Command)
            | (Reading::Alone(_), Want::Alone { .. })
            | (Reading::Segment(_), Want::Segment { .. })
    );
    if fits {
        Ok(reading)
    } else {
        Err(Miss::Failed(ProcError::Format {
            path: "/proc view".into(),
            text: format!("{want:?} read as something else"),
        }))
    }
}

impl<'s, P: ProcView> Engine<'s, P> {
    /// The engine for one listener of `sup`'s container. `runtime`: the listener was made for a
    /// process that has not yet exec'd the container's program (a runtime's init, `heapcap
    /// run`'s child before its exec): its processes are observed, never denied, until then.
    pub fn new(sup: &'s Supervisor<P>, runtime: bool) -> Engine<'s, P> {
        Engine { sup, threads: Threads::default(), runtime }
    }

    /// Thread `tid`, a caller of this listener, has just exited (see [`Threads::just_exited`]).
    pub(crate) fn just_exited(&mut self, tid: u32) -> bool {
        self.threads.just_exited(tid)
    }

    /// Read `want` of `pid` for notification `n`: open, check it is still pending, read.
    fn read<N: Notifier>(&self, l: &N, n: &Notification, pid: u32, want: Want) -> Result<Reading<P::Task>, Miss> {
        match checked(&self.sup.proc, pid, want, || l.id_valid(n.id)) {
            Checked::Read(r) => pick(r, want),
            Checked::Dead => Err(Miss::Dead),
            Checked::Failed(e) => Err(Miss::Failed(e)),
        }
    }

    /// Decide notification `n` of listener `l`.
    pub fn decide<N: Notifier>(&mut self, l: &N, n: &Notification) -> Answer {
        let Some(call) = MemCall::decode(n.arch, n.nr, n.args) else { return Answer::Allow };
        let key = CallKey { nr: i64::from(n.nr), args: n.args };
        let call = match call {
            MemCall::OldMmap { args_ptr } => match self.old_mmap_args(l, n, args_ptr, call) {
                Ok(call) => call,
                Err(answer) => return answer,
            },
            MemCall::Shmat { shmid, addr, flags } => match self.shmat(l, n, shmid, addr, flags, call) {
                Ok(call) => call,
                Err(answer) => return answer,
            },
            c => c,
        };
        let (pid, shared) = match self.process_of(l, n, call) {
            Ok(found) => found,
            Err(answer) => return answer,
        };
        if shared && call == MemCall::Exec {
            // It leaves the address space it shared: its next call is learnt afresh.
            self.threads.forget(n.pid);
            return Answer::Allow;
        }
        if call.grows_by_itself() && self.sup.accounts.lock().ledger.counting() == Counting::Strict {
            let reason = "a MAP_GROWSDOWN mapping grows at each page touched below it, with no call to refuse; \
                          strict mode does not let one be made"
                .to_string();
            return self.refuse(l, n, Some(pid), call, reason);
        }
        // Note what this call tells (the thread's earlier calls are done, an exec may have
        // settled) and, on the common path, decide it: one short hold of the lock.
        let (mut settled, exec_thread, step, req) = {
            let mut g = self.sup.accounts.lock();
            if !g.ledger.contains(pid) && call == MemCall::Exec {
                // A process's first call is its exec (a fork, a vfork or posix_spawn child): its
                // account opens at its first growth, on the new image's figures. If it is the
                // runtime's, what it execs is the container's program.
                drop(g);
                self.runtime = false;
                return Answer::Allow;
            }
            if !g.ledger.contains(pid) {
                drop(g);
                if let Err(answer) = self.admit(l, n, pid, call) {
                    return answer;
                }
                g = self.sup.accounts.lock();
            }
            let req = call.request_as(self.sup.page, g.ledger.counting());
            let settled = g.ledger.thread_seen(pid, n.pid);
            let exec_thread = g.ledger.exec_thread(pid).filter(|t| *t != n.pid);
            let step = match req {
                Some(req) if !settled && exec_thread.is_none() => Some(g.ledger.fast(pid, n.pid, &req, key)),
                _ => None,
            };
            (settled, exec_thread, step, req)
        };
        if step == Some(Step::Allow) {
            self.sup.stats.fast.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Answer::Allow;
        }
        if let Some(t) = exec_thread {
            if !self.threads.alive(t) {
                self.sup.accounts.lock().ledger.exec_thread_gone(pid);
                settled = true;
            }
        }
        if settled {
            // Processes that shared the old address space keep it: learnt again, on their own.
            self.threads.forget_sharers(pid);
            // A new image: the maps kept are the old one's, and its name is new (read now where
            // it is kept after the process ends, else when first needed).
            let task = self.sup.accounts.lock().task(pid);
            if let Some(k) = task.as_deref().and_then(|t| t.kept()) {
                k.new_image();
            }
            let command = match self.sup.accounts.wants_commands() {
                true => match self.read(l, n, pid, Want::Command) {
                    Ok(Reading::Command(command)) => command,
                    _ => String::new(),
                },
                false => String::new(),
            };
            self.sup.accounts.lock().ledger.set_command(pid, command);
        }
        if call == MemCall::Exec {
            let mut g = self.sup.accounts.lock();
            g.ledger.exec_started(pid, n.pid);
            if g.ledger.account(pid).is_some_and(|a| a.runtime) {
                // The runtime execs the container's program: whatever this listener sees from
                // now on is the container's.
                self.runtime = false;
            }
            return Answer::Allow;
        }
        if let MemCall::Sysinfo { buf } = call {
            return self.sysinfo(l, n, pid, buf);
        }
        let Some(req) = req else { return Answer::Allow };
        let step = match step {
            Some(step) => step,
            None if settled => {
                Step::Measure { need: self.sup.accounts.lock().ledger.need(Need::Image), refresh_others: false }
            }
            None => self.sup.accounts.lock().ledger.fast(pid, n.pid, &req, key),
        };
        let need = match step {
            Step::Allow => {
                self.sup.stats.fast.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Answer::Allow;
            }
            Step::Measure { need, refresh_others } => {
                if refresh_others {
                    // The total is in question: processes that have ended leave it first.
                    self.sup.reap_exits();
                    let stale = self.sup.accounts.lock().ledger.stale(pid);
                    self.sup.refresh(&stale);
                }
                need
            }
        };
        self.sup.stats.exact.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.measure_and_decide(l, n, pid, &req, key, need)
    }

    /// i386 `old_mmap`'s arguments, read from the caller's memory, when nothing but the caller
    /// can change them before the kernel reads them again: else the call is refused where a
    /// quota applies (a second thread could rewrite them between the two reads).
    fn old_mmap_args<N: Notifier>(
        &self,
        l: &N,
        n: &Notification,
        args_ptr: u64,
        call: MemCall,
    ) -> Result<MemCall, Answer> {
        match self.read(l, n, n.pid, Want::Alone { addr: args_ptr, len: 24 }) {
            Ok(Reading::Alone(None)) => {}
            Ok(Reading::Alone(Some(why))) => {
                let reason = format!("the arguments of old_mmap can change after heapcap reads them: {why}");
                return Err(self.refuse(l, n, None, call, reason));
            }
            Ok(_) | Err(Miss::Dead) => return Err(Answer::Drop),
            Err(Miss::Failed(e)) => {
                let what = format!("whether the arguments of old_mmap can change: {}", chain(&e));
                return Err(self.unreadable(l, n, None, call, what));
            }
        }
        match self.read(l, n, n.pid, Want::Memory { addr: args_ptr, len: 24 }) {
            Ok(Reading::Memory(raw)) => {
                let mut words = [0u32; 6];
                for (w, c) in words.iter_mut().zip(raw.chunks_exact(4)) {
                    *w = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
                }
                Ok(MemCall::from_old_mmap_args(words))
            }
            Ok(_) | Err(Miss::Dead) => Err(Answer::Drop),
            Err(Miss::Failed(e)) => {
                Err(self.unreadable(l, n, None, call, format!("the arguments of old_mmap: {}", chain(&e))))
            }
        }
    }

    /// A `shmat` as the mapping it makes. Only strict mode counts it, and then by the size of
    /// the segment (which never changes); a segment that does not exist fails in the kernel.
    fn shmat<N: Notifier>(
        &self,
        l: &N,
        n: &Notification,
        shmid: u64,
        addr: u64,
        flags: u64,
        call: MemCall,
    ) -> Result<MemCall, Answer> {
        if self.sup.accounts.lock().ledger.counting() != Counting::Strict {
            return Err(Answer::Allow);
        }
        match self.read(l, n, n.pid, Want::Segment { shmid }) {
            Ok(Reading::Segment(Some(size))) => Ok(MemCall::from_shmat(addr, flags, size)),
            Ok(Reading::Segment(None)) => Err(Answer::Allow),
            Ok(_) | Err(Miss::Dead) => Err(Answer::Drop),
            Err(Miss::Failed(e)) => {
                Err(self.unreadable(l, n, None, call, format!("the size of SysV segment {shmid}: {}", chain(&e))))
            }
        }
    }

    /// The caller's account, learnt once per thread: its process's, or (`true`) the account of
    /// another process whose address space it shares. Learnt afresh, an account left under its
    /// pid by an earlier process is replaced.
    fn process_of<N: Notifier>(&mut self, l: &N, n: &Notification, call: MemCall) -> Result<(u32, bool), Answer> {
        if let Some((pid, shared)) = self.threads.lookup(n.pid) {
            // A remembered thread is alive, so its process is the one accounted (if any).
            if !shared {
                return Ok((pid, false));
            }
            // Sharing another process's account: while that process lives.
            if self.sup.accounts.lock().task(pid).is_some_and(|t| !t.exited()) {
                return Ok((pid, true));
            }
            self.threads.forget(n.pid);
        }
        let (pid, handle) = match self.read(l, n, n.pid, Want::Thread) {
            Ok(Reading::Thread { tgid, handle }) => (tgid, handle),
            Ok(_) | Err(Miss::Dead) => return Err(Answer::Drop),
            Err(Miss::Failed(e)) => {
                return Err(self.unreadable(
                    l,
                    n,
                    None,
                    call,
                    format!("which process thread {} is in: {}", n.pid, chain(&e)),
                ))
            }
        };
        // First seen from this thread: the account under that pid may be an earlier process's.
        let task = self.sup.accounts.lock().task(pid);
        if task.as_ref().is_some_and(|t| !t.exited()) {
            self.threads.insert(n.pid, pid, false, handle);
            return Ok((pid, false));
        }
        if call == MemCall::Exec && task.is_none() {
            // Nothing to measure before an exec: the account opens at the new image's growth.
            self.threads.insert(n.pid, pid, false, handle);
            return Ok((pid, false));
        }
        // A first call that is an execve leaves whatever address space it shared: no need to ask
        // (fork or vfork, then exec, the commonest start of a process, pays nothing for this).
        if call != MemCall::Exec {
            if let Some(owner) = self.sharing(l, n, pid) {
                self.threads.insert(n.pid, owner, true, handle);
                return Ok((owner, true));
            }
        }
        self.threads.insert(n.pid, pid, false, handle);
        self.admit(l, n, pid, call).map(|()| (pid, false))
    }

    /// A live account whose process shares the address space of `pid` (which has none): two
    /// processes in one address space are one account, in every mode. Asked with
    /// `kcmp(KCMP_VM)` of each account (a process is seen for the first time only once), then
    /// checked: the caller's call still pending (so `pid` is still its process) and the
    /// account's process not exited (so its pid was not reused).
    fn sharing<N: Notifier>(&self, l: &N, n: &Notification, pid: u32) -> Option<u32> {
        let candidates: Vec<(u32, std::sync::Arc<dyn crate::procview::Task>)> = {
            let g = self.sup.accounts.lock();
            g.ledger.pids().filter(|p| *p != pid).filter_map(|p| Some((p, g.task(p)?))).collect()
        };
        candidates.into_iter().find_map(|(other, task)| {
            let same = !task.exited() && self.sup.proc.same_vm(pid, other).unwrap_or(false);
            (same && l.id_valid(n.id) && !task.exited()).then_some(other)
        })
    }

    /// Open an account for `pid`, measured now (`statm`, or its mappings where the view reads
    /// them at once). Its command line is read now only where it is kept after the process ends
    /// (a final report, audit peaks); else when first needed.
    fn admit<N: Notifier>(&mut self, l: &N, n: &Notification, pid: u32, call: MemCall) -> Result<(), Answer> {
        let command = self.sup.accounts.wants_commands();
        match self.read(l, n, pid, Want::Admission { command }) {
            Ok(Reading::Admission { task, command, figure }) => {
                let strict = self.sup.accounts.lock().ledger.counting() == Counting::Strict;
                let read = match figure {
                    Baseline::Exact(snap) => Read::Exact(snap),
                    // statm is no upper figure of shared memory: strict starts from the mappings
                    // (a process that cannot be read is held like a blind one).
                    Baseline::Upper(upper) | Baseline::Image { upper, .. } if strict => {
                        match self.admission_maps(l, n, pid, &task) {
                            Ok(Some(snap)) => Read::Exact(snap),
                            Ok(None) => Read::Upper(upper),
                            Err(()) => return Err(Answer::Drop),
                        }
                    }
                    Baseline::Upper(upper) => Read::Upper(upper),
                    Baseline::Image { upper, start_brk } => Read::Image { upper, start_brk: Some(start_brk) },
                };
                let task: std::sync::Arc<dyn crate::procview::Task> = std::sync::Arc::new(task);
                tracing::debug!(pid, command = %command, runtime = self.runtime, "new process");
                let opened = self.sup.accounts.lock().open(pid, task.clone(), command, read.figure(), self.runtime);
                if let Some(generation) = opened {
                    self.sup.watch_exit(pid, generation, task);
                }
                Ok(())
            }
            Ok(_) | Err(Miss::Dead) => Err(Answer::Drop),
            Err(Miss::Failed(e)) => {
                let what = format!("/proc/{pid}, to open its account: {}", chain(&e));
                Err(self.unreadable(l, n, Some(pid), call, what))
            }
        }
    }

    /// The mappings of a process being admitted (through the files its handle keeps, else
    /// opened afresh); `None` when they cannot be read, `Err` when its call is gone.
    fn admission_maps<N: Notifier>(
        &self,
        l: &N,
        n: &Notification,
        pid: u32,
        task: &P::Task,
    ) -> Result<Option<Snapshot>, ()> {
        use crate::procview::Task as _;
        if let Some(read) = task.kept().and_then(|k| k.maps(None)) {
            return Ok(read.ok());
        }
        match self.read(l, n, pid, Want::Maps { range: None }) {
            Ok(Reading::Maps(snap)) => Ok(Some(snap)),
            Ok(_) | Err(Miss::Dead) => Err(()),
            Err(Miss::Failed(_)) => Ok(None),
        }
    }

    /// Read a figure of `pid` and decide `req` on it; a figure that fails gives way to the next
    /// best (the mappings, then `statm`, then the bound alone).
    fn measure_and_decide<N: Notifier>(
        &mut self,
        l: &N,
        n: &Notification,
        pid: u32,
        req: &Request,
        key: CallKey,
        mut need: Need,
    ) -> Answer {
        let mut why: Option<String> = None;
        let mut retries = 0;
        loop {
            let (token, pending, blind, task) = {
                let g = self.sup.accounts.lock();
                let blind = g.ledger.account(pid).is_some_and(|a| a.blind);
                (g.ledger.token(pid), g.ledger.threads_to_ask(pid, n.pid, req), blind, g.task(pid))
            };
            let Some(token) = token else {
                // Closed meanwhile: the process exited, so its calls are no longer pending.
                if !l.id_valid(n.id) {
                    return Answer::Drop;
                }
                let call = MemCall::decode(n.arch, n.nr, n.args).unwrap_or(MemCall::Exec);
                return self.unreadable(
                    l,
                    n,
                    Some(pid),
                    call,
                    format!("/proc/{pid}: its account was closed while it was read"),
                );
            };
            // Thread states first, the figure second: a thread seen to have moved past its
            // allowed call finished it before the figure was read. (The other order can miss a
            // growth that lands between the two reads, and retire it: an under-count.)
            let states: Vec<(u32, ThreadState)> = pending
                .into_iter()
                .map(|t| (t, self.threads.state(t).unwrap_or_else(|| self.sup.proc.thread_state(t))))
                .collect();
            let read = if retries > STALE_RETRIES {
                why.get_or_insert_with(|| "its figures kept changing under each read".into());
                Read::Unread
            } else {
                let kept = task.as_deref().and_then(|t| t.kept());
                match self.figure(l, n, pid, req, need, blind, kept, &mut why) {
                    Ok(read) => read,
                    Err(()) => return Answer::Drop,
                }
            };
            let verdict = self.sup.accounts.lock().ledger.decide(pid, n.pid, req, key, read.figure(), &states, token);
            match verdict {
                Verdict::Allow => return Answer::Allow,
                Verdict::Deny(deny) => {
                    let brk_return = match (&read, req) {
                        (Read::Exact(snap), Request::Brk { .. }) => Some(snap.brk(self.sup.page).unwrap_or(0)),
                        (_, Request::Brk { .. }) => {
                            Some(self.sup.accounts.lock().ledger.account(pid).and_then(|a| a.brk()).unwrap_or(0))
                        }
                        _ => None,
                    };
                    let mut denial = self.denial(l, n, Some(pid), req.name(), deny, why);
                    denial.brk_return = brk_return;
                    return Answer::Deny(Box::new(denial));
                }
                Verdict::MeasureExact => need = Need::Exact,
                Verdict::Stale => retries += 1,
            }
        }
    }

    /// Read the figure `need` asks for, through the files the process's handle keeps (`kept`)
    /// or else opened afresh; on failure the next best, noting why in `why`. `Err`: the
    /// notification is no longer pending.
    #[allow(clippy::too_many_arguments)]
    fn figure<N: Notifier>(
        &self,
        l: &N,
        n: &Notification,
        pid: u32,
        req: &Request,
        need: Need,
        blind: bool,
        kept: Option<&dyn Kept>,
        why: &mut Option<String>,
    ) -> Result<Read, ()> {
        // A kept file of a process that is gone: its call is gone too, unless the kernel says not.
        let dead = |e: &ProcError| e.is_gone() && !l.id_valid(n.id);
        if need == Need::Image {
            if let Some(k) = kept {
                match k.image() {
                    Ok((upper, start_brk)) => return Ok(Read::Image { upper, start_brk }),
                    Err(e) if dead(&e) => return Err(()),
                    Err(_) => {} // the mappings tell the break and the heap too
                }
            }
        }
        if need == Need::Upper && !blind {
            match self.upper(l, n, pid, kept) {
                Ok(u) => return Ok(Read::Upper(u)),
                Err(Miss::Dead) => return Err(()),
                Err(Miss::Failed(e)) if dead(&e) => return Err(()),
                Err(Miss::Failed(_)) => {} // the mappings may still be read
            }
        }
        if blind {
            *why = Some(format!(
                "the mappings of /proc/{pid} cannot be read (not dumpable, or refused); decided on /proc/{pid}/statm"
            ));
        } else {
            // An mprotect looks at memory not counted yet: the query reads that range too.
            let range = match *req {
                Request::Protect { addr, len } => Some((addr, addr.saturating_add(len))),
                _ => None,
            };
            let snapshot = match kept.and_then(|k| k.maps(range)) {
                Some(read) => read.map_err(Miss::Failed),
                None => self.read(l, n, pid, Want::Maps { range }).and_then(|r| match r {
                    Reading::Maps(snap) => Ok(snap),
                    _ => Err(Miss::Dead),
                }),
            };
            match snapshot {
                Ok(snap) => return Ok(Read::Exact(snap)),
                Err(Miss::Dead) => return Err(()),
                Err(Miss::Failed(e)) if dead(&e) => return Err(()),
                Err(Miss::Failed(e)) => {
                    if e.is_denied() && self.sup.accounts.lock().ledger.account(pid).is_some_and(|a| !a.blind) {
                        self.sup.accounts.lock().ledger.set_blind(pid);
                        let command = self.command_of(l, n, pid);
                        self.sup.warn_blind(pid, &command);
                    }
                    *why = Some(format!("{}; decided on /proc/{pid}/statm", chain(&e)));
                }
            }
        }
        match self.upper(l, n, pid, kept) {
            Ok(u) => Ok(Read::UpperOnly(u)),
            Err(Miss::Dead) => Err(()),
            Err(Miss::Failed(e)) if dead(&e) => Err(()),
            Err(Miss::Failed(e)) => {
                let before = why.take().map(|w| format!("{w}, which failed too: ")).unwrap_or_default();
                *why = Some(format!("{before}{}; decided on the growth let through so far", chain(&e)));
                Ok(Read::Unread)
            }
        }
    }

    /// `statm`'s upper figure of `pid`, through its kept file or opened afresh.
    fn upper<N: Notifier>(&self, l: &N, n: &Notification, pid: u32, kept: Option<&dyn Kept>) -> Result<u64, Miss> {
        match kept {
            Some(k) => k.upper().map_err(Miss::Failed),
            None => self.read(l, n, pid, Want::Upper).and_then(|r| match r {
                Reading::Upper(u) => Ok(u),
                _ => Err(Miss::Dead),
            }),
        }
    }

    /// The command line of `pid`, read now if it was not yet (commands are read when first
    /// needed), while its call `n` is pending.
    fn command_of<N: Notifier>(&self, l: &N, n: &Notification, pid: u32) -> String {
        let known = self.sup.accounts.lock().ledger.account(pid).map(|a| a.command.clone()).unwrap_or_default();
        if !known.is_empty() {
            return known;
        }
        match self.read(l, n, pid, Want::Command) {
            Ok(Reading::Command(command)) => {
                self.sup.accounts.lock().ledger.set_command(pid, command.clone());
                command
            }
            _ => String::new(),
        }
    }

    fn denial<N: Notifier>(
        &self,
        l: &N,
        n: &Notification,
        pid: Option<u32>,
        syscall: &'static str,
        deny: Deny,
        reason: Option<String>,
    ) -> Denial {
        Denial {
            time: SystemTime::now(),
            pid,
            tid: n.pid,
            command: pid.map(|p| self.command_of(l, n, p)).unwrap_or_default(),
            syscall,
            request: deny.request,
            usage: Some(deny.usage),
            limit: deny.limit,
            scope: deny.scope,
            reason,
            brk_return: None,
        }
    }

    /// A read `/proc` refused for a live caller: never let growth through unchecked where a
    /// quota applies. Let through in audit mode, and where no quota applies, with a warning.
    fn unreadable<N: Notifier>(
        &self,
        l: &N,
        n: &Notification,
        pid: Option<u32>,
        call: MemCall,
        what: String,
    ) -> Answer {
        let reason = format!("cannot read {what}");
        if let MemCall::Sysinfo { .. } = call {
            // It grows nothing: never refused, the kernel answers it (with the host's figures).
            self.sup.warn(n.pid, pid, &format!("{reason}: the kernel answers sysinfo"));
            return Answer::Allow;
        }
        self.refuse(l, n, pid, call, reason)
    }

    /// A call that cannot be decided safely, for `reason`: refused where a quota is enforced;
    /// let through, with a warning, in audit mode and where no quota applies.
    fn refuse<N: Notifier>(&self, l: &N, n: &Notification, pid: Option<u32>, call: MemCall, reason: String) -> Answer {
        let (mode, limits, own, usage) = {
            let g = self.sup.accounts.lock();
            let acct = pid.and_then(|p| g.ledger.account(p));
            (g.ledger.mode(), g.ledger.limits(), acct.and_then(|a| a.limit), acct.map(|a| a.bound))
        };
        let quota = match (own.or(limits.process), limits.total) {
            (Some(limit), _) => Some((Scope::Process, limit, usage)),
            (None, Some(total)) => Some((Scope::Total, total, None)),
            (None, None) => None,
        };
        let Some((scope, limit, usage)) = quota.filter(|_| mode == Mode::Enforce) else {
            self.sup.warn(n.pid, pid, &format!("{reason}: letting the call through (no quota is enforced)"));
            return Answer::Allow;
        };
        self.sup.warn(n.pid, pid, &format!("{reason}: refusing the call"));
        let req = call.request(self.sup.page);
        let request = req.and_then(|r| match r {
            Request::Brk { .. } => None,
            Request::Map { len, .. } | Request::Protect { len, .. } => Some(len),
            Request::Remap { old_len, new_len, dontunmap, .. } if dontunmap || old_len == 0 => Some(new_len),
            Request::Remap { old_len, new_len, .. } => Some(new_len.saturating_sub(old_len)),
        });
        let deny = Deny { scope, usage: usage.unwrap_or(0), request, limit };
        let brk_return = matches!(call, MemCall::Brk { .. }).then_some(0);
        let mut denial = self.denial(l, n, pid, call.name(), deny, Some(reason));
        denial.usage = usage;
        denial.brk_return = brk_return;
        Answer::Deny(Box::new(denial))
    }
}

/// An error and its sources, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}
