//! A refused growth, with what it was refused on: what the engine hands to the logs, `heapcap
//! events` and the metrics.

use std::time::SystemTime;

use crate::ledger::Scope;

/// A growth that was refused, with the figures it was refused on. A figure that could not be
/// known is `None`, never a placeholder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub time: SystemTime,
    /// The calling process; `None` when not even that could be read.
    pub pid: Option<u32>,
    /// The calling thread.
    pub tid: u32,
    pub command: String,
    /// The call's name (`brk`, `mmap`, `mremap`, `mprotect`).
    pub syscall: &'static str,
    /// What the call would add; `None` when it cannot be known (a `brk` whose base is unknown).
    pub request: Option<u64>,
    /// The usage the quota was held against (the process's, or for `Total` the container's);
    /// `None` when nothing of the process is known.
    pub usage: Option<u64>,
    pub limit: u64,
    pub scope: Scope,
    /// Why it was refused when not simply over the quota: what could not be read, and why.
    pub reason: Option<String>,
    /// For a refused `brk`: the unchanged program break the call returns (the kernel's `brk`
    /// reports failure that way, never with an errno; 0, when the break is not known, makes libc
    /// ask the kernel again).
    pub brk_return: Option<u64>,
}
