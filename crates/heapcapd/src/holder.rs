//! Two copies of every listener, always: heapcapd's own, and the fd holder's.
//!
//! The holder is watched by a thread of its own (`holder-watch`), which blocks until the
//! holder's connection hangs up (it exited or was killed). Then a new holder is found (one a
//! service manager already restarted) or started, given the journal the serving threads note
//! their calls in, and handed every listener with its container's record as it is now
//! (`set-limit` changes included). All of it happens under the [`Link`] lock, which every new
//! listener also takes before it is served: no container starts in between with a single copy.
//! A holder that cannot be brought back is logged, reported by the `heapcap_holder_connected`
//! metric, and tried again every 250 ms.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use heapcap_holder::Client;
use heapcap_linux::journal::{Journal, Slot};

/// How often a holder that could not be brought back is tried again.
const RETRY: Duration = Duration::from_millis(250);

/// Where the holder is and how to start one.
#[derive(Debug, Clone)]
pub struct Start {
    pub socket: PathBuf,
    pub binary: PathBuf,
    pub grace: Duration,
}

/// heapcapd's side of the holder.
#[derive(Debug)]
pub struct Holder {
    start: Start,
    /// The journal the serving threads note their calls in; every holder keeps this one.
    journal: Arc<Journal>,
    link: Mutex<Link>,
}

/// The connection to the holder now; `None` while none could be brought back.
#[derive(Debug)]
pub struct Link {
    client: Option<Arc<Client>>,
    /// A failure to bring one back has been logged (said once per outage).
    said: bool,
}

/// A listener as the holder must get it again: its container, the process it was made for, the
/// record, the fd and its journal slot (if the serving thread notes its calls in one).
pub struct Handover<'a> {
    pub container: &'a str,
    pub pid: u32,
    pub record: serde_json::Value,
    pub listener: std::os::fd::BorrowedFd<'a>,
    pub slot: Option<&'a Slot>,
}

impl Holder {
    pub fn new(start: Start, client: Client) -> Holder {
        let journal = client.journal().clone();
        Holder { start, journal, link: Mutex::new(Link { client: Some(Arc::new(client)), said: false }) }
    }

    /// The link, held while a listener is handed over or the holder is replaced.
    pub fn lock(&self) -> MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a holder is connected now (for the metrics).
    pub fn connected(&self) -> bool {
        self.lock().client.as_ref().is_some_and(|c| c.connected())
    }

    /// The client now, without waiting for the lock's other users beyond the lock itself.
    fn current(&self) -> Option<Arc<Client>> {
        self.lock().client.clone()
    }

    /// Watch the holder from a thread of its own: on hang-up, call `replace` (which takes the
    /// lock and brings a new holder with [`Link::replace`]); while none is there, every [`RETRY`].
    pub fn watch(self: &Arc<Self>, replace: impl Fn() + Send + 'static) -> std::io::Result<()> {
        let holder = self.clone();
        std::thread::Builder::new().name("holder-watch".into()).spawn(move || loop {
            match holder.current() {
                Some(client) => {
                    client.wait_hangup();
                    drop(client);
                }
                None => std::thread::sleep(RETRY),
            }
            replace();
        })?;
        Ok(())
    }
}

impl Link {
    /// The holder, if it is still there.
    pub fn client(&self) -> Option<&Arc<Client>> {
        self.client.as_ref().filter(|c| c.connected())
    }

    /// Whether a new holder is needed: the last one hung up (or never came back).
    pub fn lost(&self) -> bool {
        self.client().is_none()
    }

    /// Bring a new holder (one already listening on the socket, else started now) and hand it
    /// every listener of `handovers` with its slot. Returns the new client, or `None` (logged)
    /// if none could be brought; a listener it refuses is logged and the others still handed.
    pub fn replace<'a>(&mut self, holder: &Holder, handovers: impl IntoIterator<Item = Handover<'a>>) {
        let had = self.client.take().is_some();
        let start = &holder.start;
        if had {
            tracing::error!(socket = %start.socket.display(), "the fd holder is gone: starting a new one (until it has every listener, a heapcapd crash would break their containers)");
        }
        let client = match heapcap_holder::restore_or_start(&start.socket, &start.binary, start.grace, &holder.journal)
        {
            Ok(c) => c,
            Err(e) => {
                if !self.said {
                    tracing::error!(socket = %start.socket.display(), binary = %start.binary.display(), error = %e, "cannot bring the fd holder back: containers have a single copy of their listener (a heapcapd crash would break them); trying again every 250 ms");
                }
                self.said = true;
                return;
            }
        };
        let (mut handed, mut failed) = (0usize, 0usize);
        for h in handovers {
            let done = match h.slot {
                Some(slot) => client.hold_at(h.container, h.pid, h.record, h.listener, slot),
                None => client.hold(h.container, h.pid, h.record, h.listener).map(drop),
            };
            match done {
                Ok(()) => handed += 1,
                Err(e) => {
                    failed += 1;
                    tracing::error!(container = h.container, error = %e, "the new holder did not take a listener");
                }
            }
        }
        tracing::info!(listeners = handed, failed, "a new fd holder keeps every listener");
        self.client = Some(Arc::new(client));
        self.said = false;
    }
}
