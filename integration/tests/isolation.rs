//! Containers cannot escape or interfere: no process under heapcap's filter holds a seccomp
//! listener (under heapcapd with runc and crun, under the prestart hook, under `heapcap run`),
//! heapcapd's sockets do not exist inside a container so `heapcap set-limit` cannot be issued from
//! there, exec'd processes and their children are charged to their own container, and a recycled
//! pid is never misread: a process that takes the pid of one killed at its quota, while that one's
//! growth calls were in flight, is neither refused nor charged the dead one's heap.
//!
//! The probes are `fixtures/isolation.c` (static: `connect`, `hold`, `recycle`).

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use heapcap_integration::binaries::{self, prestart_hook};
use heapcap_integration::bundle::Bundle;
use heapcap_integration::daemon::Daemon;
use heapcap_integration::fixture::{assert_at_quota, field, fixture_result, quota_slack, MIB};
use heapcap_integration::ids::unique_id;
use heapcap_integration::process::{self, show, stdout};
use heapcap_integration::runtime::Runtime;
use serde_json::json;

/// The probe (static build: it runs on the host and in busybox containers).
const ISOLATION: &str = env!("HEAPCAP_ISOLATION_STATIC");

/// What `readlink /proc/PID/fd/N` gives for a seccomp listener fd.
const LISTENER_LINK: &str = "anon_inode:seccomp notify";

// ------------------------------------------------------------------ /proc

/// `pid` and every process below it, from `/proc/PID/task/*/children`.
fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let tasks = fs::read_dir(format!("/proc/{}/task", all[i])).map(|d| d.flatten().collect()).unwrap_or(vec![]);
        for task in tasks {
            let children = fs::read_to_string(task.path().join("children")).unwrap_or_default();
            all.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
        }
        i += 1;
    }
    all
}

/// The fds of `pid` that are seccomp listeners.
fn listener_fds(pid: u32) -> Vec<PathBuf> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<PathBuf>>())
        .unwrap_or_else(|e| panic!("cannot list the fds of process {pid}: {e}"))
        .into_iter()
        .filter(|fd: &PathBuf| fs::read_link(fd).is_ok_and(|l| l == Path::new(LISTENER_LINK)))
        .collect()
}

/// `Seccomp:` of `/proc/PID/status` (2: a filter is installed).
fn seccomp_mode(pid: u32) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("Seccomp:")).unwrap_or("gone").trim().to_string()
}

fn command(pid: u32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " ").trim().to_string())
        .unwrap_or_default()
}

/// Every process of the tree under `root` is filtered and none holds a listener; there are at
/// least `at_least` of them (so the walk saw the children, not just `root`).
fn assert_no_listener_in_tree(what: &str, root: u32, at_least: usize) {
    let procs = tree(root);
    let shown: Vec<String> = procs.iter().map(|p| format!("{p} {}", command(*p))).collect();
    assert!(procs.len() >= at_least, "{what}: expected {at_least}+ processes under {root}, found {shown:?}");
    for pid in &procs {
        assert_eq!(seccomp_mode(*pid), "2", "{what}: process {pid} ({}) is not under the filter", command(*pid));
        let held = listener_fds(*pid);
        assert!(held.is_empty(), "{what}: process {pid} ({}) holds a seccomp listener: {held:?}", command(*pid));
    }
}

/// The positive control: the supervisor side holds listeners, so the check above can see one.
fn assert_holds_listener(what: &str, pid: u32) {
    assert!(!listener_fds(pid).is_empty(), "{what} (pid {pid}) holds no `{LISTENER_LINK}` fd: the probe is blind");
}

// ------------------------------------------------------------------ set-ups

/// A heapcapd (listenerPath) container with the probe at `/isolation`.
fn bundle(daemon: &Daemon, limit: &str, args: &[&str]) -> Bundle {
    let mut b = Bundle::new("isolation");
    b.args(args)
        .seccomp(daemon.profile())
        .annotation("heapcap.io/limit", limit)
        .copy_into_rootfs(ISOLATION, "/isolation");
    b
}

/// A shell that starts two sleeping children, says `ready` and waits.
const FAMILY: &[&str] = &["/bin/sh", "-c", "sleep 60 & sleep 60 & echo ready; wait"];

// ------------------------------------------------------------------ (a) no listener inside

#[test]
fn no_process_under_heapcapd_holds_a_listener() {
    let d = Daemon::start();
    for rt in Runtime::ALL {
        let b = bundle(&d, "64Mi", FAMILY);
        let c = b.create(rt, &unique_id("nolistener"));
        c.start();
        c.wait_for_stdout("ready", Duration::from_secs(30));
        assert_no_listener_in_tree(&format!("{rt:?} under heapcapd"), c.pid(), 3);
        // An exec'd process, and what it can see of the container's first process.
        let out = c.exec(&["/bin/ls", "-l", "/proc/self/fd/", "/proc/1/fd/"]);
        assert!(out.status.success() && stdout(&out).contains("/proc/1/fd/:"), "{rt:?}: {}", show(&out));
        assert!(!stdout(&out).contains("seccomp"), "{rt:?}: an exec'd process holds a listener: {}", show(&out));
        assert_holds_listener("heapcapd", d.pid());
        if let Some(holder) = d.holder_pid() {
            assert_holds_listener("heapcap-holder", holder);
        }
    }
}

#[test]
fn no_process_under_the_prestart_hook_holds_a_listener() {
    let d = Daemon::start();
    for rt in Runtime::ALL {
        let mut b = Bundle::new("isolation-hook");
        b.args(FAMILY).annotation("heapcap.io/limit", "64Mi").hook("prestart", prestart_hook(&d.agent, &[]));
        let c = b.create(rt, &unique_id("nolistener-hook"));
        c.start();
        c.wait_for_stdout("ready", Duration::from_secs(30));
        assert_no_listener_in_tree(&format!("{rt:?} under the prestart hook"), c.pid(), 3);
        assert_holds_listener("heapcapd", d.pid());
    }
}

#[test]
fn no_process_under_heapcap_run_holds_a_listener() {
    let mut child = binaries::heapcap()
        .args(["run", "--limit", "64Mi", "--"])
        .args(FAMILY)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start heapcap run");
    let heapcap = child.id();
    let kill = || {
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{heapcap}")]).status();
    };
    let mut line = String::new();
    let read = BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line);
    if read.is_err() || line.trim() != "ready" {
        kill();
        panic!("heapcap run of the shell did not print `ready`: {read:?} {line:?}");
    }
    let procs = tree(heapcap);
    let check = std::panic::catch_unwind(|| {
        assert_holds_listener("heapcap run", heapcap);
        // heapcap's keeper (`heapcap keep`, its child) is the listener's second copy: the
        // supervisor's side, unfiltered, like heapcap itself.
        let is_keeper = |p: &u32| {
            fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| c.split(|b| *b == 0).nth(1) == Some(b"keep"))
        };
        let keepers: Vec<u32> = procs.iter().copied().filter(is_keeper).collect();
        assert_eq!(keepers.len(), 1, "one keeper under heapcap run: {procs:?}");
        // It is handed its copy over a socket as the command's first call is served: soon.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while listener_fds(keepers[0]).is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_holds_listener("heapcap run's keeper", keepers[0]);
        // Everything else below heapcap is the command's: filtered, holding no listener.
        let below: Vec<u32> = procs.iter().copied().filter(|p| *p != heapcap && !keepers.contains(p)).collect();
        assert!(below.len() >= 3, "expected the shell and two sleeps under heapcap: {procs:?}");
        for pid in below {
            assert_no_listener_in_tree("heapcap run", pid, 1);
        }
    });
    kill();
    let _ = child.wait();
    if let Err(panic) = check {
        std::panic::resume_unwind(panic);
    }
}

// ------------------------------------------------------------------ (b) no way to heapcapd

#[test]
fn a_container_cannot_reach_heapcapd_or_change_its_quota() {
    let d = Daemon::start();
    let heapcap = binaries::bin_dir().join("heapcap");
    let sockets = [&d.agent, &d.control, &d.holder];
    let defaults = ["/run/heapcap/control.sock", "/run/heapcap/heapcapd.sock", "/run/heapcap/holder.sock"];
    for rt in Runtime::ALL {
        let mut b = bundle(&d, "32Mi", &["/bin/sleep", "60"]);
        b.with_host_system().bind_ro(&heapcap, "/heapcap");
        let c = b.create(rt, &unique_id("noreach"));
        c.start();
        for path in sockets.iter().map(|p| p.to_str().expect("utf-8 path")).chain(defaults) {
            let out = c.exec(&["/isolation", "connect", path]);
            assert_eq!(
                stdout(&out).trim(),
                format!("connect {path}: ENOENT"),
                "{rt:?}: heapcapd's socket must not exist in the container: {}",
                show(&out)
            );
        }
        let dir = d.dir.to_str().expect("utf-8 path");
        let out = c.exec(&["/bin/sh", "-c", &format!("test -e {dir} && echo visible || echo absent")]);
        assert_eq!(stdout(&out).trim(), "absent", "{rt:?}: {}", show(&out));

        let control = format!("HEAPCAP_CONTROL_SOCKET={}", d.control.display());
        for env in [control.as_str(), "HEAPCAP_CONTROL_SOCKET=/run/heapcap/control.sock"] {
            let out = c.exec_with(&["--env", env], &["/heapcap", "set-limit", c.id(), "1Gi"], process::TIMEOUT);
            assert!(
                !out.status.success(),
                "{rt:?}: set-limit from inside the container ({env}) worked: {}",
                show(&out)
            );
        }
        let ps = d.ps();
        let entry = ps["containers"].as_array().and_then(|cs| cs.iter().find(|x| x["id"] == c.id()));
        let limit = entry.map(|e| e["limit"].clone());
        assert_eq!(limit, Some(json!(32 * MIB)), "{rt:?}: the quota changed: {ps}");
        let (allocated, result) = fixture_result(&c.exec(&["/alloc", "mmap", "1048576", "0"]));
        assert_at_quota(&format!("{rt:?} after set-limit from inside"), allocated, &result, 32 * MIB, MIB);
    }
}

// ------------------------------------------------------------------ (c) charged to its own container

/// `(pid, heap)` of the processes of container `id` in `heapcap ps` whose command starts with `prefix`.
fn ps_processes(d: &Daemon, id: &str, prefix: &str) -> Vec<(u64, u64)> {
    let ps = d.ps();
    let Some(container) = ps["containers"].as_array().and_then(|cs| cs.iter().find(|x| x["id"] == id)) else {
        return vec![];
    };
    container["processes"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter(|p| p["command"].as_str().is_some_and(|c| c.starts_with(prefix)))
                .map(|p| (p["pid"].as_u64().unwrap_or(0), p["heap"].as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn exec_and_its_children_are_charged_to_their_own_container() {
    let d = Daemon::start();
    for rt in Runtime::ALL {
        let mut mine = bundle(&d, "64Mi", &["/bin/sleep", "60"]);
        mine.readonly_root(false);
        let other = bundle(&d, "64Mi", &["/bin/sleep", "60"]);
        let a = mine.create(rt, &unique_id("own"));
        a.start();
        let b = other.create(rt, &unique_id("other"));
        b.start();
        // The exec'd shell starts two children that hold 20 MiB each, and leaves them running.
        let script = "/isolation hold 20971520 60 >/tmp/h1 2>&1 & /isolation hold 20971520 60 >/tmp/h2 2>&1 & \
                      until grep -q holding /tmp/h1 && grep -q holding /tmp/h2; do sleep 0.1; done";
        let out = a.exec(&["/bin/sh", "-c", script]);
        assert!(out.status.success(), "{rt:?}: {}", show(&out));
        let deadline = Instant::now() + Duration::from_secs(20);
        let held = loop {
            let held = ps_processes(&d, a.id(), "isolation hold");
            if held.len() == 2 && held.iter().all(|(_, heap)| *heap >= 20 * MIB) {
                break held;
            }
            assert!(
                Instant::now() < deadline,
                "{rt:?}: heapcap ps shows {held:?} in {}: {}\nheapcapd:\n{}",
                a.id(),
                d.ps(),
                d.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(ps_processes(&d, b.id(), "isolation").is_empty(), "{rt:?}: charged to the other container: {}", d.ps());
        // The pids heapcap ps gives are the host's, and those processes are in the first container.
        let ns = |pid: u64| fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
        for (pid, heap) in &held {
            assert!(*heap < 22 * MIB, "{rt:?}: process {pid} charged {heap} bytes for its 20 MiB");
            assert_eq!(ns(*pid), ns(u64::from(a.pid())), "{rt:?}: process {pid} is not in {}", a.id());
            assert!(
                command(*pid as u32).starts_with("/isolation hold"),
                "{rt:?}: pid {pid} is {}",
                command(*pid as u32)
            );
        }
    }
}

// ------------------------------------------------------------------ recycled pids

#[test]
fn a_recycled_pid_is_never_misread() {
    const ROUNDS: usize = 120;
    let limit = 64 * MIB;
    let chunk = 4 * MIB;
    let mut cmd = binaries::heapcap();
    cmd.args(["run", "--quiet", "--limit", "64Mi", "--", ISOLATION, "recycle"]).args([
        ROUNDS.to_string(),
        limit.to_string(),
        chunk.to_string(),
    ]);
    // A call the supervisor mistakes for a dead process's is never answered: that shows as a hang.
    let out = process::run_captured(cmd, Duration::from_secs(120));
    assert!(out.status.success(), "{}", show(&out));
    let said = stdout(&out);
    let rounds: Vec<&str> = said.lines().filter(|l| l.starts_with("round=") && !l.ends_with("taken")).collect();
    // Another process on the host may take a pid first now and then; nearly all rounds reuse theirs.
    assert!(rounds.len() * 10 >= ROUNDS * 9, "only {} of {ROUNDS} rounds reused the pid:\n{said}", rounds.len());
    // Half the rounds reuse the dead process's pid, half its second thread's id.
    for kind in ["reused=process", "reused=thread"] {
        let n = rounds.iter().filter(|l| l.contains(kind)).count();
        assert!(n * 20 >= ROUNDS * 9, "only {n} rounds with {kind}:\n{said}");
    }
    for line in rounds {
        let big: u64 = field(line, "big").parse().expect("big");
        let small: u64 = field(line, "small").parse().expect("small");
        assert!(big <= limit, "the big process got past its quota: {line}");
        // Each of its two threads may have been killed between a granted block and counting it.
        assert!(big + quota_slack(chunk) + chunk >= limit, "the big process did not reach its quota: {line}");
        // The small one starts afresh on the dead one's pid: its own quota, none of the dead one's heap.
        assert_at_quota(
            &format!("the process that took a recycled pid ({line})"),
            small,
            field(line, "small_result"),
            limit,
            MIB,
        );
    }
    eprintln!("{}", said.lines().last().unwrap_or_default());
}
