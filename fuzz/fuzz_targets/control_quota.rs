//! The quota value of `set-limit` (`256Mi`, `none`, `unlimited`): `heapcap_policy::Quota`, which the
//! CLI parses before sending and the control protocol carries as text to heapcapd.
//!
//! Asserts, beyond not panicking:
//! - `none`/`unlimited` (with any whitespace around) remove the quota;
//! - otherwise the quota is exactly `Size::parse_limit`: never 0, a negative one refused;
//! - a quota written out (`Display`, what the protocol carries) reads back as the same quota, and
//!   a `set-limit` request carrying it reads back as the same request: what the CLI sends is what
//!   heapcapd reads.
#![no_main]

use heapcap_control::Request;
use heapcap_policy::{Quota, Size};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let quota = s.parse::<Quota>();
    let t = s.trim();
    match &quota {
        Ok(Quota::Unlimited) => assert!(t == "none" || t == "unlimited", "{s:?} removed the quota"),
        Ok(Quota::Limit(size)) => {
            assert!(size.bytes() > 0, "{s:?} gave a quota of 0");
            assert_eq!(Size::parse_limit(s), Ok(*size));
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    if t.starts_with('-') {
        assert!(quota.is_err(), "negative {s:?} accepted");
    }
    let Ok(quota) = quota else { return };
    let text = quota.to_string();
    assert_eq!(text.parse::<Quota>(), Ok(quota), "{s:?} written as {text:?}");
    let request = Request::SetLimit { container: "c1".into(), pid: None, limit: Some(quota), total: Some(quota) };
    let line = serde_json::to_string(&request).expect("a request can be written");
    assert!(line.contains(&format!("\"limit\":{}", serde_json::Value::from(text))), "{line}");
    let back: Request = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?} does not read back: {e}"));
    assert_eq!(back, request, "{line:?}");
});
