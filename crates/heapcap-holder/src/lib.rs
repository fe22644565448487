//! Restart safety for heapcapd: the listener fds live in a second, minimal process.
//!
//! When the last copy of a seccomp listener fd is closed, every call its filter notifies fails
//! with `ENOSYS` from then on, which kills the programs under it. So heapcapd hands a copy of
//! each listener fd to `heapcap-holder` before it serves it. If heapcapd crashes or is replaced,
//! the holder still has them; the callers simply wait in the kernel until the next heapcapd
//! connects, takes the fds back with what it knew of each container (the *record*: quotas and
//! mode, opaque to the holder), and answers them.
//!
//! The holder also keeps the *journal* ([`heapcap_linux::journal`]): one slot per listener where
//! heapcapd notes each call it has taken, so the call a dying heapcapd took but never answered is
//! answered by its successor instead of hanging its caller.
//!
//! If no heapcapd comes back within the grace period, the holder lets every call through
//! (containers run unquota'd, none fails) until one does. It drops a listener once every process
//! under it is gone, and exits when it holds nothing and no heapcapd is connected.
//!
//! The protocol: JSON datagrams on a root-only `SOCK_SEQPACKET` socket, fds as `SCM_RIGHTS`.

pub mod holder;
mod seqpacket;

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use heapcap_linux::journal::{Journal, Slot};
use serde::{Deserialize, Serialize};

/// Bumped when a message changes incompatibly.
pub const VERSION: u32 = 1;

/// The largest message either side sends.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// heapcapd to the holder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ToHolder {
    /// The first message: give me everything you hold.
    Hello { version: u32 },
    /// Hold this listener (the fd comes with the message): container `container`, first served
    /// for process `pid`.
    Hold { container: String, pid: u32, record: serde_json::Value },
    /// The container's record changed (e.g. `heapcap set-limit`).
    Update { container: String, record: serde_json::Value },
}

/// The holder to heapcapd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum FromHolder {
    /// Answer to `hello`, with the journal's memfd; `held` messages follow.
    Welcome {
        version: u32,
        held: usize,
    },
    /// One held listener (the fd comes with the message) and its journal slot.
    Held {
        slot: usize,
        container: String,
        pid: u32,
        record: serde_json::Value,
    },
    /// Answer to `hold`: the listener's journal slot.
    Holding {
        slot: usize,
    },
    Error {
        message: String,
    },
}

/// A listener handed back by the holder.
#[derive(Debug)]
pub struct Held {
    pub container: String,
    pub pid: u32,
    pub record: serde_json::Value,
    pub listener: OwnedFd,
    pub slot: Slot,
}

/// heapcapd's connection to the holder. Requests from several threads are serialised, so each
/// gets its own answer.
#[derive(Debug)]
pub struct Client {
    sock: OwnedFd,
    /// Held for a request and its answer.
    turn: Mutex<()>,
    journal: Arc<Journal>,
}

fn protocol(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

impl Client {
    /// Connect, and take back everything the holder holds.
    pub fn connect(path: &Path) -> io::Result<(Client, Vec<Held>)> {
        let sock = seqpacket::connect(path)?;
        // A holder that stops answering must not hang container starts.
        let timeout = nix::sys::time::TimeVal::new(5, 0);
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)?;
        seqpacket::send(sock.as_fd(), &ToHolder::Hello { version: VERSION }, &[])?;
        let (welcome, mut fds) = seqpacket::recv::<FromHolder>(sock.as_fd())?;
        let held = match welcome {
            FromHolder::Welcome { version, held } if version == VERSION => held,
            FromHolder::Welcome { version, .. } => {
                return Err(protocol(format!("the holder speaks version {version}, this heapcapd {VERSION}")))
            }
            FromHolder::Error { message } => return Err(io::Error::new(io::ErrorKind::AddrInUse, message)),
            other => return Err(protocol(format!("unexpected answer to hello: {other:?}"))),
        };
        let journal = fds.pop().filter(|_| fds.is_empty()).ok_or_else(|| protocol("welcome came without a journal"))?;
        let journal = Arc::new(Journal::map(journal)?);
        let mut out = Vec::with_capacity(held);
        for _ in 0..held {
            let (message, mut fds) = seqpacket::recv::<FromHolder>(sock.as_fd())?;
            let FromHolder::Held { slot, container, pid, record } = message else {
                return Err(protocol(format!("expected a held listener, got {message:?}")));
            };
            let listener = fds.pop().filter(|_| fds.is_empty()).ok_or_else(|| protocol("held came without its fd"))?;
            let slot = Slot::new(journal.clone(), slot).ok_or_else(|| protocol(format!("no journal slot {slot}")))?;
            out.push(Held { container, pid, record, listener, slot });
        }
        Ok((Client { sock, turn: Mutex::new(()), journal }, out))
    }

    /// Hand a copy of `listener` to the holder; returns its journal slot.
    pub fn hold(
        &self,
        container: &str,
        pid: u32,
        record: serde_json::Value,
        listener: BorrowedFd<'_>,
    ) -> io::Result<Slot> {
        let message = ToHolder::Hold { container: container.to_string(), pid, record };
        let _turn = self.turn.lock().unwrap_or_else(|e| e.into_inner());
        seqpacket::send(self.sock.as_fd(), &message, &[listener])?;
        match seqpacket::recv::<FromHolder>(self.sock.as_fd())?.0 {
            FromHolder::Holding { slot } => {
                Slot::new(self.journal.clone(), slot).ok_or_else(|| protocol(format!("no journal slot {slot}")))
            }
            FromHolder::Error { message } => Err(io::Error::other(message)),
            other => Err(protocol(format!("unexpected answer to hold: {other:?}"))),
        }
    }

    /// Replace the record of every listener of `container`.
    pub fn update(&self, container: &str, record: serde_json::Value) -> io::Result<()> {
        let _turn = self.turn.lock().unwrap_or_else(|e| e.into_inner());
        seqpacket::send(self.sock.as_fd(), &ToHolder::Update { container: container.to_string(), record }, &[])
    }

    /// Whether the holder is still at the other end: the connection is not hung up (a holder that
    /// exits or is killed closes its end, which the kernel reports as `POLLHUP`).
    /// Never waits (a poll with no timeout), and takes no turn: a request in flight is not
    /// disturbed.
    pub fn connected(&self) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = [PollFd::new(self.sock.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(_) => {
                let gone = PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL;
                !fds[0].revents().is_some_and(|r| r.intersects(gone))
            }
            Err(_) => false,
        }
    }
}

/// Where `heapcap-holder` is: beside the running executable, else on `PATH`.
pub fn default_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .map(|exe| exe.with_file_name("heapcap-holder"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("heapcap-holder"))
}

/// Connect to the holder at `socket`, starting `binary` first if none is there.
pub fn connect_or_start(socket: &Path, binary: &Path, grace: Duration) -> io::Result<(Client, Vec<Held>)> {
    match Client::connect(socket) {
        Ok(c) => return Ok(c),
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {}
        Err(e) => return Err(e),
    }
    let mut child = std::process::Command::new(binary)
        .arg("--socket")
        .arg(socket)
        .arg("--grace")
        .arg(humantime::format_duration(grace).to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        // Its own process group: a terminal's ^C to heapcapd must not reach it.
        .process_group(0)
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot start {}: {e}", binary.display())))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Client::connect(socket) {
            Ok(c) => {
                // It outlives us on purpose; reap it from a thread should it exit first.
                std::thread::spawn(move || child.wait());
                return Ok(c);
            }
            Err(e) if Instant::now() < deadline && !matches!(child.try_wait(), Ok(Some(_))) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                let status = child.try_wait().ok().flatten().map(|s| format!(" ({s})")).unwrap_or_default();
                return Err(io::Error::new(e.kind(), format!("{} did not come up{status}: {e}", binary.display())));
            }
        }
    }
}
