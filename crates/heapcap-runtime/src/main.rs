//! `heapcap-runtime`: a runc-compatible runtime that puts containers under heapcap, for engines
//! without OCI hooks (containerd and Kubernetes RuntimeClass, Docker) and for podman `--runtime`.
//!
//! It takes exactly runc's command line. On `create` and `run` it applies heapcap's spec change
//! ([`heapcap_oci::spec`]) to the bundle's `config.json` when the container asks for heapcap
//! (annotations `heapcap.io/*`, env `HEAPCAP_LIMIT`..., or the config file's defaults), then execs
//! the real runtime with the same arguments; every other invocation is an exec of the real runtime
//! straight away, so output and exit status are the runtime's own. Configuration: [`config`].
//!
//! An error of the shim itself (unreadable bundle, bad settings, a profile heapcap cannot merge
//! into) fails the command with exit status 1, a message on stderr, and the same message in the
//! runtime's `--log` file (in `--log-format`), where containerd looks for a runtime's last error.
#![forbid(unsafe_code)]

mod args;
mod bundle;
mod config;

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::anyhow;

use crate::args::Invocation;
use crate::config::Config;

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let invocation = args::inspect(&args);
    match run(&args, &invocation) {
        Ok(never) => match never {},
        Err(e) => {
            let message = e.to_string();
            eprintln!("{message}");
            log_error(&invocation, &message);
            ExitCode::FAILURE
        }
    }
}

/// Prepare the bundle if this creates a container, then become the real runtime.
fn run(args: &[OsString], invocation: &Invocation) -> anyhow::Result<std::convert::Infallible> {
    let config = Config::load(std::env::var_os(config::ENV).as_deref())?;
    let runtime = find_runtime(&config)?;
    if invocation.creates() {
        let bundle = invocation.bundle.as_deref().unwrap_or(Path::new("."));
        bundle::prepare(bundle, &config.defaults())?;
    }
    let err = Command::new(&runtime).args(args).exec();
    Err(anyhow!("heapcap-runtime: cannot run {}: {err}", runtime.display()))
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
        std::env::var_os(config::ENV).map(|p| p.to_string_lossy().into_owned()).unwrap_or(config::DEFAULT_PATH.into()),
    ))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
}

/// Append `message` to the runtime's `--log` file, as runc would log an error.
fn log_error(invocation: &Invocation, message: &str) {
    let Some(log) = &invocation.log else { return };
    let line = if invocation.log_json {
        serde_json::json!({"level": "error", "msg": message}).to_string()
    } else {
        format!("level=error msg={}", serde_json::Value::from(message))
    };
    if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
        let _ = writeln!(file, "{line}");
    }
}
