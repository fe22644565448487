//! Rootless podman as a real non-root user: [`USER`] (`heapcap-rootless`, made by
//! `scripts/setup-runtimes.sh` with subordinate ids in /etc/subuid and /etc/subgid and its
//! `XDG_RUNTIME_DIR` /run/user/UID), the test image in that user's own podman storage, heapcap's
//! binaries where that user may run them, commands run as that user ([`User::command`]: root drops
//! to it with `setpriv`, with a login's environment and nothing else), and that user's own heapcapd
//! started with no flags ([`UserDaemon`]).
//!
//! Every rootless test uses the user's one runtime directory (the hooks as installed find heapcapd
//! there: podman runs hooks with no environment), so they take turns: [`User::exclusive`].

use std::fs::{self, File};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::binaries::bin_dir;
use crate::daemon::holder_pid_on;
use crate::ids::{unique_id, TempDir};
use crate::podman::{image_name, lock_exclusive, pack_rootfs};
use crate::process::{run_captured, run_command, show, Capture, TIMEOUT};
use crate::runtime::{require_root, SETUP};

/// The non-root user the rootless tests run as (`scripts/setup-runtimes.sh` creates it).
pub const USER: &str = "heapcap-rootless";

/// heapcap's binaries, as the tests give them to the user.
const BINARIES: [&str; 5] = ["heapcap", "heapcapd", "heapcap-holder", "heapcap-runtime", "heapcap-hook"];

/// The rootless user, checked: it exists, has subordinate ids and a private runtime directory.
#[derive(Debug)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    /// Its `XDG_RUNTIME_DIR` (/run/user/UID).
    pub runtime_dir: PathBuf,
    /// heapcap's binaries, copied where the user may run them (0755 all the way down).
    pub bin: PathBuf,
    /// What the user's heapcapd uses with no flags: `$XDG_RUNTIME_DIR/heapcap`.
    pub heapcap_dir: PathBuf,
}

/// The rootless user; panics, saying what to run, if the host lacks it.
pub fn user() -> &'static User {
    static USER_: OnceLock<Result<User, String>> = OnceLock::new();
    match USER_.get_or_init(find_user) {
        Ok(user) => user,
        Err(message) => panic!("{message}"),
    }
}

fn find_user() -> Result<User, String> {
    require_root()?;
    let passwd = fs::read_to_string("/etc/passwd").map_err(|e| format!("cannot read /etc/passwd: {e}"))?;
    let entry = passwd
        .lines()
        .find(|l| l.split(':').next() == Some(USER))
        .ok_or_else(|| format!("there is no user {USER} for the rootless tests: {SETUP}"))?;
    let fields: Vec<&str> = entry.split(':').collect();
    let (uid, gid, home): (u32, u32, PathBuf) = match fields.as_slice() {
        [_, _, uid, gid, _, home, ..] => (
            uid.parse().map_err(|_| format!("bad uid in {entry:?}"))?,
            gid.parse().map_err(|_| format!("bad gid in {entry:?}"))?,
            PathBuf::from(home),
        ),
        _ => return Err(format!("malformed /etc/passwd line {entry:?}")),
    };
    if uid == 0 {
        return Err(format!("{USER} has uid 0: the rootless tests need a user that is not root"));
    }
    for map in ["/etc/subuid", "/etc/subgid"] {
        let text = fs::read_to_string(map).unwrap_or_default();
        if !text.lines().any(|l| l.starts_with(&format!("{USER}:")) || l.starts_with(&format!("{uid}:"))) {
            return Err(format!("{USER} has no subordinate ids in {map} (rootless podman needs them): {SETUP}"));
        }
    }
    let runtime_dir = PathBuf::from(format!("/run/user/{uid}"));
    let meta = fs::metadata(&runtime_dir)
        .map_err(|e| format!("{USER}'s XDG_RUNTIME_DIR {} is missing ({e}): {SETUP}", runtime_dir.display()))?;
    if meta.uid() != uid || meta.mode() & 0o777 != 0o700 {
        return Err(format!(
            "{USER}'s XDG_RUNTIME_DIR {} must be its own, mode 0700 (it is uid {}, mode {:o}): {SETUP}",
            runtime_dir.display(),
            meta.uid(),
            meta.mode() & 0o777
        ));
    }
    for program in ["setpriv", "newuidmap", "newgidmap", "podman"] {
        if !["/usr/bin", "/bin", "/usr/sbin", "/sbin"].iter().any(|d| Path::new(d).join(program).exists()) {
            return Err(format!("{program} is missing (rootless podman tests): {SETUP}"));
        }
    }
    let bin = copy_binaries()?;
    let heapcap_dir = runtime_dir.join("heapcap");
    Ok(User { uid, gid, home, runtime_dir, bin, heapcap_dir })
}

/// heapcap's binaries copied into a fresh directory the user may read and run (the build's own
/// directory may sit in a home only root can enter).
fn copy_binaries() -> Result<PathBuf, String> {
    // Those of test processes that have ended go (nothing else removes them).
    for entry in fs::read_dir("/tmp").map_err(|e| format!("cannot list /tmp: {e}"))?.flatten() {
        let name = entry.file_name();
        let pid =
            name.to_str().and_then(|n| n.strip_prefix("heapcap-rootless-bin-")).and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    let dir = PathBuf::from(format!("/tmp/heapcap-rootless-bin-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
    for b in BINARIES {
        let to = dir.join(b);
        fs::copy(bin_dir().join(b), &to).map_err(|e| format!("cannot copy {b} to {}: {e}", to.display()))?;
        fs::set_permissions(&to, fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
    }
    Ok(dir)
}

/// Holds the rootless tests' turn (a file lock, so also across test processes) until dropped.
#[derive(Debug)]
pub struct Turn(#[allow(dead_code)] File);

impl User {
    /// Wait for this test's turn with the user's runtime directory and podman configuration,
    /// and check that no heapcapd of the user is left listening from an earlier run.
    pub fn exclusive(&self) -> Turn {
        let lock = lock_exclusive(Path::new("/tmp/heapcap-rootless-tests.lock")).unwrap_or_else(|e| panic!("{e}"));
        let control = self.heapcap_dir.join(heapcap_env::paths::CONTROL_FILE);
        assert!(
            UnixStream::connect(&control).is_err(),
            "a heapcapd of {USER} is already listening on {}: stop it (a leftover of an earlier run)",
            control.display()
        );
        Turn(lock)
    }

    /// `PROGRAM ARGS...` run as the user: `setpriv` to its uid, gid and groups, with a login's
    /// environment only (HOME, USER, LOGNAME, XDG_RUNTIME_DIR, PATH with heapcap's binaries first),
    /// in its home directory.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("setpriv");
        cmd.arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg("--init-groups")
            .arg("--")
            .arg("env")
            .arg("-i")
            .arg(format!("HOME={}", self.home.display()))
            .arg(format!("USER={USER}"))
            .arg(format!("LOGNAME={USER}"))
            .arg(format!("XDG_RUNTIME_DIR={}", self.runtime_dir.display()))
            .arg(format!("PATH={}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", self.bin.display()))
            .arg(program)
            .args(args)
            .current_dir(&self.home);
        cmd
    }

    /// [`User::command`] run to the end with a timeout, its output captured.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        run_captured(self.command(program, args), TIMEOUT)
    }

    /// One of heapcap's binaries as the user runs it.
    pub fn binary(&self, name: &str) -> PathBuf {
        assert!(BINARIES.contains(&name), "{name} is not one of heapcap's binaries");
        self.bin.join(name)
    }

    /// The test image in the user's own podman storage (`podman import`ed by the user the first
    /// time, under the same name as root's: a hash of its content).
    pub fn image(&self) -> &'static str {
        static IMAGE: OnceLock<Result<String, String>> = OnceLock::new();
        match IMAGE.get_or_init(|| self.import_image()) {
            Ok(image) => image,
            Err(message) => panic!("{message}"),
        }
    }

    fn import_image(&self) -> Result<String, String> {
        let image = image_name()?;
        if self.run("podman", &["image", "exists", &image]).status.success() {
            return Ok(image);
        }
        let dir = TempDir::new("rootless-image");
        let tar = pack_rootfs(&dir.0)?;
        for path in [&dir.0, &tar] {
            let mode = if path.is_dir() { 0o755 } else { 0o644 };
            fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|e| e.to_string())?;
        }
        let tar = tar.to_str().expect("utf-8 path");
        let out = self.run("podman", &["import", "--change", r#"CMD ["/bin/sh"]"#, tar, &image]);
        if !out.status.success() {
            return Err(format!("`podman import` as {USER} failed (rootless podman):\n{}\n{SETUP}", show(&out)));
        }
        Ok(image)
    }

    /// `podman GLOBAL... run --rm --pull never --network none --name NAME OPTS... IMAGE COMMAND...`
    /// as the user, with the test image; after `timeout` the container is removed and the test
    /// panics with what podman said.
    pub fn podman_run(&self, global: &[&str], opts: &[&str], command: &[&str], timeout: Duration) -> Output {
        let image = self.image();
        let name = unique_id("rootless");
        let mut args: Vec<&str> = global.to_vec();
        args.extend(["run", "--rm", "--pull", "never", "--network", "none", "--name", &name]);
        args.extend(opts);
        args.push(image);
        args.extend(command);
        let cmd = self.command("podman", &args);
        run_command(cmd, Capture::Pipes, timeout, || {
            let _ = self.run("podman", &["rm", "--force", "--ignore", "--time", "0", &name]);
        })
        .unwrap_or_else(|timed_out| panic!("{timed_out}"))
    }

    /// A file owned by the user (its directories made as the user, 0700), with `text`.
    pub fn write_file(&self, path: &Path, text: &str) {
        let dir = path.parent().expect("a file in a directory");
        let out = self.run("mkdir", &["-p", "-m", "0700", dir.to_str().expect("utf-8 path")]);
        assert!(out.status.success(), "mkdir as {USER}: {}", show(&out));
        fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid)).expect("chown to the user");
    }
}

/// The user's own heapcapd, started as the user with no flags at all (so on its defaults:
/// `$XDG_RUNTIME_DIR/heapcap`), its stderr in a log; stopped (with its holder) on drop.
#[derive(Debug)]
pub struct UserDaemon {
    child: Option<Child>,
    log: PathBuf,
    /// heapcapd's agent socket, control socket and holder socket on its defaults.
    pub agent: PathBuf,
    pub control: PathBuf,
    pub holder: PathBuf,
}

impl UserDaemon {
    /// Start `heapcapd` as the user (no flags); wait until both its sockets answer.
    pub fn start(user: &User) -> UserDaemon {
        let log = std::env::temp_dir().join(format!("{}-heapcapd.log", unique_id("rootless")));
        let file = File::create(&log).expect("heapcapd's log");
        let mut cmd = user.command("heapcapd", &[]);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(file);
        let child = cmd.spawn().expect("start heapcapd as the rootless user");
        let paths = heapcap_env::paths::Paths::in_dir(&user.heapcap_dir);
        let mut d =
            UserDaemon { child: Some(child), log, agent: paths.agent, control: paths.control, holder: paths.holder };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(UnixStream::connect(&d.agent).is_ok() && UnixStream::connect(&d.control).is_ok()) {
            if let Some(status) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("the rootless heapcapd exited at start ({status}):\n{}", d.log());
            }
            assert!(Instant::now() < deadline, "the rootless heapcapd did not come up:\n{}", d.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    /// heapcapd's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// What heapcapd logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stop heapcapd (SIGTERM) and its holder, and wait until they are gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the pid of our own child, not yet reaped; no memory involved.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let _ = child.wait();
        }
        if let Some(pid) = holder_pid_on(&self.holder) {
            // SAFETY: kill(2) on the holder's pid, read from /proc just now; no memory involved.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for UserDaemon {
    fn drop(&mut self) {
        self.stop();
        if std::env::var_os("HEAPCAP_TEST_KEEP").is_none() {
            let _ = fs::remove_file(&self.log);
        }
    }
}
