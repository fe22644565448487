//! Measurement 2: real programs far below their quota, wall time with heapcap, without, under
//! the kernel's RLIMIT_DATA (prlimit --data), and under the mechanism's two floors (a minimal
//! listener answering CONTINUE, with and without the synchronous wake-up), interleaved; each on
//! one CPU (`taskset`, the supervisor included: a container given one CPU) and on all, in runs of
//! at least 5 s (a program shorter than that runs back to back in one shell, under one
//! supervisor). The floors say how much of a program's slowdown is the mechanism's own.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::fixtures::Fixtures;
use crate::stats::{fmt, fmt_spread, paired, summarize};
use crate::{plot, Args, Section};

const QUOTA: &str = "4Gi";
const RLIMIT_DATA: &str = "4294967296";

pub(crate) const PYTHON: &str = r#"
import sys
for r in range(int(sys.argv[1])):
    xs = [str(i) * 3 for i in range(200000)]
    d = {i: [i] * 10 for i in range(100000)}
    b = [bytearray(100000) for _ in range(200)]
    del xs, d, b
"#;

const NODE: &str = r#"
const n = +process.argv[1];
for (let r = 0; r < n; r++) {
  const xs = []; for (let i = 0; i < 200000; i++) xs.push({ i, s: String(i).repeat(3) });
  const bs = []; for (let i = 0; i < 200; i++) bs.push(Buffer.alloc(100000));
}
"#;

const JAVA: &str = r#"
import java.util.*;
public class Alloc {
    public static void main(String[] a) {
        long sum = 0;
        for (int r = 0; r < Integer.parseInt(a[0]); r++) {
            List<String> xs = new ArrayList<>();
            for (int i = 0; i < 300000; i++) xs.add(Integer.toString(i).repeat(3));
            Map<Integer, int[]> m = new HashMap<>();
            for (int i = 0; i < 100000; i++) m.put(i, new int[10]);
            byte[][] bs = new byte[200][];
            for (int i = 0; i < 200; i++) bs[i] = new byte[100000];
            sum += xs.size() + m.size() + bs.length;
        }
        System.out.println(sum);
    }
}
"#;

/// One C file for gcc alone: many functions, enough to take the optimiser a while.
fn gcc_source(path: &Path, functions: usize) -> Result<()> {
    let mut src = String::from("#include <stdlib.h>\n#include <string.h>\n");
    for f in 0..functions {
        src += &format!(
            "long g{f}(long n) {{ long *v = malloc(n * sizeof *v); long s = 0; \
             for (long i = 0; i < n; i++) v[i] = i * {f} ^ (i >> 3); \
             for (long i = 1; i < n; i++) s += v[i] % (v[i - 1] | 1); free(v); return s; }}\n"
        );
    }
    std::fs::write(path, src)?;
    Ok(())
}

/// A program as `argv`.
#[derive(Debug)]
struct Program {
    name: String,
    argv: Vec<String>,
    /// It starts processes as it goes (a compiler driver, a build): the admission floors
    /// (`minsup` SYNC 2, 3) run too.
    spawns: bool,
}

fn which(name: &str) -> Option<PathBuf> {
    let out = Command::new("sh").args(["-c", &format!("command -v {name}")]).output().ok()?;
    out.status.success().then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The real python3 binary (not a pyenv shim script, which would add its own start-up).
pub(crate) fn python() -> Option<String> {
    let out = Command::new("python3").args(["-c", "import sys; print(sys.executable)"]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn sort_input(path: &Path, lines: u64) -> Result<()> {
    let mut w = BufWriter::new(std::fs::File::create(path)?);
    let mut x: u64 = 0x9E3779B97F4A7C15;
    for _ in 0..lines {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        writeln!(w, "{:016x} {} line of text to sort", x, x % 100_000)?;
    }
    w.flush()?;
    Ok(())
}

pub(crate) fn wall(argv: &[String], dir: &Path) -> Result<f64> {
    let t = Instant::now();
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .current_dir(dir)
        .env("LC_ALL", "C")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("run {argv:?}"))?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("{argv:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(secs)
}

pub fn run(args: &Args, fx: &Fixtures, work: &Path) -> Result<Section> {
    let tiny = args.tiny;
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut programs = Vec::new();
    let mut left_out = Vec::new();
    match python() {
        Some(py) => programs.push(Program {
            spawns: false,
            name: "python3 (lists, dicts, bytearrays)".into(),
            argv: vec![py, "-c".into(), PYTHON.into(), if tiny { "1" } else { "8" }.into()],
        }),
        None => left_out.push("python3 (not found)".to_string()),
    }
    let input = work.join("sort-input.txt");
    sort_input(&input, if tiny { 20_000 } else { 2_000_000 })?;
    let sort = which("sort").context("no sort")?;
    programs.push(Program {
        spawns: false,
        name: format!("sort ({} lines)", if tiny { "20k" } else { "2M" }),
        argv: vec![sort.display().to_string(), "-o".into(), "/dev/null".into(), input.display().to_string()],
    });
    programs.push(Program {
        spawns: false,
        name: "malloc stress (4 threads)".into(),
        argv: vec![fx.stress.display().to_string(), "4".into(), if tiny { "20000" } else { "3000000" }.into()],
    });
    match which("node") {
        Some(node) => programs.push(Program {
            spawns: false,
            name: "node (objects, Buffers)".into(),
            argv: vec![node.display().to_string(), "-e".into(), NODE.into(), if tiny { "1" } else { "10" }.into()],
        }),
        None => left_out.push("node (not found)".to_string()),
    }
    match (which("java"), which("javac")) {
        (Some(java), Some(javac)) => {
            std::fs::write(work.join("Alloc.java"), JAVA)?;
            let built = Command::new(&javac).arg("Alloc.java").current_dir(work).status();
            match built {
                Ok(s) if s.success() => programs.push(Program {
                    spawns: false,
                    name: "JVM (openjdk: lists, maps, arrays; heap pinned)".into(),
                    // The heap pinned: under a quota the JVM sizes its heap from the quota (it
                    // reads sysinfo, as under a cgroup limit), and a smaller heap collects more
                    // often; pinned, both sides run the same collector work and only the
                    // decisions differ.
                    argv: vec![
                        java.display().to_string(),
                        "-Xms512m".into(),
                        "-Xmx2g".into(),
                        "-cp".into(),
                        work.display().to_string(),
                        "Alloc".into(),
                        if tiny { "1" } else { "20" }.into(),
                    ],
                }),
                _ => left_out.push("the JVM (javac failed)".to_string()),
            }
        }
        _ => left_out.push("the JVM (no java and javac)".to_string()),
    }
    match which("gcc") {
        Some(gcc) => {
            let c = work.join("gcc-input.c");
            gcc_source(&c, if tiny { 20 } else { 400 })?;
            programs.push(Program {
                spawns: true,
                name: "gcc -O2 (one file)".into(),
                argv: vec![
                    gcc.display().to_string(),
                    "-O2".into(),
                    "-c".into(),
                    "-o".into(),
                    "/dev/null".into(),
                    c.display().to_string(),
                ],
            });
            let project = work.join("programs-project");
            crate::matrix::write_project(&project, if tiny { 3 } else { 31 })?;
            programs.push(Program {
                spawns: true,
                name: format!("make -j{cpus} (C project, from clean)"),
                argv: vec![
                    "sh".into(),
                    "-c".into(),
                    format!("cd \"$0\" && make -s clean && make -s -j{cpus}"),
                    project.display().to_string(),
                ],
            });
        }
        None => left_out.push("gcc and the build (no gcc)".to_string()),
    }
    // Absolute: the programs run in the work directory.
    let heapcap = std::fs::canonicalize(args.heapcap()).context("no heapcap binary")?.display().to_string();
    // taskset comes first: on one CPU, the supervisor shares it with the program.
    let wrap = |side: usize, one_cpu: bool, argv: &[String]| -> Vec<String> {
        let mut v: Vec<String> = if one_cpu { vec!["taskset".into(), "-c".into(), "0".into()] } else { vec![] };
        match side {
            0 => {}
            1 => v.extend([heapcap.clone(), "run".into(), "--limit".into(), QUOTA.into(), "--".into()]),
            2 => v.extend(["prlimit".into(), format!("--data={RLIMIT_DATA}"), "--".into()]),
            // The floors (SYNC 0, 1), then the admission floors (SYNC 2, 3).
            _ => v.extend([fx.minsup.display().to_string(), (side - 3).to_string()]),
        }
        v.extend(argv.iter().cloned());
        v
    };
    // Rounds of at least 5 s each (a few in all: a full run of this measurement is long).
    let rounds = args.rounds().min(5);
    let min_run = if tiny { 0.0 } else { 5.0 };
    let mut failures = Vec::new();
    let mut md = format!(
        "## 2. Real programs far below their quota\n\n\
         Wall time of each program alone, under `heapcap run --limit {QUOTA}`, under `prlimit --data={RLIMIT_DATA}` \
         (RLIMIT_DATA 4 GiB: the kernel's own limit, zero overhead), and under the mechanism's floor (`minsup`: a \
         minimal listener answering CONTINUE to heapcap's set of calls, with and without the synchronous wake-up; \
         the better of the two is shown; for the programs that start processes as they go, also the admission \
         floors: `minsup` adding, at each process's first call, a pidfd, its `statm` and `stat` read, and the pidfd \
         watched for its exit, the least per-process work a quota read from `/proc` needs), {rounds} rounds, the sides \
         interleaved per program, on one CPU (`taskset -c 0` around the whole side, supervisor included: a container given one CPU) \
         and on all {cpus}. A program that runs for less than {min_run} s is run back to back (`reps`) in one shell under \
         one supervisor, so that each measured run lasts at least that. Ratios are per round (side ÷ same round's plain \
         run), then summarised.\n\n\
         | program | CPUs | reps | plain s | heapcap s | RLIMIT_DATA s | heapcap ÷ plain | RLIMIT_DATA ÷ plain | floor ÷ plain | admission floor ÷ plain |\n\
         |---|---|---|---|---|---|---|---|---|---|\n"
    );
    let mut bars = Vec::new();
    for p in &programs {
        for one_cpu in [true, false] {
            let cpus_used = if one_cpu { 1 } else { cpus };
            // Calibrate on a plain run (which also warms the page cache).
            let once = match wall(&wrap(0, one_cpu, &p.argv), work) {
                Ok(t) => t,
                Err(e) => {
                    failures.push(format!("measurement 2, {}: {e:#}", p.name));
                    continue;
                }
            };
            let reps = if once >= min_run { 1 } else { (min_run / once.max(0.01)).ceil() as usize };
            let argv: Vec<String> = if reps == 1 {
                p.argv.clone()
            } else {
                let lp = format!("i=0; while [ $i -lt {reps} ]; do \"$@\" >/dev/null || exit 1; i=$((i+1)); done");
                let mut v = vec!["sh".into(), "-c".into(), lp, "sh".into()];
                v.extend(p.argv.iter().cloned());
                v
            };
            let mut s: [Vec<f64>; 7] = Default::default();
            let sides = if p.spawns { s.len() } else { 5 };
            for r in 0..rounds {
                for (side, v) in s.iter_mut().enumerate().take(sides) {
                    let x = wall(&wrap(side, one_cpu, &argv), work).unwrap_or_else(|e| {
                        failures.push(format!(
                            "measurement 2, {} on {cpus_used} CPUs, side {side}, round {r}: {e:#}",
                            p.name
                        ));
                        f64::NAN
                    });
                    v.push(x);
                }
                eprintln!(
                    "{} on {cpus_used} CPUs round {r}: plain {:.3} s heapcap {:.3} s rlimit {:.3} s \
                     floor {:.3} / {:.3} s{}",
                    p.name,
                    s[0][r],
                    s[1][r],
                    s[2][r],
                    s[3][r],
                    s[4][r],
                    if p.spawns {
                        format!(", admission floor {:.3} / {:.3} s", s[5][r], s[6][r])
                    } else {
                        String::new()
                    }
                );
            }
            let rh = paired(&s[1], &s[0], |x, y| x / y);
            let rr = paired(&s[2], &s[0], |x, y| x / y);
            // The better of two floors by median, its ratios per round.
            let better = |a: usize| {
                let (f0, f1) = (summarize(&s[a]).median, summarize(&s[a + 1]).median);
                let (floor, which) = if f1.is_nan() || f0 <= f1 { (&s[a], "no sync") } else { (&s[a + 1], "sync") };
                (paired(floor, &s[0], |x, y| x / y), which)
            };
            let (rf, which) = better(3);
            let ratio = |r: &crate::stats::Summary| format!("{}x ({}–{})", fmt3(r.median), fmt3(r.min), fmt3(r.max));
            let admission = match p.spawns {
                true => {
                    let (ra, which) = better(5);
                    format!("{} ({which})", ratio(&ra))
                }
                false => "—".to_string(),
            };
            md += &format!(
                "| {} | {cpus_used} | {reps} | {} | {} | {} | {} | {} | {} ({which}) | {admission} |\n",
                p.name,
                fmt_spread(&summarize(&s[0])),
                fmt_spread(&summarize(&s[1])),
                fmt_spread(&summarize(&s[2])),
                ratio(&rh),
                ratio(&rr),
                ratio(&rf),
            );
            let pct = |r: &crate::stats::Summary, label: &str| plot::Bar {
                label: format!("{}, {cpus_used} CPU: {label}", p.name),
                median: (r.median - 1.0) * 100.0,
                lo: (r.min - 1.0) * 100.0,
                hi: (r.max - 1.0) * 100.0,
            };
            bars.push(pct(&rh, "heapcap"));
            bars.push(pct(&rf, "floor"));
            bars.push(pct(&rr, "RLIMIT_DATA"));
        }
    }
    let svg = "programs.svg";
    if let Err(e) =
        plot::bars(&args.out.join(svg), "% slower than plain (median, min–max over rounds)", "% slower", &bars)
    {
        failures.push(format!("plot {svg}: {e:#}"));
    }
    md += "\nTarget: at most 3% slower than plain.";
    if !left_out.is_empty() {
        md += &format!(" Left out: {}.", left_out.join(", "));
    }
    md += &format!("\n\n![% slower than plain]({svg})\n\n");
    Ok(Section { markdown: md, failures })
}

fn fmt3(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        fmt(x)
    }
}
