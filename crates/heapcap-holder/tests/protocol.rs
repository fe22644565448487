//! The holder's own socket: one heapcapd at a time, only listener fds are held, and it goes away
//! when it holds nothing and its heapcapd left.

use std::os::fd::AsFd;
use std::time::Duration;

use heapcap_holder::holder::{run, Config};
use heapcap_holder::Client;

#[test]
fn one_heapcapd_at_a_time_only_listeners_and_gone_when_empty() {
    let dir = std::env::temp_dir().join(format!("heapcap-holder-test-{}", std::process::id()));
    let socket = dir.join("holder.sock");
    let config = Config {
        socket: socket.clone(),
        grace: Duration::from_secs(1),
        slots: 8,
        first_contact: Duration::from_secs(20),
        stay: false,
    };
    let holder = std::thread::spawn(move || run(config));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (client, held) = loop {
        match Client::connect(&socket) {
            Ok(c) => break c,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "holder did not come up: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    };
    assert!(held.is_empty());
    assert!(client.connected(), "the holder is at the other end");

    let second = Client::connect(&socket).expect_err("a second heapcapd must be refused");
    assert!(second.to_string().contains("another heapcapd is connected"), "{second}");

    let (r, _w) = std::io::pipe().expect("pipe");
    let refused = client.hold("c1", 1, serde_json::json!({}), r.as_fd()).expect_err("a pipe is not a listener");
    assert!(refused.to_string().contains("not a seccomp listener"), "{refused}");
    // Still serving after the bad request.
    client.update("c1", serde_json::json!({"limit": 1})).expect("update");
    assert!(client.connected());

    drop(client);
    let ended = holder.join().expect("holder thread");
    assert!(ended.is_ok(), "{ended:?}");
    assert!(!socket.exists(), "the holder left its socket behind");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_holder_run_with_stay_waits_for_the_running_one_then_takes_heapcapds_journal() {
    let dir = std::env::temp_dir().join(format!("heapcap-holder-stay-{}", std::process::id()));
    let socket = dir.join("holder.sock");
    let config = |stay| Config {
        socket: socket.clone(),
        grace: Duration::from_secs(1),
        slots: 8,
        first_contact: Duration::from_secs(20),
        stay,
    };
    let first = std::thread::spawn({
        let c = config(false);
        move || run(c)
    });
    let connect = |what: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match Client::connect(&socket) {
                Ok(c) => break c,
                Err(e) => {
                    assert!(std::time::Instant::now() < deadline, "{what} did not come up: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    };
    let (client, _) = connect("the first holder");
    // A second holder (a service manager's) waits: it neither fails nor takes the socket.
    let _standby = std::thread::spawn({
        let c = config(true);
        move || run(c)
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(client.connected(), "the first holder still serves");
    let journal = client.journal().clone();
    // heapcapd's holder goes (here: it leaves, holding nothing); the waiting one takes over and
    // keeps the journal heapcapd's threads note their calls in.
    drop(client);
    first.join().expect("first holder").expect("the first holder ends cleanly");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let restored = loop {
        match Client::restore(&socket, journal.clone()) {
            Ok(c) => break c,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "the waiting holder did not take over: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    };
    assert!(std::sync::Arc::ptr_eq(restored.journal(), &journal));
    assert!(restored.connected());
    // --stay: with nothing held and heapcapd gone it stays, and serves the next heapcapd.
    drop(restored);
    std::thread::sleep(Duration::from_millis(200));
    let (again, held) = connect("the staying holder");
    assert!(held.is_empty() && again.connected());
    let _ = std::fs::remove_dir_all(&dir);
}
