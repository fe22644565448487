//! heapcapd serving real runc containers: side (e) of measurement 1, and measurement 4 (scale).

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::fixtures::Fixtures;
use crate::stats::fmt;
use crate::{Args, Section};

/// A heapcapd on private sockets, killed on drop.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    pub agent: PathBuf,
    metrics: String,
}

impl Daemon {
    pub fn start(bin: &Path, dir: &Path) -> Result<Daemon> {
        let dir = dir.join("heapcapd");
        fs::create_dir_all(&dir)?;
        let agent = dir.join("agent.sock");
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let metrics = format!("127.0.0.1:{port}");
        let log = fs::File::create(dir.join("heapcapd.log"))?;
        let child = Command::new(bin)
            .arg("--socket")
            .arg(&agent)
            .arg("--control-socket")
            .arg(dir.join("control.sock"))
            // Its own fd holder (started by heapcapd from beside it; it exits once idle).
            .arg("--holder-socket")
            .arg(dir.join("holder.sock"))
            .args(["--metrics-addr", &metrics])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let daemon = Daemon { child, agent, metrics };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(daemon.agent.exists() && daemon.get_metrics().is_ok()) {
            if Instant::now() > deadline {
                bail!("heapcapd did not come up in 10 s (log: {})", dir.join("heapcapd.log").display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(daemon)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// GET /metrics.
    pub fn get_metrics(&self) -> Result<String> {
        let mut s = std::net::TcpStream::connect(&self.metrics)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    }

    /// utime + stime in seconds, and VmRSS / VmHWM in KiB.
    pub fn usage(&self) -> Result<(f64, u64, u64)> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid()))?;
        let after = stat.rsplit_once(')').context("odd /proc/pid/stat")?.1;
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let kib = |key: &str| -> u64 {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                .unwrap_or(0)
        };
        Ok((ticks / 100.0, kib("VmRSS:"), kib("VmHWM:")))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A runc bundle whose root holds only the static nbench, with heapcap's profile and a quota.
#[derive(Debug)]
pub struct Bundle {
    pub dir: PathBuf,
}

impl Bundle {
    pub fn new(dir: &Path, fx: &Fixtures, agent: &Path, limit: &str, calls: u64) -> Result<Bundle> {
        Bundle::with_profile(dir, fx, Some((agent, limit)), calls)
    }

    /// A bundle with heapcap's profile and quota (`Some((agent, limit))`) or without any seccomp.
    pub fn with_profile(dir: &Path, fx: &Fixtures, heapcap: Option<(&Path, &str)>, calls: u64) -> Result<Bundle> {
        let rootfs = dir.join("rootfs");
        for d in ["proc", "dev", "sys", "tmp"] {
            fs::create_dir_all(rootfs.join(d))?;
        }
        fs::copy(&fx.nbench_static, rootfs.join("nbench"))?;
        let out = Command::new("runc").args(["spec", "--bundle"]).arg(dir).output().context("run `runc spec`")?;
        if !out.status.success() {
            bail!("runc spec failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let path = dir.join("config.json");
        let mut config: Value = serde_json::from_str(&fs::read_to_string(&path)?)?;
        config["process"]["terminal"] = json!(false);
        config["process"]["args"] = json!(["/nbench", calls.to_string()]);
        config["root"]["readonly"] = json!(false);
        if let Some((agent, limit)) = heapcap {
            config["annotations"] = json!({ "heapcap.io/limit": limit });
            config["linux"]["seccomp"] = serde_json::to_value(heapcap_oci::heapcap_profile(agent, None))?;
        }
        fs::write(&path, serde_json::to_string_pretty(&config)?)?;
        Ok(Bundle { dir: dir.to_path_buf() })
    }

    /// Start `runc run` for container `id` (stdout piped).
    pub fn spawn(&self, id: &str) -> Result<Child> {
        self.spawn_with(Path::new("runc"), &[], id)
    }

    /// Start `RUNTIME run` for container `id` (stdout piped), with `env` set.
    fn spawn_with(&self, runtime: &Path, env: &[(&str, &Path)], id: &str) -> Result<Child> {
        Command::new("timeout")
            .args(["-k", "5", "600"])
            .arg(runtime)
            .args(["run", "--bundle"])
            .arg(&self.dir)
            .arg(id)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("start `{} run`", runtime.display()))
    }

    /// Edit the bundle's `config.json`.
    fn edit(&self, change: impl FnOnce(&mut Value)) -> Result<()> {
        let path = self.dir.join("config.json");
        let mut config: Value = serde_json::from_str(&fs::read_to_string(&path)?)?;
        change(&mut config);
        fs::write(&path, serde_json::to_string_pretty(&config)?)?;
        Ok(())
    }

    /// Run container `id` to the end; what nbench printed (µs per pair).
    pub fn run(&self, id: &str) -> Result<f64> {
        self.run_with(Path::new("runc"), &[], id)
    }

    /// [`Bundle::run`] with another runc-compatible runtime and environment.
    fn run_with(&self, runtime: &Path, env: &[(&str, &Path)], id: &str) -> Result<f64> {
        let out = self.spawn_with(runtime, env, id)?.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let _ = Command::new("runc").args(["delete", "-f", id]).output();
            bail!("`runc run` {id} failed ({}): {}{}", out.status, text, String::from_utf8_lossy(&out.stderr));
        }
        text.trim().parse().with_context(|| format!("container {id} printed {text:?}, not a number"))
    }
}

/// One histogram, summed over label sets: (upper bound, cumulative count).
fn histogram(metrics: &str) -> Vec<(f64, f64)> {
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in metrics.lines().filter(|l| l.starts_with("heapcap_decision_latency_seconds_bucket")) {
        let Some(le) = line.split("le=\"").nth(1).and_then(|s| s.split('"').next()) else { continue };
        let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::NAN) };
        let Some(count) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else { continue };
        match buckets.iter_mut().find(|(b, _)| *b == le) {
            Some(b) => b.1 += count,
            None => buckets.push((le, count)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The `q` quantile of the decisions between two scrapes, in seconds (interpolated in its bucket).
fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> (f64, f64) {
    let delta: Vec<(f64, f64)> =
        after.iter().map(|(le, c)| (*le, c - before.iter().find(|(b, _)| b == le).map_or(0.0, |x| x.1))).collect();
    let total = delta.last().map_or(0.0, |x| x.1);
    if total <= 0.0 {
        return (f64::NAN, 0.0);
    }
    let target = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, c) in &delta {
        if c >= target {
            if le.is_infinite() {
                return (prev.0, total);
            }
            let frac = if c > prev.1 { (target - prev.1) / (c - prev.1) } else { 1.0 };
            return (prev.0 + (le - prev.0) * frac, total);
        }
        prev = (le, c);
    }
    (f64::NAN, total)
}

/// Measurement 4: N containers allocating at once under one heapcapd.
pub fn scale(args: &Args, fx: &Fixtures, work: &Path) -> Result<Section> {
    let counts = args.scale.clone().unwrap_or(if args.tiny { vec![1, 2] } else { vec![1, 10, 100] });
    let calls: u64 = if args.tiny { 500 } else { 20_000 };
    let daemon = Daemon::start(&args.heapcapd(), work)?;
    let bundle = Bundle::new(&work.join("scale-bundle"), fx, &daemon.agent, "1Gi", calls)?;
    let mut md = format!(
        "## 4. Scale: containers allocating at once under one heapcapd\n\n\
         N runc containers start together, each running {calls} notified mmap+munmap pairs (nbench, static, \
         quota 1Gi). Decision latency is from heapcapd's `heapcap_decision_latency_seconds` histogram \
         (the decisions of this step only; interpolated within its buckets, so only as fine as they are); \
         CPU is heapcapd's user+system time for the step; RSS is heapcapd's after the step and its peak so far. \
         µs/pair is what each container's loop saw (median over containers). The histogram times a decision \
         from receiving the notification to handing the answer to the kernel (the send wakes the caller on the \
         listener's CPU, and the time the listener then waits to run again is not the caller's); once more \
         threads are runnable than there are CPUs it still includes any time a listener is preempted while \
         deciding. heapcapd CPU µs per decision is the cost that does not depend on that; µs/pair in the \
         containers is what they saw, queueing for the 2 CPUs included.\n\n\
         | containers | decisions | p50 µs | p99 µs | µs/pair in containers (median, min–max) | heapcapd CPU s | heapcapd CPU µs per decision | heapcapd RSS MiB (peak) | wall s |\n\
         |---|---|---|---|---|---|---|---|---|\n"
    );
    let mut failures = Vec::new();
    for &n in &counts {
        let before = histogram(&daemon.get_metrics()?);
        let (cpu0, _, _) = daemon.usage()?;
        let t = Instant::now();
        let children: Vec<(String, Result<std::process::Child>)> = (0..n)
            .map(|i| {
                let id = format!("hcb-{}-{n}-{i}", std::process::id());
                let c = bundle.spawn(&id);
                (id, c)
            })
            .collect();
        let mut per_pair = Vec::new();
        for (id, child) in children {
            let r = child.and_then(|c| {
                let out = c.wait_with_output()?;
                let text = String::from_utf8_lossy(&out.stdout).to_string();
                if !out.status.success() {
                    let _ = Command::new("runc").args(["delete", "-f", &id]).output();
                    bail!("container {id} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
                }
                text.trim().parse::<f64>().with_context(|| format!("container {id} printed {text:?}"))
            });
            match r {
                Ok(v) => per_pair.push(v),
                Err(e) => failures.push(format!("scale {n}: {e:#}")),
            }
        }
        let wall = t.elapsed().as_secs_f64();
        let after = histogram(&daemon.get_metrics()?);
        let (cpu1, rss, hwm) = daemon.usage()?;
        let (p50, total) = quantile(&before, &after, 0.5);
        let (p99, _) = quantile(&before, &after, 0.99);
        let s = crate::stats::summarize(&per_pair);
        eprintln!("scale {n}: p50 {:.1} µs p99 {:.1} µs, {} decisions, {wall:.1} s", p50 * 1e6, p99 * 1e6, total);
        md += &format!(
            "| {n} | {total:.0} | {} | {} | {} | {} | {} | {} ({}) | {wall:.2} |\n",
            fmt(p50 * 1e6),
            fmt(p99 * 1e6),
            crate::stats::fmt_spread(&s),
            fmt(cpu1 - cpu0),
            fmt((cpu1 - cpu0) / total * 1e6),
            fmt(rss as f64 / 1024.0),
            fmt(hwm as f64 / 1024.0),
        );
    }
    md += "\n";
    Ok(Section { markdown: md, failures })
}

/// Measurement 5: what heapcap adds to a container's start (runc run of a trivial program to its end).
pub fn start(args: &Args, fx: &Fixtures, work: &Path) -> Result<Section> {
    let rounds = if args.tiny { 2 } else { 20 };
    let daemon = Daemon::start(&args.heapcapd(), work)?;
    let plain = Bundle::with_profile(&work.join("start-plain"), fx, None, 1)?;
    let capped = Bundle::new(&work.join("start-heapcap"), fx, &daemon.agent, "1Gi", 1)?;
    // The prestart hook: an annotation and hooks.prestart, no seccomp in the spec.
    let hooked = Bundle::with_profile(&work.join("start-hook"), fx, None, 1)?;
    let hook = fs::canonicalize(args.bin_dir.join("heapcap-hook")).context("find heapcap-hook")?;
    hooked.edit(|c| {
        c["annotations"] = json!({ "heapcap.io/limit": "1Gi" });
        c["hooks"] = json!({ "prestart": [{
            "path": hook, "args": ["heapcap-hook", "prestart"],
            "env": [format!("HEAPCAP_SOCKET={}", daemon.agent.display())],
        }]});
    })?;
    // The shim: an annotation only; heapcap-runtime changes config.json (put back each run) and execs runc.
    let shimmed = Bundle::with_profile(&work.join("start-shim"), fx, None, 1)?;
    shimmed.edit(|c| c["annotations"] = json!({ "heapcap.io/limit": "1Gi" }))?;
    let shim_config = work.join("runtime.toml");
    fs::write(&shim_config, format!("runtime = \"runc\"\nlistener_path = {:?}\n", daemon.agent))?;
    let shim_original = fs::read(shimmed.dir.join("config.json"))?;
    let shim = args.bin_dir.join("heapcap-runtime");
    let runc = PathBuf::from("runc");
    const SIDES: [&str; 4] = [
        "runc, no seccomp",
        "runc + heapcap profile (`listenerPath`), heapcapd",
        "runc + `heapcap-hook prestart` (annotation only), heapcapd",
        "`heapcap-runtime` (annotation only) → runc, heapcapd",
    ];
    let mut s: [Vec<f64>; 4] = Default::default();
    let mut failures = Vec::new();
    for r in 0..rounds {
        // Rotated each round: no side always follows the same one.
        for k in 0..SIDES.len() {
            let side = (k + r) % SIDES.len();
            let id = format!("hcb-{}-start-{side}-{r}", std::process::id());
            let res = (|| {
                let (bundle, runtime, env): (&Bundle, &Path, Vec<(&str, &Path)>) = match side {
                    0 => (&plain, &runc, vec![]),
                    1 => (&capped, &runc, vec![]),
                    2 => (&hooked, &runc, vec![]),
                    _ => {
                        fs::write(shimmed.dir.join("config.json"), &shim_original)?;
                        (&shimmed, &shim, vec![("HEAPCAP_RUNTIME_CONFIG", &shim_config)])
                    }
                };
                let t = Instant::now();
                bundle.run_with(runtime, &env, &id)?;
                Ok::<f64, anyhow::Error>(t.elapsed().as_secs_f64() * 1e3)
            })();
            match res {
                Ok(ms) => s[side].push(ms),
                Err(e) => {
                    failures.push(format!("measurement 5, side {side}, round {r}: {e:#}"));
                    s[side].push(f64::NAN);
                }
            }
        }
    }
    let mut md = format!(
        "## 5. Container start\n\n\
         Wall time of `runc run` of a one-call static program to its end, {rounds} rounds, the sides in a \
         rotating order: without seccomp; with heapcap's profile and `listenerPath` in the spec (runc hands \
         heapcapd the listener before the program starts); with only the annotation and heapcap's prestart \
         hook (it installs the filter into the paused init and hands heapcapd the listener); with only the \
         annotation, run through the shim `heapcap-runtime` (it checks heapcapd answers, changes config.json, \
         execs runc). Added: paired with the no-seccomp side of the same round.\n\n\
         | side | ms: median (min–max) | added ms, paired: median (min–max) | ratio |\n|---|---|---|---|\n",
    );
    for (side, name) in SIDES.iter().enumerate() {
        let summary = crate::stats::fmt_spread(&crate::stats::summarize(&s[side]));
        if side == 0 {
            md += &format!("| {name} | {summary} | | |\n");
            continue;
        }
        let added = crate::stats::paired(&s[side], &s[0], |x, y| x - y);
        let ratio = crate::stats::paired(&s[side], &s[0], |x, y| x / y);
        let ratio = if ratio.median.is_finite() { format!("{}x", fmt(ratio.median)) } else { "n/a".into() };
        md += &format!("| {name} | {summary} | {} | {ratio} |\n", crate::stats::fmt_spread(&added));
    }
    md += "\n";
    Ok(Section { markdown: md, failures })
}
