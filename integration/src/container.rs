//! A created container ([`Bundle::create`](crate::bundle::Bundle::create)): `start`, `exec`,
//! `kill`, `state` and waiting on it, and `delete -f` when it is dropped.

use std::fs;
use std::path::PathBuf;
use std::process::Output;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::bundle::Bundle;
use crate::process::{run_command, run_or_panic, show, stderr, Capture, CLEANUP_TIMEOUT, TIMEOUT};
use crate::runtime::Runtime;

/// A container made by [`Bundle::create`]. Dropping it runs `delete -f`
/// (which also kills it), so a failing test leaves nothing behind.
#[derive(Debug)]
pub struct Container<'b> {
    pub(crate) bundle: &'b Bundle,
    pub(crate) runtime: Runtime,
    pub(crate) id: String,
    pub(crate) deleted: bool,
}

impl Container<'_> {
    /// The container's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn stdout_path(&self) -> PathBuf {
        self.bundle.dir().join(format!("{}.stdout", self.id))
    }

    pub(crate) fn stderr_path(&self) -> PathBuf {
        self.bundle.dir().join(format!("{}.stderr", self.id))
    }

    /// What the container's processes (and `create`) wrote to stdout so far.
    pub fn stdout(&self) -> String {
        fs::read_to_string(self.stdout_path()).unwrap_or_default()
    }

    /// What the container's processes (and `create`) wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(self.stderr_path()).unwrap_or_default()
    }

    /// `RUNTIME start ID`; panics if it fails.
    pub fn start(&self) {
        let out = self.runtime_command(&["start"], &[]);
        assert!(
            out.status.success(),
            "`{} start {}` failed:\n{}",
            self.runtime.binary(),
            self.id,
            self.show_with(&out)
        );
    }

    /// `RUNTIME exec ID ARGS...` in the foreground (stdin from /dev/null):
    /// the process's exit status and output. Panics after [`TIMEOUT`].
    pub fn exec(&self, args: &[&str]) -> Output {
        self.exec_with(&[], args, TIMEOUT)
    }

    /// `RUNTIME exec OPTS... ID ARGS...` (e.g. `--env K=V`, `--cwd /tmp`),
    /// like [`Container::exec`] with `timeout`.
    pub fn exec_with(&self, opts: &[&str], args: &[&str], timeout: Duration) -> Output {
        let mut cmd = self.runtime.command();
        cmd.arg("exec").args(opts).arg(&self.id).args(args);
        // On a timeout the exec'd process stays until the container is deleted (by this guard).
        run_or_panic(cmd, Capture::Pipes, timeout, || {})
    }

    /// `RUNTIME kill ID SIGNAL` (`"TERM"`, `"KILL"`, `"9"`...); panics if it fails.
    pub fn kill(&self, signal: &str) {
        let out = self.runtime_command(&["kill"], &[signal]);
        assert!(
            out.status.success(),
            "`{} kill {} {signal}` failed:\n{}",
            self.runtime.binary(),
            self.id,
            self.show_with(&out)
        );
    }

    /// `RUNTIME state ID`, parsed (`id`, `pid`, `status`, `bundle`, `annotations`, ...).
    pub fn state(&self) -> Value {
        let out = self.runtime_command(&["state"], &[]);
        assert!(
            out.status.success(),
            "`{} state {}` failed:\n{}",
            self.runtime.binary(),
            self.id,
            self.show_with(&out)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("`{} state {}` printed invalid JSON ({e}):\n{}", self.runtime.binary(), self.id, show(&out))
        })
    }

    /// The state's `status`: `created`, `running`, `paused` or `stopped`.
    pub fn status(&self) -> String {
        let state = self.state();
        state["status"].as_str().unwrap_or_else(|| panic!("no status in the state {state}")).to_string()
    }

    /// The host pid of the container's init process.
    pub fn pid(&self) -> u32 {
        let state = self.state();
        state["pid"]
            .as_u64()
            .and_then(|pid| u32::try_from(pid).ok())
            .unwrap_or_else(|| panic!("no pid in the state {state}"))
    }

    /// Waits until the container's stdout contains `needle`; returns all of
    /// its stdout. Panics after `timeout`.
    pub fn wait_for_stdout(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.stdout();
            if out.contains(needle) {
                return out;
            }
            if Instant::now() >= deadline {
                panic!(
                    "container {} did not print {needle:?} within {timeout:?}\n\
                     --- stdout ---\n{out}--- stderr ---\n{}--- end ---",
                    self.id,
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the container's init has exited (status `stopped`). Panics after `timeout`.
    pub fn wait_stopped(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status();
            if status == "stopped" {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "container {} is still {status} after {timeout:?}\n--- stdout ---\n{}--- stderr ---\n{}--- end ---",
                    self.id,
                    self.stdout(),
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `RUNTIME delete -f ID` now; panics if it fails.
    pub fn delete(mut self) {
        self.deleted = true;
        let out = self.runtime_command(&["delete", "-f"], &[]);
        assert!(
            out.status.success(),
            "`{} delete -f {}` failed:\n{}",
            self.runtime.binary(),
            self.id,
            self.show_with(&out)
        );
    }

    /// `RUNTIME BEFORE... ID AFTER...`, captured, with the default timeout.
    fn runtime_command(&self, before: &[&str], after: &[&str]) -> Output {
        let mut cmd = self.runtime.command();
        cmd.args(before).arg(&self.id).args(after);
        run_or_panic(cmd, Capture::Pipes, TIMEOUT, || {})
    }

    /// `out`, plus the container's own output files.
    fn show_with(&self, out: &Output) -> String {
        format!(
            "{}\n--- container stdout ({}) ---\n{}--- container stderr ---\n{}--- end ---",
            show(out),
            self.stdout_path().display(),
            self.stdout(),
            self.stderr()
        )
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        if !self.deleted {
            force_delete(self.runtime, &self.id);
        }
    }
}

/// Runs `delete -f ID` when dropped.
pub(crate) struct DeleteOnDrop<'a> {
    pub(crate) runtime: Runtime,
    pub(crate) id: &'a str,
}

impl Drop for DeleteOnDrop<'_> {
    fn drop(&mut self) {
        force_delete(self.runtime, self.id);
    }
}

/// `RUNTIME delete -f ID`, which kills the container first; never panics
/// (a container that is already gone is fine).
pub(crate) fn force_delete(runtime: Runtime, id: &str) {
    let mut cmd = runtime.command();
    cmd.args(["delete", "-f", id]);
    match run_command(cmd, Capture::Pipes, CLEANUP_TIMEOUT, || {}) {
        Ok(out) if out.status.success() => {}
        // runc: "container does not exist"; crun: "cannot open directory `/run/crun/ID`: No such file or directory".
        Ok(out) if stderr(&out).contains("does not exist") || stderr(&out).contains("No such file or directory") => {}
        Ok(out) => eprintln!("cleanup: `{} delete -f {id}` failed:\n{}", runtime.binary(), show(&out)),
        Err(timed_out) => eprintln!("cleanup: `{} delete -f {id}` hung:\n{timed_out}", runtime.binary()),
    }
}
