//! The containers heapcapd supervises: one ledger per container, one serving thread per
//! listener fd (the container's init, and each `runc exec`), dropped when all hang up.
//!
//! Each listener is handed to the holder before it is served, with the container's *record*
//! (what a successor needs: quotas and mode); a heapcapd that starts takes the held listeners
//! back and picks up where the last one left off.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use heapcap_control::{ContainerView, Event, ProcessView};
use heapcap_holder::{Client, Held};
use heapcap_linux::journal::Slot;
use heapcap_linux::notify::Listener;
use heapcap_policy::ledger::{Limits, Mode};
use heapcap_policy::settings::Settings;
use heapcap_supervise::{Denial, ExitWatcher, Ledger, Observer, Supervisor};

use crate::events::Events;

/// One container.
#[derive(Debug)]
pub struct Container {
    pub id: String,
    pub supervisor: Supervisor,
    holder: Option<Arc<Client>>,
}

/// What the holder keeps for a container, so the next heapcapd enforces what this one did.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Record {
    limit: Option<u64>,
    total_limit: Option<u64>,
    audit: bool,
    /// Quotas set for single processes (`heapcap set-limit --pid`).
    #[serde(default)]
    process_limits: Vec<(u32, Option<u64>)>,
}

impl Record {
    fn new(settings: &Settings) -> Record {
        Record {
            limit: settings.limits.process,
            total_limit: settings.limits.total,
            audit: settings.mode == Mode::Audit,
            process_limits: Vec::new(),
        }
    }

    fn settings(&self) -> Settings {
        Settings {
            limits: Limits { process: self.limit, total: self.total_limit },
            mode: if self.audit { Mode::Audit } else { Mode::Enforce },
        }
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
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
    holder: Option<Arc<Client>>,
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
        scope: d.scope,
    }
}

impl Registry {
    pub fn new(
        exits: Arc<ExitWatcher>,
        events: Arc<Events>,
        observer: Option<Arc<dyn Observer>>,
        holder: Option<Client>,
    ) -> Arc<Registry> {
        let holder = holder.map(Arc::new);
        Arc::new(Registry { containers: Mutex::new(HashMap::new()), holder, exits, events, observer })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serve a listener fd of container `id`: a new container, or one more process of a known one
    /// (`runc exec`), which joins its accounting, totals included. `pid` is the process the
    /// runtime made the listener for, if known (a successor adopts it and its descendants).
    pub fn attach_process(
        self: &Arc<Self>,
        id: &str,
        settings: Settings,
        listener: Listener,
        pid: Option<u32>,
    ) -> std::io::Result<()> {
        let container = self.entry(id, settings);
        // Held before served: from the first call on, a crash of heapcapd loses nothing.
        let record = Record::new(&settings).to_json();
        let slot = match &self.holder {
            Some(h) => match h.hold(id, pid.unwrap_or(0), record, std::os::fd::AsFd::as_fd(&listener)) {
                Ok(slot) => Some(slot),
                Err(e) => {
                    tracing::error!(container = id, error = %e, "the holder did not take the listener: a heapcapd crash would break this container");
                    None
                }
            },
            None => None,
        };
        self.serve(container, listener, slot, None)
    }

    /// Take back a listener the holder kept while heapcapd was away.
    pub fn restore(self: &Arc<Self>, held: Held) -> std::io::Result<()> {
        let record: Record = match serde_json::from_value(held.record.clone()) {
            Ok(r) => r,
            Err(e) => {
                // Never drop a listener: its programs would fail. Serve it unquota'd, loudly.
                tracing::error!(container = %held.container, error = %e, record = %held.record, "unreadable record: supervising in audit mode");
                Record { limit: None, total_limit: None, audit: true, process_limits: Vec::new() }
            }
        };
        let container = self.entry(&held.container, record.settings());
        tracing::info!(container = %held.container, pid = held.pid, "taken back from the holder");
        let resume = Resume { pid: held.pid, process_limits: record.process_limits };
        self.serve(container, Listener::new(held.listener), Some(held.slot), Some(resume))
    }

    /// The container `id`, made with `settings` if new; counts one more listener for it.
    fn entry(self: &Arc<Self>, id: &str, settings: Settings) -> Arc<Container> {
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
            let container = Container { id: id.to_string(), supervisor, holder: self.holder.clone() };
            Entry { container: Arc::new(container), listeners: 0 }
        });
        entry.listeners += 1;
        entry.container.clone()
    }

    fn serve(
        self: &Arc<Self>,
        container: Arc<Container>,
        listener: Listener,
        slot: Option<Slot>,
        resume: Option<Resume>,
    ) -> std::io::Result<()> {
        let registry = self.clone();
        let id = container.id.clone();
        let id_for_error = id.clone();
        let spawned = std::thread::Builder::new().name(format!("ctr-{id:.11}")).spawn(move || {
            if let (Some(resume), Some(slot)) = (resume, &slot) {
                container.resume(&listener, slot, resume);
            }
            if let Err(e) = container.supervisor.serve_journaled(&listener, slot.as_ref()) {
                tracing::error!(container = %id, error = %e, "serving failed");
            }
            drop(listener);
            registry.detach(&id);
        });
        if let Err(e) = spawned {
            self.detach(&id_for_error);
            return Err(e);
        }
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

/// What a heapcapd taking over a listener must do before serving it.
#[derive(Debug)]
struct Resume {
    /// The process the listener was made for (0: unknown).
    pid: u32,
    process_limits: Vec<(u32, Option<u64>)>,
}

impl Container {
    /// Pick up a listener from a heapcapd that is gone: answer the call it left, then open
    /// accounts for every process already under the filter (the process the listener was made
    /// for and its descendants), with the quotas set for single processes.
    fn resume(&self, listener: &Listener, slot: &Slot, resume: Resume) {
        let pids = if resume.pid != 0 { descendants(resume.pid) } else { Vec::new() };
        if let Err(e) = self.supervisor.resume(listener, slot, &pids) {
            tracing::warn!(container = %self.id, error = %e, "cannot answer the call left by the last heapcapd");
        }
        if !pids.is_empty() {
            self.supervisor.adopt(&pids);
            tracing::info!(container = %self.id, processes = pids.len(), "accounts rebuilt from /proc");
        }
        if !resume.process_limits.is_empty() {
            let shared = self.supervisor.shared();
            let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
            for (pid, limit) in resume.process_limits {
                s.ledger.set_process_limit(pid, limit);
            }
        }
    }

    /// Tell the holder the container's quotas now.
    fn save(&self) {
        let Some(holder) = &self.holder else { return };
        let record = {
            let shared = self.supervisor.shared();
            let s = shared.lock().unwrap_or_else(|e| e.into_inner());
            let limits = s.ledger.limits();
            let settings = Settings { limits, mode: s.ledger.mode() };
            let mut record = Record::new(&settings);
            record.process_limits = s
                .ledger
                .summaries()
                .into_iter()
                .filter(|p| p.limit != limits.process)
                .map(|p| (p.pid, p.limit))
                .collect();
            record
        };
        if let Err(e) = holder.update(&self.id, record.to_json()) {
            tracing::warn!(container = %self.id, error = %e, "cannot tell the holder the new quotas");
        }
    }

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
            mode: s.ledger.mode(),
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
        drop(s);
        self.save();
        Ok(())
    }
}

/// `pid` and every process descended from it, from `/proc/<pid>/task/*/children`. Orphans in a
/// container are re-parented to its init, so from the init this is every process of it.
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() && out.len() < 1 << 16 {
        let p = out[i];
        i += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else { continue };
        for task in tasks.flatten() {
            let Ok(children) = std::fs::read_to_string(task.path().join("children")) else { continue };
            out.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok())
                    .filter(|c| !out.contains(c))
                    .collect::<Vec<_>>(),
            );
        }
    }
    out
}
