//! Prometheus metrics, served on an opt-in address (`--metrics-addr`) by hyper on the control
//! plane's runtime.
//!
//! Counted as they happen (by the serving threads, without a lock): notifications by syscall and
//! decision, denials, decision latency. Read at each scrape ([`Figures`]): containers and
//! processes, each container's heap and quotas, each process's peak, whether the fd holder is
//! connected. Every name carries its unit and is recorded in it (`_bytes`, `_seconds`).

use std::cell::RefCell;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use heapcap_supervise::{Observer, Outcome};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::registry::Registry as Containers;
use crate::sockets::{accept_failed, Limit};

/// What a client has to send its request head in (an idle or trickling client is cut off then).
const HEADER_DEADLINE: Duration = Duration::from_secs(5);
/// What a whole connection may last, answer included (a client that reads nothing is cut off).
const CONNECTION_DEADLINE: Duration = Duration::from_secs(15);
/// Connections served at once; past it they wait in the listen backlog until one ends.
const MAX_CONNECTIONS: usize = 512;
/// The largest request head read (hyper answers 431 past it), and the most header lines.
const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 32;
/// A command as a label: its first characters.
const MAX_COMMAND_LABEL: usize = 64;
/// The exposition format prometheus-client writes.
const CONTENT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    // Static names: a decision allocates nothing to be counted.
    syscall: &'static str,
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ContainerLabels {
    container: String,
    /// The pod's namespace, name and container name where the runtime gave them (else empty).
    namespace: String,
    pod: String,
    container_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProcessLabels {
    container: String,
    pid: u32,
    command: String,
}

/// heapcapd's metrics. Units are in the names and recorded in those units.
pub struct Metrics {
    registry: Mutex<Registry>,
    notifications: Family<CallLabels, Counter>,
    denials: Counter,
    latency: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("heapcap");
        let notifications = Family::<CallLabels, Counter>::default();
        let denials = Counter::default();
        // 1 µs .. ~1 s.
        let latency = Histogram::new(exponential_buckets(1e-6, 2.0, 21));
        registry.register("notifications", "Notifications answered, by syscall and decision.", notifications.clone());
        registry.register("denials", "Growths refused with ENOMEM.", denials.clone());
        registry.register(
            "decision_latency_seconds",
            "From receiving a notification to handing the kernel its answer.",
            latency.clone(),
        );
        Arc::new(Metrics { registry: Mutex::new(registry), notifications, denials, latency })
    }

    /// Read the containers' figures at each scrape from now on.
    pub fn watch(&self, containers: Arc<Containers>) {
        self.lock().register_collector(Box::new(Figures(containers)));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The exposition text, with the per-container figures read now.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.lock());
        out
    }
}

thread_local! {
    /// Each serving thread's counters by (metrics, syscall, decision), found by address: a
    /// decision takes no lock and hashes nothing to be counted (a few static names: a short list).
    static COUNTERS: RefCell<Vec<(CounterKey, Counter)>> = const { RefCell::new(Vec::new()) };
}

type CounterKey = (*const Metrics, *const u8, *const u8);

impl Metrics {
    fn count(&self, syscall: &'static str, decision: &'static str) {
        let key: CounterKey = (self, syscall.as_ptr(), decision.as_ptr());
        COUNTERS.with_borrow_mut(|counters| {
            if let Some((_, counter)) = counters.iter().find(|(k, _)| *k == key) {
                counter.inc();
                return;
            }
            let counter = self.notifications.get_or_create(&CallLabels { syscall, decision }).clone();
            counter.inc();
            counters.push((key, counter));
        });
    }
}

impl Observer for Metrics {
    fn decided(&self, syscall: &'static str, outcome: Outcome, seconds: f64) {
        self.count(syscall, outcome.as_str());
        if outcome == Outcome::Denied {
            self.denials.inc();
        }
        self.latency.observe(seconds);
    }
}

/// The figures read at each scrape: each container's ledger locked once, briefly, for pure work.
#[derive(Debug)]
struct Figures(Arc<Containers>);

/// One container's figures, copied out of its ledger.
struct Row {
    id: String,
    pod: Option<heapcap_control::Pod>,
    heap: u64,
    limit: Option<u64>,
    total: Option<u64>,
    strict: bool,
    /// (pid, command, peak) of each process.
    peaks: Vec<(u32, String, u64)>,
}

/// One gauge family: `name` with one value per label set.
fn gauges<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (L, i64)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in values {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One gauge without labels.
fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> std::fmt::Result {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn bytes(b: u64) -> i64 {
    i64::try_from(b).unwrap_or(i64::MAX)
}

impl Collector for Figures {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let containers = self.0.containers();
        for c in &containers {
            // Commands are read when first needed: the process label wants them (a /proc read per
            // process not yet named, once; rendering runs on the blocking pool).
            c.supervisor.name_processes();
        }
        let rows: Vec<Row> = containers
            .iter()
            .map(|c| {
                c.supervisor.accounts().with_ledger(|l| {
                    let summaries = l.summaries();
                    Row {
                        id: c.id.clone(),
                        pod: c.pod.clone(),
                        heap: summaries.iter().map(|p| p.heap).sum(),
                        limit: l.limits().process,
                        total: l.limits().total,
                        strict: l.counting() == heapcap_policy::ledger::Counting::Strict,
                        peaks: summaries.into_iter().map(|p| (p.pid, p.command, p.peak)).collect(),
                    }
                })
            })
            .collect();
        let by_container = |r: &Row| {
            let pod = r.pod.clone().unwrap_or_default();
            ContainerLabels {
                container: r.id.clone(),
                namespace: pod.namespace,
                pod: pod.name,
                container_name: pod.container,
            }
        };
        let e = &mut encoder;
        gauge(e, "containers", "Containers supervised.", rows.len() as i64)?;
        gauge(e, "processes", "Processes accounted.", rows.iter().map(|r| r.peaks.len() as i64).sum())?;
        let heap = rows.iter().map(|r| (by_container(r), bytes(r.heap)));
        gauges(e, "container_heap_bytes", "Counted heap of a container's processes.", heap)?;
        let limit = rows.iter().filter_map(|r| Some((by_container(r), bytes(r.limit?))));
        gauges(e, "container_process_limit_bytes", "Quota of each process of a container (absent: none).", limit)?;
        let total = rows.iter().filter_map(|r| Some((by_container(r), bytes(r.total?))));
        gauges(
            e,
            "container_total_limit_bytes",
            "Quota of all a container's processes together (absent: none).",
            total,
        )?;
        let strict = rows.iter().map(|r| (by_container(r), i64::from(r.strict)));
        gauges(
            e,
            "container_strict",
            "1 for a container in strict mode (heapcap.io/strict: every writable private mapping and shared memory counted), else 0.",
            strict,
        )?;
        let peaks = rows.iter().flat_map(|r| {
            r.peaks.iter().map(|(pid, command, peak)| {
                let command = command.chars().take(MAX_COMMAND_LABEL).collect();
                (ProcessLabels { container: r.id.clone(), pid: *pid, command }, bytes(*peak))
            })
        });
        gauges(e, "process_peak_heap_bytes", "Highest counted heap of a process so far.", peaks)?;
        if let Some(connected) = self.0.holder_connected() {
            let help = "1 while heapcap-holder keeps a copy of every listener (restarts harm no container), else 0.";
            gauge(e, "holder_connected", help, i64::from(connected))?;
        }
        Ok(())
    }
}

/// Serve `GET /metrics` on `listener` until the runtime stops: HTTP/1.1, one request per
/// connection, the head within [`HEADER_DEADLINE`], the whole connection within
/// [`CONNECTION_DEADLINE`], at most [`MAX_CONNECTIONS`] at once.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_DEADLINE)
        .keep_alive(false)
        .max_buf_size(MAX_HEAD)
        .max_headers(MAX_HEADERS);
    let mut limit = Limit::new("metrics", MAX_CONNECTIONS);
    loop {
        let permit = limit.wait().await;
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                accept_failed("metrics", e).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let service = hyper::service::service_fn(move |request| {
            let metrics = metrics.clone();
            let refused = refusal(request.uri().path(), request.method());
            async move {
                if let Some(response) = refused {
                    return Ok::<_, Infallible>(response);
                }
                // A scrape may read command lines from /proc: off the runtime's worker.
                let rendered = tokio::task::spawn_blocking(move || scrape(&metrics)).await;
                Ok(rendered.unwrap_or_else(|e| {
                    tracing::error!(error = %e, "rendering the metrics failed");
                    text(StatusCode::INTERNAL_SERVER_ERROR, "heapcapd failed to render the metrics\n")
                }))
            }
        });
        let connection = http.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            match tokio::time::timeout(CONNECTION_DEADLINE, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "metrics connection ended"),
                Err(_) => tracing::debug!("metrics connection cut off at its deadline"),
            }
            drop(permit);
        });
    }
}

/// A plain-text answer.
fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// The answer to a request that is not a scrape: 404 for another path than `/metrics` (or `/`),
/// 405 for another method than `GET`/`HEAD`; `None` for a scrape.
fn refusal(path: &str, method: &Method) -> Option<Response<Full<Bytes>>> {
    if !matches!(path, "/metrics" | "/") {
        return Some(text(StatusCode::NOT_FOUND, "not found: heapcapd serves GET /metrics\n"));
    }
    if !matches!(*method, Method::GET | Method::HEAD) {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed: GET /metrics\n");
        response.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Some(response);
    }
    None
}

/// The metrics, read now.
fn scrape(metrics: &Metrics) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(metrics.render())));
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT));
    response
}
