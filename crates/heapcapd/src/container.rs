//! One container under heapcapd: its supervisor, and what `heapcap ps` and `set-limit` do to it.

use std::sync::Arc;

use heapcap_control::{ContainerView, Pod, ProcessView};
use heapcap_linux::journal::Slot;
use heapcap_linux::notify::Listener;
use heapcap_policy::ledger::Limits;
use heapcap_policy::machine::MachineMemory;
use heapcap_supervise::Supervisor;

use crate::holder::Holder;
use crate::record::Record;

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

/// One container.
#[derive(Debug)]
pub struct Container {
    pub id: String,
    /// Its Kubernetes names, when a CRI runtime started it.
    pub pod: Option<Pod>,
    /// What its programs see as their machine's memory.
    pub machine: MachineMemory,
    pub supervisor: Supervisor,
    pub(crate) holder: Option<Arc<Holder>>,
}

/// What a heapcapd taking over a listener must do before serving it.
#[derive(Debug)]
pub struct Resume {
    /// The process the listener was made for (0: unknown).
    pub pid: u32,
    pub process_limits: Vec<(u32, Option<u64>)>,
}

impl Container {
    /// Pick up a listener from a heapcapd that is gone: answer the call it left, then open
    /// accounts for every process already under the filter (the process the listener was made
    /// for and its descendants), with the quotas set for single processes.
    pub(crate) fn resume(&self, listener: &Listener, slot: &Slot, resume: Resume) {
        let pids = if resume.pid != 0 { self.supervisor.descendants(resume.pid) } else { Vec::new() };
        if let Err(e) = self.supervisor.resume(listener, slot, &pids) {
            tracing::warn!(container = %self.id, error = %e, "cannot answer the call left by the last heapcapd");
        }
        if !pids.is_empty() {
            self.supervisor.adopt(&pids);
            tracing::info!(container = %self.id, processes = pids.len(), "accounts rebuilt from /proc");
        }
        let accounts = self.supervisor.accounts();
        for (pid, limit) in resume.process_limits {
            accounts.set_process_limit(pid, limit);
        }
    }

    /// What the holder must keep for it now (quotas changed live included).
    pub(crate) fn record(&self) -> Record {
        self.supervisor.accounts().with_ledger(|l| Record::of(l, self.pod.clone(), self.machine))
    }

    /// Tell the holder the container's quotas now. A holder being replaced meanwhile is waited
    /// for (it is handed the records as they are when it is).
    fn save(&self) {
        let Some(holder) = &self.holder else { return };
        let link = holder.lock();
        let Some(client) = link.client() else { return };
        if let Err(e) = client.update(&self.id, self.record().to_json()) {
            tracing::warn!(container = %self.id, error = %e, "cannot tell the holder the new quotas");
        }
    }

    /// The container's figures, measured exactly now.
    pub fn view(&self) -> ContainerView {
        self.supervisor.measure();
        let (limits, mode, counting, summaries) =
            self.supervisor.accounts().with_ledger(|l| (l.limits(), l.mode(), l.counting(), l.summaries()));
        let processes: Vec<ProcessView> = summaries
            .into_iter()
            .map(|p| ProcessView {
                pid: p.pid,
                command: p.command,
                heap: p.heap,
                peak: p.peak,
                limit: p.limit,
                denials: p.denials,
                runtime: p.runtime,
                blind: p.blind,
            })
            .collect();
        ContainerView {
            id: self.id.clone(),
            pod: self.pod.clone(),
            mode,
            strict: counting == heapcap_policy::ledger::Counting::Strict,
            limit: limits.process,
            total_limit: limits.total,
            host_memory: self.machine == MachineMemory::Host,
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
        let done = self.supervisor.accounts().with_ledger(|ledger| {
            if let (Some(pid), Some(limit)) = (pid, limit) {
                if !ledger.set_process_limit(pid, limit) {
                    return false;
                }
            } else if let Some(limit) = limit {
                ledger.set_limits(Limits { process: limit, ..ledger.limits() });
            }
            if let Some(total) = total {
                ledger.set_limits(Limits { total, ..ledger.limits() });
            }
            true
        });
        if !done {
            let pid = pid.unwrap_or_default();
            return Err(ControlError::NoProcess { container: self.id.clone(), pid });
        }
        self.save();
        Ok(())
    }
}
