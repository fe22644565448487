//! Strict mode (`heapcap.io/strict: "true"`) in real runc containers: through heapcapd with the
//! strict rules in the bundle's profile (`heapcap_oci::heapcap_profile_for`), and through the
//! runtime shim, which writes them from the annotation (or `HEAPCAP_STRICT=1` in the container's
//! environment), and through the prestart hook, which injects the strict filter. Each way around a
//! heap quota ends at the quota there too, ordinary allocation still reaches it, `heapcap ps` and
//! the metrics say the container is strict, and a bad value (or strict with a profile that sends
//! only the default rules) is refused with the reason. The fixture is `fixtures/strict.c`, static (64-bit and i386), copied
//! into the busybox root filesystem as `/strict` and `/strict32`.

use std::fs;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use heapcap_integration::binaries;
use heapcap_integration::bundle::Bundle;
use heapcap_integration::daemon::Daemon;
use heapcap_integration::fixture::{assert_at_quota, fixture_result, parse_children, MIB};
use heapcap_integration::ids::unique_id;
use heapcap_integration::process::{run_captured, show, stderr, stdout, TIMEOUT};
use heapcap_integration::runtime::Runtime;
use heapcap_policy::ledger::Counting;

const STRICT_STATIC: &str = env!("HEAPCAP_STRICT_FIXTURE_STATIC");
const STRICT32_STATIC: &str = env!("HEAPCAP_STRICT_FIXTURE32_STATIC");
const LIMIT: u64 = 64 * MIB;
const STRICT_ANNOTATIONS: &[(&str, &str)] = &[("heapcap.io/limit", "64Mi"), ("heapcap.io/strict", "true")];

/// Each way around, as the container runs it, and the chunk it takes at a time.
const WAYS: &[&[&str]] = &[
    &["/strict", "memfd", "1048576", "268435456"],
    &["/strict", "shm", "1048576", "268435456"],
    &["/strict", "sharedanon", "1048576", "268435456"],
    &["/strict", "tmpfs", "1048576", "268435456", "/dev/shm"],
    &["/strict", "privfile", "1048576", "268435456", "/tmp"],
];

/// The fixtures, and a writable root (privfile makes its sparse file in `/tmp`).
fn with_fixtures(b: &mut Bundle) {
    b.copy_into_rootfs(STRICT_STATIC, "/strict").copy_into_rootfs(STRICT32_STATIC, "/strict32").readonly_root(false);
}

/// A bundle reporting to `d` with the strict rules and these annotations.
fn strict_bundle(d: &Daemon, annotations: &[(&str, &str)], args: &[&str]) -> Bundle {
    let mut b = Bundle::new("strict");
    let profile = heapcap_oci::heapcap_profile_for(Counting::Strict, &d.agent, None);
    b.args(args).seccomp(serde_json::to_value(profile).expect("profile")).annotations(annotations);
    with_fixtures(&mut b);
    b.write_config();
    b
}

/// Every way around, and two processes in one address space, held at the quota in `run`'s
/// containers.
fn assert_every_way_held(what: &str, run: impl Fn(&[&str]) -> Output) {
    for args in WAYS {
        let out = run(args);
        let (allocated, result) = fixture_result(&out);
        assert_at_quota(&format!("{what}, {}: {}", args[1], show(&out)), allocated, &result, LIMIT, MIB);
    }
    let out = run(&["/strict", "clonevm", "1048576", "268435456"]);
    let (parent, result) = fixture_result(&out);
    let child: u64 = parse_children(&stdout(&out)).iter().map(|(a, _)| a).sum();
    assert_at_quota(&format!("{what}, clonevm: {}", show(&out)), parent + child, &result, LIMIT, 2 * MIB);
    let out = run(&["/strict", "vfork", "1048576", "268435456"]);
    let (parent, result) = fixture_result(&out);
    let child: u64 = parse_children(&stdout(&out)).iter().map(|(a, _)| a).sum();
    assert_at_quota(&format!("{what}, vfork: {}", show(&out)), parent + child, &result, LIMIT, MIB);
    let out = run(&["/strict32", "oldmmap-race", "1048576", "268435456"]);
    assert_eq!(fixture_result(&out), (0, "ENOMEM".to_string()), "{what}, oldmmap-race: {}", show(&out));
    // A mapping that grows with no call is not made at all (the container's profile sends it).
    let out = run(&["/strict", "growsdown", "1048576", "268435456"]);
    assert_eq!(fixture_result(&out), (0, "ENOMEM".to_string()), "{what}, growsdown: {}", show(&out));
    let out = run(&["/alloc", "mmap", "1048576", "0"]);
    let (allocated, result) = fixture_result(&out);
    assert_at_quota(&format!("{what}, ordinary mmap"), allocated, &result, LIMIT, MIB);
}

#[test]
fn runc_through_heapcapd_holds_every_way_around_in_strict_mode() {
    let d = Daemon::start();
    assert_every_way_held("runc, heapcapd", |args| {
        let b = strict_bundle(&d, STRICT_ANNOTATIONS, args);
        let out = b.run(Runtime::Runc, &unique_id("strict"));
        assert!(out.status.success(), "{}\nheapcapd:\n{}", show(&out), d.log());
        out
    });
}

#[test]
fn strict_containers_show_in_ps_and_metrics_and_bad_values_are_refused() {
    let d = Daemon::start();
    let b = strict_bundle(&d, STRICT_ANNOTATIONS, &["/bin/sleep", "60"]);
    let c = b.create(Runtime::Runc, &unique_id("strict-ps"));
    c.start();
    // One notified call opens the account (busybox sleep maps its stack writable at exec).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let container = loop {
        let ps = d.ps();
        let found = ps["containers"].as_array().into_iter().flatten().find(|x| x["id"] == c.id()).cloned();
        if let Some(found) = found {
            break found;
        }
        assert!(std::time::Instant::now() < deadline, "{} not in {ps}", c.id());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(container["strict"], true, "{container}");
    let table = d.heapcap(&["ps"]);
    assert!(stdout(&table).contains("(enforce strict, total limit"), "{}", show(&table));
    let metric =
        format!("heapcap_container_strict{{container=\"{}\",namespace=\"\",pod=\"\",container_name=\"\"}}", c.id());
    assert_eq!(d.metric(&metric), Some(1.0), "{}", d.metrics());

    let bad = strict_bundle(
        &d,
        &[("heapcap.io/limit", "64Mi"), ("heapcap.io/strict", "maybe")],
        &["/alloc", "mmap", "4194304", "0"],
    );
    let out = bad.run(Runtime::Runc, &unique_id("strict-bad"));
    assert!(!out.status.success() && !stdout(&out).contains("allocated="), "{}", show(&out));
    assert!(
        stderr(&out).contains("heapcap.io/strict: 'maybe' is not a yes or a no: write true or false"),
        "{}",
        show(&out)
    );

    // Strict asked with a profile that sends heapcapd only the default rules: it could be stepped
    // around, so it is refused, with what to do.
    let mut heap_rules = d.bundle(STRICT_ANNOTATIONS, &["/strict", "memfd", "1048576", "268435456"]);
    with_fixtures(&mut heap_rules);
    heap_rules.write_config();
    let out = heap_rules.run(Runtime::Runc, &unique_id("strict-heap-rules"));
    assert!(!out.status.success() && !stdout(&out).contains("allocated="), "{}", show(&out));
    assert!(stderr(&out).contains("its seccomp profile sends heapcapd only the default rules"), "{}", show(&out));
}

/// `heapcap-runtime` in front of runc, configured for this heapcapd.
fn shim(d: &Daemon) -> PathBuf {
    let config = d.dir.join(format!("{}.toml", unique_id("shim")));
    fs::write(&config, format!("runtime = \"runc\"\nlistener_path = \"{}\"\n", d.agent.display())).expect("config");
    config
}

fn run_shim(config: &PathBuf, b: &Bundle, id: &str) -> Output {
    let mut cmd = std::process::Command::new(binaries::binary("heapcap-runtime"));
    cmd.env("HEAPCAP_RUNTIME_CONFIG", config).arg("run").arg("--bundle").arg(b.dir()).arg(id);
    let out = run_captured(cmd, TIMEOUT);
    let _ = Runtime::Runc.command().args(["delete", "-f", id]).output();
    out
}

fn plain_bundle(annotations: &[(&str, &str)], args: &[&str]) -> Bundle {
    let mut b = Bundle::new("strict-shim");
    b.args(args).annotations(annotations);
    with_fixtures(&mut b);
    b.write_config();
    b
}

#[test]
fn runc_behind_the_shim_holds_every_way_around_in_strict_mode() {
    let d = Daemon::start();
    let config = shim(&d);
    assert_every_way_held("runc behind the shim", |args| {
        let b = plain_bundle(STRICT_ANNOTATIONS, args);
        let out = run_shim(&config, &b, &unique_id("shim-strict"));
        assert!(out.status.success(), "{}\nheapcapd:\n{}", show(&out), d.log());
        out
    });
    // Docker's way: the container's environment, no annotations.
    let mut b = plain_bundle(&[], &["/strict", "memfd", "1048576", "268435456"]);
    b.env("HEAPCAP_LIMIT", "64Mi").env("HEAPCAP_STRICT", "1");
    b.write_config();
    let out = run_shim(&config, &b, &unique_id("shim-strict-env"));
    let (allocated, result) = fixture_result(&out);
    assert_at_quota(&format!("HEAPCAP_STRICT=1: {}", show(&out)), allocated, &result, LIMIT, MIB);
    // Without strict, the same container keeps the default semantics: memfd is not heap.
    let b = plain_bundle(&[("heapcap.io/limit", "64Mi")], &["/strict", "memfd", "1048576", "268435456"]);
    let out = run_shim(&config, &b, &unique_id("shim-heap"));
    assert_eq!(fixture_result(&out), (256 * MIB, "ok".to_string()), "{}", show(&out));
}

/// The prestart hook injects the strict program when the annotations ask for strict mode.
#[test]
fn the_prestart_hook_injects_the_strict_filter() {
    let d = Daemon::start();
    for (args, strict) in [
        (&["/strict", "memfd", "1048576", "268435456"][..], true),
        (&["/strict", "shm", "1048576", "268435456"][..], true),
        (&["/strict", "memfd", "1048576", "268435456"][..], false),
    ] {
        let mut b = Bundle::new("strict-hook");
        let annotations: &[(&str, &str)] = if strict { STRICT_ANNOTATIONS } else { &STRICT_ANNOTATIONS[..1] };
        b.args(args).hook("prestart", binaries::prestart_hook(&d.agent, &[])).annotations(annotations);
        with_fixtures(&mut b);
        b.write_config();
        let out = b.run(Runtime::Runc, &unique_id("strict-hook"));
        let (allocated, result) = fixture_result(&out);
        if strict {
            assert_at_quota(&format!("prestart hook, {}: {}", args[1], show(&out)), allocated, &result, LIMIT, MIB);
        } else {
            assert_eq!((allocated, result.as_str()), (256 * MIB, "ok"), "not strict: {}", show(&out));
        }
    }
}
