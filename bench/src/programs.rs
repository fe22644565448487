//! Measurement 2: real programs far below their quota, wall time with heapcap, without, and
//! under the kernel's RLIMIT_DATA (prlimit --data), interleaved.

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

/// A program as `argv`.
#[derive(Debug)]
struct Program {
    name: String,
    argv: Vec<String>,
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

pub(crate) fn wall(argv: &[String]) -> Result<f64> {
    let t = Instant::now();
    let out = Command::new(&argv[0])
        .args(&argv[1..])
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
    let mut programs = Vec::new();
    let mut left_out = Vec::new();
    match python() {
        Some(py) => programs.push(Program {
            name: "python3 (lists, dicts, bytearrays)".into(),
            argv: vec![py, "-c".into(), PYTHON.into(), if tiny { "1" } else { "8" }.into()],
        }),
        None => left_out.push("python3 (not found)"),
    }
    let input = work.join("sort-input.txt");
    sort_input(&input, if tiny { 20_000 } else { 2_000_000 })?;
    let sort = which("sort").context("no sort")?;
    programs.push(Program {
        name: format!("sort ({} lines)", if tiny { "20k" } else { "2M" }),
        argv: vec![sort.display().to_string(), "-o".into(), "/dev/null".into(), input.display().to_string()],
    });
    programs.push(Program {
        name: "malloc stress (4 threads)".into(),
        argv: vec![fx.stress.display().to_string(), "4".into(), if tiny { "20000" } else { "3000000" }.into()],
    });
    match which("node") {
        Some(node) => programs.push(Program {
            name: "node (objects, Buffers)".into(),
            argv: vec![node.display().to_string(), "-e".into(), NODE.into(), if tiny { "1" } else { "10" }.into()],
        }),
        None => left_out.push("node (not found)"),
    }
    let heapcap = args.heapcap().display().to_string();
    let wrap = |side: usize, argv: &[String]| -> Vec<String> {
        let mut v: Vec<String> = match side {
            0 => vec![],
            1 => vec![heapcap.clone(), "run".into(), "--limit".into(), QUOTA.into(), "--".into()],
            _ => vec!["prlimit".into(), format!("--data={RLIMIT_DATA}"), "--".into()],
        };
        v.extend(argv.iter().cloned());
        v
    };
    let rounds = args.rounds();
    let mut failures = Vec::new();
    let mut md = format!(
        "## 2. Real programs far below their quota\n\n\
         Wall time of each program alone, under `heapcap run --limit {QUOTA}`, and under `prlimit --data={RLIMIT_DATA}` \
         (RLIMIT_DATA 4 GiB: the kernel's own limit, zero overhead), {rounds} rounds, the three sides interleaved \
         per program. Ratios are per round (side ÷ same round's plain run), then summarised.\n\n\
         | program | plain s | heapcap s | RLIMIT_DATA s | heapcap ÷ plain | RLIMIT_DATA ÷ plain |\n\
         |---|---|---|---|---|---|\n"
    );
    let mut bars = Vec::new();
    for p in &programs {
        let mut s: [Vec<f64>; 3] = Default::default();
        for r in 0..rounds {
            for (side, v) in s.iter_mut().enumerate() {
                let x = wall(&wrap(side, &p.argv)).unwrap_or_else(|e| {
                    failures.push(format!("measurement 2, {}, side {side}, round {r}: {e:#}", p.name));
                    f64::NAN
                });
                v.push(x);
            }
            eprintln!("{} round {r}: plain {:.3} s heapcap {:.3} s rlimit {:.3} s", p.name, s[0][r], s[1][r], s[2][r]);
        }
        let rh = paired(&s[1], &s[0], |x, y| x / y);
        let rr = paired(&s[2], &s[0], |x, y| x / y);
        let ratio = |r: &crate::stats::Summary| format!("{}x ({}–{})", fmt3(r.median), fmt3(r.min), fmt3(r.max));
        md += &format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            p.name,
            fmt_spread(&summarize(&s[0])),
            fmt_spread(&summarize(&s[1])),
            fmt_spread(&summarize(&s[2])),
            ratio(&rh),
            ratio(&rr),
        );
        let pct = |r: &crate::stats::Summary, label: &str| plot::Bar {
            label: format!("{}: {label}", p.name),
            median: (r.median - 1.0) * 100.0,
            lo: (r.min - 1.0) * 100.0,
            hi: (r.max - 1.0) * 100.0,
        };
        bars.push(pct(&rh, "heapcap"));
        bars.push(pct(&rr, "RLIMIT_DATA"));
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
