//! Argument conditions as sets of calls, so a rule can be split exactly in two.
//!
//! A [`Cube`] is a conjunction of masked-equality tests, at most one per argument
//! (`args[i] & mask == value`): what one OCI syscall entry with `SCMP_CMP_MASKED_EQ`/`SCMP_CMP_EQ`
//! arguments matches. [`complement`] turns heapcap's notify rules into the union of cubes that
//! none of them matches, so a profile can keep its own action for exactly those calls.

use heapcap_policy::rules::ArgTest;

/// System calls have six arguments.
pub const ARGS: usize = 6;

/// `args[i] & mask[i] == value[i]` for every argument `i`; a zero mask tests nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cube {
    mask: [u64; ARGS],
    value: [u64; ARGS],
}

impl Cube {
    /// Every call.
    pub const ANY: Cube = Cube { mask: [0; ARGS], value: [0; ARGS] };

    /// `args[index] & mask == value`; `None` when no call can match (`value` has bits outside
    /// `mask`) or `index` is not an argument.
    pub fn masked(index: usize, mask: u64, value: u64) -> Option<Cube> {
        if index >= ARGS || value & !mask != 0 {
            return None;
        }
        let mut cube = Cube::ANY;
        cube.mask[index] = mask;
        cube.value[index] = value;
        Some(cube)
    }

    /// The calls both match, or `None` if there are none.
    pub fn intersect(&self, other: &Cube) -> Option<Cube> {
        let mut out = Cube::ANY;
        for i in 0..ARGS {
            let both = self.mask[i] & other.mask[i];
            if (self.value[i] ^ other.value[i]) & both != 0 {
                return None;
            }
            out.mask[i] = self.mask[i] | other.mask[i];
            out.value[i] = self.value[i] | other.value[i];
        }
        Some(out)
    }

    /// Every call `self` matches is matched by `other`.
    pub fn within(&self, other: &Cube) -> bool {
        (0..ARGS).all(|i| other.mask[i] & !self.mask[i] == 0 && self.value[i] & other.mask[i] == other.value[i])
    }

    /// Whether a call with these arguments matches.
    pub fn contains(&self, args: &[u64; ARGS]) -> bool {
        (0..ARGS).all(|i| args[i] & self.mask[i] == self.value[i])
    }

    /// The tests, as `(index, mask, value)`, in argument order.
    pub fn tests(&self) -> impl Iterator<Item = (usize, u64, u64)> + '_ {
        (0..ARGS).filter(|&i| self.mask[i] != 0).map(|i| (i, self.mask[i], self.value[i]))
    }
}

/// The calls one test does not match, as a union of cubes (one per tested bit for a masked test).
fn negate(test: &ArgTest) -> Vec<Cube> {
    match *test {
        ArgTest::NotEqual { index, value } => Cube::masked(index as usize, u64::MAX, value).into_iter().collect(),
        ArgTest::MaskedEqual { index, mask, value } => (0..64)
            .map(|bit| 1u64 << bit)
            .filter(|b| mask & b != 0)
            .filter_map(|b| Cube::masked(index as usize, b, !value & b))
            .collect(),
    }
}

/// Add `cube` to a union, keeping only cubes that no other one contains.
fn insert_minimal(union: &mut Vec<Cube>, cube: Cube) {
    if union.iter().any(|u| cube.within(u)) {
        return;
    }
    union.retain(|u| !u.within(&cube));
    union.push(cube);
}

/// The calls that none of `rules` (each a conjunction of tests) matches, as a sorted union of cubes.
///
/// An empty result means the rules match every call (one of them has no tests).
pub fn complement(rules: &[&[ArgTest]]) -> Vec<Cube> {
    let mut union = vec![Cube::ANY];
    for tests in rules {
        // Not this rule: at least one of its tests fails.
        let negated: Vec<Cube> = tests.iter().flat_map(negate).collect();
        let mut next = Vec::new();
        for kept in &union {
            for n in &negated {
                if let Some(c) = kept.intersect(n) {
                    insert_minimal(&mut next, c);
                }
            }
        }
        union = next;
    }
    union.sort();
    union
}

#[cfg(test)]
mod tests {
    use super::*;
    use heapcap_policy::rules::NATIVE;
    use proptest::prelude::*;

    fn holds(test: &ArgTest, args: &[u64; ARGS]) -> bool {
        match *test {
            ArgTest::NotEqual { index, value } => args[index as usize] != value,
            ArgTest::MaskedEqual { index, mask, value } => args[index as usize] & mask == value,
        }
    }

    fn rules_for(name: &str) -> Vec<&'static [ArgTest]> {
        NATIVE.iter().filter(|r| r.syscall == name).map(|r| r.tests).collect()
    }

    #[test]
    fn mmap_complement_is_small_and_one_test_per_argument() {
        let cubes = complement(&rules_for("mmap"));
        assert_eq!(cubes.len(), 6, "{cubes:?}");
        assert!(cubes.iter().all(|c| c.tests().count() == 1));
    }

    #[test]
    fn unconditional_rules_have_an_empty_complement() {
        assert!(complement(&rules_for("mremap")).is_empty());
        assert_eq!(complement(&[]), vec![Cube::ANY]);
    }

    #[test]
    fn brk_complement_is_brk_zero() {
        assert_eq!(complement(&rules_for("brk")), vec![Cube::masked(0, u64::MAX, 0).unwrap()]);
    }

    #[test]
    fn impossible_tests_match_nothing() {
        assert_eq!(Cube::masked(0, 0x2, 0x3), None);
        assert_eq!(Cube::masked(6, 0x2, 0x2), None);
        let a = Cube::masked(2, 0x2, 0x2).unwrap();
        assert_eq!(a.intersect(&Cube::masked(2, 0x3, 0x1).unwrap()), None);
    }

    fn arg() -> impl Strategy<Value = u64> {
        prop_oneof![0u64..0x40, any::<u64>(), (0u64..0x40).prop_map(|v| v | 0x10_0000), Just(u64::MAX)]
    }

    proptest! {
        #[test]
        fn complement_is_exact(name in prop::sample::select(vec!["brk", "mmap", "mprotect", "mremap"]),
                               args in prop::array::uniform6(arg())) {
            let rules = rules_for(name);
            let notified = rules.iter().any(|tests| tests.iter().all(|t| holds(t, &args)));
            let kept = complement(&rules).iter().any(|c| c.contains(&args));
            prop_assert_ne!(notified, kept, "{} {:x?}", name, args);
        }

        #[test]
        fn intersect_and_within_agree_with_contains(a in (0usize..3, arg(), arg()), b in (0usize..3, arg(), arg()),
                                                    args in prop::array::uniform6(arg())) {
            let (Some(x), Some(y)) = (Cube::masked(a.0, a.1, a.1 & a.2), Cube::masked(b.0, b.1, b.1 & b.2)) else {
                return Ok(());
            };
            let both = x.intersect(&y).is_some_and(|c| c.contains(&args));
            prop_assert_eq!(both, x.contains(&args) && y.contains(&args));
            if x.within(&y) && x.contains(&args) {
                prop_assert!(y.contains(&args));
            }
        }
    }
}
