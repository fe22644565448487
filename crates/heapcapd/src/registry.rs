//! The containers heapcapd supervises: one [`Container`] per container id, one serving thread
//! per listener fd (the container's init, and each `runc exec`), dropped when all hang up.
//!
//! Each listener is handed to the holder before it is served, with the container's
//! [`Record`]; a heapcapd that starts takes the held listeners back and picks up where the last
//! one left off. Every listener served is kept here too, so that a new holder gets them all if
//! the last one dies ([`crate::holder`]).

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use heapcap_control::{Event, Pod};
use heapcap_holder::Held;
use heapcap_linux::journal::Slot;
use heapcap_linux::notify::Listener;
use heapcap_policy::machine::MachineMemory;
use heapcap_policy::settings::Settings;
use heapcap_supervise::{Denial, ExitWatcher, Ledger, LinuxEmulator, Observer, Serve, Supervisor};

use crate::container::{Container, ControlError, Resume};
use crate::events::Events;
use crate::holder::{Handover, Holder, Link};
use crate::record::Record;

/// A container and the listener fds being served for it (by key).
#[derive(Debug)]
struct Entry {
    container: Arc<Container>,
    served: HashMap<u64, Served>,
}

/// One listener being served: shared with its serving thread.
#[derive(Debug, Clone)]
struct Served {
    listener: Arc<Listener>,
    /// The process it was made for (0: unknown).
    pid: u32,
    /// Where its serving thread notes its calls, if anywhere.
    slot: Option<Slot>,
}

/// Every container being supervised.
pub struct Registry {
    containers: Mutex<HashMap<String, Entry>>,
    /// Keys of served listeners.
    next: AtomicU64,
    holder: Option<Arc<Holder>>,
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
        holder: Option<Arc<Holder>>,
    ) -> Arc<Registry> {
        let containers = Mutex::new(HashMap::new());
        Arc::new(Registry { containers, next: AtomicU64::new(0), holder, exits, events, observer })
    }

    /// Bring a new holder at once whenever the holder dies (see [`crate::holder`]).
    pub fn watch_holder(self: &Arc<Self>) -> std::io::Result<()> {
        let Some(holder) = &self.holder else { return Ok(()) };
        let registry = self.clone();
        holder.watch(move || {
            let Some(holder) = &registry.holder else { return };
            let mut link = holder.lock();
            if link.lost() {
                registry.replace_holder(&mut link, holder);
            }
        })
    }

    /// Hand every listener served to a new holder (the link's lock held: nothing is attached
    /// meanwhile), each with its container's record as it is now.
    fn replace_holder(&self, link: &mut Link, holder: &Holder) {
        let served: Vec<(Arc<Container>, Served)> =
            self.lock().values().flat_map(|e| e.served.values().map(|s| (e.container.clone(), s.clone()))).collect();
        let mut records: HashMap<String, serde_json::Value> = HashMap::new();
        for (c, ..) in &served {
            records.entry(c.id.clone()).or_insert_with(|| c.record().to_json());
        }
        let handovers = served.iter().map(|(c, s)| Handover {
            container: &c.id,
            pid: s.pid,
            record: records[&c.id].clone(),
            listener: s.listener.as_fd(),
            slot: s.slot.as_ref(),
        });
        link.replace(holder, handovers);
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
        let pid = pid.unwrap_or(0);
        let listener = Arc::new(listener);
        let Some(holder) = &self.holder else {
            let (container, key) =
                self.entry(id, pod, settings, Served { listener: listener.clone(), pid, slot: None });
            return self.serve(container, key, listener, None, None);
        };
        // Held before served: from the first call on, a crash of heapcapd loses nothing. Under
        // the link's lock: a holder being replaced gets this listener too, exactly once.
        let mut link = holder.lock();
        if link.lost() {
            self.replace_holder(&mut link, holder);
        }
        let record = Record::new(&settings, pod.clone()).to_json();
        let served = Served { listener: listener.clone(), pid, slot: None };
        let (container, key) = self.entry(id, pod, settings, served);
        let held = match link.client() {
            Some(client) => client.hold(id, pid, record, listener.as_fd()),
            None => Err(std::io::Error::other("no fd holder is running")),
        };
        let slot = match held {
            Ok(slot) => {
                if let Some(s) = self.lock().get_mut(id).and_then(|e| e.served.get_mut(&key)) {
                    s.slot = Some(slot.clone());
                }
                Some(slot)
            }
            Err(e) => {
                tracing::error!(container = id, error = %e, "the holder did not take the listener: a heapcapd crash would break this container");
                None
            }
        };
        drop(link);
        self.serve(container, key, listener, slot, None)
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
        let listener = Arc::new(Listener::new(held.listener));
        let served = Served { listener: listener.clone(), pid: held.pid, slot: Some(held.slot.clone()) };
        let (container, key) = self.entry(&held.container, record.pod.clone(), record.settings(), served);
        tracing::info!(container = %held.container, pid = held.pid, "taken back from the holder");
        let resume = Resume { pid: held.pid, process_limits: record.process_limits };
        self.serve(container, key, listener, Some(held.slot), Some(resume))
    }

    /// The container `id`, made with `pod` and `settings` if new; `served` is one more of its
    /// listeners, under the key returned.
    fn entry(
        self: &Arc<Self>,
        id: &str,
        pod: Option<Pod>,
        settings: Settings,
        served: Served,
    ) -> (Arc<Container>, u64) {
        let mut containers = self.lock();
        let entry = containers.entry(id.to_string()).or_insert_with(|| {
            let events = self.events.clone();
            let (cid, event_pod) = (id.to_string(), pod.clone());
            let sink = Box::new(move |d: &Denial| events.push(Event { pod: event_pod.clone(), ..Event::new(&cid, d) }));
            let mut ledger = Ledger::new(settings.limits, settings.mode, heapcap_linux::page_size());
            ledger.set_counting(settings.counting);
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
            tracing::info!(container = id, pod = shown, limit = ?settings.limits.process, total = ?settings.limits.total, mode = ?settings.mode, counting = %settings.counting, "supervising");
            let container =
                Container { id: id.to_string(), pod, machine: settings.machine, supervisor, holder: self.holder.clone() };
            Entry { container: Arc::new(container), served: HashMap::new() }
        });
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        entry.served.insert(key, served);
        (entry.container.clone(), key)
    }

    fn serve(
        self: &Arc<Self>,
        container: Arc<Container>,
        key: u64,
        listener: Arc<Listener>,
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
            if let Err(e) = container.supervisor.serve(&*listener, how) {
                tracing::error!(container = %id, error = %e, "serving failed");
            }
            drop(listener);
            registry.detach(&id, key);
        });
        if let Err(e) = spawned {
            self.detach(&id_for_error, key);
            return Err(e);
        }
        Ok(())
    }

    fn detach(&self, id: &str, key: u64) {
        let mut containers = self.lock();
        let Some(entry) = containers.get_mut(id) else { return };
        entry.served.remove(&key);
        if entry.served.is_empty() {
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
