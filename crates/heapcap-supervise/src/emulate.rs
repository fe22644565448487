//! Calls heapcap carries out itself instead of the kernel (`sysinfo` for a process that is to see
//! its quota as its machine's memory): what they need from the system, behind a small interface
//! handed to the supervisor. Production passes [`LinuxEmulator`]; tests pass scripted ones that
//! fail on cue. A supervisor without one leaves such calls to the kernel.

use heapcap_linux::processvm::{self, VmError};
use heapcap_policy::machine::SysInfo;

/// What a call carried out by heapcap needs from the system.
pub trait Emulator: Send + Sync {
    /// The kernel's own `sysinfo(2)`, as heapcap sees it.
    fn sysinfo(&self) -> std::io::Result<SysInfo>;
    /// Replace `bytes.len()` bytes at `addr` in thread `tid`'s memory with `bytes`, all or nothing
    /// ([`VmError::Fault`] where the kernel's own copy would fault). Called only while the call
    /// it answers is pending.
    fn write(&self, tid: u32, addr: u64, bytes: &[u8]) -> Result<(), VmError>;
}

/// The real kernel: `sysinfo(2)` and `process_vm_writev`.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinuxEmulator;

impl Emulator for LinuxEmulator {
    fn sysinfo(&self) -> std::io::Result<SysInfo> {
        heapcap_linux::sysinfo::host()
    }

    fn write(&self, tid: u32, addr: u64, bytes: &[u8]) -> Result<(), VmError> {
        processvm::replace(tid, addr, bytes)
    }
}
