//! The OCI seccomp agent protocol: what runc and crun send to `linux.seccomp.listenerPath`
//! (and what heapcap's own hook sends): one message per connection with the listener fd and
//! the container process state as JSON.
//!
//! Connections are read on the control plane's runtime (an idle or trickling peer holds no
//! thread); a complete message is taken on its blocking pool (handing the listener to the
//! holder and starting its serving thread).
//!
//! When the message comes depends on the runtime: runc connects and sends at once, during
//! `runc create`; crun connects during `crun create` (before it forks the container's init) but
//! the init sends the listener only when it installs its filter, just before it runs the user's
//! program, that is at `crun start`, however long after. A connection with nothing to read yet
//! is therefore waited for as long as its peer keeps it open (the init holds it until it sends,
//! and it closes when the container is deleted unstarted); past [`FIRST_BYTES`] it gives up its
//! place among the [`MAX_CONNECTIONS`] and waits among the [`MAX_PARKED`] instead, so that idle
//! connections never keep others out. Once bytes come, the rest must follow within
//! [`READ_DEADLINE`].

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use heapcap_linux::fdpass::{recv_fds, Received};
use heapcap_linux::notify::Listener;
use heapcap_linux::peercred::{check_peer, peer_cred, PeerError};
use heapcap_linux::pidfd::Pidfd;
use heapcap_oci::agent::{self, AgentError, AgentMessage, MAX_MESSAGE};
use heapcap_policy::ledger::{Counting, Limits, Mode};
use heapcap_policy::settings::{Settings, SettingsError};
use oci_spec::runtime::SECCOMP_FD_NAME;
use tokio::io::{AsyncReadExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::registry::Registry;
use crate::sockets::{serve_connections, Slot};

/// How long a peer has to send the rest of its message once its first bytes came (runc and crun
/// send it in one `sendmsg` and close).
const READ_DEADLINE: Duration = Duration::from_secs(5);
/// How long a connection waits for its first bytes in one of the [`MAX_CONNECTIONS`] places
/// before it is parked (see the module's documentation: crun sends at `crun start`).
const FIRST_BYTES: Duration = Duration::from_secs(5);
/// Agent connections served at once. Far above what a burst of container starts needs (each
/// message takes milliseconds); past it, connections wait in the backlog, never refused, and
/// idle ones free their place within [`FIRST_BYTES`].
const MAX_CONNECTIONS: usize = 256;
/// Connections parked, waiting for their first bytes with no deadline: containers crun created
/// and has not started yet (one fd each). Past it, a connection idle for [`FIRST_BYTES`] is
/// closed (and a crun container behind it fails to start, saying it could not send its listener).
const MAX_PARKED: usize = 1024;

/// What to do with a container whose heapcap settings are bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnBadSettings {
    /// Refuse the container: it does not start, and says why on its stderr.
    Refuse,
    /// Run it unquota'd in audit mode, with a warning in heapcapd's log.
    Audit,
}

/// Why a message was not taken.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error("cannot read the message: {0}")]
    Read(#[source] std::io::Error),
    #[error("no complete message within {}s of its first bytes ({got} bytes received): a runtime sends its state and closes the connection", READ_DEADLINE.as_secs())]
    Timeout { got: usize },
    #[error("nothing received within {}s, and {MAX_PARKED} other connections already wait for their message: closed", FIRST_BYTES.as_secs())]
    TooManyIdle,
    #[error("message larger than {MAX_MESSAGE} bytes")]
    TooLarge,
    #[error("more fds came with the message than the {0} taken: it was refused and they were closed")]
    TooManyFds(usize),
    #[error(transparent)]
    Message(#[from] AgentError),
    #[error("the fd sent as {SECCOMP_FD_NAME} is not a seccomp listener")]
    NotAListener,
    #[error("container {id}: {source}; it was refused (start heapcapd with --bad-settings audit to run such containers unquota'd)")]
    Refused { id: String, source: SettingsError },
    #[error("container {id}: {}; it was refused", StrictRules)]
    StrictWithoutRules { id: String },
    #[error("cannot start serving: {0}")]
    Serve(#[source] std::io::Error),
    #[error("taking the message failed: {0}")]
    Panicked(#[source] tokio::task::JoinError),
}

/// Accept connections until the runtime stops.
pub async fn run(listener: UnixListener, registry: Arc<Registry>, on_bad: OnBadSettings) {
    let parked = Arc::new(Semaphore::new(MAX_PARKED));
    serve_connections(listener, "agent", MAX_CONNECTIONS, move |mut stream, slot| {
        let (registry, parked) = (registry.clone(), parked.clone());
        async move {
            if let Err(e) = handle(&mut stream, slot, &parked, registry, on_bad).await {
                let peer = peer_cred(stream.as_fd()).map(|c| c.pid).unwrap_or(0);
                tracing::warn!(peer, error = %e, "agent message not taken");
            }
        }
    })
    .await
}

/// Read one message: its first bytes (with the fds) whenever they come while the peer keeps the
/// connection open, parked after [`FIRST_BYTES`] (`slot` given up for a place in `parked`); then the
/// rest, until the peer closes (runc and crun close after sending) or the JSON ends, within
/// [`READ_DEADLINE`] (a peer trickling bytes is cut off then).
async fn read_message(
    stream: &mut UnixStream,
    slot: &mut Option<Slot>,
    parked: &Semaphore,
) -> Result<(Vec<u8>, Vec<OwnedFd>), IntakeError> {
    let mut buf = vec![0u8; 64 * 1024];
    let first = match tokio::time::timeout(FIRST_BYTES, recv_first(stream, &mut buf)).await {
        Ok(first) => first?,
        Err(_) => {
            let Ok(_parked) = parked.try_acquire() else {
                return Err(IntakeError::TooManyIdle);
            };
            drop(slot.take());
            tracing::debug!("agent connection parked until its peer sends (crun sends at `crun start`)");
            recv_first(stream, &mut buf).await?
        }
    };
    if first.truncated {
        return Err(IntakeError::TooManyFds(first.fds.len()));
    }
    let mut data = buf[..first.len].to_vec();
    if data.is_empty() {
        // The peer closed (or sent fds alone): nothing more to wait for.
        return Ok((data, first.fds));
    }
    match tokio::time::timeout(READ_DEADLINE, read_rest(stream, &mut data)).await {
        Ok(read) => read.map(|()| (data, first.fds)),
        Err(_) => Err(IntakeError::Timeout { got: data.len() }),
    }
}

/// The first bytes and the fds (runc, crun and the hook send them in one `sendmsg`).
async fn recv_first(stream: &UnixStream, buf: &mut [u8]) -> Result<Received, IntakeError> {
    stream.async_io(Interest::READABLE, || recv_fds(stream.as_fd(), buf)).await.map_err(IntakeError::Read)
}

async fn read_rest(stream: &mut UnixStream, data: &mut Vec<u8>) -> Result<(), IntakeError> {
    let mut chunk = [0u8; 16 * 1024];
    while serde_json::from_slice::<serde_json::Value>(data).is_err() {
        let n = stream.read(&mut chunk).await.map_err(IntakeError::Read)?;
        if n == 0 {
            break;
        }
        data.extend_from_slice(&chunk[..n]);
        if data.len() > MAX_MESSAGE {
            return Err(IntakeError::TooLarge);
        }
    }
    Ok(())
}

/// Read the message of one connection and take it (on the blocking pool: it talks to the holder
/// and starts a thread). The connection stays open until it is taken.
async fn handle(
    stream: &mut UnixStream,
    slot: Slot,
    parked: &Semaphore,
    registry: Arc<Registry>,
    on_bad: OnBadSettings,
) -> Result<(), IntakeError> {
    let runtime = check_peer(stream.as_fd())?.pid;
    // Held until the message is taken, unless given up while the connection idles.
    let mut slot = Some(slot);
    let (data, fds) = read_message(stream, &mut slot, parked).await?;
    if data.is_empty() && fds.is_empty() {
        tracing::debug!("agent connection closed without a message");
        return Ok(());
    }
    let taken = tokio::task::spawn_blocking(move || take(runtime, &data, fds, &registry, on_bad));
    taken.await.map_err(IntakeError::Panicked)?
}

/// Take one message from the runtime `runtime` (a pid): serve its listener, or refuse it.
fn take(
    runtime: i32,
    data: &[u8],
    mut fds: Vec<OwnedFd>,
    registry: &Arc<Registry>,
    on_bad: OnBadSettings,
) -> Result<(), IntakeError> {
    // Every fd received is closed on return but the listener, whatever the message says.
    let message = match agent::parse(data, fds.len()) {
        Ok(message) => message,
        // Not a container to serve, but one to stop and tell why, as one with bad settings.
        Err(AgentError::BadId { id, pid }) => {
            refuse(runtime, pid, &agent::shown_id(&id), &agent::IdRule);
            return Err(AgentError::BadId { id, pid }.into());
        }
        Err(e) => return Err(e.into()),
    };
    let listener = Listener::verify(fds.swap_remove(message.seccomp_fd)).map_err(|_| IntakeError::NotAListener)?;
    drop(fds);
    let AgentMessage { id, pid, settings, pod, sandbox, bundle, .. } = message;
    let settings = match settings {
        // The last line: the runtime shim and the hooks never send a pod's sandbox (pause)
        // container, but a hand-written listenerPath may. Its calls must still be answered (a closed
        // listener fails them with ENOSYS); the pod's heapcap settings it carries are meant for the
        // pod's containers: never a quota for the sandbox, never a refusal of it.
        _ if sandbox => {
            tracing::info!(container = %id, pod = pod.as_ref().map(|p| p.to_string()), "a pod's sandbox: served without a quota, its settings left to the pod's containers");
            Settings::default()
        }
        Ok(Some(s)) => s,
        Ok(None) => {
            tracing::info!(container = %id, "no heapcap settings: tracked without a quota");
            Settings::default()
        }
        Err(source) => match on_bad {
            OnBadSettings::Refuse => {
                refuse(runtime, pid, &id, &source);
                return Err(IntakeError::Refused { id, source });
            }
            OnBadSettings::Audit => {
                tracing::warn!(container = %id, error = %source, "bad heapcap settings: running unquota'd in audit mode");
                Settings { limits: Limits::default(), mode: Mode::Audit, ..Settings::default() }
            }
        },
    };
    if settings.counting == Counting::Strict && !strict_rules_sent(&bundle, &id) {
        refuse(runtime, pid, &id, &StrictRules);
        return Err(IntakeError::StrictWithoutRules { id });
    }
    registry.attach_process(&id, pod, settings, listener, pid).map_err(IntakeError::Serve)
}

/// Why a strict container whose profile sends the default rules is refused.
struct StrictRules;

impl std::fmt::Display for StrictRules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "heapcap.io/strict: its seccomp profile sends heapcapd only the default rules (no file or shared mmap, \
             no shmat), so strict mode could be stepped around: give it the strict rules (heapcap-runtime and the \
             precreate hook write them; heapcap_oci::heapcap_profile_for with Counting::Strict), or drop \
             heapcap.io/strict",
        )
    }
}

/// Whether the container's `config.json` (in `bundle`) sends the strict rules' calls, or its
/// filter came from elsewhere (no `listenerPath`: the prestart hook injects the strict program).
/// A `config.json` that cannot be read is given the benefit of the doubt, with a warning.
fn strict_rules_sent(bundle: &std::path::Path, id: &str) -> bool {
    let path = bundle.join("config.json");
    let config = std::fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|data| serde_json::from_slice::<serde_json::Value>(&data).map_err(|e| e.to_string()));
    match config {
        Ok(config) => heapcap_oci::sends_strict_rules(&config) != Some(false),
        Err(e) => {
            tracing::warn!(container = id, path = %path.display(), error = %e, "cannot check that a strict container's profile has the strict rules");
            true
        }
    }
}

/// Stop a container whose settings (or id) are bad before it runs the user's program, and say
/// why on the stderr of the runtime that sent it (what `runc run` prints and podman reports as
/// the OCI runtime's error), or else of the container's init. The protocol has no answer channel.
fn refuse(runtime: i32, init: Option<u32>, id: &str, why: &dyn std::fmt::Display) {
    let message = format!("heapcapd: container {id} refused: {why}\n");
    let init_pid = init.and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
    let told = [runtime, init_pid].into_iter().any(|pid| tell(pid, &message));
    if let Some(pidfd) = init.and_then(|p| Pidfd::open(p).ok()) {
        let _ = pidfd.signal(nix::sys::signal::Signal::SIGKILL as i32);
    }
    tracing::error!(container = id, runtime, init = init_pid, told, error = %why, "container refused");
}

/// Write `message` to the stderr of `pid`, if it is still that process.
fn tell(pid: i32, message: &str) -> bool {
    let Some(pidfd) = u32::try_from(pid).ok().filter(|p| *p > 0).and_then(|p| Pidfd::open(p).ok()) else {
        return false;
    };
    // Append: reopening a log file through /proc starts at offset 0 and would overwrite it. Not
    // blocking: a full pipe nobody reads must not hold a thread of the blocking pool for ever.
    let mut options = std::fs::OpenOptions::new();
    std::os::unix::fs::OpenOptionsExt::custom_flags(options.append(true), nix::fcntl::OFlag::O_NONBLOCK.bits());
    let Ok(mut stderr) = options.open(format!("/proc/{pid}/fd/2")) else {
        return false;
    };
    // The pidfd was opened first: alive now means the file we opened was that process's stderr.
    pidfd.is_alive() && std::io::Write::write_all(&mut stderr, message.as_bytes()).is_ok()
}
