//! heapcapd can crash, be killed or be upgraded under running containers without harming them:
//! the fd holder keeps every listener, calls wait in the kernel while heapcapd is away, the
//! next heapcapd takes them back and answers the call the last one left, and quotas hold
//! exactly as before. With no heapcapd for longer than the grace period, calls are let through.

use std::time::{Duration, Instant};

use heapcap_integration::binaries;
use heapcap_integration::bundle::Bundle;
use heapcap_integration::container::Container;
use heapcap_integration::daemon::Daemon;
use heapcap_integration::fixture::{self, assert_at_quota, field, parse_allocated, MIB};
use heapcap_integration::ids::unique_id;
use heapcap_integration::process;
use heapcap_integration::runtime::Runtime;

/// How long each container's allocation storm lasts: long enough to span heapcapd's absence.
const STORM_SECONDS: u64 = 8;

/// `storm threads=N ops=N min_ops=N result=R` from a container's stdout.
fn storm_line(stdout: &str) -> (u64, u64, String) {
    let line =
        stdout.lines().find(|l| l.starts_with("storm ")).unwrap_or_else(|| panic!("no storm line in {stdout:?}"));
    (
        field(line, "ops").parse().expect("ops"),
        field(line, "min_ops").parse().expect("min_ops"),
        field(line, "result").to_string(),
    )
}

fn listed(d: &Daemon, id: &str) -> Option<serde_json::Value> {
    d.ps()["containers"].as_array()?.iter().find(|c| c["id"] == id).cloned()
}

/// Three containers (8 threads each allocating and freeing) run through `outage`, which takes
/// heapcapd away and brings it back. Every call must succeed, every program finish, and each
/// container's quota (one of them changed live before the outage) must hold at the end.
fn storm_through(outage: impl FnOnce(&mut Daemon)) {
    let mut d = Daemon::start_with(&["--holder-grace", "60s"]);
    let cases = [(Runtime::Runc, 96 * MIB), (Runtime::Crun, 96 * MIB), (Runtime::Runc, 80 * MIB)];
    let storm = STORM_SECONDS.to_string();
    let bundles: Vec<Bundle> = cases
        .iter()
        .map(|(_, limit)| {
            let mut b = Bundle::new("restart");
            let limit = format!("{}Mi", limit / MIB);
            b.args(&["/alloc", "storm", "8", "1048576", &storm])
                .seccomp(d.profile())
                .annotations(&[("heapcap.io/limit", &limit)]);
            b
        })
        .collect();
    let started = Instant::now();
    let running: Vec<Container<'_>> = bundles
        .iter()
        .zip(&cases)
        .map(|(b, (rt, _))| {
            let c = b.create(*rt, &unique_id("storm"));
            c.start();
            c
        })
        .collect();
    // Changed live: the successor must enforce 64 MiB, not the annotation's 80.
    let set = d.heapcap(&["set-limit", running[2].id(), "64Mi"]);
    assert!(set.status.success(), "set-limit: {}", process::show(&set));
    let limits = [cases[0].1, cases[1].1, 64 * MIB];

    std::thread::sleep(Duration::from_millis(1500));
    outage(&mut d);
    let back = started.elapsed();
    assert!(
        back + Duration::from_secs(2) < Duration::from_secs(STORM_SECONDS),
        "heapcapd took until {back:?} to come back: the storms ({STORM_SECONDS} s) no longer span the restart"
    );
    // The successor lists every container again, with its quota.
    for (c, limit) in running.iter().zip(limits) {
        let view = listed(&d, c.id()).unwrap_or_else(|| panic!("{} not in ps after the restart:\n{}", c.id(), d.log()));
        assert_eq!(view["limit"], limit, "{view}");
    }
    for (c, limit) in running.iter().zip(limits) {
        c.wait_stopped(Duration::from_secs(120));
        let out = c.stdout();
        let (ops, min_ops, result) = storm_line(&out);
        assert_eq!(
            result,
            "ok",
            "{}: a call failed across the restart:\n{out}\n{}\nheapcapd:\n{}",
            c.id(),
            c.stderr(),
            d.log()
        );
        assert!(min_ops > 0 && ops > 100, "{}: the storm did not progress: {out}", c.id());
        let (allocated, result) = parse_allocated(&out);
        assert_at_quota(&format!("{} after the restart", c.id()), allocated, &result, limit, MIB);
    }
    assert!(d.log().contains("taken back from the holder"), "heapcapd:\n{}", d.log());
    for c in running {
        c.delete();
    }
}

#[test]
fn kill_9_during_an_allocation_storm_harms_no_container() {
    storm_through(|d| {
        d.kill9();
        std::thread::sleep(Duration::from_millis(800));
        d.restart(None);
    });
}

#[test]
fn an_upgrade_to_a_new_binary_harms_no_container() {
    storm_through(|d| {
        // A new binary: another file, as a package upgrade leaves it.
        let new = d.dir.join("heapcapd-new");
        std::fs::copy(binaries::bin_dir().join("heapcapd"), &new).expect("copy heapcapd");
        d.stop();
        d.restart(Some(&new));
    });
}

#[test]
fn with_heapcapd_gone_past_the_grace_period_calls_go_through_until_it_is_back() {
    let mut d = Daemon::start_with(&["--holder-grace", "1s"]);
    // Phase 1 runs while heapcapd is away (unquota'd: 96 MiB under a 64 MiB quota), phase 2
    // after it is back (denied at 64 MiB).
    let script = "sleep 3; /alloc mmap 1048576 100663296; sleep 5; /alloc mmap 1048576 0";
    let mut b = Bundle::new("grace");
    b.args(&["/bin/sh", "-c", script]).seccomp(d.profile()).annotations(&[("heapcap.io/limit", "64Mi")]);
    let c = b.create(Runtime::Runc, &unique_id("grace"));
    let started = Instant::now();
    c.start();
    std::thread::sleep(Duration::from_millis(500));
    d.kill9();
    c.wait_for_stdout("allocated=", Duration::from_secs(30));
    d.restart(None);
    assert!(started.elapsed() < Duration::from_secs(7), "too slow: phase 2 may have started before heapcapd was back");
    c.wait_stopped(Duration::from_secs(60));
    let out = c.stdout();
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("allocated=")).collect();
    assert_eq!(lines.len(), 2, "{out}\n{}", c.stderr());
    assert_eq!(
        fixture::parse_allocated_line(lines[0]),
        Some((96 * MIB, "ok".to_string())),
        "away past the grace period, growth goes through unquota'd: {out}"
    );
    let (allocated, result) = fixture::parse_allocated_line(lines[1]).expect("phase 2 line");
    assert_at_quota("after heapcapd is back", allocated, &result, 64 * MIB, MIB);
    let log = d.log();
    assert!(log.contains("letting calls of 1 listener(s) through"), "holder did not say it fails open:\n{log}");
    assert!(log.contains("heapcapd is back"), "{log}");
    c.delete();
    // Nothing left to hold and no heapcapd: the holder goes away by itself.
    d.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.holder_pid().is_some() {
        assert!(Instant::now() < deadline, "the holder stayed with nothing to hold:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}
