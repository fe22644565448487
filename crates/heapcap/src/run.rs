//! `heapcap run`: one command and its children under a heap quota.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, ExitCode};
use std::sync::Arc;

use anyhow::Context;
use heapcap_linux::fdpass::recv_fds;
use heapcap_linux::filter::{Extra, LoadFlags, Program};
use heapcap_linux::journal::{Journal, Slot};
use heapcap_linux::notify::Listener;
use heapcap_linux::spawn::under_filter;
use heapcap_policy::ledger::Counting;
use heapcap_policy::settings::Settings;
use heapcap_supervise::{ExitWatcher, Ledger, Limits, LinuxEmulator, Mode, Serve, Supervisor};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::signal::{kill, raise, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::keeper::{Brief, Keeping};
use crate::report::{self, DenialLog};
use crate::RunArgs;

/// Signals sent to heapcap by another process are passed on to the command.
const FORWARDED: [Signal; 8] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
    Signal::SIGALRM,
];

pub fn main(args: RunArgs) -> ExitCode {
    if args.limit.is_none() && args.total_limit.is_none() && !args.audit {
        eprintln!("heapcap: run needs a quota: add --limit SIZE (e.g. --limit 64Mi), --total-limit SIZE, or --audit to only observe");
        return ExitCode::from(crate::USAGE);
    }
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("heapcap: {e:#}");
            ExitCode::from(125)
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let limits = Limits { process: args.limit.map(|s| s.bytes()), total: args.total_limit.map(|s| s.bytes()) };
    let mode = if args.audit { Mode::Audit } else { Mode::Enforce };
    let counting = Counting::from_strict(args.strict);
    let settings = Settings { limits, mode, counting, machine: args.machine_memory };
    // Where the command is to see its quota as its machine's memory, its filter sends sysinfo too.
    let extra = Extra::of(&settings);
    let program = Program::heap_notify_with(counting, extra).context("cannot build the seccomp filter")?;

    // Block the signals we handle before any thread starts, so they all inherit the mask and
    // the signals reach the signalfd. The command gets an empty mask back before exec.
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    FORWARDED.iter().for_each(|s| mask.add(*s));
    mask.thread_block().context("cannot block signals")?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .context("cannot create a signalfd")?;
    // Orphaned descendants come back to us, so we can reap them and know when the tree is gone.
    nix::sys::prctl::set_child_subreaper(true).context("cannot become a child subreaper")?;

    let exits = Arc::new(ExitWatcher::start().context("cannot start the exit watcher")?);
    let log = Arc::new(DenialLog::new());
    let sink_log = log.clone();
    let quiet = args.quiet;
    let sink = Box::new(move |d: &heapcap_supervise::Denial| {
        if !quiet {
            sink_log.log(d);
        }
    });
    let mut ledger = Ledger::new(limits, mode, heapcap_linux::page_size());
    ledger.set_counting(counting);
    let supervisor = Supervisor::new(ledger, exits, sink);
    let supervisor = Arc::new(match extra.machine {
        true => supervisor.with_emulator(Box::new(LinuxEmulator)),
        false => supervisor,
    });
    // Finished processes (and so every command line, read at admission) are kept only for the
    // final report: without one, a command line is read only when a denial or a warning needs it.
    supervisor.accounts().keep_finished(args.report || args.audit);

    // The second copy of the listener: a keeper that takes over if this process is killed.
    let journal = Arc::new(Journal::create(1).context("cannot create the in-flight journal")?);
    let slot = Slot::new(journal.clone(), 0).expect("a journal of one slot");
    let brief = Brief {
        limit: limits.process,
        total_limit: limits.total,
        audit: args.audit,
        strict: counting == Counting::Strict,
        quiet: args.quiet,
        report: args.report,
        command: 0,
        supervisor: std::process::id(),
        machine: extra.machine,
        keeper: false,
    };
    let keeping = Arc::new(Keeping::start(brief, journal));

    let (ours, theirs) = UnixStream::pair().context("cannot create a socket pair")?;
    let done = Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC).context("cannot create an eventfd")?);
    let server = {
        let (supervisor, done, keeping) = (supervisor.clone(), done.clone(), keeping.clone());
        std::thread::Builder::new().name("heapcap-notify".into()).spawn(move || {
            let result = serve(&supervisor, &ours, &keeping, &slot);
            let _ = done.write(1);
            result
        })?
    };

    let mut cmd = Command::new(&args.command[0]);
    cmd.args(&args.command[1..]);
    let flags = LoadFlags { no_new_privs: !nix::unistd::geteuid().is_root(), tsync: false };
    under_filter(&mut cmd, program, theirs.into(), flags);
    let spawned = cmd.spawn();
    drop(cmd); // closes our copy of the child's socket end
               // The command started with the limit on open files it was given; heapcap holds a few fds per
               // process and thread of it, so it takes its hard limit from now on.
    if let Err(e) = heapcap_linux::rlimit::raise_fd_limit() {
        tracing::warn!(error = %e, "cannot raise the limit on open files");
    }
    let child = match spawned {
        Ok(child) => Pid::from_raw(child.id() as i32),
        Err(e) => {
            let _ = server.join();
            keeping.finish();
            let name = args.command[0].to_string_lossy();
            eprintln!("heapcap: cannot run '{name}': {e}");
            return Ok(ExitCode::from(match e.kind() {
                std::io::ErrorKind::NotFound => 127,
                std::io::ErrorKind::PermissionDenied => 126,
                _ => 125,
            }));
        }
    };

    keeping.command(child.as_raw() as u32);

    let status = wait_for_tree(&signals, &done, child, &supervisor, &keeping)?;
    let served = server.join().map_err(|_| anyhow::anyhow!("the notification thread panicked"))?;
    if served.is_ok() {
        keeping.finish();
    }
    log.flush();
    if args.report || args.audit {
        let _ = report::table(&mut std::io::stderr(), &supervisor.accounts().report());
    }
    if let Err(e) = served {
        eprintln!("heapcap: supervising failed: {e:#}");
    }
    Ok(pass_through(status))
}

fn serve(supervisor: &Supervisor, sock: &UnixStream, keeping: &Keeping, slot: &Slot) -> anyhow::Result<()> {
    let mut buf = [0u8; 16];
    let got = recv_fds(sock.as_fd(), &mut buf).context("cannot receive the listener fd")?;
    // No fd: the command never got as far as exec (its error is reported by spawn).
    let Some(fd) = got.fds.into_iter().next() else { return Ok(()) };
    // Kept before served: from the first call on, a kill of this process harms nothing.
    keeping.hold(fd.as_fd());
    // The child loads the filter just before it execs the command: until that exec, what the
    // listener sees is heapcap's own code.
    let how = Serve { journal: Some(slot), runtime: true };
    supervisor.serve(&Listener::new(fd), how).context("the seccomp listener failed")
}

/// Reap children and pass signals on until the command has exited and every process under
/// the filter is gone (a process whose supervisor is gone gets ENOSYS on every heap growth).
fn wait_for_tree(
    signals: &SignalFd,
    done: &EventFd,
    child: Pid,
    supervisor: &Supervisor,
    keeping: &Keeping,
) -> anyhow::Result<WaitStatus> {
    let mut status = None;
    let mut served = false;
    while status.is_none() || !served {
        let mut fds = [PollFd::new(signals.as_fd(), PollFlags::POLLIN), PollFd::new(done.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e).context("poll failed"),
        }
        if fds[1].any().unwrap_or(false) {
            served = true;
            let _ = done.read();
        }
        if !fds[0].any().unwrap_or(false) {
            continue;
        }
        while let Ok(Some(info)) = signals.read_signal() {
            let sig = Signal::try_from(info.ssi_signo as i32).ok();
            if sig == Some(Signal::SIGCHLD) {
                reap(child, &mut status, keeping);
            } else if let Some(sig) = sig {
                // The terminal signals the whole foreground group itself (SI_KERNEL): only pass
                // on what another process sent to heapcap.
                // Once the command has exited, the rest of its tree gets the signal instead.
                if info.ssi_code != libc::SI_KERNEL {
                    if status.is_none() {
                        let _ = kill(child, sig);
                    } else {
                        supervisor.signal_all(sig as i32);
                    }
                }
            }
        }
    }
    Ok(status.expect("loop ends with a status"))
}

fn reap(child: Pid, status: &mut Option<WaitStatus>, keeping: &Keeping) {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(ws) if ws.pid() == Some(child) => *status = Some(ws),
            Ok(ws) => keeping.reaped(ws),
        }
    }
}

/// Exit as the command did: same code, or death by the same signal.
fn pass_through(status: WaitStatus) -> ExitCode {
    match status {
        WaitStatus::Exited(_, code) => ExitCode::from(code as u8),
        WaitStatus::Signaled(_, sig, _) => {
            // No core file of our own for the command's crash.
            let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
            let mut only = SigSet::empty();
            only.add(sig);
            let _ = only.thread_unblock();
            let _ = raise(sig);
            ExitCode::from(128u8.wrapping_add(sig as i32 as u8))
        }
        _ => ExitCode::from(125),
    }
}
