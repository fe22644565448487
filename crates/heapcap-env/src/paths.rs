//! heapcap's default socket paths: heapcapd's agent socket (what runtimes are given as
//! `linux.seccomp.listenerPath`), its control socket (`heapcap ps`, `set-limit`, `events`) and
//! the fd holder's socket, all in [`RUNTIME_DIR`].
//!
//! Every program that has a default for one of them takes it from here; each also takes another
//! path on its command line (or in its config file), which always wins.
//!
//! These are root's paths. When heapcap runs for non-root users, their directory becomes
//! `$XDG_RUNTIME_DIR/heapcap`: that choice belongs here too, as a function beside these
//! constants that is given the effective uid and `XDG_RUNTIME_DIR` by its caller (a binary),
//! so that this module keeps doing no I/O and the socket file names stay defined once.

/// The directory as a literal, so that the paths below can be built from it with `concat!`.
macro_rules! runtime_dir {
    () => {
        "/run/heapcap"
    };
}

/// The directory of heapcap's sockets (heapcapd creates it 0700, root only).
pub const RUNTIME_DIR: &str = runtime_dir!();

/// heapcapd's agent socket: runtimes (`linux.seccomp.listenerPath`), the hook and the shim send
/// each container's seccomp listener fd here.
pub const AGENT_SOCKET: &str = concat!(runtime_dir!(), "/heapcapd.sock");

/// heapcapd's control socket: `heapcap ps`, `set-limit` and `events`.
pub const CONTROL_SOCKET: &str = concat!(runtime_dir!(), "/control.sock");

/// The fd holder's socket, where heapcapd hands it every listener fd.
pub const HOLDER_SOCKET: &str = concat!(runtime_dir!(), "/holder.sock");

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

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
}
