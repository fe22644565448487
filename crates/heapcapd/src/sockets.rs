//! heapcapd's UNIX sockets, private to its user: created 0600 in a 0700 directory, and every
//! peer's credentials checked ([`heapcap_linux::peercred::check_peer`], by each connection's
//! handler), so that neither a container nor another user can reach heapcapd. Their
//! connections, and those of `/metrics`, are served by tasks on the control plane's runtime, a
//! bounded number at once ([`Limit`]).

use std::fs;
use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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

/// Accept connections on `listener` until the runtime stops, each served by a task of its own
/// running `serve`, at most `max` at once ([`Limit`]): `serve` gets the connection's [`Slot`],
/// held until it is dropped (at the end of the connection, or earlier for a connection parked
/// elsewhere). `socket` names the socket in what is logged.
pub async fn serve_connections<F, Fut>(listener: tokio::net::UnixListener, socket: &'static str, max: usize, serve: F)
where
    F: Fn(tokio::net::UnixStream, Slot) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut limit = Limit::new(socket, max);
    loop {
        let slot = Slot(limit.wait().await);
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve(stream, slot));
            }
            Err(e) => accept_failed(socket, e).await,
        }
    }
}

/// One of the places of a [`Limit`], taken by a connection being served; dropping it lets the
/// next connection in.
#[derive(Debug)]
pub struct Slot(#[allow(dead_code)] OwnedSemaphorePermit);

/// An accept that failed: logged, and when it is for want of fds (EMFILE, ENFILE), a pause, so
/// that the loop does not spin while connections wait.
pub async fn accept_failed(socket: &'static str, e: io::Error) {
    use nix::errno::Errno;
    tracing::warn!(error = %e, "{socket} socket accept failed");
    if matches!(e.raw_os_error().map(Errno::from_raw), Some(Errno::EMFILE | Errno::ENFILE)) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A bound on the connections a socket serves at once, so that a flood of connections, idle or
/// not, cannot use up heapcapd's fds. A connection over the bound is not refused: it is not
/// accepted until one ends or gives its [`Slot`] up (an idle agent connection does, at its
/// deadline), and waits in the listen backlog.
#[derive(Debug)]
pub struct Limit {
    socket: &'static str,
    max: usize,
    permits: Arc<Semaphore>,
    /// Every permit was taken and they have not been half free since: warned once for the episode.
    warned: bool,
}

impl Limit {
    pub fn new(socket: &'static str, max: usize) -> Limit {
        Limit { socket, max, permits: Arc::new(Semaphore::new(max)), warned: false }
    }

    /// A permit to serve one more connection, once one is free.
    pub async fn wait(&mut self) -> OwnedSemaphorePermit {
        if self.permits.available_permits() >= self.max / 2 {
            self.warned = false;
        }
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return permit;
        }
        if !self.warned {
            self.warned = true;
            tracing::warn!(
                socket = self.socket,
                max = self.max,
                "every connection slot is taken: new connections wait until one ends (or, idle, gives its slot up)"
            );
        }
        self.permits.clone().acquire_owned().await.expect("the semaphore is never closed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn connections_over_the_bound_wait_until_one_ends() {
        let dir = std::env::temp_dir().join(format!("heapcapd-sockets-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("test.sock");
        let listener = bind_private(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::UnixListener::from_std(listener).unwrap();
            // Each connection is answered "served" once the test lets it go.
            let (go, gate) = tokio::sync::mpsc::unbounded_channel::<()>();
            let gate = Arc::new(tokio::sync::Mutex::new(gate));
            tokio::spawn(serve_connections(listener, "test", 1, move |mut s, slot| {
                let gate = gate.clone();
                async move {
                    gate.lock().await.recv().await.unwrap();
                    s.write_all(b"served").await.unwrap();
                    drop(slot);
                }
            }));
            let mut first = tokio::net::UnixStream::connect(&path).await.unwrap();
            let mut second = tokio::net::UnixStream::connect(&path).await.unwrap();
            go.send(()).unwrap();
            let mut answer = String::new();
            first.read_to_string(&mut answer).await.unwrap();
            assert_eq!(answer, "served");
            // One at a time: the second was not taken before the first ended, and is served now.
            let mut byte = [0u8; 1];
            let early = tokio::time::timeout(Duration::from_millis(200), second.read(&mut byte)).await;
            assert!(early.is_err(), "served before the test let it go");
            go.send(()).unwrap();
            answer.clear();
            second.read_to_string(&mut answer).await.unwrap();
            assert_eq!(answer, "served");
        });
        fs::remove_dir_all(&dir).unwrap();
    }
}
