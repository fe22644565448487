//! The user namespace a program runs in, as far as choosing default paths needs it: the
//! effective uid as the parent namespace sees it.
//!
//! Rootless podman runs its hooks and the OCI runtime as root inside its user namespace (whose
//! `uid_map` maps 0 to the user); heapcap-hook and heapcap-runtime must find the user's heapcapd
//! there, not root's. `/proc/self/uid_map`, read by the process itself, gives each range of ids
//! inside and where it starts in the parent namespace (for rootless podman, the host); in the
//! initial namespace it is the identity map.

/// The effective uid of this process as the parent user namespace sees it (in the initial
/// namespace: the effective uid). Falls back to the effective uid itself when `uid_map` cannot
/// be read or does not map it.
pub fn host_euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    std::fs::read_to_string("/proc/self/uid_map").ok().and_then(|map| outside(&map, euid)).unwrap_or(euid)
}

/// Where `id` inside a namespace is outside it, by a `uid_map`/`gid_map` text (lines of
/// `inside outside count`); `None` if no line maps it (or a line is garbled).
pub fn outside(map: &str, id: u32) -> Option<u32> {
    for line in map.lines().filter(|l| !l.trim().is_empty()) {
        let mut fields = line.split_whitespace().map(str::parse::<u64>);
        let (Some(Ok(inside)), Some(Ok(out)), Some(Ok(count)), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return None;
        };
        let id = u64::from(id);
        if id >= inside && id - inside < count {
            return u32::try_from(out + (id - inside)).ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_ids_through_the_ranges() {
        let identity = "         0          0 4294967295\n";
        assert_eq!(outside(identity, 0), Some(0));
        assert_eq!(outside(identity, 1000), Some(1000));
        // Rootless podman's namespace: root is the user, the rest come from /etc/subuid.
        let podman = "         0       1001          1\n         1     100000      65536\n";
        assert_eq!(outside(podman, 0), Some(1001));
        assert_eq!(outside(podman, 1), Some(100000));
        assert_eq!(outside(podman, 65536), Some(165535));
        assert_eq!(outside(podman, 65537), None, "not mapped");
        assert_eq!(outside("", 0), None);
        assert_eq!(outside("0 x 1\n", 0), None, "garbled");
        assert_eq!(outside("0 1000\n", 0), None, "short");
    }

    #[test]
    fn in_this_test_the_host_euid_is_the_euid_mapped() {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        let map = std::fs::read_to_string("/proc/self/uid_map").expect("uid_map");
        assert_eq!(Some(host_euid()), outside(&map, euid));
    }
}
