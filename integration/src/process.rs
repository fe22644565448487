//! Running a command with a timeout and capturing what it says: every runtime, podman and
//! heapcap command of the harness goes through [`run_captured`] or the crate-internal
//! `run_command` behind it, so a hang fails the test with the output so far instead of
//! stalling it; and a command's output shown for assertion messages.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::runtime::SETUP;

/// A runtime or podman command that takes longer than this is treated as hung:
/// its container is deleted and the test panics with what it printed.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// Cleaning up after a container (`delete -f`, `podman rm -f`) gets this long.
pub(crate) const CLEANUP_TIMEOUT: Duration = Duration::from_secs(30);

/// A command's status and output, for assertion messages.
pub fn show(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}--- stderr ---\n{}--- end ---",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A command's stdout, lossily decoded.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A command's stderr, lossily decoded.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Where a command's stdout and stderr go.
pub(crate) enum Capture {
    /// Pipes, read into the `Output`.
    Pipes,
    /// Files (created afresh), read into the `Output` when the command ends;
    /// for commands that leave processes behind holding them (`create`).
    Files { stdout: PathBuf, stderr: PathBuf },
}

/// Runs `cmd` (stdin from /dev/null, own process group) and captures its
/// status and output; kills it and panics with what it said after `timeout`.
/// For other programs the tests run, e.g. `heapcapd` or `heapcap ps`.
pub fn run_captured(cmd: Command, timeout: Duration) -> Output {
    run_or_panic(cmd, Capture::Pipes, timeout, || {})
}

/// [`run_command`], panicking on a timeout.
pub(crate) fn run_or_panic(cmd: Command, capture: Capture, timeout: Duration, on_timeout: impl FnOnce()) -> Output {
    run_command(cmd, capture, timeout, on_timeout).unwrap_or_else(|timed_out| panic!("{timed_out}"))
}

/// Runs `cmd` in its own process group with stdin from /dev/null and
/// collects its status and output. After `timeout` it calls `on_timeout`
/// (which should end whatever the command started, e.g. delete the
/// container), kills the command's process group and returns an error with
/// everything it said. Panics if the command cannot be started.
pub(crate) fn run_command(
    mut cmd: Command,
    capture: Capture,
    timeout: Duration,
    on_timeout: impl FnOnce(),
) -> Result<Output, String> {
    let shown = format!("{cmd:?}");
    cmd.process_group(0).stdin(Stdio::null());
    match &capture {
        Capture::Pipes => {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        Capture::Files { stdout, stderr } => {
            let create =
                |path: &Path| File::create(path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
            cmd.stdout(create(stdout)).stderr(create(stderr));
        }
    }
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start `{shown}`: {e}; {SETUP}"));
    let readers = match (child.stdout.take(), child.stderr.take()) {
        (Some(out), Some(err)) => Some((collect(out), collect(err))),
        _ => None,
    };

    let status = wait_with_timeout(&mut child, timeout);
    if status.is_none() {
        on_timeout();
        // SAFETY: kill(2) with a negative pid signals the process group that
        // was created for the child (process_group(0)); no memory is involved.
        unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
        let _ = child.kill();
        let _ = child.wait();
    }
    let (out, err) = match (readers, &capture) {
        (Some((out, err)), _) => {
            // After a timeout, something else may still hold the pipes: wait a little only.
            let until = Instant::now() + Duration::from_secs(2);
            while status.is_none() && !(out.is_finished() && err.is_finished()) && Instant::now() < until {
                thread::sleep(Duration::from_millis(20));
            }
            let take = |reader: thread::JoinHandle<Vec<u8>>| {
                if status.is_some() || reader.is_finished() {
                    reader.join().expect("reader thread")
                } else {
                    b"(still held open by some process)\n".to_vec()
                }
            };
            (take(out), take(err))
        }
        (None, Capture::Files { stdout, stderr }) => {
            (fs::read(stdout).unwrap_or_default(), fs::read(stderr).unwrap_or_default())
        }
        (None, Capture::Pipes) => unreachable!("piped commands have readers"),
    };
    match status {
        Some(status) => Ok(Output { status, stdout: out, stderr: err }),
        None => Err(format!(
            "`{shown}` did not finish within {timeout:?}; cleaned up and killed it\n\
             --- stdout ---\n{}--- stderr ---\n{}--- end ---",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        )),
    }
}

fn collect(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        // A read error just ends the capture; the test sees what came before.
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

/// Waits for `child` up to `timeout`; `None` if it is still running.
fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => {
                thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            Ok(None) => return None,
            Err(e) => panic!("waiting for process {}: {e}", child.id()),
        }
    }
}
