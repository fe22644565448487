//! The control socket: `heapcap ps`, `set-limit` and `events` (the paper's `/proc/<pid>/rlimit`
//! read and write, grown up).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use heapcap_control::{Done, ErrorReply, PsReply, Request, MAX_REQUEST};
use heapcap_policy::Size;
use serde::Serialize;

use crate::events::Events;
use crate::registry::Registry;
use crate::sockets::peer_allowed;

pub fn run(listener: UnixListener, registry: Arc<Registry>, events: Arc<Events>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let (registry, events) = (registry.clone(), events.clone());
        let _ = std::thread::Builder::new().name("control".into()).spawn(move || serve(stream, &registry, &events));
    }
}

fn send<T: Serialize>(stream: &mut UnixStream, value: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

fn refuse(stream: &mut UnixStream, error: impl ToString) {
    let _ = send(stream, &ErrorReply { error: error.to_string() });
}

/// `none`/`unlimited` remove a quota; anything else is a size.
fn parse_quota(value: &str) -> Result<Option<u64>, String> {
    match value.trim() {
        "none" | "unlimited" => Ok(None),
        v => Size::parse_limit(v).map(|s| Some(s.bytes())).map_err(|e| e.to_string()),
    }
}

fn serve(mut stream: UnixStream, registry: &Registry, events: &Events) {
    if let Err(e) = peer_allowed(&stream) {
        tracing::warn!(error = %e, "control connection refused");
        return refuse(&mut stream, e);
    }
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let mut line = String::new();
    let read = stream.try_clone().map(|s| BufReader::new(s.take(MAX_REQUEST as u64)).read_line(&mut line));
    match read {
        Ok(Ok(n)) if n > 0 && line.ends_with('\n') => {}
        Ok(Ok(_)) => return refuse(&mut stream, format!("send one JSON request line of at most {MAX_REQUEST} bytes")),
        _ => return refuse(&mut stream, "no request received"),
    }
    let request: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => return refuse(&mut stream, format!("bad request: {e}")),
    };
    match request {
        Request::Ps {} => {
            let containers = registry.containers().iter().map(|c| c.view()).collect();
            let _ = send(&mut stream, &PsReply { containers });
        }
        Request::SetLimit { container, pid, limit, total } => {
            let reply = set_limit(registry, &container, pid, limit.as_deref(), total.as_deref());
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
            while let Ok(e) = rx.recv() {
                if send(&mut stream, &e).is_err() {
                    return;
                }
            }
        }
    }
}

fn set_limit(
    registry: &Registry,
    container: &str,
    pid: Option<u32>,
    limit: Option<&str>,
    total: Option<&str>,
) -> Result<String, String> {
    if limit.is_none() && total.is_none() {
        return Err("give a size for the limit, --total SIZE, or both".into());
    }
    if pid.is_some() && total.is_some() {
        return Err("--total is for the whole container: leave out --pid".into());
    }
    let limit = limit.map(parse_quota).transpose()?;
    let total = total.map(parse_quota).transpose()?;
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
