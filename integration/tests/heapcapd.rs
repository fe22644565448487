//! heapcapd with the real runtimes: runc and crun send it each container's listener fd through
//! `linux.seccomp.listenerPath`; containers are denied at their quota, `runc exec` joins its
//! container, `heapcap ps`/`set-limit`/`events` and the metrics tell the truth, bad annotations
//! are refused with the reason, and containers that end leave nothing behind.

use std::time::{Duration, Instant};

use heapcap_integration::bundle::Bundle;
use heapcap_integration::daemon::{settled, wait_back_to, Daemon};
use heapcap_integration::fixture::{self, assert_at_quota, fixture_result, parse_allocated, quota_slack, MIB};
use heapcap_integration::ids::unique_id;
use heapcap_integration::podman;
use heapcap_integration::process::{show, stderr, stdout};
use heapcap_integration::runtime::Runtime;

#[test]
fn runc_and_crun_containers_are_denied_at_their_quota() {
    let d = Daemon::start();
    for rt in Runtime::ALL {
        let b = d.bundle(&[("heapcap.io/limit", "64Mi")], &["/alloc", "mmap", "4194304", "0"]);
        let out = b.run(rt, &unique_id("quota"));
        assert!(out.status.success(), "{rt:?}: {}\nheapcapd:\n{}", show(&out), d.log());
        let (allocated, result) = parse_allocated(&stdout(&out));
        assert_at_quota(&format!("{rt:?}"), allocated, &result, 64 * MIB, 4 * MIB);
    }
}

/// crun connects to the listenerPath at `crun create` but sends the listener only when the
/// container's init installs its filter, at `crun start`: a container started long after its
/// create (here longer than heapcapd waits for an agent connection's first bytes in one of its
/// places, 5 s) is still served and held at its quota. heapcapd used to close such a connection
/// after 5 s, and the container then ran unsupervised, not listed by `heapcap ps`.
#[test]
fn a_container_started_long_after_its_create_is_held_at_its_quota() {
    let d = Daemon::start();
    for rt in Runtime::ALL {
        let b = d.bundle(&[("heapcap.io/limit", "64Mi")], &["/alloc", "mmap", "4194304", "0"]);
        let c = b.create(rt, &unique_id("late-start"));
        std::thread::sleep(Duration::from_secs(7));
        c.start();
        c.wait_stopped(Duration::from_secs(60));
        let out = c.stdout();
        assert!(
            out.contains("allocated="),
            "{rt:?} started 7 s after its create printed no result\nstdout: {out}\nstderr: {}\nheapcapd:\n{}",
            c.stderr(),
            d.log()
        );
        let (allocated, result) = parse_allocated(&out);
        assert_at_quota(&format!("{rt:?}, started 7 s after its create"), allocated, &result, 64 * MIB, 4 * MIB);
        c.delete();
    }
    assert!(!d.log().contains("agent message not taken"), "heapcapd:\n{}", d.log());
}

#[test]
fn a_container_with_a_larger_quota_is_unaffected() {
    let d = Daemon::start();
    let small = d.bundle(&[("heapcap.io/limit", "32Mi")], &["/alloc", "mmap", "1048576", "0"]);
    let large = d.bundle(&[("heapcap.io/limit", "256Mi")], &["/alloc", "mmap", "1048576", "0"]);
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| small.run(Runtime::Runc, &unique_id("small")));
        let b = s.spawn(|| large.run(Runtime::Crun, &unique_id("large")));
        (a.join().expect("small"), b.join().expect("large"))
    });
    let (sa, ra) = parse_allocated(&stdout(&a));
    let (sb, rb) = parse_allocated(&stdout(&b));
    assert_at_quota("32Mi container", sa, &ra, 32 * MIB, MIB);
    assert_at_quota("256Mi container", sb, &rb, 256 * MIB, MIB);
}

#[test]
fn python_in_a_container_gets_memory_error() {
    let d = Daemon::start();
    let mut b = d.bundle(&[("heapcap.io/limit", "64Mi")], &["/usr/bin/python3", "-c", "x = bytearray(200 * 2**20)"]);
    b.with_host_system();
    let out = b.run(Runtime::Runc, &unique_id("python"));
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(stderr(&out).contains("MemoryError"), "{}", show(&out));
    let mut ok = d.bundle(
        &[("heapcap.io/limit", "512Mi")],
        &["/usr/bin/python3", "-c", "x = bytearray(200 * 2**20); print(len(x))"],
    );
    ok.with_host_system();
    let out = ok.run(Runtime::Crun, &unique_id("python-ok"));
    assert!(out.status.success() && stdout(&out).contains("209715200"), "{}", show(&out));
}

#[test]
fn exec_joins_its_container_and_set_limit_applies_live() {
    let d = Daemon::start();
    for rt in Runtime::ALL {
        let b = d.bundle(&[("heapcap.io/limit", "64Mi")], &["/bin/sleep", "60"]);
        let c = b.create(rt, &unique_id("exec"));
        c.start();
        let out = c.exec(&["/alloc", "mmap", "4194304", "0"]);
        let (allocated, result) = fixture_result(&out);
        assert_at_quota(&format!("{rt:?} exec"), allocated, &result, 64 * MIB, 4 * MIB);

        let set = d.heapcap(&["set-limit", c.id(), "16Mi"]);
        assert!(set.status.success(), "{}", show(&set));
        assert!(stdout(&set).contains("16.0 MiB"), "{}", show(&set));
        let (allocated, result) = fixture_result(&c.exec(&["/alloc", "mmap", "1048576", "0"]));
        assert_at_quota(&format!("{rt:?} after set-limit 16Mi"), allocated, &result, 16 * MIB, MIB);

        // The total covers exec'd processes too: three children share 24 MiB, the sleeper included.
        let set = d.heapcap(&["set-limit", c.id(), "none", "--total", "24Mi"]);
        assert!(set.status.success(), "{}", show(&set));
        let out = c.exec(&["/alloc", "spawn", "3", "1048576"]);
        let children = fixture::parse_children(&stdout(&out));
        assert_eq!(children.len(), 3, "{}", show(&out));
        let sum: u64 = children.iter().map(|(a, _)| a).sum();
        assert!(sum <= 24 * MIB, "{rt:?}: children hold {sum} bytes together, over the 24 MiB total");
        assert!(sum + 3 * MIB + 4 * quota_slack(MIB) >= 24 * MIB, "{rt:?}: children got only {sum} of 24 MiB");
        assert!(children.iter().all(|(_, r)| r == "ENOMEM"), "{}", show(&out));
    }
}

#[test]
fn ps_shows_each_process_heap_and_limit() {
    let d = Daemon::start();
    let script = "import sys, time; x = bytearray(40 * 2**20); print('ready', flush=True); time.sleep(60)";
    let mut b = d.bundle(
        &[("heapcap.io/limit", "128Mi"), ("heapcap.io/total-limit", "1Gi")],
        &["/usr/bin/python3", "-c", script],
    );
    b.with_host_system();
    let c = b.create(Runtime::Runc, &unique_id("ps"));
    c.start();
    c.wait_for_stdout("ready", Duration::from_secs(30));
    let ps = d.ps();
    let container = ps["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|x| x["id"] == c.id())
        .unwrap_or_else(|| panic!("{} not in {ps}", c.id()))
        .clone();
    assert_eq!(container["limit"], 128 * MIB, "{container}");
    assert_eq!(container["total_limit"], 1024 * MIB, "{container}");
    assert_eq!(container["mode"], "enforce");
    let procs = container["processes"].as_array().expect("processes");
    let py = procs
        .iter()
        .find(|p| p["command"].as_str().is_some_and(|c| c.starts_with("python3")))
        .unwrap_or_else(|| panic!("no python3 in {container}"));
    let heap = py["heap"].as_u64().expect("heap");
    assert!((40 * MIB..60 * MIB).contains(&heap), "python3 holds a 40 MiB bytearray, ps says {heap}: {container}");
    assert!(py["peak"].as_u64().expect("peak") >= heap);
    let table = d.heapcap(&["ps"]);
    assert!(stdout(&table).contains(c.id()) && stdout(&table).contains("128.0 MiB"), "{}", show(&table));
}

#[test]
fn audit_mode_denies_nothing_and_logs_peaks() {
    let d = Daemon::start();
    let b = d.bundle(
        &[("heapcap.io/limit", "16Mi"), ("heapcap.io/mode", "audit")],
        &["/alloc", "mmap", "4194304", "67108864"],
    );
    let out = b.run(Runtime::Crun, &unique_id("audit"));
    assert_eq!(fixture_result(&out), (64 * MIB, "ok".to_string()), "audit must deny nothing");
    let deadline = Instant::now() + Duration::from_secs(10);
    let peak = loop {
        let log = d.log();
        let line = log.lines().find(|l| l.contains("process ended (audit)") && l.contains("alloc mmap"));
        if let Some(peak) =
            line.and_then(|l| l.split("peak=").nth(1)).and_then(|p| p.split_whitespace().next()?.parse::<u64>().ok())
        {
            break peak;
        }
        assert!(Instant::now() < deadline, "no audit peak logged:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!((64 * MIB..72 * MIB).contains(&peak), "peak {peak} for a process that held 64 MiB");
}

#[test]
fn bad_annotations_are_refused_with_the_reason() {
    let d = Daemon::start();
    for (rt, value) in [(Runtime::Runc, "lots"), (Runtime::Crun, "-5Mi")] {
        let b = d.bundle(&[("heapcap.io/limit", value)], &["/alloc", "mmap", "4194304", "0"]);
        let out = b.run(rt, &unique_id("bad"));
        assert!(
            !out.status.success(),
            "{rt:?}: a container with heapcap.io/limit={value} must not start: {}",
            show(&out)
        );
        assert!(!stdout(&out).contains("allocated="), "{rt:?}: the program must not have run: {}", show(&out));
        let said = stderr(&out);
        assert!(
            said.contains("refused") && said.contains(&format!("heapcap.io/limit: '{value}'")),
            "{rt:?}: {}",
            show(&out)
        );
    }
    let b = d.bundle(&[("heapcap.io/mode", "strict")], &["/alloc", "mmap", "4194304", "0"]);
    let out = b.run(Runtime::Runc, &unique_id("bad-mode"));
    assert!(!out.status.success() && stderr(&out).contains("enforce or audit"), "{}", show(&out));

    // Started so, heapcapd runs such containers unquota'd instead.
    let lenient = Daemon::start_with(&["--bad-settings", "audit"]);
    let b = lenient.bundle(&[("heapcap.io/limit", "lots")], &["/alloc", "mmap", "4194304", "67108864"]);
    assert_eq!(fixture_result(&b.run(Runtime::Runc, &unique_id("lenient"))), (64 * MIB, "ok".to_string()));
    assert!(lenient.log().contains("running unquota'd"), "{}", lenient.log());
}

/// The last line behind the shim and the hooks, which never send a Kubernetes pod's sandbox: one
/// that reaches heapcapd anyway (a hand-written `listenerPath`) is served, never refused for the
/// pod's settings, never held to them, and named by its pod.
#[test]
fn a_pods_sandbox_sent_to_heapcapd_is_served_without_a_quota_and_never_refused() {
    let d = Daemon::start();
    for (rt, kind_key, value) in [
        (Runtime::Runc, "io.kubernetes.cri.container-type", "lots"),
        (Runtime::Crun, "io.kubernetes.cri-o.ContainerType", "8Mi"),
    ] {
        let annotations = [
            (kind_key, "sandbox"),
            ("io.kubernetes.cri.sandbox-namespace", "default"),
            ("io.kubernetes.cri.sandbox-name", "web"),
            ("heapcap.io/limit", value),
        ];
        let b = d.bundle(&annotations, &["/bin/sh", "-c", "/alloc mmap 4194304 67108864; exec sleep 60"]);
        let c = b.create(rt, &unique_id("sandbox"));
        c.start();
        let deadline = Instant::now() + Duration::from_secs(30);
        let view = loop {
            let ps = d.ps();
            if let Some(view) = ps["containers"].as_array().and_then(|v| v.iter().find(|x| x["id"] == c.id()).cloned())
            {
                if view["processes"]
                    .as_array()
                    .is_some_and(|p| p.iter().any(|p| p["command"].as_str() == Some("sleep 60")))
                {
                    break view;
                }
            }
            assert!(Instant::now() < deadline, "{rt:?}: the sandbox is not listed: {ps}\n{}", d.log());
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(view["limit"].is_null(), "{rt:?}: no quota for a sandbox: {view}");
        let out = c.wait_for_stdout("allocated=", Duration::from_secs(30));
        assert_eq!(
            parse_allocated(&out),
            (64 * MIB, "ok".to_string()),
            "{rt:?}: the pod's {value} is not the sandbox's"
        );
        assert_eq!(view["pod"]["name"], "web", "{rt:?}: {view}");
        assert!(!d.log().contains("container refused"), "{rt:?}: {}", d.log());
    }
}

#[test]
fn ended_containers_leave_nothing_behind() {
    let d = Daemon::start();
    let run = |n: usize| {
        for i in 0..n {
            let rt = Runtime::ALL[i % 2];
            let b = d.bundle(&[("heapcap.io/limit", "32Mi")], &["/alloc", "mmap", "1048576", "8388608"]);
            let out = b.run(rt, &unique_id("churn"));
            assert_eq!(fixture_result(&out), (8 * MIB, "ok".to_string()), "{rt:?}");
        }
        d.wait_no_containers(Duration::from_secs(10));
    };
    run(2); // warm up: threads and fds that live as long as heapcapd
            // The fewest fds and threads over a short while: a control connection (the `ps` above) may
            // still be finishing when sampled once.
    let before = settled(d.pid());
    run(30);
    if let Err(after) = wait_back_to(d.pid(), before, Duration::from_secs(10)) {
        panic!("heapcapd held (fds, threads) = {before:?} before 30 containers, {after:?} after");
    }
}

#[test]
fn denials_show_in_events_and_metrics() {
    let d = Daemon::start();
    let b = d.bundle(&[("heapcap.io/limit", "32Mi")], &["/alloc", "mmap", "4194304", "0"]);
    let id = unique_id("events");
    let out = b.run(Runtime::Runc, &id);
    assert_eq!(fixture_result(&out).1, "ENOMEM");
    let events = d.heapcap(&["events", "--json"]);
    assert!(events.status.success(), "{}", show(&events));
    let ev: Vec<serde_json::Value> =
        stdout(&events).lines().map(|l| serde_json::from_str(l).expect("an event per line")).collect();
    let e = ev.iter().find(|e| e["container"] == id.as_str()).unwrap_or_else(|| panic!("no event for {id}: {ev:?}"));
    assert_eq!(e["syscall"], "mmap");
    assert_eq!(e["requested"], 4 * MIB);
    assert_eq!(e["limit"], 32 * MIB);
    assert!(e["usage"].as_u64().expect("usage") + 4 * MIB > 32 * MIB);
    assert!(e["command"].as_str().expect("command").starts_with("alloc mmap"));
    assert!(d.log().contains("denied"), "denials are logged");

    let denials = d.metric("heapcap_denials_total").expect("heapcap_denials_total");
    assert!(denials >= 1.0, "{}", d.metrics());
    let allowed =
        d.metric("heapcap_notifications_total{syscall=\"mmap\",decision=\"allow\"}").expect("mmap allow counter");
    assert!(allowed >= 7.0, "{}", d.metrics());
    let observed = d.metric("heapcap_decision_latency_seconds_count").expect("latency histogram");
    assert!(observed >= allowed + denials, "{}", d.metrics());
}

fn example(path: &str) -> serde_json::Value {
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

/// A seccomp profile from `examples/`, pointed at this test's heapcapd.
fn example_profile(value: &serde_json::Value, daemon: &Daemon) -> serde_json::Value {
    let mut profile = value.clone();
    assert_eq!(profile["listenerPath"], "/run/heapcap/heapcapd.sock", "the examples use heapcapd's default socket");
    profile["listenerPath"] = daemon.agent.to_str().expect("utf-8 path").into();
    profile
}

#[test]
fn the_runc_example_bundle_is_enforced() {
    let d = Daemon::start();
    let config = example("examples/runc/config.json");
    let mut b = Bundle::new("example");
    let seccomp = example_profile(&config["linux"]["seccomp"], &d);
    let annotations = config["annotations"].as_object().expect("annotations").clone();
    let args: Vec<String> = serde_json::from_value(config["process"]["args"].clone()).expect("args");
    b.args(&args.iter().map(String::as_str).collect::<Vec<_>>()).seccomp(seccomp);
    for (k, v) in &annotations {
        b.annotation(k, v.as_str().expect("string annotation"));
    }
    for rt in Runtime::ALL {
        let out = b.run(rt, &unique_id("example"));
        let (allocated, result) = fixture_result(&out);
        assert_at_quota(&format!("{rt:?} with examples/runc/config.json"), allocated, &result, 64 * MIB, 4 * MIB);
    }
}

#[test]
fn podman_with_the_example_profile_is_enforced_and_keeps_podmans_rules() {
    let d = Daemon::start();
    let profile = example_profile(&example("examples/podman/seccomp.json"), &d);
    let path = d.dir.join("podman-seccomp.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&profile).expect("json")).expect("write profile");
    let seccomp = format!("seccomp={}", path.display());
    let opts = ["--security-opt", seccomp.as_str(), "--annotation", "heapcap.io/limit=64Mi"];
    let out = podman::run(&opts, &["/alloc", "mmap", "4194304", "0"]);
    let (allocated, result) = fixture_result(&out);
    assert_at_quota("podman with examples/podman/seccomp.json", allocated, &result, 64 * MIB, 4 * MIB);

    // File mappings still work and are not counted: 512 MiB of them under a 64 MiB quota.
    let out = podman::run(&opts, &["/alloc", "filemap", "536870912"]);
    assert_eq!(fixture_result(&out), (512 * MIB, "ok".to_string()), "{}", show(&out));

    // podman's own rules still hold: its default profile answers move_pages with EPERM, where an
    // unconfined container gets 0 (nothing to move).
    let out = podman::move_pages(&[], &opts);
    assert!(stdout(&out).contains("move_pages -1 Operation not permitted"), "{}", show(&out));
    let out = podman::move_pages(&[], &["--security-opt", "seccomp=unconfined"]);
    assert!(stdout(&out).contains("move_pages 0 ok"), "the contrast: {}", show(&out));

    // `podman exec` is covered: the exec'd process joins the container's accounting.
    let out = podman::run_detached_and_exec(&[], &opts, &["/alloc", "mmap", "4194304", "0"]);
    let (allocated, result) = fixture_result(&out);
    assert_at_quota("podman exec", allocated, &result, 64 * MIB, 4 * MIB);
}
