//! The control socket: `heapcap ps`, `set-limit` and `events` (the paper's `/proc/<pid>/rlimit`
//! read and write, grown up).

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use heapcap_control::{Done, ErrorReply, PsReply, Request, MAX_REQUEST};
use heapcap_linux::peercred::check_peer;
use heapcap_policy::{Quota, Size};
use serde::Serialize;

use crate::events::Events;
use crate::registry::Registry;
use crate::sockets::serve_connections;

/// How long a client has to send its request line.
const READ_DEADLINE: Duration = Duration::from_secs(10);
/// Control connections served at once (a thread each; `events --follow` keeps one). Past it,
/// connections wait in the backlog until one ends.
const MAX_CONNECTIONS: usize = 128;
/// How often a follower with no new event is checked for having hung up.
const FOLLOW_CHECK: Duration = Duration::from_secs(1);

/// Accept connections until the listener fails.
pub fn run(listener: UnixListener, registry: Arc<Registry>, events: Arc<Events>) {
    serve_connections(listener, "control", "control", MAX_CONNECTIONS, move |stream| serve(stream, &registry, &events));
}

fn send<T: Serialize>(stream: &mut UnixStream, value: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

fn refuse(stream: &mut UnixStream, error: impl ToString) {
    let _ = send(stream, &ErrorReply { error: error.to_string() });
}

/// Read the one request line: at most [`MAX_REQUEST`] bytes, within [`READ_DEADLINE`] all told.
/// The error says what the client got wrong.
fn read_request(stream: &mut UnixStream) -> Result<Vec<u8>, String> {
    let deadline = Instant::now() + READ_DEADLINE;
    let mut line = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let read = if left.is_zero() {
            Err(std::io::ErrorKind::TimedOut.into())
        } else {
            stream.set_read_timeout(Some(left)).and_then(|()| stream.read(&mut chunk))
        };
        let n = match read {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err(format!(
                    "no complete request line within {}s ({} bytes received): send one JSON line ending in a newline",
                    READ_DEADLINE.as_secs(),
                    line.len()
                ))
            }
            Err(e) => return Err(format!("cannot read the request: {e}")),
        };
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
            return Ok(line);
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

/// The client hung up (a follower that quit): a read returns end of file.
fn hung_up(stream: &mut UnixStream) -> bool {
    let mut byte = [0u8; 1];
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let read = stream.read(&mut byte);
    let gone = stream.set_nonblocking(false).is_err();
    gone || matches!(read, Ok(0)) || matches!(read, Err(e) if e.kind() != std::io::ErrorKind::WouldBlock)
}

fn serve(mut stream: UnixStream, registry: &Registry, events: &Events) {
    if let Err(e) = check_peer(stream.as_fd()) {
        tracing::warn!(error = %e, "control connection refused");
        return refuse(&mut stream, e);
    }
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let request = match read_request(&mut stream).and_then(|line| parse_request(&line)) {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(error = %e, "control request refused");
            return refuse(&mut stream, e);
        }
    };
    match request {
        Request::Ps {} => {
            let containers = registry.containers().iter().map(|c| c.view()).collect();
            let _ = send(&mut stream, &PsReply { containers });
        }
        Request::SetLimit { container, pid, limit, total } => {
            let reply = set_limit(registry, &container, pid, limit, total);
            match reply {
                Ok(message) => {
                    tracing::info!(%container, ?pid, %message, "quota changed");
                    let _ = send(&mut stream, &Done { ok: true, message });
                }
                Err(e) => refuse(&mut stream, e),
            }
        }
        Request::Events { follow } => {
            let _ = stream.set_write_timeout(None);
            if !follow {
                for e in events.recent() {
                    if send(&mut stream, &e).is_err() {
                        return;
                    }
                }
                return;
            }
            let (recent, rx) = events.follow();
            for e in recent {
                if send(&mut stream, &e).is_err() {
                    return;
                }
            }
            // A follower that quits is noticed within FOLLOW_CHECK, not at the next denial.
            loop {
                match rx.recv_timeout(FOLLOW_CHECK) {
                    Ok(e) => {
                        if send(&mut stream, &e).is_err() {
                            return;
                        }
                    }
                    Err(RecvTimeoutError::Timeout) if !hung_up(&mut stream) => {}
                    Err(_) => return,
                }
            }
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
