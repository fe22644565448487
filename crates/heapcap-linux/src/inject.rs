//! Installing the heap-notify filter into *another* process with ptrace, and taking its listener.
//!
//! For OCI `prestart`/`createRuntime` hooks: at that moment the container's init is paused inside
//! the runtime (blocked in `read` on a sync pipe), with all its capabilities and no filter of its
//! own. [`install_listener`] stops it (`PTRACE_SEIZE` + `PTRACE_INTERRUPT`), makes it run
//! `mmap`, `seccomp(SET_MODE_FILTER, NEW_LISTENER|TSYNC|TSYNC_ESRCH|WAIT_KILLABLE_RECV)`,
//! `close` and `munmap` through the `syscall` instruction it is stopped after, copies the
//! listener out with `pidfd_getfd` (the target never keeps it), restores its registers,
//! restarts its interrupted call and detaches. The target is traced with `PTRACE_O_EXITKILL`:
//! if the injector dies half-way, the target dies too rather than run with broken registers.
//!
//! x86_64 only; elsewhere [`install_listener`] returns [`InjectError::Unsupported`].

use std::os::fd::OwnedFd;

use crate::filter::Program;

/// Why the filter could not be installed into the target.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("installing the filter into a running process is only supported on x86_64, not {0}: use the container's seccomp profile with listenerPath (heapcap-oci) or heapcap-runtime instead")]
    Unsupported(&'static str),
    #[error("cannot open process {pid}")]
    Open {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot attach to process {pid} with ptrace")]
    Attach {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("ptrace {op} on process {pid} failed")]
    Ptrace {
        op: &'static str,
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("process {pid} is not stopped after a system call instruction (found {found:02x?}); it is not paused where an OCI runtime pauses a container's init")]
    NotInSyscall { pid: u32, found: [u8; 2] },
    #[error("process {pid} exited while the filter was being installed")]
    Exited { pid: u32 },
    #[error("process {pid}: cannot access its memory")]
    Memory {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("process {pid}: {call}() failed inside it")]
    Remote {
        pid: u32,
        call: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("process {pid} already has a seccomp filter with a listener: only one listener per filter chain (is it already under heapcap, or does its profile use SCMP_ACT_NOTIFY?)")]
    Busy { pid: u32 },
    #[error("process {pid}: cannot copy the listener fd out of it")]
    GetFd {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("the BPF program is too large ({0} instructions)")]
    TooLarge(usize),
}

/// What [`install_listener`] got.
#[derive(Debug)]
pub struct Injected {
    /// The filter's listener; only the caller holds it.
    pub listener: OwnedFd,
    /// How long the target was stopped.
    pub stopped: std::time::Duration,
}

/// Install `program` into every thread of process `pid` and return its listener.
/// The target must be stopped in (or just after) a system call, as an OCI runtime's init is
/// while it runs `prestart`/`createRuntime` hooks.
pub fn install_listener(pid: u32, program: &Program) -> Result<Injected, InjectError> {
    imp::install_listener(pid, program)
}

#[cfg(not(target_arch = "x86_64"))]
mod imp {
    use super::*;

    pub fn install_listener(_pid: u32, _program: &Program) -> Result<Injected, InjectError> {
        Err(InjectError::Unsupported(std::env::consts::ARCH))
    }
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::fs::File;
    use std::io;
    use std::os::fd::{OwnedFd, RawFd};
    use std::os::unix::fs::FileExt;
    use std::time::Instant;

    use super::{InjectError, Injected};
    use crate::filter::Program;
    use crate::pidfd::Pidfd;

    const SYSCALL_INSN: [u8; 2] = [0x0f, 0x05];
    const ERESTARTSYS: i64 = 512;
    const ERESTARTNOINTR: i64 = 513;
    const ERESTARTNOHAND: i64 = 514;
    const ERESTART_RESTARTBLOCK: i64 = 516;
    /// Steps a signal may interrupt before we give up (signals are re-sent at detach).
    const MAX_RETRIES: usize = 64;

    /// A seized, stopped target; detaches (restoring its registers if saved) when dropped.
    struct Tracee {
        pid: libc::pid_t,
        upid: u32,
        saved: Option<libc::user_regs_struct>,
        /// A signal that arrived while we held the target, delivered at detach.
        pending: libc::c_int,
    }

    fn ptrace(req: libc::c_uint, pid: libc::pid_t, addr: usize, data: usize) -> io::Result<libc::c_long> {
        // SAFETY: every request used here (SEIZE, INTERRUPT, GETREGS/SETREGS with a pointer to a
        // live user_regs_struct, SINGLESTEP, DETACH) takes integers or a pointer that the caller
        // keeps valid for the call; ptrace never keeps the pointer.
        let rc = unsafe { libc::ptrace(req, pid, addr as *mut libc::c_void, data as *mut libc::c_void) };
        if rc == -1 {
            Err(crate::last_error())
        } else {
            Ok(rc)
        }
    }

    impl Tracee {
        fn err(&self, op: &'static str) -> impl FnOnce(io::Error) -> InjectError + '_ {
            move |source| InjectError::Ptrace { op, pid: self.upid, source }
        }

        /// Wait for the next stop of the target; its wait status.
        fn wait(&mut self) -> Result<libc::c_int, InjectError> {
            let mut status = 0;
            loop {
                // SAFETY: status is a valid out-pointer; __WALL waits for our tracee whatever thread it is.
                let rc = unsafe { libc::waitpid(self.pid, &mut status, libc::__WALL) };
                if rc == self.pid {
                    break;
                }
                let e = crate::last_error();
                if e.raw_os_error() != Some(libc::EINTR) {
                    return Err(InjectError::Ptrace { op: "waitpid", pid: self.upid, source: e });
                }
            }
            if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                self.saved = None;
                return Err(InjectError::Exited { pid: self.upid });
            }
            Ok(status)
        }

        /// Stop the target in a ptrace event-stop (`PTRACE_INTERRUPT`).
        fn interrupt(&mut self) -> Result<(), InjectError> {
            ptrace(libc::PTRACE_INTERRUPT, self.pid, 0, 0).map_err(self.err("PTRACE_INTERRUPT"))?;
            for _ in 0..MAX_RETRIES {
                let status = self.wait()?;
                let sig = libc::WSTOPSIG(status);
                if status >> 16 == libc::PTRACE_EVENT_STOP {
                    return Ok(());
                }
                // A signal-delivery stop came first: keep the signal for later, and go on to
                // the interrupt's own stop.
                self.remember(sig);
                ptrace(libc::PTRACE_CONT, self.pid, 0, 0).map_err(self.err("PTRACE_CONT"))?;
            }
            Err(InjectError::Ptrace { op: "PTRACE_INTERRUPT", pid: self.upid, source: io::Error::other("no stop") })
        }

        fn remember(&mut self, sig: libc::c_int) {
            if sig != libc::SIGTRAP && self.pending == 0 {
                self.pending = sig;
            }
        }

        fn regs(&self) -> Result<libc::user_regs_struct, InjectError> {
            // SAFETY: user_regs_struct is plain data; all-zero is a valid value.
            let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
            ptrace(libc::PTRACE_GETREGS, self.pid, 0, &mut regs as *mut _ as usize).map_err(self.err("GETREGS"))?;
            Ok(regs)
        }

        fn set_regs(&self, regs: &libc::user_regs_struct) -> Result<(), InjectError> {
            ptrace(libc::PTRACE_SETREGS, self.pid, 0, regs as *const _ as usize).map_err(self.err("SETREGS"))?;
            Ok(())
        }

        /// Run one system call in the target through the `syscall` instruction at `insn`.
        fn syscall(&mut self, insn: u64, nr: i64, args: [u64; 6]) -> Result<i64, InjectError> {
            let base = self.saved.expect("registers saved before injecting");
            let mut regs = base;
            regs.rax = nr as u64;
            (regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9) =
                (args[0], args[1], args[2], args[3], args[4], args[5]);
            regs.rip = insn;
            // Not in a system call: the kernel must not apply restart logic to these registers.
            regs.orig_rax = u64::MAX;
            for _ in 0..MAX_RETRIES {
                self.set_regs(&regs)?;
                ptrace(libc::PTRACE_SINGLESTEP, self.pid, 0, 0).map_err(self.err("SINGLESTEP"))?;
                let status = self.wait()?;
                let after = self.regs()?;
                if after.rip == insn + 2 {
                    // The call ran (a signal that stopped it on the way out is kept for later).
                    self.remember(libc::WSTOPSIG(status));
                    return Ok(after.rax as i64);
                }
                // A signal stopped it before the instruction ran: keep it and try again.
                self.remember(libc::WSTOPSIG(status));
            }
            Err(InjectError::Ptrace {
                op: "SINGLESTEP",
                pid: self.upid,
                source: io::Error::other("signals keep arriving"),
            })
        }

        fn remote(&mut self, insn: u64, call: &'static str, nr: i64, args: [u64; 6]) -> Result<u64, InjectError> {
            let rc = self.syscall(insn, nr, args)?;
            if (-4095..0).contains(&rc) {
                return Err(InjectError::Remote {
                    pid: self.upid,
                    call,
                    source: io::Error::from_raw_os_error(-rc as i32),
                });
            }
            Ok(rc as u64)
        }

        /// Put the saved registers back, restarting the call the interrupt broke off.
        fn restore(&mut self) -> Result<(), InjectError> {
            let Some(mut regs) = self.saved else { return Ok(()) };
            if regs.orig_rax as i64 >= 0 {
                match -(regs.rax as i64) {
                    ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
                        regs.rax = regs.orig_rax;
                        regs.rip -= 2;
                        regs.orig_rax = u64::MAX;
                    }
                    ERESTART_RESTARTBLOCK => {
                        regs.rax = libc::SYS_restart_syscall as u64;
                        regs.rip -= 2;
                        regs.orig_rax = u64::MAX;
                    }
                    _ => {}
                }
            }
            self.set_regs(&regs)?;
            self.saved = None;
            Ok(())
        }
    }

    impl Drop for Tracee {
        fn drop(&mut self) {
            // Also on every error path: registers back (restarting the interrupted call), then
            // detach, so the target is never left stopped or traced. A signal that arrived
            // meanwhile is delivered now.
            let _ = self.restore();
            let _ = ptrace(libc::PTRACE_DETACH, self.pid, 0, self.pending as usize);
        }
    }

    fn memory(pid: u32) -> Result<File, InjectError> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .map_err(|source| InjectError::Memory { pid, source })
    }

    fn pidfd_getfd(pidfd: &Pidfd, fd: RawFd) -> io::Result<OwnedFd> {
        pidfd.get_fd(fd)
    }

    pub fn install_listener(pid: u32, program: &Program) -> Result<Injected, InjectError> {
        let bpf = program.to_bytes();
        let len = u16::try_from(program.len()).map_err(|_| InjectError::TooLarge(program.len()))?;
        let tpid = libc::pid_t::try_from(pid).map_err(|_| InjectError::Exited { pid })?;
        let pidfd = Pidfd::open(pid).map_err(|source| InjectError::Open { pid, source })?;
        ptrace(libc::PTRACE_SEIZE, tpid, 0, libc::PTRACE_O_EXITKILL as usize)
            .map_err(|source| InjectError::Attach { pid, source })?;
        let start = Instant::now();
        let mut t = Tracee { pid: tpid, upid: pid, saved: None, pending: 0 };
        t.interrupt()?;
        let saved = t.regs()?;
        t.saved = Some(saved);
        let mem = memory(pid)?;
        let insn = saved.rip.wrapping_sub(2);
        let mut found = [0u8; 2];
        mem.read_exact_at(&mut found, insn).map_err(|source| InjectError::Memory { pid, source })?;
        if found != SYSCALL_INSN {
            return Err(InjectError::NotInSyscall { pid, found });
        }

        // Scratch memory: never below rsp (a goroutine stack in runc's init is small).
        let size = (16 + bpf.len()).next_multiple_of(4096) as u64;
        let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
        let scratch = t.remote(insn, "mmap", libc::SYS_mmap, [0, size, prot, flags, u64::MAX, 0])?;
        let result = (|| {
            // struct sock_fprog { unsigned short len; struct sock_filter *filter; } at scratch,
            // the program right after it.
            let mut block = vec![0u8; 16];
            block[..2].copy_from_slice(&len.to_ne_bytes());
            block[8..16].copy_from_slice(&(scratch + 16).to_ne_bytes());
            block.extend_from_slice(&bpf);
            mem.write_all_at(&block, scratch).map_err(|source| InjectError::Memory { pid, source })?;

            let mut bits: u64 = libc::SECCOMP_FILTER_FLAG_NEW_LISTENER
                | libc::SECCOMP_FILTER_FLAG_TSYNC
                | libc::SECCOMP_FILTER_FLAG_TSYNC_ESRCH
                | libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV;
            let fd = loop {
                let args = [libc::SECCOMP_SET_MODE_FILTER as u64, bits, scratch, 0, 0, 0];
                match t.remote(insn, "seccomp", libc::SYS_seccomp, args) {
                    Ok(fd) => break fd,
                    Err(InjectError::Remote { source, .. }) if source.raw_os_error() == Some(libc::EBUSY) => {
                        return Err(InjectError::Busy { pid });
                    }
                    // Kernels before 5.19 do not know WAIT_KILLABLE_RECV: go on without it.
                    Err(InjectError::Remote { source, .. })
                        if source.raw_os_error() == Some(libc::EINVAL)
                            && bits & libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV != 0 =>
                    {
                        bits &= !libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV;
                    }
                    Err(e) => return Err(e),
                }
            };
            let listener = pidfd_getfd(&pidfd, fd as RawFd).map_err(|source| InjectError::GetFd { pid, source });
            // The container never keeps its own listener.
            let closed = t.remote(insn, "close", libc::SYS_close, [fd, 0, 0, 0, 0, 0]);
            let listener = listener?;
            closed?;
            Ok(listener)
        })();
        let unmapped = t.remote(insn, "munmap", libc::SYS_munmap, [scratch, size, 0, 0, 0, 0]);
        let listener = result?;
        unmapped?;
        t.restore()?;
        drop(t);
        Ok(Injected { listener, stopped: start.elapsed() })
    }
}
