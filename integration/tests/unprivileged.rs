//! `heapcap run` by an unprivileged user (nobody) on programs it may not read: a program that
//! calls `prctl(PR_SET_DUMPABLE, 0)` before it allocates (as ssh-agent and gpg-agent do) has its
//! `/proc/<pid>/maps` refused to its own user's supervisor. heapcap must never hang on it, hold
//! it at its quota from `statm` and the calls it let through, see its frees, and say once why.
//!
//! The test runs as root and drops to nobody with `setpriv`; it fails (never skips) if that
//! cannot be done here.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use heapcap_integration::binaries::heapcap;
use heapcap_integration::fixture::{assert_at_quota, fixture_result, MIB};
use heapcap_integration::process::{run_captured, show, stderr};

const ALLOC: &str = env!("HEAPCAP_ALLOC");
const NOBODY: u32 = 65534;

/// `heapcap run ARGS` as nobody, with `env` added; a hang fails the test after a minute.
fn run_as_nobody(args: &[&str], env: &[(&str, &str)]) -> Output {
    let bin = heapcap().get_program().to_owned();
    for path in [Path::new(&bin), Path::new(ALLOC)] {
        let mode = std::fs::metadata(path).expect("the binary").permissions().mode();
        let mut dir = path.parent();
        while let Some(d) = dir {
            let m = std::fs::metadata(d).expect("a directory").permissions().mode();
            assert!(m & 0o001 != 0, "nobody cannot reach {}: {} is mode {m:o}", path.display(), d.display());
            dir = d.parent();
        }
        assert!(mode & 0o001 != 0, "nobody cannot run {} (mode {mode:o})", path.display());
    }
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", &NOBODY.to_string(), "--regid", &NOBODY.to_string(), "--clear-groups", "--"])
        .arg(&bin)
        .arg("run")
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null());
    // A hang (the supervisor deadlocked on a refused read) fails the test with what was said.
    run_captured(cmd, Duration::from_secs(60))
}

#[test]
fn a_program_that_is_not_dumpable_is_held_at_its_quota_without_a_hang() {
    let nodump = [("ALLOC_NODUMP", "1")];
    // Blocks of 1 MiB, mmap and malloc (whose brk heap cannot be charged without the break, so
    // glibc falls back to mmap): held at 64 MiB from statm (which also counts the stack and
    // private file data: a little below the quota).
    for mode in ["mmap", "malloc"] {
        let out = run_as_nobody(&["--limit", "64Mi", "--", ALLOC, mode, "1048576", "0"], &nodump);
        let (allocated, result) = fixture_result(&out);
        assert_at_quota(&format!("not dumpable, {mode}"), allocated, &result, 64 * MIB, MIB);
        let said = stderr(&out);
        assert!(said.contains("cannot read the mappings"), "said once why: {}", show(&out));
        assert_eq!(said.matches("cannot read the mappings").count(), 1, "warned once: {}", show(&out));
    }
    // Frees are seen (in statm): a program that allocates and frees 1 GiB in 16 MiB blocks
    // under a 64 MiB quota runs to the end.
    let out = run_as_nobody(&["--limit", "64Mi", "--", ALLOC, "churn", "16777216", "1073741824"], &nodump);
    assert_eq!(fixture_result(&out), (1 << 30, "ok".to_string()), "{}", show(&out));
    // A denial says what it was decided on.
    let out = run_as_nobody(&["--limit", "16Mi", "--", ALLOC, "mmap", "4194304", "0"], &nodump);
    assert!(stderr(&out).contains("statm"), "{}", show(&out));
}

#[test]
fn an_unprivileged_run_of_a_dumpable_program_is_exact() {
    let out = run_as_nobody(&["--limit", "64Mi", "--", ALLOC, "mmap", "1048576", "0"], &[]);
    let (allocated, result) = fixture_result(&out);
    assert_at_quota("nobody, dumpable", allocated, &result, 64 * MIB, MIB);
    assert!(!stderr(&out).contains("cannot read"), "{}", show(&out));
}
