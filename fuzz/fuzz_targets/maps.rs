//! `/proc/<pid>/maps` parsing and its range queries (`heapcap_policy::maps`).
//!
//! Input: three little-endian u64 (a query range `[start, end)` and an address), then the maps
//! text (lossily UTF-8).
//!
//! Asserts, beyond not panicking:
//! - `Maps::parse` keeps one mapping per non-empty line, each what `parse_line` makes of it, with
//!   `start <= end`;
//! - counted bytes never exceed the sum of the mappings' lengths (nor, in a range, the sum of
//!   their overlaps with it), and a range never counts more than the whole;
//! - on a consistent read (mappings sorted and disjoint, as the kernel lists them) the range
//!   queries equal a naive scan, counted plus protect-growth bytes fit in the range, `[0, max)`
//!   counts everything, and `containing`/`heap_end` find what a scan finds;
//! - each mapping, written back as a canonical maps line, parses to the same mapping.
#![no_main]

use heapcap_policy::maps::{parse_line, Maps, Vma};
use libfuzzer_sys::fuzz_target;

fn word(data: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(chunk) = data.get(i * 8..) {
        let n = chunk.len().min(8);
        b[..n].copy_from_slice(&chunk[..n]);
    }
    u64::from_le_bytes(b)
}

fn overlap(v: &Vma, start: u64, end: u64) -> u64 {
    v.end.min(end).saturating_sub(v.start.max(start))
}

fn saturate(x: u128) -> u64 {
    u64::try_from(x).unwrap_or(u64::MAX)
}

fn sum(values: impl Iterator<Item = u64>) -> u128 {
    values.map(u128::from).sum()
}

fuzz_target!(|data: &[u8]| {
    let (start, end, addr) = (word(data, 0), word(data, 1), word(data, 2));
    let text = String::from_utf8_lossy(data.get(24..).unwrap_or_default());
    let Ok(maps) = Maps::parse(&text) else { return };
    let vmas = maps.vmas();

    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(vmas.len(), lines.len(), "one mapping per line");
    for (vma, line) in vmas.iter().zip(&lines) {
        assert_eq!(parse_line(line).as_ref(), Some(vma), "{line:?}");
        assert!(vma.start <= vma.end && vma.len() == vma.end - vma.start && vma.is_empty() == (vma.start == vma.end));
        let back = render(vma);
        assert_eq!(parse_line(&back).as_ref(), Some(vma), "{vma:?} written as {back:?}");
    }

    let counted = maps.counted();
    assert!(u128::from(counted) <= sum(vmas.iter().map(Vma::len)), "counted more than was mapped");
    assert_eq!(counted, saturate(sum(vmas.iter().filter(|v| v.counted()).map(Vma::len))));
    let counted_in = maps.counted_in(start, end);
    let growth = maps.protect_growth(start, end);
    assert!(counted_in <= counted, "a range counted more than the whole");
    assert!(u128::from(counted_in) <= sum(vmas.iter().filter(|v| v.counted()).map(|v| overlap(v, start, end))));
    assert!(u128::from(growth) <= sum(vmas.iter().filter(|v| v.anon_private).map(|v| overlap(v, start, end))));
    let _ = (maps.containing(addr), maps.heap_end());

    // What the kernel lists in one consistent read: sorted, disjoint.
    if !vmas.windows(2).all(|w| w[0].end <= w[1].start) {
        return;
    }
    let naive_counted = sum(vmas.iter().filter(|v| v.counted()).map(|v| overlap(v, start, end)));
    let naive_growth = sum(vmas.iter().filter(|v| v.anon_private && !v.writable).map(|v| overlap(v, start, end)));
    assert_eq!(u128::from(counted_in), naive_counted, "counted_in({start:#x}, {end:#x})");
    assert_eq!(u128::from(growth), naive_growth, "protect_growth({start:#x}, {end:#x})");
    assert!(naive_counted + naive_growth <= u128::from(end.saturating_sub(start)));
    assert_eq!(maps.counted_in(0, u64::MAX), counted, "the whole address space");
    let naive_containing = vmas.iter().find(|v| v.start <= addr && addr < v.end);
    assert_eq!(maps.containing(addr), naive_containing, "containing({addr:#x})");
    assert_eq!(maps.heap_end(), vmas.iter().find(|v| v.is_heap).map(|v| v.end));
    assert_eq!(Maps::from_vmas(vmas.to_vec()), maps, "already sorted");
});

/// A maps line the kernel could have written for `vma` (its device and inode as read, or text
/// that does not read as one where the parse kept the unknown marker).
fn render(vma: &Vma) -> String {
    let w = if vma.writable { 'w' } else { '-' };
    let dev = match vma.dev {
        u64::MAX => "?:?".to_string(),
        d => format!("{:02x}:{:02x}", d >> 32, d & 0xffff_ffff),
    };
    let inode = match vma.inode {
        u64::MAX => "?".to_string(),
        i => i.to_string(),
    };
    let path = if vma.is_heap {
        "[heap]"
    } else if vma.is_stack {
        "[stack]"
    } else if vma.anon_private || (vma.shared && vma.inode == 0) {
        ""
    } else {
        "/file"
    };
    // Neither `p` nor `s` (never from the kernel): what keeps an anonymous-looking mapping
    // that is not private anonymous so.
    let looks_anonymous = vma.inode == 0 && (path.is_empty() || path == "[heap]");
    let share = match (vma.shared, vma.anon_private) {
        (true, _) => 's',
        (false, false) if looks_anonymous => '-',
        _ => 'p',
    };
    format!("{:x}-{:x} r{w}x{share} 00000000 {dev} {inode}                          {path}", vma.start, vma.end)
}
