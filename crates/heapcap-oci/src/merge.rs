//! Adding heapcap's notify rules to an existing profile without widening it.
//!
//! # Why the original rules must be split
//!
//! libseccomp (2.5.4, used by runc 1.1.5 and crun 1.8.1) keeps an unconditional rule and drops
//! every conditional rule with a different action for the same call, whichever comes first:
//! `mmap` ALLOW plus `mmap` NOTIFY-when-anonymous-and-writable compiles to plain ALLOW. The
//! runtime still creates a listener and hands it to the agent, which then never hears of a
//! single `mmap`: heapcap would silently enforce nothing (seen with runc 1.1.5 and crun 1.8.1:
//! podman's default profile with heapcap's NOTIFY entries appended delivered the listener, and then
//! not one notification for 4 anonymous 4 MiB mappings). Conditional rules with different actions
//! that overlap are no better: the first test in libseccomp's own order wins.
//!
//! So for each call heapcap notifies whose profile action lets it run (`SCMP_ACT_ALLOW`,
//! `SCMP_ACT_LOG`), [`merge_into`] removes the call from its unconditional entry and adds:
//! - that action for exactly the calls heapcap does not notify (the [`SyscallPlan::keep`]
//!   conditions: e.g. `mmap` when `arg2 & PROT_WRITE == 0`, when `arg3 & MAP_ANONYMOUS == 0`,
//!   when the mapping type is not private or droppable), so a file mapping or a `PROT_NONE`
//!   reservation is allowed on the kernel's fast path as before;
//! - the NOTIFY entries, which match the other calls (no overlap, so no order question).
//!
//! A call the profile denies (`SCMP_ACT_ERRNO`, `SCMP_ACT_KILL*`, `SCMP_ACT_TRAP`), by a rule or by
//! its default action, is left alone: notifying it could only let it through. A call only the
//! default action allows gets the NOTIFY entries and nothing else.
//!
//! [`SyscallPlan::keep`]: crate::seccomp::SyscallPlan::keep

use std::fmt;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSyscall};

use heapcap_policy::ledger::Counting;
use heapcap_policy::rules::Extra;

use crate::seccomp::{group, plan_with};

/// Why heapcap's rules cannot be merged into a profile.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(
        "the profile's defaultAction is SCMP_ACT_NOTIFY; runtimes refuse that (the runtime itself must \
         write after loading the filter): use SCMP_ACT_ALLOW or SCMP_ACT_ERRNO as the default action"
    )]
    NotifyDefault,
    #[error(
        "the profile already sends {syscalls} to a seccomp agent (SCMP_ACT_NOTIFY); a filter has only one \
         listener, so heapcap cannot share it: remove those rules, or attach heapcap with its OCI hook, \
         which loads a filter of its own"
    )]
    AlreadyNotifies { syscalls: String },
    #[error(
        "the profile already has a seccomp agent ({what} {value}); a filter has only one listener: remove \
         listenerPath and listenerMetadata, or attach heapcap with its OCI hook, which loads a filter of its own"
    )]
    HasListener { what: &'static str, value: String },
    #[error(
        "the profile's {action} rule for {syscall} has argument conditions; heapcap cannot combine them with \
         its own without changing what the profile allows: make that rule unconditional, or attach heapcap \
         with its OCI hook, which loads a filter of its own"
    )]
    ConditionalRule { syscall: String, action: Action },
    #[error("the profile has two unconditional rules for {syscall}, {first} and {second}: keep one of them")]
    ConflictingRules { syscall: String, first: Action, second: Action },
    #[error(
        "the profile's action for {syscall} is {action}; heapcap merges into SCMP_ACT_ALLOW and SCMP_ACT_LOG \
         and leaves ERRNO, KILL and TRAP alone, but cannot tell what a tracer would do: use one of those"
    )]
    UnsupportedAction { syscall: String, action: Action },
    #[error(
        "the profile's rule for {syscall} applies only with some capabilities or architectures \
         (includes/excludes) while its default action allows {syscall}; heapcap cannot cover both cases: \
         make the rule unconditional or the default action a denial"
    )]
    ScopedRule { syscall: String },
}

/// An action as a runtime compares them: ERRNO and TRACE carry their return value (EPERM when
/// unset, as runc and crun do), KILL is KILL_THREAD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Action {
    pub kind: LinuxSeccompAction,
    pub errno: Option<u32>,
}

const EPERM: u32 = 1;

impl Action {
    pub fn new(kind: LinuxSeccompAction, errno: Option<u32>) -> Action {
        use LinuxSeccompAction::*;
        match kind {
            ScmpActErrno | ScmpActTrace => Action { kind, errno: Some(errno.unwrap_or(EPERM)) },
            ScmpActKill => Action { kind: ScmpActKillThread, errno: None },
            _ => Action { kind, errno: None },
        }
    }

    fn class(self) -> Class {
        use LinuxSeccompAction::*;
        match self.kind {
            ScmpActAllow | ScmpActLog => Class::Runs,
            ScmpActErrno | ScmpActKill | ScmpActKillThread | ScmpActKillProcess | ScmpActTrap => Class::Denied,
            ScmpActTrace | ScmpActNotify => Class::Unknown,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.errno {
            Some(errno) => write!(f, "{}({errno})", self.kind),
            None => write!(f, "{}", self.kind),
        }
    }
}

#[derive(PartialEq, Eq)]
enum Class {
    Runs,
    Denied,
    Unknown,
}

/// One syscall entry of a profile format.
pub(crate) trait Entry: Clone {
    fn names(&self) -> Vec<&str>;
    fn remove_name(&mut self, name: &str);
    fn action(&self) -> Action;
    fn has_args(&self) -> bool;
    /// When the entry applies, beyond its arguments; empty for always.
    fn scope(&self) -> String;
    /// A new entry with `rule`'s names, action and arguments, and `self`'s scope.
    fn derive(template: Option<&Self>, rule: LinuxSyscall, note: &str) -> Self;
}

/// Argument lists, each for one call.
type Alternatives = Vec<(&'static str, Vec<LinuxSeccompArg>)>;

/// New entries for one scope: the calls heapcap takes over there, by original action.
struct Bucket<'a, E> {
    template: Option<&'a E>,
    scope: String,
    keep: Vec<(Action, Alternatives)>,
    notify: Alternatives,
}

/// Where a call runs today: with `action`, in `scope`, by `entry` (or by the default action).
struct Runs<'a, E> {
    scope: String,
    entry: Option<&'a E>,
    action: Action,
}

/// Where `syscall` runs today; empty where it is denied.
fn runs_today<'a, E: Entry>(
    syscall: &'static str,
    entries: &'a [E],
    default: Action,
) -> Result<Vec<Runs<'a, E>>, MergeError> {
    let name = || syscall.to_string();
    let mut groups: Vec<(String, Vec<&E>)> = Vec::new();
    for e in entries.iter().filter(|e| e.names().contains(&syscall)) {
        match groups.iter_mut().find(|(scope, _)| *scope == e.scope()) {
            Some((_, members)) => members.push(e),
            None => groups.push((e.scope(), vec![e])),
        }
    }
    if groups.is_empty() {
        return match default.class() {
            Class::Runs => Ok(vec![Runs { scope: String::new(), entry: None, action: default }]),
            Class::Denied => Ok(Vec::new()),
            Class::Unknown => Err(MergeError::UnsupportedAction { syscall: name(), action: default }),
        };
    }
    // Where no scoped entry applies, the default action would let the call run without heapcap.
    if default.class() == Class::Runs && groups.iter().any(|(scope, _)| !scope.is_empty()) {
        return Err(MergeError::ScopedRule { syscall: name() });
    }
    let mut runs = Vec::new();
    for (scope, members) in groups {
        let first = members[0].action();
        for e in &members {
            if e.has_args() {
                return Err(MergeError::ConditionalRule { syscall: name(), action: e.action() });
            }
            if e.action() != first {
                return Err(MergeError::ConflictingRules { syscall: name(), first, second: e.action() });
            }
        }
        match first.class() {
            Class::Runs => runs.push(Runs { scope, entry: Some(members[0]), action: first }),
            Class::Denied => {}
            Class::Unknown => return Err(MergeError::UnsupportedAction { syscall: name(), action: first }),
        }
    }
    Ok(runs)
}

/// Merge heapcap's rules into `entries` of a profile whose default action is `default`.
pub(crate) fn merge_entries<E: Entry>(
    entries: &mut Vec<E>,
    default: Action,
    counting: Counting,
    extra: Extra,
) -> Result<(), MergeError> {
    if default.kind == LinuxSeccompAction::ScmpActNotify {
        return Err(MergeError::NotifyDefault);
    }
    let notifying: Vec<&str> = entries
        .iter()
        .filter(|e| e.action().kind == LinuxSeccompAction::ScmpActNotify)
        .flat_map(|e| e.names())
        .collect();
    if !notifying.is_empty() {
        return Err(MergeError::AlreadyNotifies { syscalls: notifying.join(", ") });
    }
    let original = entries.clone();
    let mut buckets: Vec<Bucket<E>> = Vec::new();
    let mut taken: Vec<(&'static str, String)> = Vec::new();
    for plan in plan_with(counting, extra) {
        let runs = runs_today(plan.name, &original, default)?;
        for Runs { scope, entry: template, action } in runs {
            taken.push((plan.name, scope.clone()));
            let bucket = match buckets.iter().position(|b| b.scope == scope) {
                Some(i) => &mut buckets[i],
                None => {
                    buckets.push(Bucket { template, scope, keep: Vec::new(), notify: Vec::new() });
                    buckets.last_mut().expect("just pushed")
                }
            };
            // A rule with the default action is redundant (runc skips it, libseccomp refuses it).
            if action != default {
                let keep = plan.keep.iter().map(|args| (plan.name, args.clone()));
                match bucket.keep.iter_mut().find(|(a, _)| *a == action) {
                    Some((_, alts)) => alts.extend(keep),
                    None => bucket.keep.push((action, keep.collect())),
                }
            }
            bucket.notify.extend(plan.notify.iter().map(|args| (plan.name, args.clone())));
        }
    }
    for e in entries.iter_mut() {
        for (name, scope) in &taken {
            if e.scope() == *scope && e.names().contains(name) {
                e.remove_name(name);
            }
        }
    }
    entries.retain(|e| !e.names().is_empty());
    for bucket in buckets {
        let template = bucket.template;
        for (action, alternatives) in bucket.keep {
            // Only ALLOW and LOG get here: no return value to carry.
            for rule in group(alternatives, action.kind) {
                entries.push(E::derive(template, rule, KEEP_NOTE));
            }
        }
        for rule in group(bucket.notify, LinuxSeccompAction::ScmpActNotify) {
            entries.push(E::derive(template, rule, NOTIFY_NOTE));
        }
    }
    Ok(())
}

const KEEP_NOTE: &str = "heapcap: the calls that cannot grow the heap keep the profile's action";
const NOTIFY_NOTE: &str = "heapcap: calls that can grow the heap go to the heapcap agent (listenerPath)";

impl Entry for LinuxSyscall {
    fn names(&self) -> Vec<&str> {
        LinuxSyscall::names(self).iter().map(String::as_str).collect()
    }

    fn remove_name(&mut self, name: &str) {
        let mut names = LinuxSyscall::names(self).clone();
        names.retain(|n| n != name);
        self.set_names(names);
    }

    fn action(&self) -> Action {
        Action::new(LinuxSyscall::action(self), self.errno_ret())
    }

    fn has_args(&self) -> bool {
        self.args().as_ref().is_some_and(|a| !a.is_empty())
    }

    fn scope(&self) -> String {
        String::new()
    }

    fn derive(_template: Option<&Self>, rule: LinuxSyscall, _note: &str) -> Self {
        rule
    }
}

/// Check that a profile has no seccomp agent of its own yet.
pub(crate) fn check_no_listener(path: Option<&Path>, metadata: Option<&str>) -> Result<(), MergeError> {
    if let Some(path) = path {
        return Err(MergeError::HasListener { what: "listenerPath", value: path.display().to_string() });
    }
    if let Some(metadata) = metadata {
        return Err(MergeError::HasListener { what: "listenerMetadata", value: format!("{metadata:?}") });
    }
    Ok(())
}

/// Merge heapcap's notify rules into `profile` (e.g. a runtime's default profile) and make the
/// runtime send the listener to `listener_path`, with `metadata` as `listenerMetadata`.
///
/// The merged profile denies what `profile` denied, and allows what it allowed except that the
/// calls heapcap's rules select go to the agent. On error `profile` is unchanged.
pub fn merge_into(profile: &mut LinuxSeccomp, listener_path: &Path, metadata: Option<&str>) -> Result<(), MergeError> {
    merge_into_for(Counting::Heap, profile, listener_path, metadata)
}

/// [`merge_into`] with the rules of `counting`.
pub fn merge_into_for(
    counting: Counting,
    profile: &mut LinuxSeccomp,
    listener_path: &Path,
    metadata: Option<&str>,
) -> Result<(), MergeError> {
    merge_into_with(counting, profile, listener_path, metadata, Extra::default())
}

/// [`merge_into_for`], sending the `extra` calls too (where the profile lets them run at all).
pub fn merge_into_with(
    counting: Counting,
    profile: &mut LinuxSeccomp,
    listener_path: &Path,
    metadata: Option<&str>,
    extra: Extra,
) -> Result<(), MergeError> {
    let default = Action::new(profile.default_action(), profile.default_errno_ret());
    check_no_listener(profile.listener_path().as_deref(), profile.listener_metadata().as_deref())?;
    let mut entries = profile.syscalls().clone().unwrap_or_default();
    merge_entries(&mut entries, default, counting, extra)?;
    profile.set_syscalls(Some(entries));
    profile.set_listener_path(Some(PathBuf::from(listener_path)));
    profile.set_listener_metadata(metadata.map(str::to_string));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::{decide, Outcome, Width};
    use crate::seccomp::{notify_syscalls, COMPAT_GUARD};
    use heapcap_policy::rules::{self, ArgTest};
    use heapcap_policy::syscall::{counts_mmap, MAP_ANONYMOUS, MAP_DROPPABLE, MAP_FIXED, MAP_PRIVATE, MAP_SHARED};
    use proptest::prelude::*;
    use serde_json::json;
    use LinuxSeccompAction::*;

    const SOCK: &str = "/run/heapcap/heapcapd.sock";
    const RW: u64 = 3;
    const ANON_PRIVATE: u64 = MAP_ANONYMOUS | MAP_PRIVATE;
    const MEMORY: &[&str] = &["brk", "mmap", "mmap2", "mprotect", "pkey_mprotect", "mremap", "execve", "execveat"];

    fn profile(value: serde_json::Value) -> LinuxSeccomp {
        serde_json::from_value(value).expect("a valid LinuxSeccomp")
    }

    /// What podman writes into config.json from its default profile, in short.
    fn podman_like() -> LinuxSeccomp {
        profile(json!({
            "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [
                {"names": ["kexec_load", "mmap3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
                {"names": ["read", "write", "brk", "mmap", "mmap2", "munmap", "mprotect", "pkey_mprotect",
                           "mremap", "execve", "execveat", "exit_group"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["socket"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 16, "op": "SCMP_CMP_NE"}]}
            ]
        }))
    }

    /// Allows by default, denies `mremap`, logs `mprotect`.
    fn allow_default() -> LinuxSeccomp {
        profile(json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [
                {"names": ["mremap", "ptrace"], "action": "SCMP_ACT_ERRNO"},
                {"names": ["mprotect"], "action": "SCMP_ACT_LOG"},
                {"names": ["mmap"], "action": "SCMP_ACT_ALLOW"}
            ]
        }))
    }

    /// Denies by default; allows `mmap`, kills on `brk`, never mentions `mprotect`.
    fn deny_default() -> LinuxSeccomp {
        profile(json!({
            "defaultAction": "SCMP_ACT_KILL_PROCESS",
            "syscalls": [
                {"names": ["mmap", "execve"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["brk"], "action": "SCMP_ACT_KILL"}
            ]
        }))
    }

    fn log_default() -> LinuxSeccomp {
        profile(json!({"defaultAction": "SCMP_ACT_LOG"}))
    }

    fn merged(mut p: LinuxSeccomp) -> LinuxSeccomp {
        merge_into(&mut p, Path::new(SOCK), Some("meta")).expect("merges");
        p
    }

    fn act(kind: LinuxSeccompAction) -> Action {
        Action::new(kind, None)
    }

    fn on64(p: &LinuxSeccomp, name: &str, args: [u64; 6]) -> Outcome {
        decide(p, name, args, Width::W64)
    }

    fn mmap(prot: u64, flags: u64) -> [u64; 6] {
        [0, 4096, prot, flags, u64::MAX, 0]
    }

    #[test]
    fn podman_like_profile_keeps_file_and_prot_none_mmap_on_the_fast_path() {
        let p = merged(podman_like());
        let notify = Outcome::Decided(act(ScmpActNotify));
        let allow = Outcome::Decided(act(ScmpActAllow));
        assert_eq!(on64(&p, "mmap", mmap(RW, ANON_PRIVATE)), notify);
        assert_eq!(on64(&p, "mmap", mmap(RW, MAP_ANONYMOUS | MAP_DROPPABLE)), notify);
        assert_eq!(on64(&p, "mmap", mmap(RW, ANON_PRIVATE | MAP_FIXED)), notify);
        assert_eq!(on64(&p, "mmap", mmap(RW, MAP_PRIVATE)), allow, "private file mapping");
        assert_eq!(on64(&p, "mmap", mmap(RW, MAP_SHARED)), allow, "shared file mapping");
        assert_eq!(on64(&p, "mmap", mmap(0, ANON_PRIVATE)), allow, "PROT_NONE reservation");
        assert_eq!(on64(&p, "mmap", mmap(RW, MAP_ANONYMOUS | MAP_SHARED)), allow, "shared memory");
        assert_eq!(on64(&p, "brk", [0; 6]), allow);
        assert_eq!(on64(&p, "brk", [0x10_0000, 0, 0, 0, 0, 0]), notify);
        assert_eq!(on64(&p, "mprotect", [0, 4096, 1, 0, 0, 0]), allow);
        assert_eq!(on64(&p, "mprotect", [0, 4096, RW, 0, 0, 0]), notify);
        assert_eq!(on64(&p, "execve", [0; 6]), notify);
        assert_eq!(on64(&p, "read", [0; 6]), allow);
        assert_eq!(on64(&p, "kexec_load", [0; 6]), Outcome::Decided(Action::new(ScmpActErrno, Some(1))));
        assert_eq!(on64(&p, "reboot", [0; 6]), Outcome::Decided(Action::new(ScmpActErrno, Some(38))));
        // i386's old mmap reads its arguments from memory: always notified.
        for regs in [[0; 6], mmap(RW, MAP_SHARED), mmap(0, 0)] {
            assert_eq!(decide(&p, "mmap", regs, Width::W32), notify);
        }
        assert_eq!(decide(&p, "mmap2", mmap(RW, ANON_PRIVATE), Width::W32), notify);
        assert_eq!(decide(&p, "mmap2", mmap(RW, MAP_PRIVATE), Width::W32), allow);
        assert_eq!(p.listener_path().as_deref(), Some(Path::new(SOCK)));
        assert_eq!(p.listener_metadata().as_deref(), Some("meta"));
    }

    #[test]
    fn other_names_stay_in_their_entry() {
        let p = merged(podman_like());
        let entries = p.syscalls().clone().unwrap();
        let allow = entries.iter().find(|e| e.names().iter().any(|n| n == "read")).unwrap();
        assert_eq!(allow.names(), &["read", "write", "munmap", "exit_group"].map(String::from));
        assert_eq!(entries[0], podman_like().syscalls().clone().unwrap()[0], "denials untouched");
        assert!(entries.iter().any(|e| e.names() == &["socket".to_string()] && e.args().is_some()));
    }

    #[test]
    fn denied_calls_stay_denied() {
        let p = merged(allow_default());
        let errno = Outcome::Decided(Action::new(ScmpActErrno, None));
        assert_eq!(on64(&p, "mremap", [0, 4096, 8192, 1, 0, 0]), errno);
        assert_eq!(on64(&p, "mprotect", [0, 4096, RW, 0, 0, 0]), Outcome::Decided(act(ScmpActNotify)));
        assert_eq!(on64(&p, "mprotect", [0, 4096, 1, 0, 0, 0]), Outcome::Decided(act(ScmpActLog)));
        let p = merged(deny_default());
        let kill = Outcome::Decided(act(ScmpActKillThread));
        assert_eq!(on64(&p, "brk", [0x10_0000, 0, 0, 0, 0, 0]), kill);
        let killp = Outcome::Decided(act(ScmpActKillProcess));
        assert_eq!(on64(&p, "mprotect", [0, 4096, RW, 0, 0, 0]), killp, "denied by default");
        assert!(!p
            .syscalls()
            .iter()
            .flatten()
            .any(|e| e.action() == ScmpActNotify && e.names().iter().any(|n| n == "mprotect" || n == "brk")));
    }

    #[test]
    fn an_allowing_default_needs_only_the_notify_rules() {
        let p = merged(profile(json!({"defaultAction": "SCMP_ACT_ALLOW"})));
        assert_eq!(p.syscalls().as_ref(), Some(&notify_syscalls()));
    }

    #[test]
    fn refuses_what_it_cannot_merge_and_leaves_the_profile_alone() {
        let cases = [
            (json!({"defaultAction": "SCMP_ACT_NOTIFY"}), "defaultAction is SCMP_ACT_NOTIFY"),
            (
                json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["openat"], "action": "SCMP_ACT_NOTIFY"}]}),
                "already sends openat to a seccomp agent",
            ),
            (json!({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/other.sock"}), "/run/other.sock"),
            (json!({"defaultAction": "SCMP_ACT_ALLOW", "listenerMetadata": "x"}), "listenerMetadata"),
            (
                json!({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["mmap"], "action": "SCMP_ACT_ALLOW",
                    "args": [{"index": 2, "value": 4, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]}]}),
                "SCMP_ACT_ALLOW rule for mmap has argument conditions",
            ),
            (
                json!({"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["brk"], "action": "SCMP_ACT_ALLOW"},
                    {"names": ["brk"], "action": "SCMP_ACT_ERRNO", "errnoRet": 12}]}),
                "two unconditional rules for brk, SCMP_ACT_ALLOW and SCMP_ACT_ERRNO(12)",
            ),
            (json!({"defaultAction": "SCMP_ACT_TRACE"}), "cannot tell what a tracer would do"),
        ];
        for (value, message) in cases {
            let original = profile(value);
            let mut p = original.clone();
            let err = merge_into(&mut p, Path::new(SOCK), None).expect_err(message);
            assert!(err.to_string().contains(message), "{err}");
            assert_eq!(p, original);
        }
    }

    /// Whether heapcap's rules for this ABI notify the call.
    fn heapcap_notifies(name: &str, args: [u64; 6], width: Width) -> bool {
        let (set, args) = match width {
            Width::W64 => (rules::NATIVE, args),
            Width::W32 => (rules::COMPAT, args.map(|a| a & 0xffff_ffff)),
        };
        set.iter().filter(|r| r.syscall == name).any(|r| {
            r.tests.iter().all(|t| match *t {
                ArgTest::NotEqual { index, value } => args[index as usize] != value,
                ArgTest::MaskedEqual { index, mask, value } => args[index as usize] & mask == value,
            })
        })
    }

    fn word() -> impl Strategy<Value = u64> {
        prop_oneof![
            0u64..0x40,
            (0u64..0x40, prop::sample::select(vec![0, MAP_FIXED, 0x10_0000, 0x4_0000, 0x8000_0000]))
                .prop_map(|(a, b)| a | b),
            any::<u64>(),
            Just(u64::MAX),
            (0u64..0x40).prop_map(|v| v | COMPAT_GUARD),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn merged_decision_is_notify_where_heapcap_says_else_the_original(
            which in 0usize..4,
            name in prop::sample::select(MEMORY.to_vec()),
            wide in any::<bool>(),
            args in prop::array::uniform6(word()),
        ) {
            let wide = wide && name != "mmap2"; // no mmap2 on 64-bit ABIs
            let width = if wide { Width::W64 } else { Width::W32 };
            let original = [podman_like, allow_default, deny_default, log_default][which]();
            let merged = merged(original.clone());
            let Outcome::Decided(before) = decide(&original, name, args, width) else {
                panic!("test profiles are unambiguous");
            };
            let runs = matches!(before.kind, ScmpActAllow | ScmpActLog);
            let want = if runs && heapcap_notifies(name, args, width) { act(ScmpActNotify) } else { before };
            let got = decide(&merged, name, args, width);
            if wide && name == "mmap" && args[1] & COMPAT_GUARD == COMPAT_GUARD && runs {
                // The guard's region on 64-bit: lengths no mmap can have; either answer is fine.
                let fine = [Outcome::Decided(want), Outcome::Decided(act(ScmpActNotify)),
                            Outcome::Ambiguous(vec![before, act(ScmpActNotify)]),
                            Outcome::Ambiguous(vec![act(ScmpActNotify), before])];
                prop_assert!(fine.contains(&got), "{} {:x?}: {:?}", name, args, got);
            } else {
                prop_assert_eq!(got, Outcome::Decided(want), "{} {:x?} width {:?}", name, args, width);
            }
        }

        #[test]
        fn merged_mmap_notifies_exactly_what_heapcap_counts(prot in word(), flags in word(), len in 1u64..1 << 40) {
            let p = merged(podman_like());
            let want = if counts_mmap(prot, flags) { ScmpActNotify } else { ScmpActAllow };
            prop_assert_eq!(on64(&p, "mmap", [0, len, prot, flags, u64::MAX, 0]), Outcome::Decided(act(want)));
        }
    }
}
