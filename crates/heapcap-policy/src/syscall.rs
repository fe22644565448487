//! Which system calls can grow a process's heap, and what each one asks for.
//!
//! The numbers are the kernel's, per ABI, as they appear in `struct seccomp_data`
//! (`arch` is an `AUDIT_ARCH_*` value; x32 calls carry bit 30 in `nr`).

/// `AUDIT_ARCH_X86_64`.
pub const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
/// `AUDIT_ARCH_I386`.
pub const AUDIT_ARCH_I386: u32 = 0x4000_0003;
/// `AUDIT_ARCH_AARCH64`.
pub const AUDIT_ARCH_AARCH64: u32 = 0xC000_00B7;
/// `AUDIT_ARCH_ARM`.
pub const AUDIT_ARCH_ARM: u32 = 0x4000_0028;
const X32_SYSCALL_BIT: i32 = 0x4000_0000;

pub const PROT_WRITE: u64 = 0x2;
pub const MAP_SHARED: u64 = 0x01;
pub const MAP_PRIVATE: u64 = 0x02;
pub const MAP_TYPE: u64 = 0x0f;
pub const MAP_DROPPABLE: u64 = 0x08;
pub const MAP_FIXED: u64 = 0x10;
pub const MAP_ANONYMOUS: u64 = 0x20;
pub const MAP_FIXED_NOREPLACE: u64 = 0x10_0000;
/// A mapping the kernel extends downwards at each fault just below it (x86 and arm value).
pub const MAP_GROWSDOWN: u64 = 0x0100;
pub const MREMAP_MAYMOVE: u64 = 1;
pub const MREMAP_DONTUNMAP: u64 = 4;
pub const PROT_READ: u64 = 0x1;
/// `shmat`'s read-only flag.
pub const SHM_RDONLY: u64 = 0o10000;
/// i386's `ipc(2)` multiplexer: the `call` of `shmat`.
pub const IPC_SHMAT: u64 = 21;

use crate::ledger::Counting;

/// The system-call conventions heapcap knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Abi {
    X86_64,
    X32,
    I386,
    Aarch64,
    Arm,
}

impl Abi {
    /// The ABI of a notification, or `None` for one heapcap does not know (let it through).
    pub fn of(arch: u32, nr: i32) -> Option<Abi> {
        match arch {
            AUDIT_ARCH_X86_64 if nr & X32_SYSCALL_BIT != 0 => Some(Abi::X32),
            AUDIT_ARCH_X86_64 => Some(Abi::X86_64),
            AUDIT_ARCH_I386 => Some(Abi::I386),
            AUDIT_ARCH_AARCH64 => Some(Abi::Aarch64),
            AUDIT_ARCH_ARM => Some(Abi::Arm),
            _ => None,
        }
    }

    /// Arguments are 32 bits wide.
    pub fn is_32bit(self) -> bool {
        matches!(self, Abi::I386 | Abi::Arm)
    }

    fn table(self) -> &'static [(i32, Kind)] {
        use Kind::*;
        match self {
            Abi::X86_64 => &[
                (9, Mmap),
                (10, Mprotect),
                (12, Brk),
                (25, Mremap),
                (30, Shmat),
                (59, Exec),
                (322, Exec),
                (329, Mprotect),
                (99, Sysinfo),
            ],
            Abi::X32 => &[
                (9, Mmap),
                (10, Mprotect),
                (12, Brk),
                (25, Mremap),
                (30, Shmat),
                (520, Exec),
                (545, Exec),
                (329, Mprotect),
                (99, Sysinfo),
            ],
            Abi::I386 => &[
                (45, Brk),
                (90, OldMmap),
                (125, Mprotect),
                (163, Mremap),
                (192, Mmap),
                (11, Exec),
                (358, Exec),
                (380, Mprotect),
                (116, Sysinfo),
                (397, Shmat),
                (117, Ipc),
            ],
            Abi::Aarch64 => &[
                (196, Shmat),
                (214, Brk),
                (216, Mremap),
                (221, Exec),
                (222, Mmap),
                (226, Mprotect),
                (281, Exec),
                (288, Mprotect),
                (179, Sysinfo),
            ],
            Abi::Arm => &[
                (45, Brk),
                (125, Mprotect),
                (163, Mremap),
                (192, Mmap),
                (11, Exec),
                (305, Shmat),
                (387, Exec),
                (394, Mprotect),
                (116, Sysinfo),
            ],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Brk,
    Mmap,
    OldMmap,
    Mremap,
    Mprotect,
    Shmat,
    /// i386's `ipc(2)`: only its `shmat` call is looked at.
    Ipc,
    Exec,
    Sysinfo,
}

/// A memory call, decoded from a notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemCall {
    /// `brk(addr)`.
    Brk { addr: u64 },
    /// `mmap`/`mmap2` with its arguments (offset left out: it never changes the size).
    Mmap { addr: u64, len: u64, prot: u64, flags: u64 },
    /// i386 `old_mmap(struct mmap_arg_struct *)`: the arguments are in the caller's memory.
    OldMmap { args_ptr: u64 },
    /// `mremap(old_addr, old_len, new_len, flags, new_addr)`.
    Mremap { old_addr: u64, old_len: u64, new_len: u64, flags: u64 },
    /// `mprotect`/`pkey_mprotect`.
    Mprotect { addr: u64, len: u64, prot: u64 },
    /// `shmat(shmid, addr, flags)` (and i386's `ipc(SHMAT, ...)`): the size is the segment's,
    /// known only from the segment ([`MemCall::from_shmat`]).
    Shmat { shmid: u64, addr: u64, flags: u64 },
    /// `execve`/`execveat`: the process is about to get a new address space.
    Exec,
    /// `sysinfo(struct sysinfo *)`: notified only where the process is to see its quota as its
    /// machine's memory ([`crate::machine`]); it never grows the heap.
    Sysinfo { buf: u64 },
}

impl MemCall {
    /// The call's name, for metrics and logs.
    pub fn name(&self) -> &'static str {
        match self {
            MemCall::Brk { .. } => "brk",
            MemCall::Mmap { .. } => "mmap",
            MemCall::OldMmap { .. } => "old_mmap",
            MemCall::Mremap { .. } => "mremap",
            MemCall::Mprotect { .. } => "mprotect",
            MemCall::Shmat { .. } => "shmat",
            MemCall::Exec => "execve",
            MemCall::Sysinfo { .. } => "sysinfo",
        }
    }

    /// An `mmap` of memory that grows by itself (`MAP_GROWSDOWN`): the kernel extends such a
    /// mapping at each page fault below it, with no call that could be refused.
    pub fn grows_by_itself(&self) -> bool {
        matches!(*self, MemCall::Mmap { flags, .. } if flags & MAP_GROWSDOWN != 0)
    }

    /// Decode a notification's syscall. `None`: not a memory call heapcap looks at.
    pub fn decode(arch: u32, nr: i32, args: [u64; 6]) -> Option<MemCall> {
        let abi = Abi::of(arch, nr)?;
        let a = if abi.is_32bit() { args.map(|a| a & 0xffff_ffff) } else { args };
        let (_, kind) = abi.table().iter().find(|(n, _)| *n == nr & !X32_SYSCALL_BIT || *n == nr)?;
        Some(match kind {
            Kind::Brk => MemCall::Brk { addr: a[0] },
            Kind::Mmap => MemCall::Mmap { addr: a[0], len: a[1], prot: a[2], flags: a[3] },
            Kind::OldMmap => MemCall::OldMmap { args_ptr: a[0] },
            Kind::Mremap => MemCall::Mremap { old_addr: a[0], old_len: a[1], new_len: a[2], flags: a[3] },
            Kind::Mprotect => MemCall::Mprotect { addr: a[0], len: a[1], prot: a[2] },
            Kind::Shmat => MemCall::Shmat { shmid: a[0], addr: a[1], flags: a[2] },
            // ipc(call, first = shmid, second = shmflg, third = &raddr, ptr = shmaddr); the
            // version in the top half of `call` must be 0 (1 is refused by the kernel).
            Kind::Ipc if a[0] == IPC_SHMAT => MemCall::Shmat { shmid: a[1], addr: a[4], flags: a[2] },
            Kind::Ipc => return None,
            Kind::Exec => MemCall::Exec,
            Kind::Sysinfo => MemCall::Sysinfo { buf: a[0] },
        })
    }

    /// A `shmat` of a segment of `size` bytes, as the mapping it makes: shared, writable unless
    /// `SHM_RDONLY`, at `addr` if given.
    pub fn from_shmat(addr: u64, flags: u64, size: u64) -> MemCall {
        let prot = if flags & SHM_RDONLY != 0 { PROT_READ } else { PROT_READ | PROT_WRITE };
        let fixed = if addr != 0 { MAP_FIXED } else { 0 };
        MemCall::Mmap { addr, len: size, prot, flags: MAP_SHARED | fixed }
    }

    /// Decode the six 32-bit words of i386's `struct mmap_arg_struct`
    /// (addr, len, prot, flags, fd, offset) as read from the caller's memory.
    pub fn from_old_mmap_args(words: [u32; 6]) -> MemCall {
        MemCall::Mmap { addr: words[0].into(), len: words[1].into(), prot: words[2].into(), flags: words[3].into() }
    }

    /// What this call can add to the counted heap, before looking at the process.
    pub fn request(&self, page: u64) -> Option<Request> {
        self.request_as(page, Counting::Heap)
    }

    /// What this call can add to what `counting` counts, before looking at the process. In
    /// strict mode a writable `mmap` of a file or of shared memory asks for its whole length:
    /// whether it counts is known only once it is mapped (its device), so the worst case is held
    /// against the quota, and the next exact figure gives back what does not count.
    pub fn request_as(&self, page: u64, counting: Counting) -> Option<Request> {
        let up = |x: u64| page_up(x, page);
        match *self {
            MemCall::Brk { addr } if addr != 0 => Some(Request::Brk { addr }),
            MemCall::Mmap { addr, len, prot, flags } if counts_mmap_as(prot, flags, counting) && len > 0 => {
                let fixed = flags & (MAP_FIXED | MAP_FIXED_NOREPLACE) != 0;
                Some(Request::Map { addr: addr & !(page - 1), len: up(len)?, fixed })
            }
            MemCall::Mremap { old_addr, old_len, new_len, flags } => {
                let (old_len, new_len) = (up(old_len)?, up(new_len)?);
                let dontunmap = flags & MREMAP_DONTUNMAP != 0;
                let grows = new_len > old_len || dontunmap || old_len == 0;
                let moves = flags & MREMAP_MAYMOVE != 0;
                (grows || moves).then_some(Request::Remap { old_addr, old_len, new_len, moves, dontunmap })
            }
            MemCall::Mprotect { addr, len, prot } if prot & PROT_WRITE != 0 && len > 0 => {
                let start = addr & !(page - 1);
                let end = up(addr.checked_add(len)?)?;
                Some(Request::Protect { addr: start, len: end - start })
            }
            _ => None,
        }
    }
}

/// Anonymous, private (or droppable), writable: the `mmap`s that count.
pub fn counts_mmap(prot: u64, flags: u64) -> bool {
    counts_mmap_as(prot, flags, Counting::Heap)
}

/// The `mmap`s that may add to what `counting` counts: in strict mode every writable one.
pub fn counts_mmap_as(prot: u64, flags: u64, counting: Counting) -> bool {
    let kind = flags & MAP_TYPE;
    prot & PROT_WRITE != 0
        && match counting {
            Counting::Heap => flags & MAP_ANONYMOUS != 0 && (kind == MAP_PRIVATE || kind == MAP_DROPPABLE),
            Counting::Strict => true,
        }
}

/// Round up to a page; `None` on overflow (the kernel refuses such a call anyway).
pub fn page_up(x: u64, page: u64) -> Option<u64> {
    x.checked_add(page - 1).map(|v| v & !(page - 1))
}

/// A call that may grow the heap, in page-aligned terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Move the program break to `addr`.
    Brk { addr: u64 },
    /// Map `len` bytes of anonymous private writable memory (at `addr` if `fixed`).
    Map { addr: u64, len: u64, fixed: bool },
    /// Resize (and perhaps move) the mapping at `old_addr`.
    Remap { old_addr: u64, old_len: u64, new_len: u64, moves: bool, dontunmap: bool },
    /// Make `[addr, addr+len)` writable.
    Protect { addr: u64, len: u64 },
}

impl Request {
    /// The call's name, for logs and events.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Brk { .. } => "brk",
            Request::Map { .. } => "mmap",
            Request::Remap { .. } => "mremap",
            Request::Protect { .. } => "mprotect",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RW: u64 = 3;
    const ANON_PRIV: u64 = MAP_ANONYMOUS | MAP_PRIVATE;

    #[test]
    fn decodes_each_abi() {
        let args = [0, 4096, RW, ANON_PRIV, u64::MAX, 0];
        let mmap = Some(MemCall::Mmap { addr: 0, len: 4096, prot: RW, flags: ANON_PRIV });
        assert_eq!(MemCall::decode(AUDIT_ARCH_X86_64, 9, args), mmap);
        assert_eq!(MemCall::decode(AUDIT_ARCH_X86_64, 9 | X32_SYSCALL_BIT, args), mmap);
        assert_eq!(MemCall::decode(AUDIT_ARCH_I386, 192, args), mmap);
        assert_eq!(MemCall::decode(AUDIT_ARCH_AARCH64, 222, args), mmap);
        assert_eq!(
            MemCall::decode(AUDIT_ARCH_I386, 90, [0x1000, 0, 0, 0, 0, 0]),
            Some(MemCall::OldMmap { args_ptr: 0x1000 })
        );
        assert_eq!(
            MemCall::decode(AUDIT_ARCH_I386, 45, [0x1_0000_2000, 0, 0, 0, 0, 0]),
            Some(MemCall::Brk { addr: 0x2000 }),
            "compat args are 32-bit"
        );
        assert_eq!(MemCall::decode(AUDIT_ARCH_X86_64, 59, args), Some(MemCall::Exec));
        let info = Some(MemCall::Sysinfo { buf: 0x1000 });
        assert_eq!(MemCall::decode(AUDIT_ARCH_X86_64, 99, [0x1000, 0, 0, 0, 0, 0]), info);
        assert_eq!(MemCall::decode(AUDIT_ARCH_I386, 116, [0x1_0000_1000, 0, 0, 0, 0, 0]), info);
        assert_eq!(MemCall::decode(AUDIT_ARCH_AARCH64, 179, [0x1000, 0, 0, 0, 0, 0]), info);
        assert_eq!(MemCall::Sysinfo { buf: 0 }.request(4096), None, "never grows the heap");
        assert_eq!(MemCall::decode(AUDIT_ARCH_X86_64, 0, args), None, "read is not a memory call");
        let shmat = Some(MemCall::Shmat { shmid: 7, addr: 0, flags: SHM_RDONLY });
        assert_eq!(MemCall::decode(AUDIT_ARCH_X86_64, 30, [7, 0, SHM_RDONLY, 0, 0, 0]), shmat);
        assert_eq!(MemCall::decode(AUDIT_ARCH_I386, 397, [7, 0, SHM_RDONLY, 0, 0, 0]), shmat);
        assert_eq!(MemCall::decode(AUDIT_ARCH_I386, 117, [IPC_SHMAT, 7, SHM_RDONLY, 0x100, 0, 0]), shmat);
        assert_eq!(MemCall::decode(AUDIT_ARCH_I386, 117, [2, 7, 0, 0, 0, 0]), None, "semget");
        assert_eq!(MemCall::decode(0x1234, 9, args), None, "unknown arch passes");
    }

    #[test]
    fn only_anonymous_private_writable_mmap_counts() {
        assert!(counts_mmap(RW, ANON_PRIV));
        assert!(counts_mmap(RW, ANON_PRIV | MAP_FIXED));
        assert!(counts_mmap(RW, MAP_ANONYMOUS | MAP_DROPPABLE));
        assert!(!counts_mmap(0, ANON_PRIV), "PROT_NONE reservation");
        assert!(!counts_mmap(1, ANON_PRIV), "read-only");
        assert!(!counts_mmap(RW, MAP_PRIVATE), "private file mapping");
        assert!(!counts_mmap(RW, MAP_ANONYMOUS | MAP_SHARED), "shared memory");
    }

    #[test]
    fn strict_asks_for_every_writable_mapping() {
        let page = 4096;
        let shared = MemCall::Mmap { addr: 0, len: 5000, prot: RW, flags: MAP_SHARED };
        assert_eq!(shared.request(page), None);
        assert_eq!(shared.request_as(page, Counting::Strict), Some(Request::Map { addr: 0, len: 8192, fixed: false }));
        let file = MemCall::Mmap { addr: 0, len: 4096, prot: 1, flags: MAP_PRIVATE };
        assert_eq!(file.request_as(page, Counting::Strict), None, "read-only never counts");
        let seg = MemCall::from_shmat(0x10000, 0, 4096);
        assert_eq!(
            seg.request_as(page, Counting::Strict),
            Some(Request::Map { addr: 0x10000, len: 4096, fixed: true })
        );
        assert_eq!(MemCall::from_shmat(0, SHM_RDONLY, 4096).request_as(page, Counting::Strict), None);
    }

    #[test]
    fn requests_are_page_aligned() {
        let page = 4096;
        let m = MemCall::Mmap { addr: 0, len: 1, prot: RW, flags: ANON_PRIV };
        assert_eq!(m.request(page), Some(Request::Map { addr: 0, len: 4096, fixed: false }));
        let p = MemCall::Mprotect { addr: 4095, len: 2, prot: RW };
        assert_eq!(p.request(page), Some(Request::Protect { addr: 0, len: 8192 }));
        let p = MemCall::Mprotect { addr: 0, len: 4096, prot: 1 };
        assert_eq!(p.request(page), None, "making memory read-only never grows");
        let shrink = MemCall::Mremap { old_addr: 0, old_len: 8192, new_len: 4096, flags: 0 };
        assert_eq!(shrink.request(page), None, "shrinking in place never grows");
        let mv = MemCall::Mremap { old_addr: 0, old_len: 8192, new_len: 8192, flags: MREMAP_MAYMOVE };
        assert!(mv.request(page).is_some(), "a move is tracked: it can hide memory from a concurrent read");
        assert_eq!(MemCall::Brk { addr: 0 }.request(page), None, "brk(0) only asks");
        assert_eq!(MemCall::Mprotect { addr: u64::MAX - 10, len: 100, prot: RW }.request(page), None);
    }
}
