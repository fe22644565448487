//! A process's open fds and threads, from `/proc/PID/fd` and `/proc/PID/task`: what heapcapd
//! and the holder must come back to once the containers they served are gone.

use std::fs;
use std::time::{Duration, Instant};

/// Open fds and threads of a process (heapcapd, the holder).
pub(crate) fn fds_and_tasks(pid: u32) -> (usize, usize) {
    let count = |sub: &str| {
        fs::read_dir(format!("/proc/{pid}/{sub}"))
            .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/{sub}: {e} (did the process die?)"))
            .count()
    };
    (count("fd"), count("task"))
}

/// The fewest fds and threads of `pid` over a short while: a control connection (a `ps`) or an
/// intake thread may still be finishing when sampled once.
pub fn settled(pid: u32) -> (usize, usize) {
    (0..5)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(50));
            fds_and_tasks(pid)
        })
        .fold((usize::MAX, usize::MAX), |(f, t), (f2, t2)| (f.min(f2), t.min(t2)))
}

/// Wait up to `within` until `pid` holds no more fds and threads than `baseline` ([`settled`]);
/// what it holds if it never gets there.
pub fn wait_back_to(pid: u32, baseline: (usize, usize), within: Duration) -> Result<(), (usize, usize)> {
    let deadline = Instant::now() + within;
    loop {
        let now = settled(pid);
        if now.0 <= baseline.0 && now.1 <= baseline.1 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(now);
        }
    }
}
