//! Root-only UNIX sockets: created 0600 in a 0700 directory, and every peer's credentials
//! checked, so neither a container nor an unprivileged user can reach heapcapd.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

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

/// The peer runs as root or as heapcapd's own user; returns its pid.
pub fn peer_allowed(stream: &UnixStream) -> Result<i32, String> {
    let cred = getsockopt(stream, PeerCredentials).map_err(|e| format!("cannot read peer credentials: {e}"))?;
    let me = nix::unistd::geteuid().as_raw();
    let uid = cred.uid();
    if uid == 0 || uid == me {
        Ok(cred.pid())
    } else {
        Err(format!("peer pid {} uid {} is not allowed (root only)", cred.pid(), uid))
    }
}
