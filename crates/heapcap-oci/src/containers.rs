//! The seccomp profile format of podman, CRI-O and Docker (containers/common `pkg/seccomp`), e.g.
//! `/usr/share/containers/seccomp.json`, with heapcap merged in.
//!
//! It is not an OCI `LinuxSeccomp`: architectures come as an `archMap` from a native ABI to its
//! compat ABIs, and entries carry `includes`/`excludes` (capabilities, architectures) that the
//! engine evaluates for each container before it writes `linux.seccomp`. Read as a
//! `LinuxSeccomp`, those fields are dropped, and "allow `bpf` with CAP_SYS_ADMIN" plus "deny `bpf`
//! without it" become two unconditional, contradictory rules. [`ContainersProfile`] keeps every
//! field, known or not, and the entries heapcap adds keep the `includes`/`excludes` of the entry
//! they replace.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxSeccompAction, LinuxSeccompArg, LinuxSyscall};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use heapcap_policy::rules::Extra;

use crate::merge::{check_no_listener, merge_entries, Action, Entry, MergeError};
use heapcap_policy::ledger::Counting;

/// A containers/common seccomp profile. Fields heapcap does not look at are kept as they are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainersProfile {
    pub default_action: LinuxSeccompAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_errno_ret: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_errno: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch_map: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listener_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listener_metadata: Option<String>,
    pub syscalls: Option<Vec<ContainersSyscall>>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// One entry of a [`ContainersProfile`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainersSyscall {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names: Option<Vec<String>>,
    pub action: LinuxSeccompAction,
    #[serde(default)]
    pub args: Option<Vec<LinuxSeccompArg>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub includes: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub excludes: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno_ret: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// `value` without empty parts (`{}`, `[]`, `""`, `null`, `0`): what it really restricts.
fn essential(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), essential(v))).filter(|(_, v)| !is_empty(v)).collect())
        }
        other => other.clone(),
    }
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Object(map) => map.is_empty(),
        Value::Array(items) => items.is_empty(),
        Value::String(s) => s.is_empty(),
        Value::Number(n) => n.as_u64() == Some(0),
        Value::Bool(_) => false,
    }
}

impl Entry for ContainersSyscall {
    fn names(&self) -> Vec<&str> {
        self.name.iter().chain(self.names.iter().flatten()).map(String::as_str).collect()
    }

    fn remove_name(&mut self, name: &str) {
        if self.name.as_deref() == Some(name) {
            self.name = None;
        }
        if let Some(names) = &mut self.names {
            names.retain(|n| n != name);
        }
    }

    fn action(&self) -> Action {
        Action::new(self.action, self.errno_ret)
    }

    fn has_args(&self) -> bool {
        self.args.as_ref().is_some_and(|a| !a.is_empty())
    }

    fn scope(&self) -> String {
        let part = |v: &Option<Value>| v.as_ref().map(essential).unwrap_or(Value::Null);
        let parts = [part(&self.includes), part(&self.excludes), essential(&Value::Object(self.other.clone()))];
        if parts.iter().all(is_empty) {
            return String::new();
        }
        Value::Array(parts.to_vec()).to_string()
    }

    fn derive(template: Option<&Self>, rule: LinuxSyscall, note: &str) -> Self {
        let empty = || Some(Value::Object(Map::new()));
        ContainersSyscall {
            name: None,
            names: Some(rule.names().clone()),
            action: rule.action(),
            args: Some(rule.args().clone().unwrap_or_default()),
            comment: Some(note.to_string()),
            includes: template.map_or_else(empty, |t| t.includes.clone()),
            excludes: template.map_or_else(empty, |t| t.excludes.clone()),
            errno_ret: rule.errno_ret(),
            errno: None,
            other: template.map(|t| t.other.clone()).unwrap_or_default(),
        }
    }
}

impl ContainersProfile {
    /// Merge heapcap's notify rules, as [`crate::merge_into`] does for an OCI profile, and make the
    /// runtime send the listener to `listener_path`. On error the profile is unchanged.
    pub fn merge(&mut self, listener_path: &Path, metadata: Option<&str>) -> Result<(), MergeError> {
        self.merge_for(Counting::Heap, listener_path, metadata)
    }

    /// [`ContainersProfile::merge`] with the rules of `counting`.
    pub fn merge_for(
        &mut self,
        counting: Counting,
        listener_path: &Path,
        metadata: Option<&str>,
    ) -> Result<(), MergeError> {
        self.merge_with(counting, listener_path, metadata, Extra::default())
    }

    /// [`ContainersProfile::merge_for`], sending the `extra` calls too (where the profile lets them run).
    pub fn merge_with(
        &mut self,
        counting: Counting,
        listener_path: &Path,
        metadata: Option<&str>,
        extra: Extra,
    ) -> Result<(), MergeError> {
        let default = Action::new(self.default_action, self.default_errno_ret);
        check_no_listener(self.listener_path.as_deref(), self.listener_metadata.as_deref())?;
        let mut entries = self.syscalls.clone().unwrap_or_default();
        merge_entries(&mut entries, default, counting, extra)?;
        self.syscalls = Some(entries);
        self.listener_path = Some(listener_path.to_path_buf());
        self.listener_metadata = metadata.map(str::to_string);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::{decide, Outcome, Width};
    use oci_spec::runtime::LinuxSeccomp;
    use serde_json::json;

    use crate::testdata::{PODMAN_CAPS, PODMAN_DEFAULT};
    const SOCK: &str = "/run/heapcap/heapcapd.sock";
    const ALL_CAPS: &[&str] = &["CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_AUDIT_WRITE", "CAP_DAC_READ_SEARCH"];

    fn podman_default() -> ContainersProfile {
        serde_json::from_str(PODMAN_DEFAULT).expect("podman's default profile parses")
    }

    fn list(v: &Option<Value>, key: &str) -> Vec<String> {
        v.as_ref()
            .and_then(|v| v.get(key))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect()
    }

    /// What podman writes into config.json for a container on `arch` with `caps` (containers/common
    /// `setupSeccomp`, for the fields the evaluator looks at).
    fn to_oci(p: &ContainersProfile, arch: &str, caps: &[&str]) -> LinuxSeccomp {
        let has = |c: &String| caps.contains(&c.as_str());
        let syscalls = p.syscalls.iter().flatten().filter(|s| {
            !(list(&s.excludes, "arches").iter().any(|a| a == arch)
                || list(&s.excludes, "caps").iter().any(has)
                || !list(&s.includes, "arches").is_empty() && !list(&s.includes, "arches").iter().any(|a| a == arch)
                || !list(&s.includes, "caps").iter().all(has))
        });
        let syscalls: Vec<_> = syscalls
            .map(|s| {
                let mut o = LinuxSyscall::default();
                o.set_names(s.names().into_iter().map(str::to_string).collect());
                o.set_action(s.action);
                o.set_errno_ret(s.errno_ret);
                o.set_args(s.args.clone());
                o
            })
            .collect();
        let mut o = LinuxSeccomp::default();
        o.set_default_action(p.default_action);
        o.set_default_errno_ret(p.default_errno_ret);
        o.set_listener_path(p.listener_path.clone());
        o.set_syscalls(Some(syscalls));
        o
    }

    fn merged() -> ContainersProfile {
        let mut p = podman_default();
        p.merge(Path::new(SOCK), None).expect("podman's default profile merges");
        p
    }

    #[test]
    fn keeps_every_field_of_the_file() {
        let original: Value = serde_json::from_str(PODMAN_DEFAULT).unwrap();
        assert_eq!(serde_json::to_value(podman_default()).unwrap(), original);
        let odd = json!({"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_LOG"], "future": 1,
            "syscalls": [{"name": "mmap", "action": "SCMP_ACT_ALLOW", "args": null, "minKernel": "5.0"}]});
        let p: ContainersProfile = serde_json::from_value(odd.clone()).unwrap();
        assert_eq!(serde_json::to_value(p).unwrap(), odd);
    }

    #[test]
    fn merged_podman_default_with_the_strict_rules_decides_like_the_original_except_for_memory() {
        let before = podman_default();
        let mut after = podman_default();
        after.merge_for(Counting::Strict, Path::new(SOCK), None).expect("podman's default profile merges");
        let memory =
            ["brk", "mmap", "mmap2", "mprotect", "pkey_mprotect", "mremap", "execve", "execveat", "shmat", "ipc"];
        let samples = [[0; 6], [0, 4096, 3, 0x22, u64::MAX, 0], [0, 4096, 0, 0x22, 3, 0], [16, 0, 9, 0, 0, 0]];
        for caps in [PODMAN_CAPS, ALL_CAPS] {
            let (b, a) = (to_oci(&before, "amd64", caps), to_oci(&after, "amd64", caps));
            decides_alike_outside(&b, &a, &memory, &samples);
            let notify = Outcome::Decided(Action::new(LinuxSeccompAction::ScmpActNotify, None));
            let allow = Outcome::Decided(Action::new(LinuxSeccompAction::ScmpActAllow, None));
            assert_eq!(decide(&a, "mmap", [0, 4096, 3, 0x02, 3, 0], Width::W64), notify, "private file mapping");
            assert_eq!(decide(&a, "mmap", [0, 4096, 3, 0x01, 3, 0], Width::W64), notify, "shared mapping");
            assert_eq!(decide(&a, "mmap", [0, 4096, 1, 0x01, 3, 0], Width::W64), allow, "read-only");
            assert_eq!(decide(&a, "mmap", [0, 4096, 0, 0x22, u64::MAX, 0], Width::W64), allow, "PROT_NONE");
            assert_eq!(decide(&a, "shmat", [7, 0, 0, 0, 0, 0], Width::W64), notify);
            assert_eq!(
                decide(&a, "shmat", [7, 0, 0o10000, 0, 0, 0], Width::W64),
                decide(&b, "shmat", [7, 0, 0o10000, 0, 0, 0], Width::W64),
                "SHM_RDONLY keeps podman's own action"
            );
            assert_eq!(decide(&a, "mmap", [0; 6], Width::W32), notify, "i386 old mmap");
        }
    }

    /// `after` decides every call of `before`'s profile but those in `memory` as `before` does,
    /// on each sample of arguments, for 64- and 32-bit callers.
    fn decides_alike_outside(before: &LinuxSeccomp, after: &LinuxSeccomp, memory: &[&str], samples: &[[u64; 6]]) {
        let names: Vec<String> = before.syscalls().iter().flatten().flat_map(|s| s.names().clone()).collect();
        for name in names.iter().filter(|n| !memory.contains(&n.as_str())) {
            for args in samples {
                for width in [Width::W64, Width::W32] {
                    assert_eq!(
                        decide(after, name, *args, width),
                        decide(before, name, *args, width),
                        "{name} {args:x?}"
                    );
                }
            }
        }
    }

    #[test]
    fn merged_podman_default_decides_like_the_original_except_for_heap_growth() {
        let (before, after) = (podman_default(), merged());
        let memory = ["brk", "mmap", "mmap2", "mprotect", "pkey_mprotect", "mremap", "execve", "execveat"];
        let samples = [[0; 6], [0, 4096, 3, 0x22, u64::MAX, 0], [0, 4096, 0, 0x22, 3, 0], [16, 0, 9, 0, 0, 0]];
        for caps in [PODMAN_CAPS, ALL_CAPS] {
            let (b, a) = (to_oci(&before, "amd64", caps), to_oci(&after, "amd64", caps));
            assert_eq!(a.listener_path().as_deref(), Some(Path::new(SOCK)));
            decides_alike_outside(&b, &a, &memory, &samples);
            let notify = Outcome::Decided(Action::new(LinuxSeccompAction::ScmpActNotify, None));
            let allow = Outcome::Decided(Action::new(LinuxSeccompAction::ScmpActAllow, None));
            assert_eq!(decide(&a, "mmap", [0, 4096, 3, 0x22, u64::MAX, 0], Width::W64), notify);
            assert_eq!(decide(&a, "mmap", [0, 4096, 3, 0x02, 3, 0], Width::W64), allow, "private file mapping");
            assert_eq!(decide(&a, "mmap", [0, 4096, 0, 0x22, u64::MAX, 0], Width::W64), allow, "PROT_NONE");
            assert_eq!(decide(&a, "mmap", [0; 6], Width::W32), notify, "i386 old mmap");
            assert_eq!(decide(&a, "execve", [0; 6], Width::W64), notify);
        }
    }

    #[test]
    fn new_entries_say_what_they_are() {
        let p = merged();
        let added: Vec<_> = p
            .syscalls
            .iter()
            .flatten()
            .filter(|s| s.comment.as_deref().is_some_and(|c| c.starts_with("heapcap")))
            .collect();
        assert!(added.iter().any(|s| s.action == LinuxSeccompAction::ScmpActNotify));
        assert!(added.iter().any(|s| s.action == LinuxSeccompAction::ScmpActAllow));
        assert!(added.iter().all(|s| s.includes == Some(json!({})) && s.excludes == Some(json!({}))));
    }

    #[test]
    fn scoped_rules_keep_their_scope() {
        let p = json!({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
            {"names": ["mmap", "brk"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_X"]}},
            {"names": ["mmap", "brk"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1, "excludes": {"caps": ["CAP_X"]}}]});
        let mut p: ContainersProfile = serde_json::from_value(p).unwrap();
        p.merge(Path::new(SOCK), None).unwrap();
        let notify = Outcome::Decided(Action::new(LinuxSeccompAction::ScmpActNotify, None));
        let eperm = Outcome::Decided(Action::new(LinuxSeccompAction::ScmpActErrno, Some(1)));
        let grow = [0x10_0000, 0, 0, 0, 0, 0];
        assert_eq!(decide(&to_oci(&p, "amd64", &["CAP_X"]), "brk", grow, Width::W64), notify);
        assert_eq!(decide(&to_oci(&p, "amd64", &[]), "brk", grow, Width::W64), eperm);
        assert_eq!(decide(&to_oci(&p, "amd64", &[]), "mmap", [0, 1, 3, 0x22, 0, 0], Width::W64), eperm);
    }

    #[test]
    fn scoped_rules_under_an_allowing_default_are_refused() {
        let p = json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["mmap"], "action": "SCMP_ACT_ERRNO", "includes": {"arches": ["arm64"]}}]});
        let mut p: ContainersProfile = serde_json::from_value(p).unwrap();
        let err = p.merge(Path::new(SOCK), None).unwrap_err();
        assert!(matches!(err, MergeError::ScopedRule { .. }), "{err}");
    }

    #[test]
    fn a_single_name_entry_is_taken_over() {
        let p = json!({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"name": "mremap", "action": "SCMP_ACT_ALLOW", "args": []}]});
        let mut p: ContainersProfile = serde_json::from_value(p).unwrap();
        p.merge(Path::new(SOCK), None).unwrap();
        let entries = p.syscalls.unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].names, Some(vec!["mremap".to_string()]));
        assert_eq!(entries[0].action, LinuxSeccompAction::ScmpActNotify);
    }
}
