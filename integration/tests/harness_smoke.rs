//! Smoke tests of the container test harness (`integration/src/`),
//! without heapcap: real runc, crun and podman containers run the static
//! allocation fixture and host programs. They prove the harness and the host
//! set-up (`scripts/setup-runtimes.sh`) work before any heapcap test relies
//! on them. Nothing is skipped: a missing runtime, busybox-static or static
//! libc makes them fail with what to install.

use std::process::Command;
use std::time::Duration;

use heapcap_integration::bundle::Bundle;
use heapcap_integration::fixture::{fixture_result, ALLOC, ALLOC_STATIC};
use heapcap_integration::ids::unique_id;
use heapcap_integration::podman;
use heapcap_integration::process::{show, stdout, TIMEOUT};
use heapcap_integration::rootfs;
use heapcap_integration::runtime::Runtime;
use serde_json::json;

/// `alloc mmap 4194304 8388608`: two 4 MiB anonymous mappings.
const ALLOC_8M: [&str; 4] = [ALLOC, "mmap", "4194304", "8388608"];

#[test]
fn static_fixture_is_static_and_runs_on_the_host() {
    let path = std::path::Path::new(ALLOC_STATIC);
    assert!(rootfs::is_static_elf(path).expect("reading the static fixture"), "{ALLOC_STATIC} is not static");
    let out = Command::new(path).args(&ALLOC_8M[1..]).output().expect("running the static fixture");
    assert_eq!(fixture_result(&out), (8388608, "ok".to_string()), "{}", show(&out));
}

fn runs_alloc(runtime: Runtime) {
    let mut bundle = Bundle::new("alloc");
    bundle.args(&ALLOC_8M);
    let out = bundle.run(runtime, &unique_id("alloc"));
    assert_eq!(fixture_result(&out), (8388608, "ok".to_string()), "{}", show(&out));
}

#[test]
fn runc_runs_the_fixture_in_a_busybox_container() {
    runs_alloc(Runtime::Runc);
}

#[test]
fn crun_runs_the_fixture_in_a_busybox_container() {
    runs_alloc(Runtime::Crun);
}

/// create, state, start, exec (twice, with the exit status passed through),
/// annotations in the state, kill, stopped, delete.
fn create_start_exec_kill(runtime: Runtime) {
    let mut bundle = Bundle::new("long");
    bundle.args(&["sh", "-c", "echo ready; exec sleep 600"]).annotation("heapcap.io/limit", "64Mi");
    let container = bundle.create(runtime, &unique_id("long"));
    assert_eq!(container.status(), "created");
    let state = container.state();
    assert_eq!(state["annotations"]["heapcap.io/limit"], "64Mi", "annotations missing from the state: {state}");
    assert!(container.pid() > 1);

    container.start();
    container.wait_for_stdout("ready\n", Duration::from_secs(30));
    assert_eq!(container.status(), "running");

    let out = container.exec(&ALLOC_8M);
    assert_eq!(fixture_result(&out), (8388608, "ok".to_string()), "{}", show(&out));
    let out = container.exec(&["sh", "-c", "echo exec-out; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", show(&out));
    assert_eq!(stdout(&out), "exec-out\n");

    container.kill("KILL");
    container.wait_stopped(Duration::from_secs(30));
    container.delete();
}

#[test]
fn runc_create_start_exec_kill() {
    create_start_exec_kill(Runtime::Runc);
}

#[test]
fn crun_create_start_exec_kill() {
    create_start_exec_kill(Runtime::Crun);
}

/// A seccomp profile given as JSON reaches the runtime: `mkdir` fails with EPERM.
fn seccomp_profile_applies(runtime: Runtime) {
    let mut bundle = Bundle::new("seccomp");
    bundle.readonly_root(false).args(&["sh", "-c", "mkdir /tmp/x && echo made; echo status=$?"]).seccomp(json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
    }));
    let out = bundle.run(runtime, &unique_id("seccomp"));
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(stdout(&out), "status=1\n", "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"), "{}", show(&out));
}

#[test]
fn runc_applies_a_seccomp_profile() {
    seccomp_profile_applies(Runtime::Runc);
}

#[test]
fn crun_applies_a_seccomp_profile() {
    seccomp_profile_applies(Runtime::Crun);
}

fn runs_host_python(runtime: Runtime) {
    let mut bundle = Bundle::new("python");
    bundle.with_host_system().args(&["/usr/bin/python3", "-c", "print(1)"]);
    let out = bundle.run(runtime, &unique_id("python"));
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(stdout(&out), "1\n", "{}", show(&out));
}

#[test]
fn runc_runs_host_python3_from_read_only_host_usr() {
    runs_host_python(Runtime::Runc);
}

#[test]
fn crun_runs_host_python3_from_read_only_host_usr() {
    runs_host_python(Runtime::Crun);
}

#[test]
fn host_system_is_read_only_in_the_container() {
    let mut bundle = Bundle::new("ro-usr");
    bundle.readonly_root(false).with_host_system().args(&["/bin/sh", "-c", "/bin/touch /usr/heapcap-ro-check"]);
    let out = bundle.run(Runtime::Runc, &unique_id("ro-usr"));
    assert!(!out.status.success(), "writing to the host's /usr succeeded:\n{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Read-only file system"), "{}", show(&out));
    assert!(!std::path::Path::new("/usr/heapcap-ro-check").exists());
}

#[test]
fn podman_runs_the_fixture_in_the_imported_image() {
    let out = podman::run(&[], &ALLOC_8M);
    assert_eq!(fixture_result(&out), (8388608, "ok".to_string()), "{}", show(&out));
}

/// podman's global options come first: `podman --runtime runc run ...`
/// (how the heapcap-runtime shim will be tested).
#[test]
fn podman_runs_the_fixture_with_runc_as_its_runtime() {
    let out = podman::run_full(&["--runtime", "runc"], &[], None, &ALLOC_8M, TIMEOUT);
    assert_eq!(fixture_result(&out), (8388608, "ok".to_string()), "{}", show(&out));
}

#[test]
fn podman_passes_options_and_runs_host_python3() {
    let mut opts: Vec<String> = podman::host_system_volumes();
    opts.extend(["--annotation".to_string(), "heapcap.io/limit=64Mi".to_string()]);
    let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
    let out = podman::run(
        &opts,
        &["/usr/bin/python3", "-c", "import resource; print(resource.getrlimit(resource.RLIMIT_NOFILE))"],
    );
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(stdout(&out), "(1024, 1024)\n", "{}", show(&out));
}
