//! `heapcap-runtime`: a runc-compatible runtime that puts containers under heapcap, for engines
//! without OCI hooks (containerd and Kubernetes RuntimeClass, Docker) and for podman `--runtime`.
//!
//! It takes exactly runc's command line. On `create` and `run` it applies heapcap's spec change
//! ([`heapcap_oci::spec`]) to the bundle's `config.json` when the container asks for heapcap
//! (annotations `heapcap.io/*`, env `HEAPCAP_LIMIT`..., or the config file's defaults), then execs
//! the real runtime with the same arguments (a Kubernetes pod's sandbox, the pause container, is
//! never changed: [`heapcap_oci::kubernetes`]); every other invocation is an exec of the real runtime
//! straight away, so output and exit status are the runtime's own. Configuration: [`config`].
//!
//! An error of the shim itself (unreadable bundle, bad settings, a profile heapcap cannot merge
//! into) fails the command with exit status 1, a message on stderr, and the same message in the
//! runtime's `--log` file (in `--log-format`), where containerd looks for a runtime's last error.
//!
//! A container that asks for heapcap is created only if heapcapd takes connections on its agent
//! socket ([`heapcap_linux::connect::connect_within`]); otherwise the `create` fails before `config.json` is touched,
//! saying how to start heapcapd, or, with `allow_unsupervised` ([`config`]), the runtime runs the
//! container from its untouched `config.json`, without a quota, after a warning on stderr and in
//! the `--log` file.
#![forbid(unsafe_code)]

mod bundle;
mod config;

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::anyhow;
use heapcap_env::paths::{how_to_start, Paths};
use heapcap_linux::connect::{connect_within, Unreachable, CONNECT_TIMEOUT};
use heapcap_oci::cmdline::{self, Invocation};
use heapcap_oci::spec::Outcome;

use crate::bundle::Plan;
use crate::config::Config;

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let invocation = cmdline::inspect(&args);
    match run(&args, &invocation) {
        Ok(never) => match never {},
        Err(e) => {
            let message = e.to_string();
            eprintln!("{message}");
            log_line(&invocation, "error", &message);
            ExitCode::FAILURE
        }
    }
}

/// Prepare the bundle if this creates a container, then become the real runtime.
fn run(args: &[OsString], invocation: &Invocation) -> anyhow::Result<std::convert::Infallible> {
    let config_env = std::env::var_os(config::ENV);
    let config = Config::load(config_env.as_deref())?;
    let runtime = find_runtime(&config)?;
    if invocation.creates() {
        let bundle = invocation.bundle.as_deref().unwrap_or(Path::new("."));
        // Run by rootless podman, the shim is root in podman's user namespace: the user's heapcapd.
        let paths = Paths::for_user(heapcap_linux::userns::host_euid(), std::env::var_os("XDG_RUNTIME_DIR").as_deref());
        let defaults = config.defaults(&paths.agent);
        let plan = bundle::plan(bundle, &defaults)?;
        let allow = config.allow_unsupervised(std::env::var_os(config::ALLOW_UNSUPERVISED_ENV).as_deref())?;
        let start = how_to_start(&paths);
        match check_heapcapd(&plan, &defaults.listener_path, allow, &Config::path(config_env.as_deref()), start)? {
            Supervision::Supervised => {
                plan.write()?;
            }
            Supervision::Unsupervised(warning) => {
                eprintln!("{warning}");
                log_line(invocation, "warning", &warning);
            }
        }
    }
    let err = Command::new(&runtime).args(args).exec();
    Err(anyhow!("heapcap-runtime: cannot run {}: {err}", runtime.display()))
}

/// How a container that [`check_heapcapd`] lets through is created.
#[derive(Debug)]
enum Supervision {
    /// As planned: heapcapd is reachable, or the container does not need it.
    Supervised,
    /// From the untouched `config.json`, without a quota; the warning to give.
    Unsupervised(String),
}

/// When the container needs heapcapd (it asks for heapcap, or its `config.json` already names
/// heapcapd's socket as its listener), whether heapcapd takes connections, and what to do if not:
/// an error saying how to fix it, or with `allow` (and a container the shim would change) a
/// start without a quota.
/// `start` says how to start heapcapd ([`how_to_start`]).
fn check_heapcapd(
    plan: &Plan,
    socket: &Path,
    allow: bool,
    config_file: &Path,
    start: &str,
) -> anyhow::Result<Supervision> {
    let asks = match &plan.outcome {
        Outcome::Changed { metadata, .. } => Some(metadata),
        Outcome::Unchanged => None,
    };
    let listens_already = plan.listener_path.as_deref() == Some(socket);
    if asks.is_none() && !listens_already {
        return Ok(Supervision::Supervised);
    }
    // A connect and a close: heapcapd takes a connection closed without a message as nothing.
    let why: Unreachable = match connect_within(socket, CONNECT_TIMEOUT) {
        Ok(_) => return Ok(Supervision::Supervised),
        Err(why) => why,
    };
    let socket = socket.display();
    let config_file = config_file.display();
    match asks {
        Some(metadata) if allow => Ok(Supervision::Unsupervised(format!(
            "heapcap-runtime: warning: the container runs WITHOUT a heap quota ({metadata}): heapcapd is not reachable \
             at {socket} ({why}), and allow_unsupervised (in {config_file} or {}) starts such containers unquota'd; \
             {start} to put the next ones under their quotas",
            config::ALLOW_UNSUPERVISED_ENV
        ))),
        Some(_) => Err(anyhow!(
            "heapcap-runtime: the container asks for a heap quota, but heapcapd is not reachable at {socket} ({why}): \
             {start}, or if it listens elsewhere set `listener_path` in {config_file}; or set \
             `allow_unsupervised = true` in {config_file} (or {}=1 in the runtime's environment) to start such \
             containers without a quota",
            config::ALLOW_UNSUPERVISED_ENV
        )),
        None => Err(anyhow!(
            "heapcap-runtime: the container's config.json names heapcapd's socket {socket} as its seccomp listener \
             (linux.seccomp.listenerPath), but heapcapd is not reachable there ({why}): {start}; the runtime cannot \
             start this container without that listener (also not with allow_unsupervised)"
        )),
    }
}

/// The runtime to exec: the config's (a path, or a name on PATH), else runc, then crun, on PATH;
/// never this shim (which may be installed as `runc` earlier on PATH).
fn find_runtime(config: &Config) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().ok().and_then(|p| std::fs::metadata(p).ok()).map(|m| (m.dev(), m.ino()));
    let is_me = |p: &Path| std::fs::metadata(p).is_ok_and(|m| Some((m.dev(), m.ino())) == me);
    let candidates: Vec<PathBuf> = match &config.runtime {
        Some(r) => vec![r.clone()],
        None => config::DEFAULT_RUNTIMES.iter().map(PathBuf::from).collect(),
    };
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| OsString::from("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"));
    for candidate in &candidates {
        if candidate.components().count() > 1 {
            if is_executable(candidate) && !is_me(candidate) {
                return Ok(candidate.clone());
            }
            continue;
        }
        let found = std::env::split_paths(&path).map(|d| d.join(candidate)).find(|p| is_executable(p) && !is_me(p));
        if let Some(found) = found {
            return Ok(found);
        }
    }
    let names: Vec<_> = candidates.iter().map(|c| c.display().to_string()).collect();
    Err(anyhow!(
        "heapcap-runtime: no OCI runtime found ({} on PATH {}): install runc or crun, or set `runtime = \"/path/to/runc\"` in {}",
        names.join(", "),
        path.to_string_lossy(),
        Config::path(std::env::var_os(config::ENV).as_deref()).display(),
    ))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
}

/// Append `message` to the runtime's `--log` file at `level` (`error`, `warning`), as runc logs.
fn log_line(invocation: &Invocation, level: &str, message: &str) {
    let Some(log) = &invocation.log else { return };
    let line = if invocation.log_json {
        serde_json::json!({"level": level, "msg": message}).to_string()
    } else {
        format!("level={level} msg={}", serde_json::Value::from(message))
    };
    if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
        let _ = writeln!(file, "{line}");
    }
}
