//! The containers heapcapd supervises: one [`Container`] per container id, one serving thread
//! per listener fd (the container's init, and each `runc exec`), dropped when all hang up.
//!
//! Each listener is handed to the holder before it is served, with the container's
//! [`Record`]; a heapcapd that starts takes the held listeners back and picks up where the last
//! one left off.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use heapcap_control::{Event, Pod};
use heapcap_holder::{Client, Held};
use heapcap_linux::journal::Slot;
use heapcap_linux::notify::Listener;
use heapcap_policy::machine::MachineMemory;
use heapcap_policy::settings::Settings;
use heapcap_supervise::{Denial, ExitWatcher, Ledger, LinuxEmulator, Observer, Serve, Supervisor};

use crate::container::{Container, ControlError, Resume};
use crate::events::Events;
use crate::record::Record;

/// A container and how many listener fds are being served for it.
#[derive(Debug)]
struct Entry {
    container: Arc<Container>,
    listeners: usize,
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
    /// runtime made the listener for, if known (a successor adopts it and its descendants). `pod`:
    /// its Kubernetes names, if a CRI runtime started it.
    pub fn attach_process(
        self: &Arc<Self>,
        id: &str,
        pod: Option<Pod>,
        settings: Settings,
        listener: Listener,
        pid: Option<u32>,
    ) -> std::io::Result<()> {
        let container = self.entry(id, pod.clone(), settings);
        // Held before served: from the first call on, a crash of heapcapd loses nothing.
        let record = Record::new(&settings, pod).to_json();
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
                Record::unreadable()
            }
        };
        let container = self.entry(&held.container, record.pod.clone(), record.settings());
        tracing::info!(container = %held.container, pid = held.pid, "taken back from the holder");
        let resume = Resume { pid: held.pid, process_limits: record.process_limits };
        self.serve(container, Listener::new(held.listener), Some(held.slot), Some(resume))
    }

    /// The container `id`, made with `pod` and `settings` if new; counts one more listener for it.
    fn entry(self: &Arc<Self>, id: &str, pod: Option<Pod>, settings: Settings) -> Arc<Container> {
        let mut containers = self.lock();
        let entry = containers.entry(id.to_string()).or_insert_with(|| {
            let events = self.events.clone();
            let (cid, event_pod) = (id.to_string(), pod.clone());
            let sink = Box::new(move |d: &Denial| events.push(Event { pod: event_pod.clone(), ..Event::new(&cid, d) }));
            let ledger = Ledger::new(settings.limits, settings.mode, heapcap_linux::page_size());
            let mut supervisor = Supervisor::new(ledger, self.exits.clone(), sink);
            // `sysinfo` reaches heapcapd only where the container's profile sends it (heapcap-runtime
            // and the hooks add it unless the settings say host): answered with the quota unless
            // the container asked for the host's figures (a profile written by hand may send it anyway).
            if settings.machine == MachineMemory::Quota {
                supervisor = supervisor.with_emulator(Box::new(LinuxEmulator));
            }
            if let Some(o) = &self.observer {
                supervisor = supervisor.with_observer(o.clone());
            }
            supervisor.accounts().keep_finished(false);
            let shown = pod.as_ref().map(Pod::to_string);
            tracing::info!(container = id, pod = shown, limit = ?settings.limits.process, total = ?settings.limits.total, mode = ?settings.mode, "supervising");
            let container =
                Container { id: id.to_string(), pod, machine: settings.machine, supervisor, holder: self.holder.clone() };
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
            // A fresh listener was made before the runtime exec'd the container's program; one
            // taken back from the holder belongs to a container that runs.
            let runtime = resume.is_none();
            if let (Some(resume), Some(slot)) = (resume, &slot) {
                container.resume(&listener, slot, resume);
            }
            let how = Serve { journal: slot.as_ref(), runtime };
            if let Err(e) = container.supervisor.serve(&listener, how) {
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

    /// Whether the fd holder is connected (`None`: heapcapd runs without one).
    pub fn holder_connected(&self) -> Option<bool> {
        self.holder.as_ref().map(|h| h.connected())
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
