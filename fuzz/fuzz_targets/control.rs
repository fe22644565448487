//! The control protocol (`heapcap_control`): JSON lines between `heapcap` and heapcapd.
//!
//! Input: one line as heapcapd or the CLI reads it.
//!
//! Asserts, beyond not panicking:
//! - heapcapd's way (`from_str` on the line) and `from_slice` agree;
//! - a `Request` that deserialises re-serialises to one line (no newline: the protocol is one
//!   JSON line) that deserialises, with or without its `\n`, to the same value;
//! - the same for each answer the CLI reads (`ps`, `set-limit`, `events`, errors), read the
//!   CLI's way (`Value` first, then the type).
#![no_main]

use heapcap_control::{Done, ErrorReply, Event, PsReply, Request};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(data: &[u8]) -> Option<T> {
    let value: T = serde_json::from_slice(data).ok()?;
    let line = serde_json::to_string(&value).expect("a value that was read can be written");
    assert!(!line.contains('\n'), "{value:?} is written over several lines: {line:?}");
    let back: T = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?} does not read back: {e}"));
    assert_eq!(back, value, "{line:?}");
    let back: T = serde_json::from_str(&format!("{line}\n")).expect("with its newline");
    assert_eq!(back, value);
    // The CLI reads a `Value` first, then the type.
    let generic: serde_json::Value = serde_json::from_str(&line).expect("valid JSON");
    let back: T = serde_json::from_value(generic).unwrap_or_else(|e| panic!("{line:?} via Value: {e}"));
    assert_eq!(back, value, "{line:?} via Value");
    Some(value)
}

fuzz_target!(|data: &[u8]| {
    let request = round_trip::<Request>(data);
    if let Ok(line) = std::str::from_utf8(data) {
        assert_eq!(serde_json::from_str::<Request>(line).ok(), request, "from_str and from_slice disagree on {line:?}");
    }
    round_trip::<PsReply>(data);
    round_trip::<Event>(data);
    round_trip::<Done>(data);
    round_trip::<ErrorReply>(data);
});
