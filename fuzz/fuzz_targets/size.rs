//! `Size` parsing (`--limit`, `heapcap.io/limit`, `set-limit`): Kubernetes quantities.
//!
//! Asserts, beyond not panicking:
//! - `parse_limit` is `parse` minus zero, and never gives 0;
//! - a leading `-` is always refused as negative (`-5Mi`);
//! - surrounding whitespace and a leading `+` do not change the value;
//! - the value is within the written number's range (`whole * unit <= bytes <= (whole + 1) * unit`,
//!   exactly `whole * unit` without a non-zero fraction), computed here in u128: no overflow or wrap;
//! - the byte count re-parses to the same bytes, and so does its `quantity()` (`1536Mi`); what
//!   `Display` prints (`64.0 MiB`) re-parses (as `64.0Mi`) to within its rounding (a twentieth of
//!   its unit).
#![no_main]

use heapcap_policy::size::{Size, SizeError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let parsed = s.parse::<Size>();
    let limit = Size::parse_limit(s);
    match (&parsed, &limit) {
        (Ok(Size(0)), Err(SizeError::Zero(_))) => {}
        (Ok(a), Ok(b)) => assert_eq!(a, b, "parse_limit({s:?}) differs from parse"),
        (Err(a), Err(b)) => assert_eq!(a, b, "parse_limit({s:?}) fails differently from parse"),
        (p, l) => panic!("parse({s:?}) = {p:?} but parse_limit = {l:?}"),
    }
    if let Ok(l) = limit {
        assert!(l.bytes() > 0, "parse_limit({s:?}) gave 0");
    }
    let t = s.trim();
    if t.starts_with('-') {
        assert!(matches!(parsed, Err(SizeError::Negative(_))), "{s:?} is negative but gave {parsed:?}");
    }
    let Ok(size) = parsed else { return };

    assert_eq!(format!(" \t{s}\n ").parse::<Size>(), Ok(size), "whitespace around {s:?} changed it");
    if !t.starts_with('+') {
        assert_eq!(format!("+{t}").parse::<Size>(), Ok(size), "a '+' before {s:?} changed it");
    }
    check_range(t, size);
    assert_eq!(size.bytes().to_string().parse::<Size>(), Ok(size), "the byte count of {s:?} does not re-parse");
    let quantity = size.quantity();
    assert_eq!(quantity.parse::<Size>(), Ok(size), "{s:?} written as {quantity:?} does not re-parse");
    check_display(size);
});

fn unit(suffix: &str) -> Option<u128> {
    let (base, power): (u128, u32) = match suffix {
        "" => return Some(1),
        "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => (1024, 1 + "KMGTPE".find(&suffix[..1])? as u32),
        "k" | "M" | "G" | "T" | "P" | "E" => (1000, 1 + "kMGTPE".find(suffix)? as u32),
        _ => return None,
    };
    Some(base.pow(power))
}

/// The value lies within what the digits say, in exact u128 arithmetic.
fn check_range(t: &str, size: Size) {
    let t = t.strip_prefix('+').unwrap_or(t);
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, suffix) = t.split_at(split);
    let Some(unit) = unit(suffix) else { panic!("{t:?} parsed with an unknown suffix {suffix:?}") };
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    assert!(!whole.contains('.') && !frac.contains('.'), "{t:?} parsed with two dots");
    let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().expect("whole part parses") };
    let low = whole.checked_mul(unit).expect("a parsed size's whole part fits in u128");
    let bytes = u128::from(size.bytes());
    if frac.bytes().all(|b| b == b'0') {
        assert_eq!(bytes, low, "{t:?}: no fraction, so exactly whole * unit");
    } else {
        assert!(low < bytes && bytes <= low + unit, "{t:?} = {bytes} is outside ({low}, {}]", low + unit);
    }
}

/// `Display` says `N B` exactly, or the value in its unit rounded to one decimal.
fn check_display(size: Size) {
    let shown = size.to_string();
    let (number, unit) = shown.split_once(' ').expect("Display is 'NUMBER UNIT'");
    let b = size.bytes();
    if unit == "B" {
        assert!(b < 1024, "{b} shown as {shown}");
        assert_eq!(number.parse::<u64>(), Ok(b), "{b} shown as {shown}");
        return;
    }
    let suffix = unit.strip_suffix('B').expect("a binary unit");
    assert!(suffix.ends_with('i'), "{b} shown as {shown}");
    let (_, decimals) = number.split_once('.').expect("one decimal");
    assert_eq!(decimals.len(), 1, "{b} shown as {shown}");
    let step = unit_bytes(suffix);
    // Rounding to a tenth, plus f64's 53 bits, plus the parser's rounding up of a fraction.
    let tolerance = step / 20 + (u128::from(b) >> 50) + 2;
    match format!("{number}{suffix}").parse::<Size>() {
        Ok(back) => {
            let diff = u128::from(back.bytes()).abs_diff(u128::from(b));
            assert!(diff <= tolerance, "{b} shown as {shown}, which reads back as {}", back.bytes());
        }
        // 16.0 EiB is one past the largest size: only a value that rounds up to it.
        Err(SizeError::Overflow(_)) => {
            assert!(u128::from(b) + tolerance > u128::from(u64::MAX), "{b} shown as {shown}, which overflows")
        }
        Err(e) => panic!("{b} shown as {shown}, which does not read back: {e}"),
    }
}

fn unit_bytes(suffix: &str) -> u128 {
    unit(suffix).unwrap_or_else(|| panic!("Display used an unknown unit {suffix:?}"))
}
