//! Strict mode (`heapcap run --strict`), and the two holes it closed in every mode, end to end:
//! the real `heapcap` supervising `fixtures/strict.c`, which takes memory each way around a heap
//! quota, writes every page it got and keeps it all until it reports (`allocated=N result=R`;
//! a second process's line prefixed `child `).
//!
//! In strict mode each way ends at the quota: `limit - (1 MiB + chunk + baseline) <= allocated
//! <= limit` ([`assert_at_quota`]); in the default mode the ways outside its semantics (shared
//! memory, private copies of a file) still get what they ask for, as documented, and the two
//! that broke "never exceeded" in every mode (two processes in one address space, i386
//! `old_mmap` whose argument block a second thread rewrites) are held.
//!
//! Nothing is skipped: a missing `gcc -m32` fails the build of this crate (`build.rs`).

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use heapcap_integration::binaries::heapcap;
use heapcap_integration::fixture::{assert_at_quota, fixture_result, parse_children, MIB};
use heapcap_integration::process::{run_captured, show, stderr, stdout};

const STRICT: &str = env!("HEAPCAP_STRICT_FIXTURE");
const STRICT32: &str = env!("HEAPCAP_STRICT_FIXTURE32");
const ALLOC: &str = env!("HEAPCAP_ALLOC");
const ALLOC32: &str = env!("HEAPCAP_ALLOC32");
const LIMIT: u64 = 64 * MIB;
/// Each way takes four times the quota when nothing holds it.
const WANT: u64 = 256 * MIB;
const TIMEOUT: Duration = Duration::from_secs(180);

fn run(strict: bool, program: &str, args: &[String]) -> Output {
    let mut cmd = heapcap();
    cmd.args(["run", "--quiet", "--limit", "64Mi"]);
    if strict {
        cmd.arg("--strict");
    }
    cmd.arg("--").arg(program).args(args);
    run_captured(cmd, TIMEOUT)
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A scratch directory on the disk this crate is built on (ext4 here), for the file modes.
fn disk_dir() -> &'static Path {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(dir).expect("CARGO_TARGET_TMPDIR");
    dir
}

const CHUNK: &str = "1048576";
const MAX: &str = "268435456";

/// The one-process ways around, with what the default mode lets each take.
fn one_process_ways() -> Vec<(&'static str, Vec<String>)> {
    let disk = disk_dir().to_str().expect("utf-8").to_string();
    vec![
        ("memfd", args(&["memfd", CHUNK, MAX])),
        ("SysV shm", args(&["shm", CHUNK, MAX])),
        ("MAP_SHARED anonymous", args(&["sharedanon", CHUNK, MAX])),
        ("a file on tmpfs, shared", args(&["tmpfs", CHUNK, MAX, "/dev/shm"])),
        ("a sparse file, private, every page written", vec!["privfile".into(), CHUNK.into(), MAX.into(), disk]),
    ]
}

#[test]
fn strict_holds_every_way_around_at_the_quota() {
    for (what, args) in one_process_ways() {
        let out = run(true, STRICT, &args);
        let (allocated, result) = fixture_result(&out);
        assert_at_quota(&format!("strict, {what}"), allocated, &result, LIMIT, MIB);
        let out = run(false, STRICT, &args);
        let (allocated, result) = fixture_result(&out);
        assert_eq!((allocated, result.as_str()), (WANT, "ok"), "default mode, {what}: outside its semantics");
    }
}

/// i386 programs: the same ways, and SysV shm through both `shmat` and the old `ipc(2)`.
#[test]
fn strict_holds_i386_programs_too() {
    for (what, args) in [
        ("i386 shmat", args(&["shm", CHUNK, MAX])),
        ("i386 ipc(SHMAT)", args(&["shm-ipc", CHUNK, MAX])),
        ("i386 memfd", args(&["memfd", CHUNK, MAX])),
    ] {
        let (allocated, result) = fixture_result(&run(true, STRICT32, &args));
        assert_at_quota(what, allocated, &result, LIMIT, MIB);
        let out = run(false, STRICT32, &args);
        assert_eq!(fixture_result(&out), (WANT, "ok".to_string()), "default mode, {what}");
    }
}

#[test]
fn strict_leaves_shared_mappings_of_disk_files_uncounted() {
    // Page cache the kernel writes back: 256 MiB of it under a 64 MiB quota. Each mapping is held
    // against the quota in full until the next exact figure shows what it is.
    let disk = disk_dir().to_str().expect("utf-8").to_string();
    let out = run(true, STRICT, &["diskfile".into(), CHUNK.into(), MAX.into(), disk]);
    assert_eq!(fixture_result(&out), (WANT, "ok".to_string()), "{}", show(&out));
}

#[test]
fn ordinary_allocation_still_reaches_the_quota_in_strict_mode() {
    for (mode, chunk) in [("mmap", MIB), ("malloc", 64 * 1024), ("brk", 64 * 1024)] {
        let out = run(true, ALLOC, &[mode.to_string(), chunk.to_string(), "0".into()]);
        let (allocated, result) = fixture_result(&out);
        assert_at_quota(&format!("strict {mode}"), allocated, &result, LIMIT, chunk);
    }
    // python3 starts and fails its allocation with MemoryError, as in the default mode.
    let out = run(true, "/usr/bin/python3", &args(&["-c", "x = bytearray(200 * 2**20)"]));
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(stderr(&out).contains("MemoryError"), "{}", show(&out));
}

/// Two processes in one address space, mapping at the same time, both held by one account.
#[test]
fn clone_vm_processes_share_one_quota_in_every_mode() {
    for strict in [false, true] {
        let out = run(strict, STRICT, &args(&["clonevm", CHUNK, MAX]));
        let (parent, result) = fixture_result(&out);
        let children = parse_children(&stdout(&out));
        let [(child, child_result)] = children.as_slice() else { panic!("one child line:\n{}", show(&out)) };
        assert_at_quota(&format!("clone(CLONE_VM), strict={strict}"), parent + child, &result, LIMIT, 2 * MIB);
        assert_eq!(child_result, "ENOMEM");
    }
}

/// A vfork child maps in its parent's address space and exits: the parent holds it.
#[test]
fn a_vfork_childs_memory_counts_for_its_parent_in_every_mode() {
    for strict in [false, true] {
        let out = run(strict, STRICT, &args(&["vfork", CHUNK, MAX]));
        let (parent, result) = fixture_result(&out);
        let children = parse_children(&stdout(&out));
        let [(child, _)] = children.as_slice() else { panic!("one child line:\n{}", show(&out)) };
        assert!(*child > 0, "the vfork child got something:\n{}", show(&out));
        assert_at_quota(&format!("vfork, strict={strict}"), parent + child, &result, LIMIT, MIB);
    }
}

/// i386 `old_mmap` reads its arguments from memory: with a second thread that could rewrite them
/// between heapcap's read and the kernel's, it is refused; alone, it works as it always did.
#[test]
fn old_mmap_is_refused_while_another_thread_could_rewrite_its_arguments() {
    for strict in [false, true] {
        let out = run(strict, STRICT32, &args(&["oldmmap-race", CHUNK, MAX]));
        let (allocated, result) = fixture_result(&out);
        assert_eq!((allocated, result.as_str()), (0, "ENOMEM"), "strict={strict}:\n{}", show(&out));
        let out = run(strict, ALLOC32, &args(&["old-mmap", CHUNK, "0"]));
        let (allocated, result) = fixture_result(&out);
        assert_at_quota(&format!("single-threaded old_mmap, strict={strict}"), allocated, &result, LIMIT, MIB);
    }
}

/// A `MAP_GROWSDOWN` mapping grows at each fault below it, with no call at all: the default mode
/// charges the page made writable; strict refuses to make one, read-only or writable.
#[test]
fn strict_refuses_mappings_that_grow_with_no_call() {
    let out = run(true, STRICT, &args(&["growsdown", CHUNK, MAX]));
    assert_eq!(fixture_result(&out), (0, "ENOMEM".to_string()), "strict:\n{}", show(&out));
    assert!(stderr(&out).contains("MAP_GROWSDOWN"), "the refusal says why:\n{}", show(&out));
    // The default mode sees such growth only when it next reads the process (at a peak mark):
    // far past the quota.
    let out = run(false, STRICT, &args(&["growsdown", CHUNK, MAX]));
    let (allocated, _) = fixture_result(&out);
    assert!(allocated >= 2 * LIMIT, "default mode: the way around is real\n{}", show(&out));
    let out = run(true, STRICT32, &args(&["growsdown", CHUNK, "16777216"]));
    assert_eq!(fixture_result(&out), (0, "ENOMEM".to_string()), "strict, i386:\n{}", show(&out));
}

#[test]
fn without_heapcap_the_ways_around_take_what_they_ask_for() {
    // The baseline the tests above hold down: the fixture really does get 256 MiB each way.
    for (what, args) in one_process_ways() {
        let out = run_captured(
            {
                let mut c = std::process::Command::new(STRICT);
                c.args(&args);
                c
            },
            TIMEOUT,
        );
        assert_eq!(fixture_result(&out), (WANT, "ok".to_string()), "{what}");
    }
    let mut c = std::process::Command::new(STRICT32);
    c.args(args(&["oldmmap-race", CHUNK, MAX]));
    let (allocated, _) = fixture_result(&run_captured(c, TIMEOUT));
    assert!(allocated > LIMIT, "the race is won unsupervised: {allocated}");
}
