//! The heap-notify seccomp program: built once with libseccomp from [`heapcap_policy::rules`],
//! exported as BPF, and loaded with the raw `seccomp(2)` call so heapcap picks the flags.

use std::io::{Read, Seek};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use heapcap_policy::ledger::Counting;
pub use heapcap_policy::rules::Extra;
use heapcap_policy::rules::{self, ArgTest, NotifyRule};
use libseccomp::{ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall};

/// Why the program could not be built.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("libseccomp could not set up a filter for {arch:?}")]
    Context {
        arch: ScmpArch,
        #[source]
        source: libseccomp::error::SeccompError,
    },
    #[error("libseccomp refused the rule for {syscall} on {arch:?}")]
    Rule {
        syscall: &'static str,
        arch: ScmpArch,
        #[source]
        source: libseccomp::error::SeccompError,
    },
    #[error("libseccomp could not merge the native and compat filters")]
    Merge(#[source] libseccomp::error::SeccompError),
    #[error("could not export the BPF program")]
    Export(#[source] std::io::Error),
    #[error("libseccomp could not export the BPF program")]
    ExportBpf(#[source] libseccomp::error::SeccompError),
}

/// A classic-BPF seccomp program.
#[derive(Debug, Clone)]
pub struct Program {
    filters: Vec<libc::sock_filter>,
}

fn compat_arch() -> Option<ScmpArch> {
    match ScmpArch::native() {
        ScmpArch::X8664 => Some(ScmpArch::X86),
        ScmpArch::Aarch64 => Some(ScmpArch::Arm),
        _ => None,
    }
}

fn context(arch: ScmpArch, rules: &[NotifyRule], extra: &[ScmpArch]) -> Result<ScmpFilterContext, FilterError> {
    let ctx_err = |source| FilterError::Context { arch, source };
    let mut ctx = ScmpFilterContext::new(ScmpAction::Allow).map_err(ctx_err)?;
    // An ABI heapcap does not know passes untouched rather than breaking the program.
    ctx.set_act_badarch(ScmpAction::Allow).map_err(ctx_err)?;
    if arch != ScmpArch::native() {
        ctx.add_arch(arch).map_err(ctx_err)?;
        ctx.remove_arch(ScmpArch::native()).map_err(ctx_err)?;
    }
    for &a in extra {
        ctx.add_arch(a).map_err(ctx_err)?;
    }
    for rule in rules {
        // Not every ABI has every call (arm has no old mmap): skip what does not exist there.
        if ScmpSyscall::from_name_by_arch(rule.syscall, arch).is_err() {
            continue;
        }
        // Rules take native numbering; libseccomp translates by name for each arch.
        let syscall = ScmpSyscall::from_name(rule.syscall).map_err(|source| FilterError::Rule {
            syscall: rule.syscall,
            arch,
            source,
        })?;
        let cmps: Vec<ScmpArgCompare> = rule
            .tests
            .iter()
            .map(|t| match *t {
                ArgTest::NotEqual { index, value } => ScmpArgCompare::new(index, ScmpCompareOp::NotEqual, value),
                ArgTest::MaskedEqual { index, mask, value } => {
                    ScmpArgCompare::new(index, ScmpCompareOp::MaskedEqual(mask), value)
                }
            })
            .collect();
        ctx.add_rule_conditional(ScmpAction::Notify, syscall, &cmps).map_err(|source| FilterError::Rule {
            syscall: rule.syscall,
            arch,
            source,
        })?;
    }
    Ok(ctx)
}

impl Program {
    /// The program that sends heap growth to a listener: native ABI (and x32 on x86_64)
    /// plus the 32-bit compat ABI.
    pub fn heap_notify() -> Result<Program, FilterError> {
        Self::heap_notify_for(Counting::Heap)
    }

    /// The program for `counting`: strict mode also sends every writable `mmap` and `shmat`.
    pub fn heap_notify_for(counting: Counting) -> Result<Program, FilterError> {
        Self::heap_notify_with(counting, Extra::default())
    }

    /// [`Program::heap_notify_for`], sending `extra` calls too.
    pub fn heap_notify_with(counting: Counting, extra: Extra) -> Result<Program, FilterError> {
        let (native_rules, compat_rules) = rules::for_counting(counting);
        let native = ScmpArch::native();
        let arches: &[ScmpArch] = if native == ScmpArch::X8664 { &[ScmpArch::X32] } else { &[] };
        let mut ctx = context(native, &extra.with(native_rules), arches)?;
        if let Some(compat) = compat_arch() {
            ctx.merge(context(compat, &extra.with(compat_rules), &[])?).map_err(FilterError::Merge)?;
        }
        Self::export(&ctx)
    }

    fn export(ctx: &ScmpFilterContext) -> Result<Program, FilterError> {
        let mut file = memfd()?;
        ctx.export_bpf(&file).map_err(FilterError::ExportBpf)?;
        file.rewind().map_err(FilterError::Export)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(FilterError::Export)?;
        let filters = bytes
            .chunks_exact(8)
            .map(|c| libc::sock_filter {
                code: u16::from_ne_bytes([c[0], c[1]]),
                jt: c[2],
                jf: c[3],
                k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect();
        Ok(Program { filters })
    }

    /// Number of BPF instructions.
    pub fn len(&self) -> usize {
        self.filters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// The program as raw bytes (8 per instruction, native endian): what an injector writes
    /// into another process.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.filters.len() * 8);
        for f in &self.filters {
            out.extend_from_slice(&f.code.to_ne_bytes());
            out.extend_from_slice(&[f.jt, f.jf]);
            out.extend_from_slice(&f.k.to_ne_bytes());
        }
        out
    }

    /// Load the program into the *calling* thread (and, with [`LoadFlags::tsync`], its whole
    /// process) and return the new listener fd. Never call it in a supervisor: it is for a
    /// freshly forked child before `execve`.
    ///
    /// Async-signal-safe: only raw system calls, no allocation, so it may run between `fork`
    /// and `exec` of a multi-threaded parent.
    pub fn load_with_listener(&self, flags: LoadFlags) -> Result<RawFd, std::io::Error> {
        let prog = libc::sock_fprog { len: self.filters.len() as u16, filter: self.filters.as_ptr().cast_mut() };
        if flags.no_new_privs {
            // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) takes integer arguments only.
            if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                return Err(crate::last_error());
            }
        }
        let mut bits = libc::SECCOMP_FILTER_FLAG_NEW_LISTENER | libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV;
        if flags.tsync {
            bits |= libc::SECCOMP_FILTER_FLAG_TSYNC | libc::SECCOMP_FILTER_FLAG_TSYNC_ESRCH;
        }
        loop {
            // SAFETY: `prog` points at `self.filters`, which outlives the call; the kernel copies
            // the program before returning. The flags are valid SECCOMP_FILTER_FLAG_* bits.
            let fd = unsafe {
                libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, bits, &prog as *const libc::sock_fprog)
            };
            if fd >= 0 {
                return Ok(fd as RawFd);
            }
            let err = crate::last_error();
            // Kernels before 5.19 do not know WAIT_KILLABLE_RECV: go on without it.
            if err.raw_os_error() == Some(libc::EINVAL) && bits & libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV != 0 {
                bits &= !libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV;
                continue;
            }
            return Err(err);
        }
    }
}

/// How to load the program.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadFlags {
    /// Set `PR_SET_NO_NEW_PRIVS` first (required without `CAP_SYS_ADMIN`).
    pub no_new_privs: bool,
    /// Apply to every thread of the process.
    pub tsync: bool,
}

fn memfd() -> Result<std::fs::File, FilterError> {
    // SAFETY: the name is a NUL-terminated static string; MFD_CLOEXEC is a valid flag.
    let fd = unsafe { libc::memfd_create(c"heapcap-bpf".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(FilterError::Export(crate::last_error()));
    }
    // SAFETY: memfd_create just returned this fd and nothing else owns it.
    Ok(std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_program() {
        let p = Program::heap_notify().expect("libseccomp builds the heap-notify program");
        assert!(p.len() > 10 && p.len() < 400, "{} instructions", p.len());
        assert_eq!(p.to_bytes().len(), p.len() * 8);
        let strict = Program::heap_notify_for(Counting::Strict).expect("libseccomp builds the strict program");
        assert!(strict.len() > 10 && strict.len() < 400, "{} instructions", strict.len());
        let more = Program::heap_notify_with(Counting::Heap, Extra { machine: true }).expect("with sysinfo");
        assert!(more.len() > p.len(), "sysinfo adds its test");
    }
}
