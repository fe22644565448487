//! The OCI seccomp agent message runc, crun and heapcap-hook send heapcapd
//! (`heapcap_oci::agent::parse`).
//!
//! Input: one byte, the number of fds that came with the message (mod 4), then the message.
//!
//! Asserts, beyond not panicking:
//! - `parse` agrees with reading the message the way heapcapd's intake did before it had `parse`:
//!   a JSON object with "fds" and "state", `ContainerProcessState` from serde, the `seccompFd` index, the fd count, the id, and
//!   `settings::resolve` on the state's annotations and `metadata` (bad settings are reported in
//!   the message, not lost), and `kubernetes::pod` and `kubernetes::is_sandbox` on the annotations;
//! - an id is taken exactly when it is runc's rule written out here again (1 to 1024 bytes of
//!   ASCII letters, digits, `_+-.`, not `.` or `..`), and a refused one is refused with the pid
//!   (the caller stops that container);
//! - a taken message names its listener among the fds received, and its id is `valid_id`;
//! - a trailing newline changes nothing, and the state written back out parses to the same message.
#![no_main]

use heapcap_oci::agent::{parse, valid_id, AgentError, AgentMessage, MAX_ID, MAX_MESSAGE};
use heapcap_oci::kubernetes;
use heapcap_policy::settings;
use libfuzzer_sys::fuzz_target;
use oci_spec::runtime::{ContainerProcessState, SECCOMP_FD_NAME};

/// The message as heapcapd read it inline (crates/heapcapd/src/intake.rs before `agent::parse`).
fn reference(data: &[u8], fds_received: usize) -> Result<AgentMessage, AgentError> {
    if data.len() > MAX_MESSAGE {
        return Err(AgentError::TooLarge(data.len()));
    }
    if data.iter().all(u8::is_ascii_whitespace) {
        return Err(if fds_received == 0 { AgentError::Empty } else { AgentError::Json(String::new()) });
    }
    // Only an object with "fds" and "state" is a state (oci-spec would default the rest).
    let value: serde_json::Value = serde_json::from_slice(data).map_err(|e| AgentError::Json(e.to_string()))?;
    if !(value.get("fds").is_some() && value.get("state").is_some()) {
        return Err(AgentError::Json(String::new()));
    }
    let state: ContainerProcessState = serde_json::from_slice(data).map_err(|e| AgentError::Json(e.to_string()))?;
    let seccomp_fd = state
        .fds()
        .iter()
        .position(|n| n == SECCOMP_FD_NAME)
        .ok_or_else(|| AgentError::NoSeccompFd(state.fds().clone()))?;
    if state.fds().len() != fds_received {
        return Err(AgentError::FdCount { names: state.fds().len(), got: fds_received });
    }
    let id = state.state().id().clone();
    let pid = (*state.pid() > 0).then_some(*state.pid() as u32);
    if id.is_empty() {
        return Err(AgentError::NoId);
    }
    // runc's libcontainer validateID: ^[\w+-.]+$ in ASCII, and not a name "/" + id cleans away.
    let runc_takes = id.chars().all(|c| c.is_ascii_alphanumeric() || "_+-.".contains(c)) && id != "." && id != "..";
    if !runc_takes || id.len() > MAX_ID {
        return Err(AgentError::BadId { id, pid });
    }
    let annotations = state.state().annotations().clone().unwrap_or_default();
    let pairs = annotations.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    let settings = settings::resolve(pairs.clone(), state.metadata().as_deref());
    let (pod, sandbox) = (kubernetes::pod(pairs.clone()), kubernetes::is_sandbox(pairs));
    let bundle = state.state().bundle().clone();
    Ok(AgentMessage { id, pid, seccomp_fd, settings, pod, sandbox, bundle })
}

/// Equal, error messages from serde aside.
fn same(a: &Result<AgentMessage, AgentError>, b: &Result<AgentMessage, AgentError>) -> bool {
    match (a, b) {
        (Err(AgentError::Json(_)), Err(AgentError::Json(_))) => true,
        _ => a == b,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&fds, data)) = data.split_first() else { return };
    let fds_received = usize::from(fds % 4);
    let parsed = parse(data, fds_received);
    let expected = reference(data, fds_received);
    assert!(same(&parsed, &expected), "parse gave {parsed:?}, heapcapd's intake read {expected:?}");

    let mut with_newline = data.to_vec();
    with_newline.push(b'\n');
    let again = parse(&with_newline, fds_received);
    assert!(same(&again, &parsed), "a trailing newline changed {parsed:?} to {again:?}");

    let Ok(message) = parsed else { return };
    assert!(message.seccomp_fd < fds_received, "{message:?} with {fds_received} fds");
    assert!(valid_id(&message.id), "took the id {:?}", message.id);
    assert_ne!(message.pid, Some(0));
    let state: ContainerProcessState = serde_json::from_slice(data).expect("parse took it");
    let written = serde_json::to_vec(&state).expect("a state that was read can be written");
    assert_eq!(parse(&written, fds_received), Ok(message), "written back as {:?}", String::from_utf8_lossy(&written));
});
