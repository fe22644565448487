//! The quota value of `set-limit` (`256Mi`, `none`, `unlimited`), as the CLI checks it and as
//! heapcapd reads it.
//!
//! Both functions are private to their binaries (`heapcap/src/main.rs`, `heapcapd/src/control.rs`),
//! so they are copied here verbatim; keep them in step (or move them to heapcap-control).
//!
//! Asserts, beyond not panicking:
//! - `none`/`unlimited` (with any whitespace around) remove the quota;
//! - otherwise the quota is exactly `Size::parse_limit`: never 0, a negative one refused;
//! - the CLI lets through exactly what heapcapd accepts, and what it sends reads the same.
#![no_main]

use heapcap_policy::Size;
use libfuzzer_sys::fuzz_target;

/// heapcapd's `parse_quota` (crates/heapcapd/src/control.rs).
fn daemon_parse_quota(value: &str) -> Result<Option<u64>, String> {
    match value.trim() {
        "none" | "unlimited" => Ok(None),
        v => Size::parse_limit(v).map(|s| Some(s.bytes())).map_err(|e| e.to_string()),
    }
}

/// The CLI's `parse_quota` (crates/heapcap/src/main.rs).
fn cli_parse_quota(s: &str) -> Result<String, String> {
    match s.trim() {
        "none" | "unlimited" => Ok(s.trim().to_string()),
        v => Size::parse_limit(v).map(|_| v.to_string()).map_err(|e| e.to_string()),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let daemon = daemon_parse_quota(s);
    let t = s.trim();
    match &daemon {
        Ok(None) => assert!(t == "none" || t == "unlimited", "{s:?} removed the quota"),
        Ok(Some(bytes)) => {
            assert!(*bytes > 0, "{s:?} gave a quota of 0");
            assert_eq!(Size::parse_limit(s).map(Size::bytes), Ok(*bytes));
        }
        Err(e) => assert!(!e.is_empty()),
    }
    if t.starts_with('-') {
        assert!(daemon.is_err(), "negative {s:?} accepted");
    }
    match cli_parse_quota(s) {
        Ok(sent) => assert_eq!(daemon_parse_quota(&sent), daemon, "the CLI sends {sent:?} for {s:?}"),
        Err(e) => assert_eq!(daemon, Err(e), "the CLI and heapcapd disagree on {s:?}"),
    }
});
