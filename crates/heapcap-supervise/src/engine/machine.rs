//! `sysinfo` from a process that is to see its quota as its machine's memory
//! ([`heapcap_policy::machine`]): answered by heapcap, off the memory calls' path.

use heapcap_linux::notify::Notification;
use heapcap_linux::processvm::VmError;
use heapcap_policy::machine;
use heapcap_policy::syscall::Abi;

use super::{Answer, Engine};
use crate::notifier::{Notifier, Reply};
use crate::procview::ProcView;

impl<P: ProcView> Engine<'_, P> {
    /// Answer `sysinfo(buf)` of process `pid` with the quota that applies to it as `totalram`:
    /// the kernel's figures with the memory totals replaced, written into the caller's buffer
    /// once the call is known to be still pending, then the kernel's return value (0); a buffer
    /// that is not writable memory gets `EFAULT`, as from the kernel. Where no quota applies (or
    /// heapcap cannot answer) the kernel answers, with nothing written.
    pub(super) fn sysinfo<N: Notifier>(&self, l: &N, n: &Notification, pid: u32, buf: u64) -> Answer {
        let (Some(emulator), Some(abi)) = (self.sup.emulator.as_deref(), Abi::of(n.arch, n.nr)) else {
            return Answer::Allow;
        };
        let Some(view) = machine::view(&self.sup.accounts.lock().ledger, pid) else { return Answer::Allow };
        let host = match emulator.sysinfo() {
            Ok(host) => host,
            Err(e) => {
                self.sup.warn(n.pid, Some(pid), &format!("cannot read sysinfo(2) ({e}): the kernel answers the call"));
                return Answer::Allow;
            }
        };
        let bytes = host.seen_under(view).encode(abi, self.sup.page);
        // Written only for a call still pending: its thread is inside it, so the id is its own.
        if !l.id_valid(n.id) {
            return Answer::Drop;
        }
        match emulator.write(n.pid, buf, &bytes) {
            Ok(()) => Answer::Reply(Reply::Value(0)),
            Err(_) if !l.id_valid(n.id) => Answer::Drop,
            Err(VmError::Fault { .. }) => Answer::Reply(Reply::Fault),
            Err(e) => {
                let what = format!("cannot answer sysinfo(2) with the quota ({e}): the kernel answers the call");
                self.sup.warn(n.pid, Some(pid), &what);
                Answer::Allow
            }
        }
    }
}
