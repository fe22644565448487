//! heapcap's notify rules merged into a user's seccomp profile: an OCI `LinuxSeccomp`
//! (`merge_into`) or a containers/common profile (`ContainersProfile::merge`, podman's
//! `seccomp.json` format).
//!
//! Input: one byte (even: OCI, odd: containers/common), then the profile's JSON.
//!
//! Asserts, beyond not panicking:
//! - on failure the profile is unchanged;
//! - on success it has heapcapd's `listenerPath` and the metadata, and writing it out and
//!   reading it back gives the same profile;
//! - a second merge is refused (the profile already has a listener) and changes nothing.
#![no_main]

use std::path::Path;

use heapcap_oci::{merge_into, ContainersProfile, MergeError};
use libfuzzer_sys::fuzz_target;
use oci_spec::runtime::LinuxSeccomp;
use serde::de::DeserializeOwned;
use serde::Serialize;

const SOCKET: &str = "/run/heapcap/heapcapd.sock";
const METADATA: &str = "heapcap.io/limit=64Mi";

fn check<P, F>(json: &[u8], merge: F, listener: fn(&P) -> (Option<&Path>, Option<&str>))
where
    P: Clone + PartialEq + std::fmt::Debug + Serialize + DeserializeOwned,
    F: Fn(&mut P) -> Result<(), MergeError>,
{
    let Ok(original) = serde_json::from_slice::<P>(json) else { return };
    let mut profile = original.clone();
    if merge(&mut profile).is_err() {
        assert_eq!(profile, original, "a failed merge changed the profile");
        return;
    }
    assert_eq!(listener(&profile), (Some(Path::new(SOCKET)), Some(METADATA)));
    let text = serde_json::to_string(&profile).expect("a merged profile can be written");
    let back: P = serde_json::from_str(&text).unwrap_or_else(|e| panic!("the merged profile does not read back: {e}"));
    assert_eq!(back, profile, "the merged profile reads back differently");
    let merged = profile.clone();
    assert!(matches!(merge(&mut profile), Err(MergeError::HasListener { .. })), "merged twice");
    assert_eq!(profile, merged, "a refused second merge changed the profile");
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, json)) = data.split_first() else { return };
    if kind % 2 == 0 {
        check::<LinuxSeccomp, _>(
            json,
            |p| merge_into(p, Path::new(SOCKET), Some(METADATA)),
            |p| (p.listener_path().as_deref(), p.listener_metadata().as_deref()),
        );
    } else {
        check::<ContainersProfile, _>(
            json,
            |p| p.merge(Path::new(SOCKET), Some(METADATA)),
            |p| (p.listener_path.as_deref(), p.listener_metadata.as_deref()),
        );
    }
});
