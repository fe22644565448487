//! What heapcap's programs take from the system they run on, defined once for all of them.
//!
//! - [`paths`]: where heapcapd's sockets and the fd holder's are unless told otherwise.
//! - [`flag`]: yes/no environment variables, read one way.
//!
//! It sits beside `heapcap-policy` at the bottom of the dependency graph: no I/O (it reads the
//! process's environment, nothing else) and no dependency but `thiserror`, so every crate that
//! needs a default (the OCI spec writer, the daemon, the hook, the shim, the CLI) can depend on
//! it without pulling in anything else.
#![forbid(unsafe_code)]

pub mod flag;
pub mod paths;
