//! The OCI seccomp agent message: what runc and crun send to `linux.seccomp.listenerPath` (and
//! what heapcap's own hook sends), parsed without I/O. One message per connection: the container
//! process state as JSON, with the fds it names in `fds` passed alongside as `SCM_RIGHTS`.
//!
//! [`parse`] takes the bytes read and how many fds came with them; the caller (heapcapd's intake)
//! owns the fds, keeps the one at [`AgentMessage::seccomp_fd`] and closes the rest.
//!
//! A container id is taken only if runc would take it ([`valid_id`]): heapcapd names logs,
//! threads, events and `heapcap ps` rows after it, and an id that any runtime made is one.

use std::fmt;

use heapcap_policy::settings::{self, Settings, SettingsError};
use oci_spec::runtime::{ContainerProcessState, SECCOMP_FD_NAME};

use crate::kubernetes::{self, Pod};

/// The largest message taken, annotations included.
pub const MAX_MESSAGE: usize = 1 << 20;

/// The longest container id taken, in bytes. runc's rule has no bound of its own (runc names a
/// directory after the id, which the file system bounds at 255 bytes); this one is generous.
pub const MAX_ID: usize = 1024;

/// Whether `id` is a container id as runc takes it (libcontainer's `validateID`): not empty,
/// only ASCII letters, digits, `_`, `+`, `-` and `.`, and not `.` or `..` (which name no file of
/// their own); and at most [`MAX_ID`] bytes.
pub fn valid_id(id: &str) -> bool {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b'-' | b'.');
    !id.is_empty() && id.len() <= MAX_ID && id != "." && id != ".." && id.bytes().all(allowed)
}

/// The rule [`valid_id`] applies, as an error says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRule;

impl fmt::Display for IdRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "its id is not valid: a container id is 1 to {MAX_ID} ASCII letters, digits, '_', '+', '-' and '.', \
             other than \".\" and \"..\" (runc's rule)"
        )
    }
}

/// `id` as it is safe to show in a log line or on a terminal: quoted, with control characters
/// escaped, its first 64 characters at most.
pub fn shown_id(id: &str) -> String {
    const SHOWN: usize = 64;
    let head: String = id.chars().take(SHOWN).collect();
    let more = if id.chars().nth(SHOWN).is_some() { "..." } else { "" };
    format!("{head:?}{more}")
}

/// Everything heapcapd needs from one agent message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentMessage {
    /// The container id (`state.id`), always [`valid_id`].
    pub id: String,
    /// The container's init as the runtime sees it (`pid`), if the state gives one (> 0).
    pub pid: Option<u32>,
    /// Index of the seccomp listener among the fds received (`fds` names it `seccompFd`).
    pub seccomp_fd: usize,
    /// The container's heapcap settings from its annotations and `listenerMetadata`:
    /// `Ok(None)` when it asks for none, `Err` with what to write instead when they are bad.
    /// The message itself is fine either way: what to do with bad settings is the caller's policy.
    pub settings: Result<Option<Settings>, SettingsError>,
    /// The container's Kubernetes names, from the annotations a CRI runtime wrote
    /// ([`kubernetes::pod`]).
    pub pod: Option<Pod>,
    /// A Kubernetes pod's sandbox (pause) container ([`kubernetes::is_sandbox`]): its settings are
    /// the pod's, meant for the pod's containers, and are not its own.
    pub sandbox: bool,
    /// The container's bundle (`state.bundle`), where its `config.json` is.
    pub bundle: std::path::PathBuf,
}

/// Why a message cannot be taken. Each says what the sender got wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    #[error("empty message: no state and no fds")]
    Empty,
    #[error("message of {0} bytes is larger than {MAX_MESSAGE} bytes")]
    TooLarge(usize),
    #[error("the state is not a JSON container process state: {0}")]
    Json(String),
    #[error("the state names no \"{SECCOMP_FD_NAME}\" in \"fds\" ({0:?})")]
    NoSeccompFd(Vec<String>),
    #[error("the state names {names} fds but {got} came with the message")]
    FdCount { names: usize, got: usize },
    #[error("the state has no container id")]
    NoId,
    /// The id is not [`valid_id`]; `pid` is the container's init as the state gives it, so that
    /// the caller can refuse the container as it refuses one with bad settings.
    #[error("container {}: {IdRule}", shown_id(.id))]
    BadId { id: String, pid: Option<u32> },
}

/// Parse one agent message: `data` is everything read from the connection, `fds_received` how
/// many fds came with it.
pub fn parse(data: &[u8], fds_received: usize) -> Result<AgentMessage, AgentError> {
    if data.len() > MAX_MESSAGE {
        return Err(AgentError::TooLarge(data.len()));
    }
    if data.iter().all(u8::is_ascii_whitespace) {
        if fds_received == 0 {
            return Err(AgentError::Empty);
        }
        return Err(AgentError::Json(format!("{fds_received} fds came with no state")));
    }
    // oci-spec fills what is missing with defaults, and serde takes a struct from an array too: a
    // state is an object that has at least "fds" and "state" (`{"hello": 1}` is not one).
    if data.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(AgentError::Json("expected a JSON object".into()));
    }
    let value: serde_json::Value = serde_json::from_slice(data).map_err(|e| AgentError::Json(e.to_string()))?;
    let missing: Vec<&str> =
        ["fds", "state"].into_iter().filter(|k| value.as_object().is_none_or(|o| !o.contains_key(*k))).collect();
    if !missing.is_empty() {
        return Err(AgentError::Json(format!(
            "not a container process state: no {} (runc and crun send {{\"ociVersion\", \"fds\", \"pid\", \"metadata\", \"state\"}})",
            missing.iter().map(|k| format!("\"{k}\"")).collect::<Vec<_>>().join(" or ")
        )));
    }
    // From the bytes, not the value: a value keeps the last of duplicate keys, the struct refuses them.
    let state: ContainerProcessState = serde_json::from_slice(data).map_err(|e| AgentError::Json(e.to_string()))?;
    let names = state.fds();
    let seccomp_fd =
        names.iter().position(|n| n == SECCOMP_FD_NAME).ok_or_else(|| AgentError::NoSeccompFd(names.clone()))?;
    if fds_received != names.len() {
        return Err(AgentError::FdCount { names: names.len(), got: fds_received });
    }
    let container = state.state();
    let id = container.id().clone();
    let pid = u32::try_from(*state.pid()).ok().filter(|p| *p > 0);
    if id.is_empty() {
        return Err(AgentError::NoId);
    }
    if !valid_id(&id) {
        return Err(AgentError::BadId { id, pid });
    }
    let annotations = container.annotations().as_ref();
    let pairs = || annotations.into_iter().flatten().map(|(k, v)| (k.as_str(), v.as_str()));
    let settings = settings::resolve(pairs(), state.metadata().as_deref());
    let (pod, sandbox) = (kubernetes::pod(pairs()), kubernetes::is_sandbox(pairs()));
    let bundle = container.bundle().clone();
    Ok(AgentMessage { id, pid, seccomp_fd, settings, pod, sandbox, bundle })
}

#[cfg(test)]
mod tests {
    use super::*;
    use heapcap_policy::ledger::Mode;
    use serde_json::json;

    fn state(fds: &[&str], id: &str, annotations: serde_json::Value, metadata: Option<&str>) -> Vec<u8> {
        let mut v = json!({
            "ociVersion": "1.2.0",
            "fds": fds,
            "pid": 4242,
            "state": {"ociVersion": "1.2.0", "id": id, "status": "creating", "pid": 4242, "bundle": "/b",
                      "annotations": annotations},
        });
        if let Some(m) = metadata {
            v["metadata"] = json!(m);
        }
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn takes_a_runc_message() {
        let data = state(&["seccompFd"], "c1", json!({"heapcap.io/limit": "64Mi"}), None);
        let m = parse(&data, 1).unwrap();
        assert_eq!(m.id, "c1");
        assert_eq!(m.pid, Some(4242));
        assert_eq!(m.seccomp_fd, 0);
        let s = m.settings.unwrap().unwrap();
        assert_eq!(s.limits.process, Some(64 << 20));
        assert_eq!(s.mode, Mode::Enforce);
    }

    #[test]
    fn kubernetes_names_and_sandboxes() {
        let cri = |kind: &str| {
            json!({"io.kubernetes.cri.container-type": kind, "io.kubernetes.cri.sandbox-namespace": "default",
                   "io.kubernetes.cri.sandbox-name": "web", "io.kubernetes.cri.container-name": "app",
                   "heapcap.io/limit": "lots"})
        };
        let m = parse(&state(&["seccompFd"], "c1", cri("container"), None), 1).unwrap();
        let pod = Pod { namespace: "default".into(), name: "web".into(), container: "app".into() };
        assert_eq!((m.pod, m.sandbox), (Some(pod), false));
        assert!(m.settings.is_err(), "the settings are read as for any container");
        let m = parse(&state(&["seccompFd"], "s1", cri("sandbox"), None), 1).unwrap();
        assert!(m.sandbox);
        assert_eq!(m.pod.map(|p| p.to_string()), Some("default/web/".to_string()));
        let m = parse(&state(&["seccompFd"], "c1", json!({"heapcap.io/limit": "64Mi"}), None), 1).unwrap();
        assert_eq!((m.pod, m.sandbox), (None, false));
    }

    #[test]
    fn finds_the_seccomp_fd_among_others() {
        let data = state(&["pidFd", "seccompFd"], "c1", json!({}), None);
        assert_eq!(parse(&data, 2).unwrap().seccomp_fd, 1);
    }

    #[test]
    fn no_settings_is_none() {
        let data = state(&["seccompFd"], "c1", json!({"other.io/x": "1"}), None);
        assert_eq!(parse(&data, 1).unwrap().settings, Ok(None));
        let mut v: serde_json::Value = serde_json::from_slice(&data).unwrap();
        v["state"].as_object_mut().unwrap().remove("annotations");
        assert_eq!(parse(&serde_json::to_vec(&v).unwrap(), 1).unwrap().settings, Ok(None));
    }

    #[test]
    fn metadata_settings_and_annotations_win() {
        let data = state(&["seccompFd"], "c1", json!({"heapcap.io/mode": "audit"}), Some("heapcap.io/limit=1Mi"));
        let s = parse(&data, 1).unwrap().settings.unwrap().unwrap();
        assert_eq!(s.limits.process, Some(1 << 20));
        assert_eq!(s.mode, Mode::Audit);
    }

    #[test]
    fn bad_settings_parse_with_the_reason() {
        for (k, v, says) in [
            ("heapcap.io/limit", "lots", "heapcap.io/limit"),
            ("heapcap.io/limit", "-1", "heapcap.io/limit"),
            ("heapcap.io/total-limit", "", "heapcap.io/total-limit"),
            ("heapcap.io/mode", "strict", "write enforce or audit"),
            ("heapcap.io/limt", "1Mi", "unknown setting 'heapcap.io/limt'"),
        ] {
            let data = state(&["seccompFd"], "c1", json!({k: v}), None);
            let m = parse(&data, 1).unwrap();
            let err = m.settings.expect_err(k).to_string();
            assert!(err.contains(says), "{k}={v}: {err}");
        }
        let data = state(&["seccompFd"], "c1", json!({}), Some("{{{"));
        assert!(matches!(parse(&data, 1).unwrap().settings, Err(SettingsError::Metadata(_))));
    }

    #[test]
    fn empty_and_whitespace() {
        assert_eq!(parse(b"", 0), Err(AgentError::Empty));
        assert_eq!(parse(b" \n", 0), Err(AgentError::Empty));
        assert!(matches!(parse(b"", 1), Err(AgentError::Json(_))));
    }

    #[test]
    fn not_json_or_wrong_schema() {
        for data in [&b"hello"[..], b"{", b"{\"fds\": 3}", b"[]", b"\xff\xfe", b"{\"pid\": \"x\"}", b"null"] {
            assert!(matches!(parse(data, 1), Err(AgentError::Json(_))), "{:?}", String::from_utf8_lossy(data));
        }
        let mut data = state(&["seccompFd"], "c1", json!({}), None);
        data.extend_from_slice(b"{}");
        assert!(matches!(parse(&data, 1), Err(AgentError::Json(_))), "trailing data");
        let data = state(&["seccompFd"], "c1", json!({}), None);
        assert!(matches!(parse(&data[..data.len() - 3], 1), Err(AgentError::Json(_))), "truncated");
    }

    #[test]
    fn an_object_that_is_not_a_state_says_so() {
        let err = parse(br#"{"hello": "world"}"#, 1).unwrap_err().to_string();
        assert!(err.contains("not a container process state: no \"fds\" or \"state\""), "{err}");
        let err = parse(br#"{"fds": ["seccompFd"]}"#, 1).unwrap_err().to_string();
        assert!(err.contains("no \"state\""), "{err}");
    }

    #[test]
    fn fd_names_and_counts() {
        let data = state(&[], "c1", json!({}), None);
        assert_eq!(parse(&data, 0), Err(AgentError::NoSeccompFd(vec![])));
        let data = state(&["pidFd"], "c1", json!({}), None);
        assert_eq!(parse(&data, 1), Err(AgentError::NoSeccompFd(vec!["pidFd".into()])));
        let data = state(&["seccompFd"], "c1", json!({}), None);
        assert_eq!(parse(&data, 0), Err(AgentError::FdCount { names: 1, got: 0 }));
        assert_eq!(parse(&data, 3), Err(AgentError::FdCount { names: 1, got: 3 }));
    }

    #[test]
    fn no_id() {
        let data = state(&["seccompFd"], "", json!({}), None);
        assert_eq!(parse(&data, 1), Err(AgentError::NoId));
    }

    #[test]
    fn ids_runc_takes_and_ids_it_does_not() {
        for good in ["c1", "a", "web-1.prod_2+x", "...", &"f".repeat(64), &"x".repeat(MAX_ID)] {
            let data = state(&["seccompFd"], good, json!({}), None);
            assert_eq!(parse(&data, 1).map(|m| m.id), Ok(good.to_string()), "{good:?}");
        }
        let long = "x".repeat(MAX_ID + 1);
        for bad in ["évil/../x", "a\nb", ".", "..", "a/b", "a b", "a:b", "ünïcödé", "\u{202e}x", "x\u{0}", &long] {
            let data = state(&["seccompFd"], bad, json!({}), None);
            assert_eq!(parse(&data, 1), Err(AgentError::BadId { id: bad.to_string(), pid: Some(4242) }), "{bad:?}");
            assert!(!valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_bad_id_is_shown_safely_with_the_rule() {
        let data = state(&["seccompFd"], "évil/../x\n\u{1b}[31m", json!({}), None);
        let e = parse(&data, 1).unwrap_err().to_string();
        assert!(
            e.starts_with(r#"container "évil/../x\n\u{1b}[31m": its id is not valid: a container id is 1 to 1024"#),
            "{e}"
        );
        assert!(e.ends_with(r#"other than "." and ".." (runc's rule)"#), "{e}");
        assert!(!e.contains('\n') && !e.contains('\u{1b}'), "{e}");
        // Cut after 64 characters, never inside one (each 'é' is two bytes).
        let e = AgentError::BadId { id: "é".repeat(1000), pid: None }.to_string();
        assert!(e.starts_with(&format!("container \"{}\"...: its id", "é".repeat(64))), "{e}");
    }

    #[test]
    fn pid_zero_or_negative_is_none() {
        for pid in [0, -5] {
            let mut v: serde_json::Value =
                serde_json::from_slice(&state(&["seccompFd"], "c1", json!({}), None)).unwrap();
            v["pid"] = json!(pid);
            assert_eq!(parse(&serde_json::to_vec(&v).unwrap(), 1).unwrap().pid, None);
        }
    }

    #[test]
    fn too_large() {
        let data = vec![b' '; MAX_MESSAGE + 1];
        assert_eq!(parse(&data, 1), Err(AgentError::TooLarge(MAX_MESSAGE + 1)));
    }
}
