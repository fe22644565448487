//! The seccomp notify rules, as data.
//!
//! Only calls that can grow the heap leave the kernel: `mmap` of files, `PROT_NONE` reservations,
//! `mprotect` to read-only, `munmap` and `brk(0)` stay on the fast path. The Linux layer turns
//! these rules into BPF with libseccomp; the OCI spec writer turns them into `linux.seccomp`.

use crate::ledger::Counting;
use crate::syscall::{
    IPC_SHMAT, MAP_ANONYMOUS, MAP_DROPPABLE, MAP_GROWSDOWN, MAP_PRIVATE, MAP_TYPE, PROT_WRITE, SHM_RDONLY,
};

/// One argument test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgTest {
    /// `args[index] != value`.
    NotEqual { index: u32, value: u64 },
    /// `args[index] & mask == value`.
    MaskedEqual { index: u32, mask: u64, value: u64 },
}

/// Notify when `syscall` is called and every test holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotifyRule {
    pub syscall: &'static str,
    pub tests: &'static [ArgTest],
}

const WRITABLE_ARG2: ArgTest = ArgTest::MaskedEqual { index: 2, mask: PROT_WRITE, value: PROT_WRITE };
const ANON_PRIVATE_ARG3: ArgTest =
    ArgTest::MaskedEqual { index: 3, mask: MAP_TYPE | MAP_ANONYMOUS, value: MAP_PRIVATE | MAP_ANONYMOUS };
const ANON_DROPPABLE_ARG3: ArgTest =
    ArgTest::MaskedEqual { index: 3, mask: MAP_TYPE | MAP_ANONYMOUS, value: MAP_DROPPABLE | MAP_ANONYMOUS };

/// Any `MAP_GROWSDOWN` mapping, writable or not (`mprotect` can make it writable later).
const GROWSDOWN_ARG3: ArgTest = ArgTest::MaskedEqual { index: 3, mask: MAP_GROWSDOWN, value: MAP_GROWSDOWN };

const SHM_WRITABLE_ARG2: ArgTest = ArgTest::MaskedEqual { index: 2, mask: SHM_RDONLY, value: 0 };
/// i386 `ipc(2)` with `call` SHMAT, version 0 (the version sits in the upper 16 bits).
const IPC_SHMAT_ARG0: ArgTest = ArgTest::MaskedEqual { index: 0, mask: 0xffff_ffff, value: IPC_SHMAT };

/// Rules for ABIs whose `mmap` takes its arguments in registers (x86_64, x32, aarch64).
pub const NATIVE: &[NotifyRule] = &[
    NotifyRule { syscall: "brk", tests: &[ArgTest::NotEqual { index: 0, value: 0 }] },
    NotifyRule { syscall: "mmap", tests: &[WRITABLE_ARG2, ANON_PRIVATE_ARG3] },
    NotifyRule { syscall: "mmap", tests: &[WRITABLE_ARG2, ANON_DROPPABLE_ARG3] },
    NotifyRule { syscall: "mremap", tests: &[] },
    NotifyRule { syscall: "mprotect", tests: &[WRITABLE_ARG2] },
    NotifyRule { syscall: "pkey_mprotect", tests: &[WRITABLE_ARG2] },
    NotifyRule { syscall: "execve", tests: &[] },
    NotifyRule { syscall: "execveat", tests: &[] },
];

/// Rules for the 32-bit compat ABIs (i386, arm): `mmap2` in registers, and on i386 the old
/// `mmap` whose arguments sit in memory, so every call of it is notified.
pub const COMPAT: &[NotifyRule] = &[
    NotifyRule { syscall: "brk", tests: &[ArgTest::NotEqual { index: 0, value: 0 }] },
    NotifyRule { syscall: "mmap2", tests: &[WRITABLE_ARG2, ANON_PRIVATE_ARG3] },
    NotifyRule { syscall: "mmap2", tests: &[WRITABLE_ARG2, ANON_DROPPABLE_ARG3] },
    NotifyRule { syscall: "mmap", tests: &[] },
    NotifyRule { syscall: "mremap", tests: &[] },
    NotifyRule { syscall: "mprotect", tests: &[WRITABLE_ARG2] },
    NotifyRule { syscall: "pkey_mprotect", tests: &[WRITABLE_ARG2] },
    NotifyRule { syscall: "execve", tests: &[] },
    NotifyRule { syscall: "execveat", tests: &[] },
];

/// Sent too where a process should see its quota as its machine's memory
/// ([`crate::machine`]): `sysinfo`, on every ABI. Nothing else reads it, so the memory calls'
/// path is the same with or without it.
pub const MACHINE: &[NotifyRule] = &[NotifyRule { syscall: "sysinfo", tests: &[] }];

/// Calls a filter sends besides heap growth.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extra {
    /// `sysinfo` ([`MACHINE`]): the process is to see its quota as its machine's memory.
    pub machine: bool,
}

impl Extra {
    /// What a container (or a `heapcap run` tree) with `settings` needs sent.
    pub fn of(settings: &crate::settings::Settings) -> Extra {
        Extra { machine: settings.quota_as_machine() }
    }

    /// `base` and the extra rules.
    pub fn with(self, base: &[NotifyRule]) -> Vec<NotifyRule> {
        let machine = if self.machine { MACHINE } else { &[] };
        base.iter().chain(machine).copied().collect()
    }
}

/// Strict mode's rules for the native ABIs: every writable `mmap` (a file or shared mapping may
/// count, and which kind it is shows only once it is mapped), every `MAP_GROWSDOWN` `mmap` (such
/// a mapping grows with no call at all: strict refuses it), and every writable `shmat`.
pub const STRICT_NATIVE: &[NotifyRule] = &[
    NotifyRule { syscall: "brk", tests: &[ArgTest::NotEqual { index: 0, value: 0 }] },
    NotifyRule { syscall: "mmap", tests: &[WRITABLE_ARG2] },
    NotifyRule { syscall: "mmap", tests: &[GROWSDOWN_ARG3] },
    NotifyRule { syscall: "mremap", tests: &[] },
    NotifyRule { syscall: "mprotect", tests: &[WRITABLE_ARG2] },
    NotifyRule { syscall: "pkey_mprotect", tests: &[WRITABLE_ARG2] },
    NotifyRule { syscall: "shmat", tests: &[SHM_WRITABLE_ARG2] },
    NotifyRule { syscall: "execve", tests: &[] },
    NotifyRule { syscall: "execveat", tests: &[] },
];

/// Strict mode's rules for the 32-bit compat ABIs: as [`COMPAT`], with every writable or
/// `MAP_GROWSDOWN` `mmap2`, `shmat`, and i386's `ipc(SHMAT)` (whose flags are in registers too).
pub const STRICT_COMPAT: &[NotifyRule] = &[
    NotifyRule { syscall: "brk", tests: &[ArgTest::NotEqual { index: 0, value: 0 }] },
    NotifyRule { syscall: "mmap2", tests: &[WRITABLE_ARG2] },
    NotifyRule { syscall: "mmap2", tests: &[GROWSDOWN_ARG3] },
    NotifyRule { syscall: "mmap", tests: &[] },
    NotifyRule { syscall: "mremap", tests: &[] },
    NotifyRule { syscall: "mprotect", tests: &[WRITABLE_ARG2] },
    NotifyRule { syscall: "pkey_mprotect", tests: &[WRITABLE_ARG2] },
    NotifyRule { syscall: "shmat", tests: &[SHM_WRITABLE_ARG2] },
    NotifyRule { syscall: "ipc", tests: &[IPC_SHMAT_ARG0, SHM_WRITABLE_ARG2] },
    NotifyRule { syscall: "execve", tests: &[] },
    NotifyRule { syscall: "execveat", tests: &[] },
];

/// The native and compat rules for `counting`.
pub fn for_counting(counting: Counting) -> (&'static [NotifyRule], &'static [NotifyRule]) {
    match counting {
        Counting::Heap => (NATIVE, COMPAT),
        Counting::Strict => (STRICT_NATIVE, STRICT_COMPAT),
    }
}
