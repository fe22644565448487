//! The table `heapcap run --report` prints at exit, and the denial lines.

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use heapcap_control::Event;
use heapcap_policy::ledger::Summary;
use heapcap_policy::Size;
use heapcap_supervise::Denial;

/// Print the per-process table.
pub fn table(out: &mut impl Write, rows: &[Summary]) -> std::io::Result<()> {
    let width = rows.iter().map(|r| r.command.chars().count()).max().unwrap_or(0).clamp(7, 60);
    writeln!(out, "{:>8}  {:<width$}  {:>10}  {:>10}  {:>7}", "PID", "COMMAND", "PEAK", "LIMIT", "DENIALS")?;
    for r in rows {
        let limit = r.limit.map_or_else(|| "-".to_string(), |l| Size(l).to_string());
        writeln!(
            out,
            "{:>8}  {:<width$}  {:>10}  {:>10}  {:>7}",
            r.pid,
            r.command,
            Size(r.peak).to_string(),
            limit,
            r.denials
        )?;
    }
    Ok(())
}

/// Prints denials on stderr, at most a few a second so a looping program cannot flood it.
#[derive(Debug)]
pub struct DenialLog {
    state: Mutex<(Instant, u32, u64)>,
}

const PER_SECOND: u32 = 5;

impl DenialLog {
    pub fn new() -> DenialLog {
        DenialLog { state: Mutex::new((Instant::now(), 0, 0)) }
    }

    pub fn log(&self, d: &Denial) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if now.duration_since(s.0) >= Duration::from_secs(1) {
            if s.2 > 0 {
                eprintln!("heapcap: {} more denials not shown", s.2);
            }
            *s = (now, 0, 0);
        }
        if s.1 >= PER_SECOND {
            s.2 += 1;
            return;
        }
        s.1 += 1;
        eprintln!("heapcap: {}", Event::new("", d).describe());
    }

    /// Say how many lines were held back.
    pub fn flush(&self) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.2 > 0 {
            eprintln!("heapcap: {} more denials not shown", s.2);
        }
    }
}
