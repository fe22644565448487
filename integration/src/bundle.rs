//! OCI bundles: a busybox root filesystem with the fixture, and the `config.json` of
//! `runc spec` changed through setters, run or created with a [`Runtime`].

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::container::{force_delete, Container, DeleteOnDrop};
use crate::ids::{unique_id, TempDir};
use crate::process::{run_or_panic, show, Capture, TIMEOUT};
use crate::rootfs::{host_system_mounts, populate_rootfs};
use crate::runtime::{Runtime, SETUP};

/// An OCI bundle: `DIR/config.json` and `DIR/rootfs/`, in a temporary
/// directory removed when the bundle is dropped.
///
/// Setters change the in-memory `config.json`; it is written (atomically)
/// each time a container is run or created, so one bundle can run several
/// containers, also at once, as long as it is not changed in between.
#[derive(Debug)]
pub struct Bundle {
    config: Value,
    dir: TempDir,
}

impl Bundle {
    /// A fresh bundle: busybox root filesystem with `/alloc`, and the config
    /// of `runc spec` with `process.terminal` false. `process.args` stays
    /// `runc spec`'s `["sh"]` until [`Bundle::args`] sets it.
    pub fn new(name: &str) -> Bundle {
        let dir = TempDir::new(&format!("bundle-{name}"));
        let rootfs = dir.0.join("rootfs");
        fs::create_dir_all(&rootfs).unwrap_or_else(|e| panic!("cannot create {}: {e}", rootfs.display()));
        populate_rootfs(&rootfs);

        let out =
            Command::new("runc").arg("spec").arg("--bundle").arg(&dir.0).stdin(Stdio::null()).output().unwrap_or_else(
                |e| panic!("the container tests need runc (`runc spec` makes their config.json): {e}; {SETUP}"),
            );
        assert!(out.status.success(), "`runc spec --bundle {}` failed:\n{}", dir.0.display(), show(&out));
        let path = dir.0.join("config.json");
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let mut config: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("`runc spec` wrote invalid JSON ({e}):\n{text}"));
        object_at(&mut config, &["process"]).insert("terminal".into(), Value::Bool(false));
        Bundle { config, dir }
    }

    /// The bundle directory (`config.json`, `rootfs/`, and the `ID.stdout` /
    /// `ID.stderr` files of created containers).
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }

    /// `DIR/rootfs`: busybox and `/alloc`, what the container sees as `/`.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.0.join("rootfs")
    }

    /// `DIR/config.json`, as last written ([`Bundle::write_config`]).
    pub fn config_path(&self) -> PathBuf {
        self.dir.0.join("config.json")
    }

    /// The whole config, for changes no setter covers.
    pub fn config_mut(&mut self) -> &mut Value {
        &mut self.config
    }

    /// `process.args`: the program (looked up in the config's `PATH`) and its arguments.
    pub fn args(&mut self, args: &[&str]) -> &mut Self {
        object_at(&mut self.config, &["process"]).insert("args".into(), json!(args));
        self
    }

    /// Sets `KEY=VALUE` in `process.env`, replacing an earlier `KEY`.
    pub fn env(&mut self, key: &str, value: &str) -> &mut Self {
        let env = array_at(&mut self.config, &["process", "env"]);
        let prefix = format!("{key}=");
        env.retain(|entry| !entry.as_str().is_some_and(|e| e.starts_with(&prefix)));
        env.push(json!(format!("{key}={value}")));
        self
    }

    /// `root.readonly` (`runc spec` makes it `true`).
    pub fn readonly_root(&mut self, readonly: bool) -> &mut Self {
        object_at(&mut self.config, &["root"]).insert("readonly".into(), Value::Bool(readonly));
        self
    }

    /// Sets one entry of `annotations` (they reach hooks and seccomp agents in the container state).
    pub fn annotation(&mut self, key: &str, value: &str) -> &mut Self {
        object_at(&mut self.config, &["annotations"]).insert(key.into(), json!(value));
        self
    }

    /// Several annotations at once.
    pub fn annotations(&mut self, pairs: &[(&str, &str)]) -> &mut Self {
        for (key, value) in pairs {
            self.annotation(key, value);
        }
        self
    }

    /// `linux.seccomp`: a whole OCI seccomp profile (`defaultAction`,
    /// `syscalls`, `listenerPath`, ...), e.g. the one heapcap generates.
    pub fn seccomp(&mut self, profile: Value) -> &mut Self {
        object_at(&mut self.config, &["linux"]).insert("seccomp".into(), profile);
        self
    }

    /// Appends a hook (`{"path": ..., "args": [...], "env": [...], "timeout": N}`)
    /// to `hooks.STAGE` (`prestart`, `createRuntime`, `createContainer`,
    /// `startContainer`, `poststart`, `poststop`).
    pub fn hook(&mut self, stage: &str, hook: Value) -> &mut Self {
        array_at(&mut self.config, &["hooks", stage]).push(hook);
        self
    }

    /// Bind-mounts the host's `source` read-only (nosuid, nodev) at
    /// `destination` in the container; the runtime creates the mount point.
    pub fn bind_ro(&mut self, source: impl AsRef<Path>, destination: &str) -> &mut Self {
        let source = source.as_ref().to_str().expect("bind mount sources are UTF-8 paths").to_string();
        array_at(&mut self.config, &["mounts"]).push(json!({
            "destination": destination,
            "type": "bind",
            "source": source,
            "options": ["rbind", "ro", "nosuid", "nodev"],
        }));
        self
    }

    /// Binds the host's `/usr` and `/lib*` (those that exist, each from its real location) read-only,
    /// so host programs such as `/usr/bin/python3` run in the container.
    pub fn with_host_system(&mut self) -> &mut Self {
        for (source, destination) in host_system_mounts() {
            self.bind_ro(source, &destination);
        }
        self
    }

    /// Copies the host file `source` to `destination` (an absolute path in the
    /// container) in the root filesystem, keeping its permissions.
    pub fn copy_into_rootfs(&mut self, source: impl AsRef<Path>, destination: &str) -> &mut Self {
        let source = source.as_ref();
        let target = self.rootfs().join(destination.trim_start_matches('/'));
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).unwrap_or_else(|e| panic!("cannot create {}: {e}", parent.display()));
        }
        fs::copy(source, &target)
            .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", source.display(), target.display()));
        self
    }

    /// Writes `config.json` (via a temporary file and a rename).
    pub fn write_config(&self) {
        let text = serde_json::to_string_pretty(&self.config).expect("a JSON value serialises");
        let tmp = self.dir.0.join(format!("{}.config.json", unique_id("tmp")));
        fs::write(&tmp, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", tmp.display()));
        let path = self.config_path();
        fs::rename(&tmp, &path)
            .unwrap_or_else(|e| panic!("cannot rename {} to {}: {e}", tmp.display(), path.display()));
    }

    /// `RUNTIME run --bundle DIR ID` in the foreground, stdin from /dev/null:
    /// the container's exit status and output. Panics after [`TIMEOUT`] (the
    /// container is deleted first) with what it printed.
    pub fn run(&self, runtime: Runtime, id: &str) -> Output {
        self.run_with_timeout(runtime, id, TIMEOUT)
    }

    /// [`Bundle::run`] with `timeout` instead of [`TIMEOUT`].
    pub fn run_with_timeout(&self, runtime: Runtime, id: &str, timeout: Duration) -> Output {
        runtime.ensure_works();
        self.run_unchecked(runtime, id, timeout)
    }

    pub(crate) fn run_unchecked(&self, runtime: Runtime, id: &str, timeout: Duration) -> Output {
        self.write_config();
        // `run` deletes the container when it ends; this covers the paths where it does not.
        let _guard = DeleteOnDrop { runtime, id };
        let mut cmd = runtime.command();
        cmd.arg("run").arg("--bundle").arg(self.dir()).arg(id);
        run_or_panic(cmd, Capture::Pipes, timeout, || force_delete(runtime, id))
    }

    /// `RUNTIME create --bundle DIR ID`: a created (not yet started) container
    /// whose stdout and stderr go to `DIR/ID.stdout` and `DIR/ID.stderr`
    /// (`create`'s own messages too). Panics if `create` fails.
    pub fn create(&self, runtime: Runtime, id: &str) -> Container<'_> {
        runtime.ensure_works();
        self.write_config();
        // Built first, so that a failed or hung create is cleaned up too.
        let container = Container { bundle: self, runtime, id: id.to_string(), deleted: false };
        let mut cmd = runtime.command();
        cmd.arg("create").arg("--bundle").arg(self.dir()).arg(id);
        let capture = Capture::Files { stdout: container.stdout_path(), stderr: container.stderr_path() };
        let out = run_or_panic(cmd, capture, TIMEOUT, || force_delete(runtime, id));
        if !out.status.success() {
            drop(container);
            panic!("`{} create --bundle {} {id}` failed:\n{}", runtime.binary(), self.dir().display(), show(&out));
        }
        container
    }
}

/// `value[path[0]][path[1]]...` as an object, creating missing or null levels.
fn object_at<'v>(value: &'v mut Value, path: &[&str]) -> &'v mut Map<String, Value> {
    let mut node = value;
    for key in path {
        if node.is_null() {
            *node = json!({});
        }
        let map = node.as_object_mut().unwrap_or_else(|| panic!("config.json: a parent of {path:?} is not an object"));
        node = map.entry(key.to_string()).or_insert(Value::Null);
    }
    if node.is_null() {
        *node = json!({});
    }
    node.as_object_mut().unwrap_or_else(|| panic!("config.json: {path:?} is not an object"))
}

/// `value[path...]` as an array, creating it (and missing parents) if needed.
fn array_at<'v>(value: &'v mut Value, path: &[&str]) -> &'v mut Vec<Value> {
    let (last, parents) = path.split_last().expect("a non-empty path");
    let node = object_at(value, parents).entry(last.to_string()).or_insert_with(|| json!([]));
    if node.is_null() {
        *node = json!([]);
    }
    node.as_array_mut().unwrap_or_else(|| panic!("config.json: {path:?} is not an array"))
}
