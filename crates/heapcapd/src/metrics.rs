//! Prometheus metrics, served on an opt-in address (`--metrics-addr`).

use std::cell::RefCell;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use heapcap_supervise::{Observer, Outcome};
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::registry::Registry as Containers;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    // Static names: a decision allocates nothing to be counted.
    syscall: &'static str,
    decision: &'static str,
}

/// A container: the runtime's id, and for a container a CRI runtime started its pod's namespace and
/// name and its own name in the pod (empty otherwise). `container_name`, as `container` is the id.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ContainerLabels {
    container: String,
    namespace: String,
    pod: String,
    container_name: String,
}

/// heapcapd's metrics. Units are in the names and recorded in those units.
pub struct Metrics {
    registry: Mutex<Registry>,
    notifications: Family<CallLabels, Counter>,
    denials: Counter,
    latency: Histogram,
    containers: Gauge,
    processes: Gauge,
    heap: Family<ContainerLabels, Gauge>,
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
        let (containers, processes) = (Gauge::default(), Gauge::default());
        let heap = Family::<ContainerLabels, Gauge>::default();
        registry.register("notifications", "Notifications answered, by syscall and decision", notifications.clone());
        registry.register("denials", "Growths refused with ENOMEM", denials.clone());
        registry.register(
            "decision_latency_seconds",
            "From receiving a notification to handing the kernel its answer",
            latency.clone(),
        );
        registry.register("containers", "Containers supervised", containers.clone());
        registry.register("processes", "Processes accounted", processes.clone());
        registry.register("container_heap_bytes", "Counted heap of a container's processes", heap.clone());
        Arc::new(Metrics {
            registry: Mutex::new(registry),
            notifications,
            denials,
            latency,
            containers,
            processes,
            heap,
        })
    }

    /// The exposition text, with the per-container figures read now.
    pub fn render(&self, containers: &Containers) -> String {
        let all = containers.containers();
        self.heap.clear();
        let mut processes = 0;
        for c in &all {
            let (count, heap) =
                c.supervisor.accounts().with_ledger(|l| (l.len(), l.summaries().iter().map(|p| p.heap).sum::<u64>()));
            processes += count;
            let pod = c.pod.clone().unwrap_or_default();
            let labels = ContainerLabels {
                container: c.id.clone(),
                namespace: pod.namespace,
                pod: pod.name,
                container_name: pod.container,
            };
            self.heap.get_or_create(&labels).set(heap as i64);
        }
        self.containers.set(all.len() as i64);
        self.processes.set(processes as i64);
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let _ = encode(&mut out, &registry);
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

/// Serve `GET /metrics` on `addr`.
pub fn serve(addr: SocketAddr, metrics: Arc<Metrics>, containers: Arc<Containers>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut req = [0u8; 2048];
            let n = stream.read(&mut req).unwrap_or(0);
            let head = String::from_utf8_lossy(&req[..n]);
            let response = if head.starts_with("GET /metrics ") || head.starts_with("GET / ") {
                let body = metrics.render(&containers);
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 20\r\nConnection: close\r\n\r\ntry GET /metrics \r\n\r\n".to_string()
            };
            let _ = stream.write_all(response.as_bytes());
        }
    })?;
    Ok(())
}
