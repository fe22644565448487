//! The shim's configuration file: `/etc/heapcap/runtime.toml`, or the file named by
//! `HEAPCAP_RUNTIME_CONFIG`. Every key is optional:
//!
//! ```toml
//! # The runtime to wrap: a path, or a name looked up on PATH (never this shim itself).
//! # Default: runc, then crun, on PATH.
//! runtime = "/usr/sbin/runc"
//! # heapcapd's agent socket, written as linux.seccomp.listenerPath. Default: root's
//! # (/run/heapcap/heapcapd.sock), or run by rootless podman the user's heapcapd
//! # ($XDG_RUNTIME_DIR/heapcap/heapcapd.sock).
//! listener_path = "/run/heapcap/heapcapd.sock"
//! # Read HEAPCAP_LIMIT, HEAPCAP_TOTAL_LIMIT, HEAPCAP_MODE, HEAPCAP_STRICT, HEAPCAP_MACHINE_MEMORY from the container's environment
//! # (for Docker, which cannot set OCI annotations). Default: true.
//! env_fallback = true
//! # When heapcapd is not reachable, start containers that ask for a quota without one (a warning
//! # on stderr and in the runtime's log, config.json untouched) instead of failing their start.
//! # Also HEAPCAP_ALLOW_UNSUPERVISED=1 in the runtime's environment (1, true, yes, on; or 0, false,
//! # no, off; any other value fails the create). Default: false.
//! allow_unsupervised = false
//!
//! # Settings for every container run with this runtime; its env and annotations override them.
//! # Default: none, so only containers that ask for heapcap are changed.
//! [defaults]
//! limit = "1Gi"
//! total_limit = "4Gi"
//! mode = "enforce"
//! # Strict counting (heapcap.io/strict): every writable private mapping and shared memory.
//! strict = false
//! # What programs under a quota see as their machine's memory: "quota" (the default: sysinfo(2)
//! # reports the quota, so the JVM sizes its default heap from it) or "host".
//! machine_memory = "quota"
//! ```

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use heapcap_env::flag::{self, FlagError};
use heapcap_oci::spec::Defaults;
use heapcap_policy::settings::{LIMIT, MACHINE_MEMORY, MODE, STRICT, TOTAL_LIMIT};
use serde::Deserialize;

/// The file read when `HEAPCAP_RUNTIME_CONFIG` is not set; a missing file means all defaults.
pub const DEFAULT_PATH: &str = "/etc/heapcap/runtime.toml";
/// Names the config file instead of [`DEFAULT_PATH`]; that file must exist.
pub const ENV: &str = "HEAPCAP_RUNTIME_CONFIG";
/// Runtimes looked up on PATH, in order, when the file names none.
pub const DEFAULT_RUNTIMES: &[&str] = &["runc", "crun"];
/// A yes here does what `allow_unsupervised = true` does (as `HEAPCAP_HOOK_ALLOW_UNSUPERVISED`
/// does for heapcap-hook); see [`heapcap_env::flag`] for what is a yes and a no.
pub const ALLOW_UNSUPERVISED_ENV: &str = "HEAPCAP_ALLOW_UNSUPERVISED";

#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub runtime: Option<PathBuf>,
    pub listener_path: Option<PathBuf>,
    pub env_fallback: Option<bool>,
    pub allow_unsupervised: Option<bool>,
    #[serde(default)]
    pub defaults: DefaultSettings,
}

#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DefaultSettings {
    pub limit: Option<String>,
    pub total_limit: Option<String>,
    pub mode: Option<String>,
    pub strict: Option<bool>,
    pub machine_memory: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "heapcap-runtime: cannot read its config file {path}: {source} (set {ENV} to a readable file, or unset it)"
    )]
    Read { path: PathBuf, source: std::io::Error },
    #[error("heapcap-runtime: config file {path}: {source}")]
    Parse { path: PathBuf, source: Box<toml::de::Error> },
    #[error("heapcap-runtime: in the runtime's environment, {0}")]
    Env(#[from] FlagError),
}

impl Config {
    /// The config file: the one `HEAPCAP_RUNTIME_CONFIG` (`env`) names, else [`DEFAULT_PATH`].
    pub fn path(env: Option<&OsStr>) -> PathBuf {
        env.filter(|v| !v.is_empty()).map_or_else(|| PathBuf::from(DEFAULT_PATH), PathBuf::from)
    }

    /// Read the config file: the one `HEAPCAP_RUNTIME_CONFIG` names, else [`DEFAULT_PATH`] if it exists.
    pub fn load(env: Option<&OsStr>) -> Result<Config, ConfigError> {
        let path = Config::path(env);
        let required = env.is_some_and(|v| !v.is_empty());
        match std::fs::read_to_string(&path) {
            Ok(text) => Config::parse(&text, &path),
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(source) => Err(ConfigError::Read { path, source }),
        }
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.to_path_buf(), source: Box::new(e) })
    }

    /// Whether a container that asks for a quota starts without one when heapcapd is not
    /// reachable: `allow_unsupervised = true`, or a yes in [`ALLOW_UNSUPERVISED_ENV`] (`env`, its
    /// value). A value there that is neither a yes nor a no is an error, whatever the file says.
    pub fn allow_unsupervised(&self, env: Option<&OsStr>) -> Result<bool, ConfigError> {
        let yes = flag::parse(ALLOW_UNSUPERVISED_ENV, env)?;
        Ok(self.allow_unsupervised.unwrap_or(false) || yes)
    }

    /// What every container gets; the values are validated when a container is created (with
    /// an error that names the config file's defaults as their source). `socket`: heapcapd's
    /// agent socket unless the file names one (`heapcap_env::paths`, for the user the shim
    /// runs as).
    pub fn defaults(&self, socket: &Path) -> Defaults {
        let d = &self.defaults;
        let strict = d.strict.map(|s| s.to_string());
        let settings = [
            (LIMIT, &d.limit),
            (TOTAL_LIMIT, &d.total_limit),
            (MODE, &d.mode),
            (STRICT, &strict),
            (MACHINE_MEMORY, &d.machine_memory),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_string(), v.clone())))
        .collect();
        Defaults {
            listener_path: self.listener_path.clone().unwrap_or_else(|| socket.to_path_buf()),
            settings,
            env_fallback: self.env_fallback.unwrap_or(true),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOCKET: &str = heapcap_env::paths::AGENT_SOCKET;

    #[test]
    fn documented_example_parses() {
        let doc: String = include_str!("config.rs")
            .lines()
            .skip_while(|l| !l.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| l.trim_start_matches("//!").trim_start_matches(' '))
            .collect::<Vec<_>>()
            .join("\n");
        let c = Config::parse(&doc, Path::new("doc")).unwrap();
        assert_eq!(c.runtime, Some(PathBuf::from("/usr/sbin/runc")));
        let d = c.defaults(Path::new("/run/user/1000/heapcap/heapcapd.sock"));
        assert_eq!(d.listener_path, PathBuf::from(SOCKET), "the file's wins");
        assert!(d.env_fallback);
        assert_eq!(d.settings.len(), 5);
        assert!(d.settings.contains(&(STRICT.to_string(), "false".to_string())));
        assert_eq!(c.allow_unsupervised, Some(false));
    }

    #[test]
    fn allow_unsupervised_from_the_file_or_the_environment() {
        let off = Config::parse("", Path::new("x")).unwrap();
        let on = Config::parse("allow_unsupervised = true\n", Path::new("x")).unwrap();
        assert!(!off.allow_unsupervised(None).unwrap(), "off unless asked for");
        assert!(on.allow_unsupervised(None).unwrap());
        for yes in ["1", "true", "YES", " on "] {
            assert!(off.allow_unsupervised(Some(yes.as_ref())).unwrap(), "{yes:?}");
        }
        for no in ["", "0", "false", "off"] {
            assert!(!off.allow_unsupervised(Some(no.as_ref())).unwrap(), "{no:?}");
        }
        assert!(on.allow_unsupervised(Some("0".as_ref())).unwrap(), "the env adds, as for heapcap-hook");
        // Neither a yes nor a no (it used to mean no): an error that says what to write.
        for neither in ["2", "maybe"] {
            for config in [&off, &on] {
                let e = config.allow_unsupervised(Some(neither.as_ref())).unwrap_err().to_string();
                let says = format!(
                    "heapcap-runtime: in the runtime's environment, {ALLOW_UNSUPERVISED_ENV}={neither:?} is neither"
                );
                assert!(e.starts_with(&says) && e.contains("write 1, true, yes or on for yes"), "{e}");
            }
        }
        let e = Config::parse("allow_unsupervised = \"yes\"\n", Path::new("/etc/r.toml")).unwrap_err().to_string();
        assert!(e.contains("/etc/r.toml") && e.contains("allow_unsupervised"), "{e}");
        assert_eq!(Config::path(None), PathBuf::from(DEFAULT_PATH));
        assert_eq!(Config::path(Some("".as_ref())), PathBuf::from(DEFAULT_PATH));
        assert_eq!(Config::path(Some("/x.toml".as_ref())), PathBuf::from("/x.toml"));
    }

    #[test]
    fn empty_means_defaults_and_typos_are_errors() {
        let d = Config::parse("", Path::new("x")).unwrap().defaults(Path::new("/run/user/1000/heapcap/heapcapd.sock"));
        assert_eq!(d.listener_path, PathBuf::from("/run/user/1000/heapcap/heapcapd.sock"), "the user's default");
        assert_eq!((d.settings.is_empty(), d.env_fallback), (true, true));
        let e = Config::parse("[defaults]\nlimt = \"1Gi\"\n", Path::new("/etc/x.toml")).unwrap_err().to_string();
        assert!(e.contains("/etc/x.toml") && e.contains("limt"), "{e}");
        assert!(Config::load(Some("/nonexistent/heapcap.toml".as_ref())).is_err(), "a named file must exist");
    }
}
