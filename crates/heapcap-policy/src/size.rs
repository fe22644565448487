//! Byte quantities as users write them: Kubernetes style (`64Mi`, `1.5Gi`, `500M`, `1048576`).

use std::fmt;
use std::str::FromStr;

/// A number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Size(pub u64);

/// Why a quantity could not be read. Each message says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("empty size: write a quantity such as 64Mi, 1Gi, 500M or a number of bytes")]
    Empty,
    #[error("'{0}' is negative: write a positive quantity such as 64Mi")]
    Negative(String),
    #[error("'{0}' is not a size: write a number with an optional suffix (Ki, Mi, Gi, Ti, k, M, G, T), e.g. 64Mi")]
    Malformed(String),
    #[error("'{input}': unknown suffix '{suffix}': use Ki, Mi, Gi, Ti, Pi, Ei (powers of 1024) or k, M, G, T, P, E (powers of 1000)")]
    UnknownSuffix { input: String, suffix: String },
    #[error("'{0}' is ambiguous: write {1}Ki for KiB (1024 bytes) or {1}k for kB (1000 bytes)")]
    AmbiguousK(String, String),
    #[error("'{0}' is too large: the largest size is 16Ei")]
    Overflow(String),
    #[error("'{0}' is zero: a quota of 0 would deny every allocation; write a positive size such as 64Mi")]
    Zero(String),
}

const KI: u64 = 1024;

/// Every suffix and what it multiplies by: binary ones (powers of 1024), then decimal ones (of
/// 1000), each from the largest. `K` is neither (see [`SizeError::AmbiguousK`]).
const SUFFIXES: [(&str, u64); 12] = [
    ("Ei", KI.pow(6)),
    ("Pi", KI.pow(5)),
    ("Ti", KI.pow(4)),
    ("Gi", KI.pow(3)),
    ("Mi", KI.pow(2)),
    ("Ki", KI),
    ("E", 1000u64.pow(6)),
    ("P", 1000u64.pow(5)),
    ("T", 1000u64.pow(4)),
    ("G", 1000u64.pow(3)),
    ("M", 1000u64.pow(2)),
    ("k", 1000),
];

impl Size {
    pub const KIB: u64 = KI;
    pub const MIB: u64 = KI * KI;
    pub const GIB: u64 = KI * KI * KI;

    pub fn bytes(self) -> u64 {
        self.0
    }

    /// Parse a quota: like [`FromStr`], but zero is refused.
    pub fn parse_limit(s: &str) -> Result<Size, SizeError> {
        let size: Size = s.parse()?;
        if size.0 == 0 {
            return Err(SizeError::Zero(s.trim().to_string()));
        }
        Ok(size)
    }

    /// The size as users write it, exactly: with the largest binary suffix that divides it
    /// (`64Mi`; 1.5Gi is `1536Mi`), else the largest decimal one (`500M`), else in bytes. It
    /// parses back to the same size; [`Display`](fmt::Display) rounds it for people instead.
    pub fn quantity(self) -> String {
        if self.0 == 0 {
            return "0".to_string();
        }
        match SUFFIXES.iter().find(|(_, unit)| self.0 % unit == 0) {
            Some((suffix, unit)) => format!("{}{suffix}", self.0 / unit),
            None => self.0.to_string(),
        }
    }
}

fn multiplier(input: &str, suffix: &str, number: &str) -> Result<u64, SizeError> {
    match suffix {
        "" => Ok(1),
        "K" => Err(SizeError::AmbiguousK(input.to_string(), number.to_string())),
        _ => SUFFIXES
            .iter()
            .find(|(s, _)| *s == suffix)
            .map(|(_, unit)| *unit)
            .ok_or_else(|| SizeError::UnknownSuffix { input: input.to_string(), suffix: suffix.to_string() }),
    }
}

impl FromStr for Size {
    type Err = SizeError;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let s = raw.trim();
        if s.is_empty() {
            return Err(SizeError::Empty);
        }
        if s.starts_with('-') {
            return Err(SizeError::Negative(s.to_string()));
        }
        let s_unsigned = s.strip_prefix('+').unwrap_or(s);
        let split = s_unsigned.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s_unsigned.len());
        let (number, suffix) = s_unsigned.split_at(split);
        let (whole, frac) = match number.split_once('.') {
            Some((w, f)) => (w, f),
            None => (number, ""),
        };
        let digits_ok = |d: &str| d.chars().all(|c| c.is_ascii_digit());
        if (whole.is_empty() && frac.is_empty()) || !digits_ok(whole) || !digits_ok(frac) {
            return Err(SizeError::Malformed(s.to_string()));
        }
        let mult = multiplier(s, suffix, number)?;
        let overflow = || SizeError::Overflow(s.to_string());
        let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| overflow())? };
        // Fractions are exact: value = whole*mult + ceil(frac * mult / 10^len(frac)).
        let frac_digits = frac.trim_end_matches('0');
        if frac_digits.len() > 18 {
            return Err(SizeError::Malformed(s.to_string()));
        }
        let frac_num: u128 = if frac_digits.is_empty() { 0 } else { frac_digits.parse().map_err(|_| overflow())? };
        let frac_den = 10u128.pow(frac_digits.len() as u32);
        let mult = u128::from(mult);
        let total = whole
            .checked_mul(mult)
            .and_then(|w| w.checked_add((frac_num * mult).div_ceil(frac_den)))
            .ok_or_else(overflow)?;
        u64::try_from(total).map(Size).map_err(|_| overflow())
    }
}

impl fmt::Display for Size {
    /// Binary units with one decimal: `0 B`, `512 B`, `64.0 MiB`, `1.5 GiB`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        let b = self.0;
        if b < KI {
            return write!(f, "{b} B");
        }
        let mut value = b as f64 / KI as f64;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        write!(f, "{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> Result<u64, SizeError> {
        s.parse::<Size>().map(|s| s.0)
    }

    #[test]
    fn accepts_kubernetes_quantities() {
        assert_eq!(p("64Mi"), Ok(64 << 20));
        assert_eq!(p("1Gi"), Ok(1 << 30));
        assert_eq!(p("500M"), Ok(500_000_000));
        assert_eq!(p("1536Ki"), Ok(1536 * 1024));
        assert_eq!(p("1048576"), Ok(1 << 20));
        assert_eq!(p("1.5Gi"), Ok(3 << 29));
        assert_eq!(p(" 2k "), Ok(2000));
        assert_eq!(p("0.5Ki"), Ok(512));
        assert_eq!(p("+1Mi"), Ok(1 << 20));
        assert_eq!(p("1.0000000001"), Ok(2), "fractions of a byte round up");
    }

    #[test]
    fn refuses_bad_input_with_a_hint() {
        assert!(matches!(p("abc"), Err(SizeError::Malformed(_))));
        assert!(matches!(p("-5Mi"), Err(SizeError::Negative(_))));
        assert!(matches!(p(""), Err(SizeError::Empty)));
        assert!(matches!(p("12Qi"), Err(SizeError::UnknownSuffix { .. })));
        assert!(matches!(p("64K"), Err(SizeError::AmbiguousK(..))));
        assert!(matches!(p("1..2Mi"), Err(SizeError::Malformed(_))));
        assert!(matches!(p("."), Err(SizeError::Malformed(_))));
        assert!(matches!(p("Mi"), Err(SizeError::Malformed(_))));
        assert!(matches!(p("17Ei"), Err(SizeError::Overflow(_))));
        assert!(matches!(p("99999999999999999999999999999"), Err(SizeError::Overflow(_))));
        assert!(matches!(Size::parse_limit("0"), Err(SizeError::Zero(_))));
        assert!(matches!(Size::parse_limit("0Mi"), Err(SizeError::Zero(_))));
        let msg = p("-5Mi").unwrap_err().to_string();
        assert!(msg.contains("64Mi"), "{msg}");
    }

    #[test]
    fn displays_binary_units() {
        assert_eq!(Size(0).to_string(), "0 B");
        assert_eq!(Size(1023).to_string(), "1023 B");
        assert_eq!(Size(64 << 20).to_string(), "64.0 MiB");
        assert_eq!(Size(3 << 29).to_string(), "1.5 GiB");
    }

    #[test]
    fn quantities_are_what_users_write() {
        assert_eq!(Size(64 << 20).quantity(), "64Mi");
        assert_eq!(Size(3 << 29).quantity(), "1536Mi", "1.5Gi, exactly");
        assert_eq!(Size(500_000_000).quantity(), "500M");
        assert_eq!(Size(2000).quantity(), "2k");
        assert_eq!(Size(1 << 60).quantity(), "1Ei");
        assert_eq!(Size(1023).quantity(), "1023");
        assert_eq!(Size(0).quantity(), "0");
        assert_eq!(Size(u64::MAX).quantity(), u64::MAX.to_string());
    }

    proptest! {
        #[test]
        fn never_panics(s in ".{0,24}") {
            let _ = s.parse::<Size>();
        }

        #[test]
        fn a_quantity_parses_back_to_its_size(n: u64, shift in 0u32..64) {
            for b in [n, n >> shift << shift, (n >> shift).saturating_mul(1000)] {
                prop_assert_eq!(p(&Size(b).quantity()), Ok(b));
            }
        }

        #[test]
        fn binary_suffixes_roundtrip(n in 0u64..(1 << 40), i in 0usize..4) {
            let (suffix, shift) = [("", 0), ("Ki", 10), ("Mi", 20), ("Gi", 30)][i];
            let n = n >> shift;
            prop_assert_eq!(p(&format!("{n}{suffix}")), Ok(n << shift));
        }
    }
}
