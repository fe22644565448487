//! heapcap's supervisor: answers seccomp listeners' notifications from a [`Ledger`].
//!
//! - [`engine`]: notification -> decision -> answer, in one place ([`Engine::decide`]).
//! - [`procview`] and [`notifier`]: the two small interfaces the engine reads and answers
//!   through; production passes the real `/proc` ([`LinuxProc`]) and listener, tests pass
//!   scripted ones that fail on cue.
//! - [`emulate`]: what calls heapcap carries out itself (`sysinfo` under a quota) need from the
//!   system, a third small interface ([`Emulator`]).
//! - [`accounts`]: a container's ledger and process handles, locked only for pure work.
//! - [`supervisor`]: one container's supervisor ([`Supervisor`]): accounts, `/proc` view,
//!   denials, metrics, refreshes for `ps`.
//! - `serve`: the receive loop, one dedicated thread per listener ([`Supervisor::serve`]), and
//!   [`wakeup`], the wake-up mode it picks from what each listener sees.
//! - `recovery`: taking listeners over from a supervisor that died ([`Supervisor::resume`],
//!   [`Supervisor::adopt`]).
//! - `threads` and [`exits`]: which process a thread is in, and seeing processes exit.
#![forbid(unsafe_code)]

pub mod accounts;
pub mod emulate;
pub mod engine;
pub mod exits;
pub mod notifier;
pub mod procview;
mod recent;
mod recovery;
mod serve;
pub mod supervisor;
mod threads;
pub mod wakeup;

pub use accounts::Accounts;
pub use emulate::{Emulator, LinuxEmulator};
pub use engine::{Answer, Engine};
pub use exits::ExitWatcher;
pub use heapcap_policy::denial::Denial;
pub use heapcap_policy::ledger::{Ledger, Limits, Mode, Summary};
pub use notifier::{Notifier, Reply};
pub use procview::{LinuxProc, ProcView};
pub use serve::Serve;
pub use supervisor::{Observer, Outcome, Stats, Supervisor};
