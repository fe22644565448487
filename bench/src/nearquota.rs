//! Measurement 3: near the quota, every growth is past the bound and needs a fresh figure; cost
//! per decision as the number of mappings grows, and what one read of the maps costs.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use heapcap_linux::procfs::{MapsReader, ProcFs};

use crate::fixtures::Fixtures;
use crate::stats::{fmt, fmt_spread, paired, summarize};
use crate::{plot, Args, Section};

const QUOTA: &str = "256Mi";
const CAP: u64 = 256 << 20;
/// Private writable memfd mapping that defeats the cheap upper figure (see hover.c).
const FILE_MIB: &str = "2";

/// (µs per pair, VMAs seen, denied) from hover's line.
fn hover(cmd: &mut Command) -> Result<(f64, f64, f64)> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}{}", out.status, text, String::from_utf8_lossy(&out.stderr));
    }
    let field = |k: &str| -> Result<f64> {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("hover printed {text:?}: no {k}"))
    };
    Ok((field("us_per_pair=")?, field("vmas=")?, field("denied=")?))
}

/// µs per exact read of a process with about `n` mappings, text then `PROCMAP_QUERY`, `rounds`
/// interleaved rounds of `reads` reads each.
fn exact_reads(fx: &Fixtures, n: u64, rounds: usize, reads: usize) -> Result<[Vec<f64>; 2]> {
    let mut child = Command::new(&fx.hover)
        .args([n.to_string(), "0".into(), "-1".into()])
        .stdout(Stdio::piped())
        .spawn()
        .context("start hover")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("hover stdout")?).read_line(&mut line)?;
    let pid = child.id();
    let readers = [ProcFs::default().with_maps_reader(MapsReader::Text), ProcFs::default()];
    let mut out: [Vec<f64>; 2] = Default::default();
    let mut buf = String::new();
    let mut counted = [0u64; 2];
    let res = (|| -> Result<()> {
        for _ in 0..rounds {
            for (i, proc) in readers.iter().enumerate() {
                let t = Instant::now();
                for _ in 0..reads {
                    counted[i] = proc.snapshot(pid, &mut buf)?.maps.counted();
                }
                out[i].push(t.elapsed().as_secs_f64() * 1e6 / reads as f64);
            }
        }
        anyhow::ensure!(counted[0] == counted[1], "text and query disagree: {} vs {}", counted[0], counted[1]);
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    res.map(|()| out)
}

pub fn run(args: &Args, fx: &Fixtures) -> Result<Section> {
    let counts: &[u64] = if args.tiny { &[100] } else { &[100, 1000, 10000] };
    let rounds = args.rounds().min(5);
    let mut failures = Vec::new();
    let mut md = format!(
        "## 3. Near the quota: cost per decision against the number of mappings\n\n\
         `bench/fixtures/hover.c` makes about N VMAs (a read-only region whose every other page is made writable), \
         fills its quota ({QUOTA}) with 1 MiB anonymous mmaps until refused, gives 1 MiB back, then times \
         mmap(1 MiB) + munmap pairs right under the ceiling: heapcap does not see the munmap, so every mmap is \
         past the bound and needs a fresh figure. heapcap first reads `/proc/<pid>/statm` (the kernel's private \
         writable total plus stacks: never below the heap, one short line whatever the number of mappings); if \
         the request fits even so it is let through, otherwise (and for every denial) it reads the mappings. \
         *exact path*: the same with {FILE_MIB} MiB of a memfd mapped private and writable first (in the \
         kernel's total, not heap), so the upper figure never settles a request and every decision reads the \
         mappings (`PROCMAP_QUERY` here). Plain: the same program without heapcap (filled to {QUOTA}, never \
         refused). {rounds} rounds, interleaved.\n\n\
         | VMAs (seen) | pairs per run | plain µs/pair | heapcap µs/pair | added µs per decision, paired | heapcap, exact path: µs/pair | added µs per decision, exact path | refused in the timed loop |\n\
         |---|---|---|---|---|---|---|---|\n"
    );
    let mut xs = Vec::new();
    let (mut added_line, mut exact_line, mut text_line, mut query_line) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut reads_md = String::from(
        "One exact read of the mappings (counted heap and break: what the exact path does after the checks), \
         measured in the harness against a hover process holding N VMAs, the two ways interleaved: the text of \
         `/proc/<pid>/maps` parsed, and `PROCMAP_QUERY` walking the writable mappings (heapcap's choice where the \
         kernel has it).\n\n\
         | VMAs | text: µs per read | PROCMAP_QUERY: µs per read | query ÷ text, paired |\n|---|---|---|---|\n",
    );
    for &n in counts {
        let iters: u64 = if args.tiny { 20 } else { (2_000_000 / n).clamp(100, 5000) };
        let mut s: [Vec<f64>; 3] = Default::default();
        let (mut vmas, mut denied) = (f64::NAN, 0.0);
        for r in 0..rounds {
            let argv = [n.to_string(), CAP.to_string(), iters.to_string()];
            let heapcap = |file: Option<&str>| {
                hover(
                    Command::new(args.heapcap())
                        .args(["run", "--quiet", "--limit", QUOTA, "--"])
                        .arg(&fx.hover)
                        .args(&argv)
                        .args(file),
                )
            };
            let results = [hover(Command::new(&fx.hover).args(&argv)), heapcap(None), heapcap(Some(FILE_MIB))];
            for (side, res) in results.into_iter().enumerate() {
                match res {
                    Ok((us, v, d)) => {
                        s[side].push(us);
                        if side == 1 {
                            vmas = v;
                        }
                        if side > 0 {
                            denied += d;
                        }
                    }
                    Err(e) => {
                        failures.push(format!("measurement 3, {n} VMAs, side {side}, round {r}: {e:#}"));
                        s[side].push(f64::NAN);
                    }
                }
            }
            eprintln!(
                "{n} VMAs round {r}: plain {:.2} heapcap {:.2} exact path {:.2} µs/pair",
                s[0][r], s[1][r], s[2][r]
            );
        }
        let added = paired(&s[1], &s[0], |x, y| x - y);
        let added_exact = paired(&s[2], &s[0], |x, y| x - y);
        md += &format!(
            "| {n} ({}) | {iters} | {} | {} | {} | {} | {} | {denied:.0} |\n",
            fmt(vmas),
            fmt_spread(&summarize(&s[0])),
            fmt_spread(&summarize(&s[1])),
            fmt_spread(&added),
            fmt_spread(&summarize(&s[2])),
            fmt_spread(&added_exact),
        );
        xs.push(n as f64);
        added_line.push(added.median);
        exact_line.push(added_exact.median);
        let reads = if args.tiny { 10 } else { (200_000 / n as usize).clamp(20, 2000) };
        match exact_reads(fx, n, rounds, reads) {
            Ok([text, query]) => {
                let ratio = paired(&query, &text, |q, t| q / t);
                reads_md += &format!(
                    "| {n} | {} | {} | {}x ({}–{}) |\n",
                    fmt_spread(&summarize(&text)),
                    fmt_spread(&summarize(&query)),
                    fmt(ratio.median),
                    fmt(ratio.min),
                    fmt(ratio.max)
                );
                text_line.push(summarize(&text).median);
                query_line.push(summarize(&query).median);
            }
            Err(e) => {
                failures.push(format!("measurement 3, exact reads at {n} VMAs: {e:#}"));
                text_line.push(f64::NAN);
                query_line.push(f64::NAN);
            }
        }
    }
    let svg = "near-quota.svg";
    if let Err(e) = plot::lines(
        &args.out.join(svg),
        "Near the quota: added µs per decision (median)",
        "VMAs in the process",
        "µs per decision",
        &xs,
        &[
            ("heapcap run (statm settles it)".into(), added_line),
            ("heapcap run, exact path every time".into(), exact_line),
            ("one exact read: text".into(), text_line),
            ("one exact read: PROCMAP_QUERY".into(), query_line),
        ],
    ) {
        failures.push(format!("plot {svg}: {e:#}"));
    }
    md += &format!("\n{reads_md}\n![near the quota]({svg})\n\n");
    Ok(Section { markdown: md, failures })
}
