//! heapcap's supervisor: answers one seccomp listener's notifications from a [`Ledger`].
//!
//! One thread per listener blocks in `SECCOMP_IOCTL_NOTIF_RECV` (so the kernel's synchronous
//! wake-up keeps the caller and the supervisor on one CPU), decides from the ledger, and
//! answers. Process exits are seen through pidfds by an [`ExitWatcher`] thread.
#![forbid(unsafe_code)]

mod exits;
mod serve;
mod threads;

pub use exits::ExitWatcher;
pub use heapcap_policy::ledger::{Ledger, Limits, Mode, Summary};
pub use serve::{Denial, Observer, Outcome, Shared, Stats, Supervisor};
