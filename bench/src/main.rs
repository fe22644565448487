//! `heapcap-bench`: heapcap's benchmarks (issue 7), every comparison run interleaved
//! (A B A B ...) in one run, written as `bench.md` plus SVG plots.
//!
//! Benchmarks are not tests: no figure ever fails the run. It exits non-zero only when the
//! harness itself breaks (a fixture does not build, a side cannot run, a result cannot be parsed).
#![forbid(unsafe_code)]

mod container;
mod fixtures;
mod matrix;
mod nearquota;
mod plot;
mod programs;
mod stats;
mod strict;
mod syscall;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;

/// Measure what a heapcap quota costs; write `bench.md` and SVG plots.
#[derive(Debug, Parser)]
#[command(version)]
pub struct Args {
    /// Where `heapcap`, `heapcapd`, `heapcap-holder`, `heapcap-hook` and `heapcap-runtime` (release builds) are.
    #[arg(long, default_value = "target/release")]
    pub bin_dir: PathBuf,
    /// Where the fixtures' C sources are.
    #[arg(long, default_value = "bench/fixtures")]
    pub fixtures: PathBuf,
    /// Where `bench.md` and the SVG plots go.
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
    /// A tiny configuration (seconds): checks that the harness still runs; its figures mean nothing.
    #[arg(long)]
    pub tiny: bool,
    /// Rounds of each interleaved comparison (default 7, tiny 2).
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Notified mmap+munmap pairs per run in measurement 1 (default 200000, tiny 2000).
    #[arg(long)]
    pub calls: Option<u64>,
    /// Measurements to run, comma-separated, from 1 (syscall), 2 (programs), 3 (near quota), 4 (scale), 5 (container
    /// start), 6 (workload matrix), 7 (strict mode).
    #[arg(long, value_delimiter = ',', default_value = "1,6,2,3,4,5,7")]
    pub only: Vec<u32>,
    /// Container counts for measurement 4.
    #[arg(long, value_delimiter = ',')]
    pub scale: Option<Vec<usize>>,
    /// The command line to print in the results file (what was run).
    #[arg(long, default_value = "scripts/bench.sh")]
    pub command_line: String,
}

impl Args {
    pub fn rounds(&self) -> usize {
        self.rounds.unwrap_or(if self.tiny { 2 } else { 15 })
    }
    pub fn calls(&self) -> u64 {
        self.calls.unwrap_or(if self.tiny { 2000 } else { 200_000 })
    }
    pub fn heapcap(&self) -> PathBuf {
        self.bin_dir.join("heapcap")
    }
    pub fn heapcapd(&self) -> PathBuf {
        self.bin_dir.join("heapcapd")
    }
    pub fn holder(&self) -> PathBuf {
        self.bin_dir.join("heapcap-holder")
    }
}

/// One measurement's part of the results file, and what broke in it.
#[derive(Debug, Default)]
pub struct Section {
    pub markdown: String,
    pub failures: Vec<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(n) => {
            eprintln!("heapcap-bench: {n} part(s) of the harness failed (see above and the results file)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("heapcap-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<usize> {
    let started = Instant::now();
    let hook_and_shim = [args.bin_dir.join("heapcap-hook"), args.bin_dir.join("heapcap-runtime")];
    for bin in [args.heapcap(), args.heapcapd(), args.holder()].into_iter().chain(hook_and_shim) {
        anyhow::ensure!(
            bin.exists(),
            "no {} (build with `cargo build --release -p heapcap -p heapcapd -p heapcap-holder -p heapcap-hook \
             -p heapcap-runtime`)",
            bin.display()
        );
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let work = fixtures::WorkDir::new()?;
    let fx = fixtures::build(&args.fixtures, work.path())?;
    let mut sections = Vec::new();
    for m in &args.only {
        eprintln!("== measurement {m}");
        let section = match m {
            1 => syscall::run(args, &fx, work.path()),
            2 => programs::run(args, &fx, work.path()),
            3 => nearquota::run(args, &fx),
            4 => container::scale(args, &fx, work.path()),
            5 => container::start(args, &fx, work.path()),
            6 => matrix::run(args, &fx, work.path()),
            7 => strict::run(args, &fx, work.path()),
            other => anyhow::bail!("no measurement {other} (1..7)"),
        };
        sections.push(section.unwrap_or_else(|e| Section {
            markdown: format!("_Measurement {m} did not run: {e:#}_\n\n"),
            failures: vec![format!("measurement {m}: {e:#}")],
        }));
    }
    let failures: Vec<String> = sections.iter().flat_map(|s| s.failures.clone()).collect();
    let md = header(args, started.elapsed().as_secs_f64())?
        + &sections.iter().map(|s| s.markdown.as_str()).collect::<String>()
        + &footer(&failures);
    let path = args.out.join("bench.md");
    std::fs::write(&path, md).with_context(|| format!("write {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    for f in &failures {
        eprintln!("FAILED: {f}");
    }
    Ok(failures.len())
}

fn sh(cmd: &str) -> String {
    std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn header(args: &Args, secs: f64) -> Result<String> {
    let cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2");
    Ok(format!(
        "# heapcap benchmarks\n\n\
         Written by `{cmd}`{tiny} on {date}, in {secs:.0} s.\n\n\
         Machine: {nproc} CPUs ({cpu}), Linux {kernel}, {mem} memory; shared and noisy, so every \
         comparison runs its sides interleaved (A B A B ...) in one run and ratios are what to quote. \
         Spread is min–max over rounds; *paired* figures are computed per round (side minus the \
         same round's baseline) and then summarised.\n\n",
        cmd = args.command_line,
        tiny = if args.tiny { " (tiny configuration: these figures only show the harness runs)" } else { "" },
        date = sh("date -u '+%Y-%m-%d %H:%M UTC'"),
        nproc = sh("nproc"),
        cpu = cpu.trim(),
        kernel = sh("uname -r"),
        mem = sh("free -h | awk '/Mem:/ {print $2}'"),
    ))
}

fn footer(failures: &[String]) -> String {
    if failures.is_empty() {
        return String::new();
    }
    let mut s = String::from("## What failed in this run\n\n");
    for f in failures {
        s += &format!("- {f}\n");
    }
    s + "\n"
}
