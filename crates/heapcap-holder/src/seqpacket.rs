//! JSON datagrams with fds on a UNIX `SOCK_SEQPACKET` socket (message boundaries kept, so one
//! message is one `recvmsg`).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use heapcap_linux::fdpass;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::MAX_MESSAGE;

fn new_socket() -> io::Result<OwnedFd> {
    Ok(socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)?)
}

pub fn connect(path: &Path) -> io::Result<OwnedFd> {
    let sock = new_socket()?;
    socket::connect(sock.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(sock)
}

/// Listen on `path`, for the owner only (0600 in a 0700 directory). A stale socket file (no one
/// listening) is replaced.
pub fn listen(path: &Path) -> io::Result<OwnedFd> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    if path.exists() {
        if connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("a holder is already listening on {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let sock = new_socket()?;
    socket::bind(sock.as_raw_fd(), &UnixAddr::new(path)?)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    socket::listen(&sock, socket::Backlog::new(16).map_err(io::Error::other)?)?;
    Ok(sock)
}

pub fn send<T: Serialize>(sock: BorrowedFd<'_>, message: &T, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let data = serde_json::to_vec(message).map_err(io::Error::other)?;
    if data.len() > MAX_MESSAGE {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "message too large for the holder protocol"));
    }
    fdpass::send_fds(sock, fds, &data)
}

/// One message and its fds. The peer closing is `UnexpectedEof`.
pub fn recv<T: DeserializeOwned>(sock: BorrowedFd<'_>) -> io::Result<(T, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_MESSAGE + 1];
    let got = loop {
        match fdpass::recv_fds(sock, &mut buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => break other?,
        }
    };
    if got.len == 0 && got.fds.is_empty() {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed the connection"));
    }
    if got.len > MAX_MESSAGE || got.truncated {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "message too large or with too many fds"));
    }
    let message = serde_json::from_slice(&buf[..got.len])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("not a holder message: {e}")))?;
    Ok((message, got.fds))
}
