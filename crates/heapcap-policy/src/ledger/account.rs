//! One process's account: its upper bound, its peak, and the growth let through that a read of
//! `/proc` could still miss.

use super::terms::{CallKey, ThreadState, Tid, Token};

const MIB: u64 = 1 << 20;

/// Growth let through whose mapping may not be in the kernel's view yet: its thread was woken
/// but may not have run the call. Added to every figure until the thread is seen to have moved
/// on (it sent another notification, it sleeps in a different call, it is gone).
#[derive(Debug, Clone, Copy)]
pub(super) struct Pending {
    pub tid: Tid,
    pub bytes: u64,
    pub key: CallKey,
    /// When it was let through ([`Token::seq`]): a figure read from an older token may miss it.
    pub seq: u64,
}

/// One process's account.
#[derive(Debug, Clone)]
pub struct Account {
    pub command: String,
    /// Upper bound of the counted heap now: what the quotas are held against.
    pub bound: u64,
    /// The best estimate of the counted heap now: the last figure (an exact one, or `statm` less
    /// what it showed beyond the heap at the last exact read) plus the growth let through since.
    pub estimate: u64,
    /// The counted heap at the last exact read.
    pub last_exact: u64,
    /// High-water mark of `estimate` plus `unresolved`: the peak heap, within the larger of 1 MiB
    /// and 1/16 below (the fast path measures again past that), and above by at most the growth
    /// in flight that no figure could settle.
    pub peak: u64,
    /// Highest heap measured (exactly, or by `statm` for a blind or new image): drives the peak mark.
    pub(super) measured: u64,
    /// Growth let through before the last figure that it could not settle (its threads still
    /// running: landed or not, nothing tells): left out of `estimate`, which it may already be
    /// in, and added to the peak, which must not miss it.
    pub(super) unresolved: u64,
    /// What `statm` showed beyond the counted heap at the last read of both (private file data,
    /// stacks); `None` until one.
    pub(super) offset: Option<u64>,
    pub denials: u64,
    /// This process's own quota, when set apart from the ledger's.
    pub limit: Option<u64>,
    /// Runtime code before the container's program (the runtime's init until its `execve`):
    /// observed, never denied, and left out of the total.
    pub runtime: bool,
    /// Its mappings cannot be read: figures come from `statm` or the notifications alone.
    pub blind: bool,
    /// Page-aligned program break, when known for the current image.
    pub(super) brk: Option<u64>,
    /// When the break was last moved by a call let through ([`Token::seq`]): a figure read
    /// from an older token has an older break.
    pub(super) brk_seq: u64,
    pub(super) pending: Vec<Pending>,
    pub(super) exec_by: Option<Tid>,
    /// An exec settled: the next figure starts the new image's figures afresh.
    pub(super) new_image: bool,
    /// Which process image this account describes: a new value when it is opened and when an
    /// exec settles, so a figure read across either is known to be stale.
    pub(super) image: u64,
}

impl Account {
    pub(super) fn new(command: String, image: u64, counted: u64, brk: Option<u64>) -> Account {
        Account {
            command,
            bound: counted,
            estimate: counted,
            offset: None,
            last_exact: counted,
            peak: counted,
            measured: counted,
            unresolved: 0,
            denials: 0,
            limit: None,
            runtime: false,
            blind: false,
            brk,
            brk_seq: 0,
            pending: Vec::new(),
            exec_by: None,
            new_image: false,
            image,
        }
    }

    /// The page-aligned program break, when known for the current image: what a refused `brk`
    /// returns (the kernel's `brk` reports failure with the unchanged break).
    pub fn brk(&self) -> Option<u64> {
        self.brk
    }

    /// Raise the peak to the estimate now (with the growth no figure settled, which may be in
    /// the estimate already: never past the bound, which the heap cannot pass).
    pub(super) fn note_peak(&mut self) {
        self.peak = self.peak.max(self.estimate.saturating_add(self.unresolved).min(self.bound));
    }

    pub(super) fn in_flight(&self) -> u64 {
        self.pending.iter().map(|p| p.bytes).fold(0, u64::saturating_add)
    }

    /// Growth in flight let through after `seq` ([`Token::seq`]).
    pub(super) fn in_flight_since(&self, seq: u64) -> u64 {
        self.pending.iter().filter(|p| p.seq > seq).map(|p| p.bytes).fold(0, u64::saturating_add)
    }

    /// Threads with growth in flight, other than `except`, leaving out the smallest growths as
    /// long as what is left out stays within `slack` bytes in all (a thread asked about for
    /// another growth settles those too).
    pub(super) fn pending_threads(&self, except: Tid, slack: u64) -> Vec<Tid> {
        let mut growth: Vec<(u64, Tid)> =
            self.pending.iter().filter(|p| p.tid != except).map(|p| (p.bytes, p.tid)).collect();
        growth.sort_unstable();
        let (mut unasked, mut left) = (0, slack);
        for &(bytes, _) in &growth {
            let Some(rest) = left.checked_sub(bytes) else { break };
            left = rest;
            unasked += 1;
        }
        let mut tids: Vec<Tid> = growth[unasked..].iter().map(|&(_, tid)| tid).collect();
        tids.sort_unstable();
        tids.dedup();
        tids
    }

    /// Forget the growth that `states` (read before the figure that `token` was taken for)
    /// shows has landed. Growth let through after the token is kept whatever the states say.
    pub(super) fn retire(&mut self, states: &[(Tid, ThreadState)], token: Token) {
        self.pending.retain(|p| {
            if p.seq > token.seq {
                return true;
            }
            match states.iter().find(|(t, _)| *t == p.tid) {
                Some((_, ThreadState::Gone | ThreadState::Idle)) => false,
                Some((_, ThreadState::InCall(key))) => *key == p.key,
                Some((_, ThreadState::Busy)) | None => true,
            }
        })
    }

    /// Growth the fast path may let through before measuring a new peak.
    pub(super) fn peak_mark(&self) -> u64 {
        self.measured.saturating_add(self.peak_precision())
    }

    /// How far a peak may read from the true one: the larger of 1 MiB and 1/16 of the heap.
    pub(super) fn peak_precision(&self) -> u64 {
        (self.measured / 16).max(MIB)
    }
}
