//! Connecting to heapcapd's agent socket from the start path of a container (the shim, the
//! hooks), where neither a missing heapcapd nor a wedged one may hang or confuse the start.
//!
//! A blocking connect to a Unix socket whose backlog is full waits until there is room (a
//! heapcapd that accepts nothing): crun blocks there for as long as it lasts. So the connect runs
//! on its own thread and is given up after a timeout; a thread still waiting ends with the
//! process (which exits, or execs the runtime, next).

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

/// How long heapcapd has to accept a connection before a start fails.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why heapcapd is not reachable.
#[derive(Debug, thiserror::Error)]
pub enum Unreachable {
    /// `ENOENT`, said without "No such file or directory": podman takes a runtime error with
    /// those words for a missing program (exit status 127, "command that was not found").
    #[error("no socket there")]
    Missing,
    #[error("{0}")]
    Connect(#[source] std::io::Error),
    #[error("it accepted no connection within {} s", .0.as_secs_f64())]
    Timeout(Duration),
}

/// Connect to the Unix socket at `path`, waiting at most `timeout`.
pub fn connect_within(path: &Path, timeout: Duration) -> Result<UnixStream, Unreachable> {
    let (tx, rx) = mpsc::channel();
    let target = path.to_path_buf();
    std::thread::Builder::new()
        .name("connect".into())
        .spawn(move || {
            let _ = tx.send(UnixStream::connect(&target));
        })
        .map_err(Unreachable::Connect)?;
    match rx.recv_timeout(timeout) {
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Err(Unreachable::Missing),
        Ok(result) => result.map_err(Unreachable::Connect),
        Err(_) => Err(Unreachable::Timeout(timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn a_listening_socket_is_reachable_and_others_are_not() {
        let dir = std::env::temp_dir().join(format!("heapcap-linux-connect-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.sock");
        let e = connect_within(&path, CONNECT_TIMEOUT).unwrap_err();
        assert!(matches!(e, Unreachable::Missing), "{e:?}");
        assert!(!e.to_string().to_lowercase().contains("no such file"), "podman would say 'command not found'");

        let listener = UnixListener::bind(&path).unwrap();
        connect_within(&path, CONNECT_TIMEOUT).expect("a listening socket (accept not needed: the backlog takes it)");
        drop(listener);
        let e = connect_within(&path, CONNECT_TIMEOUT).unwrap_err();
        assert!(matches!(&e, Unreachable::Connect(io) if io.kind() == std::io::ErrorKind::ConnectionRefused), "{e:?}");

        assert_eq!(Unreachable::Timeout(CONNECT_TIMEOUT).to_string(), "it accepted no connection within 5 s");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
