//! `heapcapd`: the supervisor for containers. Runtimes (runc, crun) send it each container's
//! seccomp listener fd through `linux.seccomp.listenerPath`; it answers every heap growth from
//! the container's quota, and serves `heapcap ps`, `set-limit` and `events` on a control socket.
//!
//! Where each part runs:
//! - the notification path: one thread per listener fd, blocking in `SECCOMP_IOCTL_NOTIF_RECV`
//!   (the kernel's synchronous wake-up hands the CPU straight to a thread blocked there), and the
//!   exit watcher's thread;
//! - the control plane: one tokio runtime with one worker thread, named `control-plane`: the agent
//!   socket's intake, the control socket (`ps`, `set-limit`, `events --follow`) and `/metrics`
//!   (hyper), each connection a task with its deadline; work that reads `/proc` or talks to the
//!   holder goes to the runtime's blocking pool;
//! - the fd holder's watch (`holder-watch`): blocks until the holder hangs up, then brings a new
//!   one and hands it every listener ([`holder`]);
//! - the main thread waits for SIGTERM/SIGINT.
#![forbid(unsafe_code)]

mod container;
mod control;
mod events;
mod holder;
mod intake;
mod metrics;
mod record;
mod registry;
#[cfg(test)]
mod registry_tests;
mod sockets;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use heapcap_env::paths::Paths;
use heapcap_supervise::{ExitWatcher, Observer};
use nix::sys::signal::{SigSet, Signal};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Where the sockets are unless given: `/run/heapcap` as root, else `$XDG_RUNTIME_DIR/heapcap`
/// (`/run/user/UID/heapcap` without it).
static DEFAULTS: LazyLock<Paths> = LazyLock::new(|| {
    Paths::for_user(heapcap_linux::userns::host_euid(), std::env::var_os("XDG_RUNTIME_DIR").as_deref())
});

/// heapcap's supervisor for containers.
///
/// Point a container's `linux.seccomp.listenerPath` at the agent socket (heapcap's OCI hook and
/// runtime shim do it for you) and set `heapcap.io/limit` (and optionally
/// `heapcap.io/total-limit`, `heapcap.io/mode=audit`) as annotations or in `listenerMetadata`.
/// Set HEAPCAP_LOG (e.g. `debug`) to change what is logged. Run by a user other than root it
/// supervises that user's rootless containers, its sockets in `$XDG_RUNTIME_DIR/heapcap`.
#[derive(Debug, Parser)]
#[command(name = "heapcapd", version)]
struct Args {
    /// Where runtimes send listener fds (only root and heapcapd's own user may connect).
    #[arg(long, value_name = "PATH", default_value_os_t = DEFAULTS.agent.clone())]
    socket: PathBuf,
    /// Where `heapcap ps`, `set-limit` and `events` connect (only root and heapcapd's own user).
    #[arg(long, value_name = "PATH", default_value_os_t = DEFAULTS.control.clone())]
    control_socket: PathBuf,
    /// Where the fd holder listens: it keeps every container's listener fd while heapcapd
    /// restarts (heapcapd starts it if it is not running). Only root and its own user.
    #[arg(long, value_name = "PATH", default_value_os_t = DEFAULTS.holder.clone())]
    holder_socket: PathBuf,
    /// The holder program (default: `heapcap-holder` beside heapcapd, else on PATH).
    #[arg(long, value_name = "PATH")]
    holder: Option<PathBuf>,
    /// When heapcapd is gone for this long, the holder lets containers' heap growth through
    /// unquota'd (until heapcapd is back) rather than keep it waiting. Used when heapcapd
    /// starts the holder.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    holder_grace: std::time::Duration,
    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Log as text or as JSON lines (on stderr).
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// A container with bad heapcap settings (e.g. heapcap.io/limit=lots) is refused: it does not
    /// start and its stderr says why. `audit` runs it unquota'd instead, with a warning.
    #[arg(long, value_enum, value_name = "POLICY", default_value = "refuse")]
    bad_settings: intake::OnBadSettings,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HEAPCAP_LOG").unwrap_or_else(|_| "info".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("heapcapd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Blocking-pool threads of the control plane (a `ps`, a `set-limit`, taking an agent message):
/// more wait for one.
const MAX_BLOCKING: usize = 64;
/// How long an idle blocking-pool thread stays.
const BLOCKING_KEEP_ALIVE: Duration = Duration::from_secs(5);

fn run(args: &Args) -> anyhow::Result<()> {
    // Signals that end heapcapd are taken synchronously, so the sockets can be removed. Blocked
    // before any thread starts: every thread inherits the mask.
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGINT);
    mask.thread_block().context("cannot block signals")?;
    raise_fd_limit();

    let exits = Arc::new(ExitWatcher::start().context("cannot start the exit watcher")?);
    let events = Arc::new(events::Events::default());
    let metrics = args.metrics_addr.map(|_| metrics::Metrics::new());
    let observer = metrics.clone().map(|m| m as Arc<dyn Observer>);

    let agent = bind(&args.socket)?;
    let control = bind(&args.control_socket)?;
    let metrics_listener = args
        .metrics_addr
        .map(|addr| std::net::TcpListener::bind(addr).with_context(|| format!("cannot serve metrics on {addr}")))
        .transpose()?;
    // After the sockets: a second heapcapd has already stopped above, before touching the holder.
    let binary = args.holder.clone().unwrap_or_else(heapcap_holder::default_binary);
    let (client, held) = heapcap_holder::connect_or_start(&args.holder_socket, &binary, args.holder_grace)
        .with_context(|| format!("cannot reach the fd holder at {}", args.holder_socket.display()))?;
    let start = holder::Start { socket: args.holder_socket.clone(), binary, grace: args.holder_grace };
    let holder = Arc::new(holder::Holder::new(start, client));
    let registry = registry::Registry::new(exits, events.clone(), observer, Some(holder));
    if !held.is_empty() {
        tracing::info!(listeners = held.len(), "taking back what the holder kept");
    }
    for h in held {
        let container = h.container.clone();
        if let Err(e) = registry.restore(h) {
            tracing::error!(%container, error = %e, "cannot serve a listener taken back from the holder");
        }
    }
    // A holder that dies is replaced at once, and handed every listener.
    registry.watch_holder().context("cannot watch the fd holder")?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("control-plane")
        .max_blocking_threads(MAX_BLOCKING)
        .thread_keep_alive(BLOCKING_KEEP_ALIVE)
        .enable_io()
        .enable_time()
        .build()
        .context("cannot start the control plane's runtime")?;
    {
        let _runtime = runtime.enter();
        let agent = tokio_unix(agent).context("cannot serve the agent socket")?;
        let control = tokio_unix(control).context("cannot serve the control socket")?;
        runtime.spawn(intake::run(agent, registry.clone(), args.bad_settings));
        runtime.spawn(control::run(control, registry.clone(), events.clone()));
        if let (Some(listener), Some(m)) = (metrics_listener, &metrics) {
            let addr = listener.local_addr().context("the metrics address")?;
            listener.set_nonblocking(true).context("cannot serve metrics")?;
            let listener = tokio::net::TcpListener::from_std(listener).context("cannot serve metrics")?;
            m.watch(registry.clone());
            runtime.spawn(metrics::serve(listener, m.clone()));
            tracing::info!(%addr, "metrics at /metrics");
        }
    }
    tracing::info!(socket = %args.socket.display(), control = %args.control_socket.display(), "heapcapd ready");
    let sig = mask.wait().context("waiting for signals")?;
    tracing::info!(signal = ?sig, "stopping");
    runtime.shutdown_background();
    let _ = std::fs::remove_file(&args.socket);
    let _ = std::fs::remove_file(&args.control_socket);
    Ok(())
}

/// [`sockets::bind_private`], with what to do when a user's runtime directory is missing.
fn bind(path: &Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
    sockets::bind_private(path).with_context(|| {
        let mut why = format!("cannot listen on {}", path.display());
        let parent = path.parent().and_then(Path::parent).filter(|p| !p.as_os_str().is_empty());
        if let Some(xdg) = parent.filter(|p| DEFAULTS.rootless() && path.starts_with(&DEFAULTS.dir) && !p.exists()) {
            why += &format!(
                " ({} does not exist: it is your XDG_RUNTIME_DIR, which a login session makes; set XDG_RUNTIME_DIR \
                 to a directory of yours, mode 0700, or give the sockets' paths)",
                xdg.display()
            );
        }
        why
    })
}

/// A listener of the control plane's runtime (called within it).
fn tokio_unix(listener: std::os::unix::net::UnixListener) -> std::io::Result<tokio::net::UnixListener> {
    listener.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(listener)
}

/// One fd per process and thread of every container is held: take the hard limit.
fn raise_fd_limit() {
    if let Err(e) = heapcap_linux::rlimit::raise_fd_limit() {
        tracing::warn!(error = %e, "cannot raise the limit on open files");
    }
}
