//! Denials: kept in a ring for `heapcap events`, streamed to followers, and logged at a rate
//! a container cannot turn into a flood.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use heapcap_control::Event;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::{channel, Receiver, Sender};

const RECENT: usize = 1000;
/// Events queued for a follower that reads slowly; past it, it misses some (never blocking the
/// serving thread that pushes them).
const FOLLOW_QUEUE: usize = 4096;
/// Log lines per container per second; the rest are counted and summarised.
const LOG_PER_SECOND: u32 = 10;

#[derive(Debug, Default)]
struct Window {
    start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

#[derive(Debug, Default)]
struct Inner {
    recent: VecDeque<Event>,
    followers: Vec<Sender<Event>>,
    windows: HashMap<String, Window>,
}

/// Every denial of every container.
#[derive(Debug, Default)]
pub struct Events {
    inner: Mutex<Inner>,
}

impl Events {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, event: Event) {
        let mut inner = self.lock();
        inner.followers.retain(|f| !matches!(f.try_send(event.clone()), Err(TrySendError::Closed(_))));
        let now = Instant::now();
        let window = inner.windows.entry(event.container.clone()).or_default();
        if window.start.is_none_or(|s| now.duration_since(s) >= Duration::from_secs(1)) {
            if window.suppressed > 0 {
                tracing::warn!(container = %event.container, suppressed = window.suppressed, "more denials not logged");
            }
            *window = Window { start: Some(now), logged: 0, suppressed: 0 };
        }
        if window.logged < LOG_PER_SECOND {
            window.logged += 1;
            tracing::info!(
                container = %event.container,
                pod = event.pod.as_ref().map(|p| p.to_string()),
                pid = event.pid,
                tid = event.tid,
                command = %event.command,
                syscall = %event.syscall,
                requested = event.requested,
                usage = event.usage,
                limit = event.limit,
                scope = %event.scope,
                reason = event.reason.as_deref(),
                "denied"
            );
        } else {
            window.suppressed += 1;
        }
        if inner.recent.len() == RECENT {
            inner.recent.pop_front();
        }
        inner.recent.push_back(event);
    }

    /// The recent denials, oldest first.
    pub fn recent(&self) -> Vec<Event> {
        self.lock().recent.iter().cloned().collect()
    }

    /// The recent denials, and a stream of the ones to come (for a task on the control plane's
    /// runtime; pushed from the serving threads without waiting).
    pub fn follow(&self) -> (Vec<Event>, Receiver<Event>) {
        let (tx, rx) = channel(FOLLOW_QUEUE);
        let mut inner = self.lock();
        inner.followers.push(tx);
        (inner.recent.iter().cloned().collect(), rx)
    }

    /// A container is gone: drop its log window.
    pub fn forget(&self, container: &str) {
        self.lock().windows.remove(container);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(n: u32) -> Event {
        Event {
            time: String::new(),
            container: "c".into(),
            pod: None,
            pid: Some(n),
            tid: Some(n),
            command: "x".into(),
            syscall: "mmap".into(),
            requested: Some(1),
            usage: Some(2),
            reason: None,
            limit: 3,
            scope: heapcap_policy::Scope::Process,
        }
    }

    #[test]
    fn ring_is_bounded_and_followers_get_new_events() {
        let events = Events::default();
        for i in 0..(RECENT as u32 + 5) {
            events.push(ev(i));
        }
        let recent = events.recent();
        assert_eq!(recent.len(), RECENT);
        assert_eq!(recent[0].pid, Some(5));
        let (_, mut rx) = events.follow();
        events.push(ev(99));
        assert_eq!(rx.try_recv().unwrap().pid, Some(99));
        drop(rx);
        events.push(ev(100));
        assert!(events.lock().followers.is_empty(), "a gone follower is dropped");
    }
}
