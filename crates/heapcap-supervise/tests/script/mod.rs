//! A scripted world for the engine: processes, threads and their mappings as data, a listener
//! whose notifications stay pending until answered or their caller dies, and reads of `/proc`
//! that fail on cue. The mappings are rendered as `/proc/<pid>/maps` text and parsed by the real
//! parser, so a garbled or truncated read goes through the code a real one would.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use heapcap_linux::notify::{Answered, Notification, Recv};
use heapcap_linux::processvm::VmError;
use heapcap_linux::procfs::ProcError;
use heapcap_policy::ledger::{Snapshot, ThreadState};
use heapcap_policy::machine::SysInfo;
use heapcap_policy::maps::{Maps, Vma};
use heapcap_policy::syscall::AUDIT_ARCH_X86_64;
use heapcap_supervise::procview::{Baseline, Kept, Reading, Task, Want};
use heapcap_supervise::{Emulator, Notifier, ProcView, Reply};

pub const PAGE: u64 = 4096;
pub const MIB: u64 = 1 << 20;

/// One simulated process.
#[derive(Debug, Clone)]
pub struct Proc {
    pub vmas: Vec<Vma>,
    pub start_brk: u64,
    /// What `statm` shows beyond the counted heap (stacks, private file data).
    pub statm_extra: u64,
    pub command: String,
    /// False: reads that need ptrace rights are refused (`EACCES`), as for a process that called
    /// `prctl(PR_SET_DUMPABLE, 0)`.
    pub dumpable: bool,
    alive: Arc<AtomicBool>,
}

impl Proc {
    pub fn counted(&self) -> u64 {
        self.vmas.iter().filter(|v| v.counted()).map(|v| v.len()).sum()
    }
}

/// Which read a fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum What {
    Thread,
    Admission,
    Maps,
    Upper,
    Any,
}

impl What {
    fn matches(self, want: Want) -> bool {
        match self {
            What::Any => true,
            What::Thread => matches!(want, Want::Thread),
            What::Admission => matches!(want, Want::Admission { .. }),
            What::Maps => matches!(want, Want::Maps { .. }),
            What::Upper => matches!(want, Want::Upper),
        }
    }
}

/// How a read fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The open fails with this errno.
    Open(i32),
    /// The read fails with this errno.
    Read(i32),
    /// The maps text has a garbled line.
    Garbled,
    /// The maps text stops in the middle of a line.
    Truncated,
}

/// Something that happens between an open and its read.
pub type Between = Box<dyn FnMut(&mut State) + Send>;

#[derive(Default)]
pub struct State {
    pub procs: HashMap<u32, Proc>,
    /// Thread id -> process.
    pub threads: HashMap<u32, u32>,
    pub thread_states: HashMap<u32, ThreadState>,
    faults: Vec<(Option<u32>, What, Failure, usize)>,
    between: VecDeque<(u32, What, Between)>,
    /// Notifications received and not yet answered, by id, with their calling thread.
    pending: HashMap<u64, u32>,
    queue: VecDeque<(Notification, Option<Between>)>,
    next_id: u64,
    pub answers: Vec<(u64, Reply)>,
    pub sync_wakeup: Vec<bool>,
    /// Processes that use another's address space (`clone(CLONE_VM)`): pid -> the process whose
    /// mappings they see.
    pub vm_of: HashMap<u32, u32>,
    /// Devices of disk-backed mounts (what `mountinfo` says).
    pub disks: Vec<u64>,
    /// SysV segments: id -> size.
    pub segments: HashMap<u64, u64>,
    /// Why a thread's memory arguments could change (`None`: they cannot).
    pub not_alone: HashMap<u32, String>,
}

impl State {
    /// The process whose address space `pid` uses.
    pub fn mm(&self, pid: u32) -> u32 {
        self.vm_of.get(&pid).copied().unwrap_or(pid)
    }
}

impl State {
    /// The next `times` reads of `what` (of `pid`, or any) fail as `failure`.
    pub fn fail(&mut self, pid: Option<u32>, what: What, failure: Failure, times: usize) {
        self.faults.push((pid, what, failure, times));
    }

    /// Process `pid` (all its threads) exits: its pending calls are no longer pending.
    pub fn kill(&mut self, pid: u32) {
        if let Some(p) = self.procs.remove(&pid) {
            p.alive.store(false, Ordering::SeqCst);
        }
        let tids: Vec<u32> = self.threads.iter().filter(|(_, p)| **p == pid).map(|(t, _)| *t).collect();
        for t in tids {
            self.threads.remove(&t);
            self.pending.retain(|_, tid| *tid != t);
        }
    }
}

/// The world, shared by the `/proc` view and the listener.
#[derive(Clone, Default)]
pub struct World(Arc<Mutex<State>>);

impl World {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }

    /// A process with one thread (its own id) and these mappings.
    pub fn spawn(&self, pid: u32, command: &str, vmas: Vec<Vma>) {
        let mut s = self.lock();
        s.kill(pid);
        let p = Proc {
            vmas,
            start_brk: 0x5555_0000_0000,
            statm_extra: 512 << 10,
            command: command.to_string(),
            dumpable: true,
            alive: Arc::new(AtomicBool::new(true)),
        };
        s.procs.insert(pid, p);
        s.threads.insert(pid, pid);
    }

    pub fn thread(&self, tid: u32, pid: u32) {
        self.lock().threads.insert(tid, pid);
    }

    pub fn set_dumpable(&self, pid: u32, dumpable: bool) {
        self.lock().procs.get_mut(&pid).unwrap().dumpable = dumpable;
    }

    /// The next `times` reads of `what` (of `pid`, or any) fail as `failure`.
    pub fn fail(&self, pid: Option<u32>, what: What, failure: Failure, times: usize) {
        self.lock().fail(pid, what, failure, times);
    }

    /// After the next open of `what` of `pid`, before its read, run `f`.
    pub fn between(&self, pid: u32, what: What, f: impl FnMut(&mut State) + Send + 'static) {
        self.lock().between.push_back((pid, what, Box::new(f)));
    }

    /// Thread `tid` makes a call: a pending notification.
    pub fn call(&self, tid: u32, nr: i32, args: [u64; 6]) -> Notification {
        self.call_as(tid, AUDIT_ARCH_X86_64, nr, args)
    }

    /// [`World::call`] in the ABI `arch` (an `AUDIT_ARCH_*` value).
    pub fn call_as(&self, tid: u32, arch: u32, nr: i32, args: [u64; 6]) -> Notification {
        let mut s = self.lock();
        s.next_id += 1;
        let n = Notification { id: s.next_id, pid: tid, arch, nr, args };
        s.pending.insert(n.id, tid);
        n
    }

    /// Queue a call for [`Notifier::recv`].
    pub fn queue(&self, tid: u32, nr: i32, args: [u64; 6]) -> Notification {
        let n = self.call(tid, nr, args);
        self.lock().queue.push_back((n, None));
        n
    }

    /// Queue a call; `then` runs when it is received (before it is decided).
    pub fn queue_then(
        &self,
        tid: u32,
        nr: i32,
        args: [u64; 6],
        then: impl FnMut(&mut State) + Send + 'static,
    ) -> Notification {
        let n = self.call(tid, nr, args);
        self.lock().queue.push_back((n, Some(Box::new(then))));
        n
    }

    pub fn heap(&self, pid: u32) -> u64 {
        self.lock().procs.get(&pid).map_or(0, Proc::counted)
    }

    /// Let an allowed anonymous mapping land.
    pub fn map(&self, pid: u32, start: u64, len: u64) {
        self.lock().procs.get_mut(&pid).unwrap().vmas.push(anon(start, len));
    }

    pub fn unmap_all(&self, pid: u32) {
        self.lock().procs.get_mut(&pid).unwrap().vmas.clear();
    }

    /// The view the engine reads through.
    pub fn view(&self) -> View {
        View(self.clone())
    }
}

pub fn anon(start: u64, len: u64) -> Vma {
    Vma { start, end: start + len, writable: true, anon_private: true, is_heap: false, ..Vma::default() }
}

fn errno(e: i32, what: &str) -> ProcError {
    ProcError::Io { path: format!("/proc/scripted/{what}").into(), source: io::Error::from_raw_os_error(e) }
}

/// A scripted task handle: no fd, so neither cached nor watched. A process's handle keeps its
/// files like the Linux one: its reads go through the same scripted opens and faults, without
/// the check a fresh read makes.
pub struct ScriptedTask {
    alive: Arc<AtomicBool>,
    kept: Option<(World, u32)>,
}

impl std::fmt::Debug for ScriptedTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptedTask").finish_non_exhaustive()
    }
}

impl ScriptedTask {
    fn kept_read(&self, want: Want) -> Result<Reading<ScriptedTask>, ProcError> {
        let (world, pid) = self.kept.as_ref().expect("kept() said so");
        if !self.alive.load(Ordering::SeqCst) {
            return Err(errno(libc::ESRCH, "kept"));
        }
        let view = View(world.clone());
        let opened = view.open(*pid, want)?;
        view.read(opened)
    }
}

impl Kept for ScriptedTask {
    fn upper(&self) -> Result<u64, ProcError> {
        match self.kept_read(Want::Upper)? {
            Reading::Upper(u) => Ok(u),
            _ => unreachable!("an upper read"),
        }
    }

    fn image(&self) -> Result<(u64, Option<u64>), ProcError> {
        let (world, pid) = self.kept.as_ref().expect("kept() said so");
        // As `stat` shows it: 0 (hidden) to a reader without ptrace rights over the process.
        let start_brk = world.lock().procs.get(pid).filter(|p| p.dumpable).map(|p| p.start_brk).filter(|b| *b != 0);
        Ok((self.upper()?, start_brk))
    }

    fn maps(&self, range: Option<(u64, u64)>) -> Option<Result<Snapshot, ProcError>> {
        Some(self.kept_read(Want::Maps { range }).map(|r| match r {
            Reading::Maps(s) => s,
            _ => unreachable!("a maps read"),
        }))
    }

    fn new_image(&self) {}
}

impl Task for ScriptedTask {
    fn exited(&self) -> bool {
        !self.alive.load(Ordering::SeqCst)
    }

    fn kept(&self) -> Option<&dyn Kept> {
        self.kept.as_ref().map(|_| self as &dyn Kept)
    }

    fn signal(&self, _sig: i32) -> io::Result<()> {
        Ok(())
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

/// The `/proc` view of a [`World`].
pub struct View(World);

/// What [`View::open`] opened: bound to the process as it was then.
pub struct Opened {
    pid: u32,
    want: Want,
    alive: Arc<AtomicBool>,
}

impl View {
    fn fault(s: &mut State, pid: u32, want: Want, open: bool) -> Option<Failure> {
        let i = s.faults.iter().position(|(p, what, failure, times)| {
            *times > 0
                && p.is_none_or(|p| p == pid)
                && what.matches(want)
                && matches!(failure, Failure::Open(_)) == open
        })?;
        s.faults[i].3 -= 1;
        Some(s.faults[i].2)
    }
}

fn maps_text(vmas: &[Vma]) -> String {
    vmas.iter()
        .map(|v| {
            let shared = v.shared || (!v.anon_private && v.inode == 0);
            let perms = format!("r{}-{}", if v.writable { 'w' } else { '-' }, if shared { 's' } else { 'p' });
            let name = if v.is_heap {
                "[heap]"
            } else if v.inode != 0 {
                "/file"
            } else {
                ""
            };
            let (major, minor) = (v.dev >> 32, v.dev & 0xffff_ffff);
            format!("{:x}-{:x} {perms} 00000000 {major:x}:{minor:x} {} {name}\n", v.start, v.end, v.inode)
        })
        .collect()
}

impl ProcView for View {
    type Opened = Opened;
    type Task = ScriptedTask;

    fn open(&self, pid: u32, want: Want) -> Result<Opened, ProcError> {
        let mut s = self.0.lock();
        if let Some(Failure::Open(e)) = View::fault(&mut s, pid, want, true) {
            return Err(errno(e, "open"));
        }
        let proc_of = match want {
            Want::Thread => s.threads.get(&pid).copied(),
            _ => Some(pid),
        };
        let Some(p) = proc_of.and_then(|p| s.procs.get(&p)) else { return Err(errno(libc::ENOENT, "open")) };
        let needs_ptrace = matches!(want, Want::Maps { .. } | Want::Memory { .. });
        if needs_ptrace && !p.dumpable {
            return Err(errno(libc::EACCES, "open"));
        }
        let alive = p.alive.clone();
        let i = s.between.iter().position(|(p, what, _)| *p == pid && what.matches(want));
        if let Some(i) = i {
            let (_, _, mut f) = s.between.remove(i).unwrap();
            f(&mut s);
        }
        Ok(Opened { pid, want, alive })
    }

    fn read(&self, o: Opened) -> Result<Reading<ScriptedTask>, ProcError> {
        let mut s = self.0.lock();
        let failure = View::fault(&mut s, o.pid, o.want, false);
        if let Some(Failure::Read(e)) = failure {
            return Err(errno(e, "read"));
        }
        if !o.alive.load(Ordering::SeqCst) {
            return Err(errno(libc::ESRCH, "read")); // the task opened is gone
        }
        let pid_of =
            |s: &State| if matches!(o.want, Want::Thread) { s.threads.get(&o.pid).copied() } else { Some(o.pid) };
        let Some(mut p) = pid_of(&s).and_then(|p| s.procs.get(&p)).cloned() else {
            return Err(errno(libc::ESRCH, "read"));
        };
        // One address space: the mappings (and statm) of the process whose it is.
        if let Some(owner) = s.procs.get(&s.mm(o.pid)) {
            p.vmas = owner.vmas.clone();
        }
        let disks = s.disks.clone();
        let snapshot = |vmas: &[Vma]| -> Result<Snapshot, ProcError> {
            let mut text = maps_text(vmas);
            match failure {
                Some(Failure::Garbled) => text.push_str("this is not a maps line\n"),
                // Inside a line (its newline at the least): a cut at a line's end reads as a
                // whole text with fewer mappings, which the kernel's maps never give a live process.
                Some(Failure::Truncated) => {
                    let cut = text.len().saturating_sub(text.len() / 3);
                    text.truncate(if text[..cut].ends_with('\n') { cut - 1 } else { cut });
                }
                _ => {}
            }
            let mut maps = Maps::parse(&text)?;
            maps.classify(|d| disks.contains(&d));
            Ok(Snapshot { maps, start_brk: Some(p.start_brk), upper: Some(p.counted() + p.statm_extra) })
        };
        Ok(match o.want {
            Want::Thread => Reading::Thread { tgid: pid_of(&s).unwrap(), handle: None },
            // As on Linux: statm, and files kept open for the account's later reads.
            Want::Admission { command } => Reading::Admission {
                task: ScriptedTask { alive: p.alive.clone(), kept: Some((self.0.clone(), o.pid)) },
                command: if command { p.command.clone() } else { String::new() },
                figure: Baseline::Upper(p.counted() + p.statm_extra),
            },
            Want::Maps { .. } => Reading::Maps(snapshot(&p.vmas)?),
            Want::Upper => Reading::Upper(p.counted() + p.statm_extra),
            Want::Memory { len, .. } => Reading::Memory(vec![0; len]),
            Want::Command => Reading::Command(p.command.clone()),
            Want::Alone { .. } => Reading::Alone(s.not_alone.get(&o.pid).cloned()),
            Want::Segment { shmid } => Reading::Segment(s.segments.get(&shmid).copied()),
        })
    }

    fn thread_state(&self, tid: u32) -> ThreadState {
        let s = self.0.lock();
        if !s.threads.contains_key(&tid) {
            return ThreadState::Gone;
        }
        s.thread_states.get(&tid).copied().unwrap_or(ThreadState::Idle)
    }

    fn tasks(&self, pid: u32) -> Vec<u32> {
        self.0.lock().threads.iter().filter(|(_, p)| **p == pid).map(|(t, _)| *t).collect()
    }

    fn children(&self, _pid: u32) -> Vec<u32> {
        Vec::new()
    }

    fn same_vm(&self, a: u32, b: u32) -> Result<bool, ProcError> {
        let s = self.0.lock();
        if !s.procs.contains_key(&a) || !s.procs.contains_key(&b) {
            return Err(errno(libc::ESRCH, "kcmp"));
        }
        Ok(s.mm(a) == s.mm(b))
    }
}

impl Notifier for World {
    fn recv(&self) -> io::Result<Recv> {
        let mut s = self.lock();
        loop {
            let Some((n, then)) = s.queue.pop_front() else { return Ok(Recv::HungUp) };
            if let Some(mut then) = then {
                then(&mut s);
            }
            // A caller that died before its call was received: the kernel drops it.
            if s.pending.contains_key(&n.id) {
                return Ok(Recv::Notification(n));
            }
        }
    }

    fn answer(&self, id: u64, reply: Reply) -> io::Result<Answered> {
        let mut s = self.lock();
        if s.pending.remove(&id).is_none() {
            return Ok(Answered::Gone);
        }
        s.answers.push((id, reply));
        Ok(Answered::Yes)
    }

    fn id_valid(&self, id: u64) -> bool {
        self.lock().pending.contains_key(&id)
    }

    fn set_sync_wakeup(&self, on: bool) -> io::Result<bool> {
        self.lock().sync_wakeup.push(on);
        Ok(true)
    }
}

/// What the scripted [`Memory`] does with the next call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cue {
    /// Write if the range is inside a buffer the caller has (else a fault).
    Write,
    /// The write is refused (`EPERM`: not ours to write).
    Refuse,
    /// The caller is killed while heapcap reads `sysinfo`, before anything is written.
    KillCaller,
    /// `sysinfo` itself fails.
    NoSysinfo,
}

/// A write made: thread, address, bytes.
pub type Written = (u32, u64, Vec<u8>);

/// A scripted [`Emulator`]: a host `sysinfo`, the callers' writable buffers, every write made.
#[derive(Clone)]
pub struct Memory {
    world: World,
    pub host: SysInfo,
    /// (thread, start, len) of memory a caller may be written.
    pub buffers: Arc<Mutex<Vec<(u32, u64, u64)>>>,
    pub writes: Arc<Mutex<Vec<Written>>>,
    pub cue: Arc<Mutex<Cue>>,
}

impl Memory {
    pub fn new(world: &World, host: SysInfo) -> Memory {
        Memory {
            world: world.clone(),
            host,
            buffers: Arc::default(),
            writes: Arc::default(),
            cue: Arc::new(Mutex::new(Cue::Write)),
        }
    }
}

impl Emulator for Memory {
    fn sysinfo(&self) -> io::Result<SysInfo> {
        match *self.cue.lock().unwrap() {
            Cue::NoSysinfo => Err(io::Error::from_raw_os_error(libc::ENOSYS)),
            Cue::KillCaller => {
                let pids: Vec<u32> = self.world.lock().procs.keys().copied().collect();
                let mut s = self.world.lock();
                pids.into_iter().for_each(|p| s.kill(p));
                Ok(self.host)
            }
            _ => Ok(self.host),
        }
    }

    fn write(&self, tid: u32, addr: u64, bytes: &[u8]) -> Result<(), VmError> {
        let len = bytes.len();
        if *self.cue.lock().unwrap() == Cue::Refuse {
            return Err(VmError::Access { tid, source: io::Error::from_raw_os_error(libc::EPERM) });
        }
        let fits = self.buffers.lock().unwrap().iter().any(|&(t, start, blen)| {
            t == tid && addr >= start && addr.checked_add(len as u64).is_some_and(|end| end <= start + blen)
        });
        if !fits {
            return Err(VmError::Fault { tid, addr, len });
        }
        self.writes.lock().unwrap().push((tid, addr, bytes.to_vec()));
        Ok(())
    }
}
