//! Real containers for heapcap's integration tests: runc, crun and podman
//! running a busybox-only root filesystem that also holds the static build of
//! the allocation fixture (`fixtures/alloc.c`) as `/alloc`. No mocks: every
//! helper runs the real runtime binary.
//!
//! Use it from a test file in `integration/tests/` with
//!
//! ```text
//! #[path = "../containers/mod.rs"]
//! mod containers;
//! use containers::{Bundle, Runtime};
//! ```
//!
//! # What it offers
//!
//! - [`unique_id`]: container ids and names unique per host and test run
//!   (`hc-<pid>-<counter>-<tag>`).
//! - [`Runtime`] (`Runc`, `Crun`): the binary, and [`Runtime::ensure_works`],
//!   which runs one trivial container per runtime and test process and panics
//!   with what to install or fix when that fails. [`Bundle::run`] and
//!   [`Bundle::create`] call it, so a broken host fails loudly and never
//!   skips a test.
//! - [`Bundle`]: an OCI bundle in a fresh temporary directory. Its
//!   `config.json` comes from `runc spec` (the runtime's own defaults: new
//!   pid/ipc/uts/mount/network namespaces, read-only root, no seccomp) with
//!   `process.terminal` turned off; setters change `process.args`, the
//!   environment, `root.readonly`, annotations, `linux.seccomp` (any JSON
//!   profile, e.g. heapcap's), hooks and read-only bind mounts, and
//!   [`Bundle::config_mut`] anything else. [`Bundle::run`] runs it in the
//!   foreground and captures its output; [`Bundle::create`] returns a
//!   [`Container`] guard for `start`, `exec`, `kill`, `state`, which deletes
//!   the container (`delete -f`) when dropped.
//! - podman: [`podman_image`] imports the same root filesystem once (per
//!   content, shared between test processes under a file lock) as
//!   `localhost/heapcap-test:<hash>`; [`podman_run`] / [`podman_run_full`]
//!   run it with `--rm --network none` and the test-local `containers.conf`
//!   ([`CONTAINERS_CONF`], which sets the ulimits this host needs);
//!   [`podman_command`] is `podman` with that configuration.
//! - [`run_captured`]: any other command with a timeout and captured output.
//! - Parsers for the fixture's `allocated=N result=R` lines.
//!
//! Every command has a timeout ([`TIMEOUT`] unless given): on expiry the
//! container is deleted, the command killed, and the test panics with what
//! it printed.
//!
//! # Host programs inside a container
//!
//! The root filesystem has only busybox (`/bin`, with every applet) and
//! `/alloc`. For a richer program, bind the host's system directories
//! read-only over it with [`Bundle::with_host_system`] (podman:
//! [`podman_host_system_volumes`]): `/usr` and the `/lib*` directories, each
//! mounted at its own name from its real location (so `/lib64` works on
//! merged-/usr hosts, where it is a symlink). Then
//!
//! ```text
//! let mut bundle = Bundle::new("python");
//! bundle.with_host_system().args(&["/usr/bin/python3", "-c", "print(1)"]);
//! let out = bundle.run(Runtime::Runc, &unique_id("python"));
//! ```
//!
//! `PATH` (from `runc spec`) lists `/usr/bin` before `/bin`, so with the host
//! system mounted a bare `sh` is the host's shell; use `/bin/sh` for busybox.
//!
//! # Host requirements
//!
//! Root, runc, crun, podman, busybox-static, and this host's cgroup and ulimit
//! fixes: `scripts/setup-runtimes.sh` sets all of that up (see its comments).
//! Set `HEAPCAP_TEST_KEEP=1` to keep bundle directories for inspection.
#![allow(dead_code)]

use std::collections::hash_map::DefaultHasher;
use std::fs::{self, File, OpenOptions};
use std::hash::{Hash, Hasher};
use std::io::{self, Read};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

/// The static build of the fixture on the host (built by `build.rs`).
pub const ALLOC_STATIC: &str = env!("HEAPCAP_ALLOC_STATIC");

/// Where the fixture is inside every container of this harness.
pub const ALLOC: &str = "/alloc";

/// A runtime or podman command that takes longer than this is treated as hung:
/// its container is deleted and the test panics with what it printed.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// The `containers.conf` every podman command of the harness runs with (as
/// `CONTAINERS_CONF`, which replaces the system ones).
pub const CONTAINERS_CONF: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/containers/containers.conf");

/// The repository of the podman test image; the tag is a hash of its content.
pub const IMAGE_REPO: &str = "localhost/heapcap-test";

/// What to do when the host is not ready.
pub const SETUP: &str = "run `scripts/setup-runtimes.sh` as root: it installs runc, crun, podman, busybox-static \
     and libc6-dev and fixes this host's cgroup set-up";

/// Bump when the root filesystem's layout changes (it is part of the image tag).
const IMAGE_LAYOUT: u32 = 1;

/// Cleaning up after a container (`delete -f`, `podman rm -f`) gets this long.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(30);

const BUSYBOX_PATHS: &[&str] = &["/bin/busybox", "/usr/bin/busybox", "/sbin/busybox", "/usr/sbin/busybox"];

/// Host directories that [`Bundle::with_host_system`] binds read-only.
const HOST_SYSTEM_DIRS: &[&str] = &["/usr", "/lib", "/lib32", "/lib64", "/libx32"];

// ------------------------------------------------------------------ ids

/// A container id (or name) unique on this host for this test run:
/// `hc-<pid>-<counter>-<tag>`, with `tag` reduced to `[A-Za-z0-9_.-]`.
pub fn unique_id(tag: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tag: String = tag
        .chars()
        .take(40)
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' })
        .collect();
    format!("hc-{}-{n}-{tag}", std::process::id())
}

// ------------------------------------------------------------------ runtimes

/// An OCI runtime the tests drive directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Runtime {
    Runc,
    Crun,
}

impl Runtime {
    pub const ALL: [Runtime; 2] = [Runtime::Runc, Runtime::Crun];

    /// The binary (looked up in `PATH`), also the Debian package's name.
    pub fn binary(self) -> &'static str {
        match self {
            Runtime::Runc => "runc",
            Runtime::Crun => "crun",
        }
    }

    /// `Command::new(binary)`, for subcommands the harness does not wrap.
    pub fn command(self) -> Command {
        Command::new(self.binary())
    }

    /// Panics, saying what to install or fix, unless this runtime can run a
    /// trivial busybox container here. Checked once per runtime and process.
    pub fn ensure_works(self) {
        static CHECKED: [OnceLock<Result<(), String>>; 2] = [OnceLock::new(), OnceLock::new()];
        let slot = match self {
            Runtime::Runc => &CHECKED[0],
            Runtime::Crun => &CHECKED[1],
        };
        if let Err(message) = slot.get_or_init(|| self.check()) {
            panic!("{message}");
        }
    }

    fn check(self) -> Result<(), String> {
        require_root()?;
        let bin = self.binary();
        let version = Command::new(bin)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("the container tests need `{bin}`, but `{bin} --version` failed: {e}; {SETUP}"))?;
        if !version.status.success() {
            return Err(format!("`{bin} --version` failed:\n{}\n{SETUP}", show(&version)));
        }
        let mut bundle = Bundle::new(&format!("{bin}-check"));
        bundle.args(&["true"]);
        let id = unique_id(&format!("{bin}-check"));
        let out = bundle.run_unchecked(self, &id, TIMEOUT);
        if !out.status.success() {
            let said = format!("{}{}", stdout(&out), stderr(&out));
            return Err(format!(
                "`{bin}` cannot run a trivial busybox container (`{bin} run` of `true`):\n{}\n{}",
                show(&out),
                diagnose(&said)
            ));
        }
        Ok(())
    }
}

/// What to do about a runtime's or podman's error message.
fn diagnose(said: &str) -> String {
    if said.contains("cgroups in hybrid mode not supported") {
        format!(
            "crun refuses a hybrid cgroup v1/v2 host while a controller (here: hugetlb) is attached to cgroup v2; \
             mount it on a v1 hierarchy (`mkdir -p /sys/fs/cgroup/hugetlb && mount -t cgroup -o hugetlb cgroup \
             /sys/fs/cgroup/hugetlb`): {SETUP}"
        )
    } else if said.contains("setrlimit") {
        format!(
            "podman raised RLIMIT_NOFILE/RLIMIT_NPROC above this process's hard limits, which needs \
             CAP_SYS_RESOURCE; the harness runs podman with CONTAINERS_CONF={CONTAINERS_CONF} whose \
             default_ulimits must stay at or below `ulimit -Hn` / `ulimit -Hu`"
        )
    } else if said.contains("image not known") {
        "the test image is gone: something removed it (podman rmi, podman image prune) while the tests ran; \
         run the tests again to import it again"
            .to_string()
    } else {
        SETUP.to_string()
    }
}

fn require_root() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        Ok(())
    } else {
        Err(format!("the container tests run rootful runc, crun and podman and need root (euid is {euid})"))
    }
}

// ------------------------------------------------------------------ root filesystem

/// The host's static busybox and its applet names.
fn busybox() -> &'static (PathBuf, Vec<String>) {
    static BUSYBOX: OnceLock<Result<(PathBuf, Vec<String>), String>> = OnceLock::new();
    match BUSYBOX.get_or_init(find_busybox) {
        Ok(found) => found,
        Err(message) => panic!("{message}"),
    }
}

fn find_busybox() -> Result<(PathBuf, Vec<String>), String> {
    let install = "install busybox-static (Debian/Ubuntu: apt-get install busybox-static; or run \
                   scripts/setup-runtimes.sh as root)";
    let path =
        BUSYBOX_PATHS.iter().map(PathBuf::from).find(|path| path.is_file()).ok_or_else(|| {
            format!("the container tests need a static busybox at one of {BUSYBOX_PATHS:?}: {install}")
        })?;
    if !is_static_elf(&path)? {
        return Err(format!(
            "{} is dynamically linked and cannot run in a busybox-only container: {install} \
             (it replaces the dynamic `busybox` package)",
            path.display()
        ));
    }
    let out = Command::new(&path)
        .arg("--list")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `{} --list`: {e}", path.display()))?;
    if !out.status.success() {
        return Err(format!("`{} --list` failed:\n{}", path.display(), show(&out)));
    }
    let applets: Vec<String> = stdout(&out)
        .lines()
        .map(str::trim)
        .filter(|name| !name.is_empty() && !name.contains('/') && *name != "busybox")
        .map(str::to_string)
        .collect();
    for needed in ["sh", "true", "sleep", "cat", "echo"] {
        if !applets.iter().any(|a| a == needed) {
            return Err(format!("{} has no `{needed}` applet: {install}", path.display()));
        }
    }
    Ok((path, applets))
}

/// Whether the ELF file at `path` has no program interpreter (`PT_INTERP`),
/// i.e. runs without a dynamic loader.
pub fn is_static_elf(path: &Path) -> Result<bool, String> {
    const PT_INTERP: usize = 3;
    let data = fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let truncated = || format!("{} is a truncated ELF file", path.display());
    if data.len() < 64 || data[..4] != *b"\x7fELF" {
        return Err(format!("{} is not an ELF file", path.display()));
    }
    if data[5] != 1 {
        return Err(format!("{} is not a little-endian ELF file", path.display()));
    }
    let num = |offset: usize, len: usize| -> Option<usize> {
        let bytes = data.get(offset..offset.checked_add(len)?)?;
        let mut buf = [0u8; 8];
        buf[..len].copy_from_slice(bytes);
        usize::try_from(u64::from_le_bytes(buf)).ok()
    };
    let (phoff, phentsize, phnum) = match data[4] {
        1 => (num(0x1c, 4), num(0x2a, 2), num(0x2c, 2)),
        2 => (num(0x20, 8), num(0x36, 2), num(0x38, 2)),
        class => return Err(format!("{} has unknown ELF class {class}", path.display())),
    };
    let (phoff, phentsize, phnum) =
        (phoff.ok_or_else(truncated)?, phentsize.ok_or_else(truncated)?, phnum.ok_or_else(truncated)?);
    for i in 0..phnum {
        let entry = i.checked_mul(phentsize).and_then(|o| o.checked_add(phoff)).ok_or_else(truncated)?;
        if num(entry, 4).ok_or_else(truncated)? == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Fills `rootfs` with busybox (`/bin/busybox` and a symlink per applet in
/// `/bin`), `/alloc`, minimal `/etc/passwd` and `/etc/group`, and empty
/// `/dev`, `/proc`, `/sys`, `/tmp` (mode 1777) and `/root`.
fn populate_rootfs(rootfs: &Path) {
    let fail =
        |what: &str, e: io::Error| -> ! { panic!("preparing the root filesystem {}: {what}: {e}", rootfs.display()) };
    let (busybox, applets) = busybox();
    for dir in ["bin", "dev", "etc", "proc", "sys", "tmp", "root"] {
        fs::create_dir_all(rootfs.join(dir)).unwrap_or_else(|e| fail(dir, e));
    }
    fs::set_permissions(rootfs.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap_or_else(|e| fail("tmp", e));
    fs::copy(busybox, rootfs.join("bin/busybox")).unwrap_or_else(|e| fail("copying busybox", e));
    for applet in applets {
        let link = rootfs.join("bin").join(applet);
        if fs::symlink_metadata(&link).is_err() {
            symlink("busybox", &link).unwrap_or_else(|e| fail(applet, e));
        }
    }
    fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    .unwrap_or_else(|e| fail("etc/passwd", e));
    fs::write(rootfs.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap_or_else(|e| fail("etc/group", e));
    fs::copy(ALLOC_STATIC, rootfs.join("alloc"))
        .unwrap_or_else(|e| fail(&format!("copying the static fixture {ALLOC_STATIC}"), e));
}

/// The host's `/usr` and `/lib*` directories that exist, each as (its real
/// location, where to mount it): `/lib64` on a merged-/usr host is
/// (`/usr/lib64`, `/lib64`).
pub fn host_system_mounts() -> Vec<(PathBuf, String)> {
    HOST_SYSTEM_DIRS
        .iter()
        .filter_map(|dir| {
            let real = fs::canonicalize(dir).ok()?;
            real.is_dir().then(|| (real, dir.to_string()))
        })
        .collect()
}

/// A directory removed (recursively) when dropped, unless `HEAPCAP_TEST_KEEP` is set.
#[derive(Debug)]
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(unique_id(tag));
        // A leftover of an earlier process with the same pid: start afresh.
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("HEAPCAP_TEST_KEEP").is_some() {
            eprintln!("HEAPCAP_TEST_KEEP: keeping {}", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

// ------------------------------------------------------------------ bundles

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

    pub fn rootfs(&self) -> PathBuf {
        self.dir.0.join("rootfs")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.0.join("config.json")
    }

    pub fn config(&self) -> &Value {
        &self.config
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

    /// Removes `linux.seccomp`.
    pub fn no_seccomp(&mut self) -> &mut Self {
        object_at(&mut self.config, &["linux"]).remove("seccomp");
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

    /// Binds the host's `/usr` and `/lib*` read-only ([`host_system_mounts`]),
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

    pub fn run_with_timeout(&self, runtime: Runtime, id: &str, timeout: Duration) -> Output {
        runtime.ensure_works();
        self.run_unchecked(runtime, id, timeout)
    }

    fn run_unchecked(&self, runtime: Runtime, id: &str, timeout: Duration) -> Output {
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
        self.try_create(runtime, id).unwrap_or_else(|out| {
            panic!("`{} create --bundle {} {id}` failed:\n{}", runtime.binary(), self.dir().display(), show(&out))
        })
    }

    /// Like [`Bundle::create`], but a failing `create` gives its output
    /// (e.g. to check that a container without its seccomp agent does not start).
    pub fn try_create(&self, runtime: Runtime, id: &str) -> Result<Container<'_>, Output> {
        self.try_create_with_timeout(runtime, id, TIMEOUT)
    }

    /// [`Bundle::try_create`] that gives `create` `timeout` (e.g. a short one
    /// when a seccomp agent or hook is expected to stall it) before the
    /// container is deleted and the test panics.
    pub fn try_create_with_timeout(
        &self,
        runtime: Runtime,
        id: &str,
        timeout: Duration,
    ) -> Result<Container<'_>, Output> {
        runtime.ensure_works();
        self.write_config();
        // Built first, so that a failed or hung create is cleaned up too.
        let container = Container { bundle: self, runtime, id: id.to_string(), deleted: false };
        let mut cmd = runtime.command();
        cmd.arg("create").arg("--bundle").arg(self.dir()).arg(id);
        let capture = Capture::Files { stdout: container.stdout_path(), stderr: container.stderr_path() };
        let out = run_or_panic(cmd, capture, timeout, || force_delete(runtime, id));
        if out.status.success() {
            Ok(container)
        } else {
            Err(out)
        }
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

// ------------------------------------------------------------------ containers

/// A container made by [`Bundle::create`]. Dropping it runs `delete -f`
/// (which also kills it), so a failing test leaves nothing behind.
#[derive(Debug)]
pub struct Container<'b> {
    bundle: &'b Bundle,
    runtime: Runtime,
    id: String,
    deleted: bool,
}

impl Container<'_> {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn runtime(&self) -> Runtime {
        self.runtime
    }

    pub fn bundle(&self) -> &Bundle {
        self.bundle
    }

    pub fn stdout_path(&self) -> PathBuf {
        self.bundle.dir().join(format!("{}.stdout", self.id))
    }

    pub fn stderr_path(&self) -> PathBuf {
        self.bundle.dir().join(format!("{}.stderr", self.id))
    }

    /// What the container's processes (and `create`) wrote to stdout so far.
    pub fn stdout(&self) -> String {
        fs::read_to_string(self.stdout_path()).unwrap_or_default()
    }

    /// What the container's processes (and `create`) wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(self.stderr_path()).unwrap_or_default()
    }

    /// `RUNTIME start ID`; panics if it fails.
    pub fn start(&self) {
        let out = self.try_start();
        assert!(
            out.status.success(),
            "`{} start {}` failed:\n{}",
            self.runtime.binary(),
            self.id,
            self.show_with(&out)
        );
    }

    /// `RUNTIME start ID`, whatever it gives.
    pub fn try_start(&self) -> Output {
        self.runtime_command(&["start"], &[])
    }

    /// `RUNTIME exec ID ARGS...` in the foreground (stdin from /dev/null):
    /// the process's exit status and output. Panics after [`TIMEOUT`].
    pub fn exec(&self, args: &[&str]) -> Output {
        self.exec_with(&[], args, TIMEOUT)
    }

    /// `RUNTIME exec OPTS... ID ARGS...` (e.g. `--env K=V`, `--cwd /tmp`),
    /// like [`Container::exec`] with `timeout`.
    pub fn exec_with(&self, opts: &[&str], args: &[&str], timeout: Duration) -> Output {
        let mut cmd = self.runtime.command();
        cmd.arg("exec").args(opts).arg(&self.id).args(args);
        // On a timeout the exec'd process stays until the container is deleted (by this guard).
        run_or_panic(cmd, Capture::Pipes, timeout, || {})
    }

    /// `RUNTIME kill ID SIGNAL` (`"TERM"`, `"KILL"`, `"9"`...); panics if it fails.
    pub fn kill(&self, signal: &str) {
        let out = self.runtime_command(&["kill"], &[signal]);
        assert!(
            out.status.success(),
            "`{} kill {} {signal}` failed:\n{}",
            self.runtime.binary(),
            self.id,
            self.show_with(&out)
        );
    }

    /// `RUNTIME state ID`, parsed (`id`, `pid`, `status`, `bundle`, `annotations`, ...).
    pub fn state(&self) -> Value {
        let out = self.runtime_command(&["state"], &[]);
        assert!(
            out.status.success(),
            "`{} state {}` failed:\n{}",
            self.runtime.binary(),
            self.id,
            self.show_with(&out)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("`{} state {}` printed invalid JSON ({e}):\n{}", self.runtime.binary(), self.id, show(&out))
        })
    }

    /// The state's `status`: `created`, `running`, `paused` or `stopped`.
    pub fn status(&self) -> String {
        let state = self.state();
        state["status"].as_str().unwrap_or_else(|| panic!("no status in the state {state}")).to_string()
    }

    /// The host pid of the container's init process.
    pub fn pid(&self) -> u32 {
        let state = self.state();
        state["pid"]
            .as_u64()
            .and_then(|pid| u32::try_from(pid).ok())
            .unwrap_or_else(|| panic!("no pid in the state {state}"))
    }

    /// Waits until the container's stdout contains `needle`; returns all of
    /// its stdout. Panics after `timeout`.
    pub fn wait_for_stdout(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.stdout();
            if out.contains(needle) {
                return out;
            }
            if Instant::now() >= deadline {
                panic!(
                    "container {} did not print {needle:?} within {timeout:?}\n\
                     --- stdout ---\n{out}--- stderr ---\n{}--- end ---",
                    self.id,
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the container's init has exited (status `stopped`). Panics after `timeout`.
    pub fn wait_stopped(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status();
            if status == "stopped" {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "container {} is still {status} after {timeout:?}\n--- stdout ---\n{}--- stderr ---\n{}--- end ---",
                    self.id,
                    self.stdout(),
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `RUNTIME delete -f ID` now; panics if it fails.
    pub fn delete(mut self) {
        self.deleted = true;
        let out = self.runtime_command(&["delete", "-f"], &[]);
        assert!(
            out.status.success(),
            "`{} delete -f {}` failed:\n{}",
            self.runtime.binary(),
            self.id,
            self.show_with(&out)
        );
    }

    /// `RUNTIME BEFORE... ID AFTER...`, captured, with the default timeout.
    fn runtime_command(&self, before: &[&str], after: &[&str]) -> Output {
        let mut cmd = self.runtime.command();
        cmd.args(before).arg(&self.id).args(after);
        run_or_panic(cmd, Capture::Pipes, TIMEOUT, || {})
    }

    /// `out`, plus the container's own output files.
    fn show_with(&self, out: &Output) -> String {
        format!(
            "{}\n--- container stdout ({}) ---\n{}--- container stderr ---\n{}--- end ---",
            show(out),
            self.stdout_path().display(),
            self.stdout(),
            self.stderr()
        )
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        if !self.deleted {
            force_delete(self.runtime, &self.id);
        }
    }
}

/// Runs `delete -f ID` when dropped.
struct DeleteOnDrop<'a> {
    runtime: Runtime,
    id: &'a str,
}

impl Drop for DeleteOnDrop<'_> {
    fn drop(&mut self) {
        force_delete(self.runtime, self.id);
    }
}

/// `RUNTIME delete -f ID`, which kills the container first; never panics
/// (a container that is already gone is fine).
fn force_delete(runtime: Runtime, id: &str) {
    let mut cmd = runtime.command();
    cmd.args(["delete", "-f", id]);
    match run_command(cmd, Capture::Pipes, CLEANUP_TIMEOUT, || {}) {
        Ok(out) if out.status.success() => {}
        // runc: "container does not exist"; crun: "cannot open directory `/run/crun/ID`: No such file or directory".
        Ok(out) if stderr(&out).contains("does not exist") || stderr(&out).contains("No such file or directory") => {}
        Ok(out) => eprintln!("cleanup: `{} delete -f {id}` failed:\n{}", runtime.binary(), show(&out)),
        Err(timed_out) => eprintln!("cleanup: `{} delete -f {id}` hung:\n{timed_out}", runtime.binary()),
    }
}

// ------------------------------------------------------------------ podman

/// `podman` with `CONTAINERS_CONF` set to the harness's [`CONTAINERS_CONF`],
/// for podman subcommands the harness does not wrap.
pub fn podman_command() -> Command {
    let mut cmd = Command::new("podman");
    cmd.env("CONTAINERS_CONF", CONTAINERS_CONF);
    cmd
}

/// The podman test image (`localhost/heapcap-test:<content hash>`): the
/// bundles' root filesystem (busybox, `/alloc`), imported with `podman import`
/// the first time any test process needs this content (under a file lock, so
/// parallel test processes do not race), then checked by running `true` in
/// it. Panics, saying what to fix, if podman cannot do that.
pub fn podman_image() -> &'static str {
    static IMAGE: OnceLock<Result<String, String>> = OnceLock::new();
    match IMAGE.get_or_init(prepare_podman_image) {
        Ok(image) => image,
        Err(message) => panic!("{message}"),
    }
}

fn prepare_podman_image() -> Result<String, String> {
    require_root()?;
    let version = podman_command()
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("the container tests need podman, but `podman --version` failed: {e}; {SETUP}"))?;
    if !version.status.success() {
        return Err(format!("`podman --version` failed:\n{}\n{SETUP}", show(&version)));
    }
    if !Path::new(CONTAINERS_CONF).is_file() {
        return Err(format!("the harness's containers.conf {CONTAINERS_CONF} is missing"));
    }
    let image = format!("{IMAGE_REPO}:{:016x}", image_hash()?);

    let lock_path = std::env::temp_dir().join("heapcap-test-podman-image.lock");
    let lock = lock_exclusive(&lock_path)?;
    let exists = run_command(
        {
            let mut cmd = podman_command();
            cmd.args(["image", "exists", &image]);
            cmd
        },
        Capture::Pipes,
        TIMEOUT,
        || {},
    )?;
    if !exists.status.success() {
        import_image(&image)?;
    }
    drop(lock);

    let name = unique_id("podman-check");
    let out = podman_run_inner(&[], &image, &name, &[], &["true"], TIMEOUT)?;
    if !out.status.success() {
        let said = format!("{}{}", stdout(&out), stderr(&out));
        return Err(format!(
            "podman cannot run a trivial container of {image} (`podman run ... true`):\n{}\n{}",
            show(&out),
            diagnose(&said)
        ));
    }
    Ok(image)
}

/// Hash of everything that goes into the image.
fn image_hash() -> Result<u64, String> {
    let (busybox, applets) = busybox();
    let mut hasher = DefaultHasher::new();
    IMAGE_LAYOUT.hash(&mut hasher);
    for file in [busybox.as_path(), Path::new(ALLOC_STATIC)] {
        fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?.hash(&mut hasher);
    }
    applets.hash(&mut hasher);
    Ok(hasher.finish())
}

fn import_image(image: &str) -> Result<(), String> {
    let dir = TempDir::new("image");
    let rootfs = dir.0.join("rootfs");
    fs::create_dir_all(&rootfs).map_err(|e| format!("cannot create {}: {e}", rootfs.display()))?;
    populate_rootfs(&rootfs);
    let tar = dir.0.join("rootfs.tar");
    let mut cmd = Command::new("tar");
    cmd.arg("--numeric-owner").arg("-C").arg(&rootfs).arg("-cf").arg(&tar).arg(".");
    let out = run_command(cmd, Capture::Pipes, TIMEOUT, || {})?;
    if !out.status.success() {
        return Err(format!("packing the test image's root filesystem failed:\n{}", show(&out)));
    }
    let mut cmd = podman_command();
    cmd.args(["import", "--change", r#"CMD ["/bin/sh"]"#, "--message", "heapcap container tests"]).arg(&tar).arg(image);
    let out = run_command(cmd, Capture::Pipes, TIMEOUT, || {})?;
    if !out.status.success() {
        return Err(format!("`podman import {} {image}` failed:\n{}\n{SETUP}", tar.display(), show(&out)));
    }
    Ok(())
}

/// Holds an exclusive `flock` on `path` (created if needed) until dropped.
fn lock_exclusive(path: &Path) -> Result<File, String> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot open the lock file {}: {e}", path.display()))?;
    loop {
        // SAFETY: flock only acts on the open descriptor that `file` owns for this whole call.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(file);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(format!("cannot lock {}: {e}", path.display()));
        }
    }
}

/// `podman run --rm --pull never --network none --name NAME OPTS... IMAGE COMMAND...` with
/// the test image: the container's exit status and output (podman's own
/// errors exit with 125-127). Panics after [`TIMEOUT`] (the container is
/// removed first).
pub fn podman_run(opts: &[&str], command: &[&str]) -> Output {
    podman_run_with_timeout(opts, command, TIMEOUT)
}

/// `podman GLOBAL... run --rm --pull never --network none --name NAME OPTS... IMAGE
/// COMMAND...`: [`podman_run`] with podman's global options (e.g.
/// `--runtime /path/to/heapcap-runtime`, `--hooks-dir DIR`), a timeout, and
/// any image (`None`: the test image). `run` options go in `opts`
/// (`--annotation K=V`, `--security-opt seccomp=PROFILE.json`, `-v ...`).
pub fn podman_run_full(
    global: &[&str],
    opts: &[&str],
    image: Option<&str>,
    command: &[&str],
    timeout: Duration,
) -> Output {
    let test_image = podman_image();
    let name = unique_id("podman");
    podman_run_inner(global, image.unwrap_or(test_image), &name, opts, command, timeout)
        .unwrap_or_else(|timed_out| panic!("{timed_out}"))
}

pub fn podman_run_with_timeout(opts: &[&str], command: &[&str], timeout: Duration) -> Output {
    podman_run_full(&[], opts, None, command, timeout)
}

fn podman_run_inner(
    global: &[&str],
    image: &str,
    name: &str,
    opts: &[&str],
    command: &[&str],
    timeout: Duration,
) -> Result<Output, String> {
    let mut cmd = podman_command();
    // No registry is reachable: a missing image fails at once instead of after three pull attempts.
    cmd.args(global)
        .args(["run", "--rm", "--pull", "never", "--network", "none", "--name", name])
        .args(opts)
        .arg(image)
        .args(command);
    run_command(cmd, Capture::Pipes, timeout, || podman_force_remove(name))
}

/// `podman rm -f -t 0 NAME`; never panics.
fn podman_force_remove(name: &str) {
    let mut cmd = podman_command();
    cmd.args(["rm", "--force", "--ignore", "--time", "0", name]);
    match run_command(cmd, Capture::Pipes, CLEANUP_TIMEOUT, || {}) {
        Ok(out) if out.status.success() => {}
        Ok(out) => eprintln!("cleanup: `podman rm -f {name}` failed:\n{}", show(&out)),
        Err(timed_out) => eprintln!("cleanup: `podman rm -f {name}` hung:\n{timed_out}"),
    }
}

/// `-v SOURCE:DEST:ro` arguments for `podman run` that bind the host's `/usr`
/// and `/lib*` read-only, like [`Bundle::with_host_system`].
pub fn podman_host_system_volumes() -> Vec<String> {
    host_system_mounts()
        .into_iter()
        .flat_map(|(source, destination)| ["-v".to_string(), format!("{}:{destination}:ro", source.display())])
        .collect()
}

// ------------------------------------------------------------------ processes

/// Where a command's stdout and stderr go.
enum Capture {
    /// Pipes, read into the `Output`.
    Pipes,
    /// Files (created afresh), read into the `Output` when the command ends;
    /// for commands that leave processes behind holding them (`create`).
    Files { stdout: PathBuf, stderr: PathBuf },
}

/// Runs `cmd` (stdin from /dev/null, own process group) and captures its
/// status and output; kills it and panics with what it said after `timeout`.
/// For other programs the tests run, e.g. `heapcapd` or `heapcap ps`.
pub fn run_captured(cmd: Command, timeout: Duration) -> Output {
    run_or_panic(cmd, Capture::Pipes, timeout, || {})
}

/// [`run_command`], panicking on a timeout.
fn run_or_panic(cmd: Command, capture: Capture, timeout: Duration, on_timeout: impl FnOnce()) -> Output {
    run_command(cmd, capture, timeout, on_timeout).unwrap_or_else(|timed_out| panic!("{timed_out}"))
}

/// Runs `cmd` in its own process group with stdin from /dev/null and
/// collects its status and output. After `timeout` it calls `on_timeout`
/// (which should end whatever the command started, e.g. delete the
/// container), kills the command's process group and returns an error with
/// everything it said. Panics if the command cannot be started.
fn run_command(
    mut cmd: Command,
    capture: Capture,
    timeout: Duration,
    on_timeout: impl FnOnce(),
) -> Result<Output, String> {
    let shown = format!("{cmd:?}");
    cmd.process_group(0).stdin(Stdio::null());
    match &capture {
        Capture::Pipes => {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        Capture::Files { stdout, stderr } => {
            let create =
                |path: &Path| File::create(path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
            cmd.stdout(create(stdout)).stderr(create(stderr));
        }
    }
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start `{shown}`: {e}; {SETUP}"));
    let readers = match (child.stdout.take(), child.stderr.take()) {
        (Some(out), Some(err)) => Some((collect(out), collect(err))),
        _ => None,
    };

    let status = wait_with_timeout(&mut child, timeout);
    if status.is_none() {
        on_timeout();
        // SAFETY: kill(2) with a negative pid signals the process group that
        // was created for the child (process_group(0)); no memory is involved.
        unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
        let _ = child.kill();
        let _ = child.wait();
    }
    let (out, err) = match (readers, &capture) {
        (Some((out, err)), _) => {
            // After a timeout, something else may still hold the pipes: wait a little only.
            let until = Instant::now() + Duration::from_secs(2);
            while status.is_none() && !(out.is_finished() && err.is_finished()) && Instant::now() < until {
                thread::sleep(Duration::from_millis(20));
            }
            let take = |reader: thread::JoinHandle<Vec<u8>>| {
                if status.is_some() || reader.is_finished() {
                    reader.join().expect("reader thread")
                } else {
                    b"(still held open by some process)\n".to_vec()
                }
            };
            (take(out), take(err))
        }
        (None, Capture::Files { stdout, stderr }) => {
            (fs::read(stdout).unwrap_or_default(), fs::read(stderr).unwrap_or_default())
        }
        (None, Capture::Pipes) => unreachable!("piped commands have readers"),
    };
    match status {
        Some(status) => Ok(Output { status, stdout: out, stderr: err }),
        None => Err(format!(
            "`{shown}` did not finish within {timeout:?}; cleaned up and killed it\n\
             --- stdout ---\n{}--- stderr ---\n{}--- end ---",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        )),
    }
}

fn collect(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        // A read error just ends the capture; the test sees what came before.
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

/// Waits for `child` up to `timeout`; `None` if it is still running.
fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => {
                thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            Ok(None) => return None,
            Err(e) => panic!("waiting for process {}: {e}", child.id()),
        }
    }
}

// ------------------------------------------------------------------ output

#[path = "../fixture/mod.rs"]
mod fixture;
#[allow(unused_imports)] // each test file uses a different subset
pub use fixture::{
    assert_at_quota, fixture_result, parse_allocated, parse_allocated_line, parse_children, quota_slack, show, stderr,
    stdout, MIB,
};

/// podman's default seccomp profile answers `move_pages` with EPERM (an unconfined container gets
/// 0: nothing to move). Runs that probe with python3 from the host's /usr under
/// `podman GLOBAL run OPTS`, so a test can show a profile still holds podman's own rules.
pub fn podman_move_pages(global: &[&str], opts: &[&str]) -> Output {
    let script = "import ctypes, os; libc = ctypes.CDLL(None, use_errno=True); \
                  r = libc.syscall(279, 0, 0, 0, 0, 0, 0); print('move_pages', r, os.strerror(ctypes.get_errno()) if r else 'ok')";
    let volumes = podman_host_system_volumes();
    let mut all: Vec<&str> = opts.to_vec();
    all.extend(volumes.iter().map(String::as_str));
    podman_run_full(global, &all, None, &["/usr/bin/python3", "-c", script], TIMEOUT)
}
