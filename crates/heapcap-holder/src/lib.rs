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
    /// Sent instead of `hello` to a new holder by a heapcapd whose holder died: keep this
    /// journal (the memfd comes with the message) instead of your own; `hold`s with their slots
    /// follow. Refused by a holder that already holds listeners.
    Restore { version: u32 },
    /// Hold this listener (the fd comes with the message): container `container`, first served
    /// for process `pid`. `slot`: its journal slot, when heapcapd already has one (after
    /// `restore`); else the holder picks a free one.
    Hold {
        container: String,
        pid: u32,
        record: serde_json::Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slot: Option<usize>,
    },
    /// The container's record changed (e.g. `heapcap set-limit`).
    Update { container: String, record: serde_json::Value },
}

/// The holder to heapcapd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum FromHolder {
    /// Answer to `hello`, with the journal's memfd; `held` messages follow. Answer to `restore`
    /// too, with no fd and `held: 0`.
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
        let sock = open(path)?;
        seqpacket::send(sock.as_fd(), &ToHolder::Hello { version: VERSION }, &[])?;
        let (welcome, mut fds) = seqpacket::recv::<FromHolder>(sock.as_fd())?;
        let held = welcomed(welcome)?;
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

    /// Connect to a new holder (the last one died) and give it `journal`, the one the serving
    /// threads note their calls in; then hand it every listener with [`Client::hold_at`]. A
    /// holder that already holds listeners refuses.
    pub fn restore(path: &Path, journal: Arc<Journal>) -> io::Result<Client> {
        let sock = open(path)?;
        seqpacket::send(sock.as_fd(), &ToHolder::Restore { version: VERSION }, &[journal.as_fd()])?;
        let (welcome, fds) = seqpacket::recv::<FromHolder>(sock.as_fd())?;
        if welcomed(welcome)? != 0 || !fds.is_empty() {
            return Err(protocol("the holder answered restore as if it held listeners"));
        }
        Ok(Client { sock, turn: Mutex::new(()), journal })
    }

    /// The journal the holder keeps (its slots are the serving threads').
    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    /// Hand a copy of `listener` to the holder; returns its journal slot.
    pub fn hold(
        &self,
        container: &str,
        pid: u32,
        record: serde_json::Value,
        listener: BorrowedFd<'_>,
    ) -> io::Result<Slot> {
        let slot =
            self.request(ToHolder::Hold { container: container.to_string(), pid, record, slot: None }, listener)?;
        Slot::new(self.journal.clone(), slot).ok_or_else(|| protocol(format!("no journal slot {slot}")))
    }

    /// Hand a copy of `listener` to the holder, noting its calls in `slot` (a listener served
    /// since before the holder was started: see [`Client::restore`]).
    pub fn hold_at(
        &self,
        container: &str,
        pid: u32,
        record: serde_json::Value,
        listener: BorrowedFd<'_>,
        slot: &Slot,
    ) -> io::Result<()> {
        let message = ToHolder::Hold { container: container.to_string(), pid, record, slot: Some(slot.index()) };
        match self.request(message, listener)? {
            got if got == slot.index() => Ok(()),
            got => Err(protocol(format!("asked for journal slot {}, the holder gave {got}", slot.index()))),
        }
    }

    /// Send a `hold` with its listener; the slot the holder answers with.
    fn request(&self, message: ToHolder, listener: BorrowedFd<'_>) -> io::Result<usize> {
        let _turn = self.turn.lock().unwrap_or_else(|e| e.into_inner());
        seqpacket::send(self.sock.as_fd(), &message, &[listener])?;
        match seqpacket::recv::<FromHolder>(self.sock.as_fd())?.0 {
            FromHolder::Holding { slot } => Ok(slot),
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

    /// Wait until the holder hangs up (it exited or was killed). Waits for nothing else: no
    /// event is asked for, and hang-up and errors are always reported.
    pub fn wait_hangup(&self) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        loop {
            let mut fds = [PollFd::new(self.sock.as_fd(), PollFlags::empty())];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(n) if n > 0 => return,
                Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return,
            }
        }
    }
}

/// A connection to the holder at `path`, with a receive deadline.
fn open(path: &Path) -> io::Result<OwnedFd> {
    let sock = seqpacket::connect(path)?;
    // A holder that stops answering must not hang container starts.
    let timeout = nix::sys::time::TimeVal::new(5, 0);
    nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)?;
    Ok(sock)
}

/// How many listeners a welcome announces.
fn welcomed(welcome: FromHolder) -> io::Result<usize> {
    match welcome {
        FromHolder::Welcome { version, held } if version == VERSION => Ok(held),
        FromHolder::Welcome { version, .. } => {
            Err(protocol(format!("the holder speaks version {version}, this heapcapd {VERSION}")))
        }
        FromHolder::Error { message } => Err(io::Error::new(io::ErrorKind::AddrInUse, message)),
        other => Err(protocol(format!("unexpected answer to hello: {other:?}"))),
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
    reach(socket, binary, grace, || Client::connect(socket))
}

/// A new holder for a heapcapd whose holder died: the one at `socket` if one is there (restarted
/// by a service manager), else `binary` started now; given `journal` ([`Client::restore`]).
pub fn restore_or_start(socket: &Path, binary: &Path, grace: Duration, journal: &Arc<Journal>) -> io::Result<Client> {
    reach(socket, binary, grace, || Client::restore(socket, journal.clone()))
}

/// `attempt` (a connection to the holder at `socket`), starting `binary` first if none is there.
fn reach<T>(socket: &Path, binary: &Path, grace: Duration, attempt: impl Fn() -> io::Result<T>) -> io::Result<T> {
    match attempt() {
        Ok(c) => return Ok(c),
        // Nobody there; or a holder dying as we connect (its listening socket closes a moment
        // after the connection heapcapd watches hung up): start one.
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound
                    | io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            ) => {}
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
        match attempt() {
            Ok(c) => {
                // It outlives us on purpose; reap it from a thread should it exit first.
                std::thread::spawn(move || child.wait());
                return Ok(c);
            }
            Err(e) if Instant::now() < deadline && !matches!(child.try_wait(), Ok(Some(_))) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                let status = child.try_wait().ok().flatten().map(|s| format!(" ({s})")).unwrap_or_default();
                return Err(io::Error::new(e.kind(), format!("{} did not come up{status}: {e}", binary.display())));
            }
        }
    }
}
