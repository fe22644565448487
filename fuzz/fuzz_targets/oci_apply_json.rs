//! `heapcap_oci::spec::apply_json`: a container's `config.json` (a user file, through the
//! runtime shim and the precreate hook) changed for heapcap.
//!
//! Input: one flags byte (bit 0: read the container's env; bit 1: a default limit; bit 2: another
//! listener path than the README's), then the JSON.
//!
//! Asserts, beyond not panicking:
//! - a failure or `Unchanged` leaves the document as it was;
//! - `Changed` touches only `linux.seccomp`, which is a valid `LinuxSeccomp` with heapcapd's
//!   `listenerPath` and the outcome's metadata, and heapcapd, resolving the spec's annotations
//!   and that metadata, gets exactly the outcome's settings;
//! - a spec `oci-spec` could read before is still readable, and typed `apply` makes the same change;
//! - applying twice equals applying once.
#![no_main]

use std::collections::BTreeSet;

use heapcap_oci::spec::{apply, apply_json, Defaults, Outcome};
use heapcap_policy::settings::{resolve, LIMIT};
use libfuzzer_sys::fuzz_target;
use oci_spec::runtime::{LinuxSeccomp, Spec};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, json)) = data.split_first() else { return };
    let Ok(original) = serde_json::from_slice::<Value>(json) else { return };
    let defaults = Defaults {
        listener_path: if flags & 4 == 0 { "/run/heapcap/heapcapd.sock" } else { "/run/x/agent.sock" }.into(),
        settings: if flags & 2 == 0 { vec![] } else { vec![(LIMIT.to_string(), "64Mi".to_string())] },
        env_fallback: flags & 1 != 0,
    };
    let mut config = original.clone();
    let outcome = apply_json(&mut config, &defaults);
    let (settings, metadata) = match &outcome {
        Ok(Outcome::Changed { settings, metadata }) => (settings, metadata),
        Ok(Outcome::Unchanged) | Err(_) => {
            assert_eq!(config, original, "{outcome:?} but the document changed");
            typed_agrees(&original, &defaults, &outcome, &config);
            return;
        }
    };

    let (before, after) = (original.as_object().expect("an object"), config.as_object().expect("still an object"));
    let keys: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    for key in keys.into_iter().filter(|k| *k != "linux") {
        assert_eq!(before.get(key), after.get(key), "{key} changed");
    }
    let linux = after["linux"].as_object().expect("linux is an object");
    if let Some(old) = before.get("linux").and_then(Value::as_object) {
        for (key, value) in old.iter().filter(|(k, _)| *k != "seccomp") {
            assert_eq!(linux.get(key), Some(value), "linux.{key} changed");
        }
        assert_eq!(linux.len(), old.len() + usize::from(!old.contains_key("seccomp")), "linux gained fields");
    }
    let seccomp: LinuxSeccomp = serde_json::from_value(linux["seccomp"].clone()).expect("linux.seccomp is valid");
    assert_eq!(seccomp.listener_path().as_deref(), Some(defaults.listener_path.as_path()));
    assert_eq!(seccomp.listener_metadata().as_deref(), Some(metadata.as_str()));

    // What heapcapd will make of it: the spec's annotations plus listenerMetadata.
    let annotations: Vec<(&str, &str)> = after
        .get("annotations")
        .and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| (k.as_str(), v.as_str().expect("annotations are strings"))).collect())
        .unwrap_or_default();
    assert_eq!(resolve(annotations, Some(metadata)), Ok(Some(*settings)), "heapcapd would read other settings");

    if serde_json::from_value::<Spec>(original.clone()).is_ok() {
        serde_json::from_value::<Spec>(config.clone()).expect("a readable spec stays readable");
    }
    typed_agrees(&original, &defaults, &outcome, &config);

    let once = config.clone();
    let again = apply_json(&mut config, &defaults);
    assert!(matches!(again, Ok(Outcome::Unchanged)), "applied twice: {again:?}");
    assert_eq!(config, once, "applied twice differs from once");
});

/// Typed `apply` on the same spec, where `oci-spec` reads it, gives the same outcome and profile.
fn typed_agrees(
    original: &Value,
    defaults: &Defaults,
    outcome: &Result<Outcome, heapcap_oci::SpecError>,
    config: &Value,
) {
    // A spec is an object; serde would also build one (all defaults) from an array.
    if !original.is_object() {
        return;
    }
    let Ok(mut spec) = serde_json::from_value::<Spec>(original.clone()) else { return };
    let typed = apply(&mut spec, defaults);
    match (outcome, &typed) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "typed apply disagrees"),
        (Err(_), Err(_)) => return,
        (a, b) => panic!("apply_json gave {a:?}, typed apply {b:?}"),
    }
    let json_seccomp = config.get("linux").and_then(|l| l.get("seccomp")).filter(|s| !s.is_null());
    let json_seccomp = json_seccomp.map(|s| serde_json::from_value::<LinuxSeccomp>(s.clone()).expect("valid"));
    let typed_seccomp = spec.linux().as_ref().and_then(|l| l.seccomp().clone());
    assert_eq!(json_seccomp, typed_seccomp, "typed apply wrote another profile");
}
