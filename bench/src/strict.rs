//! Measurement 7: what strict mode costs. Strict notifies every writable `mmap` (the loader maps
//! each library's data segment writable: several per exec'd program) and `shmat`, reads each
//! new process's mappings at admission instead of `statm`, and decides near the quota on the
//! mappings alone. CPU time (user + system of the whole tree, heapcap's supervisor included:
//! steadier than wall time on a shared machine) and wall time, plain, under `heapcap run`, and
//! under `heapcap run --strict`, the three sides interleaved per program.

use std::path::Path;

use anyhow::{Context, Result};

use crate::fixtures::Fixtures;
use crate::programs::{python, wall, PYTHON};
use crate::stats::{fmt_spread, paired, summarize, Summary};
use crate::{Args, Section};
use nix::sys::resource::{getrusage, UsageWho};

const QUOTA: &str = "4Gi";
const SIDES: [&str; 3] = ["plain", "heapcap", "heapcap --strict"];

pub fn run(args: &Args, fx: &Fixtures, work: &Path) -> Result<Section> {
    let tiny = args.tiny;
    let py = python().unwrap_or_else(|| "python3".into());
    let starts = if tiny { 2 } else { 20 };
    let spawns = if tiny { 10 } else { 200 };
    let programs: Vec<(String, Vec<String>)> = vec![
        (
            format!("{starts} python3 start-ups (sh loop)"),
            vec!["sh".into(), "-c".into(), format!("for i in $(seq {starts}); do {py} -c pass; done")],
        ),
        (
            format!("{spawns} /bin/true (sh loop)"),
            vec!["sh".into(), "-c".into(), format!("for i in $(seq {spawns}); do /bin/true; done")],
        ),
        (
            "python3 (lists, dicts, bytearrays)".into(),
            vec![py.clone(), "-c".into(), PYTHON.into(), if tiny { "1" } else { "4" }.into()],
        ),
        (
            "malloc stress (4 threads)".into(),
            vec![fx.stress.display().to_string(), "4".into(), if tiny { "20000" } else { "1000000" }.into()],
        ),
    ];
    // Absolute: the programs run in the work directory.
    let heapcap = std::fs::canonicalize(args.heapcap()).context("no heapcap binary")?.display().to_string();
    let wrap = |side: usize, argv: &[String]| -> Vec<String> {
        let mut v: Vec<String> = match side {
            0 => vec![],
            1 => vec![heapcap.clone(), "run".into(), "--limit".into(), QUOTA.into(), "--".into()],
            _ => vec![heapcap.clone(), "run".into(), "--strict".into(), "--limit".into(), QUOTA.into(), "--".into()],
        };
        v.extend(argv.iter().cloned());
        v
    };
    let rounds = args.rounds.unwrap_or(if tiny { 2 } else { 7 });
    let mut failures = Vec::new();
    let mut md = format!(
        "## 7. What strict mode costs\n\n\
         Each program alone, under `heapcap run --limit {QUOTA}`, and under `heapcap run --strict --limit {QUOTA}`, \
         {rounds} rounds, the three sides interleaved per program. CPU is user + system seconds of the whole tree \
         (heapcap's supervisor included), steadier than wall time on a shared machine; the ratio is per round, then \
         summarised (median, min–max).\n\n\
         | program | CPU plain s | CPU heapcap s | CPU strict s | CPU strict ÷ heapcap | wall plain s | wall heapcap s | wall strict s |\n\
         |---|---|---|---|---|---|---|---|\n"
    );
    for (name, argv) in &programs {
        let mut s: [Vec<f64>; 3] = Default::default();
        let mut cpu: [Vec<f64>; 3] = Default::default();
        for r in 0..rounds {
            for side in 0..SIDES.len() {
                let before = children_cpu();
                s[side].push(wall(&wrap(side, argv), work).unwrap_or_else(|e| {
                    failures.push(format!("measurement 7, {name}, {}, round {r}: {e:#}", SIDES[side]));
                    f64::NAN
                }));
                cpu[side].push(children_cpu() - before);
            }
            eprintln!(
                "{name} round {r}: cpu plain {:.3} s heapcap {:.3} s strict {:.3} s",
                cpu[0][r], cpu[1][r], cpu[2][r]
            );
        }
        let ratio = |r: Summary| format!("{:.3}x ({:.3}–{:.3})", r.median, r.min, r.max);
        md += &format!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} |\n",
            fmt_spread(&summarize(&cpu[0])),
            fmt_spread(&summarize(&cpu[1])),
            fmt_spread(&summarize(&cpu[2])),
            ratio(paired(&cpu[2], &cpu[1], |x, y| x / y)),
            fmt_spread(&summarize(&s[0])),
            fmt_spread(&summarize(&s[1])),
            fmt_spread(&summarize(&s[2])),
        );
    }
    md += "\n";
    Ok(Section { markdown: md, failures })
}

/// User plus system seconds of every child waited for so far (and their waited descendants).
fn children_cpu() -> f64 {
    getrusage(UsageWho::RUSAGE_CHILDREN)
        .map(|u| {
            let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            secs(u.user_time()) + secs(u.system_time())
        })
        .unwrap_or(f64::NAN)
}
