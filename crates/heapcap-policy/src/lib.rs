//! The bottom of heapcap: everything that decides, and nothing that touches the system.
//!
//! - [`size`]: Kubernetes-style quantities (`64Mi`, `1Gi`, `500M`) and their display.
//! - [`quota`]: a size or `none`, as `heapcap set-limit` takes it and the control protocol carries it.
//! - [`syscall`]: which system calls can grow a process's heap, per ABI, and what they ask for.
//! - [`rules`]: the seccomp notify rules, as data, so the Linux layer and the OCI spec writer agree.
//! - [`maps`]: parsing `/proc/<pid>/maps` into the counted heap and range queries on it;
//!   [`mounts`]: which devices are disk-backed mounts (for strict mode's shared mappings).
//! - [`ledger`]: per-process bounds, quotas and decisions; [`denial`]: a refusal as reported.
//! - [`machine`]: what a process under a quota sees as its machine's memory (`sysinfo(2)`).
//!
//! What counts as heap: private, anonymous, writable mappings (the `brk` heap, anonymous private
//! writable `mmap`, memory made writable with `mprotect`, `mremap` growth). File mappings of any
//! kind, shared memory and the main thread's stack do not count. Strict mode ([`Counting::Strict`])
//! counts more: see [`maps`].
#![forbid(unsafe_code)]

pub mod denial;
pub mod ledger;
pub mod machine;
pub mod maps;
pub mod mounts;
pub mod quota;
pub mod rules;
pub mod settings;
pub mod size;
pub mod syscall;

pub use denial::Denial;
pub use ledger::{Counting, Deny, Figure, Ledger, Limits, Mode, NameError, Need, Scope, Step, Verdict};
pub use machine::MachineMemory;
pub use quota::{Quota, QuotaError};
pub use size::{Size, SizeError};
