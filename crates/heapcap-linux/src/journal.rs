//! The in-flight journal: one slot per listener, in a shared memfd, where the supervisor notes
//! each notification it has taken from the kernel before it answers.
//!
//! The kernel keeps a received notification waiting for an answer from *whoever holds the
//! listener fd*; with `SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV` the caller cannot even be
//! interrupted out of it. If the supervisor dies between receiving and answering, that caller
//! would wait forever, and a new supervisor cannot receive it again. The journal lives in memory
//! that outlives the supervisor (the fd holder keeps the memfd), so the next supervisor reads
//! the last notification of each listener and answers it if the kernel says it is still pending.
//!
//! Each slot is a seqlock written by one supervisor thread: an odd sequence means a write was cut
//! short (the writer died inside it), and the slot's content is not trusted.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;

use crate::notify::{Listener, Notification};

/// How far past the last noted id to look for a call taken but not noted. Ids count up by one
/// per notification of a filter; between two receives only calls interrupted before being
/// received (signals) use up ids, so the one a dying supervisor took is close behind.
const PROBE: u64 = 4096;

/// Bytes per slot: a sequence word, the id, pid+arch, nr, six arguments (80 bytes), padded to
/// two cache lines so neighbours never share one.
const SLOT_BYTES: usize = 128;
const WORDS: usize = 10;

/// A shared mapping of `len / SLOT_BYTES` slots.
#[derive(Debug)]
pub struct Journal {
    fd: OwnedFd,
    base: NonNull<AtomicU64>,
    len: usize,
}

// SAFETY: the mapping is only ever accessed through atomics, and it stays mapped for as long as
// the Journal lives; the raw pointer is just its address.
unsafe impl Send for Journal {}
// SAFETY: as above: shared access is through atomic operations only.
unsafe impl Sync for Journal {}

impl Journal {
    /// A new journal with room for `slots` listeners (memory is only used as slots are touched).
    pub fn create(slots: usize) -> io::Result<Journal> {
        let name = c"heapcap-journal";
        // SAFETY: name is a valid NUL-terminated string; the flags are valid memfd flags.
        let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if raw < 0 {
            return Err(crate::last_error());
        }
        // SAFETY: memfd_create returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let len = slots.checked_mul(SLOT_BYTES).ok_or_else(|| io::Error::other("journal too large"))?;
        // SAFETY: plain ftruncate on an fd we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(crate::last_error());
        }
        // Nobody may shrink it under a mapping (a SIGBUS in the supervisor).
        // SAFETY: F_ADD_SEALS with seal flags on a memfd created with MFD_ALLOW_SEALING.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL) } != 0 {
            return Err(crate::last_error());
        }
        Journal::map(fd)
    }

    /// Map a journal received from the holder. Its size must be a whole number of slots, and it
    /// must be sealed against shrinking (or a truncation would crash the supervisor).
    pub fn map(fd: OwnedFd) -> io::Result<Journal> {
        // SAFETY: F_GET_SEALS takes no argument and only reads the file's seals.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the journal fd is not a memfd sealed against shrinking",
            ));
        }
        // SAFETY: stat is plain data, filled in by fstat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes into st, which lives for the call.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(crate::last_error());
        }
        let len = usize::try_from(st.st_size).unwrap_or(0);
        if len == 0 || len % SLOT_BYTES != 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("a journal of {len} bytes is malformed")));
        }
        // SAFETY: a new shared mapping of the whole file; the kernel picks the address.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(crate::last_error());
        }
        let base = NonNull::new(addr.cast::<AtomicU64>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Journal { fd, base, len })
    }

    /// How many slots it has.
    pub fn slots(&self) -> usize {
        self.len / SLOT_BYTES
    }

    /// The words of one slot (one bounds check for all of them: a record is on every decision).
    fn words(&self, slot: usize) -> &[AtomicU64; WORDS] {
        assert!(slot < self.slots(), "journal slot {slot} out of range");
        const { assert!(WORDS * 8 <= SLOT_BYTES) };
        // SAFETY: the slot's WORDS words are inside the mapping (slot checked above, WORDS * 8
        // fits in SLOT_BYTES), 8-byte aligned (the mapping is page aligned and SLOT_BYTES is a
        // multiple of 8), and the mapping lives as long as &self. AtomicU64 has the layout of
        // u64, an array of them that of WORDS consecutive words, and all access is atomic.
        unsafe { &*self.base.as_ptr().add(slot * SLOT_BYTES / 8).cast::<[AtomicU64; WORDS]>() }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no reference into it outlives self.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

impl AsFd for Journal {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// One listener's slot.
#[derive(Debug, Clone)]
pub struct Slot {
    journal: Arc<Journal>,
    index: usize,
}

/// What a slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Nothing was ever noted.
    Empty,
    /// The last notification taken.
    Last(Notification),
    /// A note was being written when its writer died: the id is unknown.
    Torn,
}

impl Slot {
    /// Slot `index` of `journal`; `None` if there is no such slot.
    pub fn new(journal: Arc<Journal>, index: usize) -> Option<Slot> {
        (index < journal.slots()).then_some(Slot { journal, index })
    }

    pub fn index(&self) -> usize {
        self.index
    }

    fn w(&self, i: usize) -> &AtomicU64 {
        &self.journal.words(self.index)[i]
    }

    /// Note `n` as taken (before deciding it).
    #[inline]
    pub fn record(&self, n: &Notification) {
        let w = self.journal.words(self.index);
        let seq = w[0].load(Ordering::Relaxed);
        let writing = seq | 1;
        w[0].store(writing, Ordering::Relaxed);
        fence(Ordering::Release);
        w[1].store(n.id, Ordering::Relaxed);
        w[2].store(u64::from(n.pid) | u64::from(n.arch) << 32, Ordering::Relaxed);
        w[3].store(n.nr as u32 as u64, Ordering::Relaxed);
        for (word, a) in w[4..].iter().zip(n.args) {
            word.store(a, Ordering::Relaxed);
        }
        w[0].store(writing + 1, Ordering::Release);
    }

    /// Forget everything (a slot given to a new listener).
    pub fn clear(&self) {
        for i in 0..WORDS {
            self.w(i).store(0, Ordering::Relaxed);
        }
        fence(Ordering::Release);
    }

    /// What was last noted.
    pub fn read(&self) -> Entry {
        let seq = self.w(0).load(Ordering::Acquire);
        if seq == 0 {
            return Entry::Empty;
        }
        if seq & 1 == 1 {
            return Entry::Torn;
        }
        let id = self.w(1).load(Ordering::Relaxed);
        let pa = self.w(2).load(Ordering::Relaxed);
        let nr = self.w(3).load(Ordering::Relaxed) as u32 as i32;
        let mut args = [0u64; 6];
        for (i, a) in args.iter_mut().enumerate() {
            *a = self.w(4 + i).load(Ordering::Relaxed);
        }
        fence(Ordering::Acquire);
        if self.w(0).load(Ordering::Relaxed) != seq {
            return Entry::Torn; // written meanwhile: only a live writer does that
        }
        Entry::Last(Notification { id, pid: pa as u32, arch: (pa >> 32) as u32, nr, args })
    }
}

/// A call a previous supervisor took from the kernel and never answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Orphan {
    /// It was noted: decide it like any other.
    Noted(Notification),
    /// It was taken in the instant before it could be noted: only its id is known.
    Unnoted(u64),
}

impl Slot {
    /// The call `listener`'s previous supervisor left waiting, if any. Only a taken call is
    /// "valid" to the kernel (waiting ones are not), and one supervisor thread per listener takes
    /// one call at a time, so there is at most one.
    pub fn orphan(&self, listener: &Listener) -> Option<Orphan> {
        let last = match self.read() {
            Entry::Empty => return None,
            Entry::Last(n) if listener.id_valid(n.id) => return Some(Orphan::Noted(n)),
            Entry::Last(n) => n.id,
            // The id word holds the previous id or already the new one: look from it on.
            Entry::Torn => self.w(1).load(Ordering::Relaxed).wrapping_sub(1),
        };
        (1..=PROBE).map(|k| last.wrapping_add(k)).find(|id| listener.id_valid(*id)).map(Orphan::Unnoted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(id: u64) -> Notification {
        Notification { id, pid: 4242, arch: 0xc000_003e, nr: 9, args: [1, 2, 3, 4, 5, u64::MAX] }
    }

    #[test]
    fn a_note_survives_into_a_second_mapping() {
        let journal = Arc::new(Journal::create(4).unwrap());
        let slot = Slot::new(journal.clone(), 3).unwrap();
        assert_eq!(slot.read(), Entry::Empty);
        slot.record(&n(7));
        slot.record(&n(8));
        // Another process maps the same memfd (here: a dup of it, mapped again).
        let again = Arc::new(Journal::map(journal.as_fd().try_clone_to_owned().unwrap()).unwrap());
        assert_eq!(Slot::new(again.clone(), 3).unwrap().read(), Entry::Last(n(8)));
        assert_eq!(Slot::new(again.clone(), 0).unwrap().read(), Entry::Empty);
        assert!(Slot::new(again, 4).is_none());
        slot.clear();
        assert_eq!(slot.read(), Entry::Empty);
    }

    #[test]
    fn a_write_cut_short_is_torn() {
        let journal = Arc::new(Journal::create(1).unwrap());
        let slot = Slot::new(journal, 0).unwrap();
        slot.record(&n(1));
        slot.w(0).fetch_add(1, Ordering::Relaxed); // the writer died after marking the write
        assert_eq!(slot.read(), Entry::Torn);
    }

    #[test]
    fn an_unsealed_or_odd_sized_file_is_refused() {
        let plain = std::fs::File::open("/proc/self/status").unwrap();
        assert!(Journal::map(plain.into()).is_err());
    }
}
