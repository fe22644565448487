//! heapcapd under hostile and broken input on its two real sockets and its `/metrics` address,
//! and the CLI given malformed sizes: non-root peers, truncated, oversized, non-JSON and
//! wrong-schema messages, no fd, too many fds, fds that are not seccomp listeners, idle and
//! trickling clients, floods of connections, bad `set-limit` sizes and ids, bad annotations; on
//! `/metrics`, idle, trickling and garbage clients, floods, bad paths, methods and heads. Each
//! gets a clear error (in heapcapd's log for the agent socket, which has no answer channel; in
//! the answer for the control socket and `/metrics`, whose Content-Length is its body's; on
//! stderr for the CLI), scrapes answer while hostile clients are connected, and afterwards
//! heapcapd still holds a real runc container at its quota, `heapcap ps` answers, and its fds
//! and threads are back to where they were.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use heapcap_integration::binaries;
use heapcap_integration::daemon::{settled, wait_back_to, Daemon};
use heapcap_integration::fixture::{assert_at_quota, fixture_result, parse_allocated, MIB};
use heapcap_integration::ids::unique_id;
use heapcap_integration::process::{self, show, stderr, stdout};
use heapcap_integration::runtime::Runtime;
use serde_json::{json, Value};

/// Generous: catches a hang, never times a working heapcapd.
const DEADLINE: Duration = Duration::from_secs(60);
/// An unprivileged user (nobody).
const NOBODY: u32 = 65534;

/// A runc container with a 64 MiB quota allocating 4 MiB at a time: held at its quota.
fn assert_serves_a_container(d: &Daemon, when: &str) {
    let b = d.bundle(&[("heapcap.io/limit", "64Mi")], &["/alloc", "mmap", "4194304", "0"]);
    let out = b.run(Runtime::Runc, &unique_id("hostile"));
    assert!(out.status.success(), "{when}: {}\nheapcapd:\n{}", show(&out), d.log());
    let (allocated, result) = parse_allocated(&stdout(&out));
    assert_at_quota(&format!("runc container {when}"), allocated, &result, 64 * MIB, 4 * MIB);
}

/// heapcapd's (fds, threads) once it has served a container: what it holds for as long as it runs.
fn baseline(d: &Daemon) -> (usize, usize) {
    assert_serves_a_container(d, "before the abuse");
    d.wait_no_containers(DEADLINE);
    settled(d.pid())
}

fn assert_back_to(d: &Daemon, before: (usize, usize), when: &str) {
    if let Err(now) = wait_back_to(d.pid(), before, DEADLINE) {
        panic!("{when}: heapcapd holds (fds, threads) = {now:?}, {before:?} before\nheapcapd:\n{}", d.log());
    }
}

/// After the abuse heapcapd serves everyone else and has leaked nothing: its fds and threads are
/// back to the baseline, a container is held at its quota, `heapcap ps` answers, and once the
/// container is gone nothing of it stays either.
fn assert_still_serves(d: &Daemon, before: (usize, usize)) {
    assert_back_to(d, before, "after the abuse");
    assert_serves_a_container(d, "after the abuse");
    let ps = d.heapcap(&["ps"]);
    assert!(ps.status.success(), "heapcap ps after the abuse: {}", show(&ps));
    d.wait_no_containers(DEADLINE);
    assert_back_to(d, before, "after the abuse and a container");
}

/// Wait until heapcapd's log, past byte `mark`, has a line with every one of `needles`.
fn expect_logged(d: &Daemon, mark: usize, needles: &[&str]) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let log = d.log();
        let found = log.get(mark..).unwrap_or("").lines().find(|l| needles.iter().all(|n| l.contains(n)));
        if let Some(line) = found {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "heapcapd did not log a line with {needles:?}:\n{}",
            &log[mark.min(log.len())..]
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An OCI container process state as runc sends it, naming `fds`.
fn state(id: &str, fds: &[&str], annotations: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "ociVersion": "1.0.2",
        "fds": fds,
        "pid": 0,
        "state": {"ociVersion": "1.0.2", "id": id, "status": "creating", "pid": 0, "bundle": "/nonexistent",
                  "annotations": annotations},
    }))
    .expect("state JSON")
}

/// Send `data` to the agent socket without fds, close the writing side and wait until heapcapd
/// is done with it (it closes the connection).
fn agent_send(d: &Daemon, data: &[u8]) {
    let mut s = UnixStream::connect(&d.agent).expect("connect to the agent socket");
    s.set_read_timeout(Some(DEADLINE)).expect("read timeout");
    // heapcapd may stop reading (an oversized message) and close: the write then fails.
    let _ = s.write_all(data);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut rest = Vec::new();
    let read = s.read_to_end(&mut rest);
    assert!(
        read.is_ok() || read.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "heapcapd did not close the agent connection: {read:?}\n{}",
        d.log()
    );
    assert!(rest.is_empty(), "the agent protocol has no answer, heapcapd sent {rest:?}");
}

/// A peer in python3 (its `socket.send_fds` passes fds as runc does): connects to `socket`,
/// sends the file `payload` with the fds `spec` names (`null`: /dev/null, `pipe`: both ends of a
/// pipe), closes its writing side and prints whatever comes back. Prints `connect: REASON` and
/// exits 3 if it cannot connect.
const PEER: &str = r#"
import os, socket, sys
path, payload, spec = sys.argv[1:4]
fds = []
for kind in filter(None, spec.split(',')):
    if kind == 'null':
        fds.append(os.open('/dev/null', os.O_RDWR))
    elif kind == 'pipe':
        fds.extend(os.pipe())
    else:
        sys.exit('unknown fd kind ' + kind)
data = open(payload, 'rb').read()
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(60)
try:
    s.connect(path)
except OSError as e:
    print('connect:', e.strerror, flush=True)
    sys.exit(3)
try:
    socket.send_fds(s, [data], fds)
    s.shutdown(socket.SHUT_WR)
except OSError as e:
    print('send:', e.strerror, file=sys.stderr, flush=True)
# A refused peer whose request heapcapd never read gets the answer, then a reset instead of the end.
while True:
    try:
        chunk = s.recv(65536)
    except ConnectionResetError:
        break
    if not chunk:
        break
    sys.stdout.buffer.write(chunk)
"#;

/// Run [`PEER`] against `socket` (as `uid` if given), sending `data` with the fds `spec` names.
fn peer(d: &Daemon, socket: &Path, data: &[u8], spec: &str, uid: Option<u32>) -> Output {
    let payload = d.dir.join(format!("payload-{}", unique_id("p")));
    std::fs::write(&payload, data).expect("write the payload");
    std::fs::set_permissions(&payload, std::fs::Permissions::from_mode(0o644)).expect("chmod the payload");
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg("-c").arg(PEER).arg(socket).arg(&payload).arg(spec).current_dir("/");
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let out = process::run_captured(cmd, DEADLINE);
    let _ = std::fs::remove_file(&payload);
    assert!(
        out.status.code() != Some(1) || !stderr(&out).contains("Traceback"),
        "the python3 peer failed: {}",
        show(&out)
    );
    out
}

#[test]
fn broken_agent_messages_are_refused_with_the_reason_in_the_log() {
    let d = Daemon::start();
    let before = baseline(&d);
    let good = state("hostile-c1", &["seccompFd"], json!({"heapcap.io/limit": "64Mi"}));

    // Each message, and what heapcapd must log about it.
    let mut huge = b"{\"ociVersion\": \"".to_vec();
    huge.resize(3 << 20, b'x');
    let wrong_type = br#"{"ociVersion": "1.0.2", "fds": "seccompFd", "pid": 1, "state": {}}"#;
    let no_fds_named = state("hostile-c2", &[], json!({}));
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        (
            "truncated JSON",
            good[..good.len() / 2].to_vec(),
            &["not a JSON container process state", "EOF while parsing"],
        ),
        ("over 1 MiB", huge, &["larger than 1048576 bytes"]),
        ("non-JSON bytes", b"\x00\xff\xfeGET / HTTP/1.1\r\n\r\n".to_vec(), &["expected a JSON object"]),
        ("a JSON array", b"[1, 2, 3]".to_vec(), &["expected a JSON object"]),
        (
            "JSON of another schema",
            br#"{"hello": "world"}"#.to_vec(),
            &["not a container process state: no \"fds\" or \"state\""],
        ),
        (
            "a field of the wrong type",
            wrong_type.to_vec(),
            &["invalid type: string \"seccompFd\", expected a sequence"],
        ),
        ("a state naming no seccompFd", no_fds_named, &["names no \"seccompFd\" in \"fds\""]),
        ("a state with no fd", good.clone(), &["the state names 1 fds but 0 came with the message"]),
    ];
    for (what, data, says) in &cases {
        let mark = d.log().len();
        agent_send(&d, data);
        let line = expect_logged(&d, mark, says);
        assert!(line.contains("agent message not taken"), "{what}: {line}");
    }

    // The same over python3's send_fds, with fds: too many, and ones that are not listeners.
    let named = state("hostile-c3", &["pidFd", "seccompFd"], json!({}));
    let fd_cases: Vec<(&str, &[u8], &str, &[&str])> = vec![
        ("several fds for one name", &good, "null,pipe", &["the state names 1 fds but 3 came with the message"]),
        (
            "more fds than heapcapd takes",
            &good,
            "pipe,pipe,pipe,pipe,pipe,pipe,pipe,pipe",
            &["more fds came with the message than the 12 taken: it was refused and they were closed"],
        ),
        ("/dev/null as the listener", &good, "null", &["the fd sent as seccompFd is not a seccomp listener"]),
        ("a pipe as the listener", &named, "pipe", &["the fd sent as seccompFd is not a seccomp listener"]),
        ("fds with no state", b" \n", "null", &["1 fds came with no state"]),
    ];
    for (what, data, spec, says) in fd_cases {
        let mark = d.log().len();
        let out = peer(&d, &d.agent, data, spec, None);
        assert!(out.status.success(), "{what}: {}", show(&out));
        let line = expect_logged(&d, mark, says);
        assert!(line.contains("agent message not taken"), "{what}: {line}");
    }
    // A peer that connects and closes without a word is no error.
    agent_send(&d, b"");
    assert!(d.ps()["containers"].as_array().is_some_and(|c| c.is_empty()), "no message made a container: {}", d.ps());
    assert_still_serves(&d, before);
}

#[test]
fn agent_messages_with_ids_no_runtime_takes_are_refused_with_the_rule() {
    let d = Daemon::start();
    let before = baseline(&d);
    for id in ["évil/../x", "two\nlines", ".."] {
        let mark = d.log().len();
        let data = state(id, &["seccompFd"], json!({"heapcap.io/limit": "64Mi"}));
        // With the one fd the state names (/dev/null: the id is refused before the fd is looked at).
        let out = peer(&d, &d.agent, &data, "null", None);
        assert!(out.status.success(), "{id:?}: {}", show(&out));
        // The sender (a runtime, here python3) is told on its stderr, the id quoted and escaped.
        let said = stderr(&out);
        let refused = format!("heapcapd: container {id:?} refused: its id is not valid: a container id is 1 to 1024");
        assert!(said.contains(&refused) && said.contains("(runc's rule)"), "{id:?}: {}", show(&out));
        let rule = "its id is not valid: a container id is 1 to 1024 ASCII letters, digits, '_', '+', '-' and '.'";
        let line = expect_logged(&d, mark, &["agent message not taken", rule]);
        assert!(line.contains(&format!("{id:?}")), "{id:?}: {line}");
    }
    assert!(d.ps()["containers"].as_array().is_some_and(|c| c.is_empty()), "a refused id made a container: {}", d.ps());
    assert_still_serves(&d, before);
}

#[test]
fn non_root_peers_are_refused_on_both_sockets() {
    let d = Daemon::start();
    let before = baseline(&d);
    let ps = b"{\"op\":\"ps\"}\n";
    let good = state("hostile-nobody", &["seccompFd"], json!({"heapcap.io/limit": "64Mi"}));

    // As installed, the sockets' permissions keep nobody out before heapcapd sees them.
    for socket in [&d.agent, &d.control] {
        let out = peer(&d, socket, ps, "", Some(NOBODY));
        assert_eq!(out.status.code(), Some(3), "{}: {}", socket.display(), show(&out));
        assert!(stdout(&out).contains("connect: Permission denied"), "{}", show(&out));
    }

    // A host that loosened them: heapcapd checks every peer's credentials itself.
    let run = d.agent.parent().expect("socket directory");
    std::fs::set_permissions(run, std::fs::Permissions::from_mode(0o711)).expect("chmod the socket directory");
    for socket in [&d.agent, &d.control] {
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666)).expect("chmod the socket");
    }
    let mark = d.log().len();
    let out = peer(&d, &d.agent, &good, "null", Some(NOBODY));
    assert!(out.status.success(), "{}", show(&out));
    expect_logged(&d, mark, &["agent message not taken", "uid 65534 refused: only root may connect"]);

    let mark = d.log().len();
    let out = peer(&d, &d.control, ps, "", Some(NOBODY));
    assert!(out.status.success(), "{}", show(&out));
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&out)));
    let error = answer["error"].as_str().unwrap_or_else(|| panic!("nobody got an answer that is no error: {answer}"));
    assert!(error.contains("uid 65534 refused: only root may connect"), "{error}");
    expect_logged(&d, mark, &["control connection refused", "uid 65534"]);
    // Root still gets in.
    assert!(d.ps()["containers"].is_array());
    std::fs::set_permissions(run, std::fs::Permissions::from_mode(0o700)).expect("chmod back");
    assert_still_serves(&d, before);
}

#[test]
fn idle_and_trickling_agent_clients_block_no_one() {
    let d = Daemon::start();
    let before = baseline(&d);
    let mark = d.log().len();
    let idle = UnixStream::connect(&d.agent).expect("connect");
    // A container starts while the idle client holds its connection, and after heapcapd parked
    // it (an idle connection is not cut off: crun sends its listener only at `crun start`).
    assert_serves_a_container(&d, "while an agent client idles");
    std::thread::sleep(Duration::from_secs(6));
    assert_serves_a_container(&d, "while an agent client idles, parked");
    assert!(!d.log()[mark..].contains("agent message not taken"), "an idle client was cut off:\n{}", d.log());
    drop(idle);

    // A client sending a byte a second is cut off at the deadline, not served forever.
    let mark = d.log().len();
    let mut trickle = UnixStream::connect(&d.agent).expect("connect");
    let message = state("hostile-trickle", &["seccompFd"], json!({}));
    let mut sent = 0;
    for byte in &message[..20] {
        if trickle.write_all(std::slice::from_ref(byte)).is_err() {
            break;
        }
        sent += 1;
        if d.log()[mark..].contains("no complete message within 5s of its first bytes") {
            break;
        }
        std::thread::sleep(Duration::from_millis(1000));
    }
    let line =
        expect_logged(&d, mark, &["agent message not taken", "no complete message within 5s of its first bytes ("]);
    assert!(sent < 20, "heapcapd kept reading a trickling client for {sent} s: {line}");
    assert!(!line.contains("(0 bytes received)"), "{line}");
    drop(trickle);
    assert_still_serves(&d, before);
}

#[test]
fn thousands_of_agent_connections_leave_heapcapd_serving() {
    let d = Daemon::start();
    let before = baseline(&d);
    // 2000 connections opened and closed, 4 clients at once, half of them sending garbage.
    std::thread::scope(|s| {
        for t in 0..4 {
            let d = &d;
            s.spawn(move || {
                for i in 0..500 {
                    let mut c = UnixStream::connect(&d.agent).expect("connect in the flood");
                    if (t + i) % 2 == 0 {
                        let _ = c.write_all(b"garbage");
                    }
                }
            });
        }
    });
    // 400 held open at once, idle, while a container starts.
    let mark = d.log().len();
    let held: Vec<UnixStream> = (0..400).map(|_| UnixStream::connect(&d.agent).expect("connect and hold")).collect();
    let most_threads = std::thread::scope(|s| {
        let container = s.spawn(|| assert_serves_a_container(&d, "while 400 agent connections idle"));
        let mut most = 0;
        while !container.is_finished() {
            most = most.max(d.resources().1);
            std::thread::sleep(Duration::from_millis(20));
        }
        container.join().expect("the container while connections idle");
        most
    });
    // Idle connections do not each take a thread: heapcapd serves a bounded number at once.
    assert!(
        most_threads < before.1 + 300,
        "heapcapd ran {most_threads} threads for 400 idle connections ({} before)",
        before.1
    );
    expect_logged(&d, mark, &["every connection slot is taken"]);
    drop(held);
    assert_still_serves(&d, before);
}

/// One raw request on the control socket; heapcapd's one answer line, parsed.
fn control(d: &Daemon, request: &[u8], close_after: bool) -> Value {
    let s = UnixStream::connect(&d.control).expect("connect to the control socket");
    s.set_read_timeout(Some(DEADLINE)).expect("read timeout");
    let mut w = s.try_clone().expect("clone");
    let request = request.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&request);
        if close_after {
            let _ = w.shutdown(std::net::Shutdown::Write);
        }
    });
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).expect("an answer line from heapcapd");
    writer.join().expect("writer");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("heapcapd answered with no JSON line ({e}): {line:?}"))
}

/// The error heapcapd answers `request` with.
fn control_error(d: &Daemon, request: &[u8], close_after: bool) -> String {
    let answer = control(d, request, close_after);
    answer["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{:?} got an answer that is no error: {answer}", String::from_utf8_lossy(request)))
        .to_string()
}

#[test]
fn broken_control_requests_get_an_answer_that_says_what_is_wrong() {
    let d = Daemon::start();
    let before = baseline(&d);
    let mut oversized = b"{\"op\":\"set-limit\",\"container\":\"".to_vec();
    oversized.resize(200 * 1024, b'a');
    oversized.extend_from_slice(b"\",\"limit\":\"1Mi\"}\n");
    let cut = b"{\"op\":\"set-limit\",\"contai";
    let cut_says = format!("incomplete request: the connection ended after {} bytes without a newline", cut.len());
    let cut_says = [cut_says.as_str()];
    let cases: Vec<(&[u8], bool, &[&str])> = vec![
        (b"hello\n", false, &["not JSON", "expected value at line 1 column 1", "e.g. {\"op\":\"ps\"}"]),
        (b"\x00\xff\xfe\n", false, &["not UTF-8"]),
        (b"{\"op\":\"ps\"\n", false, &["not JSON", "EOF while parsing"]),
        (cut, true, &cut_says),
        (b"", true, &["no request received"]),
        (&oversized, false, &["request line longer than 65536 bytes"]),
        (b"[1,2]\n", false, &["not a request"]),
        (b"{\"foo\":1}\n", false, &["missing field `op`"]),
        (b"{\"op\":\"set-limit\"}\n", false, &["missing field `container`"]),
        (b"{\"op\":\"ps\",\"all\":true}\n", false, &["unknown field `all`"]),
        (
            b"{\"op\":\"set-limit\",\"container\":\"x\",\"pid\":-1,\"limit\":\"1Mi\"}\n",
            false,
            &["invalid value: integer `-1`"],
        ),
        (b"{\"op\":\"reboot\"}\n", false, &["unknown variant `reboot`", "expected one of `ps`, `set-limit`, `events`"]),
        (
            b"{\"op\":\"set-limit\",\"container\":\"nope\",\"limit\":\"1Mi\"}\n",
            false,
            &["no container 'nope' (see heapcap ps)"],
        ),
        (
            b"{\"op\":\"set-limit\",\"container\":\"nope\"}\n",
            false,
            &["give a size for the limit, --total SIZE, or both"],
        ),
    ];
    for (request, close_after, says) in &cases {
        let error = control_error(&d, request, *close_after);
        let shown = String::from_utf8_lossy(&request[..request.len().min(60)]).to_string();
        assert!(says.iter().all(|s| error.contains(s)), "{shown:?}: heapcapd answered {error:?}, not {says:?}");
    }

    // An idle client neither blocks `heapcap ps` nor holds on forever.
    let idle = UnixStream::connect(&d.control).expect("connect");
    idle.set_read_timeout(Some(DEADLINE)).expect("read timeout");
    assert!(d.ps()["containers"].is_array(), "ps while a control client idles");
    let mut line = String::new();
    BufReader::new(&idle).read_line(&mut line).expect("the idle client's answer");
    assert!(line.contains("no complete request line within 10s (0 bytes received)"), "{line}");
    drop(idle);

    // A flood: 1000 connections opened and closed, 100 held idle; `heapcap ps` still answers.
    for _ in 0..1000 {
        drop(UnixStream::connect(&d.control).expect("connect in the flood"));
    }
    let held: Vec<UnixStream> = (0..100).map(|_| UnixStream::connect(&d.control).expect("connect and hold")).collect();
    assert!(d.ps()["containers"].is_array(), "ps while 100 control clients idle");
    drop(held);

    // A follower that quits is let go without waiting for a denial to write to it. It holds its
    // connection's fd in heapcapd (a task on the control plane, no thread of its own).
    let quiet = settled(d.pid());
    let mut follower = binaries::heapcap()
        .args(["events", "--follow"])
        .env("HEAPCAP_CONTROL_SOCKET", &d.control)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("heapcap events --follow");
    let deadline = Instant::now() + DEADLINE;
    while d.resources().0 <= quiet.0 {
        assert!(Instant::now() < deadline, "heapcap events --follow never got a connection to heapcapd");
        std::thread::sleep(Duration::from_millis(20));
    }
    follower.kill().expect("kill the follower");
    follower.wait().expect("reap the follower");
    assert_back_to(&d, before, "after a follower quit (no denial since)");
    assert_still_serves(&d, before);
}

#[test]
fn set_limit_with_bad_sizes_or_ids_is_refused_and_changes_nothing() {
    let d = Daemon::start();
    let before = baseline(&d);
    let b = d.bundle(&[("heapcap.io/limit", "64Mi")], &["/bin/sleep", "60"]);
    let c = b.create(Runtime::Runc, &unique_id("setlimit"));
    c.start();
    let bad = [
        ("abc", "'abc' is not a size: write a number with an optional suffix"),
        ("-5Mi", "'-5Mi' is negative: write a positive quantity such as 64Mi"),
        ("1.5.5Gi", "'1.5.5Gi' is not a size: write a number"),
        ("0", "'0' is zero: a quota of 0 would deny every allocation; write a positive size"),
        ("99999999999Ti", "'99999999999Ti' is too large: the largest size is 16Ei"),
        ("64K", "'64K' is ambiguous: write 64Ki for KiB (1024 bytes) or 64k for kB"),
        ("12Zi", "unknown suffix 'Zi': use Ki, Mi, Gi"),
        ("", "empty size: write a quantity such as 64Mi"),
    ];
    for (size, says) in bad {
        for field in ["limit", "total"] {
            let request = json!({"op": "set-limit", "container": c.id(), field: size});
            let error = control_error(&d, format!("{request}\n").as_bytes(), false);
            assert!(error.contains(says), "{field} {size:?}: heapcapd answered {error:?}");
        }
        // The CLI refuses the same before it reaches heapcapd, with what to write.
        for args in [vec!["set-limit", c.id(), size], vec!["set-limit", c.id(), "--total", size]] {
            let out = d.heapcap(&args);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {}", show(&out));
            let said = stderr(&out);
            assert!(said.starts_with("heapcap: ") && said.trim_end().lines().count() == 1, "{args:?}: {said}");
            let expected = if size == "-5Mi" { "'-5Mi' is negative: write a positive size such as 64Mi" } else { says };
            assert!(said.contains(expected), "{args:?}: {said}");
        }
    }
    let request = json!({"op": "set-limit", "container": c.id(), "pid": 1, "limit": "1Mi"});
    let error = control_error(&d, format!("{request}\n").as_bytes(), false);
    assert!(error.contains(&format!("container {} has no process 1 under heapcap", c.id())), "{error}");
    let out = d.heapcap(&["set-limit", "no-such-container", "16Mi"]);
    assert!(
        !out.status.success() && stderr(&out).contains("no container 'no-such-container' (see heapcap ps)"),
        "{}",
        show(&out)
    );

    // Nothing changed: the container is still listed with its 64 MiB and held there.
    let ps = d.ps();
    let listed = ps["containers"].as_array().and_then(|cs| cs.iter().find(|x| x["id"] == c.id())).cloned();
    let listed = listed.unwrap_or_else(|| panic!("{} not in {ps}", c.id()));
    assert_eq!((listed["limit"].as_u64(), listed["total_limit"].as_u64()), (Some(64 * MIB), None), "{listed}");
    let (allocated, result) = fixture_result(&c.exec(&["/alloc", "mmap", "4194304", "0"]));
    assert_at_quota("runc exec after bad set-limits", allocated, &result, 64 * MIB, 4 * MIB);
    c.delete();
    d.wait_no_containers(DEADLINE);
    assert_still_serves(&d, before);
}

#[test]
fn heapcap_run_refuses_malformed_sizes_with_what_to_write() {
    let bad = [
        ("abc", "is not a size: write a number with an optional suffix"),
        ("-5Mi", "is negative: write a positive"),
        ("1.5.5Gi", "is not a size: write a number"),
        ("0", "is zero: a quota of 0 would deny every allocation; write a positive size"),
        ("99999999999Ti", "is too large: the largest size is 16Ei"),
        ("64K", "write 64Ki for KiB (1024 bytes) or 64k for kB"),
        ("1e9", "unknown suffix 'e9': use Ki, Mi"),
        ("", "empty size: write a quantity such as 64Mi"),
    ];
    for (size, says) in bad {
        for option in ["--limit", "--total-limit"] {
            let out =
                binaries::heapcap().args(["run", option, size, "--", "/bin/echo", "ran"]).output().expect("heapcap");
            assert_eq!(out.status.code(), Some(2), "{option} {size:?}: {}", show(&out));
            assert!(!stdout(&out).contains("ran"), "{option} {size:?}: the command ran: {}", show(&out));
            let said = stderr(&out);
            assert!(said.trim_end().lines().count() == 1 && said.contains(says), "{option} {size:?}: {said}");
        }
    }
    // There is no mode option (--audit is how to ask for audit mode); an unknown option is not a command.
    for option in ["--mode", "--audt"] {
        let out = binaries::heapcap()
            .args(["run", "--limit", "64Mi", option, "--", "/bin/echo", "ran"])
            .output()
            .expect("heapcap");
        assert_eq!(out.status.code(), Some(2), "{}", show(&out));
        let said = stderr(&out);
        assert!(said.contains(&format!("unknown option '{option}' for run")) && said.contains("--audit"), "{said}");
        assert!(!stdout(&out).contains("ran"), "{}", show(&out));
    }
}

#[test]
fn bad_annotations_are_refused_and_heapcapd_serves_on() {
    let d = Daemon::start();
    let before = baseline(&d);
    let cases = [
        ("heapcap.io/limit", "1.5.5Gi", "heapcap.io/limit: '1.5.5Gi' is not a size"),
        ("heapcap.io/limit", "0", "'0' is zero"),
        ("heapcap.io/limit", "99999999999Ti", "'99999999999Ti' is too large"),
        ("heapcap.io/limit", "64K", "write 64Ki for KiB"),
        ("heapcap.io/total-limit", "abc", "heapcap.io/total-limit: 'abc' is not a size"),
        ("heapcap.io/mode", "Enforce", "enforce or audit"),
        ("heapcap.io/mode", "", "enforce or audit"),
        ("heapcap.io/limits", "64Mi", "unknown setting 'heapcap.io/limits'"),
    ];
    for (key, value, says) in cases {
        let b = d.bundle(&[(key, value)], &["/alloc", "mmap", "4194304", "0"]);
        let out = b.run(Runtime::Runc, &unique_id("badnote"));
        assert!(!out.status.success(), "{key}={value:?} must not start: {}", show(&out));
        assert!(!stdout(&out).contains("allocated="), "{key}={value:?}: the program ran: {}", show(&out));
        let said = stderr(&out);
        assert!(said.contains("refused") && said.contains(says), "{key}={value:?}: {}", show(&out));
    }
    d.wait_no_containers(DEADLINE);
    assert_still_serves(&d, before);
}

/// One raw HTTP exchange with heapcapd's `/metrics` address: `request` sent, everything it
/// answers until it closes. Panics after [`DEADLINE`] (a hang).
fn http(d: &Daemon, request: &[u8]) -> String {
    let mut s = TcpStream::connect(d.metrics_addr()).expect("connect to /metrics");
    s.set_read_timeout(Some(DEADLINE)).expect("read timeout");
    let _ = s.write_all(request);
    let mut answer = Vec::new();
    let read = s.read_to_end(&mut answer);
    assert!(
        read.is_ok() || read.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "/metrics did not answer {:?}: {read:?}",
        String::from_utf8_lossy(&request[..request.len().min(80)])
    );
    String::from_utf8_lossy(&answer).into_owned()
}

/// The status code, headers (lower-cased names) and body of an HTTP/1.1 answer.
fn parse_http(answer: &str) -> (u16, Vec<(String, String)>, &str) {
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP head in {answer:?}"));
    let mut lines = head.split("\r\n");
    let status = lines.next().and_then(|l| l.split(' ').nth(1)?.parse().ok());
    let status = status.unwrap_or_else(|| panic!("no status line in {answer:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// A scrape, how long it took, and that it is a full exposition.
fn scrape(d: &Daemon) -> Duration {
    let start = Instant::now();
    let answer = http(d, b"GET /metrics HTTP/1.1\r\nHost: heapcapd\r\n\r\n");
    let took = start.elapsed();
    let (status, headers, body) = parse_http(&answer);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(header(&headers, "content-length").and_then(|l| l.parse().ok()), Some(body.len()), "{answer}");
    assert!(body.contains("heapcap_decision_latency_seconds_bucket") && body.ends_with("# EOF\n"), "{body}");
    took
}

/// heapcapd's resident memory (VmRSS, KiB).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmRSS in kB")
}

/// Connections that stayed open: each still connected (a read would block: not cut off).
fn still_open(clients: &[TcpStream]) -> usize {
    clients
        .iter()
        .filter(|c| {
            c.set_nonblocking(true).expect("nonblocking");
            let mut byte = [0u8; 1];
            let open = matches!((&**c).read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
            c.set_nonblocking(false).expect("blocking");
            open
        })
        .count()
}

#[test]
fn metrics_answers_at_once_beside_idle_trickling_and_garbage_clients() {
    let d = Daemon::start();
    let before = baseline(&d);
    let quiet = scrape(&d);

    // 300 clients that connect and send nothing, 20 that send one byte of a request head every
    // 200 ms, and 20 that send garbage and then wait.
    let idle: Vec<TcpStream> = (0..300).map(|_| TcpStream::connect(d.metrics_addr()).expect("connect idle")).collect();
    let garbage: Vec<TcpStream> = (0..20)
        .map(|i| {
            let mut c = TcpStream::connect(d.metrics_addr()).expect("connect garbage");
            let junk: Vec<u8> = (0..200u32).map(|b| (b * 7 + i) as u8).collect();
            let _ = c.write_all(if i % 2 == 0 { b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" } else { &junk });
            c
        })
        .collect();
    let (took, most_threads) = std::thread::scope(|s| {
        let trickling: Vec<_> = (0..20)
            .map(|_| {
                let d = &d;
                s.spawn(move || {
                    // A head that never ends, a byte every 200 ms: cut off at the head deadline.
                    let mut c = TcpStream::connect(d.metrics_addr()).expect("connect trickling");
                    let start = Instant::now();
                    let head = b"GET /metrics HTTP/1.1\r\n".iter().chain(b"X-Trickle: a\r\n".iter().cycle());
                    for byte in head {
                        if c.write_all(&[*byte]).is_err() || Instant::now() - start > DEADLINE {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    start.elapsed()
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        // Scrapes while they are all connected: each answers while the idle clients are still
        // connected, i.e. without waiting for their 5 s head deadline.
        let mut took = Vec::new();
        let mut most_threads = 0;
        for _ in 0..5 {
            took.push(scrape(&d));
            most_threads = most_threads.max(d.resources().1);
        }
        let open = still_open(&idle);
        assert_eq!(open, idle.len(), "idle clients were cut off before the scrapes answered ({took:?})");
        for t in trickling {
            let lasted = t.join().expect("trickling client");
            assert!(lasted < DEADLINE, "a trickling client was served for {lasted:?}");
        }
        (took, most_threads)
    });
    let slowest = took.iter().max().copied().unwrap_or_default();
    // A generous bound about hanging, not speed: far below the 5 s an idle client may keep its slot.
    assert!(slowest < Duration::from_secs(2), "a scrape took {slowest:?} beside hostile clients ({took:?})");
    let (fds, threads) = d.resources();
    eprintln!(
        "metrics: scrape {quiet:?} alone, slowest {slowest:?} of {took:?} beside 300 idle, 20 trickling and 20 \
         garbage clients; heapcapd {threads} threads (most {most_threads}, {} before), {fds} fds, RSS {} KiB",
        before.1,
        rss_kib(d.pid())
    );
    // Connections are tasks, not threads.
    assert!(most_threads <= before.1 + 4, "heapcapd ran {most_threads} threads for 340 clients ({} before)", before.1);

    // The idle and garbage clients are cut off at the head deadline (garbage at once, with 400).
    let deadline = Instant::now() + DEADLINE;
    while still_open(&idle) + still_open(&garbage) > 0 {
        assert!(Instant::now() < deadline, "idle or garbage /metrics clients were never cut off");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop((idle, garbage));
    assert_back_to(&d, before, "after the /metrics clients left");
    assert_still_serves(&d, before);
}

#[test]
fn metrics_survives_floods_and_answers_bad_requests_with_the_right_length() {
    let d = Daemon::start();
    let before = baseline(&d);
    // 2000 connections opened and closed, 4 clients at once, half with garbage or half a request.
    std::thread::scope(|s| {
        for t in 0..4 {
            let d = &d;
            s.spawn(move || {
                for i in 0..500 {
                    let mut c = TcpStream::connect(d.metrics_addr()).expect("connect in the flood");
                    match (t + i) % 4 {
                        0 => drop(c.write_all(b"garbage\r\n\r\n")),
                        1 => drop(c.write_all(b"GET /metr")),
                        _ => {}
                    }
                }
            });
        }
        // Scrapes answer during the flood.
        for _ in 0..5 {
            scrape(&d);
        }
    });
    scrape(&d);

    // Wrong path, method, protocol, head size: each its status, its Content-Length its body's.
    let big = format!("GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(64 * 1024));
    let many: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    let cases: [(&[u8], u16); 7] = [
        (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"GET /metrics/../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", 405),
        (b"DELETE /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        (b"garbage\r\n\r\n", 400),
        (big.as_bytes(), 431),
        (many.as_bytes(), 431),
    ];
    for (request, expected) in cases {
        let shown = String::from_utf8_lossy(&request[..request.len().min(60)]).into_owned();
        let answer = http(&d, request);
        let (status, headers, body) = parse_http(&answer);
        assert_eq!(status, expected, "{shown:?}: {answer}");
        let length = header(&headers, "content-length").and_then(|l| l.parse::<usize>().ok());
        assert_eq!(length, Some(body.len()), "{shown:?}: Content-Length and body differ: {answer}");
        if expected == 404 {
            assert_eq!(body, "not found: heapcapd serves GET /metrics\n", "{answer}");
        }
        if expected == 405 {
            assert_eq!(header(&headers, "allow"), Some("GET, HEAD"), "{answer}");
        }
    }
    // HEAD: the headers of a scrape, no body.
    let answer = http(&d, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let (status, _, body) = parse_http(&answer);
    assert!(status == 200 && body.is_empty(), "{answer}");
    assert_back_to(&d, before, "after the /metrics flood");
    assert_still_serves(&d, before);
}
