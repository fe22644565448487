//! What the engine reads about processes: a `/proc` view with a handful of methods, handed in
//! by the caller. Production passes [`LinuxProc`] (the real `/proc` and pidfds); tests pass
//! scripted views that fail on cue.
//!
//! Reads come in two steps, so the engine can check between them that what it opened is about
//! the task it means ([`checked`]): `open` binds to a task (an open `/proc/<pid>` file stays
//! bound to the task it was opened for), `read` reads what was opened.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;

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
}

/// What to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// A thread's process (`status`), and a handle on the thread.
    Thread,
    /// A process first seen: a handle on it, its command line, and its mappings, or, when
    /// `blind`, only `statm`.
    Admission { blind: bool },
    /// The mappings and the program break, plus every mapping overlapping `range`.
    Maps { range: Option<(u64, u64)> },
    /// `statm`'s upper figure of the counted heap.
    Upper,
    /// `len` bytes of the process's memory at `addr` (arguments passed by pointer).
    Memory { addr: u64, len: usize },
    /// The command line, for reports.
    Command,
}

/// What was read.
#[derive(Debug)]
pub enum Reading<T> {
    Thread { tgid: u32, handle: Option<T> },
    Admission { task: T, command: String, figure: Baseline },
    Maps(Snapshot),
    Upper(u64),
    Memory(Vec<u8>),
    Command(String),
}

/// A process's figure at admission.
#[derive(Debug)]
pub enum Baseline {
    Exact(Snapshot),
    /// From `statm` (the mappings are not readable).
    Upper(u64),
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

impl Task for Pidfd {
    fn exited(&self) -> bool {
        self.has_exited()
    }

    fn signal(&self, sig: i32) -> io::Result<()> {
        Pidfd::signal(self, sig)
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }
}

/// The real `/proc` and pidfds.
#[derive(Debug, Clone, Default)]
pub struct LinuxProc {
    proc: ProcFs,
}

impl LinuxProc {
    pub fn new(proc: ProcFs) -> LinuxProc {
        LinuxProc { proc }
    }
}

/// What [`LinuxProc`] opened.
#[derive(Debug)]
pub enum LinuxOpened {
    Thread { status: (PathBuf, std::fs::File), handle: Option<Pidfd> },
    Admission { task: Pidfd, command: OpenedCommand, figure: Box<AdmissionFiles> },
    Maps { files: Opened, range: Option<(u64, u64)> },
    Upper((PathBuf, std::fs::File)),
    Memory { mem: (PathBuf, std::fs::File), addr: u64, len: usize },
    Command(OpenedCommand),
}

/// The figure files of an admission.
#[derive(Debug)]
pub enum AdmissionFiles {
    Maps(Opened),
    Statm((PathBuf, std::fs::File)),
}

fn pidfd_error(pid: u32, source: io::Error) -> ProcError {
    ProcError::Io { path: format!("pidfd of {pid}").into(), source }
}

impl ProcView for LinuxProc {
    type Opened = LinuxOpened;
    type Task = Pidfd;

    fn open(&self, pid: u32, want: Want) -> Result<LinuxOpened, ProcError> {
        Ok(match want {
            Want::Thread => {
                LinuxOpened::Thread { status: self.proc.open_status(pid)?, handle: Pidfd::open_thread(pid).ok() }
            }
            Want::Admission { blind } => {
                let figure = match blind {
                    false => AdmissionFiles::Maps(self.proc.open_snapshot(pid)?),
                    true => AdmissionFiles::Statm(self.proc.open_statm(pid)?),
                };
                let task = Pidfd::open(pid).map_err(|e| pidfd_error(pid, e))?;
                LinuxOpened::Admission { task, command: self.proc.open_command(pid), figure: Box::new(figure) }
            }
            Want::Maps { range } => LinuxOpened::Maps { files: self.proc.open_snapshot(pid)?, range },
            Want::Upper => LinuxOpened::Upper(self.proc.open_statm(pid)?),
            Want::Memory { addr, len } => LinuxOpened::Memory { mem: self.proc.open_mem(pid)?, addr, len },
            Want::Command => LinuxOpened::Command(self.proc.open_command(pid)),
        })
    }

    fn read(&self, opened: LinuxOpened) -> Result<Reading<Pidfd>, ProcError> {
        let page = heapcap_linux::page_size();
        Ok(match opened {
            LinuxOpened::Thread { status, handle } => Reading::Thread { tgid: self.proc.read_tgid(status)?, handle },
            LinuxOpened::Admission { task, command, figure } => {
                let figure = match *figure {
                    // Grown on the first read of the maps as text (kernels before 6.11 only).
                    AdmissionFiles::Maps(files) => Baseline::Exact(self.proc.read_snapshot(files, &mut String::new())?),
                    AdmissionFiles::Statm(statm) => Baseline::Upper(self.proc.read_upper(statm, page)?),
                };
                Reading::Admission { task, command: self.proc.read_command(command), figure }
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
}
