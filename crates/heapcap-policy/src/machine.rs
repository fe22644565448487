//! What a process under a quota sees as its machine's memory.
//!
//! Programs size themselves from the machine: the JVM's default heap is a quarter of physical
//! memory (`sysconf(_SC_PHYS_PAGES)`, which glibc reads from `sysinfo(2)`), caches and servers
//! take a share of `totalram`. Under a quota far below the machine's memory they reach for more
//! than they may have, and meet the quota as a crash (a JVM that cannot commit its heap) instead
//! of their own out-of-memory error. So where a quota applies (and [`MachineMemory::Quota`], the
//! default, is chosen), heapcap answers `sysinfo(2)` itself: `totalram` is the quota that applies
//! to the caller ([`view`]), `freeram` that less its counted heap, and every other field is the
//! kernel's ([`SysInfo::seen_under`]), laid out as the caller's ABI has it ([`SysInfo::encode`]).

use std::fmt;
use std::str::FromStr;

use crate::ledger::{Ledger, Mode, Pid};
use crate::syscall::Abi;

/// What a process under a quota is told its machine's memory is. Written `quota` and `host`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MachineMemory {
    /// The quota that applies: `sysinfo(2)` answers with it (the default).
    #[default]
    Quota,
    /// The host's: `sysinfo(2)` is left to the kernel.
    Host,
}

impl MachineMemory {
    /// The name users write.
    pub fn name(self) -> &'static str {
        match self {
            MachineMemory::Quota => "quota",
            MachineMemory::Host => "host",
        }
    }
}

impl fmt::Display for MachineMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is neither `quota` nor `host`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "'{0}' is not a machine memory: write quota (programs see their quota as the machine's memory) or host (they \
     see the host's)"
)]
pub struct MachineMemoryError(pub String);

impl FromStr for MachineMemory {
    type Err = MachineMemoryError;

    /// `quota` or `host`, exactly (whitespace around is ignored).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "quota" => Ok(MachineMemory::Quota),
            "host" => Ok(MachineMemory::Host),
            other => Err(MachineMemoryError(other.to_string())),
        }
    }
}

/// A process's machine as heapcap tells it, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    /// The quota that applies: the lower of the process's quota and what the total leaves it.
    pub total: u64,
    /// `total` less the process's counted heap (its upper bound, what the quota is held against).
    pub free: u64,
}

/// The machine `pid` of `ledger` should see; `None` where no quota applies to it (audit mode, a
/// container runtime's own code before the program's exec, no quota at all): the kernel answers.
pub fn view(ledger: &Ledger, pid: Pid) -> Option<View> {
    if ledger.mode() != Mode::Enforce {
        return None;
    }
    let acct = ledger.account(pid).filter(|a| !a.runtime)?;
    let limits = ledger.limits();
    let own = acct.limit.or(limits.process);
    // The others' heap is the total's bound less this process's own.
    let others = ledger.total_bound().saturating_sub(acct.bound);
    let left = limits.total.map(|t| t.saturating_sub(others));
    let total = match (own, left) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b)?,
    };
    Some(View { total, free: total.saturating_sub(acct.bound) })
}

/// The kernel's `struct sysinfo`, field by field; memory figures in units of `mem_unit` bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SysInfo {
    pub uptime: i64,
    pub loads: [u64; 3],
    pub totalram: u64,
    pub freeram: u64,
    pub sharedram: u64,
    pub bufferram: u64,
    pub totalswap: u64,
    pub freeswap: u64,
    pub procs: u16,
    pub totalhigh: u64,
    pub freehigh: u64,
    pub mem_unit: u32,
}

/// `sizeof(struct sysinfo)` with 64-bit `long` (x86_64, x32, aarch64).
pub const NATIVE_SIZE: usize = 112;
/// `sizeof(struct compat_sysinfo)` (i386, arm).
pub const COMPAT_SIZE: usize = 64;

impl SysInfo {
    /// The kernel's answer `self` as a process that sees `view` as its machine is told it: `totalram`
    /// and `freeram` from the view, `sharedram` and `bufferram` no more than `totalram`, the rest
    /// as it is. Memory figures stay in the kernel's `mem_unit` (rounded down).
    pub fn seen_under(self, view: View) -> SysInfo {
        let unit = u64::from(self.mem_unit.max(1));
        let total = view.total / unit;
        SysInfo {
            totalram: total,
            freeram: (view.free / unit).min(total),
            sharedram: self.sharedram.min(total),
            bufferram: self.bufferram.min(total),
            // No high memory on the ABIs heapcap knows (64-bit kernels); never more than the total.
            totalhigh: self.totalhigh.min(total),
            freehigh: self.freehigh.min(total),
            mem_unit: self.mem_unit.max(1),
            ..self
        }
    }

    /// The bytes the kernel would copy to the caller of `abi`: `struct sysinfo` (64-bit `long`) or,
    /// for the 32-bit ABIs, `struct compat_sysinfo`, scaled as the kernel's compat `sysinfo` scales
    /// figures that do not fit 32 bits (a larger `mem_unit`, up to `page`). Padding is zero.
    pub fn encode(&self, abi: Abi, page: u64) -> Vec<u8> {
        if abi.is_32bit() {
            return self.encode_compat(page);
        }
        let mut out = Vec::with_capacity(NATIVE_SIZE);
        out.extend_from_slice(&self.uptime.to_ne_bytes());
        for v in self.loads {
            out.extend_from_slice(&v.to_ne_bytes());
        }
        for v in [self.totalram, self.freeram, self.sharedram, self.bufferram, self.totalswap, self.freeswap] {
            out.extend_from_slice(&v.to_ne_bytes());
        }
        out.extend_from_slice(&self.procs.to_ne_bytes());
        out.extend_from_slice(&[0; 6]); // pad, and alignment of the next long
        out.extend_from_slice(&self.totalhigh.to_ne_bytes());
        out.extend_from_slice(&self.freehigh.to_ne_bytes());
        out.extend_from_slice(&self.mem_unit.to_ne_bytes());
        out.resize(NATIVE_SIZE, 0);
        out
    }

    fn encode_compat(&self, page: u64) -> Vec<u8> {
        let mut s = *self;
        // The kernel's do_compat_sysinfo: scale down when a total does not fit in 32 bits.
        if s.totalram >> 32 != 0 || s.totalswap >> 32 != 0 {
            let mut shift = 0;
            while u64::from(s.mem_unit) < page && s.mem_unit != 0 {
                s.mem_unit <<= 1;
                shift += 1;
            }
            for v in [
                &mut s.totalram,
                &mut s.freeram,
                &mut s.sharedram,
                &mut s.bufferram,
                &mut s.totalswap,
                &mut s.freeswap,
                &mut s.totalhigh,
                &mut s.freehigh,
            ] {
                *v >>= shift;
            }
        }
        let mut out = Vec::with_capacity(COMPAT_SIZE);
        out.extend_from_slice(&(s.uptime as i32).to_ne_bytes());
        for v in s.loads {
            out.extend_from_slice(&(v as u32).to_ne_bytes());
        }
        for v in [s.totalram, s.freeram, s.sharedram, s.bufferram, s.totalswap, s.freeswap] {
            out.extend_from_slice(&(v as u32).to_ne_bytes());
        }
        out.extend_from_slice(&s.procs.to_ne_bytes());
        out.extend_from_slice(&[0; 2]);
        out.extend_from_slice(&(s.totalhigh as u32).to_ne_bytes());
        out.extend_from_slice(&(s.freehigh as u32).to_ne_bytes());
        out.extend_from_slice(&s.mem_unit.to_ne_bytes());
        out.resize(COMPAT_SIZE, 0);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Figure, Limits};

    const MIB: u64 = 1 << 20;
    const PAGE: u64 = 4096;

    fn host() -> SysInfo {
        SysInfo {
            uptime: 1000,
            loads: [1, 2, 3],
            totalram: 24 << 30,
            freeram: 18 << 30,
            sharedram: 9 * MIB,
            bufferram: 900 * MIB,
            totalswap: 0,
            freeswap: 0,
            procs: 180,
            totalhigh: 0,
            freehigh: 0,
            mem_unit: 1,
        }
    }

    fn ledger(limits: Limits, mode: Mode) -> Ledger {
        let mut l = Ledger::new(limits, mode, PAGE);
        assert!(l.admit(1, "a".into(), Figure::Upper(10 * MIB), false));
        assert!(l.admit(2, "b".into(), Figure::Upper(30 * MIB), false));
        assert!(l.admit(3, "runc".into(), Figure::Upper(80 * MIB), true));
        l
    }

    #[test]
    fn the_quota_that_applies_is_the_machine() {
        let l = ledger(Limits { process: Some(256 * MIB), total: None }, Mode::Enforce);
        assert_eq!(view(&l, 1), Some(View { total: 256 * MIB, free: 246 * MIB }));
        // The total leaves process 1 what process 2 does not hold: 100 - 30 = 70 MiB.
        let l = ledger(Limits { process: Some(256 * MIB), total: Some(100 * MIB) }, Mode::Enforce);
        assert_eq!(view(&l, 1), Some(View { total: 70 * MIB, free: 60 * MIB }));
        let l = ledger(Limits { process: None, total: Some(100 * MIB) }, Mode::Enforce);
        assert_eq!(view(&l, 2), Some(View { total: 90 * MIB, free: 60 * MIB }));
        // A process's own quota wins over the container's per-process one.
        let mut l = ledger(Limits { process: Some(256 * MIB), total: None }, Mode::Enforce);
        l.set_process_limit(1, Some(64 * MIB));
        assert_eq!(view(&l, 1), Some(View { total: 64 * MIB, free: 54 * MIB }));
    }

    #[test]
    fn no_quota_no_view() {
        let l = ledger(Limits::default(), Mode::Enforce);
        assert_eq!(view(&l, 1), None, "no quota");
        let l = ledger(Limits { process: Some(256 * MIB), total: None }, Mode::Audit);
        assert_eq!(view(&l, 1), None, "audit mode observes only");
        let l = ledger(Limits { process: Some(256 * MIB), total: None }, Mode::Enforce);
        assert_eq!(view(&l, 3), None, "a runtime's own code is never held");
        assert_eq!(view(&l, 4), None, "not accounted");
    }

    #[test]
    fn only_the_memory_totals_change() {
        let seen = host().seen_under(View { total: 256 * MIB, free: 200 * MIB });
        assert_eq!((seen.totalram, seen.freeram), (256 * MIB, 200 * MIB));
        assert_eq!(seen.bufferram, 256 * MIB, "never more than the total");
        assert_eq!((seen.uptime, seen.loads, seen.procs, seen.sharedram), (1000, [1, 2, 3], 180, 9 * MIB));
        let paged = SysInfo { mem_unit: 4096, ..host() }.seen_under(View { total: 256 * MIB, free: 300 * MIB });
        assert_eq!((paged.totalram, paged.freeram), (65536, 65536), "in the kernel's unit, free <= total");
    }

    #[test]
    fn native_layout_is_the_kernels() {
        let b = host().seen_under(View { total: 256 * MIB, free: 200 * MIB }).encode(Abi::X86_64, PAGE);
        assert_eq!(b.len(), NATIVE_SIZE);
        let word = |off: usize| u64::from_ne_bytes(b[off..off + 8].try_into().unwrap());
        assert_eq!((word(0), word(8), word(24)), (1000, 1, 3));
        assert_eq!((word(32), word(40), word(48)), (256 * MIB, 200 * MIB, 9 * MIB));
        assert_eq!(u16::from_ne_bytes([b[80], b[81]]), 180);
        assert_eq!(u32::from_ne_bytes(b[104..108].try_into().unwrap()), 1);
    }

    #[test]
    fn compat_layout_scales_what_does_not_fit() {
        let small = host().seen_under(View { total: 256 * MIB, free: 200 * MIB }).encode(Abi::I386, PAGE);
        assert_eq!(small.len(), COMPAT_SIZE);
        let word = |b: &[u8], off: usize| u32::from_ne_bytes(b[off..off + 4].try_into().unwrap());
        assert_eq!((word(&small, 16), word(&small, 20), word(&small, 52)), (256 << 20, 200 << 20, 1));
        let big = host().seen_under(View { total: 8 << 30, free: 6 << 30 }).encode(Abi::I386, PAGE);
        assert_eq!((word(&big, 16), word(&big, 20), word(&big, 52)), (2 << 20, 1536 << 10, 4096));
    }

    #[test]
    fn names() {
        assert_eq!("quota".parse(), Ok(MachineMemory::Quota));
        assert_eq!(" host ".parse(), Ok(MachineMemory::Host));
        let e = "Host".parse::<MachineMemory>().unwrap_err().to_string();
        assert!(e.starts_with("'Host' is not a machine memory: write quota"), "{e}");
        assert_eq!(MachineMemory::default().to_string(), "quota");
    }
}
