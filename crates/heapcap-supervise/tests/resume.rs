//! A supervisor that dies between taking a call and answering it leaves the caller waiting in
//! the kernel. Its successor must answer that call, and decide it by the quota, not wave it
//! through: here the left call is python's 200 MiB mmap under a 64 MiB quota, so the program must see
//! ENOMEM. Real processes under the real filter; the "dying supervisor" is this test taking calls
//! and then walking away from one.

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::Arc;

use heapcap_linux::fdpass::recv_fds;
use heapcap_linux::filter::{LoadFlags, Program};
use heapcap_linux::journal::{Journal, Slot};
use heapcap_linux::notify::{Listener, Recv};
use heapcap_linux::spawn::under_filter;
use heapcap_policy::ledger::{Limits, Mode};
use heapcap_policy::syscall::MemCall;
use heapcap_supervise::{ExitWatcher, Ledger, Supervisor};

const BIG: u64 = 200 << 20;
const SCRIPT: &str =
    "try:\n    x = bytearray(200 << 20)\n    print('allocated')\nexcept MemoryError:\n    print('refused')\n";

/// Run python under the filter; take and allow its calls (noting each in the journal when
/// `note`), until it makes the 200 MiB mmap: take that one and never answer it. Then a new
/// supervisor with a 64 MiB quota resumes and serves to the end. Returns what python printed.
fn die_holding_the_big_call(note: bool) -> String {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let mut cmd = Command::new("python3");
    cmd.args(["-c", SCRIPT]).stdout(Stdio::piped()).stderr(Stdio::inherit());
    let program = Program::heap_notify().expect("filter");
    under_filter(&mut cmd, program, theirs.into(), LoadFlags { no_new_privs: true, tsync: false });
    let journal = Arc::new(Journal::create(1).expect("journal"));
    let slot = Slot::new(journal, 0).expect("slot");
    let (listener, child) = std::thread::scope(|s| {
        // The exec is notified too: the taker must be answering while spawn waits for it.
        let taker = s.spawn(|| {
            let mut buf = [0u8; 16];
            let got = recv_fds(ours.as_fd(), &mut buf).expect("listener fd");
            let listener = Listener::new(got.fds.into_iter().next().expect("an fd"));
            loop {
                let n = match listener.recv().expect("recv") {
                    Recv::Notification(n) => n,
                    Recv::Interrupted => continue,
                    Recv::HungUp => panic!("python ended without mapping 200 MiB"),
                };
                let big =
                    matches!(MemCall::decode(n.arch, n.nr, n.args), Some(MemCall::Mmap { len, .. }) if len >= BIG);
                if note || !big {
                    slot.record(&n);
                }
                if big {
                    return listener; // "dies" holding it
                }
                listener.allow(n.id).expect("allow");
            }
        });
        let child = cmd.spawn().expect("spawn python3");
        (taker.join().expect("taker"), child)
    });
    let ledger =
        Ledger::new(Limits { process: Some(64 << 20), total: None }, Mode::Enforce, heapcap_linux::page_size());
    let exits = Arc::new(ExitWatcher::start().expect("exit watcher"));
    let successor = Supervisor::new(ledger, exits, Box::new(|_| {}));
    let resumed = successor.resume(&listener, &slot, &[child.id()]).expect("resume");
    assert!(resumed, "the successor found no call left waiting");
    let mut child = child;
    std::thread::scope(|s| {
        s.spawn(|| {
            successor
                .serve(&listener, heapcap_supervise::Serve { journal: Some(&slot), runtime: false })
                .expect("serve")
        });
        let mut out = String::new();
        child.stdout.take().expect("stdout").read_to_string(&mut out).expect("read");
        assert!(child.wait().expect("wait").success());
        out
    })
}

#[test]
fn a_noted_call_left_by_a_dead_supervisor_is_decided_by_the_quota() {
    let out = die_holding_the_big_call(true);
    assert_eq!(out.trim(), "refused", "python printed {out:?}");
}

#[test]
fn an_unnoted_call_of_a_single_threaded_process_is_found_and_decided() {
    let out = die_holding_the_big_call(false);
    assert_eq!(out.trim(), "refused", "python printed {out:?}");
}
