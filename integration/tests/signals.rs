//! Heap growth under a hail of signals (`fixtures/signals.c`): threads that allocate and free while
//! another thread sends each of them SIGURG every 500 µs, as Go's runtime preempts its threads, still
//! make progress, see no failure but ENOMEM from their heap calls, and stop within the quota, under
//! `heapcap run` and under heapcapd in runc and crun containers.
//!
//! What the kernel does with a notified call interrupted by a signal: before the supervisor has
//! received the notification (and, for filters without `SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV`,
//! such as runc's and crun's, also after) the wait is interrupted and the call returns
//! `-ERESTARTSYS`. With an `SA_RESTART` handler (Go, and most programs) the kernel restarts the call
//! and the program sees nothing; without `SA_RESTART` it gets `EINTR`, as from any interruptible
//! call, from `mmap` and `brk` too, which a kernel without a seccomp listener never interrupts (and
//! glibc's `brk` wrapper takes `-EINTR` for the new break, so the `norestart` fixture uses raw
//! system calls only). The `norestart` tests assert exactly that: `EINTR` is the only error besides
//! ENOMEM, and a program that retries on it still ends at its quota (an interrupted call leaves no
//! growth behind in heapcap's accounts).

use std::process::{Command, Output};
use std::time::Duration;

use heapcap_integration::binaries;
use heapcap_integration::bundle::Bundle;
use heapcap_integration::daemon::Daemon;
use heapcap_integration::fixture::{self, field, quota_slack, MIB};
use heapcap_integration::ids::unique_id;
use heapcap_integration::process::{run_captured, show, stdout};
use heapcap_integration::runtime::Runtime;

/// The fixture (static build: it also runs in busybox containers).
const SIGNALS: &str = env!("HEAPCAP_SIGNALS_STATIC");

const THREADS: usize = 4;
const SECONDS: &str = "3";
const INTERVAL_US: &str = "500";
const LIMIT: u64 = 64 * MIB;

/// Far below what a thread does in 3 s (thousands of rounds, each several notified calls): a
/// thread starved by its signals, or stuck, does not reach it.
const MIN_OPS: u64 = 50;
/// A thread hit every 500 µs for 3 s receives thousands of signals; this shows they were sent.
const MIN_SIGNALS: u64 = 100;

/// One `thread=...` line of the fixture.
#[derive(Debug)]
struct ThreadLine {
    ops: u64,
    signals: u64,
    eintr: u64,
    enomem: u64,
    other: u64,
    first_other: String,
}

fn number(line: &str, key: &str) -> u64 {
    field(line, key).parse().unwrap_or_else(|e| panic!("{key} in {line:?}: {e}"))
}

fn threads(out: &Output) -> Vec<ThreadLine> {
    stdout(out)
        .lines()
        .filter(|l| l.starts_with("thread="))
        .map(|l| ThreadLine {
            ops: number(l, "ops"),
            signals: number(l, "signals"),
            eintr: number(l, "eintr"),
            enomem: number(l, "enomem"),
            other: number(l, "other"),
            first_other: field(l, "first_other").to_string(),
        })
        .collect()
}

/// Every thread made progress and was signalled; no heap call failed but as `restart` allows;
/// the threads together ended at the quota with ENOMEM.
fn assert_survived(what: &str, out: &Output, restart: bool) {
    assert!(out.status.success(), "{what}: the fixture failed:\n{}", show(out));
    let lines = threads(out);
    assert_eq!(lines.len(), THREADS, "{what}: one line per thread expected:\n{}", show(out));
    for (i, t) in lines.iter().enumerate() {
        assert!(t.ops >= MIN_OPS, "{what}: thread {i} made only {} rounds under signals: {t:?}\n{}", t.ops, show(out));
        assert!(t.signals >= MIN_SIGNALS, "{what}: thread {i} got only {} signals: {t:?}", t.signals);
        assert_eq!(t.other, 0, "{what}: thread {i}: a heap call failed with {}: {t:?}\n{}", t.first_other, show(out));
        assert_eq!(t.enomem, 0, "{what}: thread {i} was refused far below its quota: {t:?}\n{}", show(out));
        if restart {
            assert_eq!(t.eintr, 0, "{what}: thread {i} saw EINTR despite SA_RESTART: {t:?}\n{}", show(out));
        }
    }
    let (allocated, result) = fixture::parse_allocated(&stdout(out));
    assert_eq!(result, "ENOMEM", "{what}: every thread's last loop must end with ENOMEM:\n{}", show(out));
    assert!(allocated <= LIMIT, "{what}: the threads obtained {allocated} bytes, over the {LIMIT}-byte quota");
    // Each thread may stop one 1 MiB block short, and the threads' stacks count.
    let slack = quota_slack(MIB) + THREADS as u64 * MIB;
    assert!(allocated + slack >= LIMIT, "{what}: only {allocated} of {LIMIT} bytes before ENOMEM:\n{}", show(out));
}

fn fixture_args(restart: bool) -> [&'static str; 4] {
    ["4", SECONDS, INTERVAL_US, if restart { "restart" } else { "norestart" }]
}

fn heapcap_run(restart: bool) -> Output {
    let mut cmd: Command = binaries::heapcap();
    cmd.args(["run", "--quiet", "--limit", "64Mi", "--", SIGNALS]).args(fixture_args(restart));
    run_captured(cmd, Duration::from_secs(120))
}

#[test]
fn threads_signalled_with_sa_restart_progress_and_stop_at_the_quota_under_heapcap_run() {
    let out = heapcap_run(true);
    assert_survived("heapcap run, SA_RESTART", &out, true);
}

#[test]
fn threads_signalled_without_sa_restart_see_only_eintr_and_stop_at_the_quota_under_heapcap_run() {
    let out = heapcap_run(false);
    assert_survived("heapcap run, no SA_RESTART", &out, false);
}

#[test]
fn threads_signalled_in_runc_and_crun_containers_progress_and_stop_at_the_quota() {
    let d = Daemon::start();
    let profile = d.profile();
    for restart in [true, false] {
        let mut b = Bundle::new("signals");
        let mut args = vec!["/signals"];
        args.extend(fixture_args(restart));
        b.copy_into_rootfs(SIGNALS, "/signals")
            .args(&args)
            .seccomp(profile.clone())
            .annotation("heapcap.io/limit", "64Mi");
        for rt in Runtime::ALL {
            let out = b.run(rt, &unique_id("signals"));
            let what = format!("{rt:?}, {}", if restart { "SA_RESTART" } else { "no SA_RESTART" });
            assert_survived(&what, &out, restart);
            eprintln!("{what}: {}", stdout(&out).replace('\n', "; "));
        }
    }
    assert!(!d.log().contains("ERROR"), "heapcapd logged errors:\n{}", d.log());
}
