//! `heapcap run`'s second copy of the listener: a keeper process (`heapcap keep`, hidden).
//!
//! When the last copy of a seccomp listener fd closes, every heap growth of the command fails
//! with `ENOSYS`, which most programs do not survive. So `heapcap run` (the supervisor, the
//! process the user sees and may kill) starts a keeper before the command, and hands it a copy of
//! the listener and of the in-flight journal (the memfd where the supervisor notes each call it
//! has taken) as soon as it has them. The keeper waits on its socket to the supervisor:
//! - the supervisor ends normally (the command's tree is gone, the listener hung up): it exits;
//! - the supervisor dies while processes remain under the filter (`kill -9`, a crash): it takes
//!   over with the same engine and quotas: it answers the call the supervisor had taken, opens
//!   accounts for the command's processes from `/proc`, and serves until the last one is gone
//!   (printing the `--report` table then, if asked); if it cannot supervise, it lets every call
//!   through, saying so, rather than leave the programs to `ENOSYS`.
//!
//! The supervisor starts a new keeper if its keeper dies. A keeper that has taken over is the
//! command's supervisor from then on, so it keeps a keeper of its own the same way: killing it
//! too leaves the command supervised. The keeper runs in its own process group, so the
//! terminal's ^C (meant for the command) does not reach it.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};

use heapcap_linux::fdpass;
use heapcap_linux::journal::{Journal, Slot};
use heapcap_linux::notify::{Listener, Recv};
use heapcap_supervise::{ExitWatcher, Ledger, Limits, LinuxEmulator, Mode, Serve, Supervisor};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::sys::wait::WaitStatus;
use serde::{Deserialize, Serialize};

use crate::report::{self, DenialLog};

/// What the supervisor tells its keeper, with the listener and the journal as fds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Brief {
    pub limit: Option<u64>,
    pub total_limit: Option<u64>,
    pub audit: bool,
    /// Strict counting (`--strict`).
    #[serde(default)]
    pub strict: bool,
    pub quiet: bool,
    pub report: bool,
    /// The command's pid: its descendants are adopted on a take-over.
    pub command: u32,
    /// The supervisor's pid, for the messages.
    pub supervisor: u32,
    /// The command's filter sends `sysinfo`: answer it with the quota as the machine's memory.
    #[serde(default)]
    pub machine: bool,
    /// The supervisor is itself a keeper that took over from `heapcap run`.
    #[serde(default)]
    pub keeper: bool,
}

/// A running keeper, seen from the supervisor.
#[derive(Debug)]
struct Running {
    pid: u32,
    sock: OwnedFd,
}

/// The supervisor's side: the keeper now, and what it must be handed (again, should it die).
#[derive(Debug)]
pub struct Keeping {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    brief: Brief,
    running: Option<Running>,
    journal: Arc<Journal>,
    /// A copy of the listener once the command has sent it.
    listener: Option<OwnedFd>,
    /// Nothing more to keep: the supervisor ends.
    done: bool,
}

impl Keeping {
    /// Start the first keeper. `brief.command` is filled in once the command runs.
    pub fn start(brief: Brief, journal: Arc<Journal>) -> Keeping {
        let mut state = State { brief, running: None, journal, listener: None, done: false };
        state.spawn();
        Keeping { state: Mutex::new(state) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The command runs as `pid`.
    pub fn command(&self, pid: u32) {
        let mut state = self.lock();
        state.brief.command = pid;
        state.hand();
    }

    /// Hand the keeper a copy of `listener` (before it is served).
    pub fn hold(&self, listener: BorrowedFd<'_>) {
        let mut state = self.lock();
        match listener.try_clone_to_owned() {
            Ok(fd) => state.listener = Some(fd),
            Err(e) => {
                return eprintln!(
                "heapcap: warning: cannot keep a copy of the listener ({e}): killing heapcap would break the command"
            )
            }
        }
        state.hand();
    }

    /// A child was reaped with `status`: if it was the keeper, start another (once the command's
    /// tree is gone, none is needed).
    pub fn reaped(&self, status: WaitStatus) {
        let pid = status.pid().map_or(0, |p| p.as_raw() as u32);
        let killed = matches!(status, WaitStatus::Signaled(..));
        let mut state = self.lock();
        if state.running.as_ref().is_none_or(|r| r.pid != pid) || state.done {
            return;
        }
        state.running = None;
        if !killed {
            return eprintln!(
                "heapcap: warning: the keeper (pid {pid}) exited: killing heapcap would break the command"
            );
        }
        eprintln!("heapcap: the keeper (pid {pid}) was killed: starting another");
        state.spawn();
        state.hand();
    }

    /// The supervisor ends normally (the tree is gone): let the keeper go, and reap it.
    pub fn finish(&self) {
        let mut state = self.lock();
        state.done = true;
        if let Some(r) = state.running.take() {
            drop(r.sock);
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(r.pid as i32), None);
        }
    }
}

impl State {
    fn spawn(&mut self) {
        match spawn() {
            Ok(r) => self.running = Some(r),
            Err(e) => {
                eprintln!("heapcap: warning: cannot start the keeper ({e}): killing heapcap would break the command")
            }
        }
    }

    /// Send the brief, the listener and the journal to the keeper, once there is a listener.
    fn hand(&mut self) {
        let (Some(running), Some(listener)) = (&self.running, &self.listener) else { return };
        let data = serde_json::to_vec(&self.brief).expect("a brief serialises");
        let fds = [listener.as_fd(), self.journal.as_fd()];
        if let Err(e) = fdpass::send_fds(running.sock.as_fd(), &fds, &data) {
            eprintln!("heapcap: warning: cannot hand the listener to the keeper ({e}): killing heapcap would break the command");
        }
    }
}

/// `heapcap keep` with one end of a socket pair as its stdin.
fn spawn() -> io::Result<Running> {
    let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
    let child = Command::new("/proc/self/exe")
        .arg("keep")
        .stdin(Stdio::from(theirs))
        .stdout(Stdio::null())
        // Its own group: the terminal's signals are for the command (and heapcap).
        .process_group(0)
        .spawn()?;
    Ok(Running { pid: child.id(), sock: ours })
}

/// `heapcap keep`: the keeper's side.
pub fn main() -> ExitCode {
    match keep() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("heapcap keep: {e:#}");
            ExitCode::from(125)
        }
    }
}

fn keep() -> anyhow::Result<()> {
    use anyhow::Context;
    let sock = io::stdin().as_fd().try_clone_to_owned().context("no socket on stdin")?;
    // Briefs until the supervisor goes (the last one counts: the command's pid comes once it
    // runs); the socket's end is the supervisor's.
    let mut kept: Option<(Brief, Listener, OwnedFd)> = None;
    let mut buf = vec![0u8; 4096];
    loop {
        let got = match fdpass::recv_fds(sock.as_fd(), &mut buf) {
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("cannot hear from heapcap run"),
        };
        if got.len == 0 && got.fds.is_empty() {
            break;
        }
        let brief: Brief = serde_json::from_slice(&buf[..got.len]).context("not a keeper brief")?;
        let mut fds = got.fds.into_iter();
        let (Some(listener), Some(journal), None) = (fds.next(), fds.next(), fds.next()) else {
            anyhow::bail!("a brief comes with the listener and the journal");
        };
        kept = Some((brief, Listener::new(listener), journal));
    }
    // Nothing sent: the supervisor ended (or died) before the command sent its listener.
    let Some((brief, listener, journal)) = kept else { return Ok(()) };
    if listener.is_hung_up() {
        return Ok(()); // the command's tree is gone: the supervisor ended normally
    }
    let journal = Arc::new(Journal::map(journal).context("the journal")?);
    match take_over(&brief, &listener, journal) {
        Ok(()) => Ok(()),
        Err(e) => {
            eprintln!(
                "heapcap: warning: heapcap run (pid {}) is gone and its keeper cannot supervise the command ({e:#}): \
                 letting its heap growth through unchecked",
                brief.supervisor
            );
            let_through(&listener);
            Ok(())
        }
    }
}

/// Supervise what is left of the command's tree with the supervisor's quotas.
fn take_over(brief: &Brief, listener: &Listener, journal: Arc<Journal>) -> anyhow::Result<()> {
    use anyhow::Context;
    let limits = Limits { process: brief.limit, total: brief.total_limit };
    let mode = if brief.audit { Mode::Audit } else { Mode::Enforce };
    let exits = Arc::new(ExitWatcher::start().context("cannot start the exit watcher")?);
    let log = Arc::new(DenialLog::new());
    let (sink_log, quiet) = (log.clone(), brief.quiet);
    let sink = Box::new(move |d: &heapcap_supervise::Denial| {
        if !quiet {
            sink_log.log(d);
        }
    });
    let mut ledger = Ledger::new(limits, mode, heapcap_linux::page_size());
    if brief.strict {
        ledger.set_counting(heapcap_policy::ledger::Counting::Strict);
    }
    let supervisor = Supervisor::new(ledger, exits, sink);
    let supervisor = match brief.machine {
        true => supervisor.with_emulator(Box::new(LinuxEmulator)),
        false => supervisor,
    };
    let slot = Slot::new(journal.clone(), 0).context("the journal has no slot")?;
    let gone = match brief.keeper {
        false => format!("heapcap run (pid {})", brief.supervisor),
        true => format!("the keeper (pid {}) that took over from heapcap run", brief.supervisor),
    };
    eprintln!(
        "heapcap: {gone} is gone: its keeper (pid {}) supervises the command's processes from now on, \
         with the same quotas (heapcap's exit status and signals no longer reach the command)",
        std::process::id()
    );
    // This process is now the only one serving the listener: a keeper of its own takes over if
    // it is killed in turn, as it did for heapcap run.
    let brief = Brief { supervisor: std::process::id(), keeper: true, ..brief.clone() };
    let keeping = Arc::new(Keeping::start(brief.clone(), journal));
    keeping.hold(listener.as_fd());
    reap_keepers(keeping.clone());
    let pids = supervisor.descendants(brief.command);
    if let Err(e) = supervisor.resume(listener, &slot, &pids) {
        eprintln!("heapcap: warning: cannot answer the call heapcap run left: {e}");
    }
    supervisor.adopt(&pids);
    let served = supervisor.serve(listener, Serve { journal: Some(&slot), runtime: false });
    keeping.finish();
    log.flush();
    if brief.report || brief.audit {
        eprintln!("heapcap: the processes its keeper saw after heapcap run was gone:");
        let _ = report::table(&mut io::stderr(), &supervisor.accounts().report());
    }
    served.context("the seccomp listener failed")
}

/// Reap this process's children (its keepers: the command's processes are not its children),
/// starting another keeper for each one killed, until there are none.
fn reap_keepers(keeping: Arc<Keeping>) {
    let reaper = move || loop {
        match nix::sys::wait::waitpid(None, None) {
            Ok(status) => keeping.reaped(status),
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return, // no children: nothing more to keep
        }
    };
    if let Err(e) = std::thread::Builder::new().name("heapcap-keepers".into()).spawn(reaper) {
        eprintln!("heapcap: warning: cannot watch the keeper ({e}): a killed keeper will not be replaced");
    }
}

/// Nothing can supervise: answer every call with "go on" until the tree is gone.
fn let_through(listener: &Listener) {
    loop {
        match listener.recv() {
            Ok(Recv::Notification(n)) => drop(listener.allow(n.id)),
            Ok(Recv::Interrupted) => continue,
            Ok(Recv::HungUp) | Err(_) => return,
        }
    }
}
