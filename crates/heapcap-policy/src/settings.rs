//! A container's heapcap settings, from its OCI annotations or its seccomp `listenerMetadata`.
//!
//! Keys: `heapcap.io/limit` (quota for each process), `heapcap.io/total-limit` (for all the
//! container's processes together), `heapcap.io/mode` (`enforce`, the default, or `audit`),
//! `heapcap.io/strict` (`true`: count what no program can step around, see [`Counting`]; `false`,
//! the default; also `1`/`0`, `yes`/`no`, `on`/`off`),
//! `heapcap.io/machine-memory` (`quota`, the default: where a quota is enforced, programs see it as
//! their machine's memory; or `host`, see [`crate::machine`]).
//! `listenerMetadata` carries the same keys for setups that cannot set annotations, as
//! `key=value` pairs separated by spaces, commas or semicolons, or as a JSON-like object
//! `{"heapcap.io/limit": "64Mi"}`; where both give a key, the annotation wins.

use crate::ledger::{Counting, Limits, Mode};
use crate::machine::MachineMemory;
use crate::size::{Size, SizeError};

pub const LIMIT: &str = "heapcap.io/limit";
pub const TOTAL_LIMIT: &str = "heapcap.io/total-limit";
pub const MODE: &str = "heapcap.io/mode";
pub const MACHINE_MEMORY: &str = "heapcap.io/machine-memory";
pub const STRICT: &str = "heapcap.io/strict";
const PREFIX: &str = "heapcap.io/";

/// What a container asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settings {
    pub limits: Limits,
    pub mode: Mode,
    pub counting: Counting,
    pub machine: MachineMemory,
}

impl Settings {
    /// A quota is enforced and the process is to see it as its machine's memory: its filter sends
    /// `sysinfo` too ([`crate::rules::MACHINE`]).
    pub fn quota_as_machine(&self) -> bool {
        self.machine == MachineMemory::Quota
            && self.mode == Mode::Enforce
            && (self.limits.process.is_some() || self.limits.total.is_some())
    }
}

/// A bad setting; the message says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error("{key}: {source}")]
    Size { key: &'static str, source: SizeError },
    #[error("{MODE}: '{0}' is not a mode: write enforce or audit")]
    Mode(String),
    #[error("{STRICT}: '{0}' is not a yes or a no: write true or false")]
    Strict(String),
    #[error("{MACHINE_MEMORY}: {0}")]
    MachineMemory(#[from] crate::machine::MachineMemoryError),
    #[error("unknown setting '{0}': heapcap knows {LIMIT}, {TOTAL_LIMIT}, {MODE}, {STRICT} and {MACHINE_MEMORY}")]
    UnknownKey(String),
    #[error("listenerMetadata: cannot read '{0}': write key=value pairs such as {LIMIT}=64Mi")]
    Metadata(String),
}

fn apply(settings: &mut Settings, key: &str, value: &str) -> Result<(), SettingsError> {
    match key {
        LIMIT => {
            let size = Size::parse_limit(value).map_err(|source| SettingsError::Size { key: LIMIT, source })?;
            settings.limits.process = Some(size.bytes());
        }
        TOTAL_LIMIT => {
            let size = Size::parse_limit(value).map_err(|source| SettingsError::Size { key: TOTAL_LIMIT, source })?;
            settings.limits.total = Some(size.bytes());
        }
        MODE => {
            let value = value.trim();
            settings.mode = value.parse::<Mode>().map_err(|_| SettingsError::Mode(value.to_string()))?;
        }
        MACHINE_MEMORY => settings.machine = value.parse()?,
        STRICT => {
            settings.counting =
                Counting::from_strict(parse_yes_no(value).ok_or_else(|| SettingsError::Strict(value.to_string()))?);
        }
        other => return Err(SettingsError::UnknownKey(other.to_string())),
    }
    Ok(())
}

/// `true`/`false` and the yes and no words the environment flags take (`1`, `yes`, `on`; `0`,
/// `no`, `off`), in any case.
fn parse_yes_no(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// Split `listenerMetadata` into key/value pairs (only `heapcap.io/` keys are kept).
fn metadata_pairs(metadata: &str) -> Result<Vec<(String, String)>, SettingsError> {
    let body = metadata.trim();
    let (body, json) = match body.strip_prefix('{').and_then(|b| b.strip_suffix('}')) {
        Some(inner) => (inner, true),
        None => (body, false),
    };
    let mut pairs = Vec::new();
    for item in body.split(|c: char| c == ',' || c == ';' || (!json && c.is_whitespace())) {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let sep = if json { ':' } else { '=' };
        let Some((k, v)) = item.split_once(sep) else {
            return Err(SettingsError::Metadata(item.to_string()));
        };
        let unquote = |s: &str| s.trim().trim_matches('"').to_string();
        let (k, v) = (unquote(k), unquote(v));
        if k.starts_with(PREFIX) {
            pairs.push((k, v));
        }
    }
    Ok(pairs)
}

/// The settings of a container: `None` when neither source names a `heapcap.io/` key.
pub fn resolve<'a>(
    annotations: impl IntoIterator<Item = (&'a str, &'a str)>,
    metadata: Option<&str>,
) -> Result<Option<Settings>, SettingsError> {
    let mut settings = Settings::default();
    let mut any = false;
    let meta = metadata.map(metadata_pairs).transpose()?.unwrap_or_default();
    let mut ann: Vec<(&str, &str)> = annotations.into_iter().filter(|(k, _)| k.starts_with(PREFIX)).collect();
    // Annotations come from hash maps: in key order, the error named for several bad keys is
    // the same on every run.
    ann.sort_by_key(|(k, _)| *k); // stable: of repeated keys the last still wins
    for (k, v) in meta.iter().filter(|(k, _)| !ann.iter().any(|(a, _)| a == k)) {
        apply(&mut settings, k, v)?;
        any = true;
    }
    for (k, v) in ann {
        apply(&mut settings, k, v)?;
        any = true;
    }
    Ok(any.then_some(settings))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn annotations_give_the_settings() {
        let s = resolve([(LIMIT, "64Mi"), (TOTAL_LIMIT, "1Gi"), ("io.kubernetes.pod", "x")], None).unwrap();
        assert_eq!(
            s,
            Some(Settings {
                limits: Limits { process: Some(64 * MIB), total: Some(1024 * MIB) },
                mode: Mode::Enforce,
                counting: Counting::Heap,
                machine: MachineMemory::Quota,
            })
        );
        let s = s.unwrap();
        assert!(s.quota_as_machine(), "on by default where a quota is enforced");
        let host = resolve([(LIMIT, "64Mi"), (MACHINE_MEMORY, "host")], None).unwrap().unwrap();
        assert_eq!(host.machine, MachineMemory::Host);
        assert!(!host.quota_as_machine(), "the opt-out");
        let audit = resolve([(LIMIT, "64Mi"), (MODE, "audit")], None).unwrap().unwrap();
        assert!(!audit.quota_as_machine(), "audit mode observes only");
        let none = resolve([(MACHINE_MEMORY, "quota")], None).unwrap().unwrap();
        assert!(!none.quota_as_machine(), "no quota, nothing to see");
        let s = resolve([(MODE, "audit")], None).unwrap().unwrap();
        assert_eq!(s.mode, Mode::Audit);
        assert_eq!(resolve([("other", "1")], None).unwrap(), None, "no heapcap key: not ours");
    }

    #[test]
    fn several_bad_keys_name_the_same_one_whatever_the_order() {
        let pairs = [(MODE, "strict"), (LIMIT, "lots"), ("heapcap.io/zzz", "1")];
        let first = resolve(pairs, None).unwrap_err();
        let mut reversed = pairs;
        reversed.reverse();
        assert_eq!(resolve(reversed, None).unwrap_err(), first);
        assert!(first.to_string().contains(LIMIT), "{first}");
        // Sorted by key only: of a key given twice the last still wins.
        let s = resolve([(LIMIT, "64Mi"), (MODE, "audit"), (LIMIT, "1Mi")], None).unwrap().unwrap();
        assert_eq!(s.limits.process, Some(MIB));
    }

    #[test]
    fn metadata_carries_the_same_keys_and_annotations_win() {
        let s = resolve([], Some("heapcap.io/limit=32Mi, heapcap.io/mode=audit")).unwrap().unwrap();
        assert_eq!((s.limits.process, s.mode), (Some(32 * MIB), Mode::Audit));
        let s = resolve([(LIMIT, "64Mi")], Some(r#"{"heapcap.io/limit": "32Mi"}"#)).unwrap().unwrap();
        assert_eq!(s.limits.process, Some(64 * MIB));
        assert_eq!(resolve([], Some("owner=team-a")).unwrap(), None, "foreign metadata is ignored");
    }

    #[test]
    fn bad_values_say_what_to_write() {
        let e = resolve([(LIMIT, "lots")], None).unwrap_err();
        assert!(e.to_string().starts_with("heapcap.io/limit: 'lots' is not a size"), "{e}");
        assert!(matches!(resolve([(LIMIT, "-5Mi")], None), Err(SettingsError::Size { .. })));
        assert!(matches!(resolve([(LIMIT, "0")], None), Err(SettingsError::Size { .. })));
        let e = resolve([(MODE, "strict")], None).unwrap_err();
        assert!(e.to_string().contains("enforce or audit"), "{e}");
        let e = resolve([(MACHINE_MEMORY, "off")], None).unwrap_err();
        assert!(
            e.to_string().starts_with("heapcap.io/machine-memory: 'off' is not a machine memory: write quota"),
            "{e}"
        );
        let e = resolve([("heapcap.io/limits", "64Mi")], None).unwrap_err();
        assert!(e.to_string().contains("heapcap.io/limit,"), "{e}");
        assert!(matches!(resolve([], Some("heapcap.io/limit")), Err(SettingsError::Metadata(_))));
        let e = resolve([(STRICT, "maybe")], None).unwrap_err();
        assert_eq!(e.to_string(), "heapcap.io/strict: 'maybe' is not a yes or a no: write true or false");
    }

    #[test]
    fn strict_from_annotations_and_metadata() {
        let s = resolve([(STRICT, "true"), (LIMIT, "64Mi")], None).unwrap().unwrap();
        assert_eq!(s.counting, Counting::Strict);
        let s = resolve([(STRICT, "false")], Some("heapcap.io/strict=1")).unwrap().unwrap();
        assert_eq!(s.counting, Counting::Heap, "annotations win");
        let s = resolve([], Some("heapcap.io/strict=yes heapcap.io/limit=1Mi")).unwrap().unwrap();
        assert_eq!(s.counting, Counting::Strict);
    }

    proptest! {
        #[test]
        fn never_panics(k in "heapcap\\.io/[a-z-]{0,12}", v in "\\PC{0,16}", m in "\\PC{0,40}") {
            let _ = resolve([(k.as_str(), v.as_str())], Some(&m));
        }
    }
}
