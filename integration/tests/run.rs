//! End-to-end tests of `heapcap run`: the real `heapcap` binary supervising the
//! C fixture `fixtures/alloc.c` (built by `build.rs` as `alloc` and, with
//! `-m32`, `alloc32`), plus `sh`, `cat` and `/usr/bin/python3`.
//!
//! The fixture prints one line, `allocated=<bytes> result=<ok|ENOMEM|...>`
//! (children prefix it with `child `), where `allocated` counts only the bytes
//! its own allocations obtained.
//!
//! # The bound asserted for a per-process quota
//!
//! The quota also counts the process's baseline (libc's data, the loader's
//! allocations, the first brk heap, thread stacks), so the fixture can obtain
//! a little less than the limit. For a loop of `chunk`-sized allocations under
//! `limit` every such test asserts
//!
//! ```text
//! limit - (1 MiB + chunk + BASELINE) <= allocated <= limit
//! ```
//!
//! with `BASELINE` = 2 MiB, a generous allowance for the C fixture's own
//! counted memory at start. Tests with several threads or processes widen the
//! lower bound as documented at each test.
//!
//! Nothing is skipped: a missing tool (gcc, `-m32`, python3, the `heapcap`
//! binary) makes the test panic with a message saying what is missing.

use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use heapcap_integration::fixture::{fixture_result, parse_allocated, parse_children};
use heapcap_integration::process::{show, stderr, stdout};

#[allow(non_upper_case_globals)]
const KiB: u64 = 1024;
#[allow(non_upper_case_globals)]
const MiB: u64 = 1024 * KiB;
#[allow(non_upper_case_globals)]
const GiB: u64 = 1024 * MiB;

/// Generous allowance for the fixture's own counted memory at start.
const BASELINE: u64 = 2 * MiB;

/// Slack for the quota's granularity (page rounding, malloc's top pad).
const GRANULARITY: u64 = MiB;

/// The fixture, native build.
const ALLOC: &str = env!("HEAPCAP_ALLOC");
/// The fixture, `-m32` build.
const ALLOC32: &str = env!("HEAPCAP_ALLOC32");

const PYTHON: &str = "/usr/bin/python3";

/// A `heapcap run` that takes longer than this is treated as hung.
const TIMEOUT: Duration = Duration::from_secs(180);

// ------------------------------------------------------------------ helpers

/// Serialises the tests whose resident memory is large (hundreds of MiB), so
/// that the parallel test runner does not stack them up.
fn heavy() -> MutexGuard<'static, ()> {
    static HEAVY: Mutex<()> = Mutex::new(());
    HEAVY.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The `heapcap` binary of this workspace, built once per test run with
/// `cargo build -p heapcap --bin heapcap` (the path comes from cargo's JSON
/// messages, so `CARGO_TARGET_DIR` and `build.target-dir` are honoured).
fn heapcap_bin() -> &'static Path {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BIN.get_or_init(build_heapcap) {
        Ok(path) => path,
        Err(message) => panic!("{message}"),
    }
}

fn build_heapcap() -> Result<PathBuf, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let workspace =
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the integration crate lives inside the workspace");
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(workspace)
        .arg("build")
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .args(["-p", "heapcap", "--bin", "heapcap"])
        .arg("--message-format=json-render-diagnostics")
        .stdin(Stdio::null());
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| format!("cannot run cargo to build the heapcap binary ({shown}): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building the heapcap binary failed ({shown}, {}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let messages = String::from_utf8_lossy(&out.stdout);
    let path = messages
        .lines()
        .filter(|line| line.contains(r#""reason":"compiler-artifact""#))
        .filter_map(json_executable)
        .find(|path| path.file_name().is_some_and(|name| name == "heapcap"))
        .ok_or_else(|| format!("`{shown}` succeeded but reported no `heapcap` executable:\n{messages}"))?;
    if !path.is_file() {
        return Err(format!("cargo reported {} as the heapcap binary, but it does not exist", path.display()));
    }
    Ok(path)
}

/// The `"executable":"..."` field of one cargo JSON message, if any.
fn json_executable(line: &str) -> Option<PathBuf> {
    const KEY: &str = r#""executable":""#;
    let start = line.find(KEY)? + KEY.len();
    let mut path = String::new();
    let mut chars = line[start..].chars();
    loop {
        match chars.next()? {
            '"' => return Some(PathBuf::from(path)),
            '\\' => match chars.next()? {
                'n' => path.push('\n'),
                't' => path.push('\t'),
                other => path.push(other), // `\"`, `\\`, `\/`
            },
            c => path.push(c),
        }
    }
}

/// Runs `heapcap ARGS...` with stdin from /dev/null.
fn run_heapcap(args: &[&str]) -> Output {
    run_heapcap_with_stdin(args, None)
}

/// Runs `heapcap ARGS...`, feeding `stdin` (if any) to it, and collects its
/// status, stdout and stderr. Panics (with the output so far) if heapcap
/// cannot be started or runs for longer than `TIMEOUT`.
fn run_heapcap_with_stdin(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = Command::new(heapcap_bin());
    cmd.args(args);
    run_command(cmd, stdin)
}

/// Runs `cmd` (heapcap, or a shell that execs it) as [`run_heapcap_with_stdin`] does.
fn run_command(mut cmd: Command, stdin: Option<&[u8]>) -> Output {
    let args: Vec<_> = std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(|a| a.to_owned()).collect();
    // Its own process group, so that a hung run can be killed with its
    // whole tree.
    cmd.process_group(0)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {args:?}: {e}"));

    let feeder = stdin.map(|data| {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        let data = data.to_vec();
        // A command that does not read its input closes the pipe early; the
        // resulting EPIPE is not the test's concern.
        thread::spawn(move || drop(pipe.write_all(&data)))
    });
    let stdout = collect(child.stdout.take().expect("stdout is piped"));
    let stderr = collect(child.stderr.take().expect("stderr is piped"));

    let status = wait_with_timeout(&mut child);
    if let Some(feeder) = feeder {
        feeder.join().expect("stdin feeder thread");
    }
    let Some(status) = status else {
        // The pipes close once every holder is gone; give the readers a moment.
        let until = Instant::now() + Duration::from_secs(2);
        while !(stdout.is_finished() && stderr.is_finished()) && Instant::now() < until {
            thread::sleep(Duration::from_millis(20));
        }
        let said = |pipe: thread::JoinHandle<Vec<u8>>| {
            if pipe.is_finished() {
                String::from_utf8_lossy(&pipe.join().expect("reader thread")).into_owned()
            } else {
                "(still held open by some process)\n".to_string()
            }
        };
        panic!(
            "heapcap {args:?} did not finish within {TIMEOUT:?}; killed its process group\n\
             --- stdout ---\n{}--- stderr ---\n{}--- end ---",
            said(stdout),
            said(stderr)
        );
    };
    Output {
        status,
        stdout: stdout.join().expect("stdout reader thread"),
        stderr: stderr.join().expect("stderr reader thread"),
    }
}

fn collect(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        // A read error just ends the capture; the test sees what came before.
        drop(pipe.read_to_end(&mut buf));
        buf
    })
}

/// Waits for `child` up to `TIMEOUT`; on timeout kills its process group
/// (heapcap, which we started, and everything it started) and returns `None`.
fn wait_with_timeout(child: &mut Child) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let group = format!("-{}", child.id());
                // Failures mean the group is already gone: fine either way.
                let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            Err(e) => panic!("waiting for heapcap: {e}"),
        }
    }
}

/// `heapcap run OPTS... -- FIXTURE MODE NUMS...`
fn run_fixture(opts: &[&str], fixture: &str, mode: &str, nums: &[u64]) -> Output {
    let nums: Vec<String> = nums.iter().map(u64::to_string).collect();
    let mut args = vec!["run"];
    args.extend_from_slice(opts);
    args.extend(["--", fixture, mode]);
    args.extend(nums.iter().map(String::as_str));
    run_heapcap(&args)
}

fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / MiB as f64)
}

/// The allocation loop stopped with ENOMEM at the quota:
/// `limit - slack <= allocated <= limit`.
fn assert_stopped_at_quota(out: &Output, allocated: u64, result: &str, limit: u64, slack: u64) {
    assert_eq!(result, "ENOMEM", "growth past the quota must fail with ENOMEM:\n{}", show(out));
    assert!(allocated <= limit, "allocated {} but the quota is {}:\n{}", mib(allocated), mib(limit), show(out));
    assert!(
        allocated >= limit.saturating_sub(slack),
        "allocated only {}, expected at least {} (quota {} minus {} slack):\n{}",
        mib(allocated),
        mib(limit.saturating_sub(slack)),
        mib(limit),
        mib(slack),
        show(out)
    );
}

/// Runs `FIXTURE MODE CHUNK 0` under `--limit LIMIT` and checks the
/// per-process bound `limit - (1 MiB + chunk + BASELINE) <= allocated <= limit`.
fn check_loop_under_limit(fixture: &str, mode: &str, chunk: u64, limit: u64) {
    let limit_arg = limit.to_string();
    let out = run_fixture(&["--limit", &limit_arg], fixture, mode, &[chunk, 0]);
    let (allocated, result) = fixture_result(&out);
    assert_stopped_at_quota(&out, allocated, &result, limit, GRANULARITY + chunk + BASELINE);
}

/// Parses a size as printed in the report: `12.0 MiB`, `12.0MiB`, `512 B`,
/// `1.5 GiB`, `123456`; binary units for `KiB`/`Ki`/`K`..., decimal for `kB`/`MB`/`GB`.
fn parse_report_size(cell: &str) -> Option<u64> {
    let cell = cell.trim();
    let split = cell.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(cell.len());
    let (number, unit) = cell.split_at(split);
    let number: f64 = number.parse().ok()?;
    let unit = unit.trim();
    let multiplier = match unit {
        "" | "B" | "b" | "bytes" => 1.0,
        "KiB" | "Ki" | "K" | "k" => KiB as f64,
        "MiB" | "Mi" | "M" => MiB as f64,
        "GiB" | "Gi" | "G" => GiB as f64,
        "TiB" | "Ti" | "T" => (1024 * GiB) as f64,
        "kB" | "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        _ => return None,
    };
    Some((number * multiplier).round() as u64)
}

fn is_unit(token: &str) -> bool {
    parse_report_size(&format!("1{token}")).is_some() && token.chars().all(char::is_alphabetic)
}

/// The `--report`/`--audit` table on stderr: its header line (containing
/// `PID`, `COMMAND`, `PEAK` and `DENIALS`) and, for every row, the cells
/// under each header column. A size such as `12.0 MiB` is one cell; a
/// COMMAND with spaces is handled by aligning the columns after COMMAND from
/// the right.
fn parse_report(stderr: &str) -> Vec<Vec<(String, String)>> {
    let lines: Vec<&str> = stderr.lines().collect();
    let header_at = lines
        .iter()
        .position(|line| {
            let upper = line.to_uppercase();
            let words: Vec<&str> = upper.split_whitespace().collect();
            ["PID", "COMMAND", "PEAK", "DENIALS"].iter().all(|column| words.contains(column))
        })
        .unwrap_or_else(|| panic!("no report header with PID, COMMAND, PEAK and DENIALS on stderr:\n{stderr}"));
    let header: Vec<String> = lines[header_at].split_whitespace().map(str::to_uppercase).collect();
    let command_at = header.iter().position(|h| h == "COMMAND").expect("checked above");

    let mut rows = Vec::new();
    for line in &lines[header_at + 1..] {
        let tokens: Vec<&str> = line.split_whitespace().collect();
        if tokens.is_empty() {
            if rows.is_empty() {
                continue;
            }
            break;
        }
        if tokens.iter().all(|t| t.chars().all(|c| "-=+|".contains(c))) {
            continue; // a rule under the header
        }
        let Some(pid_at) = tokens.iter().position(|t| t.parse::<u32>().is_ok()) else {
            break;
        };
        if pid_at > 0 {
            break;
        }
        let mut cells: Vec<String> = Vec::new();
        let mut i = 0;
        while i < tokens.len() {
            let t = tokens[i];
            if t.parse::<f64>().is_ok() && i + 1 < tokens.len() && is_unit(tokens[i + 1]) {
                cells.push(format!("{t} {}", tokens[i + 1]));
                i += 2;
            } else {
                cells.push(t.to_string());
                i += 1;
            }
        }
        assert!(
            cells.len() >= header.len(),
            "report row {line:?} has fewer cells than the header {header:?}:\n{stderr}"
        );
        let mut row = Vec::new();
        for (at, column) in header.iter().enumerate() {
            let cell = if at < command_at {
                cells[at].clone()
            } else if at == command_at {
                let after = header.len() - command_at - 1;
                cells[command_at..cells.len() - after].join(" ")
            } else {
                cells[cells.len() - (header.len() - at)].clone()
            };
            row.push((column.clone(), cell));
        }
        rows.push(row);
    }
    assert!(!rows.is_empty(), "the report has a header but no rows:\n{stderr}");
    rows
}

fn cell<'a>(row: &'a [(String, String)], column: &str) -> &'a str {
    row.iter()
        .find(|(c, _)| c == column)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {column} column in report row {row:?}"))
}

/// The report row of the (single) fixture process, found by its COMMAND.
fn fixture_row(out: &Output) -> Vec<(String, String)> {
    let stderr = stderr(out);
    let rows: Vec<_> = parse_report(&stderr).into_iter().filter(|row| cell(row, "COMMAND").contains("alloc")).collect();
    assert_eq!(rows.len(), 1, "expected exactly one report row whose COMMAND contains `alloc`:\n{}", show(out));
    rows.into_iter().next().expect("one row")
}

fn report_size(row: &[(String, String)], column: &str, out: &Output) -> u64 {
    let text = cell(row, column);
    parse_report_size(text)
        .unwrap_or_else(|| panic!("cannot read the {column} cell {text:?} as a size:\n{}", show(out)))
}

fn python3() -> &'static str {
    assert!(Path::new(PYTHON).is_file(), "{PYTHON} is required for this test (Debian: apt-get install python3)");
    PYTHON
}

// ------------------------------------------------- one process, one quota

#[test]
fn brk_loop_stops_at_the_quota() {
    check_loop_under_limit(ALLOC, "brk", 64 * KiB, 64 * MiB);
}

#[test]
fn malloc_loop_from_the_brk_heap_stops_at_the_quota() {
    check_loop_under_limit(ALLOC, "malloc", 64 * KiB, 64 * MiB);
}

#[test]
fn mmap_of_big_blocks_stops_at_the_quota() {
    check_loop_under_limit(ALLOC, "mmap", 4 * MiB, 64 * MiB);
}

#[test]
fn realloc_growth_with_mremap_stops_at_the_quota() {
    check_loop_under_limit(ALLOC, "realloc", MiB, 64 * MiB);
}

/// 8 threads (64 KiB stacks) malloc 256 KiB chunks at once from their own
/// arenas, grown with mprotect. Bound: `limit - (8 * chunk + 4 MiB) <=
/// allocated <= limit`, where 8 chunks may be lost to the last failing
/// claim of each thread, and 4 MiB covers the baseline, the stacks and the
/// arenas' headers and padding. Run several times to give races a chance.
/// `heapcap ARGS...` started by a shell whose limit on open files is `nofile` (`ulimit -Sn`).
fn run_heapcap_with_fd_limit(nofile: u64, args: &[&str]) -> Output {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!("ulimit -Sn {nofile} && exec \"$0\" \"$@\"")).arg(heapcap_bin()).args(args);
    run_command(cmd, None)
}

/// 300 threads alive at once, each mapping 64 KiB 20 times, under a heapcap started with a limit
/// of 128 open files (a shell's `ulimit -n`): heapcap holds fds for each thread it remembers, so
/// it takes its hard limit once the command has started, and no call is refused for want of an
/// fd. The command keeps the limit it was started with.
#[test]
fn a_crowd_of_threads_is_served_whatever_fd_limit_heapcap_starts_with() {
    let _heavy = heavy();
    let out = run_heapcap_with_fd_limit(128, &["run", "--limit", "8Gi", "--", ALLOC, "crowd", "300", "20", "65536"]);
    assert_eq!(fixture_result(&out), (300 * 20 * 64 * KiB, "ok".to_string()), "{}", show(&out));
    let out = run_heapcap_with_fd_limit(128, &["run", "--limit", "1Gi", "--", "sh", "-c", "ulimit -Sn"]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "128", "the command's own limit");
}

#[test]
fn threads_racing_for_the_quota_never_pass_it() {
    let limit = 128 * MiB;
    let chunk = 256 * KiB;
    let threads = 8;
    for _ in 0..3 {
        let out = run_fixture(&["--limit", "128Mi"], ALLOC, "threads", &[threads, chunk, 0]);
        let (allocated, result) = fixture_result(&out);
        assert_stopped_at_quota(&out, allocated, &result, limit, threads * chunk + 4 * MiB);
    }
}

/// Go-style reserve-then-commit: a 1 GiB PROT_NONE reservation is not heap
/// (the fixture exits 1 if the reservation fails); the commits are, and stop
/// at the quota.
/// The fixture exits 1 saying `reserving ... failed` if the reservation
/// itself was refused.
fn assert_reserved(out: &Output) {
    assert!(
        !stderr(out).contains("reserving"),
        "a 1 GiB PROT_NONE reservation holds no heap and must not be refused:\n{}",
        show(out)
    );
}

#[test]
fn reserve_then_commit_with_map_fixed_stops_at_the_quota() {
    let out = run_fixture(&["--limit", "64Mi"], ALLOC, "reserve-fixed", &[GiB, MiB]);
    assert_reserved(&out);
    let (allocated, result) = fixture_result(&out);
    assert_stopped_at_quota(&out, allocated, &result, 64 * MiB, GRANULARITY + MiB + BASELINE);
}

#[test]
fn reserve_then_commit_with_mprotect_stops_at_the_quota() {
    let out = run_fixture(&["--limit", "64Mi"], ALLOC, "reserve-mprotect", &[GiB, MiB]);
    assert_reserved(&out);
    let (allocated, result) = fixture_result(&out);
    assert_stopped_at_quota(&out, allocated, &result, 64 * MiB, GRANULARITY + MiB + BASELINE);
}

/// File mappings are never counted: 512 MiB of a file, mapped private and
/// shared, written to, under a 32 MiB quota.
#[test]
fn file_mappings_do_not_count() {
    let _heavy = heavy();
    let size = 512 * MiB;
    let out = run_fixture(&["--limit", "32Mi"], ALLOC, "filemap", &[size]);
    let (allocated, result) = fixture_result(&out);
    assert_eq!(
        (allocated, result.as_str()),
        (size, "ok"),
        "mapping a 512 MiB file must not be limited by a 32 MiB heap quota:\n{}",
        show(&out)
    );
}

/// Memory given back is seen: 2 GiB pass through 1 MiB chunks (mmap/munmap
/// and malloc/free) under a 32 MiB quota.
#[test]
fn freed_memory_can_be_allocated_again() {
    let total = 2 * GiB;
    let out = run_fixture(&["--limit", "32Mi"], ALLOC, "churn", &[MiB, total]);
    let (allocated, result) = fixture_result(&out);
    assert_eq!(
        (allocated, result.as_str()),
        (total, "ok"),
        "allocating and freeing 1 MiB at a time must never hit a 32 MiB quota:\n{}",
        show(&out)
    );
}

// ------------------------------------------------------- fork, exec, trees

/// A forked child starts with its parent's usage (40 MiB held by the parent),
/// so under 64 MiB it gets about 24 MiB:
/// `24 MiB - (1 MiB + chunk + BASELINE) <= child <= 24 MiB`.
#[test]
fn forked_child_starts_with_its_parents_usage() {
    let parent = 40 * MiB;
    let chunk = MiB;
    let out = run_fixture(&["--limit", "64Mi"], ALLOC, "fork-child", &[chunk, parent]);
    let (allocated, result) = fixture_result(&out);
    assert_eq!((allocated, result.as_str()), (parent, "ok"), "the parent's 40 MiB fit the quota:\n{}", show(&out));
    let children = parse_children(&stdout(&out));
    assert_eq!(children.len(), 1, "expected one child line:\n{}", show(&out));
    let (child, child_result) = &children[0];
    assert_stopped_at_quota(&out, *child, child_result, 64 * MiB - parent, GRANULARITY + chunk + BASELINE);
}

/// exec gives the new image a fresh quota: the parent held 40 MiB, the exec'd
/// `mmap` loop still gets about the full 64 MiB.
#[test]
fn exec_starts_a_fresh_quota() {
    let chunk = MiB;
    let out = run_fixture(&["--limit", "64Mi"], ALLOC, "exec-child", &[40 * MiB, chunk]);
    let (allocated, result) = fixture_result(&out);
    assert_stopped_at_quota(&out, allocated, &result, 64 * MiB, GRANULARITY + chunk + BASELINE);
}

/// 4 children, each under a 64 MiB quota, all under a 100 MiB total, hold
/// their memory at the same time. Each child gets at most 64 MiB; together
/// `100 MiB - (1 MiB + 4 * chunk + 5 * BASELINE) <= sum <= 100 MiB` (the
/// parent's and the four children's baselines count towards the total).
#[test]
fn total_limit_caps_the_whole_tree() {
    let chunk = MiB;
    let out = run_fixture(&["--limit", "64Mi", "--total-limit", "100Mi"], ALLOC, "spawn", &[4, chunk]);
    let (allocated, result) = fixture_result(&out);
    assert_eq!((allocated, result.as_str()), (0, "ok"), "{}", show(&out));
    let children = parse_children(&stdout(&out));
    assert_eq!(children.len(), 4, "expected four child lines:\n{}", show(&out));
    for (bytes, result) in &children {
        assert_eq!(result, "ENOMEM", "every child must end on ENOMEM:\n{}", show(&out));
        assert!(*bytes <= 64 * MiB, "a child allocated {} past its 64 MiB quota:\n{}", mib(*bytes), show(&out));
    }
    let sum: u64 = children.iter().map(|(bytes, _)| bytes).sum();
    let total = 100 * MiB;
    let slack = GRANULARITY + 4 * chunk + 5 * BASELINE;
    assert!(sum <= total, "the children together held {} past the 100 MiB total:\n{}", mib(sum), show(&out));
    assert!(
        sum >= total - slack,
        "the children together got only {}, expected at least {}:\n{}",
        mib(sum),
        mib(total - slack),
        show(&out)
    );
}

// -------------------------------------------------------- a real runtime

#[test]
fn python_gets_memory_error_and_fits_a_bigger_quota() {
    let _heavy = heavy();
    let python = python3();
    let script = "x = bytearray(200 * 2**20)";

    let out = run_heapcap(&["run", "--limit", "64Mi", "--", python, "-c", script]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "python must exit 1 when a 200 MiB bytearray passes a 64 MiB quota:\n{}",
        show(&out)
    );
    assert!(stderr(&out).contains("MemoryError"), "python must raise MemoryError:\n{}", show(&out));

    let out = run_heapcap(&["run", "--limit", "512Mi", "--", python, "-c", script]);
    assert!(out.status.success(), "a 200 MiB bytearray fits a 512 MiB quota:\n{}", show(&out));
}

// ------------------------------------------------------ report and audit

/// Audit mode limits nothing and reports each process's peak.
#[test]
fn audit_mode_lets_everything_through_and_reports_the_peak() {
    let _heavy = heavy();
    let max = 200 * MiB;
    let out = run_fixture(&["--audit"], ALLOC, "mmap", &[4 * MiB, max]);
    let (allocated, result) = fixture_result(&out);
    assert_eq!((allocated, result.as_str()), (max, "ok"), "audit mode must not deny anything:\n{}", show(&out));
    let row = fixture_row(&out);
    let peak = report_size(&row, "PEAK", &out);
    assert!(peak >= max, "the report's PEAK {} is below the 200 MiB the process held:\n{}", mib(peak), show(&out));
}

/// `--report` with a limit: the peak stays within the quota and the denial
/// that stopped the loop is counted.
#[test]
fn report_shows_peak_and_denials() {
    let limit = 64 * MiB;
    let chunk = 4 * MiB;
    let out = run_fixture(&["--limit", "64Mi", "--report"], ALLOC, "mmap", &[chunk, 0]);
    let (allocated, result) = fixture_result(&out);
    assert_stopped_at_quota(&out, allocated, &result, limit, GRANULARITY + chunk + BASELINE);
    let row = fixture_row(&out);
    let peak = report_size(&row, "PEAK", &out);
    // One decimal of MiB is printed; allow for its rounding.
    let rounding = MiB / 20;
    assert!(
        peak + rounding >= allocated && peak <= limit + rounding,
        "PEAK {} must lie between what the fixture got ({}) and the quota ({}):\n{}",
        mib(peak),
        mib(allocated),
        mib(limit),
        show(&out)
    );
    let denials = cell(&row, "DENIALS");
    let denials: u64 =
        denials.parse().unwrap_or_else(|_| panic!("cannot read DENIALS cell {denials:?} as a count:\n{}", show(&out)));
    assert!(denials >= 1, "the ENOMEM that stopped the loop is a denial:\n{}", show(&out));
}

// ---------------------------------------------------------- 32-bit ABI

#[test]
fn i386_mmap2_stops_at_the_quota() {
    check_loop_under_limit(ALLOC32, "mmap2", 4 * MiB, 64 * MiB);
}

#[test]
fn i386_old_mmap_stops_at_the_quota() {
    check_loop_under_limit(ALLOC32, "old-mmap", 4 * MiB, 64 * MiB);
}

#[test]
fn i386_malloc_stops_at_the_quota() {
    check_loop_under_limit(ALLOC32, "malloc", 64 * KiB, 64 * MiB);
}

// ------------------------------------------------------------------ CLI

/// Kubernetes quantities: `M` is decimal, `Ki`/`Mi` binary, plain numbers
/// are bytes.
#[test]
fn size_units_mean_what_kubernetes_means() {
    let chunk = MiB;
    let slack = GRANULARITY + chunk + BASELINE;
    for (arg, limit) in [("60M", 60_000_000), ("61440Ki", 60 * MiB), ("62914560", 60 * MiB)] {
        let out = run_fixture(&["--limit", arg], ALLOC, "mmap", &[chunk, 0]);
        let (allocated, result) = fixture_result(&out);
        assert_stopped_at_quota(&out, allocated, &result, limit, slack);
    }

    let out = run_fixture(&["--limit", "1Gi"], ALLOC, "mmap", &[64 * MiB, 512 * MiB]);
    let (allocated, result) = fixture_result(&out);
    assert_eq!((allocated, result.as_str()), (512 * MiB, "ok"), "512 MiB fit in --limit 1Gi:\n{}", show(&out));
    let out = run_heapcap(&["run", "--limit", "500M", "--", "true"]);
    assert!(out.status.success(), "--limit 500M is valid:\n{}", show(&out));
}

/// Bad input: exit status 2, one line on stderr saying what to write, and the
/// command does not run.
#[test]
fn bad_command_lines_exit_2_with_one_line() {
    // (arguments after `run`, texts the message must contain)
    let cases: &[(&[&str], &[&str])] = &[
        (&["--limit", "abc", "--", "sh", "-c", "echo RAN"], &["abc", "Mi"]),
        (&["--limit", "-5Mi", "--", "sh", "-c", "echo RAN"], &["-5Mi"]),
        (&["--limit=-5Mi", "--", "sh", "-c", "echo RAN"], &["-5Mi"]),
        (&["--limit", "0", "--", "sh", "-c", "echo RAN"], &[]),
        (&["--limit", "64Mi", "--total-limit", "abc", "--", "sh", "-c", "echo RAN"], &["abc"]),
        (&["--limit", "64Mi", "--"], &["command"]),
        (&["--limit", "64Mi"], &["command"]),
        (&["--", "sh", "-c", "echo RAN"], &["--limit", "--audit"]),
    ];
    for (args, mentions) in cases {
        let mut full = vec!["run"];
        full.extend_from_slice(args);
        let out = run_heapcap(&full);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "heapcap {full:?} must exit 2:\n{}", show(&out));
        assert!(!stdout(&out).contains("RAN"), "heapcap {full:?} must not run the command:\n{}", show(&out));
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "heapcap {full:?} must explain itself in exactly one line:\n{}", show(&out));
        for mention in *mentions {
            assert!(
                lines[0].to_lowercase().contains(&mention.to_lowercase()),
                "the error for heapcap {full:?} should mention {mention:?}:\n{}",
                show(&out)
            );
        }
    }
}

#[test]
fn exit_status_passes_through() {
    let out = run_heapcap(&["run", "--limit", "64Mi", "--", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", show(&out));
    let out = run_heapcap(&["run", "--limit", "64Mi", "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
}

#[test]
fn death_by_signal_passes_through() {
    const SIGTERM: i32 = 15;
    let out = run_heapcap(&["run", "--limit", "64Mi", "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(
        out.status.signal(),
        Some(SIGTERM),
        "heapcap must die of the SIGTERM that killed its command:\n{}",
        show(&out)
    );
}

#[test]
fn stdout_and_stderr_pass_through() {
    let out = run_heapcap(&[
        "run",
        "--limit",
        "64Mi",
        "--",
        "sh",
        "-c",
        "printf 'line one\\nline two\\n'; printf 'to stderr\\n' >&2",
    ]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(stdout(&out), "line one\nline two\n", "stdout must be exactly the command's:\n{}", show(&out));
    assert!(stderr(&out).contains("to stderr\n"), "{}", show(&out));
}

#[test]
fn stdin_passes_through() {
    let input = b"first line\nsecond line\n";
    let out = run_heapcap_with_stdin(&["run", "--limit", "64Mi", "--", "cat"], Some(input));
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(out.stdout, input, "cat must echo its stdin:\n{}", show(&out));
}

// ------------------------------------------------------ the test helpers

#[test]
fn helpers_parse_what_they_claim() {
    assert_eq!(parse_allocated("noise\nallocated=42 result=ENOMEM\n"), (42, "ENOMEM".to_string()));
    assert_eq!(
        parse_children("child allocated=1 result=ok\nallocated=0 result=ok\nchild allocated=2 result=EPERM\n"),
        vec![(1, "ok".to_string()), (2, "EPERM".to_string())]
    );
    assert_eq!(parse_report_size("12.0 MiB"), Some(12 * MiB));
    assert_eq!(parse_report_size("1.5GiB"), Some(3 * GiB / 2));
    assert_eq!(parse_report_size("512 B"), Some(512));
    assert_eq!(parse_report_size("-"), None);
    assert_eq!(
        json_executable(r#"{"reason":"compiler-artifact","executable":"/t/debug/heapcap","fresh":true}"#),
        Some(PathBuf::from("/t/debug/heapcap"))
    );
    assert_eq!(json_executable(r#"{"executable":null}"#), None);

    let report = "heapcap: done\n\
                  PID    COMMAND          LIMIT      PEAK       DENIALS\n\
                  1234   /x/alloc mmap 1  64.0 MiB   63.5 MiB   3\n\
                  1240   sh               -          100 KiB    0\n\
                  \n\
                  trailing text\n";
    let rows = parse_report(report);
    assert_eq!(rows.len(), 2);
    assert_eq!(cell(&rows[0], "PID"), "1234");
    assert_eq!(cell(&rows[0], "COMMAND"), "/x/alloc mmap 1");
    assert_eq!(cell(&rows[0], "PEAK"), "63.5 MiB");
    assert_eq!(cell(&rows[0], "DENIALS"), "3");
    assert_eq!(cell(&rows[1], "LIMIT"), "-");
    assert_eq!(cell(&rows[1], "PEAK"), "100 KiB");
}
