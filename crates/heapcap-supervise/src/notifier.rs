//! The listener the engine answers through: receive, answer, check that a notification is still
//! pending, choose how the kernel wakes. Production passes heapcap-linux's [`Listener`]; tests
//! pass scripted ones.

use std::io;

use heapcap_linux::notify::{Answered, Errno, Listener, Recv};

/// How a call is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Let the kernel carry it out.
    Continue,
    /// Fail it with `ENOMEM`.
    NoMemory,
    /// Skip it and return this value (a refused `brk` returns the unchanged break; a call heapcap
    /// carried out itself returns what the kernel's would).
    Value(i64),
    /// Fail it with `EFAULT` (a call heapcap carries out itself, given a bad buffer).
    Fault,
}

/// A seccomp listener.
pub trait Notifier {
    /// Block until a notification arrives (or the filter's last user is gone).
    fn recv(&self) -> io::Result<Recv>;
    fn answer(&self, id: u64, reply: Reply) -> io::Result<Answered>;
    /// The notification is still pending: what was opened about its caller since it arrived is
    /// about that caller.
    fn id_valid(&self, id: u64) -> bool;
    /// Wake the caller and the supervisor on each other's CPU, or not; false if the kernel
    /// cannot.
    fn set_sync_wakeup(&self, on: bool) -> io::Result<bool>;
}

impl Notifier for Listener {
    fn recv(&self) -> io::Result<Recv> {
        Listener::recv(self)
    }

    fn answer(&self, id: u64, reply: Reply) -> io::Result<Answered> {
        match reply {
            Reply::Continue => self.allow(id),
            Reply::NoMemory => self.fail(id, Errno::NoMem),
            Reply::Fault => self.fail(id, Errno::Fault),
            Reply::Value(v) => self.return_value(id, v),
        }
    }

    fn id_valid(&self, id: u64) -> bool {
        Listener::id_valid(self, id)
    }

    fn set_sync_wakeup(&self, on: bool) -> io::Result<bool> {
        Listener::set_sync_wakeup(self, on)
    }
}
