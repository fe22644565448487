//! Samples shared by the unit tests: what the runtimes and podman really ship.

/// podman 4.3's default profile (containers-common 0.50.1, Debian bookworm).
pub const PODMAN_DEFAULT: &str = include_str!("../data/containers-common-0.50.1-seccomp.json");
/// `runc spec` output of runc 1.1.5.
pub const RUNC_SPEC: &str = include_str!("../data/runc-1.1.5-spec.json");
/// podman's default capabilities (what its profile's `includes.caps` are judged against).
pub const PODMAN_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_NET_BIND_SERVICE",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_CHROOT",
];
