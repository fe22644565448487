//! Seeing processes exit: one thread polls the pidfds of every supervised process.
//!
//! Exits are handled in batches: after each, the thread waits [`COALESCE`] before it looks
//! again. A container starting short processes back to back (a shell loop, a build) ends one
//! every few hundred microseconds; waking for each costs a context switch on a CPU the workload
//! and the notification threads want (measured: 61 µs of wall time per `posix_spawn` of
//! `/bin/true` on this project's 2-CPU VM, a quarter of what heapcap added). An account left
//! open that long after its process ended is closed earlier when a decision needs it: a
//! refresh of the container's figures closes the accounts of processes that have exited.
//! The wait is on the watcher's stop signal, so stopping it never waits out a batch's window
//! (it did, and `heapcap run` took up to 10 ms longer to end than its program).

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::procview::Task;

type OnExit = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Watched {
    by_fd: HashMap<RawFd, (Arc<dyn Task>, OnExit)>,
}

/// Runs a callback when a process exits.
pub struct ExitWatcher {
    epoll: Arc<Epoll>,
    watched: Arc<Mutex<Watched>>,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ExitWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExitWatcher").finish_non_exhaustive()
    }
}

const STOP: u64 = u64::MAX;

/// How long the watcher lets exits gather after handling a batch.
pub const COALESCE: Duration = Duration::from_millis(10);

impl ExitWatcher {
    pub fn start() -> std::io::Result<ExitWatcher> {
        Self::start_with(COALESCE)
    }

    /// A watcher that lets exits gather for `window` after each batch.
    fn start_with(window: Duration) -> std::io::Result<ExitWatcher> {
        let epoll = Arc::new(Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?);
        let stop = Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC)?);
        epoll.add(stop.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, STOP))?;
        let watched = Arc::new(Mutex::new(Watched::default()));
        let (ep, w, st) = (epoll.clone(), watched.clone(), stop.clone());
        let thread =
            std::thread::Builder::new().name("heapcap-exits".into()).spawn(move || run(&ep, &w, &st, window))?;
        Ok(ExitWatcher { epoll, watched, stop, thread: Some(thread) })
    }

    /// Call `on_exit` once the process behind `task` has exited. A task that cannot be watched
    /// is refused (`Unsupported`): its exit is seen when its listener hangs up.
    pub fn watch(&self, task: Arc<dyn Task>, on_exit: OnExit) -> std::io::Result<()> {
        let Some(borrowed) = task.fd() else { return Err(std::io::ErrorKind::Unsupported.into()) };
        let fd = borrowed.as_raw_fd();
        let mut w = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        self.epoll.add(borrowed, EpollEvent::new(EpollFlags::EPOLLIN, fd as u64))?;
        w.by_fd.insert(fd, (task, on_exit));
        Ok(())
    }

    /// Handle the exits seen so far now, on the caller's thread, without waiting for the
    /// watcher's next batch (a decision on the container's total needs them).
    pub fn drain(&self) {
        drain(&self.epoll, &self.watched, EpollTimeout::ZERO);
    }

    /// Processes being watched.
    pub fn len(&self) -> usize {
        self.watched.lock().unwrap_or_else(|e| e.into_inner()).by_fd.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn run(epoll: &Epoll, watched: &Mutex<Watched>, stop: &EventFd, window: Duration) {
    while drain(epoll, watched, EpollTimeout::NONE) && !stopped_within(stop, window) {}
}

/// Let exits gather for `window`, unless told to stop meanwhile (then true at once).
fn stopped_within(stop: &EventFd, window: Duration) -> bool {
    let deadline = Instant::now() + window;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let timeout = PollTimeout::try_from(left.as_millis().max(1)).unwrap_or(PollTimeout::MAX);
        match poll(&mut [PollFd::new(stop.as_fd(), PollFlags::POLLIN)], timeout) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => {}
            Ok(_) => return true,
            // Cannot wait on it: the window is slept out, and the next drain sees the stop.
            Err(_) => {
                std::thread::sleep(left);
                return false;
            }
        }
    }
}

/// Wait up to `timeout` for exits and handle every one ready; false once told to stop (or the
/// epoll failed).
fn drain(epoll: &Epoll, watched: &Mutex<Watched>, timeout: EpollTimeout) -> bool {
    let mut events = [EpollEvent::empty(); 64];
    let mut timeout = timeout;
    loop {
        let n = match epoll.wait(&mut events, timeout) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!(error = %e, "exit watcher failed; process exits will only be seen late");
                return false;
            }
        };
        for ev in &events[..n] {
            if ev.data() == STOP {
                return false;
            }
            let fd = ev.data() as RawFd;
            // Another thread draining at once may have taken it: handled once, by whoever did.
            let entry = watched.lock().unwrap_or_else(|e| e.into_inner()).by_fd.remove(&fd);
            if let Some((task, on_exit)) = entry {
                if let Some(fd) = task.fd() {
                    let _ = epoll.delete(fd);
                }
                on_exit();
            }
        }
        if n < events.len() {
            return true;
        }
        timeout = EpollTimeout::ZERO;
    }
}

impl Drop for ExitWatcher {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::procview::LinuxTask;
    use heapcap_linux::pidfd::Pidfd;

    #[test]
    fn an_exit_is_reported_and_stopping_does_not_wait_out_the_window() {
        // A window far longer than any scheduling delay: stopping must cut it short.
        let window = Duration::from_secs(60);
        let watcher = ExitWatcher::start_with(window).expect("watcher");
        let mut child = std::process::Command::new("true").spawn().expect("spawn true");
        let task: Arc<dyn Task> = Arc::new(LinuxTask::from(Pidfd::open(child.id()).expect("pidfd")));
        let (tx, rx) = std::sync::mpsc::channel();
        watcher.watch(task, Box::new(move || tx.send(()).expect("send"))).expect("watch");
        child.wait().expect("reap");
        rx.recv_timeout(Duration::from_secs(30)).expect("the exit was reported");
        assert!(watcher.is_empty(), "a reported exit is no longer watched");
        // The watcher is now letting exits gather for `window`.
        let stopping = Instant::now();
        drop(watcher);
        assert!(stopping.elapsed() < window / 2, "stopped after {:?}", stopping.elapsed());
    }
}
