//! The control socket: `heapcap ps`, `set-limit` and `events` (the paper's `/proc/<pid>/rlimit`
//! read and write, grown up). Served on the control plane's runtime: a connection is a task,
//! `ps` and `set-limit` run on its blocking pool (they read `/proc` and talk to the holder), and
//! a follower of `events` waits for the next denial and for its hang-up at once.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use heapcap_control::{Done, ErrorReply, PsReply, Request, MAX_REQUEST};
use heapcap_linux::peercred::check_peer;
use heapcap_policy::{Quota, Size};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::timeout;

use crate::events::Events;
use crate::registry::Registry;
use crate::sockets::serve_connections;

/// How long a client has to send its request line.
const READ_DEADLINE: Duration = Duration::from_secs(10);
/// How long an answer may take to be written (not for `events`: a follower reads at its pace).
const WRITE_DEADLINE: Duration = Duration::from_secs(10);
/// Control connections served at once (`events --follow` keeps one). Past it, connections wait in
/// the backlog until one ends.
const MAX_CONNECTIONS: usize = 128;

/// Accept connections until the runtime stops.
pub async fn run(listener: UnixListener, registry: Arc<Registry>, events: Arc<Events>) {
    serve_connections(listener, "control", MAX_CONNECTIONS, move |stream, slot| {
        let served = serve(stream, registry.clone(), events.clone());
        async move {
            served.await;
            drop(slot);
        }
    })
    .await
}

async fn write_line<T: Serialize>(stream: &mut (impl AsyncWrite + Unpin), value: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line).await
}

/// One answer line, within [`WRITE_DEADLINE`].
async fn send<T: Serialize>(stream: &mut UnixStream, value: &T) -> std::io::Result<()> {
    timeout(WRITE_DEADLINE, write_line(stream, value))
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

async fn refuse(stream: &mut UnixStream, error: impl ToString) {
    let _ = send(stream, &ErrorReply { error: error.to_string() }).await;
}

/// Read the one request line: at most [`MAX_REQUEST`] bytes, within [`READ_DEADLINE`] all told.
/// The error says what the client got wrong.
async fn read_request(stream: &mut UnixStream) -> Result<Vec<u8>, String> {
    let mut line = Vec::new();
    match timeout(READ_DEADLINE, read_line(stream, &mut line)).await {
        Ok(read) => read.map(|()| line),
        Err(_) => Err(format!(
            "no complete request line within {}s ({} bytes received): send one JSON line ending in a newline",
            READ_DEADLINE.as_secs(),
            line.len()
        )),
    }
}

async fn read_line(stream: &mut (impl AsyncRead + Unpin), line: &mut Vec<u8>) -> Result<(), String> {
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|e| format!("cannot read the request: {e}"))?;
        if n == 0 {
            return Err(match line.len() {
                0 => "no request received: send one JSON line such as {\"op\":\"ps\"}".to_string(),
                got => format!("incomplete request: the connection ended after {got} bytes without a newline"),
            });
        }
        let end = chunk[..n].iter().position(|b| *b == b'\n');
        line.extend_from_slice(&chunk[..end.map_or(n, |i| i + 1)]);
        if line.len() > MAX_REQUEST {
            return Err(format!("request line longer than {MAX_REQUEST} bytes: send one JSON line of at most that"));
        }
        if end.is_some() {
            return Ok(());
        }
    }
}

/// The request in `line`, or what is wrong with it.
fn parse_request(line: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(line).map_err(|e| format!("bad request: not UTF-8 ({e}): send one JSON line"))?;
    serde_json::from_str(text).map_err(|e| {
        if let Some(bad) = bad_quota(text) {
            return bad;
        }
        let what = if e.is_syntax() || e.is_eof() { "not JSON" } else { "not a request" };
        format!(
            "bad request ({what}: {e}): send one JSON line with \"op\" one of \"ps\", \"set-limit\", \"events\", \
             e.g. {{\"op\":\"ps\"}}"
        )
    })
}

/// What is wrong with a quota of a set-limit request, if that is what is wrong with it: said as
/// such, not as a malformed request.
fn bad_quota(text: &str) -> Option<String> {
    let request: serde_json::Value = serde_json::from_str(text).ok()?;
    if request.get("op")?.as_str()? != "set-limit" {
        return None;
    }
    ["limit", "total"].into_iter().find_map(|field| {
        let error = request.get(field)?.as_str()?.parse::<Quota>().err()?;
        Some(format!("{field}: {error}"))
    })
}

async fn serve(mut stream: UnixStream, registry: Arc<Registry>, events: Arc<Events>) {
    if let Err(e) = check_peer(stream.as_fd()) {
        tracing::warn!(error = %e, "control connection refused");
        return refuse(&mut stream, e).await;
    }
    let request = match read_request(&mut stream).await.and_then(|line| parse_request(&line)) {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(error = %e, "control request refused");
            return refuse(&mut stream, e).await;
        }
    };
    match request {
        Request::Ps {} => {
            // Measured exactly now: /proc reads, off the runtime's worker.
            let views = tokio::task::spawn_blocking(move || registry.containers().iter().map(|c| c.view()).collect());
            match views.await {
                Ok(containers) => {
                    let _ = send(&mut stream, &PsReply { containers }).await;
                }
                Err(e) => refuse(&mut stream, format!("heapcapd failed to list the containers: {e}")).await,
            }
        }
        Request::SetLimit { container, pid, limit, total } => {
            let done = tokio::task::spawn_blocking(move || {
                let reply = set_limit(&registry, &container, pid, limit, total);
                if let Ok(message) = &reply {
                    tracing::info!(%container, ?pid, %message, "quota changed");
                }
                reply
            });
            match done.await {
                Ok(Ok(message)) => {
                    let _ = send(&mut stream, &Done { ok: true, message }).await;
                }
                Ok(Err(e)) => refuse(&mut stream, e).await,
                Err(e) => refuse(&mut stream, format!("heapcapd failed to change the quota: {e}")).await,
            }
        }
        Request::Events { follow } => send_events(stream, &events, follow).await,
    }
}

/// The recent denials; with `follow`, then each new one until the client hangs up (noticed at
/// once: its end of file is awaited beside the next event).
async fn send_events(mut stream: UnixStream, events: &Events, follow: bool) {
    if !follow {
        for e in events.recent() {
            if write_line(&mut stream, &e).await.is_err() {
                return;
            }
        }
        return;
    }
    let (recent, mut rx) = events.follow();
    let (mut reader, mut writer) = stream.split();
    for e in recent {
        if write_line(&mut writer, &e).await.is_err() {
            return;
        }
    }
    let mut ignored = [0u8; 256];
    loop {
        tokio::select! {
            event = rx.recv() => match event {
                Some(e) if write_line(&mut writer, &e).await.is_ok() => {}
                _ => return,
            },
            read = reader.read(&mut ignored) => match read {
                // Anything after the request line is ignored; the end of it is the follower gone.
                Ok(n) if n > 0 => {}
                _ => return,
            },
        }
    }
}

fn set_limit(
    registry: &Registry,
    container: &str,
    pid: Option<u32>,
    limit: Option<Quota>,
    total: Option<Quota>,
) -> Result<String, String> {
    if limit.is_none() && total.is_none() {
        return Err("give a size for the limit, --total SIZE, or both".into());
    }
    if pid.is_some() && total.is_some() {
        return Err("--total is for the whole container: leave out --pid".into());
    }
    let (limit, total) = (limit.map(Quota::bytes), total.map(Quota::bytes));
    let c = registry.find(container).map_err(|e| e.to_string())?;
    c.set_limits(pid, limit, total).map_err(|e| e.to_string())?;
    let show = |q: Option<u64>| q.map_or_else(|| "none".to_string(), |b| Size(b).to_string());
    let mut parts = Vec::new();
    if let Some(l) = limit {
        parts.push(match pid {
            Some(p) => format!("pid {p} limit {}", show(l)),
            None => format!("limit {} per process", show(l)),
        });
    }
    if let Some(t) = total {
        parts.push(format!("total limit {}", show(t)));
    }
    Ok(format!("container {}: {}", c.id, parts.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_quota_is_said_to_be_one() {
        let e = parse_request(br#"{"op":"set-limit","container":"c1","total":"lots"}"#).unwrap_err();
        assert!(
            e.starts_with("total: 'lots' is not a size: write a number") && e.ends_with("(or none for no quota)"),
            "{e}"
        );
        let e = parse_request(br#"{"op":"set-limit","container":"c1","limit":"0"}"#).unwrap_err();
        assert!(e.starts_with("limit: '0' is zero"), "{e}");
        // Anything else wrong is a bad request, as before.
        let e = parse_request(br#"{"op":"ps","limit":"lots"}"#).unwrap_err();
        assert!(e.contains("unknown field `limit`"), "{e}");
        let ok = parse_request(br#"{"op":"set-limit","container":"c1","limit":"none"}"#).unwrap();
        assert_eq!(
            ok,
            Request::SetLimit { container: "c1".into(), pid: None, limit: Some(Quota::Unlimited), total: None }
        );
    }
}
