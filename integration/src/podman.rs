//! podman with the harness's image and configuration: the bundles' root filesystem imported
//! once as `localhost/heapcap-test:<hash>`, `podman run` with a timeout, and host system
//! directories as volumes.

use std::collections::hash_map::DefaultHasher;
use std::fs::{self, File, OpenOptions};
use std::hash::{Hash, Hasher};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use crate::fixture::ALLOC_STATIC;
use crate::ids::{unique_id, TempDir};
use crate::process::{run_captured, run_command, show, stderr, stdout, Capture, CLEANUP_TIMEOUT, TIMEOUT};
use crate::rootfs::{busybox, host_system_mounts, populate_rootfs};
use crate::runtime::{diagnose, require_program, require_root, SETUP};

/// The `containers.conf` every podman command of the harness runs with (as
/// `CONTAINERS_CONF`, which replaces the system ones).
pub(crate) const CONTAINERS_CONF: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/containers/containers.conf");

/// The repository of the podman test image; the tag is a hash of its content.
const IMAGE_REPO: &str = "localhost/heapcap-test";

/// Bump when the root filesystem's layout changes (it is part of the image tag).
const IMAGE_LAYOUT: u32 = 1;

/// `podman` with `CONTAINERS_CONF` set to the harness's `containers/containers.conf`,
/// for podman subcommands the harness does not wrap.
pub fn command() -> Command {
    let mut cmd = Command::new("podman");
    cmd.env("CONTAINERS_CONF", CONTAINERS_CONF);
    cmd
}

/// The podman test image (`localhost/heapcap-test:<content hash>`): the
/// bundles' root filesystem (busybox, `/alloc`), imported with `podman import`
/// the first time any test process needs this content (under a file lock, so
/// parallel test processes do not race), then checked by running `true` in
/// it. Panics, saying what to fix, if podman cannot do that.
pub fn image() -> &'static str {
    static IMAGE: OnceLock<Result<String, String>> = OnceLock::new();
    match IMAGE.get_or_init(prepare_image) {
        Ok(image) => image,
        Err(message) => panic!("{message}"),
    }
}

fn prepare_image() -> Result<String, String> {
    require_root()?;
    require_program(command(), "podman")?;
    if !Path::new(CONTAINERS_CONF).is_file() {
        return Err(format!("the harness's containers.conf {CONTAINERS_CONF} is missing"));
    }
    let image = image_name()?;

    let lock_path = std::env::temp_dir().join("heapcap-test-podman-image.lock");
    let lock = lock_exclusive(&lock_path)?;
    let exists = run_command(
        {
            let mut cmd = command();
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
    let out = run_inner(&[], &image, &name, &[], &["true"], TIMEOUT)?;
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

/// The test image's name: its repository and a hash of its content as the tag.
pub(crate) fn image_name() -> Result<String, String> {
    Ok(format!("{IMAGE_REPO}:{:016x}", image_hash()?))
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

/// The test image's root filesystem packed as `rootfs.tar` in `dir` (for `podman import`).
pub(crate) fn pack_rootfs(dir: &Path) -> Result<std::path::PathBuf, String> {
    let rootfs = dir.join("rootfs");
    fs::create_dir_all(&rootfs).map_err(|e| format!("cannot create {}: {e}", rootfs.display()))?;
    populate_rootfs(&rootfs);
    let tar = dir.join("rootfs.tar");
    let mut cmd = Command::new("tar");
    cmd.arg("--numeric-owner").arg("-C").arg(&rootfs).arg("-cf").arg(&tar).arg(".");
    let out = run_command(cmd, Capture::Pipes, TIMEOUT, || {})?;
    if !out.status.success() {
        return Err(format!("packing the test image's root filesystem failed:\n{}", show(&out)));
    }
    Ok(tar)
}

fn import_image(image: &str) -> Result<(), String> {
    let dir = TempDir::new("image");
    let tar = pack_rootfs(&dir.0)?;
    let mut cmd = command();
    cmd.args(["import", "--change", r#"CMD ["/bin/sh"]"#, "--message", "heapcap container tests"]).arg(&tar).arg(image);
    let out = run_command(cmd, Capture::Pipes, TIMEOUT, || {})?;
    if !out.status.success() {
        return Err(format!("`podman import {} {image}` failed:\n{}\n{SETUP}", tar.display(), show(&out)));
    }
    Ok(())
}

/// Holds an exclusive `flock` on `path` (created if needed) until dropped.
pub(crate) fn lock_exclusive(path: &Path) -> Result<File, String> {
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
pub fn run(opts: &[&str], command: &[&str]) -> Output {
    run_full(&[], opts, None, command, TIMEOUT)
}

/// `podman GLOBAL... run --rm --pull never --network none --name NAME OPTS... IMAGE
/// COMMAND...`: [`run`] with podman's global options (e.g.
/// `--runtime /path/to/heapcap-runtime`, `--hooks-dir DIR`), a timeout, and
/// any image (`None`: the test image). `run` options go in `opts`
/// (`--annotation K=V`, `--security-opt seccomp=PROFILE.json`, `-v ...`).
pub fn run_full(global: &[&str], opts: &[&str], image: Option<&str>, command: &[&str], timeout: Duration) -> Output {
    let test_image = self::image();
    let name = unique_id("podman");
    run_inner(global, image.unwrap_or(test_image), &name, opts, command, timeout)
        .unwrap_or_else(|timed_out| panic!("{timed_out}"))
}

fn run_inner(
    global: &[&str],
    image: &str,
    name: &str,
    opts: &[&str],
    command: &[&str],
    timeout: Duration,
) -> Result<Output, String> {
    let mut cmd = self::command();
    // No registry is reachable: a missing image fails at once instead of after three pull attempts.
    cmd.args(global)
        .args(["run", "--rm", "--pull", "never", "--network", "none", "--name", name])
        .args(opts)
        .arg(image)
        .args(command);
    run_command(cmd, Capture::Pipes, timeout, || force_remove(name))
}

/// `podman rm -f -t 0 NAME`; never panics.
fn force_remove(name: &str) {
    let mut cmd = command();
    cmd.args(["rm", "--force", "--ignore", "--time", "0", name]);
    match run_command(cmd, Capture::Pipes, CLEANUP_TIMEOUT, || {}) {
        Ok(out) if out.status.success() => {}
        Ok(out) => eprintln!("cleanup: `podman rm -f {name}` failed:\n{}", show(&out)),
        Err(timed_out) => eprintln!("cleanup: `podman rm -f {name}` hung:\n{timed_out}"),
    }
}

/// `podman GLOBAL... exec NAME COMMAND...` in a container of the test image started for it
/// (`podman GLOBAL... run -d --pull never --network none --name NAME OPTS... IMAGE /bin/sleep 60`,
/// removed after with `podman rm -f`): the exec's status and output, e.g. to show that an exec'd
/// process is under what `OPTS` asked for. Each podman command gets 60 s; panics if the
/// container does not start.
pub fn run_detached_and_exec(global: &[&str], opts: &[&str], command: &[&str]) -> Output {
    let name = unique_id("podman-exec");
    let mut run = self::command();
    run.args(global).args(["run", "-d", "--pull", "never", "--network", "none", "--name", &name]).args(opts).args([
        image(),
        "/bin/sleep",
        "60",
    ]);
    let started = run_captured(run, Duration::from_secs(60));
    assert!(started.status.success(), "{}", show(&started));
    let mut exec = self::command();
    exec.args(global).args(["exec", &name]).args(command);
    let out = run_captured(exec, Duration::from_secs(60));
    let mut rm = self::command();
    rm.args(["rm", "-f", "-t", "0", &name]);
    let _ = run_captured(rm, Duration::from_secs(60));
    out
}

/// `-v SOURCE:DEST:ro` arguments for `podman run` that bind the host's `/usr`
/// and `/lib*` read-only, like
/// [`Bundle::with_host_system`](crate::bundle::Bundle::with_host_system).
pub fn host_system_volumes() -> Vec<String> {
    host_system_mounts()
        .into_iter()
        .flat_map(|(source, destination)| ["-v".to_string(), format!("{}:{destination}:ro", source.display())])
        .collect()
}

/// podman's default seccomp profile answers `move_pages` with EPERM (an unconfined container gets
/// 0: nothing to move). Runs that probe with python3 from the host's /usr under
/// `podman GLOBAL run OPTS`, so a test can show a profile still holds podman's own rules.
pub fn move_pages(global: &[&str], opts: &[&str]) -> Output {
    let script = "import ctypes, os; libc = ctypes.CDLL(None, use_errno=True); \
                  r = libc.syscall(279, 0, 0, 0, 0, 0, 0); print('move_pages', r, os.strerror(ctypes.get_errno()) if r else 'ok')";
    let volumes = host_system_volumes();
    let mut all: Vec<&str> = opts.to_vec();
    all.extend(volumes.iter().map(String::as_str));
    run_full(global, &all, None, &["/usr/bin/python3", "-c", script], TIMEOUT)
}
