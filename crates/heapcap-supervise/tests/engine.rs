//! The engine driven through scripted `/proc` reads and a scripted listener: every read failure
//! gets a defined answer (a denial that says what could not be read, or, in audit mode, the call
//! let through), never a hang, and the quota is never exceeded.

mod script;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use heapcap_linux::notify::Notification;
use heapcap_policy::denial::Denial;
use heapcap_policy::ledger::{Limits, Mode, Scope, ThreadState};
use heapcap_policy::machine::SysInfo;
use heapcap_supervise::{Answer, Engine, Ledger, Reply, Serve, Supervisor};
use proptest::prelude::*;
use script::{anon, Cue, Failure, Memory, View, What, World, MIB, PAGE};

const MMAP: i32 = 9;
const BRK: i32 = 12;
const EXECVE: i32 = 59;
const RW: u64 = 3;
const ANON_PRIVATE: u64 = 0x22;

fn mmap(len: u64) -> [u64; 6] {
    [0, len, RW, ANON_PRIVATE, u64::MAX, 0]
}

/// Aborts the test binary (a loud failure) if the test has not finished in time: a hang in the
/// engine would otherwise hang the test run.
struct Watchdog(Arc<AtomicBool>);

impl Watchdog {
    fn new() -> Watchdog {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(60));
            if !flag.load(Ordering::SeqCst) {
                eprintln!("the engine hung: aborting");
                std::process::abort();
            }
        });
        Watchdog(done)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

struct Rig {
    world: World,
    sup: Supervisor<View>,
    denials: Arc<Mutex<Vec<Denial>>>,
    _watchdog: Watchdog,
}

fn rig(limits: Limits, mode: Mode) -> Rig {
    let world = World::default();
    let denials = Arc::new(Mutex::new(Vec::new()));
    let sink = denials.clone();
    let sup = Supervisor::with_view(
        Ledger::new(limits, mode, PAGE),
        world.view(),
        None,
        PAGE,
        Box::new(move |d: &Denial| sink.lock().unwrap().push(d.clone())),
    );
    Rig { world, sup, denials, _watchdog: Watchdog::new() }
}

fn quota(limit: u64) -> Limits {
    Limits { process: Some(limit), total: None }
}

impl Rig {
    fn engine(&self, runtime: bool) -> Engine<'_, View> {
        Engine::new(&self.sup, runtime)
    }

    /// `tid` asks for `len` of anonymous memory; if let through, it lands at once.
    fn alloc(&self, e: &mut Engine<'_, View>, tid: u32, len: u64, at: &mut u64) -> Answer {
        let n = self.world.call(tid, MMAP, mmap(len));
        let a = e.decide(&self.world, &n);
        if a == Answer::Allow {
            let pid = self.world.lock().threads[&tid];
            self.world.map(pid, *at, len);
            *at += len + PAGE;
        }
        a
    }

    fn bound(&self, pid: u32) -> u64 {
        self.sup.accounts().with_ledger(|l| l.account(pid).map(|a| a.bound)).expect("accounted")
    }
}

fn denial(a: &Answer) -> &Denial {
    match a {
        Answer::Deny(d) => d,
        other => panic!("expected a denial, got {other:?}"),
    }
}

#[test]
fn a_process_that_stops_being_dumpable_is_held_on_statm_and_never_hangs() {
    let r = rig(quota(64 * MIB), Mode::Enforce);
    r.world.spawn(100, "ssh-agent", vec![anon(1 << 20, MIB)]);
    let mut e = r.engine(false);
    let mut at = 1 << 32;
    assert_eq!(r.alloc(&mut e, 100, MIB, &mut at), Answer::Allow);
    // prctl(PR_SET_DUMPABLE, 0): the mappings can no longer be read.
    r.world.set_dumpable(100, false);
    let mut last = Answer::Allow;
    for _ in 0..100 {
        last = r.alloc(&mut e, 100, MIB, &mut at);
        if last != Answer::Allow {
            break;
        }
    }
    let d = denial(&last);
    assert_eq!((d.pid, d.tid, d.syscall, d.scope, d.limit), (Some(100), 100, "mmap", Scope::Process, 64 * MIB));
    assert_eq!(d.command, "ssh-agent");
    assert_eq!(d.request, Some(MIB));
    let reason = d.reason.as_deref().expect("a reason");
    assert!(reason.contains("cannot be read") && reason.contains("statm"), "{reason}");
    let heap = r.world.heap(100);
    assert!((62 * MIB..=64 * MIB).contains(&heap), "held at {heap} of a 64 MiB quota (statm adds 0.5 MiB)");
    assert!(r.sup.accounts().summaries()[0].blind);
    // Frees show in statm: the program can allocate again.
    r.world.unmap_all(100);
    for _ in 0..10 {
        assert_eq!(r.alloc(&mut e, 100, 4 * MIB, &mut at), Answer::Allow);
    }
    assert_eq!(r.denials.lock().unwrap().len(), 0, "the sink is the serve loop's, not decide's");
}

#[test]
fn a_process_never_dumpable_is_admitted_from_statm_and_its_unknown_break_refused() {
    let r = rig(quota(16 * MIB), Mode::Enforce);
    r.world.spawn(110, "gpg-agent", vec![anon(1 << 20, MIB)]);
    r.world.set_dumpable(110, false);
    let mut e = r.engine(false);
    let mut at = 1 << 32;
    assert_eq!(r.alloc(&mut e, 110, 8 * MIB, &mut at), Answer::Allow);
    assert_eq!(r.bound(110), MIB + (512 << 10) + 8 * MIB, "statm's figure plus the growth");
    // brk: the break is hidden from a reader without ptrace rights, so its growth is unknown.
    let n = r.world.call(110, BRK, [0x5555_1000_0000, 0, 0, 0, 0, 0]);
    let a = e.decide(&r.world, &n);
    let d = denial(&a);
    assert_eq!((d.syscall, d.request, d.brk_return), ("brk", None, Some(0)), "libc asks the kernel again after 0");
    // Held as blind from then on; each refusal says why.
    for _ in 0..2 {
        let n = r.world.call(110, BRK, [0x5555_1000_0000, 0, 0, 0, 0, 0]);
        let a = e.decide(&r.world, &n);
        let reason = denial(&a).reason.clone().expect("a reason");
        assert!(reason.contains("cannot be read"), "{reason}");
    }
    // What fits the quota on statm still passes; what does not is refused.
    assert_eq!(r.alloc(&mut e, 110, 4 * MIB, &mut at), Answer::Allow);
    assert!(matches!(r.alloc(&mut e, 110, 4 * MIB, &mut at), Answer::Deny(_)));
    assert!(r.world.heap(110) <= 16 * MIB);
}

#[test]
fn the_callers_process_unreadable_is_refused_with_what_failed_or_let_through_in_audit() {
    for (mode, limits, refused) in [
        (Mode::Enforce, quota(64 * MIB), true),
        (Mode::Audit, quota(64 * MIB), false),
        (Mode::Enforce, Limits::default(), false),
        (Mode::Enforce, Limits { process: None, total: Some(MIB) }, true),
    ] {
        let r = rig(limits, mode);
        r.world.spawn(120, "x", vec![]);
        r.world.fail(None, What::Thread, Failure::Open(libc::EMFILE), 1);
        let mut e = r.engine(false);
        let n = r.world.call(120, MMAP, mmap(MIB));
        let a = e.decide(&r.world, &n);
        if !refused {
            assert_eq!(a, Answer::Allow, "{mode:?} {limits:?}");
            continue;
        }
        let d = denial(&a);
        assert_eq!(d.pid, None, "the process could not be learnt: said, not guessed");
        assert_eq!((d.tid, d.syscall, d.request, d.usage), (120, "mmap", Some(MIB), None));
        assert_eq!(d.limit, limits.process.or(limits.total).unwrap());
        assert!(d.reason.as_deref().unwrap().contains("Too many open files"), "{d:?}");
        // The next call, with /proc back, is decided as usual.
        assert_eq!(e.decide(&r.world, &r.world.call(120, MMAP, mmap(MIB))), Answer::Allow);
    }
}

#[test]
fn a_process_dying_between_open_and_read_is_dropped_and_a_live_one_never_is() {
    let r = rig(quota(8 * MIB), Mode::Enforce);
    r.world.spawn(130, "p", vec![anon(1 << 20, 7 * MIB)]);
    let mut e = r.engine(false);
    let mut at = 1 << 32;
    assert_eq!(r.alloc(&mut e, 130, PAGE, &mut at), Answer::Allow);
    // Near the quota the maps are read; the process is killed after they were opened.
    r.world.between(130, What::Maps, |s| s.kill(130));
    let n = r.world.call(130, MMAP, mmap(MIB));
    assert_eq!(e.decide(&r.world, &n), Answer::Drop, "its call is no longer pending");
    // ENOENT for a caller still waiting is a read failure, answered like any other.
    r.world.spawn(131, "q", vec![anon(1 << 20, 7 * MIB)]);
    assert_eq!(r.alloc(&mut e, 131, PAGE, &mut at), Answer::Allow);
    r.world.fail(Some(131), What::Maps, Failure::Open(libc::ENOENT), 1);
    let n = r.world.call(131, MMAP, mmap(2 * MIB));
    let a = e.decide(&r.world, &n);
    assert!(denial(&a).reason.as_deref().unwrap().contains("No such file"), "{a:?}");
}

#[test]
fn garbled_and_truncated_maps_give_way_to_statm() {
    for failure in [Failure::Garbled, Failure::Truncated] {
        let r = rig(quota(8 * MIB), Mode::Enforce);
        r.world.spawn(140, "p", (0..7).map(|i| anon((1 + i) << 24, MIB)).collect());
        let mut e = r.engine(false);
        let mut at = 1 << 32;
        r.world.fail(Some(140), What::Maps, failure, 2);
        // 7 MiB held (+ 0.5 in statm): 512 KiB fits on statm ...
        assert_eq!(r.alloc(&mut e, 140, 256 << 10, &mut at), Answer::Allow);
        // ... 1 MiB does not, and the denial says why it was decided on statm.
        let a = r.alloc(&mut e, 140, MIB, &mut at);
        let reason = denial(&a).reason.clone().unwrap();
        assert!(reason.contains("unreadable line") && reason.contains("statm"), "{failure:?}: {reason}");
        assert!(r.world.heap(140) <= 8 * MIB);
    }
}

#[test]
fn with_nothing_readable_the_bound_decides() {
    let r = rig(quota(8 * MIB), Mode::Enforce);
    r.world.spawn(150, "p", vec![anon(1 << 20, 4 * MIB)]);
    let mut e = r.engine(false);
    let mut at = 1 << 32;
    assert_eq!(r.alloc(&mut e, 150, PAGE, &mut at), Answer::Allow);
    // The thread's process is known; neither its mappings nor statm can be read.
    r.world.fail(Some(150), What::Maps, Failure::Read(libc::EMFILE), 100);
    r.world.fail(Some(150), What::Upper, Failure::Read(libc::EMFILE), 100);
    // The bound (4.5 MiB + a page) says 3 MiB fits: it passes, unmeasured.
    assert_eq!(r.alloc(&mut e, 150, 3 * MIB, &mut at), Answer::Allow);
    let a = r.alloc(&mut e, 150, 2 * MIB, &mut at);
    let d = denial(&a);
    assert!(d.reason.as_deref().unwrap().contains("decided on the growth let through so far"), "{d:?}");
    // Admitted on statm: its 4 MiB and the 0.5 MiB of stack and file data statm also shows.
    assert_eq!(d.usage, Some(7 * MIB + PAGE + (512 << 10)));
}

#[test]
fn a_reused_thread_id_is_judged_as_its_new_process() {
    let r = rig(quota(64 * MIB), Mode::Enforce);
    r.world.spawn(200, "big", vec![anon(1 << 20, 60 * MIB)]);
    r.world.thread(201, 200);
    let mut e = r.engine(false);
    let mut at = 1 << 32;
    assert_eq!(r.alloc(&mut e, 201, PAGE, &mut at), Answer::Allow);
    // Thread 201 exits; a new process gets 201 as its pid.
    r.world.lock().threads.remove(&201);
    r.world.spawn(201, "small", vec![anon(1 << 20, MIB)]);
    assert_eq!(r.alloc(&mut e, 201, 8 * MIB, &mut at), Answer::Allow, "not charged process 200's heap");
    assert!(r.bound(201) <= 10 * MIB);
    assert!(r.bound(200) >= 60 * MIB);
}

#[test]
fn a_process_that_ended_unseen_never_weighs_on_its_siblings_total() {
    let r = rig(Limits { process: None, total: Some(64 * MIB) }, Mode::Enforce);
    r.world.spawn(100, "ended", vec![anon(1 << 20, 40 * MIB)]);
    r.world.spawn(200, "sibling", vec![]);
    let mut e = r.engine(false);
    let mut at = 1 << 32;
    assert_eq!(r.alloc(&mut e, 100, PAGE, &mut at), Answer::Allow);
    assert_eq!(r.alloc(&mut e, 200, PAGE, &mut at), Answer::Allow);
    // 100 exits; no exit watcher has told the accounts yet.
    r.world.lock().kill(100);
    assert_eq!(r.alloc(&mut e, 200, 30 * MIB, &mut at), Answer::Allow, "40 MiB of a dead process counted");
    let rows = r.sup.accounts().summaries();
    assert_eq!(rows.iter().map(|s| s.pid).collect::<Vec<_>>(), vec![200], "{rows:?}");
    // The total still holds for the live ones.
    assert!(matches!(r.alloc(&mut e, 200, 40 * MIB, &mut at), Answer::Deny(_)));
}

#[test]
fn a_reused_pid_whose_exit_was_not_seen_gets_an_account_of_its_own() {
    let r = rig(quota(64 * MIB), Mode::Enforce);
    r.world.spawn(300, "old", vec![anon(1 << 20, 63 * MIB)]);
    let mut e = r.engine(false);
    let mut at = 1 << 32;
    assert_eq!(r.alloc(&mut e, 300, PAGE, &mut at), Answer::Allow);
    r.world.spawn(300, "new", vec![]); // killed and replaced; no exit watcher here
    assert_eq!(r.alloc(&mut e, 300, 8 * MIB, &mut at), Answer::Allow);
    let rows = r.sup.accounts().summaries();
    assert_eq!((rows.len(), rows[0].command.as_str()), (1, "new"));
    assert!(rows[0].heap <= 9 * MIB, "{rows:?}");
}

#[test]
fn the_runtime_before_its_exec_is_never_denied_and_the_program_after_it_is() {
    let r = rig(Limits { process: Some(16 * MIB), total: Some(24 * MIB) }, Mode::Enforce);
    // runc's init under a prestart-injected filter: Go thread stacks, 80 MiB of counted memory.
    r.world.spawn(400, "runc:[2:INIT]", vec![anon(1 << 20, 80 * MIB)]);
    let mut e = r.engine(true);
    let mut at = 1 << 32;
    for _ in 0..4 {
        assert_eq!(r.alloc(&mut e, 400, 8 * MIB, &mut at), Answer::Allow, "the runtime's own allocations");
    }
    assert!(r.sup.accounts().summaries()[0].runtime);
    // execve of the container's program; the new image is small.
    let n = r.world.call(400, EXECVE, [0; 6]);
    assert_eq!(e.decide(&r.world, &n), Answer::Allow);
    {
        let mut s = r.world.lock();
        let p = s.procs.get_mut(&400).unwrap();
        p.vmas = vec![anon(1 << 20, MIB)];
        p.command = "app".into();
    }
    assert_eq!(r.alloc(&mut e, 400, 8 * MIB, &mut at), Answer::Allow);
    let rows = r.sup.accounts().summaries();
    assert_eq!((rows[0].command.as_str(), rows[0].runtime), ("app", false));
    let a = r.alloc(&mut e, 400, 8 * MIB, &mut at);
    assert_eq!(denial(&a).usage, Some(9 * MIB), "held to the quota from its exec on");
    // A process first seen after the exec is the program's, not the runtime's.
    r.world.spawn(401, "app-child", vec![anon(1 << 20, 10 * MIB)]);
    assert!(matches!(r.alloc(&mut e, 401, 8 * MIB, &mut at), Answer::Deny(_)));
}

#[test]
fn a_process_whose_first_call_is_its_exec_is_accounted_from_its_new_image() {
    let r = rig(quota(16 * MIB), Mode::Enforce);
    // crun's init makes no notified call before it execs the program: the exec is what ends
    // the runtime's part, though the runtime never had an account.
    r.world.spawn(500, "crun-init", vec![anon(1 << 20, 40 * MIB)]);
    let mut e = r.engine(true);
    let n = r.world.call(500, EXECVE, [0; 6]);
    assert_eq!(e.decide(&r.world, &n), Answer::Allow);
    assert!(r.sup.accounts().summaries().is_empty(), "nothing is measured before the exec");
    {
        let mut s = r.world.lock();
        let p = s.procs.get_mut(&500).unwrap();
        p.vmas = vec![anon(1 << 20, MIB)];
        p.command = "app".into();
    }
    let mut at = 1 << 32;
    assert_eq!(r.alloc(&mut e, 500, 8 * MIB, &mut at), Answer::Allow);
    let rows = r.sup.accounts().summaries();
    assert_eq!((rows.len(), rows[0].runtime, rows[0].heap), (1, false, 9 * MIB), "{rows:?}");
    let a = r.alloc(&mut e, 500, 8 * MIB, &mut at);
    assert_eq!(denial(&a).usage, Some(9 * MIB), "the program is held from its exec on");
    // A posix_spawn child of the program: its exec first, then growth on its own image.
    r.world.spawn(501, "app", vec![anon(1 << 20, 12 * MIB)]);
    let n = r.world.call(501, EXECVE, [0; 6]);
    assert_eq!(e.decide(&r.world, &n), Answer::Allow);
    r.world.lock().procs.get_mut(&501).unwrap().vmas = vec![anon(1 << 20, 2 * MIB)];
    assert_eq!(r.alloc(&mut e, 501, 12 * MIB, &mut at), Answer::Allow, "the parent's image is not the child's");
    let a = r.alloc(&mut e, 501, 4 * MIB, &mut at);
    assert_eq!(denial(&a).usage, Some(14 * MIB));
}

#[test]
fn the_serve_loop_answers_every_pending_call_whatever_fails() {
    let r = rig(quota(32 * MIB), Mode::Enforce);
    r.world.spawn(500, "a", vec![anon(1 << 20, 30 * MIB)]);
    r.world.spawn(501, "b", vec![]);
    r.world.thread(502, 501);
    let failures = [
        (What::Thread, Failure::Open(libc::EMFILE)),
        (What::Maps, Failure::Open(libc::EACCES)),
        (What::Maps, Failure::Garbled),
        (What::Upper, Failure::Read(libc::EIO)),
        (What::Admission, Failure::Read(libc::EMFILE)),
    ];
    let mut ids = Vec::new();
    for i in 0..200u64 {
        let (what, failure) = failures[i as usize % failures.len()];
        let tid = [500, 501, 502][i as usize % 3];
        let n = r.world.queue_then(tid, MMAP, mmap(MIB), move |s| {
            s.fail(None, what, failure, 1);
            if i == 100 {
                s.kill(501); // its calls queued after this die with it
            }
        });
        ids.push((n.id, i < 100 || tid == 500));
    }
    let how = Serve { journal: None, runtime: false };
    r.sup.serve(&r.world, how).expect("served until hung up");
    let s = r.world.lock();
    for (id, alive) in ids {
        let answered = s.answers.iter().any(|(i, _)| *i == id);
        assert_eq!(answered, alive, "call {id}: answered {answered}, its caller alive {alive}");
    }
    assert!(s.answers.iter().any(|(_, r)| *r == Reply::NoMemory));
    assert!(s.answers.iter().any(|(_, r)| *r == Reply::Continue));
}

#[test]
fn one_caller_keeps_the_sync_wake_up_and_interleaved_callers_drop_it() {
    let r = rig(quota(1 << 40), Mode::Enforce);
    r.world.spawn(600, "one", vec![]);
    for _ in 0..100 {
        r.world.queue(600, MMAP, mmap(PAGE));
    }
    r.sup.serve(&r.world, Serve::default()).unwrap();
    assert_eq!(r.world.lock().sync_wakeup, vec![true]);
    r.world.thread(601, 600);
    for i in 0..100 {
        r.world.queue(600 + i % 2, MMAP, mmap(PAGE));
    }
    r.sup.serve(&r.world, Serve::default()).unwrap();
    assert_eq!(r.world.lock().sync_wakeup, vec![true, true, false]);
}

/// Random calls, landings, frees, read failures, deaths and pid reuse over two processes of two
/// threads each: the counted heap of each never passes its quota, and every call still pending
/// is answered.
const SYSINFO: i32 = 99;
/// A caller's `struct sysinfo` buffer.
const BUF: u64 = 0x7ff0_0000;

fn host_sysinfo() -> SysInfo {
    SysInfo {
        uptime: 4242,
        loads: [1, 2, 3],
        totalram: 24 << 30,
        freeram: 18 << 30,
        sharedram: 9 * MIB,
        bufferram: 12 * MIB,
        procs: 180,
        mem_unit: 1,
        ..SysInfo::default()
    }
}

/// A rig whose supervisor answers `sysinfo` through the scripted [`Memory`].
fn machine_rig(limits: Limits, mode: Mode) -> (Rig, Memory) {
    let world = World::default();
    let memory = Memory::new(&world, host_sysinfo());
    let sup = Supervisor::with_view(Ledger::new(limits, mode, PAGE), world.view(), None, PAGE, Box::new(|_| {}))
        .with_emulator(Box::new(memory.clone()));
    (Rig { world, sup, denials: Arc::default(), _watchdog: Watchdog::new() }, memory)
}

/// `totalram`, `freeram`, `uptime`, `procs` and `mem_unit` of a native `struct sysinfo` as written.
fn written(bytes: &[u8]) -> (u64, u64, u64, u16, u32) {
    let word = |off: usize| u64::from_ne_bytes(bytes[off..off + 8].try_into().unwrap());
    let unit = u32::from_ne_bytes(bytes[104..108].try_into().unwrap());
    (word(32), word(40), word(0), u16::from_ne_bytes([bytes[80], bytes[81]]), unit)
}

#[test]
fn sysinfo_under_a_quota_tells_the_quota_that_applies_as_the_machine() {
    let (r, m) = machine_rig(Limits { process: Some(256 * MIB), total: Some(300 * MIB) }, Mode::Enforce);
    r.world.spawn(500, "java", vec![anon(1 << 20, 10 * MIB)]);
    m.buffers.lock().unwrap().push((500, BUF, 112));
    let mut e = r.engine(false);
    let n = r.world.call(500, SYSINFO, [BUF, 0, 0, 0, 0, 0]);
    assert_eq!(e.decide(&r.world, &n), Answer::Reply(Reply::Value(0)), "the kernel's return value");
    let bound = r.bound(500);
    {
        let writes = m.writes.lock().unwrap();
        assert_eq!(writes.len(), 1);
        let (tid, addr, bytes) = &writes[0];
        assert_eq!((*tid, *addr, bytes.len()), (500, BUF, 112), "the caller's buffer, all of it");
        assert_eq!(
            written(bytes),
            (256 * MIB, 256 * MIB - bound, 4242, 180, 1),
            "quota, quota less heap, the rest the kernel's"
        );
    }
    // A neighbour holding 200 MiB of the 300 MiB total leaves this process less than its own quota.
    r.world.spawn(501, "neighbour", vec![anon(1 << 20, 200 * MIB)]);
    let mut at = 1 << 40;
    assert_eq!(r.alloc(&mut e, 501, PAGE, &mut at), Answer::Allow);
    let n = r.world.call(500, SYSINFO, [BUF, 0, 0, 0, 0, 0]);
    assert_eq!(e.decide(&r.world, &n), Answer::Reply(Reply::Value(0)));
    let left = 300 * MIB - r.bound(501);
    assert!(left < 256 * MIB);
    assert_eq!(written(&m.writes.lock().unwrap()[1].2).0, left);
    // Through the serve loop, the answer reaches the listener.
    let n = r.world.queue(500, SYSINFO, [BUF, 0, 0, 0, 0, 0]);
    r.sup.serve(&r.world, Serve::default()).unwrap();
    assert!(r.world.lock().answers.contains(&(n.id, Reply::Value(0))));
}

#[test]
fn sysinfo_that_cannot_be_answered_writes_nothing() {
    let (r, m) = machine_rig(quota(256 * MIB), Mode::Enforce);
    r.world.spawn(600, "java", vec![anon(1 << 20, MIB)]);
    m.buffers.lock().unwrap().push((600, BUF, 112));
    let mut e = r.engine(false);
    let call = |buf: u64| r.world.call(600, SYSINFO, [buf, 0, 0, 0, 0, 0]);
    // A buffer that is not the caller's writable memory: EFAULT, as from the kernel.
    assert_eq!(e.decide(&r.world, &call(8)), Answer::Reply(Reply::Fault));
    assert_eq!(e.decide(&r.world, &call(BUF + 64)), Answer::Reply(Reply::Fault), "runs past the buffer");
    // Memory heapcap may not write (EPERM): the kernel answers, with the host's figures.
    *m.cue.lock().unwrap() = Cue::Refuse;
    assert_eq!(e.decide(&r.world, &call(BUF)), Answer::Allow);
    // sysinfo(2) failing for heapcap: the kernel answers.
    *m.cue.lock().unwrap() = Cue::NoSysinfo;
    assert_eq!(e.decide(&r.world, &call(BUF)), Answer::Allow);
    // The caller's process cannot be learnt: never refused (it grows nothing), the kernel answers.
    r.world.thread(601, 600);
    r.world.fail(None, What::Thread, Failure::Open(libc::EMFILE), 1);
    assert_eq!(e.decide(&r.world, &r.world.call(601, SYSINFO, [BUF, 0, 0, 0, 0, 0])), Answer::Allow);
    // The caller dies before the write: dropped, never written.
    *m.cue.lock().unwrap() = Cue::KillCaller;
    assert_eq!(e.decide(&r.world, &call(BUF)), Answer::Drop);
    assert!(m.writes.lock().unwrap().is_empty(), "nothing written on any error");
}

#[test]
fn sysinfo_is_the_kernels_where_no_quota_applies() {
    for (limits, mode, runtime) in [
        (Limits::default(), Mode::Enforce, false),
        (quota(256 * MIB), Mode::Audit, false),
        (quota(256 * MIB), Mode::Enforce, true),
    ] {
        let (r, m) = machine_rig(limits, mode);
        r.world.spawn(700, "p", vec![anon(1 << 20, MIB)]);
        m.buffers.lock().unwrap().push((700, BUF, 112));
        let mut e = r.engine(runtime);
        let n = r.world.call(700, SYSINFO, [BUF, 0, 0, 0, 0, 0]);
        assert_eq!(e.decide(&r.world, &n), Answer::Allow, "{limits:?} {mode:?} runtime={runtime}");
        assert!(m.writes.lock().unwrap().is_empty());
    }
    // A supervisor with no emulator leaves the call to the kernel.
    let r = rig(quota(256 * MIB), Mode::Enforce);
    r.world.spawn(701, "p", vec![anon(1 << 20, MIB)]);
    let n = r.world.call(701, SYSINFO, [BUF, 0, 0, 0, 0, 0]);
    assert_eq!(r.engine(false).decide(&r.world, &n), Answer::Allow);
}

#[derive(Debug, Clone)]
enum Op {
    Call { thread: usize, pages: u64 },
    Land { thread: usize },
    Free { proc: usize },
    Fail { what: usize, failure: usize },
    Dumpable { proc: usize, yes: bool },
    Respawn { proc: usize },
    Busy { thread: usize, busy: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..4, 1u64..512).prop_map(|(thread, pages)| Op::Call { thread, pages }),
        3 => (0usize..4).prop_map(|thread| Op::Land { thread }),
        1 => (0usize..2).prop_map(|proc| Op::Free { proc }),
        2 => (0usize..6, 0usize..5).prop_map(|(what, failure)| Op::Fail { what, failure }),
        1 => (0usize..2, any::<bool>()).prop_map(|(proc, yes)| Op::Dumpable { proc, yes }),
        1 => (0usize..2).prop_map(|proc| Op::Respawn { proc }),
        1 => (0usize..4, any::<bool>()).prop_map(|(thread, busy)| Op::Busy { thread, busy }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn never_over_quota_and_never_unanswered(ops in proptest::collection::vec(op(), 1..150), quota_mib in 4u64..64, strict in any::<bool>()) {
        let limit = quota_mib * MIB;
        let r = rig(quota(limit), Mode::Enforce);
        if strict {
            r.sup.accounts().with_ledger(|l| l.set_counting(heapcap_policy::ledger::Counting::Strict));
        }
        let pids = [700u32, 800];
        let tids = [700u32, 701, 800, 801];
        for pid in pids {
            r.world.spawn(pid, "sim", vec![]);
            r.world.thread(pid + 1, pid);
        }
        let mut e = r.engine(false);
        let mut flying: [Option<(u64, Notification)>; 4] = [None; 4];
        let mut at = 1u64 << 32;
        for op in ops {
            match op {
                Op::Call { thread, pages } => {
                    if flying[thread].is_some() { continue; }
                    let tid = tids[thread];
                    if !r.world.lock().threads.contains_key(&tid) { continue; }
                    let n = r.world.call(tid, MMAP, mmap(pages * PAGE));
                    match e.decide(&r.world, &n) {
                        Answer::Allow => flying[thread] = Some((pages * PAGE, n)),
                        Answer::Deny(_) => {}
                        Answer::Drop => prop_assert!(!heapcap_supervise::Notifier::id_valid(&r.world, n.id), "a pending call dropped"),
                        Answer::Reply(reply) => prop_assert!(false, "an mmap carried out by heapcap: {reply:?}"),
                    }
                    r.world.lock().thread_states.insert(tid, ThreadState::InCall(heapcap_policy::ledger::CallKey { nr: MMAP.into(), args: n.args }));
                }
                Op::Land { thread } => {
                    if let Some((len, _)) = flying[thread].take() {
                        let pid = pids[thread / 2];
                        if r.world.lock().procs.contains_key(&pid) {
                            r.world.map(pid, at, len);
                            at += len + PAGE;
                        }
                        r.world.lock().thread_states.insert(tids[thread], ThreadState::Idle);
                    }
                }
                Op::Free { proc } => { if r.world.lock().procs.contains_key(&pids[proc]) { r.world.unmap_all(pids[proc]); } }
                Op::Fail { what, failure } => {
                    let what = [What::Thread, What::Admission, What::Maps, What::Upper, What::Any, What::Maps][what];
                    let failure = [Failure::Open(libc::EMFILE), Failure::Read(libc::EIO), Failure::Garbled, Failure::Truncated, Failure::Open(libc::EACCES)][failure];
                    r.world.fail(None, what, failure, 1);
                }
                Op::Dumpable { proc, yes } => { if r.world.lock().procs.contains_key(&pids[proc]) { r.world.set_dumpable(pids[proc], yes); } }
                Op::Respawn { proc } => {
                    let pid = pids[proc];
                    r.world.spawn(pid, "sim", vec![]);
                    r.world.thread(pid + 1, pid);
                    flying[proc * 2] = None;
                    flying[proc * 2 + 1] = None;
                }
                Op::Busy { thread, busy } => {
                    let state = if busy { ThreadState::Busy } else { ThreadState::Idle };
                    if flying[thread].is_none() { r.world.lock().thread_states.insert(tids[thread], state); }
                }
            }
            for (i, pid) in pids.iter().enumerate() {
                let in_flight: u64 = flying[i * 2..i * 2 + 2].iter().flatten().map(|(l, _)| l).sum();
                let held = r.world.heap(*pid);
                prop_assert!(held + in_flight <= limit, "process {pid}: {held} held + {in_flight} in flight > {limit}");
            }
        }
    }
}

// ------------------------------------------------------------------ strict mode, shared accounts

const SHMAT: i32 = 30;
const MAP_SHARED: u64 = 0x01;

fn strict_rig(limit: u64) -> Rig {
    let r = rig(quota(limit), Mode::Enforce);
    r.sup.accounts().with_ledger(|l| l.set_counting(heapcap_policy::ledger::Counting::Strict));
    r
}

fn file_vma(start: u64, len: u64, shared: bool, dev: u64, inode: u64) -> heapcap_policy::maps::Vma {
    heapcap_policy::maps::Vma { start, end: start + len, writable: true, shared, dev, inode, ..Default::default() }
}

#[test]
fn strict_counts_shared_memory_and_private_file_copies_but_not_disk_page_cache() {
    use heapcap_policy::maps::dev;
    let disk = dev(254, 0);
    let shmem = dev(0, 1); // the kernel's internal mount: in no mountinfo
    let vmas = vec![
        anon(1 << 20, MIB),
        file_vma(1 << 30, 30 * MIB, true, shmem, 7),  // a memfd
        file_vma(2 << 30, 20 * MIB, false, disk, 9),  // a private file mapping, written
        file_vma(3 << 30, 100 * MIB, true, disk, 11), // a shared disk file: page cache
    ];
    for strict in [false, true] {
        let r = if strict { strict_rig(64 * MIB) } else { rig(quota(64 * MIB), Mode::Enforce) };
        r.world.lock().disks = vec![disk];
        r.world.spawn(100, "db", vmas.clone());
        let mut e = r.engine(false);
        let shared = |len: u64| [0, len, RW, MAP_SHARED, 3, 0];
        let n = r.world.call(100, MMAP, shared(8 * MIB));
        assert_eq!(e.decide(&r.world, &n), Answer::Allow);
        if !strict {
            assert_eq!(r.bound(100), MIB + (512 << 10), "heap: statm at admission, shared memory not counted");
            continue;
        }
        assert_eq!(r.bound(100), 59 * MIB, "the mappings at admission (1 + 30 + 20 MiB), plus the 8 MiB asked");
        r.world.lock().procs.get_mut(&100).unwrap().vmas.push(file_vma(4 << 30, 8 * MIB, true, shmem, 12));
        let n = r.world.call(100, MMAP, shared(8 * MIB));
        let a = e.decide(&r.world, &n);
        let d = denial(&a);
        assert_eq!((d.syscall, d.request, d.usage, d.limit), ("mmap", Some(8 * MIB), Some(59 * MIB), 64 * MIB));
        // A shared mapping of a disk file is asked for in full (its kind shows only once mapped),
        // then given back by the next exact figure: 4 MiB fits, and the figure stays 59 MiB.
        let n = r.world.call(100, MMAP, shared(4 * MIB));
        assert_eq!(e.decide(&r.world, &n), Answer::Allow);
        r.world.lock().procs.get_mut(&100).unwrap().vmas.push(file_vma(5 << 30, 4 * MIB, true, disk, 13));
        let n = r.world.call(100, MMAP, shared(4 * MIB));
        assert_eq!(e.decide(&r.world, &n), Answer::Allow, "63 + 4 MiB on the bound, but exactly 59 + 4");
        assert_eq!(r.bound(100), 63 * MIB, "the disk file's 4 MiB is not counted, the new 4 MiB is");
    }
}

#[test]
fn strict_charges_shmat_the_size_of_its_segment() {
    for strict in [false, true] {
        let r = if strict { strict_rig(64 * MIB) } else { rig(quota(64 * MIB), Mode::Enforce) };
        r.world.spawn(100, "pg", vec![anon(1 << 20, 40 * MIB)]);
        r.world.lock().segments.insert(7, 32 * MIB);
        let mut e = r.engine(false);
        let n = r.world.call(100, SHMAT, [7, 0, 0, 0, 0, 0]);
        let a = e.decide(&r.world, &n);
        if strict {
            assert_eq!(denial(&a).request, Some(32 * MIB), "40 + 32 MiB > 64 MiB");
        } else {
            assert_eq!(a, Answer::Allow, "SysV memory is not heap");
        }
        let n = r.world.call(100, SHMAT, [8, 0, 0, 0, 0, 0]);
        assert_eq!(e.decide(&r.world, &n), Answer::Allow, "no such segment: the kernel refuses it");
        let n = r.world.call(100, SHMAT, [7, 0, 0o10000, 0, 0, 0]);
        assert_eq!(e.decide(&r.world, &n), Answer::Allow, "SHM_RDONLY never counts");
    }
}

#[test]
fn processes_that_share_an_address_space_share_one_account_until_one_execs() {
    for strict in [false, true] {
        let r = if strict { strict_rig(64 * MIB) } else { rig(quota(64 * MIB), Mode::Enforce) };
        r.world.spawn(100, "parent", vec![anon(1 << 20, MIB)]);
        // clone(CLONE_VM) without CLONE_THREAD: another process, the same mappings.
        r.world.spawn(200, "clone", Vec::new());
        r.world.lock().vm_of.insert(200, 100);
        let mut e = r.engine(false);
        let mut at = 1 << 32;
        assert_eq!(r.alloc(&mut e, 100, 40 * MIB, &mut at), Answer::Allow);
        let n = r.world.call(200, MMAP, mmap(16 * MIB));
        assert_eq!(e.decide(&r.world, &n), Answer::Allow);
        r.world.map(100, at, 16 * MIB); // it lands in the one address space
        at += 32 * MIB;
        let n = r.world.call(200, MMAP, mmap(16 * MIB));
        let a = e.decide(&r.world, &n);
        let d = denial(&a);
        assert_eq!((d.pid, d.tid, d.usage), (Some(100), 200, Some(57 * MIB)), "charged to the one account");
        assert!(matches!(r.alloc(&mut e, 100, 16 * MIB, &mut at), Answer::Deny(_)));
        assert_eq!(r.sup.accounts().len(), 1, "one account for one address space");
        // The clone execs: a new address space of its own, accounted apart from then on.
        let n = r.world.call(200, EXECVE, [0; 6]);
        assert_eq!(e.decide(&r.world, &n), Answer::Allow);
        r.world.lock().vm_of.remove(&200);
        r.world.lock().procs.get_mut(&200).unwrap().vmas = vec![anon(1 << 20, MIB)];
        let n = r.world.call(200, MMAP, mmap(16 * MIB));
        assert_eq!(e.decide(&r.world, &n), Answer::Allow);
        assert_eq!(r.sup.accounts().len(), 2);
        assert!(r.bound(100) >= 57 * MIB, "the parent keeps its own figure");
        // A vfork child whose first call is its execve leaves the address space it shares: it is
        // accounted as itself, never charged to the parent.
        r.world.spawn(300, "vforked", Vec::new());
        r.world.lock().vm_of.insert(300, 100);
        let before = r.bound(100);
        let n = r.world.call(300, EXECVE, [0; 6]);
        assert_eq!(e.decide(&r.world, &n), Answer::Allow);
        assert_eq!((r.sup.accounts().len(), r.bound(100)), (2, before), "nothing to account before its image grows");
        r.world.lock().vm_of.remove(&300);
        r.world.lock().procs.get_mut(&300).unwrap().vmas = vec![anon(1 << 20, MIB)];
        let n = r.world.call(300, MMAP, mmap(16 * MIB));
        assert_eq!(e.decide(&r.world, &n), Answer::Allow);
        assert_eq!((r.sup.accounts().len(), r.bound(100)), (3, before), "its own account, on its own image");
    }
}

#[test]
fn the_account_of_a_shared_address_space_outlives_the_process_it_was_opened_for() {
    let r = rig(quota(64 * MIB), Mode::Enforce);
    r.world.spawn(100, "parent", vec![anon(1 << 20, 40 * MIB)]);
    r.world.spawn(200, "clone", Vec::new());
    r.world.lock().vm_of.insert(200, 100);
    let mut e = r.engine(false);
    let n = r.world.call(200, MMAP, mmap(MIB));
    assert_eq!(e.decide(&r.world, &n), Answer::Allow);
    assert_eq!(r.sup.accounts().len(), 1);
    // The parent exits; its address space lives on in the clone, which is accounted with it.
    let vmas = r.world.lock().procs[&100].vmas.clone();
    r.world.lock().kill(100);
    r.world.lock().vm_of.remove(&200);
    r.world.lock().procs.get_mut(&200).unwrap().vmas = vmas;
    r.sup.accounts().with_ledger(|l| l.exit(100));
    let n = r.world.call(200, MMAP, mmap(30 * MIB));
    let a = e.decide(&r.world, &n);
    assert!(matches!(a, Answer::Deny(_)), "40 MiB held + 30 MiB: {a:?}");
}

#[test]
fn old_mmap_is_decided_only_when_nothing_else_can_rewrite_its_arguments() {
    use heapcap_policy::syscall::AUDIT_ARCH_I386;
    const OLD_MMAP: i32 = 90;
    for mode in [Mode::Enforce, Mode::Audit] {
        let r = rig(quota(64 * MIB), mode);
        r.world.spawn(100, "ancient", vec![anon(1 << 20, MIB)]);
        let mut e = r.engine(false);
        // Alone: decided on the block it read (zeroes here: a zero-length call, no growth).
        let n = r.world.call_as(100, AUDIT_ARCH_I386, OLD_MMAP, [0x1000, 0, 0, 0, 0, 0]);
        assert_eq!(e.decide(&r.world, &n), Answer::Allow);
        // A second thread could rewrite the block between heapcap's read and the kernel's.
        r.world.lock().not_alone.insert(100, "it has 2 threads".into());
        let n = r.world.call_as(100, AUDIT_ARCH_I386, OLD_MMAP, [0x1000, 0, 0, 0, 0, 0]);
        let a = e.decide(&r.world, &n);
        if mode == Mode::Audit {
            assert_eq!(a, Answer::Allow, "audit mode never denies");
            continue;
        }
        let d = denial(&a);
        let reason = d.reason.as_deref().unwrap_or_default();
        assert_eq!(d.syscall, "old_mmap");
        assert!(reason.contains("can change after heapcap reads them: it has 2 threads"), "{reason}");
    }
}
