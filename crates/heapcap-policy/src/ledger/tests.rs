use super::*;
use crate::maps::{Maps, Vma};
use proptest::prelude::*;

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;

fn anon(start: u64, len: u64) -> Vma {
    Vma { start, end: start + len, writable: true, anon_private: true, is_heap: false, ..Vma::default() }
}

fn snap(vmas: Vec<Vma>) -> Snapshot {
    Snapshot { maps: Maps::from_vmas(vmas), ..Snapshot::default() }
}

fn key(n: u64) -> CallKey {
    CallKey { nr: 9, args: [n, 0, 0, 0, 0, 0] }
}

fn map(len: u64) -> Request {
    Request::Map { addr: 0, len, fixed: false }
}

fn enforcing(limit: u64) -> Ledger {
    Ledger::new(Limits { process: Some(limit), total: None }, Mode::Enforce, PAGE)
}

fn admit(l: &mut Ledger, pid: Pid, vmas: Vec<Vma>) {
    assert!(l.admit(pid, "p".into(), Figure::Exact(&snap(vmas)), false));
}

/// Decide on the exact figure `vmas`, with a token taken now.
fn exact(
    l: &mut Ledger,
    pid: Pid,
    tid: Tid,
    req: &Request,
    k: CallKey,
    vmas: Vec<Vma>,
    states: &[(Tid, ThreadState)],
) -> Verdict {
    let token = l.token(pid).unwrap();
    l.decide(pid, tid, req, k, Figure::Exact(&snap(vmas)), states, token)
}

fn upper(
    l: &mut Ledger,
    pid: Pid,
    tid: Tid,
    req: &Request,
    k: CallKey,
    figure: u64,
    states: &[(Tid, ThreadState)],
) -> Verdict {
    let token = l.token(pid).unwrap();
    l.decide(pid, tid, req, k, Figure::Upper(figure), states, token)
}

/// `statm`'s excess over the counted heap in these tests (stacks, private file data).
const EXTRA: u64 = 256 << 10;

/// What the engine does: the fast path; else `statm` (the counted heap of `vmas` plus
/// [`EXTRA`]), then the mappings when `statm` does not settle it. Returns the verdict and
/// whether the mappings were read.
fn engine(
    l: &mut Ledger,
    pid: Pid,
    tid: Tid,
    req: &Request,
    k: CallKey,
    vmas: &[Vma],
    states: &[(Tid, ThreadState)],
) -> (Verdict, bool) {
    let need = match l.fast(pid, tid, req, k) {
        Step::Allow => return (Verdict::Allow, false),
        Step::Measure { need, .. } => need,
    };
    let snapshot = Snapshot { maps: Maps::from_vmas(vmas.to_vec()), start_brk: None, upper: None };
    let upper = snapshot.maps.counted() + EXTRA;
    if need != Need::Exact {
        let token = l.token(pid).unwrap();
        let figure = match need {
            Need::Image => Figure::Image { upper, start_brk: None },
            _ => Figure::Upper(upper),
        };
        match l.decide(pid, tid, req, k, figure, states, token) {
            Verdict::MeasureExact => {}
            v => return (v, false),
        }
    }
    let token = l.token(pid).unwrap();
    let exact = Snapshot { upper: Some(upper), ..snapshot };
    (l.decide(pid, tid, req, k, Figure::Exact(&exact), states, token), true)
}

fn deny(scope: Scope, usage: u64, request: u64, limit: u64) -> Verdict {
    Verdict::Deny(Deny { scope, usage, request: Some(request), limit })
}

#[test]
fn fast_path_below_quota_then_exact_near_it() {
    let mut l = enforcing(64 * MIB);
    admit(&mut l, 1, vec![anon(0, MIB)]);
    // Grows through the peak marks: sometimes measured, never denied far below the quota.
    let mut held = vec![anon(0, MIB)];
    let mut at = 1 << 30;
    let mut exact_reads = 0;
    for i in 0..62 {
        let (d, read) = engine(&mut l, 1, 1, &map(MIB), key(i), &held, &[]);
        exact_reads += usize::from(read);
        assert_eq!(d, Verdict::Allow, "request {i}");
        l.thread_seen(1, 1);
        held.push(anon(at, MIB));
        at += MIB;
    }
    assert!(exact_reads < 40, "a heap that only grows is measured at its new peaks: {exact_reads} exact reads");
    // 63 MiB held; one more fits exactly, the next does not.
    assert_eq!(l.fast(1, 1, &map(MIB), key(100)), Step::Measure { need: Need::Upper, refresh_others: false }, "a peak");
    assert_eq!(exact(&mut l, 1, 1, &map(MIB), key(100), held.clone(), &[]), Verdict::Allow);
    l.thread_seen(1, 1);
    held.push(anon(at, MIB));
    assert!(matches!(l.fast(1, 1, &map(PAGE), key(101)), Step::Measure { .. }));
    let d = exact(&mut l, 1, 1, &map(PAGE), key(101), held, &[]);
    assert_eq!(d, deny(Scope::Process, 64 * MIB, PAGE, 64 * MIB));
    assert_eq!(l.account(1).unwrap().denials, 1);
}

#[test]
fn frees_are_seen_at_the_next_exact_read() {
    let mut l = enforcing(8 * MIB);
    admit(&mut l, 1, vec![anon(0, 7 * MIB)]);
    assert!(matches!(l.fast(1, 1, &map(2 * MIB), key(1)), Step::Measure { .. }));
    // The program freed 6 MiB without telling anyone: the maps show it.
    assert_eq!(exact(&mut l, 1, 1, &map(2 * MIB), key(1), vec![anon(0, MIB)], &[]), Verdict::Allow);
    assert_eq!(l.account(1).unwrap().bound, 3 * MIB);
}

#[test]
fn growth_in_flight_on_another_thread_is_not_lost() {
    let mut l = enforcing(10 * MIB);
    admit(&mut l, 1, vec![]);
    assert!(matches!(l.fast(1, 11, &map(6 * MIB), key(1)), Step::Measure { .. }), "past the peak mark");
    assert_eq!(exact(&mut l, 1, 11, &map(6 * MIB), key(1), vec![], &[]), Verdict::Allow);
    // Thread 12 asks while thread 11's 6 MiB is not yet in the maps.
    assert!(matches!(l.fast(1, 12, &map(6 * MIB), key(2)), Step::Measure { .. }));
    assert_eq!(l.pending_threads(1, 12), vec![11]);
    let busy = [(11, ThreadState::Busy)];
    assert!(matches!(exact(&mut l, 1, 12, &map(6 * MIB), key(2), vec![], &busy), Verdict::Deny(_)));
    let still_in_call = [(11, ThreadState::InCall(key(1)))];
    assert!(matches!(exact(&mut l, 1, 12, &map(6 * MIB), key(2), vec![], &still_in_call), Verdict::Deny(_)));
    // Once thread 11 sleeps elsewhere, its mapping is in the maps and no longer pending.
    let moved_on = [(11, ThreadState::InCall(key(99)))];
    let d = exact(&mut l, 1, 12, &map(3 * MIB), key(3), vec![anon(0, 6 * MIB)], &moved_on);
    assert_eq!(d, Verdict::Allow);
    assert_eq!(l.account(1).unwrap().bound, 9 * MIB);
}

#[test]
fn growth_of_running_threads_is_bounded_not_estimated_twice_nor_measured_at_every_call() {
    // A crowd: 100 threads, each with 64 KiB let through and still running (landed or not,
    // nothing tells), far below a 1 GiB quota; the exact heap is 4 MiB, theirs included.
    let mut l = enforcing(1 << 30);
    admit(&mut l, 1, vec![anon(0, 4 * MIB)]);
    let chunk = 64 << 10;
    let running: Vec<(Tid, ThreadState)> = (100..200).map(|t| (t, ThreadState::Busy)).collect();
    let mut measured = 0;
    for (i, (t, _)) in running.iter().enumerate() {
        let step = l.fast(1, *t, &map(chunk), key(i as u64));
        if step != Step::Allow {
            measured += 1;
            let token = l.token(1).unwrap();
            let figure = Figure::Exact(&snap(vec![anon(0, 4 * MIB)]));
            assert_eq!(l.decide(1, *t, &map(chunk), key(i as u64), figure, &running, token), Verdict::Allow);
        }
    }
    let a = l.account(1).unwrap();
    assert!(a.bound >= 4 * MIB + 100 * chunk - chunk, "the bound counts every unsettled growth: {}", a.bound);
    // The last figure saw 4 MiB: the estimate does not add the unsettled growth again (the peak
    // does: it may have landed after the figure, and a peak must not miss it).
    assert!(a.estimate <= 4 * MIB + MIB + 16 * chunk, "estimate {} counts the crowd twice", a.estimate);
    assert!(a.peak >= 4 * MIB + 90 * chunk && a.peak <= 4 * MIB + 100 * chunk + MIB, "peak {}", a.peak);
    // Measured at each 1 MiB of growth past the last figure (16 calls), not at every call.
    assert!(measured <= 100 / 16 + 1, "{measured} of 100 calls measured");
}

#[test]
fn far_from_the_quota_only_the_largest_growths_in_flight_are_asked_about() {
    // 8 MiB measured: a peak is precise to 1 MiB. Threads 11-18 have 128 KiB in flight each,
    // thread 20 has 4 MiB; thread 30 asks.
    let mut l = enforcing(1 << 30);
    admit(&mut l, 1, vec![anon(0, 8 * MIB)]);
    for t in 11..=18 {
        assert_eq!(l.fast(1, t, &map(128 << 10), key(t.into())), Step::Allow);
    }
    let token = l.token(1).unwrap();
    assert!(l.refresh(1, Figure::Exact(&snap(vec![anon(0, 9 * MIB)])), &[], token), "a new peak, measured");
    assert_eq!(l.fast(1, 20, &map(4 * MIB), key(20)), Step::Measure { need: Need::Upper, refresh_others: false });
    assert_eq!(
        l.decide(1, 20, &map(4 * MIB), key(20), Figure::Exact(&snap(vec![anon(0, 9 * MIB)])), &[], l.token(1).unwrap()),
        Verdict::Allow
    );
    // Far from the quota: the small growths, 1 MiB in all, stay counted without a read; the
    // 4 MiB is worth asking about.
    assert_eq!(l.threads_to_ask(1, 30, &map(PAGE)), vec![20]);
    assert_eq!(l.pending_threads(1, 30), vec![11, 12, 13, 14, 15, 16, 17, 18, 20], "all, for the total");
    // Left out, they still count: in the bound (the read saw 9 MiB, as much as the bound held
    // with them: landed or not, they are within it), and in the peak on top of the estimate.
    let a = l.account(1).unwrap();
    assert_eq!(a.bound, 9 * MIB + 4 * MIB);
    assert!(a.peak >= 9 * MIB + 4 * MIB, "peak {}", a.peak);
    // Where a quota is in question, every thread is asked: a decision may turn on it.
    l.set_process_limit(1, Some(15 * MIB));
    assert_eq!(l.threads_to_ask(1, 30, &map(3 * MIB)), vec![11, 12, 13, 14, 15, 16, 17, 18, 20]);
    assert_eq!(l.threads_to_ask(1, 30, &map(PAGE)), vec![20], "a page still fits the bound");
    // The asking thread is never asked about itself.
    assert_eq!(l.threads_to_ask(1, 20, &map(3 * MIB)), vec![11, 12, 13, 14, 15, 16, 17, 18]);
}

#[test]
fn growth_let_through_after_the_token_is_never_retired_by_its_figure() {
    let mut l = enforcing(64 * MIB);
    admit(&mut l, 1, vec![]);
    // A figure is about to be read (for `ps`, or another listener's total) ...
    let token = l.token(1).unwrap();
    // ... meanwhile thread 11 is let through 512 KiB, which lands after the maps were read.
    assert_eq!(l.fast(1, 11, &map(MIB / 2), key(1)), Step::Allow);
    // Thread 11 is seen idle by a state read taken for the figure: the growth still counts.
    assert!(l.refresh(1, Figure::Exact(&snap(vec![])), &[(11, ThreadState::Idle)], token));
    assert_eq!(l.account(1).unwrap().bound, MIB / 2);
    // A later figure with a later token may retire it.
    let token = l.token(1).unwrap();
    assert!(l.refresh(1, Figure::Exact(&snap(vec![anon(0, MIB / 2)])), &[(11, ThreadState::Idle)], token));
    assert_eq!(l.account(1).unwrap().bound, MIB / 2);
    assert!(l.account(1).unwrap().pending.is_empty());
}

#[test]
fn a_figure_read_across_an_exec_or_a_reused_pid_is_stale() {
    let mut l = enforcing(64 * MIB);
    admit(&mut l, 1, vec![anon(0, 10 * MIB)]);
    let token = l.token(1).unwrap();
    l.exec_started(1, 1);
    assert!(l.thread_seen(1, 1));
    let d = l.decide(1, 1, &map(MIB), key(1), Figure::Exact(&snap(vec![])), &[], token);
    assert_eq!(d, Verdict::Stale, "the maps read may be the old image's");
    let token = l.token(1).unwrap();
    l.exit(1);
    admit(&mut l, 1, vec![]);
    assert!(!l.refresh(1, Figure::Exact(&snap(vec![anon(0, 50 * MIB)])), &[], token), "another process now");
    assert_eq!(l.account(1).unwrap().bound, 0);
}

#[test]
fn a_break_moved_after_the_token_is_not_overwritten_by_an_older_snapshot() {
    let mut l = enforcing(64 * MIB);
    let heap =
        Vma { start: 0x100000, end: 0x200000, writable: true, anon_private: true, is_heap: true, ..Vma::default() };
    admit(&mut l, 1, vec![heap]);
    let token = l.token(1).unwrap();
    // brk shrinks to 0x180000 while the maps (still up to 0x200000) are being read.
    assert_eq!(l.fast(1, 1, &Request::Brk { addr: 0x180000 }, key(1)), Step::Allow);
    assert!(l.refresh(1, Figure::Exact(&snap(vec![heap])), &[], token));
    // Growing back to 0x200000 is charged from 0x180000.
    assert_eq!(l.fast(1, 1, &Request::Brk { addr: 0x200000 }, key(2)), Step::Allow);
    assert_eq!(l.account(1).unwrap().bound, 0x100000 + 0x80000);
}

#[test]
fn a_break_not_known_at_admission_is_learnt_from_stat_not_the_maps() {
    // Admitted from statm alone (a privileged supervisor leaves `stat` for the first brk).
    let mut l = enforcing(MIB);
    assert!(l.admit(1, "p".into(), Figure::Upper(0x8000), false));
    let brk = |a| Request::Brk { addr: a };
    assert_eq!(l.fast(1, 1, &brk(0x9000_4000), key(1)), Step::Measure { need: Need::Image, refresh_others: false });
    let token = l.token(1).unwrap();
    let image = Figure::Image { upper: 0x8000, start_brk: Some(0x9000_0000) };
    assert_eq!(l.decide(1, 1, &brk(0x9000_4000), key(1), image, &[], token), Verdict::Allow);
    assert_eq!(l.account(1).unwrap().bound, 0x8000 + 0x4000, "charged from where the break starts");
    assert_eq!(l.fast(1, 1, &brk(0x9000_6000), key(2)), Step::Allow, "known from now on");
    // Past the quota: denied on the exact figure, whatever stat said.
    let over = brk(0x9000_0000 + MIB);
    l.thread_seen(1, 1);
    assert_eq!(l.fast(1, 1, &over, key(3)), Step::Measure { need: Need::Upper, refresh_others: false });
    let token = l.token(1).unwrap();
    assert_eq!(l.decide(1, 1, &over, key(3), Figure::Upper(0xe000), &[], token), Verdict::MeasureExact);
    let heap = Vma {
        start: 0x9000_0000,
        end: 0x9000_6000,
        writable: true,
        anon_private: true,
        is_heap: true,
        ..Vma::default()
    };
    let exact =
        Snapshot { maps: Maps::from_vmas(vec![heap, anon(0x1000, 0x8000)]), start_brk: Some(0x9000_0000), upper: None };
    let token = l.token(1).unwrap();
    assert_eq!(
        l.decide(1, 1, &over, key(3), Figure::Exact(&exact), &[], token),
        deny(Scope::Process, 0xe000, MIB - 0x6000, MIB)
    );
    // A hidden start (no ptrace rights after all) is no base: the mappings are read.
    assert!(l.admit(2, "q".into(), Figure::Upper(0x8000), false));
    assert_eq!(l.fast(2, 2, &brk(0x9000_4000), key(4)), Step::Measure { need: Need::Image, refresh_others: false });
    let token = l.token(2).unwrap();
    let hidden = Figure::Image { upper: 0x8000, start_brk: None };
    assert_eq!(l.decide(2, 2, &brk(0x9000_4000), key(4), hidden, &[], token), Verdict::MeasureExact);
}

#[test]
fn brk_is_charged_from_the_known_break_and_exec_resets_it() {
    let mut l = enforcing(64 * MIB);
    let heap =
        Vma { start: 0x10000, end: 0x20000, writable: true, anon_private: true, is_heap: true, ..Vma::default() };
    admit(&mut l, 1, vec![heap]);
    let brk = |a| Request::Brk { addr: a };
    assert_eq!(l.fast(1, 1, &brk(0x30000), key(1)), Step::Allow);
    assert_eq!(l.account(1).unwrap().bound, 0x20000);
    assert_eq!(l.fast(1, 1, &brk(0x18000), key(2)), Step::Allow, "shrinking");
    assert_eq!(l.account(1).unwrap().bound, 0x20000, "a shrink is only seen in the maps");
    // exec in flight: brk goes exact until the exec'ing thread shows up again.
    l.exec_started(1, 7);
    assert!(matches!(l.fast(1, 8, &brk(0x40000), key(3)), Step::Measure { need: Need::Exact, .. }));
    assert!(l.thread_seen(1, 7), "the exec'ing thread's next call settles the exec");
    assert!(matches!(l.fast(1, 7, &brk(0x40000), key(4)), Step::Measure { need: Need::Image, .. }), "new image");
    // Its statm and start_brk (from /proc/<pid>/stat) tell the heap and the break: no maps.
    let old_threads = [(1, ThreadState::Gone)];
    let token = l.token(1).unwrap();
    let image = Figure::Image { upper: 0x2000, start_brk: Some(0x9000_0000) };
    let d = l.decide(1, 7, &brk(0x9000_1000), key(4), image, &old_threads, token);
    assert_eq!(d, Verdict::Allow);
    assert_eq!(l.account(1).unwrap().bound, 0x3000, "the new image starts afresh");
    assert_eq!(l.fast(1, 7, &brk(0x9000_3000), key(5)), Step::Allow, "its break is known");
    // A big bss the loader mapped without a call counts from the image's first figure: the old
    // image's small bound never hides it.
    l.exec_started(1, 7);
    l.thread_seen(1, 7);
    let token = l.token(1).unwrap();
    let bss = Figure::Image { upper: 40 * MIB, start_brk: Some(0x9000_0000) };
    assert_eq!(l.decide(1, 7, &map(PAGE), key(6), bss, &[], token), Verdict::Allow);
    assert_eq!(l.account(1).unwrap().bound, 40 * MIB + PAGE);
}

#[test]
fn protect_and_fixed_maps_count_only_what_becomes_heap() {
    let mut l = enforcing(MIB);
    let reserve = Vma {
        start: 1 << 30,
        end: (1 << 30) + (64 * MIB),
        writable: false,
        anon_private: true,
        is_heap: false,
        ..Vma::default()
    };
    admit(&mut l, 1, vec![reserve, anon(0, 512 << 10)]);
    let protect = Request::Protect { addr: 1 << 30, len: 64 * MIB };
    assert!(matches!(l.fast(1, 1, &protect, key(1)), Step::Measure { .. }));
    assert!(matches!(exact(&mut l, 1, 1, &protect, key(1), vec![reserve, anon(0, 512 << 10)], &[]), Verdict::Deny(_)));
    let small = Request::Protect { addr: 1 << 30, len: 256 << 10 };
    assert_eq!(exact(&mut l, 1, 1, &small, key(2), vec![reserve, anon(0, 512 << 10)], &[]), Verdict::Allow);
    // MAP_FIXED over memory that is already heap adds nothing.
    let over = Request::Map { addr: 0, len: 512 << 10, fixed: true };
    l.thread_seen(1, 1);
    assert_eq!(exact(&mut l, 1, 1, &over, key(3), vec![anon(0, 512 << 10)], &[]), Verdict::Allow);
}

#[test]
fn total_quota_spans_processes_and_exit_gives_back() {
    let mut l = Ledger::new(Limits { process: Some(64 * MIB), total: Some(100 * MIB) }, Mode::Enforce, PAGE);
    admit(&mut l, 1, vec![anon(0, 60 * MIB)]);
    admit(&mut l, 2, vec![]);
    assert_eq!(l.fast(2, 2, &map(50 * MIB), key(1)), Step::Measure { need: Need::Upper, refresh_others: true });
    assert!(matches!(
        exact(&mut l, 2, 2, &map(50 * MIB), key(1), vec![], &[]),
        Verdict::Deny(Deny { scope: Scope::Total, .. })
    ));
    assert_eq!(l.exit(1).unwrap().peak, 60 * MIB);
    assert_eq!(exact(&mut l, 2, 2, &map(50 * MIB), key(2), vec![], &[]), Verdict::Allow);
    assert_eq!(l.total_bound(), 50 * MIB);
}

#[test]
fn audit_never_denies_and_measures_peaks() {
    let mut l = Ledger::new(Limits { process: Some(MIB), total: None }, Mode::Audit, PAGE);
    admit(&mut l, 1, vec![]);
    let mut held = vec![];
    for i in 0..200u64 {
        let (d, _) = engine(&mut l, 1, 1, &map(MIB), key(i), &held, &[]);
        assert_eq!(d, Verdict::Allow);
        l.thread_seen(1, 1);
        held.push(anon((i + 1) << 30, MIB));
    }
    let s = l.exit(1).unwrap();
    assert_eq!(s.denials, 0);
    assert_eq!(s.peak, 200 * MIB, "a program that only grows has an exact peak");

    // A program that churns (frees unseen between calls) far below its quota is measured by
    // statm, not by its mappings, and its peak stays exact.
    let mut l = Ledger::new(Limits { process: Some(1 << 40), total: None }, Mode::Audit, PAGE);
    admit(&mut l, 1, vec![anon(0, MIB)]);
    let mut exact_reads = 0;
    for i in 0..1000u64 {
        let (d, read) = engine(&mut l, 1, 1, &map(16 * MIB), key(i), &[anon(0, MIB)], &[]);
        assert_eq!(d, Verdict::Allow);
        exact_reads += usize::from(read);
        l.thread_seen(1, 1);
    }
    assert!(exact_reads <= 2, "{exact_reads} reads of the mappings for a churn that never grows the heap");
    let s = l.exit(1).unwrap();
    assert_eq!(s.peak, 17 * MIB, "1 MiB held and a 16 MiB block at a time");
}

#[test]
fn an_upper_figure_settles_requests_near_the_quota_that_fit_even_so() {
    let mut l = enforcing(64 * MIB);
    admit(&mut l, 1, vec![anon(0, 60 * MIB)]);
    // Freed 30 MiB unseen; the bound still says 60 + 3 MiB.
    assert_eq!(l.fast(1, 1, &map(3 * MIB), key(1)), Step::Allow);
    l.thread_seen(1, 1);
    assert_eq!(l.fast(1, 1, &map(2 * MIB), key(2)), Step::Measure { need: Need::Upper, refresh_others: false });
    // statm says 33 MiB (30 counted + 3 of file data and stack): 2 MiB fits.
    assert_eq!(upper(&mut l, 1, 1, &map(2 * MIB), key(2), 33 * MIB, &[]), Verdict::Allow);
    assert_eq!(l.account(1).unwrap().bound, 35 * MIB);
    assert_eq!(l.total_bound(), 35 * MIB);
    // An upper figure above the bound never loosens it; one that does not fit asks for the maps.
    l.thread_seen(1, 1);
    assert_eq!(upper(&mut l, 1, 1, &map(30 * MIB), key(3), 40 * MIB, &[]), Verdict::MeasureExact);
    assert_eq!(l.account(1).unwrap().bound, 35 * MIB);
    // Growth in flight on another thread is added to the upper figure.
    assert_eq!(l.fast(1, 2, &map(MIB), key(4)), Step::Allow);
    let req = map(28 * MIB + MIB / 2);
    let busy = [(2, ThreadState::Busy)];
    assert_eq!(
        upper(&mut l, 1, 1, &req, key(5), 35 * MIB, &busy),
        Verdict::MeasureExact,
        "35 + 1 in flight + 28.5 > 64"
    );
    assert_eq!(upper(&mut l, 1, 1, &req, key(5), 35 * MIB, &[(2, ThreadState::Idle)]), Verdict::Allow, "landed");
    // Past the peak mark (60 MiB measured, + 1/16) the exact figure is needed to measure it.
    l.thread_seen(1, 1);
    let d = upper(&mut l, 1, 1, &map(MIB / 2), key(6), 63 * MIB + MIB / 2, &[]);
    assert_eq!(d, Verdict::MeasureExact, "63.5 + 0.5 fits the quota, not the mark");
    // In audit mode no quota is in question: only peaks are measured, statm first.
    let mut a = Ledger::new(Limits { process: Some(MIB), total: None }, Mode::Audit, PAGE);
    admit(&mut a, 1, vec![]);
    assert_eq!(a.fast(1, 1, &map(2 * MIB), key(1)), Step::Measure { need: Need::Upper, refresh_others: false });
}

#[test]
fn a_runtime_account_is_observed_never_denied_and_starts_afresh_at_its_exec() {
    let mut l = Ledger::new(Limits { process: Some(16 * MIB), total: Some(32 * MIB) }, Mode::Enforce, PAGE);
    // runc's init: 80 MiB of Go thread stacks, then more while it sets the container up.
    assert!(l.admit(1, "runc:[2:INIT]".into(), Figure::Exact(&snap(vec![anon(0, 80 * MIB)])), true));
    assert_eq!(l.total_bound(), 0, "the runtime is not the container's heap");
    assert!(matches!(l.fast(1, 1, &map(8 * MIB), key(1)), Step::Measure { need: Need::Upper, .. }), "a peak");
    assert_eq!(exact(&mut l, 1, 1, &map(8 * MIB), key(1), vec![anon(0, 80 * MIB)], &[]), Verdict::Allow);
    assert_eq!(l.check(1, 100 * MIB), Ok(()));
    assert!(l.summaries()[0].runtime);
    // The exec of the container's program: from then on it is held like any process.
    l.exec_started(1, 1);
    assert!(l.thread_seen(1, 1));
    assert_eq!(l.total_bound(), 0, "the program joins the total when it is first measured");
    let program = snap(vec![anon(0, MIB)]);
    let token = l.token(1).unwrap();
    assert!(l.refresh(1, Figure::Exact(&program), &[], token));
    assert_eq!(l.account(1).unwrap().bound, MIB);
    assert_eq!(l.total_bound(), MIB);
    assert!(!l.summaries()[0].runtime);
    assert!(matches!(exact(&mut l, 1, 1, &map(16 * MIB), key(2), vec![anon(0, MIB)], &[]), Verdict::Deny(_)));
}

#[test]
fn a_blind_account_is_decided_on_statm_or_the_notifications_alone() {
    let mut l = enforcing(16 * MIB);
    assert!(l.admit(1, "agent".into(), Figure::UpperOnly(2 * MIB), false));
    assert!(l.summaries()[0].blind);
    assert!(!l.admit(2, "x".into(), Figure::Unread, false), "no baseline: no account");
    // No peak marks to measure: the fast path lets through whatever fits the quota.
    assert_eq!(l.fast(1, 1, &map(12 * MIB), key(1)), Step::Allow);
    l.thread_seen(1, 1);
    // Near the quota statm is the last word: 12 MiB were freed, so 10 MiB more fit.
    assert!(matches!(l.fast(1, 1, &map(10 * MIB), key(2)), Step::Measure { need: Need::Upper, .. }));
    let token = l.token(1).unwrap();
    assert_eq!(l.decide(1, 1, &map(10 * MIB), key(2), Figure::UpperOnly(2 * MIB), &[], token), Verdict::Allow);
    assert_eq!(l.account(1).unwrap().bound, 12 * MIB);
    // With nothing readable the bound stands, and only what fits it passes.
    l.thread_seen(1, 1);
    let token = l.token(1).unwrap();
    assert_eq!(l.decide(1, 1, &map(4 * MIB), key(3), Figure::Unread, &[], token), Verdict::Allow);
    l.thread_seen(1, 1);
    let token = l.token(1).unwrap();
    let d = l.decide(1, 1, &map(MIB), key(4), Figure::Unread, &[], token);
    assert_eq!(d, deny(Scope::Process, 16 * MIB, MIB, 16 * MIB));
    // A brk whose base nothing shows cannot be charged: refused under a quota, never guessed.
    let token = l.token(1).unwrap();
    let d = l.decide(1, 1, &Request::Brk { addr: 0x5000_0000 }, key(5), Figure::UpperOnly(MIB), &[], token);
    assert_eq!(d, Verdict::Deny(Deny { scope: Scope::Process, usage: MIB, request: None, limit: 16 * MIB }));
    let mut audit = Ledger::new(Limits { process: Some(MIB), total: None }, Mode::Audit, PAGE);
    audit.admit(1, "a".into(), Figure::UpperOnly(0), false);
    let token = audit.token(1).unwrap();
    let d = audit.decide(1, 1, &Request::Brk { addr: 0x5000_0000 }, key(1), Figure::Unread, &[], token);
    assert_eq!(d, Verdict::Allow);
}

#[test]
fn a_hidden_start_brk_is_no_break() {
    let s = Snapshot { maps: Maps::default(), start_brk: Some(0), upper: None };
    assert_eq!(s.brk(PAGE), None, "the kernel shows 0 to a reader without ptrace rights");
}

/// A simulated process: threads whose allowed mappings land some time after the answer,
/// frees the ledger never hears of, and figures read at arbitrary moments.
#[derive(Debug, Clone)]
enum Sim {
    Call { thread: usize, pages: u64 },
    Land { thread: usize },
    Free { index: usize },
}

fn sim() -> impl Strategy<Value = Sim> {
    prop_oneof![
        (0usize..3, 1u64..64).prop_map(|(thread, pages)| Sim::Call { thread, pages }),
        (0usize..3).prop_map(|thread| Sim::Land { thread }),
        any::<usize>().prop_map(|index| Sim::Free { index }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn never_over_quota_with_growth_in_flight(steps in proptest::collection::vec(sim(), 1..200), limit_pages in 16u64..256, busy in any::<bool>(), land_between in any::<bool>(), coarse_extra in proptest::option::of(0u64..64), early_token in any::<bool>()) {
        let limit = limit_pages * PAGE;
        let mut l = enforcing(limit);
        admit(&mut l, 1, vec![]);
        let mut landed: Vec<Vma> = Vec::new();
        let mut in_flight: [Option<(u64, CallKey)>; 3] = [None; 3];
        let mut next_addr = 1u64 << 32;
        // A token taken long before its figure is read (another reader's, e.g. `ps`).
        let mut old_token = l.token(1);
        for (n, s) in steps.into_iter().enumerate() {
            match s {
                Sim::Call { thread, pages } => {
                    if in_flight[thread].is_some() { continue; } // a thread makes one call at a time
                    let tid = thread as Tid + 100;
                    let k = key(n as u64);
                    let req = map(pages * PAGE);
                    l.thread_seen(1, tid);
                    let nothing_in_flight = in_flight.iter().all(Option::is_none);
                    let d = match l.fast(1, tid, &req, k) {
                        Step::Allow => Verdict::Allow,
                        Step::Measure { need, .. } => {
                            let token = if early_token { old_token.take().unwrap_or_else(|| l.token(1).unwrap()) } else { l.token(1).unwrap() };
                            let states: Vec<(Tid, ThreadState)> = l.threads_to_ask(1, tid, &req).into_iter().map(|t| {
                                let st = match in_flight[(t - 100) as usize] {
                                    Some(_) if busy => ThreadState::Busy,
                                    Some((_, key)) => ThreadState::InCall(key),
                                    None if busy => ThreadState::Busy,
                                    None => ThreadState::Idle,
                                };
                                (t, st)
                            }).collect();
                            // The states are read before the figure (as the engine does); growth
                            // in flight may land in between.
                            if land_between {
                                for slot in in_flight.iter_mut() {
                                    if let Some((len, _)) = slot.take() {
                                        landed.push(anon(next_addr, len));
                                        next_addr += len + PAGE;
                                    }
                                }
                            }
                            let held: u64 = landed.iter().map(|v| v.len()).sum();
                            let first = match (need, coarse_extra) {
                                (Need::Upper, Some(extra)) => l.decide(1, tid, &req, k, Figure::Upper(held + extra * PAGE), &states, token),
                                _ => Verdict::MeasureExact,
                            };
                            match first {
                                Verdict::MeasureExact => l.decide(1, tid, &req, k, Figure::Exact(&snap(landed.clone())), &states, token),
                                v => v,
                            }
                        }
                    };
                    prop_assert!(d != Verdict::Stale);
                    if d == Verdict::Allow { in_flight[thread] = Some((pages * PAGE, k)); }
                    else {
                        // Denied only when truly over: with nothing in flight the read was exact.
                        let held: u64 = landed.iter().map(|v| v.len()).sum();
                        if nothing_in_flight && !busy && !early_token {
                            prop_assert!(held + pages * PAGE > limit, "denied at {held} + {} <= {limit}", pages * PAGE);
                        }
                    }
                }
                Sim::Land { thread } => {
                    if let Some((len, _)) = in_flight[thread].take() {
                        landed.push(anon(next_addr, len));
                        next_addr += len + PAGE;
                    }
                }
                Sim::Free { index } => {
                    if !landed.is_empty() { landed.remove(index % landed.len()); }
                }
            }
            let held: u64 = landed.iter().map(|v| v.len()).sum();
            let flying: u64 = in_flight.iter().flatten().map(|(len, _)| len).sum();
            prop_assert!(held + flying <= limit, "over quota: {held} held + {flying} in flight > {limit}");
            let a = l.account(1).unwrap();
            prop_assert!(a.bound >= held + flying, "the bound under-counts: {} < {held} + {flying}", a.bound);
            prop_assert!(a.peak <= limit, "the peak {} reads past the quota {limit}, which nothing passed", a.peak);
        }
    }
}

#[test]
fn growth_a_read_may_already_show_is_not_counted_twice() {
    // Two threads race to a 64 MiB quota in 3 MiB blocks. At 60 MiB let through, thread 11's
    // last block may or may not have landed when the maps are read (its thread still runs).
    let mut l = enforcing(64 * MIB);
    admit(&mut l, 1, vec![anon(0, 57 * MIB)]);
    assert_eq!(l.fast(1, 11, &map(3 * MIB), key(1)), Step::Allow);
    let running = [(11, ThreadState::Busy)];
    // It had landed: the read shows it.
    let token = l.token(1).unwrap();
    let d = l.decide(1, 12, &map(5 * MIB), key(2), Figure::Exact(&snap(vec![anon(0, 60 * MIB)])), &running, token);
    assert!(matches!(d, Verdict::Deny(Deny { usage, .. }) if usage == 60 * MIB), "{d:?}");
    let a = l.account(1).unwrap();
    assert_eq!(a.bound, 60 * MIB, "no more than was let through: the process cannot hold more");
    assert!(a.peak <= 64 * MIB && a.peak >= 60 * MIB, "peak {} reads past the quota", a.peak);
    // It had not: the read shows less, and the block still counts on top.
    let token = l.token(1).unwrap();
    let d = l.decide(1, 12, &map(2 * MIB), key(3), Figure::Exact(&snap(vec![anon(0, 56 * MIB)])), &running, token);
    assert_eq!(d, Verdict::Allow, "56 MiB + 3 MiB in flight + 2 MiB fit");
    assert_eq!(l.account(1).unwrap().bound, 61 * MIB);
    // A read above the bound shows memory no call asked for: the bound starts again from the
    // read, with everything in flight on top.
    let token = l.token(1).unwrap();
    let d = l.decide(1, 12, &map(MIB), key(4), Figure::Exact(&snap(vec![anon(0, 62 * MIB)])), &[], token);
    assert!(matches!(d, Verdict::Deny(_)), "{d:?}");
    assert_eq!(l.account(1).unwrap().bound, 62 * MIB + 3 * MIB + 2 * MIB);
}
