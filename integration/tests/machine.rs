//! A process under a quota sees the quota as its machine's memory: real programs under `heapcap
//! run` and in runc/crun containers under a real heapcapd.
//!
//! - `fixtures/sysinfo.c` (static): what `sysinfo(2)` and `sysconf(_SC_PHYS_PAGES)` say, and
//!   `EFAULT` for a bad buffer with nothing written; busybox `free`;
//! - the JVM with default flags (Debian's OpenJDK 17, installed by `scripts/setup.sh`): `java
//!   -version` under 256 MiB, and `fixtures/Leak.java` (compiled here with `javac`) ending with
//!   `OutOfMemoryError`, never a crash report, under 256 and 512 MiB, in a container too;
//! - with `--machine-memory host` / `heapcap.io/machine-memory: host`, the host's figures.
//!
//! Nothing is skipped: a missing JVM, javac or busybox fails the test with what to install.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use heapcap_integration::binaries::heapcap;
use heapcap_integration::daemon::Daemon;
use heapcap_integration::fixture::{field, MIB};
use heapcap_integration::ids::unique_id;
use heapcap_integration::process::{run_captured, show, stdout};
use heapcap_integration::runtime::Runtime;
use heapcap_policy::ledger::Counting;

const SYSINFO: &str = env!("HEAPCAP_SYSINFO_STATIC");
/// Debian's OpenJDK 17 (`apt-get install openjdk-17-jdk-headless`, in scripts/setup.sh).
const JDK: &str = "/usr/lib/jvm/java-17-openjdk-amd64";
const TIMEOUT: Duration = Duration::from_secs(180);

fn java() -> PathBuf {
    let java = Path::new(JDK).join("bin/java");
    assert!(
        java.exists(),
        "no JVM at {}: run scripts/setup.sh (apt-get install openjdk-17-jdk-headless)",
        java.display()
    );
    java
}

/// `fixtures/Leak.java` compiled with `javac`, once: the directory holding `Leak.class`.
fn leak_classes() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("leak-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("class dir");
        let javac = Path::new(JDK).join("bin/javac");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/Leak.java");
        let out = Command::new(&javac).arg("-d").arg(&dir).arg(&source).output().unwrap_or_else(|e| {
            panic!("cannot run {}: {e}: run scripts/setup.sh (openjdk-17-jdk-headless)", javac.display())
        });
        assert!(out.status.success(), "javac failed: {}", show(&out));
        dir
    })
}

/// The host's memory, as the kernel tells it (bytes).
fn host_totalram() -> u64 {
    // SAFETY: `libc::sysinfo` is plain data; the call fills it.
    let mut si: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `si` is a valid, writable struct sysinfo.
    assert_eq!(unsafe { libc::sysinfo(&mut si) }, 0);
    si.totalram * u64::from(si.mem_unit)
}

/// `heapcap run ARGS -- COMMAND` in `cwd`.
fn run_in(cwd: &Path, args: &[&str], command: &[&str]) -> Output {
    let mut cmd = heapcap();
    cmd.arg("run").args(args).arg("--").args(command).current_dir(cwd);
    run_captured(cmd, TIMEOUT)
}

fn run(args: &[&str], command: &[&str]) -> Output {
    run_in(Path::new("/"), args, command)
}

/// `totalram`, `freeram` and `phys` (bytes) from the fixture's `sysinfo` line.
fn figures(out: &Output) -> (u64, u64, u64) {
    assert!(out.status.success(), "{}", show(out));
    let text = stdout(out);
    let line = text.lines().find(|l| l.starts_with("totalram=")).unwrap_or_else(|| panic!("{}", show(out)));
    let num = |key: &str| field(line, key).parse::<u64>().unwrap_or_else(|_| panic!("{key} in {line}"));
    (num("totalram"), num("freeram"), num("phys"))
}

/// The `total` column of busybox `free`'s `Mem:` line, in KiB. busybox prints `Mem:   ` and then
/// 12 columns per figure; its `used` (total - free - buff/cache, the latter from the host's
/// /proc/meminfo, which heapcap leaves alone: see the README) can overflow its column.
fn free_total_kib(out: &Output) -> u64 {
    assert!(out.status.success(), "{}", show(out));
    let text = stdout(out);
    let mem = text.lines().find(|l| l.starts_with("Mem:")).unwrap_or_else(|| panic!("{}", show(out)));
    mem.get(7..19).and_then(|t| t.trim().parse().ok()).unwrap_or_else(|| panic!("no total in {mem:?}"))
}

/// A JVM crash report's marks in what it printed, or a crash report file left in `dir`.
fn assert_no_jvm_crash(out: &Output, dir: &Path) {
    let text = show(out);
    assert!(!text.contains("insufficient memory for the Java Runtime") && !text.contains("hs_err_pid"), "{text}");
    let reports: Vec<_> = std::fs::read_dir(dir)
        .expect("cwd")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("hs_err_pid"))
        .collect();
    assert!(reports.is_empty(), "crash reports {reports:?}: {text}");
}

#[test]
fn sysconf_and_sysinfo_report_the_quota_that_applies() {
    let (total, free, phys) = figures(&run(&["--limit", "256Mi"], &[SYSINFO, "sysinfo"]));
    assert_eq!((total, phys), (256 * MIB, 256 * MIB), "the quota is the machine");
    assert!(free <= total && free > total - 8 * MIB, "free = quota less the little heap it has: {free}");
    // The lower of the process quota and the total.
    let (total, _, phys) = figures(&run(&["--limit", "256Mi", "--total-limit", "100Mi"], &[SYSINFO, "sysinfo"]));
    assert_eq!((total, phys), (100 * MIB, 100 * MIB));
    // The opt-out, and audit mode (no quota enforced): the host's.
    let host = host_totalram();
    for args in [&["--limit", "256Mi", "--machine-memory", "host"][..], &["--audit"][..]] {
        let (total, _, phys) = figures(&run(args, &[SYSINFO, "sysinfo"]));
        assert_eq!((total, phys), (host, host), "{args:?}");
    }
}

#[test]
fn heapcap_runs_keeper_answers_with_the_quota_too() {
    use std::io::{BufRead, BufReader, Read};
    use std::process::Stdio;
    let dir = tempdir("keeper");
    let flag = dir.join("go");
    // The command waits for the flag, which is made once the keeper has taken over.
    let script = format!("while [ ! -e {} ]; do sleep 0.05; done; {SYSINFO} sysinfo", flag.display());
    let mut child = heapcap()
        .args(["run", "--limit", "256Mi", "--", "/bin/sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start heapcap run");
    let pid = child.id();
    // heapcap run has started its keeper once its command runs under the filter.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let has_keeper = || {
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        children.split_whitespace().any(|c| {
            std::fs::read(format!("/proc/{c}/cmdline")).is_ok_and(|cl| cl.split(|b| *b == 0).nth(1) == Some(b"keep"))
        })
    };
    while !has_keeper() {
        assert!(std::time::Instant::now() < deadline, "heapcap run (pid {pid}) has no keeper");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) of the heapcap run this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    child.wait().expect("reap heapcap run");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut said = String::new();
    while !said.contains("supervises the command's processes from now on") {
        assert!(stderr.read_line(&mut said).expect("stderr") > 0, "the keeper never took over: {said}");
    }
    std::fs::write(&flag, "").expect("flag");
    let mut out = String::new();
    child.stdout.take().expect("stdout").read_to_string(&mut out).expect("stdout");
    let line = out.lines().find(|l| l.starts_with("totalram=")).unwrap_or_else(|| panic!("{out} {said}"));
    assert_eq!(field(line, "totalram"), (256 * MIB).to_string(), "{line}");
    assert_eq!(field(line, "phys"), (256 * MIB).to_string(), "{line}");
}

#[test]
fn a_bad_buffer_gets_efault_and_nothing_is_written() {
    let out = run(&["--limit", "64Mi"], &[SYSINFO, "efault"]);
    assert!(out.status.success(), "{}", show(&out));
    // The kernel's own copy would have written the writable half before faulting; heapcap writes nothing.
    assert!(stdout(&out).contains("unmapped=EFAULT straddle=EFAULT kept=yes"), "{}", show(&out));
}

#[test]
fn busybox_free_reports_the_quota() {
    let busybox = "/bin/busybox";
    assert!(Path::new(busybox).exists(), "no {busybox}: run scripts/setup-runtimes.sh (busybox-static)");
    assert_eq!(free_total_kib(&run(&["--limit", "256Mi"], &[busybox, "free"])), 256 * 1024);
    let host = free_total_kib(&run(&["--limit", "256Mi", "--machine-memory", "host"], &[busybox, "free"]));
    assert_eq!(host, host_totalram() / 1024, "with the opt-out, the host's");
}

#[test]
fn java_sizes_its_heap_from_the_quota() {
    let java = java();
    let java = java.to_str().expect("utf-8");
    let dir = tempdir("java-version");
    let out = run_in(&dir, &["--limit", "256Mi"], &[java, "-version"]);
    assert!(out.status.success() && show(&out).contains("openjdk version"), "{}", show(&out));
    assert_no_jvm_crash(&out, &dir);
    // The default heap is a share of the machine: of the quota under heapcap, of the host without.
    let max_heap = |args: &[&str]| -> u64 {
        let out = run_in(&dir, args, &[java, "-XX:+PrintFlagsFinal", "-version"]);
        assert!(out.status.success(), "{}", show(&out));
        let text = stdout(&out);
        let line = text.lines().find(|l| l.contains(" MaxHeapSize ")).unwrap_or_else(|| panic!("{}", show(&out)));
        line.split_whitespace().nth(3).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{line}"))
    };
    assert!(max_heap(&["--limit", "256Mi"]) <= 128 * MIB, "at most half of a small quota");
    assert_eq!(max_heap(&["--limit", "2Gi"]), 512 * MIB, "a quarter of the quota");
    assert!(max_heap(&["--limit", "2Gi", "--machine-memory", "host"]) > 2048 * MIB, "a quarter of the host's");
    // What the opt-out does to a JVM under a quota below its initial heap (1/64 of the machine's
    // memory): it sizes itself from the host and dies committing that heap.
    let small = format!("{}Mi", (host_totalram() / 128 / MIB).max(16));
    let crashed = tempdir("java-host");
    let out = run_in(&crashed, &["--limit", &small, "--machine-memory", "host"], &[java, "-version"]);
    assert!(!out.status.success() && show(&out).contains("insufficient memory"), "{small}: {}", show(&out));
}

#[test]
fn a_leaking_java_program_gets_out_of_memory_error_not_a_crash() {
    let java = java();
    let classes = leak_classes().to_str().expect("utf-8").to_string();
    for limit in ["256Mi", "512Mi"] {
        let dir = tempdir(&format!("leak-{limit}"));
        let out = run_in(&dir, &["--limit", limit], &[java.to_str().unwrap(), "-cp", &classes, "Leak"]);
        assert!(out.status.success(), "{limit}: {}", show(&out));
        assert!(stdout(&out).contains("OutOfMemoryError after"), "{limit}: {}", show(&out));
        assert_no_jvm_crash(&out, &dir);
    }
}

#[test]
fn in_containers_the_quota_is_the_machine_too() {
    let d = Daemon::start();
    let profile = |b: &mut heapcap_integration::bundle::Bundle| {
        let p = heapcap_oci::heapcap_profile_with(Counting::Heap, &d.agent, None, heapcap_oci::Extra { machine: true });
        b.seccomp(serde_json::to_value(p).expect("profile"));
    };
    for rt in Runtime::ALL {
        // The fixture and busybox free, under the quota and with the opt-out.
        let mut b = d.bundle(&[("heapcap.io/limit", "256Mi")], &["/sysinfo", "sysinfo"]);
        b.copy_into_rootfs(SYSINFO, "/sysinfo");
        profile(&mut b);
        let (total, _, phys) = figures(&b.run(rt, &unique_id("sysinfo")));
        assert_eq!((total, phys), (256 * MIB, 256 * MIB), "{rt:?}");
        b.args(&["/bin/free"]);
        assert_eq!(free_total_kib(&b.run(rt, &unique_id("free"))), 256 * 1024, "{rt:?}");
        let mut host =
            d.bundle(&[("heapcap.io/limit", "256Mi"), ("heapcap.io/machine-memory", "host")], &["/sysinfo", "sysinfo"]);
        host.copy_into_rootfs(SYSINFO, "/sysinfo");
        profile(&mut host);
        let (total, _, _) = figures(&host.run(rt, &unique_id("sysinfo-host")));
        assert_eq!(total, host_totalram(), "{rt:?}: the opt-out, though the profile sends sysinfo");
    }
    // heapcap ps says which containers see the host's memory.
    let mut sleeper =
        d.bundle(&[("heapcap.io/limit", "64Mi"), ("heapcap.io/machine-memory", "host")], &["/bin/sleep", "60"]);
    profile(&mut sleeper);
    let c = sleeper.create(Runtime::Runc, &unique_id("ps-host"));
    c.start();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let shown = loop {
        let ps = d.ps();
        let found = ps["containers"].as_array().and_then(|cs| cs.iter().find(|x| x["id"] == c.id()).cloned());
        if let Some(found) = found {
            break found;
        }
        assert!(std::time::Instant::now() < deadline, "{} not in {ps}", c.id());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(shown["host_memory"], true, "{shown}");
    c.kill("KILL");
    // The host's JVM, read-only in a busybox container, leaking under 512 MiB.
    let java = java();
    let mut b = d.bundle(
        &[("heapcap.io/limit", "512Mi")],
        &[java.to_str().unwrap(), "-XX:-UsePerfData", "-cp", "/leak", "Leak"],
    );
    b.with_host_system();
    b.bind_ro("/etc/java-17-openjdk", "/etc/java-17-openjdk");
    b.copy_into_rootfs(leak_classes().join("Leak.class"), "/leak/Leak.class");
    profile(&mut b);
    let out = b.run(Runtime::Runc, &unique_id("java"));
    assert!(out.status.success(), "{}", show(&out));
    assert!(stdout(&out).contains("OutOfMemoryError after"), "{}", show(&out));
    assert_no_jvm_crash(&out, &b.rootfs());
}

fn tempdir(tag: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(unique_id(tag));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
