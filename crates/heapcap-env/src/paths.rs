//! heapcap's default socket paths: heapcapd's agent socket (what runtimes are given as
//! `linux.seccomp.listenerPath`), its control socket (`heapcap ps`, `set-limit`, `events`) and
//! the fd holder's socket, all in one directory.
//!
//! Every program that has a default for one of them takes it from here; each also takes another
//! path on its command line (or in its config file), which always wins.
//!
//! Root's directory is [`RUNTIME_DIR`] (`/run/heapcap`); the constants below are root's paths.
//! Any other user's is `$XDG_RUNTIME_DIR/heapcap`, or `/run/user/UID/heapcap` where
//! `XDG_RUNTIME_DIR` is not set (a hook run by podman gets no environment): [`Paths::for_user`]
//! makes that choice from the effective uid and `XDG_RUNTIME_DIR`, which its caller (a binary)
//! reads, so that this module does no I/O. The uid is the one the host sees: a hook or runtime
//! run by rootless podman is root inside podman's user namespace and the user outside it, and
//! must find the user's heapcapd (`heapcap_linux::userns::host_euid` reads it).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// The directory as a literal, so that the paths below can be built from it with `concat!`.
macro_rules! runtime_dir {
    () => {
        "/run/heapcap"
    };
}

/// root's directory of heapcap's sockets (heapcapd creates it 0700, root only).
pub const RUNTIME_DIR: &str = runtime_dir!();

/// The file name of heapcapd's agent socket in its directory.
pub const AGENT_FILE: &str = "heapcapd.sock";
/// The file name of heapcapd's control socket in its directory.
pub const CONTROL_FILE: &str = "control.sock";
/// The file name of the fd holder's socket in its directory.
pub const HOLDER_FILE: &str = "holder.sock";

/// heapcapd's agent socket (root's): runtimes (`linux.seccomp.listenerPath`), the hook and the
/// shim send each container's seccomp listener fd here.
pub const AGENT_SOCKET: &str = concat!(runtime_dir!(), "/heapcapd.sock");

/// heapcapd's control socket (root's): `heapcap ps`, `set-limit` and `events`.
pub const CONTROL_SOCKET: &str = concat!(runtime_dir!(), "/control.sock");

/// The fd holder's socket (root's), where heapcapd hands it every listener fd.
pub const HOLDER_SOCKET: &str = concat!(runtime_dir!(), "/holder.sock");

/// The directory under `XDG_RUNTIME_DIR` (or `/run/user/UID`) of a non-root user's sockets.
pub const USER_SUBDIR: &str = "heapcap";

/// Where one user's heapcap sockets are by default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// The directory (heapcapd creates it 0700).
    pub dir: PathBuf,
    /// heapcapd's agent socket (`listenerPath`).
    pub agent: PathBuf,
    /// heapcapd's control socket.
    pub control: PathBuf,
    /// The fd holder's socket.
    pub holder: PathBuf,
}

impl Paths {
    /// The sockets in `dir`.
    pub fn in_dir(dir: &Path) -> Paths {
        Paths {
            dir: dir.to_path_buf(),
            agent: dir.join(AGENT_FILE),
            control: dir.join(CONTROL_FILE),
            holder: dir.join(HOLDER_FILE),
        }
    }

    /// The default paths for a program running as `euid` (as the host sees it) with
    /// `XDG_RUNTIME_DIR` set to `xdg_runtime_dir` (`None`: not set): [`RUNTIME_DIR`] for root
    /// (whatever `XDG_RUNTIME_DIR` says: `sudo` and login sessions set it for root too), else
    /// `$XDG_RUNTIME_DIR/heapcap`, else `/run/user/UID/heapcap`. An empty or relative
    /// `XDG_RUNTIME_DIR` is ignored, as the XDG base directory specification says.
    pub fn for_user(euid: u32, xdg_runtime_dir: Option<&OsStr>) -> Paths {
        Paths::in_dir(&runtime_dir(euid, xdg_runtime_dir))
    }

    /// Whether these are a non-root user's paths (for messages that say how to start heapcapd).
    pub fn rootless(&self) -> bool {
        self.dir != Path::new(RUNTIME_DIR)
    }
}

/// The directory of [`Paths::for_user`].
pub fn runtime_dir(euid: u32, xdg_runtime_dir: Option<&OsStr>) -> PathBuf {
    if euid == 0 {
        return PathBuf::from(RUNTIME_DIR);
    }
    match xdg_runtime_dir.map(Path::new).filter(|p| p.is_absolute()) {
        Some(xdg) => xdg.join(USER_SUBDIR),
        None => PathBuf::from(format!("/run/user/{euid}")).join(USER_SUBDIR),
    }
}

/// How to start heapcapd so that it listens where these paths say, for error messages.
pub fn how_to_start(paths: &Paths) -> &'static str {
    if paths.rootless() {
        "start your own heapcapd (`systemctl --user start heapcapd`, or run `heapcapd` as this user)"
    } else {
        "start heapcapd (`systemctl start heapcapd`, or run `heapcapd` as root)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_socket_is_its_own_file_in_the_runtime_dir() {
        let sockets = [AGENT_SOCKET, CONTROL_SOCKET, HOLDER_SOCKET];
        for s in sockets {
            assert_eq!(Path::new(s).parent(), Some(Path::new(RUNTIME_DIR)), "{s}");
        }
        assert_eq!(AGENT_SOCKET, "/run/heapcap/heapcapd.sock", "what the examples/ profiles name as listenerPath");
        let names: std::collections::HashSet<_> = sockets.iter().map(|s| Path::new(s).file_name()).collect();
        assert_eq!(names.len(), sockets.len());
    }

    #[test]
    fn root_gets_the_constants_whatever_xdg_runtime_dir_says() {
        for xdg in [None, Some("/run/user/0"), Some("")] {
            let p = Paths::for_user(0, xdg.map(OsStr::new));
            assert_eq!(p.agent, Path::new(AGENT_SOCKET), "{xdg:?}");
            assert_eq!(p.control, Path::new(CONTROL_SOCKET));
            assert_eq!(p.holder, Path::new(HOLDER_SOCKET));
            assert!(!p.rootless());
            assert!(how_to_start(&p).contains("systemctl start heapcapd"));
        }
    }

    #[test]
    fn a_user_gets_xdg_runtime_dir_else_run_user_uid() {
        let p = Paths::for_user(1000, Some(OsStr::new("/run/user/1000")));
        assert_eq!(p.dir, Path::new("/run/user/1000/heapcap"));
        assert_eq!(p.agent, Path::new("/run/user/1000/heapcap/heapcapd.sock"));
        assert_eq!(p.control, Path::new("/run/user/1000/heapcap/control.sock"));
        assert_eq!(p.holder, Path::new("/run/user/1000/heapcap/holder.sock"));
        assert!(p.rootless());
        assert!(how_to_start(&p).contains("systemctl --user start heapcapd"));
        let p = Paths::for_user(1000, Some(OsStr::new("/tmp/xdg-1000")));
        assert_eq!(p.agent, Path::new("/tmp/xdg-1000/heapcap/heapcapd.sock"));
        // Not set, empty or relative: the systemd convention.
        for xdg in [None, Some(""), Some("run/user/1000"), Some(".")] {
            let p = Paths::for_user(1001, xdg.map(OsStr::new));
            assert_eq!(p.dir, Path::new("/run/user/1001/heapcap"), "{xdg:?}");
        }
    }
}
