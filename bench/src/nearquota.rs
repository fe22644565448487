//! Measurement 3: near the quota, every growth needs the exact figure; cost per decision as the
//! number of mappings grows.

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::fixtures::Fixtures;
use crate::stats::{fmt, fmt_spread, paired, summarize};
use crate::{plot, Args, Section};

const QUOTA: &str = "256Mi";
const CAP: u64 = 256 << 20;

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

pub fn run(args: &Args, fx: &Fixtures) -> Result<Section> {
    let counts: &[u64] = if args.tiny { &[100] } else { &[100, 1000, 10000] };
    let rounds = args.rounds().min(5);
    let mut failures = Vec::new();
    let mut md = format!(
        "## 3. Near the quota: cost per decision against the number of mappings\n\n\
         `bench/fixtures/hover.c` makes about N VMAs (a read-only region whose every other page is made writable), \
         fills its quota ({QUOTA}) with 1 MiB anonymous mmaps until refused, gives 1 MiB back, then times \
         mmap(1 MiB) + munmap pairs right under the ceiling: heapcap does not see the munmap, so every mmap needs \
         the exact figure. Plain: the same program without heapcap (filled to {QUOTA}, never refused). \
         {rounds} rounds, interleaved.\n\n\
         | VMAs (seen) | pairs per run | plain µs/pair | heapcap µs/pair | added µs per decision, paired | refused in the timed loop |\n\
         |---|---|---|---|---|---|\n"
    );
    let mut xs = Vec::new();
    let mut added_line = Vec::new();
    for &n in counts {
        let iters: u64 = if args.tiny { 20 } else { (2_000_000 / n).clamp(100, 5000) };
        let mut s: [Vec<f64>; 2] = Default::default();
        let (mut vmas, mut denied) = (f64::NAN, 0.0);
        for r in 0..rounds {
            let argv = [n.to_string(), CAP.to_string(), iters.to_string()];
            let plain = hover(Command::new(&fx.hover).args(&argv));
            let capped = hover(
                Command::new(args.heapcap())
                    .args(["run", "--quiet", "--limit", QUOTA, "--"])
                    .arg(&fx.hover)
                    .args(&argv),
            );
            for (side, res) in [plain, capped].into_iter().enumerate() {
                match res {
                    Ok((us, v, d)) => {
                        s[side].push(us);
                        if side == 1 {
                            vmas = v;
                            denied += d;
                        }
                    }
                    Err(e) => {
                        failures.push(format!("measurement 3, {n} VMAs, side {side}, round {r}: {e:#}"));
                        s[side].push(f64::NAN);
                    }
                }
            }
            eprintln!("{n} VMAs round {r}: plain {:.2} heapcap {:.2} µs/pair", s[0][r], s[1][r]);
        }
        let added = paired(&s[1], &s[0], |x, y| x - y);
        md += &format!(
            "| {n} ({}) | {iters} | {} | {} | {} | {denied:.0} |\n",
            fmt(vmas),
            fmt_spread(&summarize(&s[0])),
            fmt_spread(&summarize(&s[1])),
            fmt_spread(&added),
        );
        xs.push(n as f64);
        added_line.push(added.median);
    }
    let svg = "near-quota.svg";
    if let Err(e) = plot::lines(
        &args.out.join(svg),
        "Near the quota: added µs per decision (median)",
        "VMAs in the process",
        "µs per decision",
        &xs,
        &[("heapcap run, exact figure each time".into(), added_line)],
    ) {
        failures.push(format!("plot {svg}: {e:#}"));
    }
    md += &format!("\n![near the quota]({svg})\n\n");
    Ok(Section { markdown: md, failures })
}
