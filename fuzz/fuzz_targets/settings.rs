//! A container's settings: `settings::resolve(annotations, listenerMetadata)`.
//!
//! Input: UTF-8 lines. The first is `listenerMetadata` (absent when it starts with `#`); each
//! other line is an annotation, `key<TAB>value`.
//!
//! Asserts, beyond not panicking:
//! - bad settings are refused, never ignored: any `heapcap.io/` annotation with an unknown key, a
//!   value that is not a positive size (`-5Mi`, `0`, `lots`), a mode other than enforce/audit, a
//!   strict flag that is no yes or no word, or a machine memory other than quota/host makes
//!   `resolve` fail;
//! - annotations win: a successful result has, for each key an annotation gives, what its last
//!   annotation says; `None` only when no annotation is a `heapcap.io/` one;
//! - quotas are never 0;
//! - the result, written back as `key=value` metadata, as JSON-like metadata or as annotations,
//!   resolves to the same settings.
#![no_main]

use heapcap_policy::ledger::{Counting, Mode};
use heapcap_policy::machine::MachineMemory;
use heapcap_policy::settings::{resolve, Settings, LIMIT, MACHINE_MEMORY, MODE, STRICT, TOTAL_LIMIT};
use heapcap_policy::size::Size;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut lines = text.split('\n');
    let metadata = lines.next().filter(|m| !m.starts_with('#'));
    let annotations: Vec<(&str, &str)> = lines.map(|l| l.split_once('\t').unwrap_or((l, ""))).collect();
    let result = resolve(annotations.iter().copied(), metadata);

    let ours: Vec<(&str, &str)> = annotations.iter().copied().filter(|(k, _)| k.starts_with("heapcap.io/")).collect();
    let bad = ours.iter().find(|(k, v)| match *k {
        LIMIT | TOTAL_LIMIT => Size::parse_limit(v).is_err(),
        MODE => !matches!(v.trim(), "enforce" | "audit"),
        STRICT => yes_no(v).is_none(),
        MACHINE_MEMORY => !matches!(v.trim(), "quota" | "host"),
        _ => true,
    });
    if let Some(bad) = bad {
        assert!(result.is_err(), "bad annotation {bad:?} accepted: {result:?}");
        return;
    }
    let Ok(settings) = result else { return };
    let Some(settings) = settings else {
        assert!(ours.is_empty(), "heapcap annotations {ours:?} but no settings");
        return;
    };
    let last = |key: &str| ours.iter().rev().find(|(k, _)| *k == key).map(|(_, v)| *v);
    let size = |v: &str| Size::parse_limit(v).expect("checked above").bytes();
    if let Some(v) = last(LIMIT) {
        assert_eq!(settings.limits.process, Some(size(v)), "the annotation {LIMIT}={v:?} did not win");
    }
    if let Some(v) = last(TOTAL_LIMIT) {
        assert_eq!(settings.limits.total, Some(size(v)), "the annotation {TOTAL_LIMIT}={v:?} did not win");
    }
    if let Some(v) = last(MODE) {
        let mode = if v.trim() == "audit" { Mode::Audit } else { Mode::Enforce };
        assert_eq!(settings.mode, mode, "the annotation {MODE}={v:?} did not win");
    }
    if let Some(v) = last(STRICT) {
        let counting = if yes_no(v) == Some(true) { Counting::Strict } else { Counting::Heap };
        assert_eq!(settings.counting, counting, "the annotation {STRICT}={v:?} did not win");
    }
    if let Some(v) = last(MACHINE_MEMORY) {
        let machine = if v.trim() == "host" { MachineMemory::Host } else { MachineMemory::Quota };
        assert_eq!(settings.machine, machine, "the annotation {MACHINE_MEMORY}={v:?} did not win");
    }
    assert_ne!(settings.limits.process, Some(0));
    assert_ne!(settings.limits.total, Some(0));

    let pairs = canonical(&settings);
    let kv = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ");
    let json = pairs.iter().map(|(k, v)| format!("\"{k}\": \"{v}\"")).collect::<Vec<_>>().join(", ");
    let json = format!("{{{json}}}");
    let as_annotations = pairs.iter().map(|(k, v)| (*k, v.as_str()));
    for (how, again) in [
        ("key=value metadata", resolve([], Some(&kv))),
        ("JSON-like metadata", resolve([], Some(&json))),
        ("annotations", resolve(as_annotations, None)),
    ] {
        assert_eq!(again, Ok(Some(settings)), "{settings:?} written as {how} ({kv}) reads back differently");
    }
});

/// The settings as `heapcap.io/` key/value pairs, sizes in bytes.
fn canonical(settings: &Settings) -> Vec<(&'static str, String)> {
    let mode = match settings.mode {
        Mode::Enforce => "enforce",
        Mode::Audit => "audit",
    };
    let strict = settings.counting == Counting::Strict;
    let machine = match settings.machine {
        MachineMemory::Quota => "quota",
        MachineMemory::Host => "host",
    };
    let mut pairs = vec![(MODE, mode.to_string()), (STRICT, strict.to_string()), (MACHINE_MEMORY, machine.to_string())];
    pairs.extend(settings.limits.process.map(|b| (LIMIT, b.to_string())));
    pairs.extend(settings.limits.total.map(|b| (TOTAL_LIMIT, b.to_string())));
    pairs
}

/// The yes and no words the settings take, in any case (the documented set, written out here so
/// that the target does not check the parser with itself).
fn yes_no(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}
