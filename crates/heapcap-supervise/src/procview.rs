//! What the engine reads about processes: a `/proc` view with a handful of methods, handed in
//! by the caller. Production passes [`LinuxProc`] (the real `/proc` and pidfds); tests pass
//! scripted views that fail on cue.
//!
//! Reads come in two steps, so the engine can check between them that what it opened is about
//! the task it means ([`checked`]): `open` binds to a task (an open `/proc/<pid>` file stays
//! bound to the task it was opened for), `read` reads what was opened.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use heapcap_linux::pidfd::Pidfd;
use heapcap_linux::procfs::{Opened, OpenedCommand, ProcError, ProcFs};
use heapcap_policy::ledger::{Snapshot, ThreadState};

/// A handle on a process or thread that stays true across pid reuse (a pidfd).
pub trait Task: Send + Sync + 'static {
    /// The task has exited (a zombie counts).
    fn exited(&self) -> bool;
    /// Send it a signal.
    fn signal(&self, sig: i32) -> io::Result<()>;
    /// An fd that polls readable once the task has exited, for the exit and thread watchers;
    /// `None`: not watchable (such tasks are looked up afresh each time, and their exit is seen
    /// when the listener hangs up).
    fn fd(&self) -> Option<BorrowedFd<'_>>;
    /// The files this handle keeps open to read its process again; `None`: it keeps none (the
    /// engine opens, checks and reads afresh).
    fn kept(&self) -> Option<&dyn Kept> {
        None
    }
    /// What the thread is doing, through a file this handle keeps (opened at the first look);
    /// `None`: a handle that keeps none (ask [`ProcView::thread_state`]).
    fn state(&self) -> Option<ThreadState> {
        None
    }
}

/// Files a process handle keeps open, to read the process again without opening anything (no
/// path walk, no permission check, no check that the pid is still the process: an open `/proc`
/// file stays bound to the task it was opened for). `statm` and `stat` follow the task; the
/// maps are bound to its address space, so they are dropped at each exec ([`Kept::new_image`])
/// and opened again when next needed.
pub trait Kept: Send + Sync {
    /// `statm`'s upper figure of the counted heap.
    fn upper(&self) -> Result<u64, ProcError>;
    /// A new image's figure: `statm`, and `start_brk` (`None` when hidden).
    fn image(&self) -> Result<(u64, Option<u64>), ProcError>;
    /// The mappings (and `statm` read with them) plus every mapping overlapping `range`;
    /// `None` where this kernel needs a fresh open for them (no `PROCMAP_QUERY`).
    fn maps(&self, range: Option<(u64, u64)>) -> Option<Result<Snapshot, ProcError>>;
    /// An exec settled: the maps kept are the old address space's.
    fn new_image(&self);
}

/// What to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// A thread's process (`status`), and a handle on the thread.
    Thread,
    /// A process first seen: a handle on it (keeping its files open where it can), a figure of
    /// it (`statm`, or its mappings), and its command line if `command`.
    Admission { command: bool },
    /// The mappings and the program break, plus every mapping overlapping `range`.
    Maps { range: Option<(u64, u64)> },
    /// `statm`'s upper figure of the counted heap.
    Upper,
    /// `len` bytes of the process's memory at `addr` (arguments passed by pointer).
    Memory { addr: u64, len: usize },
    /// The command line, for reports.
    Command,
    /// Whether `len` bytes at `addr` of the caller's memory can change between heapcap's read
    /// and the kernel's (arguments passed by pointer): [`Reading::Alone`].
    Alone { addr: u64, len: usize },
    /// The size of SysV segment `shmid` in the caller's IPC namespace.
    Segment { shmid: u64 },
}

/// What was read.
#[derive(Debug)]
pub enum Reading<T> {
    Thread {
        tgid: u32,
        handle: Option<T>,
    },
    /// `command`: empty when not asked for.
    Admission {
        task: T,
        command: String,
        figure: Baseline,
    },
    Maps(Snapshot),
    Upper(u64),
    Memory(Vec<u8>),
    Command(String),
    /// `None`: nothing but the caller itself can write the bytes asked about (it is its
    /// process's only thread, no other process shares its address space, it is not traced, and
    /// the bytes are in private anonymous memory). `Some`: why not.
    Alone(Option<String>),
    /// `None`: no such segment.
    Segment(Option<u64>),
}

/// A process's figure at admission.
#[derive(Debug)]
pub enum Baseline {
    Exact(Snapshot),
    /// From `statm` (the mappings are not read).
    Upper(u64),
    /// From `statm`, with where the break starts (`stat`).
    Image {
        upper: u64,
        start_brk: u64,
    },
}

/// The `/proc` view the engine reads through.
pub trait ProcView: Send + Sync + 'static {
    /// What `open` opened: files bound to one task.
    type Opened: Send;
    type Task: Task;
    fn open(&self, pid: u32, want: Want) -> Result<Self::Opened, ProcError>;
    fn read(&self, opened: Self::Opened) -> Result<Reading<Self::Task>, ProcError>;
    /// What a thread is doing now (for growth in flight); `Busy` when it cannot be told.
    fn thread_state(&self, tid: u32) -> ThreadState;
    /// The thread ids of a process (restart recovery).
    fn tasks(&self, pid: u32) -> Vec<u32>;
    /// The children of a process (restart recovery).
    fn children(&self, pid: u32) -> Vec<u32>;
    /// Whether tasks `a` and `b` use one address space (`kcmp(KCMP_VM)`). Asked by pid: check
    /// afterwards that both are still the tasks meant.
    fn same_vm(&self, a: u32, b: u32) -> Result<bool, ProcError>;
}

/// How a checked read went.
#[derive(Debug)]
pub enum Checked<T> {
    Read(Reading<T>),
    /// The task is no longer the one meant (the check failed): nothing read is about it.
    Dead,
    /// It is, and the read failed.
    Failed(ProcError),
}

/// Open, check, read: the one way the engine reads about a task. `still` says whether what was
/// opened is still about the task meant (a notification still pending, a pidfd not exited); it
/// runs after the open, and again after a failure, so a failure of a task that is gone is told
/// apart from one of a task that is there.
pub fn checked<P: ProcView>(proc: &P, pid: u32, want: Want, still: impl Fn() -> bool) -> Checked<P::Task> {
    let opened = match proc.open(pid, want) {
        Ok(o) => o,
        Err(_) if !still() => return Checked::Dead,
        Err(e) => return Checked::Failed(e),
    };
    if !still() {
        return Checked::Dead;
    }
    match proc.read(opened) {
        Ok(r) => Checked::Read(r),
        Err(_) if !still() => Checked::Dead,
        Err(e) => Checked::Failed(e),
    }
}

/// A `/proc` file opened, with its path for errors.
type OpenedFile = (PathBuf, File);

/// A process or thread handle of the real kernel: a pidfd, and for a process the files kept open
/// to read it again; for a thread, its `syscall` file once its state is asked for.
#[derive(Debug)]
pub struct LinuxTask {
    pidfd: Pidfd,
    files: Option<KeptFiles>,
    thread: Option<ThreadFile>,
}

/// A thread's `/proc/<tid>/syscall`, opened at the first look at its state and kept: each later
/// look is one `pread` instead of an open, a read and a close (a multi-threaded process's other
/// threads are looked at whenever its figure is read).
#[derive(Debug)]
struct ThreadFile {
    proc: ProcFs,
    tid: u32,
    /// `None` once opening failed or found the thread gone: then it is read afresh each time.
    file: OnceLock<Option<OpenedFile>>,
}

#[derive(Debug)]
struct KeptFiles {
    proc: ProcFs,
    pid: u32,
    page: u64,
    statm: (PathBuf, File),
    stat: Mutex<Option<(PathBuf, File)>>,
    maps: Mutex<Option<(PathBuf, File)>>,
}

/// A handle that keeps no files.
impl From<Pidfd> for LinuxTask {
    fn from(pidfd: Pidfd) -> LinuxTask {
        LinuxTask { pidfd, files: None, thread: None }
    }
}

impl LinuxTask {
    /// The handle of thread `tid`, `pidfd` a pidfd of it (or of its process, for a leader).
    pub fn thread(pidfd: Pidfd, proc: ProcFs, tid: u32) -> LinuxTask {
        LinuxTask { pidfd, files: None, thread: Some(ThreadFile { proc, tid, file: OnceLock::new() }) }
    }

    /// Open `file` of the process lazily; alive after the open, it is this process's.
    fn open_later(
        &self,
        files: &KeptFiles,
        open: fn(&ProcFs, u32) -> Result<OpenedFile, ProcError>,
    ) -> Result<(PathBuf, File), ProcError> {
        let f = open(&files.proc, files.pid)?;
        if self.pidfd.has_exited() {
            return Err(ProcError::Io {
                path: f.0,
                source: io::Error::from_raw_os_error(nix::errno::Errno::ESRCH as i32),
            });
        }
        Ok(f)
    }

    fn start_brk(&self, files: &KeptFiles) -> Result<Option<u64>, ProcError> {
        let mut stat = files.stat.lock().unwrap_or_else(|e| e.into_inner());
        if stat.is_none() {
            *stat = Some(self.open_later(files, ProcFs::open_stat)?);
        }
        files.proc.read_start_brk_at(stat.as_ref().expect("opened above"))
    }
}

impl Task for LinuxTask {
    fn exited(&self) -> bool {
        self.pidfd.has_exited()
    }

    fn signal(&self, sig: i32) -> io::Result<()> {
        self.pidfd.signal(sig)
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.pidfd.as_fd())
    }

    fn kept(&self) -> Option<&dyn Kept> {
        self.files.as_ref().map(|_| self as &dyn Kept)
    }

    fn state(&self) -> Option<ThreadState> {
        let t = self.thread.as_ref()?;
        // Opened by tid: the file is this thread's if the thread had not exited after the open
        // (its tid is not handed out again before that).
        // (Kept only while fds are plentiful: it saves opens, and must not take the fds they need.)
        let file = t.file.get_or_init(|| {
            let f = t.proc.open_syscall(t.tid).ok()?;
            (heapcap_linux::rlimit::plentiful(f.1.as_raw_fd()) && !self.pidfd.has_exited()).then_some(f)
        });
        file.as_ref().map(|f| t.proc.thread_state_at(f))
    }
}

impl Kept for LinuxTask {
    fn upper(&self) -> Result<u64, ProcError> {
        let files = self.files.as_ref().expect("kept() said so");
        files.proc.read_upper_at(&files.statm, files.page)
    }

    fn image(&self) -> Result<(u64, Option<u64>), ProcError> {
        let files = self.files.as_ref().expect("kept() said so");
        let start_brk = self.start_brk(files)?;
        Ok((files.proc.read_upper_at(&files.statm, files.page)?, start_brk))
    }

    fn maps(&self, range: Option<(u64, u64)>) -> Option<Result<Snapshot, ProcError>> {
        let files = self.files.as_ref().expect("kept() said so");
        let read = || -> Option<Result<Snapshot, ProcError>> {
            let start_brk = match self.start_brk(files) {
                Ok(b) => b,
                Err(e) => return Some(Err(e)),
            };
            let mut maps = files.maps.lock().unwrap_or_else(|e| e.into_inner());
            if maps.is_none() {
                match self.open_later(files, ProcFs::open_maps) {
                    Ok(m) => *maps = Some(m),
                    Err(e) => return Some(Err(e)),
                }
            }
            let walked = files.proc.walk_at(files.pid, maps.as_ref().expect("opened above"), range, start_brk)?;
            if walked.as_ref().is_err_and(ProcError::is_gone) {
                *maps = None; // an address space left behind by an exec not yet settled
            }
            let upper = files.proc.read_upper_at(&files.statm, files.page).ok();
            Some(walked.map(|maps| Snapshot { maps, start_brk, upper }))
        };
        match read() {
            // Once more, through a fresh open, if the kept file was an old address space's.
            Some(Err(e)) if e.is_gone() && !self.pidfd.has_exited() => read(),
            other => other,
        }
    }

    fn new_image(&self) {
        if let Some(files) = &self.files {
            *files.maps.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }
}

/// The real `/proc` and pidfds.
#[derive(Debug, Clone)]
pub struct LinuxProc {
    proc: ProcFs,
    /// Read where a process's break starts (`stat`) when it is admitted, not at its first
    /// `brk`: for a supervisor that might not read it later (once the process stops being
    /// dumpable). Most short processes never call `brk`: a privileged supervisor saves them
    /// the read.
    start_brk_at_admission: bool,
}

impl Default for LinuxProc {
    fn default() -> LinuxProc {
        LinuxProc::new(ProcFs::default())
    }
}

impl LinuxProc {
    pub fn new(proc: ProcFs) -> LinuxProc {
        LinuxProc { proc, start_brk_at_admission: !heapcap_linux::userns::reads_every_process() }
    }
}

/// What [`LinuxProc`] opened.
#[derive(Debug)]
pub enum LinuxOpened {
    Thread {
        tid: u32,
        status: (PathBuf, File),
        handle: Option<Pidfd>,
    },
    /// A thread that is its process's leader: its pid is its id, and its process handle is its handle.
    Leader {
        pid: u32,
        handle: Pidfd,
    },
    Admission {
        task: Pidfd,
        pid: u32,
        statm: (PathBuf, File),
        /// For the start of the break (a process's brk is tracked from it, and once it stops
        /// being dumpable nothing else tells it).
        stat: Option<(PathBuf, File)>,
        command: Option<OpenedCommand>,
    },
    Maps {
        files: Opened,
        range: Option<(u64, u64)>,
    },
    Upper((PathBuf, File)),
    Memory {
        mem: (PathBuf, File),
        addr: u64,
        len: usize,
    },
    Command(OpenedCommand),
    Alone {
        tid: u32,
        status: (PathBuf, File),
        maps: Opened,
        addr: u64,
        len: usize,
    },
    Segment {
        ns: File,
        shmid: u64,
    },
}

fn pidfd_error(pid: u32, source: io::Error) -> ProcError {
    ProcError::Io { path: format!("pidfd of {pid}").into(), source }
}

impl ProcView for LinuxProc {
    type Opened = LinuxOpened;
    type Task = LinuxTask;

    fn open(&self, pid: u32, want: Want) -> Result<LinuxOpened, ProcError> {
        Ok(match want {
            // A process pidfd opens only for a thread-group leader: then the thread is its
            // process (and that pidfd tells when its id can be handed out again: not before the
            // whole process is gone). Other threads read their process from `status`.
            Want::Thread => match Pidfd::open(pid) {
                Ok(handle) => LinuxOpened::Leader { pid, handle },
                // Not a leader: EINVAL, or ENOENT on recent kernels (as for an id with no process).
                Err(e)
                    if matches!(
                        nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0)),
                        nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT
                    ) =>
                {
                    LinuxOpened::Thread {
                        tid: pid,
                        status: self.proc.open_status(pid)?,
                        handle: Pidfd::open_thread(pid).ok(),
                    }
                }
                Err(e) => return Err(pidfd_error(pid, e)),
            },
            Want::Admission { command } => {
                let statm = self.proc.open_statm(pid)?;
                let task = Pidfd::open(pid).map_err(|e| pidfd_error(pid, e))?;
                let stat = self.start_brk_at_admission.then(|| self.proc.open_stat(pid).ok()).flatten();
                let command = command.then(|| self.proc.open_command(pid));
                LinuxOpened::Admission { task, pid, statm, stat, command }
            }
            Want::Maps { range } => LinuxOpened::Maps { files: self.proc.open_snapshot(pid)?, range },
            Want::Upper => LinuxOpened::Upper(self.proc.open_statm(pid)?),
            Want::Memory { addr, len } => LinuxOpened::Memory { mem: self.proc.open_mem(pid)?, addr, len },
            Want::Command => LinuxOpened::Command(self.proc.open_command(pid)),
            Want::Alone { addr, len } => LinuxOpened::Alone {
                tid: pid,
                status: self.proc.open_status(pid)?,
                maps: self.proc.open_snapshot(pid)?,
                addr,
                len,
            },
            Want::Segment { shmid } => LinuxOpened::Segment { ns: self.proc.open_ipc_ns(pid)?, shmid },
        })
    }

    fn read(&self, opened: LinuxOpened) -> Result<Reading<LinuxTask>, ProcError> {
        let page = heapcap_linux::page_size();
        Ok(match opened {
            LinuxOpened::Thread { tid, status, handle } => Reading::Thread {
                tgid: self.proc.read_tgid(status)?,
                handle: handle.map(|pidfd| LinuxTask::thread(pidfd, self.proc.clone(), tid)),
            },
            LinuxOpened::Leader { pid, handle } => {
                Reading::Thread { tgid: pid, handle: Some(LinuxTask::thread(handle, self.proc.clone(), pid)) }
            }
            LinuxOpened::Admission { task, pid, statm, stat, command } => {
                // statm (and stat, where it is read now): one short line each whatever the number
                // of mappings; the mappings are read when a decision needs them.
                let upper = self.proc.read_upper_at(&statm, page)?;
                let start_brk = stat.as_ref().and_then(|s| self.proc.read_start_brk_at(s).ok().flatten());
                let figure = match start_brk {
                    Some(start_brk) => Baseline::Image { upper, start_brk },
                    None => Baseline::Upper(upper),
                };
                let files = KeptFiles {
                    proc: self.proc.clone(),
                    pid,
                    page,
                    statm,
                    stat: Mutex::new(stat),
                    maps: Mutex::new(None),
                };
                let command = command.map(|c| self.proc.read_command(c)).unwrap_or_default();
                Reading::Admission {
                    task: LinuxTask { pidfd: task, files: Some(files), thread: None },
                    command,
                    figure,
                }
            }
            LinuxOpened::Maps { files, range } => {
                Reading::Maps(self.proc.read_snapshot_for(files, &mut String::new(), range)?)
            }
            LinuxOpened::Upper(statm) => Reading::Upper(self.proc.read_upper(statm, page)?),
            LinuxOpened::Memory { mem, addr, len } => {
                let mut buf = vec![0u8; len];
                self.proc.read_mem(&mem, addr, &mut buf)?;
                Reading::Memory(buf)
            }
            LinuxOpened::Command(command) => Reading::Command(self.proc.read_command(command)),
            LinuxOpened::Alone { tid, status, maps, addr, len } => {
                let (threads, tracer) = self.proc.read_threads_tracer(status)?;
                let range = Some((addr, addr.saturating_add(len as u64)));
                let snap = self.proc.read_snapshot_for(maps, &mut String::new(), range)?;
                Reading::Alone(if threads != 1 {
                    Some(format!("it has {threads} threads"))
                } else if tracer != 0 {
                    Some(format!("it is traced by {tracer}"))
                } else if !snap.maps.private_anonymous(addr, addr.saturating_add(len as u64)) {
                    Some("they are not in private anonymous memory".into())
                } else {
                    self.proc.vm_sharer(tid).map(|other| format!("process {other} shares its address space"))
                })
            }
            LinuxOpened::Segment { ns, shmid } => Reading::Segment(
                heapcap_linux::mmshare::segment_size(&ns, shmid)
                    .map_err(|source| ProcError::Io { path: format!("SysV segment {shmid}").into(), source })?,
            ),
        })
    }

    fn thread_state(&self, tid: u32) -> ThreadState {
        self.proc.thread_state(tid)
    }

    fn tasks(&self, pid: u32) -> Vec<u32> {
        self.proc.tasks(pid)
    }

    fn children(&self, pid: u32) -> Vec<u32> {
        self.proc.children(pid)
    }

    fn same_vm(&self, a: u32, b: u32) -> Result<bool, ProcError> {
        heapcap_linux::mmshare::same_vm(a, b)
            .map_err(|source| ProcError::Io { path: format!("kcmp({a}, {b}, KCMP_VM)").into(), source })
    }
}
