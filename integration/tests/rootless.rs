//! Rootless podman, as a real non-root user with subordinate ids ([`rootless::USER`]; the test
//! runs as root and drops to it with `setpriv`): the user's own heapcapd, started with no flags,
//! listens in `$XDG_RUNTIME_DIR/heapcap`; both hooks.d files, unchanged but for the hook's path,
//! and `podman --runtime heapcap-runtime` put the user's containers under it; `heapcap ps` with no
//! flags finds it; bad settings and a heapcapd that is not running fail the start with what to do;
//! and no other user can use its sockets.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use heapcap_integration::fixture::{assert_at_quota, fixture_result, parse_allocated, MIB};
use heapcap_integration::ids::unique_id;
use heapcap_integration::process::{run_captured, show, stderr, stdout, TIMEOUT};
use heapcap_integration::rootless::{user, User, UserDaemon};
use serde_json::{json, Value};

/// A container allocating 1 MiB at a time, up to 256 MiB (never without a bound: a container that
/// escaped its quota must not eat the machine).
const ALLOC_1M: &[&str] = &["/alloc", "mmap", "1048576", "268435456"];
const QUOTA: [&str; 2] = ["--annotation", "heapcap.io/limit=64Mi"];
const BAD: [&str; 2] = ["--annotation", "heapcap.io/limit=abc"];
const BAD_REASON: &str = "heapcap.io/limit: 'abc' is not a size";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf()
}

/// `hooks/NAME` as a user installs it: only the hook's path changed (to where the test's binary is).
fn hooks_file(u: &User, name: &str) -> String {
    let mut hook: Value = serde_json::from_slice(&std::fs::read(workspace().join("hooks").join(name)).expect("read"))
        .expect("hooks file is JSON");
    hook["hook"]["path"] = json!(u.binary("heapcap-hook").to_str().expect("utf-8"));
    serde_json::to_string_pretty(&hook).expect("JSON")
}

/// A container held at 64 MiB: what it printed, and the bytes it got before ENOMEM.
fn assert_held(what: &str, out: &Output) -> u64 {
    let (allocated, result) = fixture_result(out);
    assert_at_quota(what, allocated, &result, 64 * MIB, MIB);
    eprintln!("{what}: allocated {allocated} bytes ({} MiB) under 64Mi, then {result}", allocated / MIB);
    allocated
}

/// A container with nothing asked of heapcap: 128 MiB in 4 MiB steps, all of it.
fn assert_untouched(what: &str, out: &Output) {
    assert_eq!(fixture_result(out), (128 * MIB, "ok".to_string()), "{what}: {}", show(out));
}

/// The start failed before the container's program ran.
fn assert_refused(what: &str, out: &Output, needles: &[&str]) {
    assert!(!out.status.success() && !stdout(out).contains("ran"), "{what}: the container ran: {}", show(out));
    for needle in needles {
        assert!(stderr(out).contains(needle), "{what}: podman's error lacks {needle:?}: {}", show(out));
    }
}

/// `heapcap ps --json` as the user, with no socket given; parsed.
fn ps(u: &User) -> Value {
    let out = u.run("heapcap", &["ps", "--json"]);
    assert!(out.status.success(), "heapcap ps as {}: {}", heapcap_integration::rootless::USER, show(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("heapcap ps --json: {e}: {}", show(&out)))
}

/// What `heapcap ps` says to the user when its heapcapd is not running.
fn assert_ps_says_not_running(u: &User) {
    let out = u.run("heapcap", &["ps"]);
    assert!(!out.status.success(), "{}", show(&out));
    let said = stderr(&out);
    let control = u.heapcap_dir.join("control.sock");
    assert!(said.contains(&format!("cannot connect to heapcapd at {}", control.display())), "{}", show(&out));
    assert!(said.contains("as yourself for your rootless ones"), "{}", show(&out));
}

/// The precreate hook installed for the user alone: `~/.config/containers/oci/hooks.d`, named in
/// `~/.config/containers/containers.conf` (podman reads no per-user hooks dir by itself); removed
/// on drop so that the other tests see the user's podman unhooked.
struct UserHooks {
    files: Vec<PathBuf>,
}

impl UserHooks {
    fn install(u: &User) -> UserHooks {
        let dir = u.home.join(".config/containers/oci/hooks.d");
        let hook = dir.join("heapcap-precreate.json");
        u.write_file(&hook, &hooks_file(u, "heapcap-precreate.json"));
        let conf = u.home.join(".config/containers/containers.conf");
        u.write_file(&conf, &format!("[engine]\nhooks_dir = [\"{}\"]\n", dir.display()));
        UserHooks { files: vec![hook, conf] }
    }
}

impl Drop for UserHooks {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

#[test]
fn the_precreate_hook_installed_per_user_holds_rootless_containers() {
    let u = user();
    let _turn = u.exclusive();
    let _hooks = UserHooks::install(u);
    let t = TIMEOUT;

    // heapcapd not running: an annotated container does not start, and the user is told how to
    // start their own; `heapcap ps` says the same. Unannotated containers do not need it.
    let out = u.podman_run(&[], &QUOTA, &["/bin/echo", "ran"], t);
    let agent = u.heapcap_dir.join("heapcapd.sock");
    let unreachable = format!("heapcapd is not reachable at {}", agent.display());
    assert_refused("precreate, heapcapd down", &out, &[&unreachable, "systemctl --user start heapcapd"]);
    assert_ps_says_not_running(u);
    let out = u.podman_run(&[], &[], &["/alloc", "mmap", "4194304", "134217728"], t);
    assert_untouched("unannotated, heapcapd down", &out);

    // The user's heapcapd, no flags: the quota holds.
    let d = UserDaemon::start(u);
    let out = u.podman_run(&[], &QUOTA, ALLOC_1M, t);
    assert_held("rootless podman, precreate hook", &out);
    assert!(d.log().contains("denied"), "heapcapd logged no denial:\n{}", d.log());
    let out = u.podman_run(&[], &[], &["/alloc", "mmap", "4194304", "134217728"], t);
    assert_untouched("unannotated, heapcapd up", &out);

    // `heapcap ps` (no flags) lists a running container with its quota; `podman exec` is held too.
    let name = unique_id("rootless-exec");
    let image = u.image();
    let mut args = vec!["run", "-d", "--rm", "--pull", "never", "--network", "none", "--name", &name];
    args.extend(QUOTA);
    args.extend([image, "/bin/sleep", "120"]);
    let started = u.run("podman", &args);
    assert!(started.status.success(), "{}", show(&started));
    let id = stdout(&started).trim().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let row = loop {
        let listed = ps(u);
        let row = listed["containers"].as_array().and_then(|c| c.iter().find(|c| c["id"] == json!(id)).cloned());
        if let Some(row) = row {
            break row;
        }
        assert!(Instant::now() < deadline, "heapcap ps never listed {id}: {listed}\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(row["limit"], json!(64 * MIB), "{row}");
    let plain = u.run("heapcap", &["ps"]);
    assert!(plain.status.success() && stdout(&plain).contains(&id[..12]), "{}", show(&plain));
    let exec = u.run("podman", &["exec", &name, "/alloc", "mmap", "1048576", "268435456"]);
    assert_held("rootless podman exec, precreate hook", &exec);
    let _ = u.run("podman", &["rm", "-f", "-t", "0", &name]);

    // A bad setting is refused with what to fix.
    let out = u.podman_run(&[], &BAD, &["/bin/echo", "ran"], t);
    assert_refused("precreate, limit=abc", &out, &[BAD_REASON, "e.g. 64Mi"]);
    assert_eq!(stderr(&out).matches(BAD_REASON).count(), 1, "said once: {}", show(&out));
}

#[test]
fn the_prestart_hook_from_a_hooks_dir_holds_rootless_containers() {
    let u = user();
    let _turn = u.exclusive();
    // A hooks dir of the user's (`podman --hooks-dir`), the file unchanged but for the path.
    let dir = std::env::temp_dir().join(unique_id("rootless-hooks"));
    std::fs::create_dir_all(&dir).expect("hooks dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::write(dir.join("heapcap-prestart.json"), hooks_file(u, "heapcap-prestart.json")).expect("write");
    let dir_arg = dir.to_str().expect("utf-8").to_string();
    let t = TIMEOUT;
    let crun = ["--hooks-dir", dir_arg.as_str()];
    // podman with crun shows only crun's last line for a failed hook; with runc, the hook's message.
    let runc = ["--runtime", "runc", "--hooks-dir", dir_arg.as_str()];

    let out = u.podman_run(&runc, &QUOTA, &["/bin/echo", "ran"], t);
    assert_refused("prestart, heapcapd down", &out, &["heapcapd is not reachable", "systemctl --user start heapcapd"]);
    let out = u.podman_run(&crun, &QUOTA, &["/bin/echo", "ran"], t);
    assert_refused("prestart with crun, heapcapd down", &out, &[]);

    let d = UserDaemon::start(u);
    for (what, global) in [("crun", &crun[..]), ("runc", &runc[..])] {
        let out = u.podman_run(global, &QUOTA, ALLOC_1M, t);
        assert_held(&format!("rootless podman ({what}), prestart hook"), &out);
        // No listener inside; the init is not left traced; file mappings are not counted.
        let script = "ls -l /proc/1/fd /proc/self/fd; grep TracerPid /proc/1/status; /alloc filemap 268435456";
        let out = u.podman_run(global, &QUOTA, &["/bin/sh", "-c", script], t);
        let said = stdout(&out);
        assert!(out.status.success() && said.contains("allocated=268435456 result=ok"), "{}", show(&out));
        assert!(!said.contains("seccomp") && said.contains("TracerPid:\t0"), "{}", show(&out));
    }
    let out = u.podman_run(&runc, &BAD, &["/bin/echo", "ran"], t);
    assert_refused("prestart, limit=abc", &out, &[BAD_REASON]);
    assert!(ps(u)["containers"].as_array().is_some_and(|c| c.is_empty()), "{}", d.log());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn heapcap_runtime_as_the_users_podman_runtime() {
    let u = user();
    let _turn = u.exclusive();
    let shim = u.binary("heapcap-runtime");
    let global = ["--runtime", shim.to_str().expect("utf-8")];
    let t = TIMEOUT;

    let out = u.podman_run(&global, &QUOTA, &["/bin/echo", "ran"], t);
    assert_refused("heapcap-runtime, heapcapd down", &out, &["systemctl --user start heapcapd"]);

    let d = UserDaemon::start(u);
    let out = u.podman_run(&global, &QUOTA, ALLOC_1M, t);
    assert_held("rootless podman --runtime heapcap-runtime", &out);
    let out = u.podman_run(&global, &[], &["/alloc", "mmap", "4194304", "134217728"], t);
    assert_untouched("heapcap-runtime, unannotated", &out);
    let out = u.podman_run(&global, &BAD, &["/bin/echo", "ran"], t);
    assert_refused("heapcap-runtime, limit=abc", &out, &[BAD_REASON]);
    assert!(d.log().contains("denied"), "{}", d.log());
}

/// `heapcap ps` against the user's control socket as nobody (uid 65534), with `caps` (setpriv's
/// `--inh-caps`/`--ambient-caps`, e.g. `+dac_override`) if given.
fn as_nobody(program: &Path, args: &[&str], caps: Option<&str>) -> Output {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
    if let Some(caps) = caps {
        cmd.arg(format!("--inh-caps={caps}")).arg(format!("--ambient-caps={caps}"));
    }
    cmd.arg("--").arg(program).args(args).current_dir("/");
    run_captured(cmd, TIMEOUT)
}

/// A peer that connects to a UNIX socket (argv: its path, and `stream` or `seqpacket`: the
/// holder's), sends a line and prints what comes back (or `connect: REASON`, exit 3).
const PEER: &str = r#"
import socket, sys
kind = socket.SOCK_SEQPACKET if sys.argv[2] == 'seqpacket' else socket.SOCK_STREAM
s = socket.socket(socket.AF_UNIX, kind)
s.settimeout(60)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print('connect:', e.strerror, flush=True)
    sys.exit(3)
try:
    s.sendall(b'{"op":"ps"}\n')
    s.shutdown(socket.SHUT_WR)
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        sys.stdout.buffer.write(chunk)
except (ConnectionResetError, BrokenPipeError):
    pass  # refused before its request was read: closed on it
"#;

#[test]
fn no_other_user_can_use_the_users_sockets() {
    let u = user();
    let _turn = u.exclusive();
    let d = UserDaemon::start(u);
    let heapcap = u.binary("heapcap");
    let python = Path::new("/usr/bin/python3");
    let kind = |socket: &Path| if socket == d.holder { "seqpacket" } else { "stream" };

    // Private: the directory is the user's, 0700, and each socket 0600.
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&u.heapcap_dir), 0o700);
    for socket in [&d.agent, &d.control, &d.holder] {
        assert_eq!(mode(socket), 0o600, "{}", socket.display());
        let out = as_nobody(python, &["-c", PEER, socket.to_str().expect("utf-8"), kind(socket)], None);
        assert_eq!(out.status.code(), Some(3), "{}: {}", socket.display(), show(&out));
        assert!(stdout(&out).contains("connect: Permission denied"), "{}", show(&out));
    }
    let control = d.control.to_str().expect("utf-8");
    let out = as_nobody(&heapcap, &["ps", "--control-socket", control], None);
    assert!(!out.status.success() && stderr(&out).contains("Permission denied"), "{}", show(&out));

    // Past the permissions (CAP_DAC_OVERRIDE), heapcapd and the holder check the peer's
    // credentials themselves: only root and the user get in.
    let refusal = format!("uid 65534 refused: only root or the server's own user (uid {}) may connect", u.uid);
    let out = as_nobody(&heapcap, &["ps", "--control-socket", control], Some("+dac_override"));
    assert!(!out.status.success() && stderr(&out).contains(&refusal), "{}", show(&out));
    for socket in [&d.agent, &d.holder] {
        let out =
            as_nobody(python, &["-c", PEER, socket.to_str().expect("utf-8"), kind(socket)], Some("+dac_override"));
        assert!(out.status.success(), "{}: {}", socket.display(), show(&out));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = d.log();
        let agent = log.lines().any(|l| l.contains("agent message not taken") && l.contains(&refusal));
        let holder = log.lines().any(|l| l.contains("heapcap-holder") && l.contains(&refusal));
        if agent && holder {
            break;
        }
        assert!(Instant::now() < deadline, "the agent socket or the holder did not log the refusal:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The user, and root, are served.
    assert!(ps(u)["containers"].is_array());
    let out = run_captured(
        {
            let mut c = Command::new(&heapcap);
            c.args(["ps", "--control-socket", control]);
            c
        },
        TIMEOUT,
    );
    assert!(out.status.success(), "root: {}", show(&out));
    // And heapcapd still serves the user's containers.
    let shim = u.binary("heapcap-runtime");
    let out = u.podman_run(&["--runtime", shim.to_str().expect("utf-8")], &QUOTA, ALLOC_1M, TIMEOUT);
    let (allocated, result) = parse_allocated(&stdout(&out));
    assert_at_quota("after the other user's attempts", allocated, &result, 64 * MIB, MIB);
}

/// examples/systemd/user/heapcapd.service as `systemd-analyze verify --user` reads it as the user
/// (its ExecStart pointed at the test's binary): no warning, and it runs heapcapd with no flags
/// (the defaults the hooks, the shim and the CLI find), keeps the holder across restarts and
/// makes the runtime directory those defaults name. (No systemd runs here to start it: heapcapd
/// with no flags as the user is what the other tests run.)
#[test]
fn the_systemd_user_unit_verifies_and_runs_heapcapd_on_its_defaults() {
    let u = user();
    let text = std::fs::read_to_string(workspace().join("examples/systemd/user/heapcapd.service")).expect("read");
    let key = |k: &str| {
        text.lines().find_map(|l| l.strip_prefix(&format!("{k}="))).unwrap_or_else(|| panic!("no {k}= in the unit"))
    };
    assert_eq!(key("ExecStart"), "/usr/local/bin/heapcapd", "heapcapd on its defaults: no flags");
    assert_eq!(key("KillMode"), "process", "a restart must spare the holder");
    assert_eq!(key("RuntimeDirectory"), heapcap_env::paths::USER_SUBDIR);
    assert_eq!(key("RuntimeDirectoryMode"), "0700");
    assert_eq!(key("RuntimeDirectoryPreserve"), "restart", "the holder's socket lives there across restarts");
    let dir = std::env::temp_dir().join(unique_id("user-unit"));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let unit = dir.join("heapcapd.service");
    let heapcapd = u.binary("heapcapd");
    std::fs::write(&unit, text.replace("/usr/local/bin/heapcapd", heapcapd.to_str().expect("utf-8"))).expect("write");
    let out = u.run("systemd-analyze", &["verify", "--user", unit.to_str().expect("utf-8")]);
    assert!(out.status.success() && out.stderr.is_empty() && out.stdout.is_empty(), "{}", show(&out));
    let _ = std::fs::remove_dir_all(&dir);
}
