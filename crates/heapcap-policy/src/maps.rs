//! `/proc/<pid>/maps`, parsed: the kernel's own view of what a process has mapped.
//!
//! A line is `start-end perms offset dev inode [path]`. What counts depends on the
//! [`Counting`]:
//! - [`Counting::Heap`] (the default): private, writable and anonymous mappings (no file behind
//!   it: no path, `[heap]`, or `[anon:name]`). The main thread's `[stack]` does not count; nor do
//!   `[vvar]`, `[vdso]` and other named specials.
//! - [`Counting::Strict`]: every writable private mapping but the main thread's `[stack]`
//!   (anonymous, file-backed, `/dev/zero`: what the kernel's `RLIMIT_DATA` counts, its
//!   `is_data_mapping`), plus every writable *shared* mapping of memory that only RAM and swap
//!   back: memfd, SysV shm, `MAP_SHARED` anonymous memory (all on the kernel's internal shmem
//!   mount, which no process's `mountinfo` shows), and files on tmpfs, ramfs, hugetlbfs,
//!   devtmpfs or overlayfs (whose upper layer may be tmpfs). A shared mapping is left out only when its device
//!   is a mount of another kind in the process's `mountinfo` ([`Maps::classify`]): one the kernel
//!   writes back to a disk. The kind is the kernel's own view of the mapping (device and inode),
//!   never what a call said it would map.

pub use crate::ledger::Counting;

/// One mapping, reduced to what the accounting needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub writable: bool,
    /// Private and anonymous (whatever its permissions).
    pub anon_private: bool,
    pub is_heap: bool,
    /// Shared (`s` in maps): writes reach the object behind it, not a private copy.
    pub shared: bool,
    /// The main thread's `[stack]` (never counted: `RLIMIT_STACK` covers it).
    pub is_stack: bool,
    /// The device of the file behind it ([`dev`] encoding); 0 for anonymous memory.
    pub dev: u64,
    /// The inode of the file behind it; 0 for anonymous memory.
    pub inode: u64,
    /// A shared mapping of a file on a disk-backed mount (set by [`Maps::classify`]).
    pub on_disk: bool,
}

/// A device number as one value: `major << 32 | minor`.
pub fn dev(major: u32, minor: u32) -> u64 {
    u64::from(major) << 32 | u64::from(minor)
}

impl Vma {
    /// Counted as heap ([`Counting::Heap`]).
    pub fn counted(&self) -> bool {
        self.counts(Counting::Heap)
    }

    /// Counted under `counting` (if writable).
    pub fn counts(&self, counting: Counting) -> bool {
        self.writable && self.countable(counting)
    }

    /// Would count under `counting` once writable.
    pub fn countable(&self, counting: Counting) -> bool {
        match counting {
            Counting::Heap => self.anon_private,
            Counting::Strict if self.shared => !self.on_disk,
            Counting::Strict => !self.is_stack,
        }
    }

    /// A shared mapping of a file whose mount decides whether it counts in strict mode.
    pub fn shared_file(&self) -> bool {
        self.shared && self.inode != 0
    }

    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn overlap(&self, start: u64, end: u64) -> u64 {
        self.end.min(end).saturating_sub(self.start.max(start))
    }
}

/// A maps line that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unreadable line {line} of /proc/<pid>/maps: {text:?}")]
pub struct MapsError {
    pub line: usize,
    pub text: String,
}

/// Parse one line; `None` if it is not a maps line.
pub fn parse_line(line: &str) -> Option<Vma> {
    let mut fields = line.splitn(6, ' ');
    let range = fields.next()?;
    let perms = fields.next()?.as_bytes();
    let _offset = fields.next()?;
    let device = fields.next()?;
    let inode = fields.next()?;
    let path = fields.next().map(str::trim_start).unwrap_or("");
    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    if perms.len() != 4 || end < start {
        return None;
    }
    // A device or inode that does not read as one (never from the kernel) is an unknown file:
    // counted wherever a file of an unknown kind is.
    let dev = device
        .split_once(':')
        .and_then(|(ma, mi)| Some(dev(u32::from_str_radix(ma, 16).ok()?, u32::from_str_radix(mi, 16).ok()?)))
        .unwrap_or(u64::MAX);
    let inode: u64 = inode.parse().unwrap_or(u64::MAX);
    let anonymous = inode == 0
        && (path.is_empty() || path == "[heap]" || path.starts_with("[anon:") || path.starts_with("[stack:"));
    Some(Vma {
        start,
        end,
        writable: perms[1] == b'w',
        anon_private: anonymous && perms[3] == b'p',
        is_heap: path == "[heap]",
        shared: perms[3] == b's',
        is_stack: path == "[stack]",
        dev,
        inode,
        on_disk: false,
    })
}

/// A snapshot of a process's mappings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Maps {
    vmas: Vec<Vma>,
}

impl Maps {
    /// Parse the whole text of `/proc/<pid>/maps`. The kernel ends every line with a newline, so
    /// a text that stops inside a line is a read cut short and an error: parsed, its last line
    /// could pass for a smaller mapping or a file (`...rw-p 00000000 00:00 ` reads as inode
    /// unknown) and leave heap uncounted.
    pub fn parse(text: &str) -> Result<Maps, MapsError> {
        let mut vmas = Vec::with_capacity(text.len() / 80);
        for (i, line) in text.lines().enumerate() {
            if line.is_empty() {
                continue;
            }
            let vma = parse_line(line).ok_or_else(|| MapsError { line: i + 1, text: line.into() })?;
            vmas.push(vma);
        }
        if !text.is_empty() && !text.ends_with('\n') {
            let last = text.rsplit('\n').next().unwrap_or_default();
            return Err(MapsError { line: text.lines().count(), text: last.into() });
        }
        Ok(Maps { vmas })
    }

    pub fn from_vmas(mut vmas: Vec<Vma>) -> Maps {
        vmas.sort_by_key(|v| v.start);
        Maps { vmas }
    }

    pub fn vmas(&self) -> &[Vma] {
        &self.vmas
    }

    /// Counted heap bytes.
    pub fn counted(&self) -> u64 {
        self.counted_as(Counting::Heap)
    }

    /// Counted bytes under `counting`.
    pub fn counted_as(&self, counting: Counting) -> u64 {
        saturating_sum(self.vmas.iter().filter(|v| v.counts(counting)).map(Vma::len))
    }

    /// Whether any shared file mapping needs its mount's kind ([`Maps::classify`]).
    pub fn has_shared_files(&self) -> bool {
        self.vmas.iter().any(Vma::shared_file)
    }

    /// Mark the shared file mappings whose device `on_disk` says is a disk-backed mount. A
    /// device it does not know (the kernel's internal shmem mount of memfd, SysV shm and shared
    /// anonymous memory; a mount since unmounted) stays counted.
    pub fn classify(&mut self, on_disk: impl Fn(u64) -> bool) {
        for v in self.vmas.iter_mut().filter(|v| v.shared_file()) {
            v.on_disk = on_disk(v.dev);
        }
    }

    /// End of the `[heap]` mapping: the page-aligned program break, if the heap was ever grown.
    pub fn heap_end(&self) -> Option<u64> {
        self.vmas.iter().find(|v| v.is_heap).map(|v| v.end)
    }

    fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = &Vma> {
        let first = self.vmas.partition_point(|v| v.end <= start);
        self.vmas[first..].iter().take_while(move |v| v.start < end)
    }

    /// Counted bytes inside `[start, end)`.
    pub fn counted_in(&self, start: u64, end: u64) -> u64 {
        self.counted_in_as(Counting::Heap, start, end)
    }

    /// Counted bytes inside `[start, end)` under `counting`.
    pub fn counted_in_as(&self, counting: Counting, start: u64, end: u64) -> u64 {
        saturating_sum(self.overlapping(start, end).filter(|v| v.counts(counting)).map(|v| v.overlap(start, end)))
    }

    /// Bytes inside `[start, end)` that are anonymous private but not writable: what an
    /// `mprotect(PROT_WRITE)` of that range would add to the heap.
    pub fn protect_growth(&self, start: u64, end: u64) -> u64 {
        self.protect_growth_as(Counting::Heap, start, end)
    }

    /// Bytes inside `[start, end)` that are not writable and would count once writable under
    /// `counting`.
    pub fn protect_growth_as(&self, counting: Counting, start: u64, end: u64) -> u64 {
        saturating_sum(
            self.overlapping(start, end)
                .filter(|v| !v.writable && v.countable(counting))
                .map(|v| v.overlap(start, end)),
        )
    }

    /// Whether `[start, end)` lies wholly in private anonymous memory.
    pub fn private_anonymous(&self, start: u64, end: u64) -> bool {
        let mut at = start;
        for v in self.overlapping(start, end) {
            if v.start > at || !(v.anon_private || (v.is_stack && !v.shared)) {
                return false;
            }
            at = v.end;
        }
        at >= end
    }

    /// The mapping that contains `addr`.
    pub fn containing(&self, addr: u64) -> Option<&Vma> {
        self.overlapping(addr, addr.saturating_add(1)).next()
    }
}

/// A sum that stops at `u64::MAX`: lines that overlap (text not from one consistent read of the
/// kernel's list) must not overflow it.
fn saturating_sum(values: impl Iterator<Item = u64>) -> u64 {
    values.fold(0, u64::saturating_add)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SAMPLE: &str = "\
5580b6bd9000-5580b6bdb000 r--p 00000000 fe:00 247282                     /usr/bin/head
5580b6be5000-5580b6be6000 rw-p 0000b000 fe:00 247282                     /usr/bin/head
5580b6be6000-5580b6be8000 rw-p 00000000 00:00 0 
5580b7c00000-5580b7c21000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0004000000 ---p 00000000 00:00 0 
7f0004000000-7f0004100000 rw-p 00000000 00:00 0                          [anon:glibc arena]
7f0010000000-7f0010100000 rw-s 00000000 00:01 1234                       /dev/zero (deleted)
7f0020000000-7f0020400000 rw-p 00000000 00:1a 99                         /tmp/big (deleted)
7ffd83755000-7ffd83776000 rw-p 00000000 00:00 0                          [stack]
7ffd837b0000-7ffd837b4000 r--p 00000000 00:00 0                          [vvar]
7ffd837b4000-7ffd837b6000 r-xp 00000000 00:00 0                          [vdso]
";

    #[test]
    fn counts_only_private_anonymous_writable() {
        let m = Maps::parse(SAMPLE).unwrap();
        // bss 0x2000 + heap 0x21000 + named arena 0x100000.
        assert_eq!(m.counted(), 0x2000 + 0x21000 + 0x10_0000);
        assert_eq!(m.heap_end(), Some(0x5580b7c21000));
    }

    #[test]
    fn range_queries() {
        let m = Maps::parse(SAMPLE).unwrap();
        let res = 0x7f00_0000_0000u64;
        assert_eq!(m.protect_growth(res, res + 0x1000), 0x1000, "PROT_NONE reservation becomes heap");
        assert_eq!(m.protect_growth(0x7f0004000000, 0x7f0004001000), 0, "already writable");
        assert_eq!(m.protect_growth(0x7f0020000000, 0x7f0020001000), 0, "file mapping");
        assert_eq!(m.counted_in(0x7f0003fff000, 0x7f0004002000), 0x2000);
        assert!(m.containing(0x7f0020000010).is_some_and(|v| !v.counted()));
        assert!(m.containing(0x1000).is_none());
    }

    #[test]
    fn rejects_garbage() {
        assert!(Maps::parse("hello world\n").is_err());
        // Cut inside the last line: a line that would parse (as an unknown file) is still refused.
        let whole = "7f00-7f10 rw-p 00000000 00:00 0 \n";
        assert_eq!(Maps::parse(whole).unwrap().counted(), 0x10);
        for cut in 1..whole.len() {
            let e = Maps::parse(&whole[..cut]).unwrap_err();
            assert_eq!((e.line, e.text.as_str()), (1, &whole[..cut]), "cut at {cut}");
        }
        assert!(Maps::parse("2000-1000 rw-p 0 0 0\n").is_err());
        assert_eq!(Maps::parse("").unwrap().counted(), 0);
    }

    #[test]
    fn overlapping_lines_do_not_overflow() {
        // An input for the `maps` fuzz target: `sum()` overflowed (a panic with overflow checks on).
        let text = "0-ffffffffffffffff rw-p 00000000 00:00 0\n0-ffffffffffffffff r--p 00000000 00:00 0\n";
        let m = Maps::parse(&text.repeat(2)).unwrap();
        assert_eq!(m.counted(), u64::MAX);
        assert_eq!(m.counted_in(0, u64::MAX), u64::MAX);
        assert_eq!(m.protect_growth(0, u64::MAX), u64::MAX);
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,200}") {
            let _ = Maps::parse(&s);
        }

        #[test]
        fn range_sums_are_bounded(starts in proptest::collection::vec((0u64..1000, 1u64..10, any::<bool>(), any::<bool>()), 0..20), a in 0u64..12000, l in 0u64..5000) {
            let mut vmas = Vec::new();
            let mut at = 0;
            for (gap, pages, w, anon) in starts {
                let start = at + gap;
                let end = start + pages;
                vmas.push(Vma { start, end, writable: w, anon_private: anon, ..Vma::default() });
                at = end;
            }
            let m = Maps::from_vmas(vmas.clone());
            let naive_counted: u64 = vmas.iter().filter(|v| v.counted()).map(|v| v.overlap(a, a + l)).sum();
            prop_assert_eq!(m.counted_in(a, a + l), naive_counted);
            prop_assert!(m.counted_in(a, a + l) + m.protect_growth(a, a + l) <= l);
        }
    }
}
