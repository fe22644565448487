//! The last few thread ids seen of something, the latest first: which callers ran lately
//! ([`crate::wakeup`]), which threads exited lately ([`crate::threads`]).

/// Up to `N` ids, the latest first (0 is no id: thread ids start at 1).
#[derive(Debug, Clone)]
pub(crate) struct Recent<const N: usize>([u32; N]);

impl<const N: usize> Default for Recent<N> {
    fn default() -> Self {
        Recent([0; N])
    }
}

impl<const N: usize> Recent<N> {
    /// Note `id` as the latest, dropping the oldest.
    pub(crate) fn push(&mut self, id: u32) {
        self.0.copy_within(..N - 1, 1);
        self.0[0] = id;
    }

    pub(crate) fn contains(&self, id: u32) -> bool {
        id != 0 && self.0.contains(&id)
    }
}
