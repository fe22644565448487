//! The user namespace a program runs in, as far as choosing default paths needs it: the
//! effective uid as the parent namespace sees it.
//!
//! Rootless podman runs its hooks and the OCI runtime as root inside its user namespace (whose
//! `uid_map` maps 0 to the user); heapcap-hook and heapcap-runtime must find the user's heapcapd
//! there, not root's. `/proc/self/uid_map`, read by the process itself, gives each range of ids
//! inside and where it starts in the parent namespace (for rootless podman, the host); in the
//! initial namespace it is the identity map.
//!
//! [`reads_every_process`] tells whether this process can read every other's ptrace-guarded
//! `/proc` fields for good, so that reading them can wait until they are needed.

use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;

/// The initial user namespace's inode number (`PROC_USER_INIT_INO`).
const INITIAL_USER_NS: u64 = 0xEFFF_FFFD;
const CAP_SYS_PTRACE: u32 = 19;

/// The effective uid of this process as the parent user namespace sees it (in the initial
/// namespace: the effective uid). Falls back to the effective uid itself when `uid_map` cannot
/// be read or does not map it.
pub fn host_euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    std::fs::read_to_string("/proc/self/uid_map").ok().and_then(|map| outside(&map, euid)).unwrap_or(euid)
}

/// Whether this process may read every process's ptrace-guarded `/proc` fields (`stat`'s
/// `start_brk`, `maps`) whatever that process does later (stop being dumpable, exec a setuid
/// program): `CAP_SYS_PTRACE` in effect in the initial user namespace, which the kernel's
/// `ptrace_may_access` accepts for a process of any uid, in any namespace. Learnt once.
pub fn reads_every_process() -> bool {
    static READS: OnceLock<bool> = OnceLock::new();
    *READS.get_or_init(reads_every_process_now)
}

fn reads_every_process_now() -> bool {
    let initial = std::fs::metadata("/proc/self/ns/user").is_ok_and(|m| m.ino() == INITIAL_USER_NS);
    initial
        && std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| effective_caps(&status))
            .is_some_and(|caps| caps >> CAP_SYS_PTRACE & 1 == 1)
}

/// The effective capability set from a `/proc/<pid>/status` text (`CapEff:`, in hex).
pub fn effective_caps(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
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
    fn reads_effective_caps_from_status() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\nCapBnd:\t0\n";
        assert_eq!(effective_caps(status), Some(0x1ff_ffff_ffff));
        assert_eq!(effective_caps("CapEff:\tzz\n"), None);
        assert_eq!(effective_caps("Name:\tx\n"), None);
    }

    /// The tests run as root in the initial namespace (scripts/test.sh); a user namespace of
    /// one's own gives every capability in it, and none over the processes outside.
    #[test]
    fn root_reads_every_process_and_a_user_namespace_does_not() {
        assert!(reads_every_process_now(), "root with CAP_SYS_PTRACE in the initial namespace");
        // SAFETY: the child only unshares, reads two /proc files and leaves with _exit.
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork: {}", std::io::Error::last_os_error());
        if child == 0 {
            // SAFETY: unshare takes flags only; the child is single-threaded, as CLONE_NEWUSER needs.
            let code = match unsafe { libc::unshare(libc::CLONE_NEWUSER) } {
                0 if reads_every_process_now() => 1,
                0 => 0,
                _ => 2,
            };
            // SAFETY: _exit ends the child without running the parent's destructors.
            unsafe { libc::_exit(code) }
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above; `status` is a live int.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        assert!(libc::WIFEXITED(status), "child status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 0, "1: reads every process in its own namespace, 2: no unshare");
    }

    #[test]
    fn in_this_test_the_host_euid_is_the_euid_mapped() {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        let map = std::fs::read_to_string("/proc/self/uid_map").expect("uid_map");
        assert_eq!(Some(host_euid()), outside(&map, euid));
    }
}
