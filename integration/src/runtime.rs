//! The OCI runtimes the tests drive directly (runc, crun), and the checks that make a host
//! that cannot run them fail loudly, with what to install or fix, instead of skipping tests.

use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::bundle::Bundle;
use crate::ids::unique_id;
use crate::podman::CONTAINERS_CONF;
use crate::process::{show, stderr, stdout, TIMEOUT};

/// What to do when the host is not ready.
pub(crate) const SETUP: &str =
    "run `scripts/setup-runtimes.sh` as root: it installs runc, crun, podman, busybox-static \
     and libc6-dev and fixes this host's cgroup set-up";

/// An OCI runtime the tests drive directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Runtime {
    /// `runc`.
    Runc,
    /// `crun`.
    Crun,
}

impl Runtime {
    /// Both runtimes, for tests that run the same thing in each.
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
        require_program(self.command(), bin)?;
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
pub(crate) fn diagnose(said: &str) -> String {
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

/// `Ok` if `cmd --version` (`cmd` runs `program`) succeeds; otherwise what to install.
pub(crate) fn require_program(mut cmd: Command, program: &str) -> Result<(), String> {
    let version =
        cmd.arg("--version").stdin(Stdio::null()).output().map_err(|e| {
            format!("the container tests need `{program}`, but `{program} --version` failed: {e}; {SETUP}")
        })?;
    if !version.status.success() {
        return Err(format!("`{program} --version` failed:\n{}\n{SETUP}", show(&version)));
    }
    Ok(())
}

/// `Ok` if this process runs as root, as rootful runc, crun and podman need.
pub(crate) fn require_root() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        Ok(())
    } else {
        Err(format!("the container tests run rootful runc, crun and podman and need root (euid is {euid})"))
    }
}
