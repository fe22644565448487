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

/// The `POD` column: `namespace/pod/container` for a container a CRI runtime started (Kubernetes),
/// `-` for others; shown only when some container has one.
fn pod_column(c: &ContainerView) -> String {
    c.pod.as_ref().map_or_else(|| "-".to_string(), |p| p.to_string())
}

fn print_ps(out: &mut impl Write, containers: &[ContainerView]) -> std::io::Result<()> {
    if containers.is_empty() {
        return writeln!(out, "no containers under heapcap");
    }
    let w = containers.iter().map(|c| short_id(&c.id).len()).max().unwrap_or(0).max("CONTAINER".len());
    // Kubernetes names beside the runtime's id, when there are any.
    let pods = containers.iter().any(|c| c.pod.is_some());
    let pw = containers.iter().map(|c| pod_column(c).chars().count()).max().unwrap_or(0).max("POD".len());
    let pod_cell = |text: &str| if pods { format!("{text:<pw$} ") } else { String::new() };
    writeln!(
        out,
        "{:<w$} {}{:>8}  {:<28} {:>10} {:>10} {:>10} {:>7}",
        "CONTAINER",
        pod_cell("POD"),
        "PID",
        "COMMAND",
        "HEAP",
        "PEAK",
        "LIMIT",
        "DENIALS"
    )?;
    for c in containers {
        writeln!(
            out,
            "{:<w$} {}{:>8}  {:<28} {:>10} {:>10} {:>10} {:>7}",
            short_id(&c.id),
            pod_cell(&pod_column(c)),
            "-",
            format!(
                "({}{}, total limit {}{})",
                c.mode,
                if c.strict { " strict" } else { "" },
                quota(c.total_limit),
                if c.host_memory { ", host memory" } else { "" }
            ),
            size(c.heap),
            "",
            quota(c.limit),
            c.processes.iter().map(|p| p.denials).sum::<u64>()
        )?;
        for p in &c.processes {
            let cmd: String = p.command.chars().take(28).collect();
            writeln!(
                out,
                "{:<w$} {}{:>8}  {cmd:<28} {:>10} {:>10} {:>10} {:>7}",
                "",
                pod_cell(""),
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

/// One event as `heapcap events` prints it: time, container id, its Kubernetes names if any, and
/// what was denied.
fn event_line(event: &Event) -> String {
    match &event.pod {
        Some(pod) => format!("{} {} {pod} {}", event.time, event.container, event.describe()),
        None => format!("{} {} {}", event.time, event.container, event.describe()),
    }
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
            writeln!(out, "{}", event_line(&event))
        };
        if written.and_then(|()| out.flush()).is_err() {
            return ExitCode::SUCCESS; // the reader went away (e.g. `| head`)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use heapcap_control::{Pod, ProcessView};
    use heapcap_policy::Mode;

    fn view(id: &str, pod: Option<Pod>) -> ContainerView {
        let process = ProcessView {
            pid: 42,
            command: "/alloc mmap".into(),
            heap: 63 << 20,
            peak: 63 << 20,
            limit: Some(64 << 20),
            denials: 1,
            runtime: false,
            blind: false,
        };
        ContainerView {
            id: id.into(),
            pod,
            mode: Mode::Enforce,
            strict: false,
            limit: Some(64 << 20),
            total_limit: None,
            host_memory: false,
            heap: 63 << 20,
            processes: vec![process],
        }
    }

    fn table(containers: &[ContainerView]) -> String {
        let mut out = Vec::new();
        print_ps(&mut out, containers).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn ps_names_kubernetes_containers_beside_their_ids() {
        let pod = Pod { namespace: "default".into(), name: "leaky-service".into(), container: "app".into() };
        let text = table(&[view("3f2a9c1d", Some(pod)), view("web-1", None)]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with(&format!("CONTAINER {:<25}      PID  COMMAND", "POD")), "{text}");
        assert!(lines[1].starts_with("3f2a9c1d  default/leaky-service/app        -  (enforce"), "{text}");
        assert!(lines[2].starts_with(&format!("{:36}      42  /alloc mmap", "")), "{text}");
        assert!(lines[3].starts_with(&format!("web-1     {:<25}        -  (enforce", "-")), "{text}");
        // Without Kubernetes, the table is as it was.
        let plain = table(&[view("web-1", None)]);
        assert!(plain.starts_with("CONTAINER      PID  COMMAND"), "{plain}");
    }

    #[test]
    fn events_name_the_pod() {
        let mut event = Event {
            time: "2026-01-01T00:00:00.000Z".into(),
            container: "3f2a9c1d".into(),
            pod: Some(Pod { namespace: "default".into(), name: "web".into(), container: "app".into() }),
            pid: Some(42),
            tid: Some(42),
            command: "alloc".into(),
            syscall: "mmap".into(),
            requested: Some(4 << 20),
            usage: Some(60 << 20),
            limit: 64 << 20,
            scope: heapcap_policy::Scope::Process,
            reason: None,
        };
        assert_eq!(
            event_line(&event),
            "2026-01-01T00:00:00.000Z 3f2a9c1d default/web/app mmap of 4.0 MiB denied to pid 42 (alloc): heap 60.0 MiB \
             + 4.0 MiB > limit 64.0 MiB"
        );
        event.pod = None;
        assert!(event_line(&event).starts_with("2026-01-01T00:00:00.000Z 3f2a9c1d mmap of"));
    }
}
