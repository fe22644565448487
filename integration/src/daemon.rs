//! A real heapcapd for tests: started on private sockets and a private metrics port, stopped
//! (with its fd holder) on drop; [`Wedged`], a listener that stands for a heapcapd that accepts
//! nothing; and a process's open fds and threads (`/proc/PID/fd`, `/proc/PID/task`), which
//! heapcapd's and the holder's must come back to once the containers they served are gone.

use std::fs;
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::binaries::{bin_dir, heapcap};
use crate::bundle::Bundle;
use crate::process::{run_captured, show};

/// heapcap's seccomp profile ([`heapcap_oci::heapcap_profile`]) with `listener` as its
/// `listenerPath`, as the JSON [`Bundle::seccomp`] takes.
pub fn seccomp_profile(listener: &Path) -> Value {
    serde_json::to_value(heapcap_oci::heapcap_profile(listener, None)).expect("profile as JSON")
}

/// A running heapcapd (and the fd holder it starts).
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    /// Its own directory (`/tmp/hcd-PID-N`): sockets, log, and room for a test's files.
    pub dir: PathBuf,
    /// The agent socket the runtimes send listener fds to (`listenerPath`).
    pub agent: PathBuf,
    /// The control socket `heapcap ps`, `set-limit` and `events` use.
    pub control: PathBuf,
    /// The fd holder's socket.
    pub holder: PathBuf,
    metrics: String,
    log: PathBuf,
    extra: Vec<String>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

impl Daemon {
    /// Start heapcapd with its defaults; wait until both sockets answer.
    pub fn start() -> Daemon {
        Self::start_with(&[])
    }

    /// Start heapcapd with extra arguments; wait until both sockets answer.
    pub fn start_with(extra: &[&str]) -> Daemon {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = PathBuf::from(format!("/tmp/hcd-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let (agent, control, holder, log) = (
            dir.join("run/agent.sock"),
            dir.join("run/control.sock"),
            dir.join("run/holder.sock"),
            dir.join("heapcapd.log"),
        );
        fs::create_dir_all(&dir).expect("daemon dir");
        let metrics = format!("127.0.0.1:{}", free_port());
        let extra = extra.iter().map(|s| s.to_string()).collect();
        let mut daemon = Daemon { child: None, dir, agent, control, holder, metrics, log, extra };
        daemon.launch(&bin_dir().join("heapcapd"));
        daemon
    }

    /// heapcap's seccomp profile, reporting to this heapcapd ([`seccomp_profile`] of its agent socket).
    pub fn profile(&self) -> Value {
        seccomp_profile(&self.agent)
    }

    /// A busybox bundle whose filter reports to this heapcapd, with `annotations`, running `args`.
    pub fn bundle(&self, annotations: &[(&str, &str)], args: &[&str]) -> Bundle {
        let mut b = Bundle::new("heapcapd");
        b.args(args).seccomp(self.profile()).annotations(annotations);
        b
    }

    /// Start `binary` as this daemon (same sockets, same log); wait until both sockets answer.
    fn launch(&mut self, binary: &Path) {
        assert!(self.child.is_none(), "heapcapd is already running");
        let log = fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        let child = Command::new(binary)
            .arg("--socket")
            .arg(&self.agent)
            .arg("--control-socket")
            .arg(&self.control)
            .arg("--holder-socket")
            .arg(&self.holder)
            .arg("--holder")
            .arg(bin_dir().join("heapcap-holder"))
            .args(["--metrics-addr", &self.metrics])
            .args(&self.extra)
            .env("HEAPCAP_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start heapcapd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(UnixStream::connect(&self.agent).is_ok() && UnixStream::connect(&self.control).is_ok()) {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("heapcapd exited at start ({status}):\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "heapcapd did not come up:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9` heapcapd (the holder stays).
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("heapcapd running");
        child.kill().expect("kill -9 heapcapd");
        child.wait().expect("reap heapcapd");
    }

    /// Stop heapcapd as a service manager does (SIGTERM), and wait for it to exit.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("heapcapd running");
        let _ = Command::new("kill").arg(child.id().to_string()).status();
        child.wait().expect("reap heapcapd");
    }

    /// Start heapcapd again after [`Daemon::kill9`] or [`Daemon::stop`], from `binary` (an upgrade)
    /// or the same one.
    pub fn restart(&mut self, binary: Option<&Path>) {
        let default = bin_dir().join("heapcapd");
        self.launch(binary.unwrap_or(&default));
    }

    /// The pid of the holder serving this daemon's holder socket, if one runs.
    pub fn holder_pid(&self) -> Option<u32> {
        holder_pid_on(&self.holder)
    }

    /// heapcapd's pid; panics if it is not running.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// What heapcapd logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `heapcap ARGS --control-socket <ours>`.
    pub fn heapcap(&self, args: &[&str]) -> Output {
        let out = heapcap().args(args).env("HEAPCAP_CONTROL_SOCKET", &self.control).output().expect("run heapcap");
        out
    }

    /// `heapcap ps --json`, parsed; panics if it fails or takes over 30 s.
    pub fn ps(&self) -> Value {
        let mut cmd = heapcap();
        cmd.args(["ps", "--json"]).env("HEAPCAP_CONTROL_SOCKET", &self.control);
        // A control request that never answers is a deadlock in heapcapd.
        let out = run_captured(cmd, Duration::from_secs(30));
        assert!(out.status.success(), "heapcap ps failed: {}", show(&out));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("heapcap ps --json printed no JSON ({e}): {}", show(&out)))
    }

    /// Open fds and threads of heapcapd now.
    pub fn resources(&self) -> (usize, usize) {
        fds_and_tasks(self.pid())
    }

    /// GET /metrics, with a deadline.
    pub fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.metrics).expect("connect to the metrics address");
        s.set_read_timeout(Some(Duration::from_secs(30))).expect("read timeout");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("send the metrics request");
        let mut body = String::new();
        s.read_to_string(&mut body).expect("/metrics did not answer within 30 s");
        body
    }

    /// The metrics address (`HOST:PORT`) heapcapd serves `/metrics` on.
    pub fn metrics_addr(&self) -> &str {
        &self.metrics
    }

    /// The value of a metric line that starts with `prefix` (labels included), if any.
    pub fn metric(&self, prefix: &str) -> Option<f64> {
        self.metrics().lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    /// Wait until `heapcap ps` lists no container.
    pub fn wait_no_containers(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let ps = self.ps();
            if ps["containers"].as_array().is_some_and(|c| c.is_empty()) {
                return;
            }
            assert!(Instant::now() < deadline, "containers still listed: {ps}\nlog:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
        // The holder would outlive the test holding nothing; it exits by itself when its
        // listeners are gone, but a test that ends with containers running must not leave it.
        if let Some(pid) = self.holder_pid() {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
        if std::env::var_os("HEAPCAP_TEST_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// A listener on `path` that accepts nothing, its backlog full: a wedged heapcapd (crun's own
/// `connect` to it blocks for as long as it stays so). Killed on drop.
#[derive(Debug)]
pub struct Wedged(std::process::Child);

impl Wedged {
    /// Listen on `path` (replacing a socket there) and fill the backlog.
    pub fn at(path: &Path) -> Wedged {
        use std::io::BufRead;
        const SCRIPT: &str = "import os, socket, sys, time\n\
            p = sys.argv[1]\n\
            os.path.exists(p) and os.unlink(p)\n\
            s = socket.socket(socket.AF_UNIX); s.bind(p); s.listen(0)\n\
            held = []\n\
            while True:\n    \
                c = socket.socket(socket.AF_UNIX); c.setblocking(False)\n    \
                try: c.connect(p)\n    \
                except BlockingIOError: break\n    \
                held.append(c)\n\
            print('ready', len(held), flush=True)\n\
            time.sleep(600)\n";
        let mut child = Command::new("python3")
            .args(["-c", SCRIPT])
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("this test runs python3 as a wedged heapcapd (scripts/setup.sh): {e}"));
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert!(line.starts_with("ready"), "the wedged listener did not come up: {line:?}");
        Wedged(child)
    }
}

impl Drop for Wedged {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The pid of the heapcap-holder listening on `socket` (by its command line), if one runs.
pub fn holder_pid_on(socket: &Path) -> Option<u32> {
    let needle = socket.to_str()?.as_bytes().to_vec();
    fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = fs::read(e.path().join("cmdline")).ok()?;
        let mut args = cmdline.split(|b| *b == 0);
        let exe = args.next()?;
        (exe.ends_with(b"heapcap-holder") && args.any(|a| a == needle.as_slice())).then_some(pid)
    })
}

/// Open fds and threads of a process (heapcapd, the holder).
pub fn fds_and_tasks(pid: u32) -> (usize, usize) {
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
