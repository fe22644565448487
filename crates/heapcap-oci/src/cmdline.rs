//! Where an OCI runtime's command line (runc's, crun's) keeps what heapcap needs from it: the
//! subcommand, the bundle of `create`/`run`, and the log file the engine reads errors from
//! (`--log`, `--log-format`). heapcap-runtime reads its own command line with [`inspect`];
//! heapcap-hook reads its runtime's, to write its errors where the engine looks.
//!
//! This is not a parser of runc's command line and must not become one: the shim passes every
//! argument on unchanged, also flags it has never heard of (crun and newer runc versions add
//! some). It only needs to know which flags take a value, so that a value is not mistaken for the
//! subcommand or the bundle. runc (urfave/cli, Go `flag`) accepts `-flag` and `--flag`, with the
//! value as `--flag=value` or as the next argument; crun (argp) the same for long options.

use std::ffi::OsString;
use std::path::PathBuf;

/// Global flags (before the subcommand) of runc and crun that take a value.
const GLOBAL_VALUE_FLAGS: &[&str] = &["log", "log-format", "log-level", "root", "criu", "rootless", "cgroup-manager"];
/// Flags of `create` and `run` that take a value.
const CREATE_VALUE_FLAGS: &[&str] = &["bundle", "b", "console-socket", "pid-file", "preserve-fds"];

/// What the shim needs from its command line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// The subcommand (`create`, `state`, ...), if any (`--version` has none).
    pub subcommand: Option<String>,
    /// For `create` and `run`: the bundle directory (the working directory when not given).
    pub bundle: Option<PathBuf>,
    /// `--help`/`-h` after the subcommand: the runtime prints its help, nothing is created.
    pub help: bool,
    /// `--log FILE`: where the runtime logs, and where the engine looks for the last error.
    pub log: Option<PathBuf>,
    /// `--log-format json`.
    pub log_json: bool,
}

impl Invocation {
    /// Whether this invocation creates a container from a bundle.
    pub fn creates(&self) -> bool {
        matches!(self.subcommand.as_deref(), Some("create" | "run")) && !self.help
    }
}

/// A flag's name (without dashes) and its inline value, or `None` for a non-flag.
fn flag(arg: &str) -> Option<(&str, Option<&str>)> {
    let body = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')).filter(|b| !b.is_empty())?;
    Some(match body.split_once('=') {
        Some((name, value)) => (name, Some(value)),
        None => (body, None),
    })
}

/// Find the subcommand, bundle and log in `args` (without argv\[0\]).
pub fn inspect(args: &[OsString]) -> Invocation {
    let args: Vec<String> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let mut inv = Invocation::default();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if arg == "--" {
            break;
        }
        match flag(arg) {
            Some((name, inline)) => {
                let value = match inline {
                    Some(v) => Some(v.to_string()),
                    None if GLOBAL_VALUE_FLAGS.contains(&name) => {
                        i += 1;
                        args.get(i - 1).cloned()
                    }
                    None => None,
                };
                match name {
                    "log" => inv.log = value.map(PathBuf::from),
                    "log-format" => inv.log_json = value.as_deref() == Some("json"),
                    _ => {}
                }
            }
            None => {
                inv.subcommand = Some(arg.clone());
                break;
            }
        }
    }
    if !matches!(inv.subcommand.as_deref(), Some("create" | "run")) {
        return inv;
    }
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if arg == "--" {
            break;
        }
        let Some((name, inline)) = flag(arg) else { continue };
        let value = match inline {
            Some(v) => Some(v.to_string()),
            None if CREATE_VALUE_FLAGS.contains(&name) => {
                i += 1;
                args.get(i - 1).cloned()
            }
            None => None,
        };
        match name {
            "bundle" | "b" => inv.bundle = value.map(PathBuf::from),
            "help" | "h" => inv.help = true,
            _ => {}
        }
    }
    if inv.bundle.is_none() {
        inv.bundle = Some(PathBuf::from("."));
    }
    inv
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv(line: &str) -> Invocation {
        inspect(&line.split_whitespace().map(OsString::from).collect::<Vec<_>>())
    }

    #[test]
    fn containerd_and_podman_command_lines() {
        // containerd's runc v2 shim (go-runc).
        let i = inv("--root /run/containerd/runc/k8s.io --log /run/containerd/x/log.json --log-format json \
                     --systemd-cgroup create --bundle /run/containerd/x --pid-file /run/x/init.pid abc");
        assert_eq!(i.subcommand.as_deref(), Some("create"));
        assert_eq!(i.bundle, Some(PathBuf::from("/run/containerd/x")));
        assert_eq!(i.log, Some(PathBuf::from("/run/containerd/x/log.json")));
        assert!(i.log_json && i.creates());
        // podman / conmon.
        let i = inv("--systemd-cgroup --log-format=json --log=/x/oci-log create --bundle=/b/userdata \
                     --pid-file /b/pidfile --no-new-keyring ctr");
        assert_eq!((i.bundle, i.log_json), (Some(PathBuf::from("/b/userdata")), true));
        let i = inv("-root /r run -b /b --detach c");
        assert_eq!((i.subcommand.as_deref(), i.bundle), (Some("run"), Some(PathBuf::from("/b"))));
        let i = inv("--cgroup-manager systemd run -d -b=/bb c");
        assert_eq!(i.bundle, Some(PathBuf::from("/bb")));
    }

    #[test]
    fn defaults_and_other_subcommands() {
        assert_eq!(inv("create c").bundle, Some(PathBuf::from(".")));
        let i = inv("--root /r state c");
        assert_eq!((i.subcommand.as_deref(), i.bundle.clone(), i.creates()), (Some("state"), None, false));
        assert_eq!(inv("--version").subcommand, None);
        assert!(!inv("create --help").creates());
        // A flag value that looks like a subcommand is not one.
        assert_eq!(inv("--root create exec c").subcommand.as_deref(), Some("exec"));
        assert_eq!(inv("create --console-socket --bundle c").bundle, Some(PathBuf::from(".")));
    }
}
