//! The ledger's vocabulary: quotas and modes, what is read about a process, and what a decision
//! says. Shared with the engine above, which reads `/proc` and answers the kernel.

use std::fmt;
use std::str::FromStr;

use crate::maps::Maps;
use crate::syscall::page_up;

pub type Pid = u32;
pub type Tid = u32;

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

/// What a process is charged for. Written `heap` and `strict` (`heapcap ps`, the metrics).
///
/// - `Heap` (the default): private anonymous writable memory, the paper's heap.
/// - `Strict`: what no program can step around: every writable private mapping (what
///   `RLIMIT_DATA` counts) plus every writable shared mapping of memory that only RAM and swap
///   back (memfd, SysV shm, tmpfs files, `MAP_SHARED` anonymous), charged to each process that
///   maps it. See [`crate::maps`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Counting {
    #[default]
    Heap,
    Strict,
}

impl Counting {
    /// The name users read.
    pub fn name(self) -> &'static str {
        match self {
            Counting::Heap => "heap",
            Counting::Strict => "strict",
        }
    }

    pub fn from_strict(strict: bool) -> Counting {
        if strict {
            Counting::Strict
        } else {
            Counting::Heap
        }
    }
}

impl fmt::Display for Counting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
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
    /// `statm`'s upper figure read with the maps, when it was: what it shows beyond the counted
    /// heap (private file data, stacks) lets later `statm` figures estimate the heap.
    pub upper: Option<u64>,
}

impl Snapshot {
    /// The page-aligned program break: the end of `[heap]`, or `start_brk` if it never grew.
    pub fn brk(&self, page: u64) -> Option<u64> {
        // 0: the kernel hid it (no ptrace access to the process), never a real break.
        self.maps.heap_end().or_else(|| self.start_brk.filter(|b| *b != 0).and_then(|b| page_up(b, page)))
    }
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

/// How current a figure read outside the ledger's lock is: taken (under the lock) before the
/// reads, handed back with what was read. A figure is of the process the token names only if no
/// exec settled and no other process took the pid in between (`image`); growth let through
/// after the token (`seq`) may be missing from it and is never retired by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    pub(crate) image: u64,
    pub(crate) seq: u64,
}

/// A figure of a process's counted heap, read from `/proc` (states of its threads with growth in
/// flight read first: see [`crate::ledger::Ledger::decide`]).
#[derive(Debug, Clone, Copy)]
pub enum Figure<'a> {
    /// The mappings: the exact counted heap, the program break, and the range a request touches.
    Exact(&'a Snapshot),
    /// The kernel's private writable total plus stacks (`/proc/<pid>/statm`): never below the
    /// counted heap, cheap whatever the number of mappings.
    Upper(u64),
    /// As `Upper`, when the mappings cannot be read (the process is not dumpable, or `/proc` is
    /// refused): the best figure there is.
    UpperOnly(u64),
    /// A new image's first figure, after an exec: `statm`, and `start_brk` from
    /// `/proc/<pid>/stat` (a new image's break, its heap not grown yet). Cheap whatever the
    /// number of mappings; an upper figure like [`Figure::Upper`].
    Image { upper: u64, start_brk: Option<u64> },
    /// Nothing could be read: decide from what the notifications told.
    Unread,
}

/// Which figure a request needs before it can be decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// `/proc/<pid>/statm` may settle it (a quota in question, or a peak past its mark).
    Upper,
    /// The mappings (a new peak confirmed, a `brk` whose base is unknown, a denial).
    Exact,
    /// A new image's `statm` and `start_brk` ([`Figure::Image`]).
    Image,
}

/// The outcome of the fast path ([`crate::ledger::Ledger::fast`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Let it through; already charged.
    Allow,
    /// Read a figure first. `refresh_others`: the total quota is in question, so the other
    /// processes' figures are worth refreshing too.
    Measure { need: Need, refresh_others: bool },
}

/// A refusal, with the figures it was decided on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deny {
    pub scope: Scope,
    /// The usage the quota was held against: the process's (or, for `Total`, the container's).
    pub usage: u64,
    /// What the call would add; `None` when it cannot be known (a `brk` whose base is unknown).
    pub request: Option<u64>,
    pub limit: u64,
}

/// The answer to a request, once a figure was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let it through; charged.
    Allow,
    Deny(Deny),
    /// The upper figure did not settle it (a quota in question, or a peak past its mark): read
    /// the mappings and decide again.
    MeasureExact,
    /// The figure is not of the process the ledger now accounts under that pid (an exec settled,
    /// or the pid was reused, while it was read): read again.
    Stale,
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
    /// Runtime code before the container's program starts: observed, never denied.
    pub runtime: bool,
    /// The mappings cannot be read: figures come from `statm` or the notifications alone.
    pub blind: bool,
}
