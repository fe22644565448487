//! heapcap's own binaries (`heapcap`, `heapcapd`, `heapcap-holder`, `heapcap-runtime`,
//! `heapcap-hook`), built from this workspace once per test process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::{json, Value};

/// Build heapcap's binaries (`heapcap`, `heapcapd`, `heapcap-holder`, `heapcap-runtime`,
/// `heapcap-hook`) once per test process; their directory.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf();
        let status = Command::new(&cargo)
            .args(["build", "-q"])
            .args(BINARIES.iter().flat_map(|b| ["-p", b]))
            .current_dir(&workspace)
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build of {BINARIES:?} failed");
        let target =
            std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace.join("target"));
        let dir = target.join("debug");
        for b in BINARIES {
            assert!(dir.join(b).exists(), "no {b} in {}", dir.display());
        }
        dir
    })
}

const BINARIES: [&str; 5] = ["heapcap", "heapcapd", "heapcap-holder", "heapcap-runtime", "heapcap-hook"];

/// One of heapcap's binaries (see [`bin_dir`]), built.
pub fn binary(name: &str) -> PathBuf {
    assert!(BINARIES.contains(&name), "{name} is not one of the binaries the tests build");
    bin_dir().join(name)
}

/// `heapcap` (the CLI), built.
pub fn heapcap() -> Command {
    Command::new(bin_dir().join("heapcap"))
}

/// A `config.json` prestart hook entry that runs `heapcap-hook prestart` reporting to the agent
/// socket `agent`, with `env` (`KEY=VALUE`) added to its environment.
pub fn prestart_hook(agent: &Path, env: &[&str]) -> Value {
    let mut vars = vec![format!("HEAPCAP_SOCKET={}", agent.display())];
    vars.extend(env.iter().map(|s| s.to_string()));
    json!({
        "path": binary("heapcap-hook").to_str().expect("utf-8 path"),
        "args": ["heapcap-hook", "prestart"],
        "env": vars,
        "timeout": 10,
    })
}
