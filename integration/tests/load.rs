//! heapcapd under load, and what it keeps: 100 short runc/crun containers started and stopped,
//! several at a time, while long-running containers allocate and free flat out. Every decision
//! is right (each short container is stopped at its own quota, exec'd processes too, and the
//! storms never see a failed call), nothing deadlocks (`heapcap ps` and `/metrics` keep
//! answering), and when the containers are gone heapcapd's and the holder's fds and threads are
//! back to where they were, and heapcapd's memory has not grown with the containers it served.
//!
//! Figures from this project's 2-core VM (debug build, as the tests run it), and the bounds
//! asserted on them ("anonymous": heap, stacks and written data, from `/proc/PID/smaps_rollup`):
//!
//! - heapcapd at rest: about 9–10 MiB RSS, most of it the debug binary; its heap and stacks are
//!   about 1 MiB.
//! - Per live container: 50 idle containers cost heapcapd 85–91 KiB each (RSS and anonymous
//!   alike; 100 cost 77 KiB each, heapcapd then at 16.6 MiB RSS): 20–24 KiB is the touched part
//!   of the container's serving thread's stack (in smaps), the rest is malloc heap. The bound
//!   asserted is [`PER_CONTAINER_BOUND`] (128 KiB): heapcapd stays under 10 + 12.5 = 22.5 MiB at
//!   100 containers, inside the 32 MiB target.
//! - Leaks: the load rounds run heapcapd with one malloc arena and no cache of exited threads'
//!   stacks ([`LEAK_TUNABLES`], glibc tunables). With glibc's defaults (8 arenas per CPU, up to
//!   40 MiB of cached stacks, each keeping the pages its last thread touched) its memory moves
//!   by 0–270 KiB from one round of 100 containers to the next with no leak behind it, which
//!   would hide a leak of 2 KiB per container. With these settings it grows in the first round
//!   (by 140–730 KiB: arena space that later rounds reuse) and then hardly at all (0–76 KiB a
//!   round in rounds 2–5, mostly 0; 0–76 KiB over rounds 4 and 5 together, in 8 runs; 16
//!   rounds on 2026-12-01: 196, 104, then 0 in each of the 14 after). Once in a CI run it grew
//!   late (1948, 2048, 2136 KiB after rounds 3–5), a settling that stops, as 16-round runs show.
//!   heapcapd's ring of the last 1000 denials (for `heapcap events`) grows by about 300 bytes a
//!   denial, in jumps as its buffer doubles, until it is full: it is filled before the baseline.
//!   Asserted: the [`SETTLING_ROUNDS`] first rounds grow it by at most [`SETTLING_GROWTH`] (2
//!   MiB), and then [`STEADY_ROUNDS`] rounds in a row (300 containers) by at most
//!   [`STEADY_GROWTH`] (160 KiB), with up to [`MAX_ROUNDS`] rounds to show it: a late settling
//!   stops, a leak does not. A leak of 1 KiB per container (a ledger, a buffer, a thread's
//!   stack) fails it: heapcapd changed to leak 1 KiB per listener grew by 64–244 KiB a round,
//!   232–468 KiB over any three rounds after the settling ones (2 runs). So does a leaked fd or
//!   thread (heapcapd changed to leak one fd per agent connection held 150 fds instead of 28 at
//!   the end).
//! - Time: a round of 100 short containers, 6 at a time beside two storms, takes 8–13 s; the
//!   whole file about 100 s (more when heapcapd settles late).
//!
//! The two tests share the machine's 2 CPUs with nothing else of theirs: they take a lock so a
//! parallel test runner runs them one after the other.

use std::collections::BTreeSet;
use std::fs;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use heapcap_integration::bundle::Bundle;
use heapcap_integration::container::Container;
use heapcap_integration::daemon::{self, settled, Daemon};
use heapcap_integration::fixture::{assert_at_quota, parse_allocated, parse_allocated_line, MIB};
use heapcap_integration::ids::unique_id;
use heapcap_integration::process::{show, stdout};
use heapcap_integration::runtime::Runtime;

/// The most heapcapd may grow (anonymous memory) per live container.
const PER_CONTAINER_BOUND: u64 = 128 * 1024;
/// glibc's settings for the daemon of the load rounds: one malloc arena, and exited threads'
/// stacks unmapped rather than cached.
const LEAK_TUNABLES: &str = "glibc.malloc.arena_max=1:glibc.pthread.stack_cache_size=0";
/// Load rounds: the first [`SETTLING_ROUNDS`] bring heapcapd's allocator to what it keeps for
/// this load; then [`STEADY_ROUNDS`] in a row must not grow it, within [`MAX_ROUNDS`] in all.
const SETTLING_ROUNDS: usize = 3;
const STEADY_ROUNDS: usize = 3;
const MAX_ROUNDS: usize = 9;
/// The most heapcapd's anonymous memory may grow over the settling rounds.
const SETTLING_GROWTH: u64 = 2 * MIB;
/// The most it may grow over [`STEADY_ROUNDS`] rounds in a row once settled (300 containers).
const STEADY_GROWTH: u64 = 160 * 1024;
/// Short containers per round.
const SHORT_CONTAINERS: usize = 100;
/// How many short containers run at once.
const WORKERS: usize = 6;
/// Idle containers held at once to measure what a live container costs heapcapd.
const IDLE_CONTAINERS: usize = 50;
/// A container that takes longer than this to run is treated as hung (a deadlock in heapcapd
/// leaves its allocation waiting forever).
const HANG: Duration = Duration::from_secs(90);

/// One test at a time: each wants the CPUs for its own heapcapd.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ------------------------------------------------------------------ measuring a process

/// Wait until `pid`'s fds and threads are back to `baseline` (containers are dropped when
/// their listener fds hang up, which takes a moment after they stop).
fn wait_back_to(what: &str, pid: u32, baseline: (usize, usize), d: &Daemon) {
    if let Err(now) = daemon::wait_back_to(pid, baseline, Duration::from_secs(30)) {
        panic!(
            "{what} holds (fds, threads) = {now:?} with every container gone, {baseline:?} before: \
             something is left behind\nfds: {:?}\nheapcapd log (tail):\n{}",
            fs::read_dir(format!("/proc/{pid}/fd"))
                .map(|d| d.flatten().filter_map(|e| fs::read_link(e.path()).ok()).collect::<Vec<_>>())
                .unwrap_or_default(),
            tail(&d.log(), 40)
        );
    }
}

/// heapcapd's memory, from `/proc/<pid>/smaps_rollup` (bytes).
#[derive(Debug, Clone, Copy)]
struct Memory {
    rss: u64,
    pss: u64,
    /// Anonymous memory: heap, thread stacks, written data. What a leak grows. (Not
    /// `Private_Dirty`, which also counts the binary's pages while they are dirty in the page
    /// cache, as they are for a while after a build: they turn clean when written back.)
    anonymous: u64,
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RSS {} KiB, PSS {} KiB, anonymous {} KiB", self.rss / 1024, self.pss / 1024, self.anonymous / 1024)
    }
}

fn memory(pid: u32) -> Memory {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/smaps_rollup: {e}"));
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/smaps_rollup:\n{text}"))
            * 1024
    };
    Memory { rss: field("Rss"), pss: field("Pss"), anonymous: field("Anonymous") }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ------------------------------------------------------------------ heapcap ps

fn listed(d: &Daemon) -> BTreeSet<String> {
    d.ps()["containers"]
        .as_array()
        .expect("ps --json has a containers array")
        .iter()
        .map(|c| c["id"].as_str().expect("a container id").to_string())
        .collect()
}

/// Wait until `heapcap ps` lists exactly `ids`.
fn wait_listed(d: &Daemon, ids: &BTreeSet<String>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = listed(d);
        if &now == ids {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "heapcap ps lists {now:?}, expected only {ids:?}\nheapcapd log (tail):\n{}",
            tail(&d.log(), 40)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ------------------------------------------------------------------ the short containers

/// What the `i`th short container of a round does.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// `RUNTIME run` of `/alloc MODE CHUNK 0`: stopped at `limit` with ENOMEM.
    Run { mode: &'static str, chunk: u64 },
    /// `heapcap.io/total-limit` below the per-process one: stopped at the total.
    Total,
    /// A `sleep` container; `RUNTIME exec /alloc mmap` in it is stopped at the quota.
    Exec,
    /// An allocation storm killed with SIGKILL while it runs.
    Killed,
}

fn kind(i: usize) -> Kind {
    match i % 10 {
        0 | 2 | 4 => Kind::Run { mode: "mmap", chunk: MIB },
        1 | 5 => Kind::Run { mode: "mmap", chunk: 4 * MIB },
        3 => Kind::Run { mode: "malloc", chunk: MIB },
        6 => Kind::Total,
        7 | 9 => Kind::Exec,
        _ => Kind::Killed,
    }
}

/// Run the `i`th short container of a round with `bundle` (the worker's own); panics unless it
/// did what it should.
fn short_container(d: &Daemon, bundle: &mut Bundle, i: usize) {
    let rt = Runtime::ALL[(i / 2 + i) % 2];
    let limit = (16 + 8 * (i as u64 % 4)) * MIB;
    let limit_text = format!("{}Mi", limit / MIB);
    let id = unique_id(&format!("load-{i}"));
    let what = format!("short container {i} ({rt:?}, {:?}, quota {limit_text})", kind(i));
    bundle.seccomp(d.profile());
    bundle.config_mut()["annotations"] = serde_json::json!({ "heapcap.io/limit": limit_text });
    match kind(i) {
        Kind::Run { mode, chunk } => {
            bundle.args(&["/alloc", mode, &chunk.to_string(), "0"]);
            let out = bundle.run_with_timeout(rt, &id, HANG);
            assert!(out.status.success(), "{what}: {}", show(&out));
            let (allocated, result) = parse_allocated(&stdout(&out));
            assert_at_quota(&what, allocated, &result, limit, chunk);
        }
        Kind::Total => {
            let total = limit / 2;
            bundle.annotation("heapcap.io/total-limit", &format!("{}Mi", total / MIB));
            bundle.args(&["/alloc", "mmap", "1048576", "0"]);
            let out = bundle.run_with_timeout(rt, &id, HANG);
            assert!(out.status.success(), "{what}: {}", show(&out));
            let (allocated, result) = parse_allocated(&stdout(&out));
            assert_at_quota(&format!("{what}, total {}", total / MIB), allocated, &result, total, MIB);
        }
        Kind::Exec => {
            bundle.args(&["/bin/sleep", "60"]);
            let c = bundle.create(rt, &id);
            c.start();
            let out = c.exec_with(&[], &["/alloc", "mmap", "2097152", "0"], HANG);
            assert!(out.status.success(), "{what}: exec: {}", show(&out));
            let (allocated, result) = parse_allocated(&stdout(&out));
            assert_at_quota(&format!("{what}, exec'd"), allocated, &result, limit, 2 * MIB);
            c.delete();
        }
        Kind::Killed => {
            bundle.args(&["/alloc", "storm", "2", "1048576", "60"]);
            let c = bundle.create(rt, &id);
            c.start();
            // Killed only once heapcapd accounts for it: mid-allocation, not before it began.
            let deadline = Instant::now() + Duration::from_secs(30);
            while !d.ps()["containers"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|x| x["id"] == id.as_str() && x["heap"].as_u64() > Some(0)))
            {
                assert!(Instant::now() < deadline, "{what}: heapcap ps never showed it allocating");
                std::thread::sleep(Duration::from_millis(50));
            }
            c.kill("KILL");
            c.wait_stopped(HANG);
            assert!(!c.stdout().contains("storm "), "{what}: the storm finished before SIGKILL: {}", c.stdout());
            c.delete();
        }
    }
}

/// `n` short containers, [`WORKERS`] at a time; returns when all are done and checked.
fn short_round(d: &Daemon, n: usize) {
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for w in 0..WORKERS.min(n) {
            let next = &next;
            std::thread::Builder::new()
                .name(format!("worker-{w}"))
                .spawn_scoped(s, move || {
                    let mut bundle = Bundle::new("load");
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= n {
                            break;
                        }
                        short_container(d, &mut bundle, i);
                    }
                })
                .expect("start a worker thread");
        }
    });
}

// ------------------------------------------------------------------ the storm containers

/// A long-running container: `/alloc storm` (2 threads allocating and freeing 1 MiB, then a
/// run to the quota) again and again until the test creates `/stop` in its root filesystem.
struct Storm {
    bundle: Bundle,
    runtime: Runtime,
    id: String,
    limit: u64,
}

impl Storm {
    fn new(d: &Daemon, runtime: Runtime, limit: u64) -> Storm {
        let mut bundle = Bundle::new("storm");
        let script = "while [ ! -e /stop ]; do /alloc storm 2 1048576 2 || exit 1; done; echo stopped";
        bundle
            .args(&["/bin/sh", "-c", script])
            .seccomp(d.profile())
            .annotations(&[("heapcap.io/limit", &format!("{}Mi", limit / MIB))]);
        Storm { bundle, runtime, id: unique_id("storm"), limit }
    }

    /// Ask it to stop after its current storm, wait, and check every storm it ran.
    fn finish(&self, c: Container<'_>, d: &Daemon) -> usize {
        fs::write(self.bundle.rootfs().join("stop"), "").expect("create the stop file");
        c.wait_stopped(HANG);
        let out = c.stdout();
        let what = format!("storm container {} ({:?})", self.id, self.runtime);
        assert!(out.ends_with("stopped\n"), "{what} did not finish normally:\n{out}\n{}", c.stderr());
        let mut storms = 0;
        for line in out.lines() {
            if let Some(storm) = line.strip_prefix("storm ") {
                assert!(
                    storm.ends_with(" result=ok"),
                    "{what}: a call failed in a storm: {line}\nheapcapd:\n{}",
                    tail(&d.log(), 40)
                );
                storms += 1;
            } else if let Some((allocated, result)) = parse_allocated_line(line) {
                assert_at_quota(&format!("{what}, storm {storms}"), allocated, &result, self.limit, MIB);
            }
        }
        let quota_runs = out.lines().filter(|l| l.starts_with("allocated=")).count();
        assert!(storms >= 1 && quota_runs == storms, "{what}: {storms} storms, {quota_runs} quota runs:\n{out}");
        c.delete();
        storms
    }
}

/// One load round: two storm containers (runc, crun) for its whole length, `n` short ones,
/// `heapcap ps` and `/metrics` asked throughout. Returns the number of storms run.
fn load_round(d: &Daemon, n: usize) -> usize {
    let storms = [Storm::new(d, Runtime::Runc, 64 * MIB), Storm::new(d, Runtime::Crun, 48 * MIB)];
    let running: Vec<Container<'_>> = storms
        .iter()
        .map(|s| {
            let c = s.bundle.create(s.runtime, &s.id);
            c.start();
            c
        })
        .collect();
    let storm_ids: BTreeSet<String> = storms.iter().map(|s| s.id.clone()).collect();

    // Control requests during the load: each takes the registry's lock and every container's.
    let done = AtomicBool::new(false);
    let asked = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let mut asked = 0;
            while !done.load(Ordering::SeqCst) {
                d.ps();
                let metrics = d.metrics();
                assert!(metrics.contains("heapcap_containers "), "no container gauge in /metrics:\n{metrics}");
                asked += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            asked
        });
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| short_round(d, n)));
        done.store(true, Ordering::SeqCst);
        let asked = watcher.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
        asked
    });
    assert!(asked > 0, "heapcap ps and /metrics were never asked during the load");

    // The short containers are gone (dropped when their fds hang up); the storms are listed.
    wait_listed(d, &storm_ids);
    let mut total = 0;
    for (s, c) in storms.iter().zip(running) {
        total += s.finish(c, d);
    }
    wait_listed(d, &BTreeSet::new());
    total
}

/// How many denials heapcapd keeps for `heapcap events` (its ring of recent ones).
const DENIAL_RING: usize = 1000;

/// One container whose process is denied [`DENIAL_RING`] times (each `/alloc` asks for more
/// than its quota at once), so heapcapd's ring of recent denials is full.
fn fill_denial_ring(d: &Daemon) {
    let mut b = Bundle::new("ring");
    let script = format!("i=0; while [ $i -lt {DENIAL_RING} ]; do /alloc mmap 4194304 0 || exit 1; i=$((i+1)); done");
    b.args(&["/bin/sh", "-c", &script]).seccomp(d.profile()).annotations(&[("heapcap.io/limit", "2Mi")]);
    let out = b.run_with_timeout(Runtime::Runc, &unique_id("ring"), HANG);
    assert!(out.status.success(), "filling the denial ring: {}", show(&out));
    let denied = stdout(&out).lines().filter(|l| *l == "allocated=0 result=ENOMEM").count();
    assert_eq!(denied, DENIAL_RING, "each 4 MiB mmap under a 2 MiB quota must be denied: {}", show(&out));
}

// ------------------------------------------------------------------ the tests

#[test]
fn a_hundred_containers_under_load_are_each_held_at_quota_and_leave_nothing_behind() {
    let _serial = serial();
    // One malloc arena and no cache of exited threads' stacks for heapcapd (and its holder), so
    // that what glibc keeps for reuse does not hide a leak (see the figures above). Set only
    // while heapcapd starts; the other test, which measures heapcapd as it runs in production,
    // waits for the lock.
    std::env::set_var("GLIBC_TUNABLES", LEAK_TUNABLES);
    let d = Daemon::start();
    std::env::remove_var("GLIBC_TUNABLES");
    let holder = d.holder_pid().unwrap_or_else(|| panic!("heapcapd started no holder:\n{}", d.log()));
    // Warm up: threads, fds and allocator caches that live as long as heapcapd, and the ring of
    // recent denials filled, so that its growth (bounded, by design) is not taken for a leak.
    fill_denial_ring(&d);
    short_round(&d, 2 * WORKERS);
    wait_listed(&d, &BTreeSet::new());
    let (base_d, base_h) = (settled(d.pid()), settled(holder));
    let base_mem = memory(d.pid());
    eprintln!("baseline: heapcapd (fds, threads) {base_d:?}, {base_mem}; holder (fds, threads) {base_h:?}");

    let mut after = Vec::new();
    let growth = |from: &Memory, to: &Memory| to.anonymous.saturating_sub(from.anonymous);
    // The growth over the last STEADY_ROUNDS rounds, once there are that many after settling.
    let steady = |after: &[Memory]| {
        (after.len() >= SETTLING_ROUNDS + STEADY_ROUNDS)
            .then(|| growth(&after[after.len() - 1 - STEADY_ROUNDS], &after[after.len() - 1]))
    };
    for round in 1..=MAX_ROUNDS {
        let started = Instant::now();
        let storms = load_round(&d, SHORT_CONTAINERS);
        wait_back_to("heapcapd", d.pid(), base_d, &d);
        wait_back_to("heapcap-holder", holder, base_h, &d);
        let mem = memory(d.pid());
        eprintln!(
            "round {round}: {SHORT_CONTAINERS} short containers and {storms} storms in {:.1} s; heapcapd {mem}",
            started.elapsed().as_secs_f64()
        );
        after.push(mem);
        if steady(&after).is_some_and(|g| g <= STEADY_GROWTH) {
            break;
        }
    }
    let per_round: Vec<u64> = std::iter::once(&base_mem)
        .chain(&after)
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| growth(w[0], w[1]) / 1024)
        .collect();
    eprintln!("anonymous growth per round: {per_round:?} KiB");
    let rounds = after.iter().map(Memory::to_string).collect::<Vec<_>>().join("\n  ");
    let settling = growth(&base_mem, &after[SETTLING_ROUNDS - 1]);
    assert!(
        settling <= SETTLING_GROWTH,
        "heapcapd grew by {} KiB over the first {SETTLING_ROUNDS} rounds of {SHORT_CONTAINERS} containers \
         (bound {} KiB); before: {base_mem}; after each round:\n  {rounds}",
        settling / 1024,
        SETTLING_GROWTH / 1024
    );
    let steady = steady(&after).expect("rounds run past the settling ones");
    let steady_containers = (SHORT_CONTAINERS * STEADY_ROUNDS) as u64;
    assert!(
        steady <= STEADY_GROWTH,
        "heapcapd never stopped growing: by {} KiB over the last {steady_containers} containers of \
         {MAX_ROUNDS} rounds, once its allocator had settled (bound {} KiB), a leak of about {} bytes per \
         container; before: {base_mem}; after each round:\n  {rounds}",
        steady / 1024,
        STEADY_GROWTH / 1024,
        steady / steady_containers
    );
}

#[test]
fn a_live_container_costs_heapcapd_little_memory() {
    let _serial = serial();
    let d = Daemon::start();
    // The baseline is heapcapd after two containers (what lives as long as heapcapd is made),
    // so what is measured includes the allocator's arenas and thread stacks the 50 bring.
    let bundles: Vec<Bundle> = (0..IDLE_CONTAINERS)
        .map(|_| {
            let mut b = Bundle::new("idle");
            b.args(&["/bin/sleep", "120"]).seccomp(d.profile()).annotations(&[("heapcap.io/limit", "32Mi")]);
            b
        })
        .collect();
    let start = |n: usize| -> Vec<Container<'_>> {
        let cs: Vec<Container<'_>> = bundles
            .iter()
            .take(n)
            .enumerate()
            .map(|(i, b)| b.create(Runtime::ALL[i % 2], &unique_id("idle")))
            .collect();
        for c in &cs {
            c.start();
        }
        let ids: BTreeSet<String> = cs.iter().map(|c| c.id().to_string()).collect();
        wait_listed(&d, &ids);
        cs
    };
    drop(start(2));
    wait_listed(&d, &BTreeSet::new());
    let base_fds = settled(d.pid());
    let baseline = memory(d.pid());

    let live = start(IDLE_CONTAINERS);
    let with = memory(d.pid());
    let per = with.anonymous.saturating_sub(baseline.anonymous) / IDLE_CONTAINERS as u64;
    let per_rss = with.rss.saturating_sub(baseline.rss) / IDLE_CONTAINERS as u64;
    eprintln!(
        "{IDLE_CONTAINERS} idle containers: heapcapd {with}; before {baseline}; per container {} KiB \
         anonymous, {} KiB RSS",
        per / 1024,
        per_rss / 1024
    );
    assert!(
        per <= PER_CONTAINER_BOUND,
        "a live container costs heapcapd {} KiB (bound {} KiB): {baseline} without containers, {with} with \
         {IDLE_CONTAINERS}",
        per / 1024,
        PER_CONTAINER_BOUND / 1024
    );
    drop(live);
    wait_listed(&d, &BTreeSet::new());
    wait_back_to("heapcapd", d.pid(), base_fds, &d);
}
