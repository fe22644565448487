//! The containers heapcapd supervises: one ledger per container, one serving thread per
//! listener fd (the container's init, and each `runc exec`), dropped when all hang up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use heapcap_control::{ContainerView, Event, ProcessView};
use heapcap_linux::notify::Listener;
use heapcap_policy::ledger::{Limits, Mode, Scope};
use heapcap_policy::settings::Settings;
use heapcap_supervise::{Denial, ExitWatcher, Ledger, Observer, Supervisor};

use crate::events::Events;

/// One container.
#[derive(Debug)]
pub struct Container {
    pub id: String,
    pub supervisor: Supervisor,
}

/// A container and how many listener fds are being served for it.
#[derive(Debug)]
struct Entry {
    container: Arc<Container>,
    listeners: usize,
}

/// Why a control request could not be done.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no container '{0}' (see heapcap ps)")]
    NoContainer(String),
    #[error("'{0}' matches several containers: give more of the id")]
    Ambiguous(String),
    #[error("container {container} has no process {pid} under heapcap")]
    NoProcess { container: String, pid: u32 },
}

/// Every container being supervised.
pub struct Registry {
    containers: Mutex<HashMap<String, Entry>>,
    exits: Arc<ExitWatcher>,
    events: Arc<Events>,
    observer: Option<Arc<dyn Observer>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn event(container: &str, d: &Denial) -> Event {
    Event {
        time: rfc3339(d.time),
        container: container.to_string(),
        pid: d.pid,
        command: d.command.clone(),
        syscall: d.syscall.to_string(),
        requested: d.request,
        usage: d.usage,
        limit: d.limit,
        scope: match d.scope {
            Scope::Process => "process",
            Scope::Total => "total",
        }
        .to_string(),
    }
}

impl Registry {
    pub fn new(exits: Arc<ExitWatcher>, events: Arc<Events>, observer: Option<Arc<dyn Observer>>) -> Arc<Registry> {
        Arc::new(Registry { containers: Mutex::new(HashMap::new()), exits, events, observer })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serve a listener fd of container `id`: a new container, or one more process of a known one
    /// (`runc exec`), which joins its accounting, totals included.
    pub fn attach(self: &Arc<Self>, id: &str, settings: Settings, listener: Listener) -> std::io::Result<()> {
        let container = {
            let mut containers = self.lock();
            let entry = containers.entry(id.to_string()).or_insert_with(|| {
                let events = self.events.clone();
                let cid = id.to_string();
                let sink = Box::new(move |d: &Denial| events.push(event(&cid, d)));
                let ledger = Ledger::new(settings.limits, settings.mode, heapcap_linux::page_size());
                let mut supervisor = Supervisor::new(ledger, self.exits.clone(), sink);
                if let Some(o) = &self.observer {
                    supervisor = supervisor.with_observer(o.clone());
                }
                supervisor.keep_finished(false);
                tracing::info!(container = id, limit = ?settings.limits.process, total = ?settings.limits.total, mode = ?settings.mode, "supervising");
                Entry { container: Arc::new(Container { id: id.to_string(), supervisor }), listeners: 0 }
            });
            entry.listeners += 1;
            entry.container.clone()
        };
        let registry = self.clone();
        let id = id.to_string();
        std::thread::Builder::new().name(format!("ctr-{}", &id[..id.len().min(11)])).spawn(move || {
            if let Err(e) = container.supervisor.serve(&listener) {
                tracing::error!(container = %id, error = %e, "serving failed");
            }
            drop(listener);
            registry.detach(&id);
        })?;
        Ok(())
    }

    fn detach(&self, id: &str) {
        let mut containers = self.lock();
        let Some(entry) = containers.get_mut(id) else { return };
        entry.listeners -= 1;
        if entry.listeners == 0 {
            containers.remove(id);
            self.events.forget(id);
            tracing::info!(container = id, "container gone");
        }
    }

    /// Containers now.
    pub fn containers(&self) -> Vec<Arc<Container>> {
        let mut v: Vec<Arc<Container>> = self.lock().values().map(|e| e.container.clone()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// The container with this id, or the only one whose id starts with it.
    pub fn find(&self, id: &str) -> Result<Arc<Container>, ControlError> {
        let containers = self.lock();
        if let Some(e) = containers.get(id) {
            return Ok(e.container.clone());
        }
        let mut matches = containers.values().map(|e| &e.container).filter(|c| c.id.starts_with(id));
        match (matches.next(), matches.next()) {
            (Some(c), None) if !id.is_empty() => Ok(c.clone()),
            (Some(_), Some(_)) => Err(ControlError::Ambiguous(id.to_string())),
            _ => Err(ControlError::NoContainer(id.to_string())),
        }
    }
}

impl Container {
    /// The container's figures, measured exactly now.
    pub fn view(&self) -> ContainerView {
        self.supervisor.measure();
        let shared = self.supervisor.shared();
        let s = shared.lock().unwrap_or_else(|e| e.into_inner());
        let limits = s.ledger.limits();
        let processes: Vec<ProcessView> = s
            .ledger
            .summaries()
            .into_iter()
            .map(|p| ProcessView {
                pid: p.pid,
                command: p.command,
                heap: p.heap,
                peak: p.peak,
                limit: p.limit,
                denials: p.denials,
            })
            .collect();
        ContainerView {
            id: self.id.clone(),
            mode: match s.ledger.mode() {
                Mode::Enforce => "enforce",
                Mode::Audit => "audit",
            }
            .to_string(),
            limit: limits.process,
            total_limit: limits.total,
            heap: processes.iter().map(|p| p.heap).sum(),
            processes,
        }
    }

    /// Change quotas live: for one process, or the container's (per process and total).
    pub fn set_limits(
        &self,
        pid: Option<u32>,
        limit: Option<Option<u64>>,
        total: Option<Option<u64>>,
    ) -> Result<(), ControlError> {
        let shared = self.supervisor.shared();
        let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pid) = pid {
            if let Some(limit) = limit {
                if !s.ledger.set_process_limit(pid, limit) {
                    return Err(ControlError::NoProcess { container: self.id.clone(), pid });
                }
            }
        } else if let Some(limit) = limit {
            let l = s.ledger.limits();
            s.ledger.set_limits(Limits { process: limit, ..l });
        }
        if let Some(total) = total {
            let l = s.ledger.limits();
            s.ledger.set_limits(Limits { total, ..l });
        }
        Ok(())
    }
}
