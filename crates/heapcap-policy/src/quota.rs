//! A quota as users write it: a size (`64Mi`, see [`Size`]), or `none` (also `unlimited`) for
//! no quota. What `heapcap set-limit` takes, and what the control protocol carries as that text.

use std::fmt;
use std::str::FromStr;

use crate::size::{Size, SizeError};

/// A quota, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quota {
    /// At most this many bytes (never 0).
    Limit(Size),
    /// No quota: `none` or `unlimited`.
    Unlimited,
}

/// A quota that cannot be read; the message says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    #[error("{0} (or none for no quota)")]
    Size(SizeError),
}

impl Quota {
    /// As the ledger takes it: the bytes, or `None` for no quota.
    pub fn bytes(self) -> Option<u64> {
        match self {
            Quota::Limit(size) => Some(size.bytes()),
            Quota::Unlimited => None,
        }
    }
}

impl FromStr for Quota {
    type Err = QuotaError;

    /// `none` or `unlimited`, else a size as [`Size::parse_limit`] takes it (zero is refused);
    /// whitespace around is ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "none" | "unlimited" => Ok(Quota::Unlimited),
            v => Size::parse_limit(v).map(Quota::Limit).map_err(QuotaError::Size),
        }
    }
}

impl fmt::Display for Quota {
    /// As users write it, so that it reads back as the same quota: `64Mi`, `500M`, `none`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Quota::Limit(size) => f.write_str(&size.quantity()),
            Quota::Unlimited => f.write_str("none"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes_and_none() {
        assert_eq!("64Mi".parse(), Ok(Quota::Limit(Size(64 << 20))));
        assert_eq!(" 1.5Gi ".parse(), Ok(Quota::Limit(Size(3 << 29))));
        assert_eq!("none".parse(), Ok(Quota::Unlimited));
        assert_eq!(" unlimited\n".parse(), Ok(Quota::Unlimited));
        assert_eq!(Quota::Limit(Size(64 << 20)).bytes(), Some(64 << 20));
        assert_eq!(Quota::Unlimited.bytes(), None);
    }

    #[test]
    fn written_as_users_write_it() {
        assert_eq!(Quota::Limit(Size(64 << 20)).to_string(), "64Mi");
        assert_eq!(Quota::Limit(Size(500_000_000)).to_string(), "500M");
        assert_eq!(Quota::Unlimited.to_string(), "none");
    }

    #[test]
    fn bad_quotas_say_what_to_write() {
        for (bad, says) in [
            ("abc", "'abc' is not a size: write a number with an optional suffix"),
            ("-5Mi", "'-5Mi' is negative: write a positive quantity such as 64Mi"),
            ("0", "'0' is zero: a quota of 0 would deny every allocation"),
            ("", "empty size: write a quantity such as 64Mi"),
            ("None", "'None' is not a size"),
        ] {
            let e = bad.parse::<Quota>().unwrap_err().to_string();
            assert!(e.contains(says) && e.ends_with(" (or none for no quota)"), "{bad:?}: {e}");
        }
    }

    proptest! {
        #[test]
        fn reads_back_as_written(s in "\\PC{0,12}") {
            if let Ok(q) = s.parse::<Quota>() {
                prop_assert_eq!(q.to_string().parse::<Quota>(), Ok(q));
            }
        }
    }
}
