//! Root-only UNIX sockets: created 0600 in a 0700 directory, and every peer's credentials
//! checked ([`heapcap_linux::peercred::check_peer`], by each connection's handler), so neither a
//! container nor an unprivileged user can reach heapcapd.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

/// Bind `path` for the owner only. A stale socket file is replaced; a live one is an error.
pub fn bind_private(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        }
    }
    if let Ok(meta) = fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket: remove it or choose another path", path.display()),
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("another heapcapd is already listening on {}", path.display()),
            ));
        }
        fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Accept connections on `listener` until it fails, each served by `serve` on a thread of its
/// own named `thread`, at most `max` at once ([`Slots`]: the rest wait in the backlog). `socket`
/// names the socket in what is logged.
pub fn serve_connections<F>(listener: UnixListener, socket: &'static str, thread: &str, max: usize, serve: F)
where
    F: Fn(UnixStream) + Send + Sync + 'static,
{
    let serve = Arc::new(serve);
    let slots = Slots::new(max);
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "{socket} socket accept failed");
                continue;
            }
        };
        let slot = slots.take(socket);
        let serve = serve.clone();
        let spawned = std::thread::Builder::new().name(thread.into()).spawn(move || {
            let _slot = slot;
            serve(stream);
        });
        if let Err(e) = spawned {
            tracing::error!(socket, error = %e, "cannot start a thread for a connection");
        }
    }
}

/// A bound on the connections a socket serves at once (a thread each), so that a flood of
/// connections, idle or not, cannot use up the threads that serve containers. A connection over
/// the bound is not refused: it waits in the listen backlog until [`Slots::take`] returns.
#[derive(Debug)]
pub struct Slots {
    max: usize,
    state: Mutex<SlotState>,
    freed: Condvar,
}

#[derive(Debug, Default)]
struct SlotState {
    busy: usize,
    /// Every slot was taken and has not been half free since: warned once for the episode.
    warned: bool,
}

/// One connection being served; frees its slot when dropped.
#[derive(Debug)]
pub struct Slot(Arc<Slots>);

impl Slots {
    pub fn new(max: usize) -> Arc<Slots> {
        Arc::new(Slots { max, state: Mutex::new(SlotState::default()), freed: Condvar::new() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait for a free slot. `socket` names the socket in the warning logged when all are taken.
    pub fn take(self: &Arc<Self>, socket: &str) -> Slot {
        let mut state = self.lock();
        if state.busy >= self.max && !state.warned {
            state.warned = true;
            tracing::warn!(
                socket,
                max = self.max,
                "every connection slot is taken: new connections wait until one ends (idle ones end after their timeout)"
            );
        }
        while state.busy >= self.max {
            state = self.freed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.busy += 1;
        Slot(self.clone())
    }

    /// Connections being served now.
    #[cfg(test)]
    fn busy(&self) -> usize {
        self.lock().busy
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.busy -= 1;
        if state.busy <= self.0.max / 2 {
            state.warned = false;
        }
        drop(state);
        self.0.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_taker_over_the_bound_waits_for_a_slot() {
        let slots = Slots::new(2);
        let a = slots.take("test");
        let _b = slots.take("test");
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let slots = slots.clone();
            std::thread::spawn(move || {
                let c = slots.take("test");
                tx.send(()).unwrap();
                c
            })
        };
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "the third waits while two are taken");
        drop(a);
        rx.recv_timeout(Duration::from_secs(10)).expect("a freed slot lets the waiter in");
        drop(waiter.join().unwrap());
        assert_eq!(slots.busy(), 1);
    }

    #[test]
    fn connections_are_served_on_threads_of_their_own_up_to_the_bound() {
        use std::io::{Read, Write};
        let dir = std::env::temp_dir().join(format!("heapcapd-sockets-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("test.sock");
        let listener = bind_private(&path).unwrap();
        // Each connection is answered with its thread's name once the test lets it go.
        let (go, gate) = std::sync::mpsc::channel::<()>();
        let gate = Mutex::new(gate);
        std::thread::spawn(move || {
            serve_connections(listener, "test", "served", 1, move |mut s| {
                gate.lock().unwrap().recv().unwrap();
                let name = std::thread::current().name().unwrap_or("").to_string();
                s.write_all(name.as_bytes()).unwrap();
            })
        });
        let mut first = UnixStream::connect(&path).unwrap();
        let mut second = UnixStream::connect(&path).unwrap();
        go.send(()).unwrap();
        let mut answer = String::new();
        first.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "served");
        // One at a time: the second was not taken before the first ended, and is served now.
        second.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut byte = [0u8; 1];
        assert!(second.read(&mut byte).is_err(), "served before the test let it go");
        go.send(()).unwrap();
        second.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        answer.clear();
        second.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "served");
        fs::remove_dir_all(&dir).unwrap();
    }
}
