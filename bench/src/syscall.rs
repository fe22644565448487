//! Measurement 1: added cost per notified syscall, six sides interleaved.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::container::{Bundle, Daemon};
use crate::fixtures::Fixtures;
use crate::stats::{fmt, fmt_spread, paired, summarize};
use crate::{plot, Args, Section};

/// Run a command that prints µs per pair as its last line.
fn per_pair(cmd: &mut Command) -> Result<f64> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}{}", out.status, text, String::from_utf8_lossy(&out.stderr));
    }
    let last = text.lines().last().unwrap_or("");
    last.trim().parse().with_context(|| format!("{cmd:?} printed {text:?}, not µs per pair"))
}

pub fn run(args: &Args, fx: &Fixtures, work: &Path) -> Result<Section> {
    let n = args.calls();
    let ns = n.to_string();
    let daemon = Daemon::start(&args.heapcapd(), work)?;
    let bundle = Bundle::new(&work.join("m1-bundle"), fx, &daemon.agent, "1Gi", n)?;
    type Side<'a> = (&'a str, Box<dyn Fn(usize) -> Result<f64> + 'a>);
    let nb = &fx.nbench;
    let sides: Vec<Side> = vec![
        ("(a) no filter", Box::new(|_| per_pair(Command::new(nb).arg(&ns)))),
        ("(b) allow-all filter", Box::new(|_| per_pair(Command::new(&fx.allowall).arg(nb).arg(&ns)))),
        (
            "(c) minimal listener, no sync wake-up",
            Box::new(|_| per_pair(Command::new(&fx.minsup).arg("0").arg(nb).arg(&ns))),
        ),
        (
            "(c) minimal listener, sync wake-up (floor)",
            Box::new(|_| per_pair(Command::new(&fx.minsup).arg("1").arg(nb).arg(&ns))),
        ),
        (
            "(d) heapcap run --limit 1Gi",
            Box::new(|_| per_pair(Command::new(args.heapcap()).args(["run", "--limit", "1Gi", "--"]).arg(nb).arg(&ns))),
        ),
        ("(e) heapcapd + runc container", Box::new(|r| bundle.run(&format!("hcb-{}-m1-{r}", std::process::id())))),
    ];
    let rounds = args.rounds();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); sides.len()];
    let mut failures = Vec::new();
    for r in 0..rounds {
        for (i, (name, f)) in sides.iter().enumerate() {
            let v = f(r).unwrap_or_else(|e| {
                failures.push(format!("measurement 1, {name}, round {r}: {e:#}"));
                f64::NAN
            });
            eprintln!("round {r} {name}: {v:.2} µs/pair");
            samples[i].push(v);
        }
    }
    let floor = 3; // (c) with sync wake-up
    let mut md = format!(
        "## 1. Added cost per notified syscall\n\n\
         A tight loop of `mmap(4 KiB, RW, private anonymous)` + `munmap` ({n} pairs per run; only the mmap is \
         notified), {rounds} rounds, the six sides interleaved in each round. (b) loads a filter of the same \
         shape whose mmap rule returns ALLOW; (c) is `bench/fixtures/minsup.c` (receive, answer CONTINUE); \
         (e) runs the static loop as a runc container whose profile is `heapcap_profile`, served by one heapcapd.\n\n\
         | side | µs per pair: median (min–max) | IQR | added over (a), paired: median (min–max) | added ÷ floor's added, paired: median (min–max) |\n\
         |---|---|---|---|---|\n"
    );
    let a = &samples[0];
    let mut bars = Vec::new();
    for (i, (name, _)) in sides.iter().enumerate() {
        let s = summarize(&samples[i]);
        let added = if i == 0 { None } else { Some(paired(&samples[i], a, |x, y| x - y)) };
        let ratio = if i <= 1 || i == floor {
            None
        } else {
            let floor_added: Vec<f64> = samples[floor].iter().zip(a).map(|(c, a)| c - a).collect();
            let added_i: Vec<f64> = samples[i].iter().zip(a).map(|(x, a)| x - a).collect();
            Some(paired(&added_i, &floor_added, |x, y| x / y))
        };
        md += &format!(
            "| {name} | {} | {}–{} | {} | {} |\n",
            fmt_spread(&s),
            fmt(s.q1),
            fmt(s.q3),
            added.map_or("".into(), |s| fmt_spread(&s)),
            ratio.map_or("".into(), |s| format!("{}x ({}–{})", fmt(s.median), fmt(s.min), fmt(s.max))),
        );
        bars.push(plot::Bar { label: name.to_string(), median: s.median, lo: s.min, hi: s.max });
    }
    let svg = "syscall.svg";
    if let Err(e) =
        plot::bars(&args.out.join(svg), "µs per notified mmap+munmap pair (median, min–max)", "µs per pair", &bars)
    {
        failures.push(format!("plot {svg}: {e:#}"));
    }
    md += &format!("\nTarget: (d) and (e) add at most 1.15x the floor's added latency.\n\n![µs per pair]({svg})\n\n");
    Ok(Section { markdown: md, failures })
}
