//! `heapcap-hook` with the real runtimes: a `config.json` prestart hook (runc, crun) and podman's
//! hooks.d (`--hooks-dir` with `hooks/heapcap-prestart.json`) put a container with a
//! `heapcap.io/limit` annotation under a real heapcapd: it is denied at its quota, file mappings
//! still work, it never holds its own listener fd, a container without the annotation is
//! untouched, bad annotations and a stopped heapcapd give the documented behaviour.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use heapcap_integration::binaries::{self, prestart_hook};
use heapcap_integration::bundle::Bundle;
use heapcap_integration::daemon::{seccomp_profile, Daemon, Wedged};
use heapcap_integration::fixture::{assert_at_quota, fixture_result, MIB};
use heapcap_integration::ids::unique_id;
use heapcap_integration::podman;
use heapcap_integration::process::{show, stderr, stdout};
use heapcap_integration::runtime::Runtime;
use serde_json::{json, Value};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf()
}

/// The `heapcap-hook` binary, built once per test process (with heapcap and heapcapd).
fn hook_bin() -> PathBuf {
    binaries::binary("heapcap-hook")
}

fn bundle(agent: &Path, annotations: &[(&str, &str)], args: &[&str]) -> Bundle {
    let mut b = Bundle::new("hook");
    b.args(args).hook("prestart", prestart_hook(agent, &[])).annotations(annotations);
    b
}

#[test]
fn runc_and_crun_containers_are_denied_at_their_quota() {
    let d = Daemon::start();
    for rt in Runtime::ALL {
        let b = bundle(&d.agent, &[("heapcap.io/limit", "64Mi")], &["/alloc", "mmap", "4194304", "0"]);
        let out = b.run(rt, &unique_id("hook-quota"));
        assert!(out.status.success(), "{rt:?}: {}\nheapcapd:\n{}", show(&out), d.log());
        let (allocated, result) = fixture_result(&out);
        assert_at_quota(&format!("{rt:?} prestart hook"), allocated, &result, 64 * MIB, 4 * MIB);
    }
}

#[test]
fn a_container_without_the_annotation_is_untouched() {
    let d = Daemon::start();
    for rt in Runtime::ALL {
        let script = "grep -E '^(Seccomp|TracerPid):' /proc/self/status; /alloc mmap 4194304 268435456";
        let b = bundle(&d.agent, &[("other.io/limit", "64Mi")], &["/bin/sh", "-c", script]);
        let out = b.run(rt, &unique_id("hook-untouched"));
        assert!(out.status.success(), "{rt:?}: {}", show(&out));
        let said = stdout(&out);
        assert!(said.contains("Seccomp:\t0"), "{rt:?}: no filter expected: {}", show(&out));
        assert!(said.contains("allocated=268435456 result=ok"), "{rt:?}: {}", show(&out));
    }
    let ps = d.ps();
    assert!(ps["containers"].as_array().is_some_and(|c| c.is_empty()), "heapcapd saw a container: {ps}");
}

/// CRI-O runs the hooks.d hook for a pod's infra (pause) container too, with the pod's annotations:
/// the hook leaves it alone, whatever they say (the quota, or a bad value's failure, is the pod's
/// containers').
#[test]
fn a_pods_sandbox_is_untouched_whatever_its_annotations() {
    let d = Daemon::start();
    for (rt, value) in [(Runtime::Runc, "64Mi"), (Runtime::Crun, "lots")] {
        let script = "grep -E '^Seccomp:' /proc/self/status; /alloc mmap 4194304 268435456";
        let annotations = [("io.kubernetes.cri-o.ContainerType", "sandbox"), ("heapcap.io/limit", value)];
        let b = bundle(&d.agent, &annotations, &["/bin/sh", "-c", script]);
        let out = b.run(rt, &unique_id("hook-sandbox"));
        assert!(out.status.success(), "{rt:?}: {}", show(&out));
        let said = stdout(&out);
        assert!(said.contains("Seccomp:\t0"), "{rt:?}: no filter expected: {}", show(&out));
        assert!(said.contains("allocated=268435456 result=ok"), "{rt:?}: {}", show(&out));
    }
    let ps = d.ps();
    assert!(ps["containers"].as_array().is_some_and(|c| c.is_empty()), "heapcapd saw a sandbox: {ps}");
}

/// Every fd link and the status of each thread of `pid`, as seen from the host.
fn fds_and_threads(pid: u32) -> (Vec<String>, Vec<String>) {
    let links = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read the init's fds")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|l| l.display().to_string())
        .collect();
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("read the init's threads")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("status")).ok())
        .collect();
    (links, threads)
}

#[test]
fn the_container_never_holds_its_listener_and_is_not_left_traced() {
    let d = Daemon::start();
    let script = "ls -l /proc/1/fd /proc/self/fd; grep -E '^(Seccomp|Seccomp_filters|TracerPid):' /proc/1/status; \
                  /alloc filemap 536870912";
    for rt in Runtime::ALL {
        let mut b = bundle(&d.agent, &[("heapcap.io/limit", "64Mi")], &["/bin/sh", "-c", script]);
        b.readonly_root(false);
        // Created: the hook ran, the init waits to exec the program. Seen from the host: no
        // listener among its fds, every thread (runc's init is a Go program) filtered, none traced.
        let c = b.create(rt, &unique_id("hook-fds"));
        let (links, threads) = fds_and_threads(c.pid());
        assert!(!links.iter().any(|l| l.contains("seccomp")), "{rt:?}: the init holds a listener: {links:?}");
        if rt == Runtime::Runc {
            assert!(threads.len() > 1, "runc's init is multi-threaded: TSYNC is tested on one thread only");
        }
        for t in &threads {
            assert!(t.contains("Seccomp:\t2") && t.contains("TracerPid:\t0"), "{rt:?}: thread status:\n{t}");
            assert!(!t.contains("State:\tt"), "{rt:?}: a thread is left stopped:\n{t}");
        }
        c.start();
        c.wait_stopped(Duration::from_secs(60));
        let said = c.stdout();
        assert!(said.contains("/proc/self/fd:"), "{rt:?}: {said}\n{}", c.stderr());
        assert!(!said.contains("seccomp"), "{rt:?}: the container holds a listener: {said}");
        assert!(said.contains("Seccomp:\t2") && said.contains("Seccomp_filters:\t1"), "{rt:?}: {said}");
        assert!(said.contains("TracerPid:\t0"), "{rt:?}: still traced: {said}");
        // File mappings still work and are not counted: 512 MiB of them under a 64 MiB quota.
        assert!(said.contains("allocated=536870912 result=ok"), "{rt:?}: {said}\n{}", c.stderr());
    }
}

#[test]
fn bad_annotations_fail_the_start_with_what_to_fix() {
    let d = Daemon::start();
    for rt in Runtime::ALL {
        let b = bundle(&d.agent, &[("heapcap.io/limit", "lots")], &["/bin/echo", "ran"]);
        let out = b.run(rt, &unique_id("hook-bad"));
        assert!(!out.status.success(), "{rt:?}: started anyway: {}", show(&out));
        assert!(!stdout(&out).contains("ran"), "{rt:?}: {}", show(&out));
        assert!(stderr(&out).contains("heapcap.io/limit: 'lots' is not a size"), "{rt:?}: {}", show(&out));
    }
    // The message, as podman and CRI-O users see it.
    let out = run_hook(
        &json!({"ociVersion": "1.0.2", "id": "c1", "status": "creating", "pid": 1, "bundle": "/",
        "annotations": {"heapcap.io/limit": "lots"}}),
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        stderr(&out).contains("container c1: bad heapcap annotation: heapcap.io/limit: 'lots' is not a size: write"),
        "{}",
        show(&out)
    );
}

fn run_hook(state: &Value, env: &[(&str, &str)]) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(hook_bin())
        .arg("prestart")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run heapcap-hook");
    child.stdin.take().expect("stdin").write_all(state.to_string().as_bytes()).expect("write the state");
    child.wait_with_output().expect("wait for heapcap-hook")
}

#[test]
fn heapcapd_down_fails_the_start_unless_allowed() {
    let gone = PathBuf::from(format!("/tmp/hc-hook-{}-none.sock", std::process::id()));
    for rt in Runtime::ALL {
        let b = bundle(&gone, &[("heapcap.io/limit", "64Mi")], &["/bin/echo", "ran"]);
        let out = b.run(rt, &unique_id("hook-down"));
        assert!(!out.status.success(), "{rt:?}: started without heapcapd: {}", show(&out));
        assert!(!stdout(&out).contains("ran"), "{rt:?}: {}", show(&out));
        assert!(stderr(&out).contains("heapcapd is not reachable"), "{rt:?}: {}", show(&out));

        let mut b = Bundle::new("hook-down-allowed");
        b.args(&["/alloc", "mmap", "4194304", "134217728"])
            .annotation("heapcap.io/limit", "64Mi")
            .hook("prestart", prestart_hook(&gone, &["HEAPCAP_HOOK_ALLOW_UNSUPERVISED=1"]));
        let out = b.run(rt, &unique_id("hook-down-allowed"));
        assert!(out.status.success(), "{rt:?}: {}", show(&out));
        assert_eq!(fixture_result(&out), (128 * MIB, "ok".to_string()), "{rt:?} unquota'd: {}", show(&out));
    }
    // A wedged heapcapd (accepts nothing, backlog full) fails the start after the hook's connect
    // timeout instead of hanging it (crun's own connect would wait for as long as it lasts).
    let wedged_path = PathBuf::from(format!("/tmp/hc-hook-{}-wedged.sock", std::process::id()));
    let wedged = Wedged::at(&wedged_path);
    for rt in Runtime::ALL {
        let b = bundle(&wedged_path, &[("heapcap.io/limit", "64Mi")], &["/bin/echo", "ran"]);
        let out = b.run(rt, &unique_id("hook-wedged"));
        assert!(!out.status.success(), "{rt:?}: started with a wedged heapcapd: {}", show(&out));
        assert!(!stdout(&out).contains("ran"), "{rt:?}: {}", show(&out));
        assert!(stderr(&out).contains("accepted no connection within"), "{rt:?}: {}", show(&out));
    }
    drop(wedged);
    let _ = std::fs::remove_file(&wedged_path);

    let state = json!({"ociVersion": "1.0.2", "id": "c1", "status": "creating", "pid": 1, "bundle": "/",
        "annotations": {"heapcap.io/limit": "64Mi"}});
    let sock = gone.to_str().expect("utf-8");
    let out = run_hook(&state, &[("HEAPCAP_SOCKET", sock)]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(stderr(&out).contains("start heapcapd"), "{}", show(&out));
    assert!(stderr(&out).contains("HEAPCAP_HOOK_ALLOW_UNSUPERVISED=1"), "{}", show(&out));
    let out = run_hook(&state, &[("HEAPCAP_SOCKET", sock), ("HEAPCAP_HOOK_ALLOW_UNSUPERVISED", "1")]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(stderr(&out).contains("WITHOUT a heap quota"), "{}", show(&out));
}

/// `hooks/NAME` with the hook's path and heapcapd's socket set for this test, in a fresh hooks dir.
fn hooks_dir(name: &str, d: &Daemon) -> PathBuf {
    let mut hook: Value =
        serde_json::from_slice(&std::fs::read(workspace().join("hooks").join(name)).expect("read hooks file"))
            .expect("hooks file is JSON");
    hook["hook"]["path"] = json!(hook_bin().to_str().expect("utf-8"));
    hook["hook"]["env"] = json!([format!("HEAPCAP_SOCKET={}", d.agent.display())]);
    let dir = d.dir.join(format!("hooks.d-{name}"));
    std::fs::create_dir_all(&dir).expect("hooks dir");
    std::fs::write(dir.join(name), serde_json::to_vec_pretty(&hook).expect("json")).expect("write hooks file");
    dir
}

#[test]
fn podman_with_the_hooks_d_file_is_enforced_and_keeps_podmans_rules() {
    let d = Daemon::start();
    let dir = hooks_dir("heapcap-prestart.json", &d);
    let global = ["--hooks-dir", dir.to_str().expect("utf-8")];
    let t = Duration::from_secs(120);
    let quota = ["--annotation", "heapcap.io/limit=64Mi"];
    let out = podman::run_full(&global, &quota, None, &["/alloc", "mmap", "4194304", "0"], t);
    let (allocated, result) = fixture_result(&out);
    assert_at_quota("podman --hooks-dir", allocated, &result, 64 * MIB, 4 * MIB);

    // File mappings work; no listener inside; not traced.
    let script = "ls -l /proc/1/fd /proc/self/fd; grep TracerPid /proc/1/status; /alloc filemap 536870912";
    let out = podman::run_full(&global, &quota, None, &["/bin/sh", "-c", script], t);
    let said = stdout(&out);
    assert!(out.status.success() && said.contains("allocated=536870912 result=ok"), "{}", show(&out));
    assert!(!said.contains("seccomp") && said.contains("TracerPid:\t0"), "{}", show(&out));

    // The `when` clause also matches a container that sets only a total.
    let total = ["--annotation", "heapcap.io/total-limit=32Mi"];
    let out = podman::run_full(&global, &total, None, &["/alloc", "mmap", "1048576", "0"], t);
    let (allocated, result) = fixture_result(&out);
    assert_at_quota("podman --hooks-dir, total only", allocated, &result, 32 * MIB, MIB);

    // Without the annotation the hook does not even run: untouched.
    let out = podman::run_full(&global, &[], None, &["/alloc", "mmap", "4194304", "134217728"], t);
    assert_eq!(fixture_result(&out), (128 * MIB, "ok".to_string()), "{}", show(&out));
    let ps = d.ps();
    assert!(ps["containers"].as_array().is_some_and(|c| c.len() <= 1), "{ps}");

    // podman's own default profile still holds: move_pages answers EPERM (0 when unconfined).
    let out = podman::move_pages(&global, &quota);
    assert!(stdout(&out).contains("move_pages -1 Operation not permitted"), "{}", show(&out));
    let volumes = podman::host_system_volumes();
    let mut opts: Vec<&str> = quota.to_vec();
    opts.extend(volumes.iter().map(String::as_str));
    let out = podman::run_full(&global, &opts, None, &["/usr/bin/python3", "-c", "x = bytearray(200 * 2**20)"], t);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(stderr(&out).contains("MemoryError"), "{}", show(&out));

    // heapcapd down: podman fails the start (the hook's message is in podman's error).
    let gone = format!("HEAPCAP_SOCKET={}", d.dir.join("nothing-here.sock").display());
    let mut hook: Value =
        serde_json::from_slice(&std::fs::read(dir.join("heapcap-prestart.json")).expect("read")).expect("json");
    hook["hook"]["env"] = json!([gone]);
    let down = d.dir.join("hooks.d-down");
    std::fs::create_dir_all(&down).expect("hooks dir");
    std::fs::write(down.join("heapcap-prestart.json"), hook.to_string()).expect("write");
    let global = ["--hooks-dir", down.to_str().expect("utf-8")];
    let out = podman::run_full(&global, &quota, None, &["/bin/echo", "ran"], t);
    assert!(!out.status.success() && !stdout(&out).contains("ran"), "{}", show(&out));
    // podman shows only crun's last log line ("error executing hook"); with runc it shows the
    // hook's own message.
    let global = ["--runtime", "runc", "--hooks-dir", down.to_str().expect("utf-8")];
    let out = podman::run_full(&global, &quota, None, &["/bin/echo", "ran"], t);
    assert!(!out.status.success() && !stdout(&out).contains("ran"), "{}", show(&out));
    assert!(stderr(&out).contains("heapcapd is not reachable"), "{}", show(&out));
}

#[test]
fn podman_precreate_changes_the_spec_and_covers_exec() {
    let d = Daemon::start();
    let dir = hooks_dir("heapcap-precreate.json", &d);
    let global = ["--hooks-dir", dir.to_str().expect("utf-8")];
    let t = Duration::from_secs(120);
    let quota = ["--annotation", "heapcap.io/limit=64Mi"];
    let out = podman::run_full(&global, &quota, None, &["/alloc", "mmap", "4194304", "0"], t);
    let (allocated, result) = fixture_result(&out);
    assert_at_quota("podman precreate", allocated, &result, 64 * MIB, 4 * MIB);

    let script =
        "ls -l /proc/1/fd /proc/self/fd; grep -E '^(Seccomp|TracerPid):' /proc/1/status; /alloc filemap 536870912";
    let out = podman::run_full(&global, &quota, None, &["/bin/sh", "-c", script], t);
    let said = stdout(&out);
    assert!(out.status.success() && said.contains("allocated=536870912 result=ok"), "{}", show(&out));
    assert!(!said.contains("seccomp") && said.contains("Seccomp:\t2"), "{}", show(&out));

    let out = podman::run_full(&global, &[], None, &["/alloc", "mmap", "4194304", "134217728"], t);
    assert_eq!(fixture_result(&out), (128 * MIB, "ok".to_string()), "{}", show(&out));

    // podman's own default profile still holds (merged, not replaced).
    let out = podman::move_pages(&global, &quota);
    assert!(stdout(&out).contains("move_pages -1 Operation not permitted"), "{}", show(&out));

    // `podman exec` is covered: the runtime sends heapcapd the exec'd process's listener too.
    let out = podman::run_detached_and_exec(&global, &quota, &["/alloc", "mmap", "4194304", "0"]);
    let (allocated, result) = fixture_result(&out);
    assert_at_quota("podman exec (precreate)", allocated, &result, 64 * MIB, 4 * MIB);

    // A bad value fails the start with what to fix.
    let bad = ["--annotation", "heapcap.io/limit=lots"];
    let out = podman::run_full(&global, &bad, None, &["/bin/echo", "ran"], t);
    assert!(!out.status.success() && !stdout(&out).contains("ran"), "{}", show(&out));
    assert!(stderr(&out).contains("heapcap.io/limit: 'lots' is not a size"), "{}", show(&out));

    // heapcapd down: the start fails with the hook's message.
    let mut hook: Value =
        serde_json::from_slice(&std::fs::read(dir.join("heapcap-precreate.json")).expect("read")).expect("json");
    hook["hook"]["env"] = json!([format!("HEAPCAP_SOCKET={}", d.dir.join("nothing-here.sock").display())]);
    let down = d.dir.join("hooks.d-precreate-down");
    std::fs::create_dir_all(&down).expect("hooks dir");
    std::fs::write(down.join("heapcap-precreate.json"), hook.to_string()).expect("write");
    let global = ["--hooks-dir", down.to_str().expect("utf-8")];
    let out = podman::run_full(&global, &quota, None, &["/bin/echo", "ran"], t);
    assert!(!out.status.success() && !stdout(&out).contains("ran"), "{}", show(&out));
    assert!(stderr(&out).contains("heapcapd is not reachable"), "{}", show(&out));
    assert!(stderr(&out).contains("no socket there"), "podman must not take it for a missing command: {}", show(&out));
}

/// What the hook adds to a container start: `runc run` of `true`, with and without it.
#[test]
fn the_hook_adds_little_to_a_start() {
    let d = Daemon::start();
    let rounds = 7;
    for rt in Runtime::ALL {
        let plain = {
            let mut b = Bundle::new("hook-time-plain");
            b.args(&["/bin/true"]).annotation("heapcap.io/limit", "64Mi");
            b
        };
        let hooked = bundle(&d.agent, &[("heapcap.io/limit", "64Mi")], &["/bin/true"]);
        let mut times = [Vec::new(), Vec::new()];
        for _ in 0..rounds {
            for (i, b) in [&plain, &hooked].into_iter().enumerate() {
                let t = Instant::now();
                let out = b.run(rt, &unique_id("hook-time"));
                assert!(out.status.success(), "{rt:?}: {}", show(&out));
                times[i].push(t.elapsed());
            }
        }
        for t in &mut times {
            t.sort();
        }
        let (p, h) = (times[0][rounds / 2], times[1][rounds / 2]);
        eprintln!(
            "{rt:?}: median start+run of `true`: {:.1} ms without the hook, {:.1} ms with it ({:+.1} ms)",
            p.as_secs_f64() * 1e3,
            h.as_secs_f64() * 1e3,
            (h.as_secs_f64() - p.as_secs_f64()) * 1e3
        );
        assert!(h < p + Duration::from_millis(500), "{rt:?}: the hook adds {:?}", h.saturating_sub(p));
    }
    // The hook's own report of its time and of how long the init was stopped.
    let mut b = Bundle::new("hook-timing");
    b.args(&["/bin/true"]).annotation("heapcap.io/limit", "64Mi");
    let log = d.dir.join("hook-timing.log");
    b.hook(
        "prestart",
        json!({
            "path": "/bin/sh",
            "args": ["sh", "-c", format!("HEAPCAP_SOCKET={} HEAPCAP_HOOK_TIMING=1 {} prestart 2>>{}",
                d.agent.display(), hook_bin().display(), log.display())],
        }),
    );
    for _ in 0..5 {
        let out = b.run(Runtime::Runc, &unique_id("hook-timing"));
        assert!(out.status.success(), "{}", show(&out));
    }
    let said = std::fs::read_to_string(&log).expect("timing log");
    eprintln!("{said}");
    assert_eq!(said.matches("init stopped").count(), 5, "{said}");
}

/// A host process stopped in a blocking call gets the filter and its call restarts as if
/// nothing happened: `read` (the ERESTARTSYS family) and `clock_nanosleep`
/// (ERESTART_RESTARTBLOCK); a process not in a system call is refused and left running.
#[test]
fn injection_restarts_the_interrupted_call_and_leaves_a_busy_process_alone() {
    use std::io::Write;
    use std::process::Stdio;
    let d = Daemon::start();
    let state = |id: &str, pid: u32| {
        json!({"ociVersion": "1.0.2", "id": id, "status": "creating", "pid": pid, "bundle": "/",
               "annotations": {"heapcap.io/limit": "64Mi"}})
    };
    let sock = d.agent.to_str().expect("utf-8").to_string();
    let env = [("HEAPCAP_SOCKET", sock.as_str())];
    let status = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();

    // read(2) on a pipe.
    let mut reader = Command::new("/bin/sh")
        .args(["-c", "read x; echo got $x"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start sh");
    std::thread::sleep(Duration::from_millis(300));
    let out = run_hook(&state(&unique_id("inject-read"), reader.id()), &env);
    assert!(out.status.success(), "{}", show(&out));
    assert!(status(reader.id()).contains("Seccomp:\t2"), "{}", status(reader.id()));
    reader.stdin.take().expect("stdin").write_all(b"hello\n").expect("write");
    let out = reader.wait_with_output().expect("wait sh");
    assert!(out.status.success() && stdout(&out) == "got hello\n", "{}", show(&out));

    // clock_nanosleep: restarted with restart_syscall, so it still sleeps its full time.
    let t = Instant::now();
    let mut sleeper = Command::new("sleep").arg("1").spawn().expect("start sleep");
    std::thread::sleep(Duration::from_millis(200));
    let out = run_hook(&state(&unique_id("inject-sleep"), sleeper.id()), &env);
    assert!(out.status.success(), "{}", show(&out));
    assert!(status(sleeper.id()).contains("Seccomp:\t2"), "{}", status(sleeper.id()));
    assert!(sleeper.wait().expect("wait sleep").success());
    let slept = t.elapsed();
    assert!(slept >= Duration::from_millis(1000) && slept < Duration::from_millis(3000), "slept {slept:?}");

    // A busy loop is not stopped after a syscall instruction: refused, and left running untraced.
    let mut busy = Command::new("/bin/bash").args(["-c", "while :; do :; done"]).spawn().expect("start bash");
    std::thread::sleep(Duration::from_millis(200));
    let out = run_hook(&state(&unique_id("inject-busy"), busy.id()), &env);
    let st = status(busy.id());
    let _ = busy.kill();
    let _ = busy.wait();
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(stderr(&out).contains("not stopped after a system call instruction"), "{}", show(&out));
    assert!(st.contains("Seccomp:\t0") && st.contains("TracerPid:\t0"), "{st}");
    assert!(st.contains("State:\tR"), "left stopped? {st}");
}

/// Hooks of many containers starting at once each inject into their own init, and every
/// container is dropped by heapcapd once it ends.
#[test]
fn many_containers_at_once() {
    let d = Daemon::start();
    let b = bundle(&d.agent, &[("heapcap.io/limit", "32Mi")], &["/alloc", "mmap", "1048576", "0"]);
    let outs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let b = &b;
                let rt = Runtime::ALL[i % 2];
                s.spawn(move || (rt, b.run(rt, &unique_id("hook-many"))))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("container thread")).collect()
    });
    for (rt, out) in outs {
        assert!(out.status.success(), "{rt:?}: {}\nheapcapd:\n{}", show(&out), d.log());
        let (allocated, result) = fixture_result(&out);
        assert_at_quota(&format!("{rt:?} (8 at once)"), allocated, &result, 32 * MIB, MIB);
    }
    d.wait_no_containers(Duration::from_secs(30));
}

/// A container whose profile already reports to heapcapd (precreate hook, heapcap-runtime) is
/// left to the runtime; one that reports to another agent fails with why.
#[test]
fn a_profile_with_a_listener_is_not_injected_twice() {
    let d = Daemon::start();
    for rt in Runtime::ALL {
        let mut b = bundle(&d.agent, &[("heapcap.io/limit", "64Mi")], &["/alloc", "mmap", "4194304", "0"]);
        b.seccomp(d.profile());
        let out = b.run(rt, &unique_id("hook-both"));
        assert!(out.status.success(), "{rt:?}: {}\nheapcapd:\n{}", show(&out), d.log());
        let (allocated, result) = fixture_result(&out);
        assert_at_quota(&format!("{rt:?} profile and hook"), allocated, &result, 64 * MIB, 4 * MIB);

        // Another agent, listening (crun connects to it before running hooks).
        let other = d.dir.join(format!("other-agent-{rt:?}.sock"));
        let agent = std::os::unix::net::UnixListener::bind(&other).expect("bind the other agent");
        std::thread::spawn(move || agent.incoming().for_each(drop));
        let mut b = bundle(&d.agent, &[("heapcap.io/limit", "64Mi")], &["/bin/echo", "ran"]);
        b.seccomp(seccomp_profile(&other));
        let out = b.run(rt, &unique_id("hook-other"));
        assert!(!out.status.success() && !stdout(&out).contains("ran"), "{rt:?}: {}", show(&out));
        assert!(stderr(&out).contains("only one seccomp listener"), "{rt:?}: {}", show(&out));
    }
}

#[test]
fn the_runtimes_own_code_before_its_exec_is_never_charged() {
    // runc's init is Go: under a filter injected before its exec it maps ~80 MiB of thread
    // stacks and builds its own seccomp filter. None of that is the container's heap.
    let d = Daemon::start();
    let t = Duration::from_secs(120);
    let alloc = ["/alloc", "mmap", "1048576", "0"];
    for quota in [16 * MIB, 32 * MIB] {
        let annotation = format!("heapcap.io/limit={}Mi", quota / MIB);
        for file in ["heapcap-prestart.json", "heapcap-precreate.json"] {
            let dir = hooks_dir(file, &d);
            for runtime in ["runc", "crun"] {
                let global = ["--runtime", runtime, "--hooks-dir", dir.to_str().expect("utf-8")];
                let out = podman::run_full(&global, &["--annotation", &annotation], None, &alloc, t);
                let (allocated, result) = fixture_result(&out);
                let what = format!("podman --runtime {runtime} with {file} at {annotation}");
                assert!(!stderr(&out).contains("cannot allocate memory"), "{what}: {}", show(&out));
                assert_at_quota(&what, allocated, &result, quota, MIB);
            }
        }
        // runc's own config.json prestart hook.
        for rt in Runtime::ALL {
            let b = bundle(&d.agent, &[("heapcap.io/limit", &annotation["heapcap.io/limit=".len()..])], &alloc);
            let out = b.run(rt, &unique_id("hook-runtime"));
            let (allocated, result) = fixture_result(&out);
            assert_at_quota(&format!("{rt:?} config.json prestart at {annotation}"), allocated, &result, quota, MIB);
        }
    }
    // What the runtime did is not in any denial: the containers were denied only at their quota.
    let events = d.heapcap(&["events", "--json"]);
    for line in stdout(&events).lines() {
        let e: Value = serde_json::from_str(line).expect("an event");
        assert_ne!(e["command"], "runc:[2:INIT]", "the runtime was denied: {line}");
    }
}
