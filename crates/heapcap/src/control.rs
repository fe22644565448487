//! `heapcap ps`, `set-limit` and `events`: talking to heapcapd's control socket.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use heapcap_control::{call, Client, ContainerView, Done, Event, PsReply, Request};
use heapcap_policy::{Quota, Size};

fn size(b: u64) -> String {
    Size(b).to_string()
}

fn quota(q: Option<u64>) -> String {
    q.map_or_else(|| "-".to_string(), size)
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("heapcap: {e}");
    ExitCode::FAILURE
}

pub fn ps(socket: &Path, json: bool) -> ExitCode {
    let reply: PsReply = match call(socket, &Request::Ps {}) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let mut out = std::io::stdout().lock();
    let result = if json {
        serde_json::to_writer_pretty(&mut out, &reply).map_err(std::io::Error::other).and_then(|()| writeln!(out))
    } else {
        print_ps(&mut out, &reply.containers)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

/// A container id as the table shows it: whole when short, else its first 12 characters (like
/// docker; `set-limit` takes any unique prefix).
fn short_id(id: &str) -> String {
    if id.chars().count() > 20 {
        id.chars().take(12).collect()
    } else {
        id.to_string()
    }
}

fn print_ps(out: &mut impl Write, containers: &[ContainerView]) -> std::io::Result<()> {
    if containers.is_empty() {
        return writeln!(out, "no containers under heapcap");
    }
    let w = containers.iter().map(|c| short_id(&c.id).len()).max().unwrap_or(0).max("CONTAINER".len());
    writeln!(
        out,
        "{:<w$} {:>8}  {:<28} {:>10} {:>10} {:>10} {:>7}",
        "CONTAINER", "PID", "COMMAND", "HEAP", "PEAK", "LIMIT", "DENIALS"
    )?;
    for c in containers {
        writeln!(
            out,
            "{:<w$} {:>8}  {:<28} {:>10} {:>10} {:>10} {:>7}",
            short_id(&c.id),
            "-",
            format!("({}, total limit {})", c.mode, quota(c.total_limit)),
            size(c.heap),
            "",
            quota(c.limit),
            c.processes.iter().map(|p| p.denials).sum::<u64>()
        )?;
        for p in &c.processes {
            let cmd: String = p.command.chars().take(28).collect();
            writeln!(
                out,
                "{:<w$} {:>8}  {cmd:<28} {:>10} {:>10} {:>10} {:>7}",
                "",
                p.pid,
                // An upper figure (statm: its mappings cannot be read).
                if p.blind { format!("<={}", size(p.heap)) } else { size(p.heap) },
                size(p.peak),
                if p.runtime { "runtime".to_string() } else { quota(p.limit) },
                p.denials
            )?;
        }
    }
    Ok(())
}

pub fn set_limit(
    socket: &Path,
    container: String,
    pid: Option<u32>,
    limit: Option<Quota>,
    total: Option<Quota>,
) -> ExitCode {
    match call::<Done>(socket, &Request::SetLimit { container, pid, limit, total }) {
        Ok(done) => {
            println!("{}", done.message);
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

pub fn events(socket: &Path, follow: bool, json: bool) -> ExitCode {
    let mut client = match Client::send(socket, &Request::Events { follow }) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let mut out = std::io::stdout().lock();
    loop {
        let event: Event = match client.read() {
            Ok(Some(e)) => e,
            Ok(None) => return ExitCode::SUCCESS,
            Err(e) => return fail(e),
        };
        let written = if json {
            serde_json::to_writer(&mut out, &event).map_err(std::io::Error::other).and_then(|()| writeln!(out))
        } else {
            writeln!(out, "{} {} {}", event.time, event.container, event.describe())
        };
        if written.and_then(|()| out.flush()).is_err() {
            return ExitCode::SUCCESS; // the reader went away (e.g. `| head`)
        }
    }
}
