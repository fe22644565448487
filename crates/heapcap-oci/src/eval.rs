//! Test-only: what runc 1.1 and libseccomp 2.5 make of an OCI profile for one call.
//!
//! Modelled on what they were seen to do: runc skips a rule whose action is the default action
//! and splits a rule with several tests on one argument into one rule per test; on a 32-bit ABI
//! libseccomp compares the low 32 bits only and drops a masked test that becomes `x & 0 == 0`; an
//! unconditional rule wins over every conditional one for the same call; conditional rules that
//! match one call with different actions are an [`Outcome::Ambiguous`] (libseccomp's order decides).

use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompArg, LinuxSeccompOperator};

use crate::merge::Action;

/// How wide the ABI's arguments are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    W64,
    W32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Decided(Action),
    Ambiguous(Vec<Action>),
}

fn narrow(x: u64, width: Width) -> u64 {
    match width {
        Width::W64 => x,
        Width::W32 => x & 0xffff_ffff,
    }
}

/// A test, or `None` when it always holds on this ABI.
fn test(arg: &LinuxSeccompArg, width: Width) -> Option<(usize, LinuxSeccompOperator, u64, u64)> {
    let (a, b) = (narrow(arg.value(), width), narrow(arg.value_two().unwrap_or(0), width));
    if arg.op() == LinuxSeccompOperator::ScmpCmpMaskedEq && a == 0 && b == 0 {
        return None;
    }
    Some((arg.index(), arg.op(), a, b))
}

fn holds(t: &(usize, LinuxSeccompOperator, u64, u64), args: &[u64; 6], width: Width) -> bool {
    use LinuxSeccompOperator::*;
    let (index, op, a, b) = *t;
    let x = narrow(args[index], width);
    match op {
        ScmpCmpNe => x != a,
        ScmpCmpLt => x < a,
        ScmpCmpLe => x <= a,
        ScmpCmpEq => x == a,
        ScmpCmpGe => x >= a,
        ScmpCmpGt => x > a,
        ScmpCmpMaskedEq => x & a == b,
    }
}

/// The action `profile` takes for `syscall(args)` on an ABI of `width`.
pub fn decide(profile: &LinuxSeccomp, syscall: &str, args: [u64; 6], width: Width) -> Outcome {
    let default = Action::new(profile.default_action(), profile.default_errno_ret());
    let mut rules: Vec<(Action, Vec<_>)> = Vec::new();
    for entry in profile.syscalls().iter().flatten() {
        let action = Action::new(entry.action(), entry.errno_ret());
        if action == default || !entry.names().iter().any(|n| n == syscall) {
            continue;
        }
        let tests: &[LinuxSeccompArg] = entry.args().as_deref().unwrap_or_default();
        let mut indices: Vec<usize> = tests.iter().map(|t| t.index()).collect();
        indices.sort();
        indices.dedup();
        if indices.len() < tests.len() {
            rules.extend(tests.iter().map(|t| (action, test(t, width).into_iter().collect())));
        } else {
            rules.push((action, tests.iter().filter_map(|t| test(t, width)).collect()));
        }
    }
    let distinct = |mut actions: Vec<Action>| {
        actions.dedup();
        actions.sort_by_key(|a| a.to_string());
        actions.dedup();
        match actions.as_slice() {
            [] => Outcome::Decided(default),
            [one] => Outcome::Decided(*one),
            _ => Outcome::Ambiguous(actions),
        }
    };
    let unconditional: Vec<Action> = rules.iter().filter(|(_, t)| t.is_empty()).map(|(a, _)| *a).collect();
    if !unconditional.is_empty() {
        return distinct(unconditional);
    }
    distinct(rules.iter().filter(|(_, t)| t.iter().all(|t| holds(t, &args, width))).map(|(a, _)| *a).collect())
}
