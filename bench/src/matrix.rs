//! Measurement 6: the workload matrix. Every shape of heap traffic a program makes (block sizes,
//! churn, brk grow and trim, realloc by mremap, JIT W^X flips, thread and process churn, a build),
//! alone and in parallel, far from the quota and at 90% of it, each against the mechanism's two
//! floors (a minimal listener answering CONTINUE, with and without the synchronous wake-up,
//! notifying exactly heapcap's set of calls), the four sides interleaved in every round. Where every
//! process is new (fork+exec, builds), two more sides: the floors with the least per-process
//! admission a per-process quota needs (`minsup` SYNC 2 and 3), to tell what of heapcap's added
//! time is that admission.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::fixtures::Fixtures;
use crate::stats::{fmt, fmt_spread, paired, summarize, Summary};
use crate::{plot, Args, Section};

const MIB: u64 = 1 << 20;

/// What a cell runs.
#[derive(Debug, Clone)]
enum Work {
    /// `shapes SHAPE SIZE ITERS THREADS PROCS WORK` (the ballast is added per side).
    Shape { shape: &'static str, size: u64, iters: u64, threads: usize, procs: usize, work: u64 },
    /// `make -jJOBS` of the generated C project, from clean.
    Make { jobs: usize },
}

#[derive(Debug, Clone)]
struct Cell {
    name: String,
    work: Work,
    /// Near the quota: the quota unit `q` (the process holds 9 `q` of a 10 `q` quota). `None`:
    /// every process of the cell is new, so none is near its quota.
    near: Option<u64>,
}

fn cells(tiny: bool, cpus: usize) -> Vec<Cell> {
    let it = |n: u64| if tiny { (n / 100).max(2) } else { n };
    let shape = |name: &str, shape: &'static str, size: u64, iters: u64, near: Option<u64>| Cell {
        name: name.to_string(),
        work: Work::Shape { shape, size, iters: it(iters), threads: 1, procs: 1, work: 0 },
        near,
    };
    let mut v = vec![
        shape("mmap 4 KiB + munmap", "mmap", 4096, 40_000, Some(MIB)),
        shape("mmap 64 KiB + munmap", "mmap", 64 << 10, 20_000, Some(MIB)),
        shape("mmap 1 MiB + munmap", "mmap", MIB, 2_000, Some(MIB)),
        shape("mmap 16 MiB + munmap", "mmap", 16 * MIB, 150, Some(16 * MIB)),
        shape("mmap 64 MiB + munmap", "mmap", 64 * MIB, 40, Some(64 * MIB)),
        shape("brk grow 64 KiB + trim", "brk", 64 << 10, 20_000, Some(MIB)),
        shape("realloc to 4 MiB (mremap)", "realloc", 4 * MIB, 1_000, Some(4 * MIB)),
        shape("JIT W^X flips of 64 KiB", "jit", 64 << 10, 20_000, Some(MIB)),
        shape("thread create + exit", "threads", 64 << 10, 5_000, Some(4 * MIB)),
        // Many threads of one process calling at once (each with growth in flight while the
        // others are decided): room for their 512 KiB stacks beside the blocks.
        Cell {
            name: "64 threads at once: mmap 64 KiB + munmap".into(),
            work: Work::Shape { shape: "mmap", size: 64 << 10, iters: it(300), threads: 64, procs: 1, work: 0 },
            near: Some(64 * MIB),
        },
        shape("fork+exec /bin/true", "spawn", 0, 2_000, None),
        Cell { name: "make -j1 (C project)".into(), work: Work::Make { jobs: 1 }, near: None },
    ];
    let par = |name: String, threads: usize, procs: usize| Cell {
        name,
        work: Work::Shape { shape: "mmap", size: 64 << 10, iters: it(2_500), threads, procs, work: 200_000 },
        // Room for the threads' stacks (512 KiB each) beside the blocks.
        near: Some(4 * MIB),
    };
    v.push(par(format!("{cpus} threads: mmap 64 KiB, touch, work, munmap"), cpus, 1));
    v.push(par(format!("{cpus} processes: the same"), 1, cpus));
    v.push(Cell { name: format!("make -j{cpus} (C project)"), work: Work::Make { jobs: cpus }, near: None });
    v
}

/// A small C project: `files` units of a few functions each, and a Makefile.
pub(crate) fn write_project(dir: &Path, files: usize) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut objs = Vec::new();
    let mut main = String::from("#include <stdio.h>\n");
    let mut calls = String::new();
    for i in 0..files {
        let mut src = String::from("#include <string.h>\n#include <stdlib.h>\n");
        for f in 0..6 {
            writeln!(
                src,
                "long f{i}_{f}(long n) {{ char *b = malloc(4096); long s = 0; for (long k = 0; k < n; k++) \
                 {{ memset(b, (int)k, 64); s += b[k % 64] * {f} + k; }} free(b); return s; }}"
            )?;
        }
        std::fs::write(dir.join(format!("u{i}.c")), src)?;
        objs.push(format!("u{i}.o"));
        writeln!(main, "long f{i}_0(long);")?;
        writeln!(calls, "  s += f{i}_0(10);")?;
    }
    main += &format!("int main(void) {{ long s = 0;\n{calls}  printf(\"%ld\\n\", s); return 0; }}\n");
    std::fs::write(dir.join("main.c"), main)?;
    let makefile = format!(
        "CFLAGS = -O1\nOBJS = main.o {}\nprog: $(OBJS)\n\t$(CC) -o $@ $(OBJS)\n%.o: %.c\n\t$(CC) $(CFLAGS) -c -o $@ $<\nclean:\n\trm -f prog *.o\n",
        objs.join(" ")
    );
    std::fs::write(dir.join("Makefile"), makefile)?;
    Ok(())
}

/// One run: (seconds, notifications counted by the floor if it was one).
fn run_once(argv: &[String], shape_timed: bool) -> Result<(f64, Option<u64>)> {
    let t = Instant::now();
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {argv:?}"))?;
    let wall = t.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("{argv:?} failed ({}): {stdout}{stderr}", out.status);
    }
    let secs = if shape_timed {
        let v = stdout.lines().find_map(|l| l.strip_prefix("seconds="));
        v.and_then(|v| v.trim().parse().ok()).with_context(|| format!("{argv:?} printed {stdout:?}"))?
    } else {
        wall
    };
    let count =
        stderr.lines().find_map(|l| l.strip_prefix("minsup: notifications=")).and_then(|v| v.trim().parse().ok());
    Ok((secs, count))
}

const SIDES: [&str; 6] = [
    "bare",
    "floor, no sync wake-up",
    "floor, sync wake-up",
    "heapcap",
    "admission floor, no sync wake-up",
    "admission floor, sync wake-up",
];
/// The first of the admission floors' sides (`minsup` SYNC 2, 3).
const ADMISSION: usize = 4;

impl Cell {
    /// Every process of the cell is new: the admission floors are measured too.
    fn spawns(&self) -> bool {
        self.near.is_none()
    }
}

/// One cell's samples: seconds per side per round (NaN for a side not run), and the notified
/// calls per run.
struct Samples {
    secs: [Vec<f64>; 6],
    calls: Vec<u64>,
}

struct Ctx<'a> {
    args: &'a Args,
    fx: &'a Fixtures,
    project: PathBuf,
}

impl Ctx<'_> {
    fn argv(&self, cell: &Cell, side: usize, near: bool) -> Vec<String> {
        let limit = match (near, cell.near) {
            // 1 MiB more for the process's own baseline (libc's data, its stack pages).
            (true, Some(q)) => format!("{}", 10 * q + MIB),
            _ => "1Ti".to_string(),
        };
        let mut v: Vec<String> = match side {
            0 => vec![],
            1 | 2 => vec![self.fx.minsup.display().to_string(), (side - 1).to_string()],
            3 => vec![self.args.heapcap().display().to_string(), "run".into(), "--limit".into(), limit, "--".into()],
            _ => vec![self.fx.minsup.display().to_string(), (side - ADMISSION + 2).to_string()],
        };
        match &cell.work {
            Work::Shape { shape, size, iters, threads, procs, work } => {
                let ballast = if near { cell.near.map_or(0, |q| 9 * q) } else { 0 };
                v.push(self.fx.shapes.display().to_string());
                v.extend([shape.to_string(), size.to_string(), iters.to_string()]);
                v.extend([threads.to_string(), procs.to_string(), work.to_string(), ballast.to_string()]);
            }
            Work::Make { jobs } => {
                let make = ["make", "-s", "-C"].map(String::from);
                v.extend(make);
                v.push(self.project.display().to_string());
                v.push(format!("-j{jobs}"));
            }
        }
        v
    }

    fn measure(&self, cell: &Cell, near: bool, failures: &mut Vec<String>) -> Samples {
        let rounds = self.args.rounds();
        let mut s = Samples { secs: Default::default(), calls: Vec::new() };
        let timed = matches!(cell.work, Work::Shape { .. });
        for r in 0..rounds {
            for (side, side_name) in SIDES.iter().enumerate() {
                if side >= ADMISSION && !cell.spawns() {
                    s.secs[side].push(f64::NAN);
                    continue;
                }
                if let Work::Make { .. } = cell.work {
                    let clean = Command::new("make").args(["-s", "-C"]).arg(&self.project).arg("clean").status();
                    if !clean.is_ok_and(|st| st.success()) {
                        failures.push(format!("measurement 6, {}: make clean failed", cell.name));
                    }
                }
                let (secs, count) = run_once(&self.argv(cell, side, near), timed).unwrap_or_else(|e| {
                    failures.push(format!("measurement 6, {}, {side_name}, round {r}: {e:#}", cell.name));
                    (f64::NAN, None)
                });
                s.secs[side].push(secs);
                if side == 2 {
                    s.calls.extend(count);
                }
            }
            eprintln!(
                "{}{} round {r}: bare {:.3} s, floors {:.3} / {:.3} s, heapcap {:.3} s, admission floors {:.3} / {:.3} s",
                cell.name,
                if near { " (90% of the quota)" } else { "" },
                s.secs[0][r],
                s.secs[1][r],
                s.secs[2][r],
                s.secs[3][r],
                s.secs[4][r],
                s.secs[5][r],
            );
        }
        s
    }
}

/// Per round: heapcap's added time ÷ the best of two floors' (the lower added; `floors`: the
/// first of the two sides).
fn ratio_to_best_floor(s: &Samples, floors: usize) -> Summary {
    let rounds = s.secs[0].len();
    let v: Vec<f64> = (0..rounds)
        .map(|r| {
            let bare = s.secs[0][r];
            let best = (s.secs[floors][r] - bare).min(s.secs[floors + 1][r] - bare);
            (s.secs[3][r] - bare) / best
        })
        .collect();
    summarize(&v)
}

fn per_call_us(s: &Samples, side: usize) -> Summary {
    let calls = s.calls.iter().copied().max().unwrap_or(0).max(1) as f64;
    paired(&s.secs[side], &s.secs[0], |x, b| (x - b) / calls * 1e6)
}

pub fn run(args: &Args, fx: &Fixtures, work: &Path) -> Result<Section> {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let project = work.join("m6-project");
    write_project(&project, if args.tiny { 3 } else { 31 })?;
    let ctx = Ctx { args, fx, project };
    let cells = cells(args.tiny, cpus);
    let rounds = args.rounds();
    let mut failures = Vec::new();
    let mut md = format!(
        "## 6. The workload matrix\n\n\
         Each shape run by `bench/fixtures/shapes.c` (or `make` of a generated {files}-file C project) alone, under \
         the two floors (`bench/fixtures/minsup.c`: a minimal listener answering CONTINUE, notifying exactly heapcap's \
         set of calls, without and with the synchronous wake-up) and under `heapcap run`, {rounds} rounds, the four \
         sides interleaved in each. Times are the shape's own timed part (make: its wall time). *Added* is a side's \
         time minus the same round's bare run; the ratio is heapcap's added time ÷ the better floor's of the same \
         round. Decisions: notified calls per run, as the floor counted them. Where every process is new \
         (fork+exec, the builds), the floors with admission (`minsup` SYNC 2 and 3: at each process's first call a \
         pidfd, its `statm` and `stat` read, the pidfd watched for its exit, and nothing else) run too, and the last \
         column is heapcap's added time ÷ the better of theirs: what heapcap adds beyond the per-process work any \
         per-process quota read from `/proc` needs.\n\n",
        files = if args.tiny { 3 } else { 31 },
    );
    let mut bars = Vec::new();
    for near in [false, true] {
        if near {
            md += "### At 90% of the quota\n\nThe same shapes in a process that first maps 9 units of anonymous memory under a \
                   quota of 10 units plus 1 MiB for its own baseline (the unit: the block size, at least 1 MiB; 4 MiB where threads need room for their \
                   stacks), so the fast path's bound is near the quota \
                   and decisions look at `/proc`. Per decision: added µs ÷ decisions.\n\n";
        } else {
            md += "### Far from the quota (`--limit 1Ti`)\n\n";
        }
        md += "| shape | decisions | bare s | floor added s (no sync / sync) | heapcap added s | heapcap ÷ best floor, added | \
               µs per decision: heapcap / floor (sync) | heapcap ÷ bare | heapcap ÷ best admission floor, added |\n\
               |---|---|---|---|---|---|---|---|---|\n";
        for cell in cells.iter().filter(|c| !near || c.near.is_some()) {
            let s = ctx.measure(cell, near, &mut failures);
            let added = |side: usize| paired(&s.secs[side], &s.secs[0], |x, b| x - b);
            let ratio = ratio_to_best_floor(&s, 1);
            let wall = paired(&s.secs[3], &s.secs[0], |x, b| x / b);
            let admission = if cell.spawns() {
                let a = ratio_to_best_floor(&s, ADMISSION);
                format!("{}x ({}–{})", fmt(a.median), fmt(a.min), fmt(a.max))
            } else {
                "—".to_string()
            };
            md += &format!(
                "| {} | {} | {} | {} / {} | {} | {}x ({}–{}) | {} / {} | {}x | {admission} |\n",
                cell.name,
                s.calls.iter().copied().max().unwrap_or(0),
                fmt_spread(&summarize(&s.secs[0])),
                fmt(added(1).median),
                fmt(added(2).median),
                fmt(added(3).median),
                fmt(ratio.median),
                fmt(ratio.min),
                fmt(ratio.max),
                fmt(per_call_us(&s, 3).median),
                fmt(per_call_us(&s, 2).median),
                fmt(wall.median),
            );
            if !near {
                bars.push(plot::Bar { label: cell.name.clone(), median: ratio.median, lo: ratio.min, hi: ratio.max });
            }
        }
        md += "\n";
    }
    let svg = "matrix.svg";
    if let Err(e) = plot::bars(
        &args.out.join(svg),
        "heapcap's added time ÷ the better floor's, far from the quota (median, min–max)",
        "ratio",
        &bars,
    ) {
        failures.push(format!("plot {svg}: {e:#}"));
    }
    md += &format!(
        "Targets: every shape adds at most 1.15x what the better floor adds; parallel shapes within 1.10x of bare.\n\n\
         ![matrix]({svg})\n\n"
    );
    Ok(Section { markdown: md, failures })
}
