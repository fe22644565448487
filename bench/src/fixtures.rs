//! The C fixtures, compiled with gcc into a fresh work directory at every run.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// A temporary directory removed on drop (kept with `HEAPCAP_BENCH_KEEP=1`).
#[derive(Debug)]
pub struct WorkDir(PathBuf);

impl WorkDir {
    pub fn new() -> Result<WorkDir> {
        let dir = std::env::temp_dir().join(format!("heapcap-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(WorkDir(dir))
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::env::var_os("HEAPCAP_BENCH_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Paths of the built fixtures.
#[derive(Debug)]
pub struct Fixtures {
    /// Tight loop of mmap(4 KiB RW anon) + munmap; prints µs per pair.
    pub nbench: PathBuf,
    /// The same, static (for the busybox-free container root).
    pub nbench_static: PathBuf,
    /// The floor: a minimal listener notifying heapcap's set of calls, `minsup SYNC PROGRAM ARGS...`.
    pub minsup: PathBuf,
    /// Loads an allow-only filter, execs its arguments.
    pub allowall: PathBuf,
    /// Multi-threaded malloc stress: `stress THREADS ITERATIONS`.
    pub stress: PathBuf,
    /// Hovers just under its quota with N VMAs: `hover VMAS CAP ITERATIONS`.
    pub hover: PathBuf,
    /// The workload matrix's shapes: `shapes SHAPE SIZE ITERS THREADS PROCS WORK BALLAST`.
    pub shapes: PathBuf,
}

fn gcc(src: &Path, out: &Path, extra: &[&str]) -> Result<()> {
    let o = Command::new("gcc")
        .args(["-O2", "-Wall", "-o"])
        .arg(out)
        .arg(src)
        .args(extra)
        .output()
        .context("run gcc (install it: apt-get install gcc libc6-dev)")?;
    if !o.status.success() {
        bail!("gcc {} failed:\n{}", src.display(), String::from_utf8_lossy(&o.stderr));
    }
    Ok(())
}

/// Compile every fixture from `src_dir` into `work`.
pub fn build(src_dir: &Path, work: &Path) -> Result<Fixtures> {
    let c = |name: &str| src_dir.join(format!("{name}.c"));
    let b = |name: &str| work.join(name);
    for name in ["nbench", "minsup", "allowall", "hover"] {
        gcc(&c(name), &b(name), &[])?;
    }
    gcc(&c("nbench"), &b("nbench-static"), &["-static"])?;
    gcc(&c("stress"), &b("stress"), &["-pthread"])?;
    gcc(&c("shapes"), &b("shapes"), &["-pthread"])?;
    Ok(Fixtures {
        nbench: b("nbench"),
        nbench_static: b("nbench-static"),
        minsup: b("minsup"),
        allowall: b("allowall"),
        stress: b("stress"),
        hover: b("hover"),
        shapes: b("shapes"),
    })
}
