//! heapcap's changes to OCI runtime specs: its seccomp notify rules as `linux.seccomp` entries,
//! a profile of its own, and a merge into an existing profile that never widens it.
//!
//! - [`agent`]: the OCI seccomp agent message runtimes send to heapcapd, parsed ([`agent::parse`]).
//! - [`cmdline`]: where a runtime's command line keeps its subcommand, bundle and `--log`.
//! - [`condition`]: argument conditions as sets of calls, to split a rule exactly in two.
//! - [`seccomp`]: the notify rules as OCI syscall entries ([`notify_syscalls`]), what they mean
//!   on each ABI, and [`heapcap_profile`].
//! - [`kubernetes`]: what containerd's CRI plugin and CRI-O write into annotations: whether a
//!   container is a pod's sandbox (never put under heapcap), and its pod's names.
//! - [`merge`]: [`merge_into`] an OCI `LinuxSeccomp`.
//! - [`containers`]: the same merge for the profile format of podman, CRI-O and Docker
//!   (`/usr/share/containers/seccomp.json`), which keeps its `archMap`, `includes` and `excludes`.
//!
//! - [`spec`]: the one change to a container's `config.json` (settings from annotations, env or
//!   defaults, validated; the profile merged or added), shared by the runtime shim and the hook.
//!
//! No I/O: callers read and write the files.
#![forbid(unsafe_code)]

pub mod agent;
pub mod cmdline;
pub mod condition;
pub mod containers;
#[cfg(test)]
mod eval;
pub mod kubernetes;
pub mod merge;
pub mod seccomp;
pub mod spec;
#[cfg(test)]
mod testdata;

pub use containers::ContainersProfile;
pub use heapcap_policy::rules::Extra;
pub use merge::{merge_into, merge_into_for, merge_into_with, MergeError};
pub use seccomp::{
    heapcap_profile, heapcap_profile_for, heapcap_profile_with, notify_syscalls, notify_syscalls_for,
    notify_syscalls_with, sends_strict_rules,
};
pub use spec::{apply_json, Defaults, Outcome, SpecError};
