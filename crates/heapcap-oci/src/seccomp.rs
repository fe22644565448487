//! heapcap's notify rules ([`heapcap_policy::rules`]) as OCI `linux.seccomp` syscall entries.
//!
//! # One rule list for every ABI
//!
//! An OCI entry names system calls; the runtime (runc and crun both use libseccomp) resolves each
//! name for every architecture in `architectures` and tests the arguments in that ABI's registers.
//! An entry cannot be limited to one ABI. For heapcap's rules that means:
//!
//! - x86_64, x32, aarch64: the [`rules::NATIVE`] rules apply as they are.
//! - `mmap2` (i386, arm) takes its arguments in registers at the same positions as `mmap`, so
//!   [`rules::COMPAT`]'s `mmap2` rules apply as they are. On ABIs without `mmap2` libseccomp never
//!   matches the name.
//! - i386's `mmap` is `old_mmap(struct mmap_arg_struct *)`: its arguments sit in memory, and the
//!   native tests on `arg2`/`arg3` would read whatever the caller left in `edx`/`esi`. Checked with
//!   runc 1.1.5 and crun 1.8.1: with those tests only, glibc's `syscall(90, args)` mapped 2 x 4 MiB of
//!   anonymous writable memory without a single notification (`edx`/`esi` held unrelated values). It can
//!   only be notified unconditionally, but an unconditional `mmap` entry would also send every
//!   x86_64 `mmap` (every library load, every file mapping) to the agent.
//!
//!   So heapcap adds the entry `mmap` NOTIFY when `arg1 & 0xffffffff00000000 == 0xffffffff00000000`
//!   ([`COMPAT_GUARD`]). On 32-bit ABIs libseccomp compares only the low 32 bits of mask and value
//!   (libseccomp `_db_rule_gen_32`), the test becomes `arg1 & 0 == 0`, the rule becomes
//!   unconditional for that ABI, and an unconditional rule supersedes every conditional rule for
//!   the same call (libseccomp 2.5.4 compiles it to `if ($syscall == 90) action NOTIFY` on i386,
//!   whatever other `mmap` rules the profile has). On 64-bit ABIs it asks for a length of at least
//!   2^64 - 2^32 bytes, which no `mmap` that can succeed has: such a call is notified and fails in
//!   the kernel as before. The cost: on x32 every `mmap` is notified (correct, only slower; x32 is
//!   rare, Debian kernels need `syscall.x32=y`). A libseccomp that refused 64-bit values on 32-bit
//!   ABIs would make the runtime fail to create the container: loud, never silent. Checked with runc
//!   1.1.5 and crun 1.8.1 (also under podman 4.3.1): every i386 `old_mmap` reaches the agent, and
//!   heapcapd stops a 64 MiB quota there as it does for x86_64 `mmap`.
//!
//! Every rule only ever adds notifications, so a wrong guess costs a round trip to the agent, never
//! a broken call: the agent lets through what it does not count.

use std::path::Path;

use heapcap_policy::ledger::Counting;
use heapcap_policy::rules::{self, ArgTest, Extra};
use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompArgBuilder, LinuxSeccompOperator, LinuxSyscall,
};

use crate::condition::{self, Cube};

/// Mask and value of the guard test that holds for every call on 32-bit ABIs and for none that
/// can succeed on 64-bit ones (see the module docs).
pub const COMPAT_GUARD: u64 = 0xffff_ffff_0000_0000;

/// The argument of each call that the guard may test: one that no successful call has at
/// 2^64 - 2^32 or above. For `mmap`, the length.
fn guard_index(syscall: &str) -> Option<usize> {
    (syscall == "mmap").then_some(1)
}

/// What heapcap does with one system call, on every ABI of the profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyscallPlan {
    /// The call's name, as OCI and libseccomp spell it.
    pub name: &'static str,
    /// NOTIFY when all arguments of any one of these lists hold (an empty list: always).
    pub notify: Vec<Vec<LinuxSeccompArg>>,
    /// The calls that are not notified (outside the 32-bit guard), as alternatives like `notify`:
    /// a profile keeps its own action for exactly these. Empty: every call is notified.
    pub keep: Vec<Vec<LinuxSeccompArg>>,
}

fn arg(index: usize, op: LinuxSeccompOperator, value: u64, value_two: Option<u64>) -> LinuxSeccompArg {
    let builder = LinuxSeccompArgBuilder::default().index(index).op(op).value(value);
    let builder = match value_two {
        Some(v) => builder.value_two(v),
        None => builder,
    };
    // Every field of the builder has a default, so `build` cannot fail.
    builder.build().expect("LinuxSeccompArgBuilder defaults every field")
}

/// One heapcap test as an OCI argument. For `SCMP_CMP_MASKED_EQ`, OCI's `value` is the mask and
/// `valueTwo` the expected value (runc passes them to libseccomp as `datum_a`, `datum_b`).
fn render_test(test: &ArgTest) -> LinuxSeccompArg {
    match *test {
        ArgTest::NotEqual { index, value } => arg(index as usize, LinuxSeccompOperator::ScmpCmpNe, value, None),
        ArgTest::MaskedEqual { index, mask, value } => {
            arg(index as usize, LinuxSeccompOperator::ScmpCmpMaskedEq, mask, Some(value))
        }
    }
}

/// A cube as OCI arguments: one per argument index, as runc needs (it ORs tests on one index).
fn render_cube(cube: &Cube) -> Vec<LinuxSeccompArg> {
    cube.tests()
        .map(|(index, mask, value)| match mask {
            u64::MAX => arg(index, LinuxSeccompOperator::ScmpCmpEq, value, None),
            _ => arg(index, LinuxSeccompOperator::ScmpCmpMaskedEq, mask, Some(value)),
        })
        .collect()
}

/// The calls heapcap's rules name, in the order they first appear in NATIVE, then COMPAT.
fn syscall_names(native: &[rules::NotifyRule], compat: &[rules::NotifyRule]) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = Vec::new();
    for rule in native.iter().chain(compat) {
        if !names.contains(&rule.syscall) {
            names.push(rule.syscall);
        }
    }
    names
}

/// Every call heapcap notifies, with the notify and keep conditions that hold on all ABIs.
pub fn plan() -> Vec<SyscallPlan> {
    plan_for(Counting::Heap)
}

/// [`plan`] for `counting`: strict mode's rules ([`rules::STRICT_NATIVE`]) also notify every
/// writable `mmap`/`mmap2` and `shmat`, and i386's `ipc(SHMAT)`.
pub fn plan_for(counting: Counting) -> Vec<SyscallPlan> {
    plan_with(counting, Extra::default())
}

/// [`plan_for`], with the `extra` calls too.
pub fn plan_with(counting: Counting, extra: Extra) -> Vec<SyscallPlan> {
    let (native, compat) = rules::for_counting(counting);
    let (native_rules, compat_rules) = (extra.with(native), extra.with(compat));
    syscall_names(&native_rules, &compat_rules)
        .into_iter()
        .map(|name| {
            let tests_of = |set: &[rules::NotifyRule]| -> Vec<&'static [ArgTest]> {
                set.iter().filter(|r| r.syscall == name).map(|r| r.tests).collect()
            };
            let native = tests_of(&native_rules);
            // Rules the 32-bit ABIs need beyond the native ones.
            let compat_only: Vec<_> = tests_of(&compat_rules).into_iter().filter(|t| !native.contains(t)).collect();
            let mut exact = native.clone();
            let mut guard = None;
            for tests in compat_only {
                match guard_index(name) {
                    // Unconditional on 32-bit ABIs only, through the guard.
                    Some(index) if tests.is_empty() && !native.is_empty() => guard = Some(index),
                    // Applies on every ABI: more notifications than needed on 64-bit, never fewer.
                    _ => exact.push(tests),
                }
            }
            let mut notify: Vec<Vec<LinuxSeccompArg>> =
                exact.iter().map(|tests| tests.iter().map(render_test).collect()).collect();
            if let Some(index) = guard {
                notify.push(vec![arg(index, LinuxSeccompOperator::ScmpCmpMaskedEq, COMPAT_GUARD, Some(COMPAT_GUARD))]);
            }
            let keep = condition::complement(&exact).iter().map(render_cube).collect();
            SyscallPlan { name, notify, keep }
        })
        .collect()
}

/// Entries with `action`, one per distinct argument list, naming every call that has that list.
pub(crate) fn group(
    alternatives: impl IntoIterator<Item = (&'static str, Vec<LinuxSeccompArg>)>,
    action: LinuxSeccompAction,
) -> Vec<LinuxSyscall> {
    let mut groups: Vec<(Vec<String>, Vec<LinuxSeccompArg>)> = Vec::new();
    for (name, args) in alternatives {
        match groups.iter_mut().find(|(_, a)| *a == args) {
            Some((names, _)) if !names.iter().any(|n| n == name) => names.push(name.to_string()),
            Some(_) => {}
            None => groups.push((vec![name.to_string()], args)),
        }
    }
    groups
        .into_iter()
        .map(|(names, args)| {
            let mut s = LinuxSyscall::default();
            s.set_names(names);
            s.set_action(action);
            s.set_args((!args.is_empty()).then_some(args));
            s
        })
        .collect()
}

/// heapcap's notify rules as OCI syscall entries with action `SCMP_ACT_NOTIFY`, for a profile
/// whose `architectures` are any of x86_64, x86, x32, aarch64, arm.
pub fn notify_syscalls() -> Vec<LinuxSyscall> {
    notify_syscalls_for(Counting::Heap)
}

/// [`notify_syscalls`] for `counting`.
pub fn notify_syscalls_for(counting: Counting) -> Vec<LinuxSyscall> {
    notify_syscalls_with(counting, Extra::default())
}

/// [`notify_syscalls_for`], with the `extra` calls too.
pub fn notify_syscalls_with(counting: Counting, extra: Extra) -> Vec<LinuxSyscall> {
    let alternatives =
        plan_with(counting, extra).into_iter().flat_map(|p| p.notify.into_iter().map(move |args| (p.name, args)));
    group(alternatives, LinuxSeccompAction::ScmpActNotify)
}

/// Whether a `config.json` (as JSON) sends the strict rules' calls to its agent: `None` when its
/// profile names no `listenerPath` (the filter came from elsewhere, e.g. the prestart hook, which
/// injects the program its settings ask for); else whether a `SCMP_ACT_NOTIFY` entry names
/// `shmat`, which only [`rules::STRICT_NATIVE`] notifies.
pub fn sends_strict_rules(config: &serde_json::Value) -> Option<bool> {
    let seccomp = config.get("linux")?.get("seccomp")?;
    seccomp.get("listenerPath").and_then(|p| p.as_str()).filter(|p| !p.is_empty())?;
    let entries = seccomp.get("syscalls").and_then(|s| s.as_array()).cloned().unwrap_or_default();
    Some(entries.iter().any(|e| {
        e.get("action").and_then(|a| a.as_str()) == Some("SCMP_ACT_NOTIFY")
            && e.get("names").and_then(|n| n.as_array()).is_some_and(|n| n.iter().any(|x| x == "shmat"))
    }))
}

/// A profile that allows every call and sends heap growth to the agent at `listener_path`
/// (with `metadata` as `listenerMetadata`), for x86_64 hosts (x86_64, x86, x32 ABIs).
///
/// It restricts nothing: combine it with no other profile, or use [`crate::merge_into`] to add
/// heapcap to a profile that does.
pub fn heapcap_profile(listener_path: &Path, metadata: Option<&str>) -> LinuxSeccomp {
    heapcap_profile_for(Counting::Heap, listener_path, metadata)
}

/// [`heapcap_profile`] with the rules of `counting`.
pub fn heapcap_profile_for(counting: Counting, listener_path: &Path, metadata: Option<&str>) -> LinuxSeccomp {
    heapcap_profile_with(counting, listener_path, metadata, Extra::default())
}

/// [`heapcap_profile_for`], sending the `extra` calls too.
pub fn heapcap_profile_with(
    counting: Counting,
    listener_path: &Path,
    metadata: Option<&str>,
    extra: Extra,
) -> LinuxSeccomp {
    let mut profile = LinuxSeccomp::default();
    profile.set_default_action(LinuxSeccompAction::ScmpActAllow);
    profile.set_architectures(Some(vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32]));
    profile.set_listener_path(Some(listener_path.to_path_buf()));
    profile.set_listener_metadata(metadata.map(str::to_string));
    profile.set_syscalls(Some(notify_syscalls_with(counting, extra)));
    profile
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args_of(entry: &LinuxSyscall) -> Vec<(usize, LinuxSeccompOperator, u64, Option<u64>)> {
        entry.args().iter().flatten().map(|a| (a.index(), a.op(), a.value(), a.value_two())).collect()
    }

    #[test]
    fn tells_a_profile_with_the_strict_rules() {
        let config = |p: LinuxSeccomp| serde_json::json!({"linux": {"seccomp": serde_json::to_value(p).unwrap()}});
        let sock = Path::new("/run/heapcap/heapcapd.sock");
        assert_eq!(sends_strict_rules(&config(heapcap_profile_for(Counting::Strict, sock, None))), Some(true));
        assert_eq!(sends_strict_rules(&config(heapcap_profile(sock, None))), Some(false));
        assert_eq!(
            sends_strict_rules(&serde_json::json!({"linux": {}})),
            None,
            "no listenerPath: not from config.json"
        );
    }

    #[test]
    fn renders_every_native_and_compat_rule() {
        let entries = notify_syscalls();
        assert!(entries.iter().all(|e| e.action() == LinuxSeccompAction::ScmpActNotify));
        for rule in rules::NATIVE.iter().chain(rules::COMPAT) {
            let found = entries.iter().filter(|e| e.names().iter().any(|n| n == rule.syscall)).any(|e| {
                let want: Vec<_> = rule.tests.iter().map(render_test).collect();
                e.args().clone().unwrap_or_default() == want
                    // i386's old mmap: unconditional there, through the guard.
                    || (rule.tests.is_empty() && args_of(e).iter().any(|a| a.2 == COMPAT_GUARD))
            });
            assert!(found, "{rule:?} is not rendered");
        }
    }

    #[test]
    fn masked_eq_puts_the_mask_in_value_and_the_datum_in_value_two() {
        let entries = notify_syscalls();
        let mprotect = entries.iter().find(|e| e.names().iter().any(|n| n == "mprotect")).unwrap();
        assert_eq!(args_of(mprotect), vec![(2, LinuxSeccompOperator::ScmpCmpMaskedEq, 0x2, Some(0x2))]);
        let json = serde_json::to_value(mprotect).unwrap();
        assert_eq!(
            json["args"][0],
            serde_json::json!({"index": 2, "value": 2, "valueTwo": 2, "op": "SCMP_CMP_MASKED_EQ"})
        );
        assert_eq!(mprotect.names(), &["mprotect".to_string(), "pkey_mprotect".to_string()]);
        // A mask that differs from its value: MAP_TYPE | MAP_ANONYMOUS, expecting MAP_PRIVATE | MAP_ANONYMOUS.
        let mmap = entries.iter().find(|e| e.names().iter().any(|n| n == "mmap")).unwrap();
        assert_eq!(args_of(mmap)[1], (3, LinuxSeccompOperator::ScmpCmpMaskedEq, 0x2f, Some(0x22)));
    }

    #[test]
    fn old_mmap_is_guarded_and_mmap2_tested() {
        let entries = notify_syscalls();
        let guard: Vec<_> = entries.iter().filter(|e| args_of(e).iter().any(|a| a.2 == COMPAT_GUARD)).collect();
        assert_eq!(guard.len(), 1);
        assert_eq!(guard[0].names(), &["mmap".to_string()]);
        assert_eq!(
            args_of(guard[0]),
            vec![(1, LinuxSeccompOperator::ScmpCmpMaskedEq, COMPAT_GUARD, Some(COMPAT_GUARD))]
        );
        let mmap2: Vec<_> = entries.iter().filter(|e| e.names().iter().any(|n| n == "mmap2")).collect();
        assert_eq!(mmap2.len(), 2, "the private and the droppable rule");
        assert!(mmap2.iter().all(|e| e.names().iter().any(|n| n == "mmap")), "same tests as native mmap");
    }

    #[test]
    fn no_entry_tests_one_argument_twice() {
        // runc turns several tests on one argument into separate rules (OR, not AND).
        for plan in plan() {
            for args in plan.notify.iter().chain(&plan.keep) {
                let mut seen: Vec<usize> = args.iter().map(|a| a.index()).collect();
                seen.dedup();
                assert_eq!(seen.len(), args.len(), "{}: {args:?}", plan.name);
            }
        }
    }

    #[test]
    fn unconditional_calls_keep_nothing() {
        for plan in plan() {
            let always = plan.notify.iter().any(Vec::is_empty);
            assert_eq!(always, plan.keep.is_empty(), "{}", plan.name);
        }
    }

    #[test]
    fn sysinfo_is_sent_only_when_asked_for() {
        let sends = |entries: &[LinuxSyscall]| entries.iter().any(|e| e.names().iter().any(|n| n == "sysinfo"));
        assert!(!sends(&notify_syscalls()));
        let with = notify_syscalls_with(Counting::Heap, Extra { machine: true });
        assert!(sends(&with));
        let sysinfo = with.iter().find(|e| e.names().iter().any(|n| n == "sysinfo")).unwrap();
        assert_eq!(sysinfo.args(), &None, "every sysinfo call, on every ABI");
        let plan = plan_with(Counting::Heap, Extra { machine: true });
        assert!(plan.iter().any(|p| p.name == "sysinfo" && p.keep.is_empty()));
    }

    #[test]
    fn profile_allows_everything_else() {
        let p = heapcap_profile(Path::new("/run/heapcap/heapcapd.sock"), Some("m"));
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActAllow);
        assert_eq!(p.listener_path().as_deref(), Some(Path::new("/run/heapcap/heapcapd.sock")));
        assert_eq!(p.listener_metadata().as_deref(), Some("m"));
        assert_eq!(p.syscalls().as_ref(), Some(&notify_syscalls()));
        assert!(!notify_syscalls().iter().any(|e| e.names().iter().any(|n| n == "write")), "runtimes refuse that");
    }
}
