//! The committed files under `examples/` are what the code renders today, and say what matters.

use std::path::{Path, PathBuf};

use heapcap_oci::{notify_syscalls_with, ContainersProfile};
use heapcap_policy::ledger::Counting;
use heapcap_policy::rules::Extra;
use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, Spec};

#[allow(dead_code)]
#[path = "../examples/render.rs"]
mod render;

/// podman's default profile, as `examples/podman/seccomp.json` was rendered from.
const PODMAN_DEFAULT: &str = include_str!("../data/containers-common-0.50.1-seccomp.json");

fn example(path: &str) -> (PathBuf, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples").join(path);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    (path, text)
}

fn notifying(profile: &LinuxSeccomp) -> Vec<String> {
    let mut names: Vec<String> = profile
        .syscalls()
        .iter()
        .flatten()
        .filter(|s| s.action() == LinuxSeccompAction::ScmpActNotify)
        .flat_map(|s| s.names().clone())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The calls the examples send heapcapd: heap growth, and `sysinfo` so that programs see their
/// quota as their machine's memory.
const HEAP_CALLS: [&str; 9] =
    ["brk", "execve", "execveat", "mmap", "mmap2", "mprotect", "mremap", "pkey_mprotect", "sysinfo"];

#[test]
fn runc_config_is_current() {
    let (path, committed) = example("runc/config.json");
    let rendered = render::runc_config(render::RUNC_SPEC).unwrap();
    assert!(
        committed == rendered,
        "{} is stale: cargo run -p heapcap-oci --example render -- runc > examples/runc/config.json",
        path.display()
    );
}

#[test]
fn podman_profile_is_current() {
    let (path, committed) = example("podman/seccomp.json");
    let rendered = render::podman_profile(PODMAN_DEFAULT).unwrap();
    assert!(
        committed == rendered,
        "{} is stale: cargo run -p heapcap-oci --example render -- podman \
         crates/heapcap-oci/data/containers-common-0.50.1-seccomp.json > examples/podman/seccomp.json",
        path.display()
    );
}

#[test]
fn runc_config_runs_the_test_program_under_heapcap() {
    let spec: Spec = serde_json::from_str(&example("runc/config.json").1).expect("an OCI runtime spec");
    let process = spec.process().as_ref().unwrap();
    assert_eq!(process.args().as_deref(), Some(&render::ARGS.map(String::from)[..]));
    assert_eq!(process.terminal(), Some(false));
    assert_eq!(spec.root().as_ref().unwrap().path(), Path::new("rootfs"));
    let annotations = spec.annotations().as_ref().unwrap();
    assert_eq!(annotations.get("heapcap.io/limit").map(String::as_str), Some("64Mi"));
    let seccomp = spec.linux().as_ref().unwrap().seccomp().as_ref().unwrap();
    assert_eq!(seccomp.default_action(), LinuxSeccompAction::ScmpActAllow);
    assert_eq!(seccomp.listener_path().as_deref(), Some(Path::new("/run/heapcap/heapcapd.sock")));
    assert_eq!(seccomp.syscalls().as_ref(), Some(&notify_syscalls_with(Counting::Heap, Extra { machine: true })));
    assert_eq!(notifying(seccomp), HEAP_CALLS);
}

#[test]
fn podman_profile_keeps_podmans_and_adds_heapcaps() {
    let text = example("podman/seccomp.json").1;
    let profile: ContainersProfile = serde_json::from_str(&text).expect("a containers seccomp profile");
    let original: ContainersProfile = serde_json::from_str(PODMAN_DEFAULT).unwrap();
    assert_eq!(profile.listener_path.as_deref(), Some(Path::new("/run/heapcap/heapcapd.sock")));
    assert_eq!(profile.default_action, original.default_action);
    assert_eq!(profile.arch_map, original.arch_map);
    // Every entry of the original is still there, less the calls heapcap took over.
    let entries = profile.syscalls.as_ref().unwrap();
    for (before, after) in original.syscalls.as_ref().unwrap().iter().zip(entries) {
        let mut before = before.clone();
        before.names.as_mut().unwrap().retain(|n| !HEAP_CALLS.contains(&n.as_str()));
        assert_eq!(&before, after);
    }
    // Also readable as an OCI LinuxSeccomp (what podman passes on to the runtime looks like this).
    let oci: LinuxSeccomp = serde_json::from_str(&text).expect("parses as an OCI LinuxSeccomp");
    assert_eq!(oci.listener_path(), &profile.listener_path);
    assert_eq!(notifying(&oci), HEAP_CALLS);
    assert_eq!(oci.default_action(), LinuxSeccompAction::ScmpActErrno);
}

/// `key=value` lines of one `[section]` of a systemd unit.
fn unit_section<'a>(text: &'a str, section: &str) -> Vec<(&'a str, &'a str)> {
    let mut current = "";
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name;
        } else if current == section {
            let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("not key=value: {line}"));
            out.push((key.trim(), value.trim()));
        }
    }
    out
}

#[test]
fn systemd_unit_runs_heapcapd_with_what_it_needs() {
    let text = example("systemd/heapcapd.service").1;
    let service = unit_section(&text, "Service");
    let get = |key: &str| service.iter().filter(|(k, _)| *k == key).map(|(_, v)| *v).collect::<Vec<_>>();
    assert_eq!(get("ExecStart"), ["/usr/local/bin/heapcapd"]);
    assert_eq!(get("RuntimeDirectory"), ["heapcap"], "the listenerPath is /run/heapcap/heapcapd.sock");
    assert_eq!(get("RuntimeDirectoryMode"), ["0700"]);
    assert_eq!(get("Restart"), ["on-failure"]);
    assert_eq!(get("KillMode"), ["process"], "a restart must not kill heapcap-holder, which keeps the listener fds");
    let caps = get("CapabilityBoundingSet").join(" ");
    for cap in ["CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"] {
        assert!(caps.split_whitespace().any(|c| c == cap), "{cap} missing: heapcapd reads other processes' /proc");
    }
    for (key, bad) in [("PrivateUsers", "yes"), ("ProtectProc", "invisible"), ("ProcSubset", "pid"), ("User", "")] {
        assert!(
            get(key).iter().all(|v| !v.starts_with(bad) || bad.is_empty() && v.is_empty()),
            "{key}={bad} breaks heapcapd"
        );
    }
    let families = get("RestrictAddressFamilies").join(" ");
    assert!(families.is_empty() || families.split_whitespace().any(|f| f == "AF_UNIX"), "listeners come over AF_UNIX");
    assert_eq!(unit_section(&text, "Install"), [("WantedBy", "multi-user.target")]);
}
