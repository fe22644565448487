//! `heapcap-runtime` in front of the real runtimes: runc and crun directly (quota enforced through a
//! real heapcapd, unannotated containers byte-for-byte untouched, `exec` covered, every other
//! subcommand exactly the runtime's own), podman `--runtime`, and containerd 1.6 with `ctr` and
//! the runc v2 shim (the shim as its runc binary), and Docker 20.10 (`dockerd --add-runtime`, the limit
//! from `docker run -e HEAPCAP_LIMIT=...`). With heapcapd down or wedged, a start fails with how to
//! fix it, or runs unquota'd with `allow_unsupervised`. heapcap's own image (`scripts/image.sh`)
//! loads into podman and Docker as it is (containerd: `tests/cri`).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use heapcap_integration::binaries;
use heapcap_integration::bundle::Bundle;
use heapcap_integration::daemon::{Daemon, Wedged};
use heapcap_integration::fixture::{self, fixture_result, MIB};
use heapcap_integration::ids::unique_id;
use heapcap_integration::podman;
use heapcap_integration::process::{run_captured, show, stderr, stdout, TIMEOUT};
use heapcap_integration::runtime::Runtime;

const ALLOC_4M: &[&str] = &["/alloc", "mmap", "4194304", "0"];

/// `heapcap-runtime`, built once per test process.
fn shim_binary() -> PathBuf {
    binaries::binary("heapcap-runtime")
}

/// A shim configuration for one test: its TOML file, and a wrapper script that runs the shim
/// with `HEAPCAP_RUNTIME_CONFIG` set (for engines that start the runtime with their own env).
struct Shim {
    config: PathBuf,
    wrapper: PathBuf,
}

impl Shim {
    fn new(daemon: &Daemon, runtime: &str, extra: &str) -> Shim {
        let tag = unique_id("shim");
        let config = daemon.dir.join(format!("{tag}.toml"));
        let text = format!("runtime = \"{runtime}\"\nlistener_path = \"{}\"\n{extra}", daemon.agent.display());
        fs::write(&config, text).expect("write shim config");
        let wrapper = daemon.dir.join(format!("{tag}.sh"));
        let script = format!(
            "#!/bin/sh\nexec env HEAPCAP_RUNTIME_CONFIG={} {} \"$@\"\n",
            config.display(),
            shim_binary().display()
        );
        fs::write(&wrapper, script).expect("write wrapper");
        fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).expect("chmod wrapper");
        Shim { config, wrapper }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(shim_binary());
        cmd.env("HEAPCAP_RUNTIME_CONFIG", &self.config);
        cmd
    }
}

fn assert_at_quota(what: &str, out: &Output, limit: u64, chunk: u64) {
    let (allocated, result) = fixture_result(out);
    fixture::assert_at_quota(&format!("{what}: {}", show(out)), allocated, &result, limit, chunk);
}

/// `delete -f` with the real runtime when dropped.
struct Cleanup(Runtime, String, Option<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let mut cmd = self.0.command();
        if let Some(root) = &self.2 {
            cmd.arg("--root").arg(root);
        }
        let _ = cmd.args(["delete", "-f", &self.1]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}

fn bundle(annotations: &[(&str, &str)], args: &[&str]) -> Bundle {
    let mut b = Bundle::new("shim");
    b.args(args).annotations(annotations);
    b.write_config();
    b
}

fn run(shim: &Shim, global: &[&str], b: &Bundle, id: &str) -> Output {
    let mut cmd = shim.command();
    cmd.args(global).arg("run").arg("--bundle").arg(b.dir()).arg(id);
    run_captured(cmd, TIMEOUT)
}

#[test]
fn runc_and_crun_behind_the_shim_enforce_the_annotation() {
    let d = Daemon::start();
    for rt in Runtime::ALL {
        rt.ensure_works();
        let shim = Shim::new(&d, rt.binary(), "");
        let b = bundle(&[("heapcap.io/limit", "64Mi")], ALLOC_4M);
        let id = unique_id("shim-quota");
        let _c = Cleanup(rt, id.clone(), None);
        let out = run(&shim, &[], &b, &id);
        assert!(out.status.success(), "{rt:?}: {}\nheapcapd:\n{}", show(&out), d.log());
        assert_at_quota(&format!("{rt:?} behind the shim"), &out, 64 * MIB, 4 * MIB);
        let config: serde_json::Value = serde_json::from_slice(&fs::read(b.config_path()).unwrap()).unwrap();
        let seccomp = &config["linux"]["seccomp"];
        assert_eq!(seccomp["listenerPath"], d.agent.display().to_string());
        assert_eq!(seccomp["listenerMetadata"], "heapcap.io/limit=64Mi");
        assert_eq!(config["process"]["args"], serde_json::json!(ALLOC_4M), "the rest of the spec is kept");
    }
}

#[test]
fn env_fallback_and_default_limit_reach_heapcapd() {
    let d = Daemon::start();
    // Docker's way: no annotations, HEAPCAP_LIMIT in the container's environment.
    let shim = Shim::new(&d, "runc", "");
    let mut b = bundle(&[], ALLOC_4M);
    b.env("HEAPCAP_LIMIT", "32Mi");
    b.write_config();
    let out = run(&shim, &[], &b, &unique_id("shim-env"));
    assert_at_quota("HEAPCAP_LIMIT=32Mi", &out, 32 * MIB, 4 * MIB);

    // A default limit for every container run with this runtime (crun this time).
    let shim = Shim::new(&d, "crun", "[defaults]\nlimit = \"48Mi\"\n");
    let b = bundle(&[], ALLOC_4M);
    let out = run(&shim, &[], &b, &unique_id("shim-default"));
    assert_at_quota("[defaults] limit = 48Mi", &out, 48 * MIB, 4 * MIB);
    // The annotation overrides the default.
    let b = bundle(&[("heapcap.io/limit", "24Mi")], ALLOC_4M);
    let out = run(&shim, &[], &b, &unique_id("shim-override"));
    assert_at_quota("annotation over the default", &out, 24 * MIB, 4 * MIB);
}

#[test]
fn an_unannotated_container_is_byte_for_byte_untouched() {
    let d = Daemon::start();
    for rt in Runtime::ALL {
        rt.ensure_works();
        let shim = Shim::new(&d, rt.binary(), "");
        let b = bundle(&[("org.example/other", "1")], &["/alloc", "mmap", "4194304", "419430400"]);
        let before = fs::read(b.config_path()).unwrap();
        let out = run(&shim, &[], &b, &unique_id("shim-plain"));
        assert_eq!(fixture_result(&out), (400 * MIB, "ok".to_string()), "{rt:?}: {}", show(&out));
        assert_eq!(fs::read(b.config_path()).unwrap(), before, "{rt:?}: config.json changed");
        let names: Vec<_> = fs::read_dir(b.dir()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(!names.iter().any(|n| n.to_string_lossy().contains("heapcap")), "temp files left: {names:?}");
    }
}

#[test]
fn exec_through_the_shim_is_under_the_quota() {
    let d = Daemon::start();
    for (rt, bundle_flag) in [(Runtime::Runc, "-b"), (Runtime::Crun, "--bundle=")] {
        rt.ensure_works();
        let shim = Shim::new(&d, rt.binary(), "");
        let b = bundle(&[("heapcap.io/limit", "64Mi")], &["/bin/sleep", "60"]);
        let id = unique_id("shim-exec");
        let _c = Cleanup(rt, id.clone(), None);
        let mut create = shim.command();
        let bundle_dir = b.dir().display().to_string();
        if bundle_flag == "-b" {
            create.args(["create", "-b", &bundle_dir, &id]);
        } else {
            create.args(["create", &format!("--bundle={bundle_dir}"), &id]);
        }
        let log = b.dir().join("create.log");
        let status = create
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log).unwrap())
            .stderr(fs::File::create(b.dir().join("create.err")).unwrap())
            .status()
            .unwrap();
        let said = fs::read_to_string(b.dir().join("create.err")).unwrap_or_default();
        assert!(status.success(), "{rt:?}: create {bundle_flag}: {said}\n{}", d.log());
        let mut start = shim.command();
        start.args(["start", &id]);
        let out = run_captured(start, TIMEOUT);
        assert!(out.status.success(), "{rt:?}: {}", show(&out));
        let mut exec = shim.command();
        exec.args(["exec", &id]).args(ALLOC_4M);
        let out = run_captured(exec, TIMEOUT);
        assert_at_quota(&format!("{rt:?} exec through the shim"), &out, 64 * MIB, 4 * MIB);
    }
}

/// Run the same command line through the shim and through the runtime.
fn both(shim: &Shim, rt: Runtime, args: &[&str]) -> (Output, Output) {
    let mut via = shim.command();
    via.args(args);
    let mut direct = rt.command();
    direct.args(args);
    (run_captured(via, TIMEOUT), run_captured(direct, TIMEOUT))
}

fn assert_same(what: &str, (via, direct): (Output, Output)) {
    assert_eq!(
        via.status.code(),
        direct.status.code(),
        "{what}: exit status\nshim: {}\nruntime: {}",
        show(&via),
        show(&direct)
    );
    assert_eq!(stdout(&via), stdout(&direct), "{what}: stdout");
    assert_eq!(untimed(&stderr(&via)), untimed(&stderr(&direct)), "{what}: stderr");
}

/// runc's log lines without their `time="..."` field: the two runs may fall in different seconds.
fn untimed(text: &str) -> String {
    text.lines()
        .map(|l| match (l.find("time=\""), l.find("\" level=")) {
            (Some(a), Some(b)) if a < b => format!("{}{}", &l[..a], &l[b + 2..]),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn other_subcommands_are_the_runtimes_own() {
    let d = Daemon::start();
    for rt in Runtime::ALL {
        rt.ensure_works();
        let shim = Shim::new(&d, rt.binary(), "");
        let root = d.dir.join(unique_id("root"));
        let root_s = root.display().to_string();
        let g = |args: &[&str]| -> Vec<String> {
            ["--root", root_s.as_str()].iter().chain(args).map(|s| s.to_string()).collect()
        };
        let both_g = |args: &[&str]| {
            let a = g(args);
            both(&shim, rt, &a.iter().map(String::as_str).collect::<Vec<_>>())
        };
        assert_same(&format!("{rt:?} --version"), both(&shim, rt, &["--version"]));
        assert_same(&format!("{rt:?} frobnicate"), both_g(&["frobnicate", "x"]));
        assert_same(&format!("{rt:?} state of nothing"), both_g(&["state", "no-such-container"]));
        assert_same(&format!("{rt:?} list (empty)"), both_g(&["list"]));

        let b = bundle(&[], &["/bin/sleep", "60"]);
        let id = unique_id("shim-sub");
        let _c = Cleanup(rt, id.clone(), Some(root.clone()));
        let mut create = shim.command();
        create.args(g(&["create", "--bundle", &b.dir().display().to_string(), &id]));
        let status = create.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status().unwrap();
        assert!(status.success(), "{rt:?}: create through the shim failed");
        assert_same(&format!("{rt:?} state"), both_g(&["state", &id]));
        assert_same(&format!("{rt:?} list"), both_g(&["list"]));
        let mut kill = shim.command();
        kill.args(g(&["kill", &id, "KILL"]));
        let out = run_captured(kill, TIMEOUT);
        assert!(out.status.success(), "{rt:?} kill: {}", show(&out));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut state = rt.command();
            state.args(g(&["state", &id]));
            let out = run_captured(state, TIMEOUT);
            if stdout(&out).contains("\"stopped\"") {
                break;
            }
            assert!(Instant::now() < deadline, "{rt:?}: not stopped after kill: {}", show(&out));
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut delete = shim.command();
        delete.args(g(&["delete", &id]));
        let out = run_captured(delete, TIMEOUT);
        assert!(out.status.success(), "{rt:?} delete: {}", show(&out));
        assert_same(&format!("{rt:?} delete again"), both_g(&["delete", &id]));
    }
}

#[test]
fn bad_settings_fail_create_with_the_reason() {
    let d = Daemon::start();
    for rt in Runtime::ALL {
        let shim = Shim::new(&d, rt.binary(), "");
        let b = bundle(&[("heapcap.io/limit", "lots")], ALLOC_4M);
        let before = fs::read(b.config_path()).unwrap();
        let log = b.dir().join("runtime-log.json");
        let id = unique_id("shim-bad");
        let _c = Cleanup(rt, id.clone(), None);
        let mut cmd = shim.command();
        cmd.arg("--log").arg(&log).args(["--log-format", "json", "create", "--bundle"]).arg(b.dir()).arg(&id);
        let out = run_captured(cmd, TIMEOUT);
        assert_eq!(out.status.code(), Some(1), "{rt:?}: {}", show(&out));
        assert!(stderr(&out).contains("heapcap.io/limit: 'lots' is not a size"), "{rt:?}: {}", show(&out));
        assert_eq!(fs::read(b.config_path()).unwrap(), before, "config.json untouched");
        let logged = fs::read_to_string(&log).expect("the error is in the --log file");
        let line: serde_json::Value = serde_json::from_str(logged.lines().last().unwrap()).unwrap();
        assert_eq!(line["level"], "error");
        assert!(line["msg"].as_str().unwrap().contains("'lots' is not a size"), "{logged}");
    }
    // An unreadable bundle.
    let shim = Shim::new(&d, "runc", "");
    let mut cmd = shim.command();
    cmd.args(["create", "--bundle", "/nonexistent/bundle", "x"]);
    let out = run_captured(cmd, TIMEOUT);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(stderr(&out).contains("/nonexistent/bundle/config.json"), "{}", show(&out));
}

/// Runs `RUNTIME(shim) --log LOG --log-format json run` of a container that asks for 64Mi and
/// would allocate 128 MiB; the output and what the shim logged.
fn run_asking_for_64mi(shim: &Shim, rt: Runtime, allow_env: bool) -> (Output, Bundle, Vec<u8>, String) {
    let b = bundle(&[("heapcap.io/limit", "64Mi")], &["/alloc", "mmap", "4194304", "134217728"]);
    let before = fs::read(b.config_path()).unwrap();
    let log = b.dir().join("runtime-log.json");
    let id = unique_id("shim-down");
    let _c = Cleanup(rt, id.clone(), None);
    let mut cmd = shim.command();
    cmd.env_remove("HEAPCAP_ALLOW_UNSUPERVISED");
    if allow_env {
        cmd.env("HEAPCAP_ALLOW_UNSUPERVISED", "1");
    }
    cmd.arg("--log").arg(&log).args(["--log-format", "json", "run", "--bundle"]).arg(b.dir()).arg(&id);
    // The harness's deadline: a start that hangs fails the test.
    let out = run_captured(cmd, TIMEOUT);
    (out, b, before, fs::read_to_string(&log).unwrap_or_default())
}

/// The start failed before the container's program ran, with how to fix it on stderr and in the
/// runtime's `--log`, and config.json was not touched.
fn assert_refused(what: &str, (out, b, before, log): &(Output, Bundle, Vec<u8>, String), agent: &Path, why: &str) {
    assert_eq!(out.status.code(), Some(1), "{what}: {}", show(out));
    assert!(!stdout(out).contains("allocated="), "{what}: the container's program ran: {}", show(out));
    let said = stderr(out);
    let unreachable = format!("heapcapd is not reachable at {} ({why}", agent.display());
    for needle in [unreachable.as_str(), "start heapcapd", "allow_unsupervised = true", "HEAPCAP_ALLOW_UNSUPERVISED=1"]
    {
        assert!(said.contains(needle), "{what}: no {needle:?} on stderr: {}", show(out));
    }
    let line: serde_json::Value = serde_json::from_str(log.lines().last().unwrap_or_else(|| panic!("{what}: no log")))
        .unwrap_or_else(|e| panic!("{what}: {e}: {log}"));
    assert_eq!(line["level"], "error", "{what}: {log}");
    assert!(line["msg"].as_str().unwrap_or_default().contains(&unreachable), "{what}: {log}");
    assert_eq!(&fs::read(b.config_path()).unwrap(), before, "{what}: config.json changed");
}

/// Started anyway, without a quota (128 MiB past the 64Mi it asked for), with the warning, from
/// the untouched config.json.
fn assert_unquotad(what: &str, (out, b, before, log): &(Output, Bundle, Vec<u8>, String), agent: &Path) {
    assert!(out.status.success(), "{what}: {}", show(out));
    assert_eq!(fixture_result(out), (128 * MIB, "ok".to_string()), "{what}: unquota'd: {}", show(out));
    let warning =
        format!("WITHOUT a heap quota (heapcap.io/limit=64Mi): heapcapd is not reachable at {}", agent.display());
    assert!(stderr(out).contains(&warning), "{what}: no warning: {}", show(out));
    assert!(log.contains("\"level\":\"warning\"") && log.contains("WITHOUT a heap quota"), "{what}: {log}");
    assert_eq!(&fs::read(b.config_path()).unwrap(), before, "{what}: config.json changed");
}

#[test]
fn heapcapd_down_fails_the_start_unless_allowed() {
    let mut d = Daemon::start();
    // heapcapd stopped as a service manager stops it: the shims' listener_path takes no connection.
    d.stop();
    assert!(std::os::unix::net::UnixStream::connect(&d.agent).is_err(), "heapcapd still answers");
    for rt in Runtime::ALL {
        rt.ensure_works();
        let strict = Shim::new(&d, rt.binary(), "");
        let allowing = Shim::new(&d, rt.binary(), "allow_unsupervised = true\n");
        assert_refused(&format!("{rt:?}, heapcapd down"), &run_asking_for_64mi(&strict, rt, false), &d.agent, "");
        let out = run_asking_for_64mi(&allowing, rt, false);
        assert_unquotad(&format!("{rt:?}, allow_unsupervised = true"), &out, &d.agent);
        let out = run_asking_for_64mi(&strict, rt, true);
        assert_unquotad(&format!("{rt:?}, HEAPCAP_ALLOW_UNSUPERVISED=1"), &out, &d.agent);
        // A container that asks for nothing does not need heapcapd.
        let b = bundle(&[], &["/alloc", "mmap", "4194304", "134217728"]);
        let out = run(&strict, &[], &b, &unique_id("shim-down-plain"));
        assert_eq!(fixture_result(&out), (128 * MIB, "ok".to_string()), "{rt:?}: {}", show(&out));
        assert!(!stderr(&out).contains("heapcap"), "{rt:?}: {}", show(&out));
    }

    // podman --runtime shows the reason as a runtime error (not as "command not found", which it
    // makes of "No such file or directory"), and runs the container unquota'd when allowed.
    let asks = ["--annotation", "heapcap.io/limit=64Mi"];
    let alloc_128m = ["/alloc", "mmap", "4194304", "134217728"];
    let strict = Shim::new(&d, "crun", "");
    let global = ["--runtime", strict.wrapper.to_str().unwrap()];
    let out = podman::run_full(&global, &asks, None, &alloc_128m, TIMEOUT);
    assert!(!out.status.success() && !stdout(&out).contains("allocated="), "podman: {}", show(&out));
    assert!(
        stderr(&out).contains("heapcapd is not reachable") && stderr(&out).contains("start heapcapd"),
        "{}",
        show(&out)
    );
    assert!(!stderr(&out).contains("not found"), "podman: {}", show(&out));
    let allowing = Shim::new(&d, "crun", "allow_unsupervised = true\n");
    let global = ["--runtime", allowing.wrapper.to_str().unwrap()];
    let out = podman::run_full(&global, &asks, None, &alloc_128m, TIMEOUT);
    assert_eq!(fixture_result(&out), (128 * MIB, "ok".to_string()), "podman, allowed: {}", show(&out));

    // A heapcapd that accepts nothing (backlog full): the shim gives up after its connect
    // timeout instead of letting the runtime hang (crun blocks in connect).
    let wedged = Wedged::at(&d.agent);
    for rt in Runtime::ALL {
        let strict = Shim::new(&d, rt.binary(), "");
        let allowing = Shim::new(&d, rt.binary(), "allow_unsupervised = true\n");
        let why = "it accepted no connection within 5 s";
        assert_refused(&format!("{rt:?}, heapcapd wedged"), &run_asking_for_64mi(&strict, rt, false), &d.agent, why);
        let out = run_asking_for_64mi(&allowing, rt, false);
        assert_unquotad(&format!("{rt:?}, heapcapd wedged, allow_unsupervised = true"), &out, &d.agent);
    }
    drop(wedged);

    // heapcapd back: the same shim config enforces again.
    d.restart(None);
    let shim = Shim::new(&d, "crun", "allow_unsupervised = true\n");
    let b = bundle(&[("heapcap.io/limit", "64Mi")], ALLOC_4M);
    let out = run(&shim, &[], &b, &unique_id("shim-back"));
    assert_at_quota("heapcapd back, allow_unsupervised = true", &out, 64 * MIB, 4 * MIB);
    assert!(!stderr(&out).contains("WITHOUT"), "{}", show(&out));
}

#[test]
fn podman_with_the_shim_as_its_runtime() {
    let d = Daemon::start();
    let shim = Shim::new(&d, "runc", "");
    let wrapper = shim.wrapper.display().to_string();
    let global = ["--runtime", wrapper.as_str()];
    // podman's default seccomp profile is in config.json: the notify rules are merged into it.
    let out = podman::run_full(&global, &["--annotation", "heapcap.io/limit=64Mi"], None, ALLOC_4M, TIMEOUT);
    assert_at_quota("podman --runtime heapcap-runtime", &out, 64 * MIB, 4 * MIB);
    let out = podman::run_full(&global, &[], None, &["/alloc", "mmap", "4194304", "419430400"], TIMEOUT);
    assert_eq!(fixture_result(&out), (400 * MIB, "ok".to_string()), "no annotation: {}", show(&out));
    let out = podman::run_full(&global, &["--annotation", "heapcap.io/mode=strict"], None, &["true"], TIMEOUT);
    assert!(!out.status.success(), "{}", show(&out));
    assert!(stderr(&out).contains("enforce or audit"), "podman shows the shim's reason: {}", show(&out));
}

/// heapcap's own image as `scripts/image.sh` builds it, once per test process: (the archive, its
/// name as the archive's `docker save` manifest gives it).
fn heapcap_image() -> &'static (PathBuf, String) {
    static IMAGE: OnceLock<(PathBuf, String)> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let archive = Path::new(env!("CARGO_TARGET_TMPDIR")).join("heapcap-image-runtime-shim.tar");
        let mut cmd = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/image.sh"));
        cmd.arg("--out").arg(&archive);
        let out = run_captured(cmd, Duration::from_secs(1200));
        assert!(out.status.success(), "scripts/image.sh: {}", show(&out));
        let manifest = Command::new("tar").arg("-xOf").arg(&archive).arg("manifest.json").output().unwrap();
        let manifest: serde_json::Value = serde_json::from_slice(&manifest.stdout).expect("manifest.json");
        (archive, manifest[0]["RepoTags"][0].as_str().expect("a name").to_string())
    })
}

#[test]
fn heapcaps_image_loads_in_podman() {
    let (archive, name) = heapcap_image();
    let mut load = podman::command();
    load.arg("load").arg("-i").arg(archive);
    let out = run_captured(load, TIMEOUT);
    assert!(out.status.success() && stdout(&out).contains(&format!("Loaded image: {name}")), "{}", show(&out));
    let mut run = podman::command();
    run.args(["run", "--rm", "--network", "none", name, "/bin/sh", "-c", "heapcapd --version; heapcap --version"]);
    let out = run_captured(run, TIMEOUT);
    let mut rmi = podman::command();
    rmi.args(["rmi", name]);
    let removed = run_captured(rmi, TIMEOUT);
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(stdout(&out), format!("heapcapd {version}\nheapcap {version}\n"), "{}", show(&out));
    assert!(removed.status.success(), "{}", show(&removed));
}

// ------------------------------------------------------------------ containerd

/// A containerd of our own: private root, state and socket; stopped on drop.
struct Containerd {
    child: std::process::Child,
    dir: PathBuf,
    address: PathBuf,
}

impl Containerd {
    fn start() -> Containerd {
        let dir = PathBuf::from(format!("/tmp/hc-ctrd-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let address = dir.join("c.sock");
        let config = dir.join("config.toml");
        fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{1}\"\n[ttrpc]\n  address = \"{1}.ttrpc\"\n\
                 [debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n",
                dir.display(),
                address.display()
            ),
        )
        .unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("containerd.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("the containerd tests need containerd (scripts/setup-engines.sh): {e}"));
        let c = Containerd { child, dir, address };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&c.address).is_err() {
            assert!(Instant::now() < deadline, "containerd did not come up:\n{}", c.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        c
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(&self.address).args(["--namespace", "heapcap-test"]);
        cmd
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // SAFETY: kill only sends a signal to the containerd child this struct started.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn containerd_runs_the_shim_as_the_runc_binary() {
    let d = Daemon::start();
    let shim = Shim::new(&d, "runc", "");
    let image = podman::image();
    let c = Containerd::start();
    let archive = c.dir.join("image.tar");
    let mut save = podman::command();
    save.args(["save", "--format", "docker-archive", "-o"]).arg(&archive).arg(image);
    let out = run_captured(save, TIMEOUT);
    assert!(out.status.success(), "podman save: {}", show(&out));
    let mut import = c.ctr();
    import.args(["images", "import", "--snapshotter", "native"]).arg(&archive);
    let out = run_captured(import, TIMEOUT);
    assert!(out.status.success(), "ctr images import: {}\n{}", show(&out), c.log());
    let mut ls = c.ctr();
    ls.args(["images", "ls", "-q"]);
    let out = run_captured(ls, TIMEOUT);
    let name = stdout(&out).lines().next().map(str::to_string).unwrap_or_else(|| panic!("no image: {}", show(&out)));

    let wrapper = shim.wrapper.display().to_string();
    let ctr_run = |extra: &[&str], args: &[&str]| {
        let mut run = c.ctr();
        run.args(["run", "--rm", "--snapshotter", "native", "--runc-binary", &wrapper]).args(extra);
        run.args([name.as_str(), unique_id("ctr").as_str()]).args(args);
        run_captured(run, TIMEOUT)
    };
    let out = ctr_run(&["--annotation", "heapcap.io/limit=64Mi"], ALLOC_4M);
    assert!(out.status.success(), "{}\ncontainerd:\n{}\nheapcapd:\n{}", show(&out), c.log(), d.log());
    assert_at_quota("ctr run --runc-binary heapcap-runtime", &out, 64 * MIB, 4 * MIB);
    // containerd's own default seccomp profile (--seccomp): merged, still enforced.
    let out = ctr_run(&["--seccomp", "--annotation", "heapcap.io/limit=32Mi"], ALLOC_4M);
    assert_at_quota("ctr run --seccomp", &out, 32 * MIB, 4 * MIB);
    // No annotation: no quota.
    let out = ctr_run(&[], &["/alloc", "mmap", "4194304", "419430400"]);
    assert_eq!(fixture_result(&out), (400 * MIB, "ok".to_string()), "{}", show(&out));
    // A bad annotation fails the start with the shim's reason, as containerd reports it.
    let out = ctr_run(&["--annotation", "heapcap.io/limit=lots"], &["true"]);
    assert!(!out.status.success(), "{}", show(&out));
    assert!(stderr(&out).contains("'lots' is not a size"), "ctr shows the reason: {}", show(&out));
}

#[test]
fn containerd_loads_the_1x_example_config() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/containerd/config-1.x.toml");
    let mut dump = Command::new("containerd");
    dump.arg("--config").arg(&example).args(["config", "dump"]);
    let out = run_captured(dump, TIMEOUT);
    assert!(out.status.success(), "containerd config dump: {}", show(&out));
    let text = stdout(&out);
    let section = text
        .split("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.heapcap]")
        .nth(1)
        .unwrap_or_else(|| panic!("containerd does not see the heapcap runtime: {text}"));
    let section = section.split("untrusted_workload_runtime").next().unwrap();
    for line in [
        "pod_annotations = [\"heapcap.io/*\"]",
        "runtime_type = \"io.containerd.runc.v2\"",
        "BinaryName = \"/usr/local/bin/heapcap-runtime\"",
    ] {
        assert!(section.contains(line), "containerd's view lacks {line}: {section}");
    }
}

// ------------------------------------------------------------------ Docker

/// A dockerd of our own (Debian's docker.io, 20.10): private data root, exec root and socket, no
/// networking, vfs storage, `--add-runtime heapcap=<shim>`; stopped on drop.
struct Dockerd {
    child: std::process::Child,
    dir: PathBuf,
    host: String,
}

impl Dockerd {
    fn start(runtime: &Path) -> Dockerd {
        let dir = PathBuf::from(format!("/tmp/hc-dockerd-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let host = format!("unix://{}/docker.sock", dir.display());
        let child = Command::new("dockerd")
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("docker.pid"))
            .args(["-H", &host, "--bridge", "none", "--iptables=false", "--ip6tables=false", "--ip-masq=false"])
            .args(["--storage-driver", "vfs", "--add-runtime"])
            .arg(format!("heapcap={}", runtime.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("dockerd.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("the Docker test needs dockerd (scripts/setup-engines.sh): {e}"));
        let d = Dockerd { child, dir, host };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = d.docker().args(["version", "--format", "{{.Server.Version}}"]).output().expect("docker client");
            if out.status.success() {
                break;
            }
            assert!(Instant::now() < deadline, "dockerd did not come up:\n{}", d.log());
            std::thread::sleep(Duration::from_millis(200));
        }
        d
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }

    fn docker(&self) -> Command {
        let mut cmd = Command::new("docker");
        cmd.args(["-H", &self.host]);
        cmd
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // SAFETY: kill only sends a signal to the dockerd child this struct started.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
        // dockerd bind-mounts its data root onto itself.
        let _ = Command::new("umount").arg("-l").arg(self.dir.join("data")).stderr(Stdio::null()).status();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn docker_with_the_shim_as_a_runtime_reads_heapcap_limit() {
    let d = Daemon::start();
    let shim = Shim::new(&d, "runc", "");
    let image = podman::image();
    let docker = Dockerd::start(&shim.wrapper);
    let archive = docker.dir.join("image.tar");
    let mut save = podman::command();
    save.args(["save", "--format", "docker-archive", "-o"]).arg(&archive).arg(image);
    let out = run_captured(save, TIMEOUT);
    assert!(out.status.success(), "podman save: {}", show(&out));
    let mut load = docker.docker();
    load.arg("load").arg("-i").arg(&archive);
    let out = run_captured(load, TIMEOUT);
    assert!(out.status.success(), "docker load: {}\n{}", show(&out), docker.log());

    let docker_run = |opts: &[&str], args: &[&str]| {
        let mut run = docker.docker();
        run.args(["run", "--rm", "--network", "none", "--runtime", "heapcap"]).args(opts).arg(image).args(args);
        run_captured(run, TIMEOUT)
    };
    // Docker's default seccomp profile is in config.json: the rules are merged into it.
    let out = docker_run(&["-e", "HEAPCAP_LIMIT=64Mi"], ALLOC_4M);
    assert!(out.status.success(), "{}\ndockerd:\n{}\nheapcapd:\n{}", show(&out), docker.log(), d.log());
    assert_at_quota("docker run --runtime heapcap -e HEAPCAP_LIMIT=64Mi", &out, 64 * MIB, 4 * MIB);
    let out = docker_run(&["-e", "HEAPCAP_LIMIT=32Mi", "--security-opt", "seccomp=unconfined"], ALLOC_4M);
    assert_at_quota("docker, seccomp=unconfined", &out, 32 * MIB, 4 * MIB);
    let out = docker_run(&[], &["/alloc", "mmap", "4194304", "419430400"]);
    assert_eq!(fixture_result(&out), (400 * MIB, "ok".to_string()), "no HEAPCAP_LIMIT: {}", show(&out));
    let out = docker_run(&["-e", "HEAPCAP_LIMIT=lots"], &["true"]);
    assert!(!out.status.success(), "{}", show(&out));
    assert!(stderr(&out).contains("HEAPCAP_LIMIT: heapcap.io/limit: 'lots' is not a size"), "{}", show(&out));

    // heapcap's own image (scripts/image.sh; the DaemonSet's) loads into Docker 20.10 as it is.
    let (archive, name) = heapcap_image();
    let mut load = docker.docker();
    load.arg("load").arg("-i").arg(archive);
    let out = run_captured(load, TIMEOUT);
    assert!(out.status.success() && stdout(&out).contains(&format!("Loaded image: {name}")), "{}", show(&out));
    let mut run = docker.docker();
    run.args(["run", "--rm", "--network", "none", name, "/opt/heapcap/bin/heapcapd", "--version"]);
    let out = run_captured(run, TIMEOUT);
    assert_eq!(stdout(&out), format!("heapcapd {}\n", env!("CARGO_PKG_VERSION")), "{}", show(&out));
}
