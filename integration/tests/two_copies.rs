//! No kill of one heapcap process harms a workload: every listener lives in two processes.
//!
//! - heapcapd and its fd holder: a holder killed under running containers is replaced at once
//!   by heapcapd and handed every listener, so heapcapd killed next (1 s later, 100 ms later)
//!   loses nothing; random kills of either, one at a time, for 30 s, harm no container.
//! - `heapcap run` and its keeper: `heapcap run` killed mid-allocation leaves its command running
//!   under the keeper, with the same quota; a killed keeper is replaced; a keeper that has taken
//!   over keeps a keeper of its own, so killing it next (and the next) harms nothing either.
//!
//! Each workload must finish: its exit code, what it printed (an allocation storm with no failed
//! call, then an allocation loop stopped at its quota), and nothing left behind (no holder,
//! keeper or container process; heapcapd's fds and threads back to what they were).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use heapcap_integration::binaries::heapcap;
use heapcap_integration::bundle::Bundle;
use heapcap_integration::container::Container;
use heapcap_integration::daemon::{settled, wait_back_to, Daemon};
use heapcap_integration::fixture::{assert_at_quota, field, parse_allocated, ALLOC_STATIC, MIB};
use heapcap_integration::ids::unique_id;
use heapcap_integration::runtime::Runtime;

/// `kill -9 PID`.
fn kill9(pid: u32) {
    let status = Command::new("kill").args(["-9", &pid.to_string()]).status().expect("run kill");
    assert!(status.success(), "kill -9 {pid} failed");
}

fn alive(pid: u32) -> bool {
    // A zombie is gone for our purposes (its parent reaps it).
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

/// Wait up to `within` for `pid` to be gone.
fn wait_gone(pid: u32, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    while alive(pid) {
        assert!(Instant::now() < deadline, "{what} (pid {pid}) is still there after {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every holder serving `d`'s holder socket.
fn holders(d: &Daemon) -> Vec<u32> {
    let needle = d.holder.to_str().expect("utf-8 path").as_bytes().to_vec();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else { continue };
        let mut args = cmdline.split(|b| *b == 0);
        if args.next().is_some_and(|exe| exe.ends_with(b"heapcap-holder")) && args.any(|a| a == needle.as_slice()) {
            out.push(pid);
        }
    }
    out
}

/// Wait until `d` has a holder other than `old` again, and says so in its metrics.
fn wait_new_holder(d: &Daemon, old: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = holders(d);
        if let [pid] = now.as_slice() {
            if *pid != old && d.metric("heapcap_holder_connected") == Some(1.0) {
                return *pid;
            }
        }
        assert!(Instant::now() < deadline, "no new holder after {old} was killed (holders: {now:?}):\n{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A storm of `threads` threads for `seconds`, then an allocation loop to the quota, then the
/// shell's `exit=CODE`.
fn storm_bundle(d: &Daemon, limit: &str, threads: u32, seconds: u64) -> Bundle {
    let script = format!("/alloc storm {threads} 1048576 {seconds}; echo exit=$?");
    d.bundle(&[("heapcap.io/limit", limit)], &["/bin/sh", "-c", &script])
}

/// What a storm printed: no call failed, it made progress, it stopped at `limit`, it exited 0.
fn assert_storm_finished(what: &str, out: &str, limit: u64, context: &dyn Fn() -> String) {
    let line = out.lines().find(|l| l.starts_with("storm ")).unwrap_or_else(|| {
        panic!("{what}: no storm line (a call failed hard, or it never finished):\n{out}\n{}", context())
    });
    assert_eq!(field(line, "result"), "ok", "{what}: a call failed during the kills:\n{out}\n{}", context());
    let ops: u64 = field(line, "ops").parse().expect("ops");
    assert!(ops > 100, "{what}: the storm did not progress: {out}");
    let (allocated, result) = parse_allocated(out);
    assert_at_quota(what, allocated, &result, limit, MIB);
    assert!(out.contains("exit=0"), "{what}: the fixture did not exit 0:\n{out}\n{}", context());
}

/// Containers storming under `d` (limit in MiB each, runc and crun).
fn start_storms<'b>(bundles: &'b [(Runtime, Bundle)]) -> Vec<Container<'b>> {
    bundles
        .iter()
        .map(|(rt, b)| {
            let c = b.create(*rt, &unique_id("twocopies"));
            c.start();
            c
        })
        .collect()
}

/// Wait for each storm to finish and check what it printed; delete the containers, check
/// nothing is left: one holder (which leaves by itself once heapcapd stops), heapcapd back to
/// `baseline` fds and threads.
fn finish(d: &mut Daemon, running: Vec<Container<'_>>, limit: u64, baseline: (usize, usize)) {
    for c in &running {
        c.wait_stopped(Duration::from_secs(120));
        let context = || format!("{}\nheapcapd:\n{}", c.stderr(), d.log());
        assert_storm_finished(c.id(), &c.stdout(), limit, &context);
    }
    for c in running {
        c.delete();
    }
    d.wait_no_containers(Duration::from_secs(20));
    if let Err(now) = wait_back_to(d.pid(), baseline, Duration::from_secs(10)) {
        panic!("heapcapd holds {now:?} fds and threads, {baseline:?} before the containers:\n{}", d.log());
    }
    let left = holders(d);
    assert_eq!(left.len(), 1, "holders left: {left:?}:\n{}", d.log());
    d.stop();
    wait_gone(left[0], Duration::from_secs(10), "the holder, with nothing to hold and no heapcapd");
}

/// A runc and a crun container storm while the holder is killed, then heapcapd `gap` later;
/// heapcapd is started again (as systemd would) and every container finishes at its quota.
fn holder_then_heapcapd(gap: Duration) {
    let mut d = Daemon::start_with(&["--holder-grace", "60s"]);
    let baseline = settled(d.pid());
    let bundles: Vec<(Runtime, Bundle)> =
        Runtime::ALL.into_iter().map(|rt| (rt, storm_bundle(&d, "64Mi", 8, 6))).collect();
    let running = start_storms(&bundles);
    std::thread::sleep(Duration::from_millis(1000));

    let old = d.holder_pid().expect("a holder runs");
    kill9(old);
    std::thread::sleep(gap);
    d.kill9();
    std::thread::sleep(Duration::from_millis(300));
    d.restart(None);
    let new = holders(&d);
    assert!(new.len() == 1 && new[0] != old, "holders after the kills: {new:?} (killed {old}):\n{}", d.log());
    let log = d.log();
    assert!(log.contains("the fd holder is gone"), "{log}");
    assert!(log.contains("a new fd holder keeps every listener listeners=2 failed=0"), "{log}");
    finish(&mut d, running, 64 * MIB, baseline);
}

#[test]
fn the_holder_then_heapcapd_killed_1s_apart_harms_no_container() {
    holder_then_heapcapd(Duration::from_secs(1));
}

#[test]
fn the_holder_then_heapcapd_killed_100ms_apart_harms_no_container() {
    holder_then_heapcapd(Duration::from_millis(100));
}

/// xorshift64: the kills' order and spacing, from a seed printed for a rerun.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn random_kills_of_heapcapd_or_its_holder_one_at_a_time_for_30s_harm_no_container() {
    const KILLING: Duration = Duration::from_secs(30);
    let seed = std::env::var("HEAPCAP_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_nanos() as u64 | 1
    });
    eprintln!("random kills: HEAPCAP_TEST_SEED={seed}");
    let mut rng = Rng(seed);
    let mut d = Daemon::start_with(&["--holder-grace", "60s"]);
    let baseline = settled(d.pid());
    let bundles: Vec<(Runtime, Bundle)> =
        Runtime::ALL.into_iter().map(|rt| (rt, storm_bundle(&d, "64Mi", 4, KILLING.as_secs() + 6))).collect();
    let running = start_storms(&bundles);
    let ids: Vec<&str> = running.iter().map(|c| c.id()).collect();
    let started = Instant::now();
    let (mut holders_killed, mut daemons_killed) = (0, 0);
    while started.elapsed() < KILLING {
        std::thread::sleep(Duration::from_millis(100 + rng.below(1400)));
        if rng.below(2) == 0 {
            let old = d.holder_pid().expect("a holder runs");
            kill9(old);
            wait_new_holder(&d, old);
            holders_killed += 1;
        } else {
            d.kill9();
            std::thread::sleep(Duration::from_millis(rng.below(500)));
            d.restart(None);
            // Back when it lists every container again (taken back from the holder).
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let ps = d.ps();
                let listed = ps["containers"]
                    .as_array()
                    .map_or(0, |cs| cs.iter().filter(|c| c["id"].as_str().is_some_and(|id| ids.contains(&id))).count());
                if listed == ids.len() {
                    break;
                }
                assert!(Instant::now() < deadline, "heapcapd did not take every container back: {ps}\n{}", d.log());
                std::thread::sleep(Duration::from_millis(20));
            }
            daemons_killed += 1;
        }
    }
    eprintln!("random kills: {holders_killed} of the holder, {daemons_killed} of heapcapd");
    assert!(holders_killed + daemons_killed >= 10, "too few kills to mean anything (seed {seed})");
    finish(&mut d, running, 64 * MIB, baseline);
}

/// `heapcap run --limit 64Mi` over a storm; returns the child (its stdout and stderr piped).
fn run_storm(seconds: u64, report: bool) -> std::process::Child {
    let script = format!("{ALLOC_STATIC} storm 4 1048576 {seconds}; echo exit=$?");
    let mut cmd = heapcap();
    cmd.args(["run", "--limit", "64Mi", "--quiet"]);
    if report {
        cmd.arg("--report");
    }
    cmd.args(["--", "/bin/sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start heapcap run")
}

/// `heapcap run`'s keeper: its child running `heapcap keep`.
fn keeper_of(pid: u32) -> Option<u32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    children.split_whitespace().filter_map(|c| c.parse().ok()).find(|c: &u32| {
        std::fs::read(format!("/proc/{c}/cmdline")).is_ok_and(|cl| cl.split(|b| *b == 0).nth(1) == Some(b"keep"))
    })
}

fn wait_keeper(pid: u32, not: Option<u32>) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(k) = keeper_of(pid).filter(|k| Some(*k) != not) {
            return k;
        }
        assert!(Instant::now() < deadline, "heapcap run (pid {pid}) has no keeper");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Read a pipe to its end (every process holding it gone), within `within`.
fn read_to_end(pipe: impl Read + Send + 'static, within: Duration, what: &str) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut pipe = pipe;
        let mut s = String::new();
        let _ = pipe.read_to_string(&mut s);
        let _ = tx.send(s);
    });
    rx.recv_timeout(within).unwrap_or_else(|_| panic!("{what} still open after {within:?}: something hangs"))
}

/// `heapcap run` killed mid-storm: the command finishes under the keeper, at its quota.
fn killed_run(kill_keeper_first: bool) {
    let mut child = run_storm(4, true);
    let pid = child.id();
    let mut keeper = wait_keeper(pid, None);
    std::thread::sleep(Duration::from_millis(1000));
    if kill_keeper_first {
        kill9(keeper);
        keeper = wait_keeper(pid, Some(keeper));
        std::thread::sleep(Duration::from_millis(300));
    }
    kill9(pid);
    let status = child.wait().expect("reap heapcap run");
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9), "{status}");
    let stdout = read_to_end(child.stdout.take().expect("stdout"), Duration::from_secs(60), "the command's stdout");
    let stderr = read_to_end(child.stderr.take().expect("stderr"), Duration::from_secs(10), "the command's stderr");
    assert!(
        stderr.contains(&format!("its keeper (pid {keeper}) supervises the command's processes from now on")),
        "{stderr}"
    );
    if kill_keeper_first {
        assert!(stderr.contains("was killed: starting another"), "{stderr}");
    }
    assert_storm_finished("heapcap run's command", &stdout, 64 * MIB, &|| stderr.clone());
    // --report: printed by the keeper, once the tree is gone.
    assert!(stderr.contains("PEAK") && stderr.contains("storm"), "no report: {stderr}");
    wait_gone(keeper, Duration::from_secs(10), "the keeper, its command gone");
}

#[test]
fn heapcap_run_killed_mid_allocation_leaves_its_command_supervised_at_its_quota() {
    killed_run(false);
}

#[test]
fn a_killed_keeper_is_replaced_and_the_new_one_takes_over_when_heapcap_run_is_killed() {
    killed_run(true);
}

#[test]
fn the_keeper_that_took_over_keeps_a_keeper_too_so_killing_each_in_turn_harms_nothing() {
    let mut child = run_storm(5, true);
    let pid = child.id();
    let first = wait_keeper(pid, None);
    std::thread::sleep(Duration::from_millis(1000));
    kill9(pid);
    let status = child.wait().expect("reap heapcap run");
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9), "{status}");
    // Each supervisor in turn (heapcap run, then each keeper once it has taken over) has a keeper.
    let second = wait_keeper(first, None);
    std::thread::sleep(Duration::from_millis(300));
    kill9(first);
    let third = wait_keeper(second, None);
    std::thread::sleep(Duration::from_millis(300));
    kill9(second);
    let fourth = wait_keeper(third, None);
    let stdout = read_to_end(child.stdout.take().expect("stdout"), Duration::from_secs(60), "the command's stdout");
    let stderr = read_to_end(child.stderr.take().expect("stderr"), Duration::from_secs(10), "the command's stderr");
    for said in [
        format!("heapcap run (pid {pid}) is gone: its keeper (pid {first}) supervises the command's processes"),
        format!(
            "the keeper (pid {first}) that took over from heapcap run is gone: its keeper (pid {second}) supervises"
        ),
        format!(
            "the keeper (pid {second}) that took over from heapcap run is gone: its keeper (pid {third}) supervises"
        ),
    ] {
        assert!(stderr.contains(&said), "not said: {said}\n{stderr}");
    }
    assert_storm_finished("heapcap run's command, three supervisors killed", &stdout, 64 * MIB, &|| stderr.clone());
    assert!(stderr.contains("PEAK") && stderr.contains("storm"), "no report from the last keeper: {stderr}");
    // The last keeper, and the keeper it kept, leave with the command.
    wait_gone(third, Duration::from_secs(10), "the last keeper, its command gone");
    wait_gone(fourth, Duration::from_secs(10), "the last keeper's keeper, its command gone");
}

#[test]
fn with_its_keeper_killed_heapcap_run_still_passes_the_exit_status_through() {
    let mut child = heapcap()
        .args(["run", "--limit", "64Mi", "--", "/bin/sh", "-c", "sleep 1; exit 7"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start heapcap run");
    let keeper = wait_keeper(child.id(), None);
    kill9(keeper);
    let again = wait_keeper(child.id(), Some(keeper));
    let status = child.wait().expect("heapcap run");
    assert_eq!(status.code(), Some(7), "{status}");
    let stderr = read_to_end(child.stderr.take().expect("stderr"), Duration::from_secs(10), "stderr");
    assert!(stderr.contains(&format!("the keeper (pid {keeper}) was killed: starting another")), "{stderr}");
    // heapcap run reaps its keeper before it returns.
    assert!(!alive(again), "the keeper {again} outlived heapcap run");
    assert!(!alive(keeper), "the killed keeper {keeper} is still there");
}
