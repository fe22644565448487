//! The control protocol of heapcapd: what `heapcap ps`, `set-limit` and `events` send and get.
//!
//! One request per connection, as one JSON line; the answer is one JSON line (an
//! `{"error": ...}` object on failure), or for `events` one JSON line per event. Where heapcapd listens
//! by default is `heapcap_env::paths::CONTROL_SOCKET`.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use heapcap_policy::{Denial, Mode, Quota, Scope, Size};
use serde::{Deserialize, Serialize};

mod text;

/// The longest request line heapcapd reads.
pub const MAX_REQUEST: usize = 64 * 1024;

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Every container and its processes. (A struct variant, so unknown fields are refused.)
    Ps {},
    /// Change quotas live. Quotas as users write them (`"64Mi"`); `"none"` removes one.
    SetLimit {
        container: String,
        #[serde(default)]
        pid: Option<u32>,
        /// For each process of the container, or for the process `pid`.
        #[serde(default, with = "text::option")]
        limit: Option<Quota>,
        /// For all the container's processes together.
        #[serde(default, with = "text::option")]
        total: Option<Quota>,
    },
    /// Recent denials; with `follow`, keep the connection open and send new ones as they come.
    Events {
        #[serde(default)]
        follow: bool,
    },
}

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: String,
}

/// The answer to `set-limit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    pub ok: bool,
    pub message: String,
}

/// One process of a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessView {
    pub pid: u32,
    pub command: String,
    /// Counted heap now (bytes), measured when `ps` asked.
    pub heap: u64,
    pub peak: u64,
    pub limit: Option<u64>,
    pub denials: u64,
    /// The container runtime's own code before it execs the container's program: observed,
    /// never denied.
    #[serde(default)]
    pub runtime: bool,
    /// Its mappings cannot be read (it is not dumpable): `heap` is an upper figure, from statm.
    #[serde(default)]
    pub blind: bool,
}

/// Who a container is in Kubernetes terms: its pod's namespace and name, and its own name in the
/// pod, as the CRI runtime (containerd's CRI plugin, CRI-O) wrote them into its annotations.
/// Shown beside the runtime's container id, which is all a runtime outside Kubernetes gives.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Pod {
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// The container's name in the pod spec.
    pub container: String,
}

impl std::fmt::Display for Pod {
    /// `namespace/pod/container`, what `heapcap ps` shows and the events name.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.name, self.container)
    }
}

/// One container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerView {
    pub id: String,
    /// Its Kubernetes names, when a CRI runtime started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<Pod>,
    /// `"enforce"` or `"audit"`.
    #[serde(with = "text")]
    pub mode: Mode,
    /// Strict counting (`heapcap.io/strict`); absent from earlier heapcapds' answers: false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub strict: bool,
    pub limit: Option<u64>,
    pub total_limit: Option<u64>,
    /// `heapcap.io/machine-memory: host`: its programs see the host's memory in `sysinfo(2)`, not
    /// their quota (absent, as false, from earlier heapcapds).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub host_memory: bool,
    pub heap: u64,
    pub processes: Vec<ProcessView>,
}

/// The answer to `ps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PsReply {
    pub containers: Vec<ContainerView>,
}

/// A denied growth. A figure that could not be known is `null`, never a placeholder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// RFC 3339, UTC.
    pub time: String,
    pub container: String,
    /// The container's Kubernetes names, when a CRI runtime started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<Pod>,
    /// The calling process; `null` when not even that could be read.
    pub pid: Option<u32>,
    /// The calling thread.
    #[serde(default)]
    pub tid: Option<u32>,
    pub command: String,
    pub syscall: String,
    /// Bytes the call would add; `null` when it cannot be known (a `brk` whose base is unknown).
    pub requested: Option<u64>,
    /// The usage held against the limit (the process's, or for scope `total` the container's).
    pub usage: Option<u64>,
    pub limit: u64,
    /// `"process"` or `"total"`.
    #[serde(with = "text")]
    pub scope: Scope,
    /// Why, when not simply over the quota: what could not be read about the process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Event {
    /// The event of a denial in `container` (empty: none, as under `heapcap run`).
    pub fn new(container: &str, d: &Denial) -> Event {
        Event {
            time: humantime::format_rfc3339_millis(d.time).to_string(),
            container: container.to_string(),
            pod: None,
            pid: d.pid,
            tid: Some(d.tid),
            command: d.command.clone(),
            syscall: d.syscall.to_string(),
            requested: d.request,
            usage: d.usage,
            limit: d.limit,
            scope: d.scope,
            reason: d.reason.clone(),
        }
    }

    /// One line for people: `mmap of 4.0 MiB denied to pid 42 (python3): heap 62.0 MiB + 4.0 MiB >
    /// limit 64.0 MiB`.
    pub fn describe(&self) -> String {
        let unknown = || "?".to_string();
        let size = |b: Option<u64>| b.map_or_else(unknown, |b| Size(b).to_string());
        let who = match (self.pid, self.tid) {
            (Some(pid), _) => format!("pid {pid}"),
            (None, Some(tid)) => format!("thread {tid}"),
            (None, None) => "a process".to_string(),
        };
        let command = if self.command.is_empty() { String::new() } else { format!(" ({})", self.command) };
        let (whose, quota) = match self.scope {
            Scope::Process => ("heap", "limit"),
            Scope::Total => ("heap of all processes", "total limit"),
        };
        let mut line = format!("{} of {} denied to {who}{command}: ", self.syscall, size(self.requested));
        match &self.reason {
            None => {
                line +=
                    &format!("{whose} {} + {} > {quota} {}", size(self.usage), size(self.requested), Size(self.limit))
            }
            Some(reason) => line += &format!("{reason} ({whose} {}, {quota} {})", size(self.usage), Size(self.limit)),
        }
        line
    }
}

/// Talking to heapcapd failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to heapcapd at {path}: {source} (is heapcapd running? start it with `heapcapd`: as root for root's containers, as yourself for your rootless ones)")]
    Connect { path: String, source: std::io::Error },
    #[error("lost the connection to heapcapd")]
    Io(#[from] std::io::Error),
    #[error("heapcapd: {0}")]
    Refused(String),
    #[error("heapcapd sent something unreadable: {0}")]
    Garbled(#[from] serde_json::Error),
    #[error("the request is {0} bytes, more than the {MAX_REQUEST} heapcapd reads: is the container id right?")]
    TooLarge(usize),
}

/// A connection with one request sent.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<UnixStream>,
}

impl Client {
    /// Connect to `socket` and send `request`.
    pub fn send(socket: &Path, request: &Request) -> Result<Client, ClientError> {
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        if line.len() > MAX_REQUEST {
            return Err(ClientError::TooLarge(line.len()));
        }
        let mut stream = UnixStream::connect(socket)
            .map_err(|source| ClientError::Connect { path: socket.display().to_string(), source })?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        match stream.write_all(&line) {
            Ok(()) => {}
            // heapcapd answers some peers (one it refuses) without reading their request, and
            // closes: the answer waits to be read all the same.
            Err(e) if matches!(e.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(Client { reader: BufReader::new(stream) })
    }

    /// The next answer line, parsed; `None` at the end.
    pub fn read<T: for<'de> Deserialize<'de>>(&mut self) -> Result<Option<T>, ClientError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let value: serde_json::Value = serde_json::from_str(&line)?;
        if let Some(err) = value.get("error").and_then(|e| e.as_str()) {
            return Err(ClientError::Refused(err.to_string()));
        }
        Ok(Some(serde_json::from_value(value)?))
    }

    /// Wait at most `timeout` for each answer line.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.reader.get_ref().set_read_timeout(timeout)
    }
}

/// Send one request and read its one answer.
pub fn call<T: for<'de> Deserialize<'de>>(socket: &Path, request: &Request) -> Result<T, ClientError> {
    let mut client = Client::send(socket, request)?;
    client.set_timeout(Some(Duration::from_secs(30)))?;
    client.read()?.ok_or_else(|| ClientError::Refused("closed the connection without an answer".into()))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    fn denial() -> Denial {
        Denial {
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            pid: Some(42),
            tid: 43,
            command: "python3 -c x".into(),
            syscall: "mmap",
            request: Some(4 << 20),
            usage: Some(62 << 20),
            limit: 64 << 20,
            scope: Scope::Process,
            reason: None,
            brk_return: None,
        }
    }

    #[test]
    fn a_denial_is_described_with_its_figures_and_unknowns_as_unknown() {
        let e = Event::new("web-1", &denial());
        assert_eq!(e.time, "2023-11-14T22:13:20.000Z");
        assert_eq!(
            e.describe(),
            "mmap of 4.0 MiB denied to pid 42 (python3 -c x): heap 62.0 MiB + 4.0 MiB > limit 64.0 MiB"
        );
        let blind = Denial {
            pid: None,
            syscall: "brk",
            request: None,
            usage: None,
            reason: Some("cannot read which process thread 43 is in: Too many open files".into()),
            ..denial()
        };
        let e = Event::new("web-1", &blind);
        assert_eq!(
            e.describe(),
            "brk of ? denied to thread 43 (python3 -c x): cannot read which process thread 43 is in: Too many open \
             files (heap ?, limit 64.0 MiB)"
        );
        let json = serde_json::to_value(&e).unwrap();
        assert!(json["pid"].is_null() && json["usage"].is_null(), "{json}");
        assert_eq!(serde_json::from_value::<Event>(json).unwrap(), e);
    }

    use super::*;

    #[test]
    fn requests_are_tagged_json() {
        assert_eq!(serde_json::to_string(&Request::Ps {}).unwrap(), r#"{"op":"ps"}"#);
        let r: Request = serde_json::from_str(r#"{"op":"set-limit","container":"c1","limit":"64Mi"}"#).unwrap();
        let limit = Some(Quota::Limit(heapcap_policy::Size(64 << 20)));
        assert_eq!(r, Request::SetLimit { container: "c1".into(), pid: None, limit, total: None });
        assert!(serde_json::from_str::<Request>(r#"{"op":"ps","extra":1}"#).is_err(), "unknown fields refused");
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
    }

    #[test]
    fn modes_and_scopes_travel_as_lowercase_names() {
        let view = ContainerView {
            id: "c1".into(),
            pod: None,
            mode: Mode::Audit,
            strict: false,
            limit: None,
            total_limit: Some(1),
            host_memory: true,
            heap: 0,
            processes: Vec::new(),
        };
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["mode"], "audit");
        assert_eq!(json["host_memory"], true);
        assert_eq!(serde_json::from_value::<ContainerView>(json).unwrap(), view);
        let event = Event {
            time: "2025-01-01T00:00:00.000Z".into(),
            container: "c1".into(),
            pod: None,
            pid: Some(1),
            tid: Some(2),
            command: "x".into(),
            syscall: "mmap".into(),
            requested: Some(1),
            usage: Some(2),
            limit: 3,
            scope: Scope::Total,
            reason: None,
        };
        let mut json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["scope"], "total");
        assert_eq!(serde_json::from_value::<Event>(json.clone()).unwrap(), event);
        json["scope"] = "Total".into();
        let e = serde_json::from_value::<Event>(json).unwrap_err().to_string();
        assert!(e.contains("'Total' is not a scope: write process or total"), "{e}");
    }

    #[test]
    fn kubernetes_names_travel_when_known_and_earlier_json_still_reads() {
        let pod = Pod { namespace: "default".into(), name: "web".into(), container: "app".into() };
        let view = ContainerView {
            id: "c1".into(),
            pod: Some(pod.clone()),
            mode: Mode::Enforce,
            strict: true,
            limit: None,
            total_limit: None,
            host_memory: false,
            heap: 0,
            processes: Vec::new(),
        };
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["pod"], serde_json::json!({"namespace": "default", "name": "web", "container": "app"}));
        assert_eq!(serde_json::from_value::<ContainerView>(json.clone()).unwrap(), view);
        let mut earlier = json;
        earlier.as_object_mut().unwrap().remove("pod");
        let read: ContainerView = serde_json::from_value(earlier).unwrap();
        assert_eq!(read.pod, None);
        assert!(serde_json::to_value(&read).unwrap().get("pod").is_none(), "no pod: no field");
        assert!(serde_json::to_value(&read).unwrap().get("host_memory").is_none(), "the default: no field");
        assert_eq!(pod.to_string(), "default/web/app");
    }

    #[test]
    fn quotas_travel_as_users_write_them() {
        let request = |limit, total| Request::SetLimit { container: "c1".into(), pid: Some(7), limit, total };
        let r = request(Some(Quota::Limit(heapcap_policy::Size(64 << 20))), Some(Quota::Unlimited));
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(line, r#"{"op":"set-limit","container":"c1","pid":7,"limit":"64Mi","total":"none"}"#);
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), r);
        assert_eq!(
            serde_json::to_string(&request(None, None)).unwrap(),
            r#"{"op":"set-limit","container":"c1","pid":7,"limit":null,"total":null}"#
        );
        let unlimited: Request =
            serde_json::from_str(r#"{"op":"set-limit","container":"c1","pid":7,"limit":" unlimited "}"#).unwrap();
        assert_eq!(unlimited, request(Some(Quota::Unlimited), None));
        for (bad, says) in
            [(r#""lots""#, "'lots' is not a size"), (r#""0""#, "'0' is zero"), ("5", "invalid type: integer `5`")]
        {
            let e = serde_json::from_str::<Request>(&format!(r#"{{"op":"set-limit","container":"c1","total":{bad}}}"#))
                .unwrap_err();
            assert!(e.to_string().contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn an_oversized_request_is_refused_before_connecting() {
        let request = Request::SetLimit { container: "c".repeat(MAX_REQUEST), pid: None, limit: None, total: None };
        let err = Client::send(Path::new("/nonexistent/heapcap-control.sock"), &request).unwrap_err();
        assert!(matches!(err, ClientError::TooLarge(n) if n > MAX_REQUEST), "{err}");
        assert!(err.to_string().contains("more than the 65536 heapcapd reads"), "{err}");
    }
}
