//! The holder process: one thread, one epoll set (its socket, heapcapd's connection, and every
//! listener it holds, watched for hang-up). Deliberately small: it parses one kind of message
//! and never looks inside a record.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use heapcap_linux::journal::{Journal, Orphan, Slot};
use heapcap_linux::notify::{Listener, Recv};
use heapcap_linux::peercred::check_peer;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket;

use crate::{seqpacket, FromHolder, ToHolder, VERSION};

/// How the holder runs.
#[derive(Debug, Clone)]
pub struct Config {
    pub socket: PathBuf,
    /// How long the listeners wait for a heapcapd before the holder lets their calls through.
    pub grace: Duration,
    /// How many listeners it can hold.
    pub slots: usize,
    /// Exit if no heapcapd connects this soon after start.
    pub first_contact: Duration,
    /// Never exit by itself (run by a service manager, which would only start it again).
    pub stay: bool,
}

const LISTEN: u64 = u64::MAX;
const DAEMON: u64 = u64::MAX - 1;

struct Entry {
    listener: Listener,
    container: String,
    pid: u32,
    record: serde_json::Value,
}

struct Holder {
    config: Config,
    epoll: Epoll,
    listen: OwnedFd,
    journal: Arc<Journal>,
    entries: HashMap<usize, Entry>,
    daemon: Option<OwnedFd>,
    /// When the last heapcapd left (or the holder started), if none is connected.
    alone_since: Option<Instant>,
    ever_connected: bool,
    /// Letting calls through: no heapcapd came back within the grace period.
    failing_open: bool,
}

fn log(message: std::fmt::Arguments<'_>) {
    eprintln!("heapcap-holder[{}]: {message}", std::process::id());
}

/// Hold listeners until there is nothing left to hold.
pub fn run(config: Config) -> io::Result<()> {
    let _one = one_at_a_time(&config)?;
    let listen = seqpacket::listen(&config.socket)?;
    let journal = Arc::new(Journal::create(config.slots)?);
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    epoll.add(&listen, EpollEvent::new(EpollFlags::EPOLLIN, LISTEN))?;
    let mut h = Holder {
        config,
        epoll,
        listen,
        journal,
        entries: HashMap::new(),
        daemon: None,
        alone_since: Some(Instant::now()),
        ever_connected: false,
        failing_open: false,
    };
    log(format_args!("holding for heapcapd on {}", h.config.socket.display()));
    let result = h.run();
    let _ = std::fs::remove_file(&h.config.socket);
    result
}

impl Holder {
    fn run(&mut self) -> io::Result<()> {
        let mut events = vec![EpollEvent::empty(); 64];
        loop {
            if let Some(since) = self.alone_since {
                let limit = if self.ever_connected { Duration::ZERO } else { self.config.first_contact };
                if self.entries.is_empty() && since.elapsed() >= limit && !self.config.stay {
                    log(format_args!("nothing to hold and no heapcapd: exiting"));
                    return Ok(());
                }
                if !self.failing_open && !self.entries.is_empty() && since.elapsed() >= self.config.grace {
                    self.fail_open(true)?;
                }
            }
            let n = match self.epoll.wait(&mut events, self.timeout()) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            for ev in &events[..n] {
                match ev.data() {
                    LISTEN => self.accept(),
                    DAEMON => self.daemon_message(),
                    slot => self.listener_event(slot as usize, ev.events()),
                }
            }
        }
    }

    fn timeout(&self) -> EpollTimeout {
        let Some(since) = self.alone_since else { return EpollTimeout::NONE };
        let until = if self.entries.is_empty() {
            if self.config.stay {
                return EpollTimeout::NONE;
            } else if self.ever_connected {
                Duration::ZERO
            } else {
                self.config.first_contact
            }
        } else if self.failing_open {
            return EpollTimeout::NONE;
        } else {
            self.config.grace
        };
        let left = until.saturating_sub(since.elapsed()).as_millis().clamp(1, 60_000) as u32;
        EpollTimeout::try_from(left).unwrap_or(EpollTimeout::NONE)
    }

    /// Start (or stop) letting the held listeners' calls through.
    fn fail_open(&mut self, on: bool) -> io::Result<()> {
        if on {
            log(format_args!(
                "no heapcapd for {}: letting calls of {} listener(s) through until one connects",
                humantime::format_duration(self.config.grace),
                self.entries.len()
            ));
        }
        self.failing_open = on;
        let flags = if on { EpollFlags::EPOLLIN } else { EpollFlags::empty() };
        for (slot, e) in &self.entries {
            self.epoll.modify(e.listener.as_fd(), &mut EpollEvent::new(flags, *slot as u64))?;
            if on {
                // The call the last heapcapd took and never answered: nobody else will.
                let journal_slot = Slot::new(self.journal.clone(), *slot).expect("slot in range");
                match journal_slot.orphan(&e.listener) {
                    Some(Orphan::Noted(n)) => drop(e.listener.allow(n.id)),
                    Some(Orphan::Unnoted(id)) => drop(e.listener.allow(id)),
                    None => {}
                }
            }
        }
        Ok(())
    }

    fn accept(&mut self) {
        let conn = match heapcap_linux::fdpass::accept(self.listen.as_fd()) {
            Ok(fd) => fd,
            Err(e) => return log(format_args!("accept failed: {e}")),
        };
        // Only root, or the holder's own user, may talk to it.
        if let Err(why) = check_peer(conn.as_fd()) {
            log(format_args!("refused a connection: {why}"));
            return refuse(conn, why.to_string());
        }
        if self.daemon.is_some() {
            return refuse(conn, "another heapcapd is connected to this holder".to_string());
        }
        if let Err(e) = self.epoll.add(&conn, EpollEvent::new(EpollFlags::EPOLLIN, DAEMON)) {
            return log(format_args!("cannot watch a connection: {e}"));
        }
        self.daemon = Some(conn);
    }

    fn daemon_gone(&mut self, why: &str) {
        if let Some(conn) = self.daemon.take() {
            let _ = self.epoll.delete(&conn);
            if self.ever_connected {
                log(format_args!("heapcapd left ({why}); holding {} listener(s)", self.entries.len()));
            }
            self.alone_since = Some(Instant::now());
        }
    }

    fn daemon_message(&mut self) {
        let Some(conn) = self.daemon.as_ref().map(|c| c.as_fd().try_clone_to_owned()) else { return };
        let conn = match conn {
            Ok(c) => c,
            Err(e) => return self.daemon_gone(&e.to_string()),
        };
        let (message, mut fds) = match seqpacket::recv::<ToHolder>(conn.as_fd()) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let _ = seqpacket::send(conn.as_fd(), &FromHolder::Error { message: e.to_string() }, &[]);
                return;
            }
            Err(e) => return self.daemon_gone(&e.to_string()),
        };
        let reply = match message {
            ToHolder::Hello { version } => return self.hello(conn.as_fd(), version),
            ToHolder::Restore { version } => match (fds.pop(), fds.is_empty()) {
                (Some(fd), true) => return self.restore(conn.as_fd(), version, fd),
                _ => Err("send exactly one journal fd with restore".to_string()),
            },
            ToHolder::Hold { container, pid, record, slot } => match (fds.pop(), fds.is_empty()) {
                (Some(fd), true) => self.hold(container, pid, record, fd, slot),
                _ => Err("send exactly one listener fd with hold".to_string()),
            },
            ToHolder::Update { container, record } => {
                for e in self.entries.values_mut().filter(|e| e.container == container) {
                    e.record = record.clone();
                }
                return;
            }
        };
        let reply = reply.unwrap_or_else(|message| FromHolder::Error { message });
        if let Err(e) = seqpacket::send(conn.as_fd(), &reply, &[]) {
            self.daemon_gone(&e.to_string());
        }
    }

    fn hello(&mut self, conn: BorrowedFd<'_>, version: u32) {
        if version != VERSION {
            let message = format!("this holder speaks version {VERSION}, heapcapd {version}: stop the holder's containers or run a matching heapcapd");
            let _ = seqpacket::send(conn, &FromHolder::Error { message }, &[]);
            return self.daemon_gone("version mismatch");
        }
        if self.failing_open {
            if let Err(e) = self.fail_open(false) {
                log(format_args!("cannot stop letting calls through: {e}"));
            }
            log(format_args!("heapcapd is back: it answers from now on"));
        }
        self.ever_connected = true;
        self.alone_since = None;
        let welcome = FromHolder::Welcome { version: VERSION, held: self.entries.len() };
        let mut sent = seqpacket::send(conn, &welcome, &[self.journal.as_fd()]);
        for (slot, e) in &self.entries {
            if sent.is_err() {
                break;
            }
            let held =
                FromHolder::Held { slot: *slot, container: e.container.clone(), pid: e.pid, record: e.record.clone() };
            sent = seqpacket::send(conn, &held, &[e.listener.as_fd()]);
        }
        match sent {
            Ok(()) if !self.entries.is_empty() => {
                log(format_args!("handed {} listener(s) back to heapcapd", self.entries.len()))
            }
            Ok(()) => {}
            Err(e) => self.daemon_gone(&e.to_string()),
        }
    }

    /// A heapcapd whose last holder died: keep its journal (the one its threads note calls in)
    /// instead of ours; it hands every listener back with its slot next.
    fn restore(&mut self, conn: BorrowedFd<'_>, version: u32, fd: OwnedFd) {
        let refused = if version != VERSION {
            Some(format!("this holder speaks version {VERSION}, heapcapd {version}"))
        } else if !self.entries.is_empty() {
            Some(format!("this holder already holds {} listener(s): connect with hello", self.entries.len()))
        } else {
            match Journal::map(fd) {
                Ok(journal) => {
                    self.journal = Arc::new(journal);
                    None
                }
                Err(e) => Some(format!("the journal sent with restore cannot be used: {e}")),
            }
        };
        if let Some(message) = refused {
            let _ = seqpacket::send(conn, &FromHolder::Error { message }, &[]);
            return self.daemon_gone("restore refused");
        }
        self.ever_connected = true;
        self.alone_since = None;
        log(format_args!("restoring heapcapd's listeners: the last holder is gone"));
        if let Err(e) = seqpacket::send(conn, &FromHolder::Welcome { version: VERSION, held: 0 }, &[]) {
            self.daemon_gone(&e.to_string());
        }
    }

    fn hold(
        &mut self,
        container: String,
        pid: u32,
        record: serde_json::Value,
        fd: OwnedFd,
        slot: Option<usize>,
    ) -> Result<FromHolder, String> {
        let listener =
            Listener::verify(fd).map_err(|_| "the fd sent with hold is not a seccomp listener".to_string())?;
        let slot = match slot {
            // A listener served since before this holder: its slot keeps what was noted.
            Some(s) if s < self.journal.slots() && !self.entries.contains_key(&s) => s,
            Some(s) => return Err(format!("journal slot {s} is taken or out of range")),
            None => {
                let free = (0..self.journal.slots())
                    .find(|s| !self.entries.contains_key(s))
                    .ok_or_else(|| format!("the holder is full ({} listeners)", self.journal.slots()))?;
                Slot::new(self.journal.clone(), free).expect("slot in range").clear();
                free
            }
        };
        let flags = if self.failing_open { EpollFlags::EPOLLIN } else { EpollFlags::empty() };
        self.epoll.add(listener.as_fd(), EpollEvent::new(flags, slot as u64)).map_err(|e| e.to_string())?;
        self.entries.insert(slot, Entry { listener, container, pid, record });
        Ok(FromHolder::Holding { slot })
    }

    fn listener_event(&mut self, slot: usize, flags: EpollFlags) {
        let Some(e) = self.entries.get(&slot) else { return };
        if flags.intersects(EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR) {
            let _ = self.epoll.delete(e.listener.as_fd());
            self.entries.remove(&slot);
            return;
        }
        if self.failing_open && flags.contains(EpollFlags::EPOLLIN) {
            if let Ok(Recv::Notification(n)) = e.listener.recv() {
                let _ = e.listener.allow(n.id);
            }
        }
    }
}

/// One holder per socket, by a lock beside it (`holder.sock.lock`), held for life. A holder run
/// by a service manager (`stay`) that finds another running waits for it to end, then takes
/// over the socket (heapcapd starts one of its own at once when its holder dies, and the
/// service manager's restart must not fail over and over meanwhile); any other fails.
fn one_at_a_time(config: &Config) -> io::Result<nix::fcntl::Flock<std::fs::File>> {
    use nix::fcntl::{Flock, FlockArg};
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let socket = &config.socket;
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    let mut path = socket.clone().into_os_string();
    path.push(".lock");
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(&path)?;
    // A holder that was just killed may take a moment to let go (heapcapd starts the next one
    // as soon as their connection hangs up).
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let mut file = file;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) if config.stay => {
                log(format_args!("another holder runs on {}: taking over when it ends", socket.display()));
                return Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| e.into());
            }
            Err((f, nix::errno::Errno::EWOULDBLOCK)) if std::time::Instant::now() < deadline => {
                file = f;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("a holder is already running on {}", socket.display()),
                ))
            }
            Err((_, e)) => return Err(e.into()),
        }
    }
}

/// Say why, then close. The peer's hello is read first (for at most a moment): closing a UNIX
/// socket with unread data makes the peer see ECONNRESET instead of the reason.
fn refuse(conn: OwnedFd, message: String) {
    let timeout = nix::sys::time::TimeVal::new(0, 200_000);
    let _ = socket::setsockopt(&conn, socket::sockopt::ReceiveTimeout, &timeout);
    let _ = seqpacket::recv::<serde_json::Value>(conn.as_fd());
    let _ = seqpacket::send(conn.as_fd(), &FromHolder::Error { message }, &[]);
}
