//! Who is at the other end of a UNIX socket (`SO_PEERCRED`), and the one rule heapcap's
//! root-only sockets apply to it: root, or the user the server itself runs as.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// The peer's credentials, as the kernel recorded them when it connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// Why a peer is not served.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("cannot read peer credentials: {0}")]
    Read(#[source] io::Error),
    #[error("peer pid {pid} uid {uid} refused: only {} may connect", allowed(*.me))]
    Refused { pid: i32, uid: u32, me: u32 },
}

fn allowed(me: u32) -> String {
    if me == 0 {
        "root".to_string()
    } else {
        format!("root or the server's own user (uid {me})")
    }
}

/// The credentials of the peer of the connected UNIX socket `sock`.
pub fn peer_cred(sock: BorrowedFd<'_>) -> io::Result<PeerCred> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a live ucred and `len` its size, as SO_PEERCRED expects; the kernel
    // writes at most `len` bytes into it.
    let rc = unsafe {
        libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, (&raw mut cred).cast(), &mut len)
    };
    if rc < 0 {
        return Err(crate::last_error());
    }
    Ok(PeerCred { pid: cred.pid, uid: cred.uid, gid: cred.gid })
}

/// The peer of `sock` if it runs as root or as this process's effective user, else why not.
pub fn check_peer(sock: BorrowedFd<'_>) -> Result<PeerCred, PeerError> {
    let cred = peer_cred(sock).map_err(PeerError::Read)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if cred.uid == 0 || cred.uid == me {
        Ok(cred)
    } else {
        Err(PeerError::Refused { pid: cred.pid, uid: cred.uid, me })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_peer_of_our_own_is_let_in_with_its_credentials() {
        let (a, _b) = UnixStream::pair().unwrap();
        let cred = check_peer(a.as_fd()).expect("our own process is root or our own user");
        assert_eq!(cred.pid, std::process::id() as i32);
        // SAFETY: geteuid has no preconditions.
        assert_eq!(cred.uid, unsafe { libc::geteuid() });
    }

    #[test]
    fn the_refusal_says_who_may_connect() {
        let e = PeerError::Refused { pid: 42, uid: 65534, me: 0 };
        assert_eq!(e.to_string(), "peer pid 42 uid 65534 refused: only root may connect");
        let e = PeerError::Refused { pid: 42, uid: 65534, me: 1000 };
        assert!(e.to_string().ends_with("only root or the server's own user (uid 1000) may connect"), "{e}");
    }

    #[test]
    fn not_a_socket_is_an_error() {
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(matches!(check_peer(file.as_fd()), Err(PeerError::Read(_))));
    }
}
