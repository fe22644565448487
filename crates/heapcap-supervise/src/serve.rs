//! The receive loop: one dedicated thread per listener blocks in `SECCOMP_IOCTL_NOTIF_RECV`,
//! has the engine decide, and answers; the wake-up mode follows what the listener sees
//! ([`crate::wakeup`]).

use std::io;
use std::sync::atomic::Ordering;
use std::time::Instant;

use heapcap_linux::journal::Slot;
use heapcap_linux::notify::{Answered, Notification, Recv};
use heapcap_policy::syscall::MemCall;

use crate::engine::{Answer, Engine};
use crate::notifier::{Notifier, Reply};
use crate::procview::ProcView;
use crate::supervisor::{Outcome, Supervisor};
use crate::wakeup::WakeUp;

/// How to serve a listener.
#[derive(Debug, Default, Clone, Copy)]
pub struct Serve<'a> {
    /// Note each call here before deciding it, so that a successor can answer it if this
    /// process dies first ([`Supervisor::resume`]).
    pub journal: Option<&'a Slot>,
    /// The listener was made before the runtime exec'd the container's program (a fresh
    /// container, `heapcap run`): what runs under it until that exec is the runtime's own code,
    /// observed and never denied. False for a listener taken over from a previous supervisor.
    pub runtime: bool,
}

impl<P: ProcView> Supervisor<P> {
    /// Answer `listener` until every process under its filter is gone.
    pub fn serve<N: Notifier>(&self, listener: &N, how: Serve<'_>) -> io::Result<()> {
        let mut wake = WakeUp::default();
        if let Err(e) = listener.set_sync_wakeup(wake.sync()) {
            tracing::debug!(error = %e, "no synchronous wake-up");
        }
        let mut engine = Engine::new(self, how.runtime);
        loop {
            let n = match listener.recv()? {
                Recv::Notification(n) => n,
                Recv::Interrupted => continue,
                Recv::HungUp => {
                    self.accounts.reap_dead();
                    return Ok(());
                }
            };
            if let Some(slot) = how.journal {
                slot.record(&n);
            }
            // Whether the caller before handed over by exiting (a child its waiting parent).
            let handed_over = wake.last().is_some_and(|t| t != n.pid && engine.just_exited(t));
            if let Some(sync) = wake.observe(n.pid, handed_over) {
                if let Err(e) = listener.set_sync_wakeup(sync) {
                    tracing::debug!(error = %e, sync, "cannot change the wake-up mode");
                }
            }
            self.answer(listener, &mut engine, &n)?;
        }
    }

    /// Decide `n` and hand the kernel the answer.
    pub(crate) fn answer<N: Notifier>(
        &self,
        listener: &N,
        engine: &mut Engine<'_, P>,
        n: &Notification,
    ) -> io::Result<()> {
        self.stats.notifications.fetch_add(1, Ordering::Relaxed);
        // Timed only for an observer (heapcapd's metrics): `heapcap run` saves the clock reads.
        let started = self.observer.is_some().then(Instant::now);
        let answer = engine.decide(listener, n);
        // Clocked before the send: the send may hand this CPU to the caller (synchronous
        // wake-up), and the time this thread then waits to run again is not the caller's wait.
        let decided = started.map(|t| t.elapsed());
        let mut outcome = Outcome::Allowed;
        let sent = match &answer {
            Answer::Allow => listener.answer(n.id, Reply::Continue),
            Answer::Deny(d) => {
                outcome = Outcome::Denied;
                self.stats.denied.fetch_add(1, Ordering::Relaxed);
                let reply = match d.brk_return {
                    Some(brk) => Reply::Value(brk as i64),
                    None => Reply::NoMemory,
                };
                listener.answer(n.id, reply)
            }
            Answer::Reply(reply) => listener.answer(n.id, *reply),
            Answer::Drop => Ok(Answered::Gone),
        };
        if let Answer::Deny(d) = &answer {
            (self.on_denial)(d);
        }
        match sent? {
            Answered::Yes => {}
            Answered::Gone => {
                outcome = Outcome::Gone;
                self.stats.gone.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let (Some(observer), Some(decided)) = (&self.observer, decided) {
            let syscall = MemCall::decode(n.arch, n.nr, n.args).map_or("other", |c| c.name());
            observer.decided(syscall, outcome, decided.as_secs_f64());
        }
        Ok(())
    }
}
