//! `heapcap-hook`: heapcap's OCI hook. Puts a container whose annotations ask for it
//! (`heapcap.io/limit`, `heapcap.io/total-limit`, `heapcap.io/mode`) under heapcapd.
//!
//! `heapcap-hook prestart` (also `createRuntime`, the same moment): the runtime gives the
//! container's state on stdin while its init is paused before running the user's program. The
//! hook installs heapcap's filter into the init with ptrace (x86_64), takes the listener fd and
//! hands it with the state to heapcapd's agent socket, like runc and crun do for
//! `listenerPath`. A container without `heapcap.io/` annotations is left untouched, and so is a
//! Kubernetes pod's sandbox (`heapcap_oci::kubernetes::is_sandbox`), whatever its annotations.
//!
//! Processes started later with `runc exec`/`podman exec` do not inherit the filter: where exec
//! coverage matters, use the container's seccomp profile with `listenerPath` (`heapcap-oci`) or
//! `heapcap-runtime`.
#![forbid(unsafe_code)]

use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use heapcap_env::flag;
use heapcap_env::paths::{how_to_start, Paths};
use heapcap_linux::connect::{connect_within, Unreachable, CONNECT_TIMEOUT};
use heapcap_linux::fdpass::send_fd;
use heapcap_linux::filter::{Extra, Program};
use heapcap_linux::inject::install_listener;
use heapcap_oci::{apply_json, cmdline, kubernetes, Defaults, Outcome};
use heapcap_policy::settings;
use oci_spec::runtime::{State, SECCOMP_FD_NAME};

/// heapcapd's sockets unless given: root's, or under rootless podman (which runs hooks as root in
/// its user namespace, with no environment but the hook's `env`) the user's, in
/// `$XDG_RUNTIME_DIR/heapcap` or else `/run/user/UID/heapcap`.
static DEFAULTS: LazyLock<Paths> = LazyLock::new(|| {
    Paths::for_user(heapcap_linux::userns::host_euid(), std::env::var_os("XDG_RUNTIME_DIR").as_deref())
});

/// heapcap's OCI hook: put a container under heapcapd when its annotations ask for it.
#[derive(Debug, Parser)]
#[command(name = "heapcap-hook", version)]
struct Cli {
    /// heapcapd's agent socket (default: root's heapcapd, or under rootless podman the user's).
    #[arg(long, global = true, env = "HEAPCAP_SOCKET", default_value_os_t = DEFAULTS.agent.clone())]
    socket: PathBuf,
    /// When heapcapd is not running, start the container without a quota (with a warning)
    /// instead of failing its start. Also HEAPCAP_HOOK_ALLOW_UNSUPERVISED=1.
    #[arg(long, global = true)]
    allow_unsupervised: bool,
    /// Print how long the hook took and how long the container's init was stopped.
    /// Also HEAPCAP_HOOK_TIMING=1.
    #[arg(long, global = true)]
    timing: bool,
    #[command(subcommand)]
    stage: Stage,
}

#[derive(Debug, Subcommand)]
enum Stage {
    /// OCI prestart hook (podman turns a hooks.d prestart into createRuntime): the container's
    /// state on stdin; installs the filter into its init and hands the listener to heapcapd.
    #[command(alias = "createRuntime", alias = "create-runtime")]
    Prestart,
    /// podman's precreate stage: the proposed config.json on stdin, the same with heapcap's
    /// notify rules merged into its seccomp profile and `listenerPath` set on stdout (the
    /// runtime then hands the listener to heapcapd itself; `podman exec` is covered too).
    Precreate,
}

/// The flags the environment can also give (read as [`heapcap_env::flag`] reads yes and no: a
/// value that is neither fails the hook with what to write).
fn with_env_flags(mut cli: Cli) -> Result<Cli> {
    cli.allow_unsupervised |= flag::var("HEAPCAP_HOOK_ALLOW_UNSUPERVISED")?;
    cli.timing |= flag::var("HEAPCAP_HOOK_TIMING")?;
    Ok(cli)
}

fn main() -> ExitCode {
    match with_env_flags(Cli::parse()).and_then(|cli| run(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say(&format!("heapcap-hook: {}\n", chain(&e)));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each cause left out whose text the message already has (many of
/// our errors carry their source's text and the source too: `{e:#}` said it two or three times).
fn chain(e: &anyhow::Error) -> String {
    let mut message = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !message.contains(&cause) {
            message = format!("{message}: {cause}");
        }
    }
    message
}

/// Write `message` where the user sees it: our stderr, or, when the runtime sent that to
/// /dev/null (crun does), the runtime's log file (`--log`, what podman reports as the OCI
/// runtime's error) or else the runtime's own stderr (what `crun run` prints).
fn say(message: &str) {
    let discarded = std::fs::read_link("/proc/self/fd/2").is_ok_and(|p| p == Path::new("/dev/null"));
    if discarded && tell_runtime(message) {
        return;
    }
    let _ = std::io::stderr().write_all(message.as_bytes());
}

fn tell_runtime(message: &str) -> bool {
    let parent = std::os::unix::process::parent_id();
    let append = |path: &Path, text: &str| {
        std::fs::OpenOptions::new().append(true).open(path).and_then(|mut f| f.write_all(text.as_bytes())).is_ok()
    };
    let cmdline = std::fs::read(format!("/proc/{parent}/cmdline")).unwrap_or_default();
    if let Some((log, json)) = runtime_log(&cmdline) {
        let text = if json {
            format!("{}\n", serde_json::json!({"msg": message.trim_end(), "level": "error"}))
        } else {
            message.to_string()
        };
        // Through the runtime's root and working directory: the path is the runtime's.
        let path = match log.strip_prefix("/") {
            Ok(abs) => Path::new(&format!("/proc/{parent}/root")).join(abs),
            Err(_) => Path::new(&format!("/proc/{parent}/cwd")).join(log),
        };
        if append(&path, &text) {
            return true;
        }
    }
    // The runtime's (or podman's) own stderr: a copy of its open file, which works whatever owns
    // it (a rootless podman's stderr may be a pipe or a journal socket of another uid, which
    // cannot be opened again through /proc); else opened again through /proc.
    let copied = heapcap_linux::pidfd::Pidfd::open(parent).and_then(|p| p.get_fd(2));
    if let Ok(fd) = copied {
        if std::fs::File::from(fd).write_all(message.as_bytes()).is_ok() {
            return true;
        }
    }
    append(Path::new(&format!("/proc/{parent}/fd/2")), message)
}

/// The runtime's `--log FILE` and whether `--log-format` is json, from its command line as
/// `/proc/<pid>/cmdline` has it (NUL-terminated arguments, argv\[0\] first).
fn runtime_log(cmdline: &[u8]) -> Option<(PathBuf, bool)> {
    let args: Vec<OsString> = cmdline.split(|b| *b == 0).skip(1).map(|a| OsStr::from_bytes(a).to_owned()).collect();
    let invocation = cmdline::inspect(&args);
    invocation.log.map(|log| (log, invocation.log_json))
}

fn run(cli: &Cli) -> Result<()> {
    match cli.stage {
        Stage::Prestart => prestart(cli),
        Stage::Precreate => precreate(cli),
    }
}

fn prestart(cli: &Cli) -> Result<()> {
    let start = Instant::now();
    let mut input = Vec::new();
    std::io::stdin().read_to_end(&mut input).context("cannot read the container's state on stdin")?;
    let state: State = serde_json::from_slice(&input)
        .context("stdin is not an OCI container state: run heapcap-hook as an OCI prestart/createRuntime hook")?;
    let id = state.id();
    let annotations = state.annotations().clone().unwrap_or_default();
    if kubernetes::is_sandbox(annotations.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
        // A pod's sandbox (pause) container: the pod's heapcap.io/ annotations that CRI-O copies to
        // it are for the pod's containers, which get the quota (or fail on a bad setting) themselves.
        return Ok(());
    }
    let wanted = settings::resolve(annotations.iter().map(|(k, v)| (k.as_str(), v.as_str())), None)
        .with_context(|| format!("container {id}: bad heapcap annotation"))?;
    let Some(wanted) = wanted else {
        // Not ours: untouched.
        return Ok(());
    };
    let Some(pid) = state.pid().and_then(|p| u32::try_from(p).ok()).filter(|p| *p > 0) else {
        bail!("container {id}: the runtime gave no pid in the state: heapcap-hook must run as a prestart or createRuntime hook");
    };

    match existing_listener(state.bundle()) {
        // Already sent to heapcapd by the runtime (the precreate hook or heapcap-runtime did it).
        Some(path) if path == cli.socket => return Ok(()),
        Some(path) => bail!(
            "container {id}: its seccomp profile already sends notifications to {} (linux.seccomp.listenerPath): \
             a process can have only one seccomp listener, so heapcap cannot be added by this hook; merge heapcap's \
             rules into that agent's profile, or remove the heapcap.io/ annotations",
            path.display()
        ),
        None => {}
    }

    // Connect first: if heapcapd is down, nothing in the container has been touched.
    let sock = match connect_within(&cli.socket, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(e) if cli.allow_unsupervised => {
            say(&format!(
                "heapcap-hook: warning: container {id} runs WITHOUT a heap quota: heapcapd is not reachable at {} ({e})\n",
                cli.socket.display()
            ));
            return Ok(());
        }
        Err(e) => bail!("{}", not_running(&format!("{id} "), &cli.socket, &e)),
    };

    // A heapcapd that accepts but never reads must not hang the container's start.
    sock.set_write_timeout(Some(Duration::from_secs(5))).context("cannot set a timeout on heapcapd's socket")?;
    // sysinfo too where the container's programs are to see their quota as their machine's memory.
    let program = Program::heap_notify_with(wanted.counting, Extra::of(&wanted))
        .context("cannot build heapcap's seccomp filter")?;
    let injected = install_listener(pid, &program)
        .with_context(|| format!("container {id}: cannot install heapcap's filter into its init (pid {pid})"))?;

    let message = serde_json::json!({
        "ociVersion": state.version(),
        "fds": [SECCOMP_FD_NAME],
        "pid": pid,
        "metadata": "",
        "state": state,
    });
    let data = serde_json::to_vec(&message).context("cannot encode the state")?;
    send_fd(sock.as_fd(), injected.listener.as_fd(), &data)
        .with_context(|| format!("container {id}: cannot hand the listener to heapcapd at {}", cli.socket.display()))?;
    // heapcapd reads until the JSON is complete or we close.
    drop(sock);
    drop(injected.listener);
    if cli.timing {
        say(&format!(
            "heapcap-hook: container {id}: hook took {:.2} ms, init stopped {:.2} ms\n",
            start.elapsed().as_secs_f64() * 1e3,
            injected.stopped.as_secs_f64() * 1e3
        ));
    }
    Ok(())
}

/// The `listenerPath` of the bundle's `config.json`, if it names one (an unreadable config is
/// taken as none: the runtime has read it already).
fn existing_listener(bundle: &Path) -> Option<PathBuf> {
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(bundle.join("config.json")).ok()?).ok()?;
    let path = config["linux"]["seccomp"]["listenerPath"].as_str().filter(|p| !p.is_empty())?;
    Some(PathBuf::from(path))
}

fn precreate(cli: &Cli) -> Result<()> {
    let mut input = Vec::new();
    std::io::stdin().read_to_end(&mut input).context("cannot read the proposed config.json on stdin")?;
    let mut config: serde_json::Value = serde_json::from_slice(&input)
        .context("stdin is not a config.json: run heapcap-hook precreate as a podman precreate hook")?;
    let defaults = Defaults { listener_path: cli.socket.clone(), ..Defaults::default() };
    let original = config.clone();
    let outcome = apply_json(&mut config, &defaults)?;
    if let Outcome::Changed { .. } = outcome {
        // The runtime fails the start if nobody listens, with a bare connect error: say it better.
        if let Err(e) = connect_within(&cli.socket, CONNECT_TIMEOUT) {
            if !cli.allow_unsupervised {
                bail!("{}", not_running("", &cli.socket, &e));
            }
            say(&format!(
                "heapcap-hook: warning: the container runs WITHOUT a heap quota: heapcapd is not reachable at {} ({e})\n",
                cli.socket.display()
            ));
            config = original;
        }
    }
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, &config).context("cannot write the config.json")?;
    out.flush().context("cannot write the config.json")?;
    Ok(())
}

fn not_running(id: &str, socket: &Path, e: &Unreachable) -> String {
    format!(
        "the container {id}asks for a heap quota, but heapcapd is not reachable at {} ({e}): {}, or set \
         HEAPCAP_HOOK_ALLOW_UNSUPERVISED=1 in the hook's env to start such containers without a quota",
        socket.display(),
        how_to_start(&DEFAULTS)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command line as `/proc/<pid>/cmdline` has it.
    fn args(s: &str) -> Vec<u8> {
        s.split(' ').flat_map(|a| a.bytes().chain([0])).collect()
    }

    #[test]
    fn a_cause_is_said_once() {
        let bad = "heapcap.io/limit: 'abc' is not a size";
        let e = anyhow::Error::msg(bad.to_string()).context(format!("bad setting: {bad}"));
        assert_eq!(chain(&e), format!("bad setting: {bad}"));
        let e = anyhow::Error::msg("no socket there").context("heapcapd is not reachable");
        assert_eq!(chain(&e), "heapcapd is not reachable: no socket there");
    }

    #[test]
    fn finds_the_runtimes_log() {
        let podman = args("/usr/bin/crun --log-format=json --log /run/x/oci-log create --bundle /b id");
        assert_eq!(runtime_log(&podman), Some(("/run/x/oci-log".into(), true)));
        assert_eq!(runtime_log(&args("runc --log=log.txt --log-format text run id")), Some(("log.txt".into(), false)));
        assert_eq!(runtime_log(&args("crun run id")), None);
        assert_eq!(runtime_log(b""), None);
    }

    #[test]
    fn the_stages_parse() {
        for stage in ["prestart", "createRuntime", "precreate"] {
            Cli::try_parse_from(["heapcap-hook", stage]).unwrap_or_else(|e| panic!("{stage}: {e}"));
        }
        let cli = Cli::try_parse_from(["heapcap-hook", "prestart", "--allow-unsupervised"]).expect("flag");
        assert!(cli.allow_unsupervised);
        assert!(Cli::try_parse_from(["heapcap-hook", "poststop"]).is_err());
    }
}
