//! Taking over a listener from a supervisor that died: answer the call it took and left, and
//! open accounts for the processes already under the filter.

use std::io;
use std::sync::Arc;

use heapcap_linux::journal::{Orphan, Slot};
use heapcap_linux::notify::{Listener, Notification};
use heapcap_policy::ledger::{Figure, ThreadState};
use heapcap_policy::syscall::MemCall;

use crate::engine::Engine;
use crate::procview::{checked, Baseline, Checked, ProcView, Reading, Task, Want};
use crate::supervisor::Supervisor;

impl<P: ProcView> Supervisor<P> {
    /// Answer the call a previous supervisor of `listener` took but never answered (it died), so
    /// that its caller does not wait forever. A noted call is decided like any other. One taken
    /// in the instant before it could be noted (a supervisor killed while it waits for calls
    /// wakes, takes one and dies) is known by id only: if exactly one thread of `pids` sits in a
    /// call heapcap decides, that is its caller and the call is decided from what `/proc` shows;
    /// otherwise it is let through. Returns whether there was one.
    pub fn resume(&self, listener: &Listener, slot: &Slot, pids: &[u32]) -> io::Result<bool> {
        let n = match slot.orphan(listener) {
            None => return Ok(false),
            Some(Orphan::Noted(n)) => n,
            Some(Orphan::Unnoted(id)) => match self.sole_caller(id, pids) {
                Some(n) => n,
                None => {
                    tracing::warn!(id, "letting through a call the previous supervisor took but did not note");
                    listener.allow(id)?;
                    return Ok(true);
                }
            },
        };
        tracing::info!(id = n.id, tid = n.pid, "answering the call the previous supervisor left");
        self.answer(listener, &mut Engine::new(self, false), &n)?;
        Ok(true)
    }

    /// The one thread of `pids` inside a call heapcap decides, as notification `id`; `None` if
    /// there are several (or none).
    fn sole_caller(&self, id: u64, pids: &[u32]) -> Option<Notification> {
        let arch = if cfg!(target_arch = "x86_64") {
            heapcap_policy::syscall::AUDIT_ARCH_X86_64
        } else if cfg!(target_arch = "aarch64") {
            heapcap_policy::syscall::AUDIT_ARCH_AARCH64
        } else {
            return None;
        };
        let mut found = None;
        for &pid in pids {
            for tid in self.proc.tasks(pid) {
                let ThreadState::InCall(key) = self.proc.thread_state(tid) else { continue };
                let Ok(nr) = i32::try_from(key.nr) else { continue };
                if MemCall::decode(arch, nr, key.args).is_none() {
                    continue;
                }
                if found.is_some() {
                    return None;
                }
                found = Some(Notification { id, pid: tid, arch, nr, args: key.args });
            }
        }
        found
    }

    /// `pid` and every process descended from it. Orphans in a container are re-parented to its
    /// init, so from the init this is every process of it.
    pub fn descendants(&self, pid: u32) -> Vec<u32> {
        let mut out = vec![pid];
        let mut i = 0;
        while i < out.len() && out.len() < 1 << 16 {
            let children: Vec<u32> = self.proc.children(out[i]).into_iter().filter(|c| !out.contains(c)).collect();
            out.extend(children);
            i += 1;
        }
        out
    }

    /// Open accounts for processes already under the filter (a supervisor taking over from one
    /// that died), so totals count them before they next grow. Pids that are gone, or already
    /// known, are skipped.
    pub fn adopt(&self, pids: &[u32]) {
        for &pid in pids {
            if self.accounts.lock().ledger.contains(pid) {
                continue;
            }
            // Not about a notification: the process's own handle, opened with the files, says
            // whether they are still about it: statm now (an upper figure), the mappings when a
            // decision needs them (refused: statm for good, as for any blind process).
            // The handle comes with the files; alive after the read, they were its own.
            let command = self.accounts.wants_commands();
            let read = match checked(&self.proc, pid, Want::Admission { command }, || true) {
                Checked::Read(Reading::Admission { task, command, figure }) if !task.exited() => {
                    Some((Arc::new(task) as Arc<dyn Task>, command, figure))
                }
                _ => None,
            };
            let Some((task, command, mut figure)) = read else { continue };
            if self.accounts.lock().ledger.counting() == heapcap_policy::ledger::Counting::Strict {
                // statm is no upper figure of shared memory: strict starts from the mappings.
                if let (Baseline::Upper(_), Some(Ok(snap))) = (&figure, task.kept().and_then(|k| k.maps(None))) {
                    figure = Baseline::Exact(snap);
                }
            }
            let opened = {
                let mut g = self.accounts.lock();
                let figure = match &figure {
                    Baseline::Exact(snap) => Figure::Exact(snap),
                    Baseline::Upper(u) => Figure::Upper(*u),
                    Baseline::Image { upper, start_brk } => {
                        Figure::Image { upper: *upper, start_brk: Some(*start_brk) }
                    }
                };
                g.open(pid, task.clone(), command, figure, false)
            };
            if let Some(generation) = opened {
                self.watch_exit(pid, generation, task);
            }
        }
    }
}
