//! `/proc/<pid>` readers.
//!
//! To read about the thread behind a seccomp notification safely: open the files first, then
//! check the notification is still valid ([`crate::notify::Listener::id_valid`]), then read.
//! An open `/proc` file stays bound to the task it was opened for, so a pid recycled after the
//! check cannot be misread.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use heapcap_policy::ledger::{CallKey, Snapshot, ThreadState};
use heapcap_policy::maps::{Maps, MapsError};
use heapcap_policy::mounts::disk_devices;

use crate::procmap;

/// Why a `/proc` read failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("{path}: unexpected content {text:?}")]
    Format { path: PathBuf, text: String },
}

impl ProcError {
    /// The process is gone (rather than /proc being unreadable).
    pub fn is_gone(&self) -> bool {
        self.errno().is_some_and(|e| matches!(e, libc::ESRCH | libc::ENOENT))
    }

    /// Reading was refused for good: the supervisor has no ptrace rights over the process (it is
    /// not dumpable, or an LSM says no), as opposed to a passing failure (EMFILE, a garbled read).
    pub fn is_denied(&self) -> bool {
        self.errno().is_some_and(|e| matches!(e, libc::EACCES | libc::EPERM))
    }

    fn errno(&self) -> Option<i32> {
        match self {
            ProcError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// How the mappings are read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MapsReader {
    /// `PROCMAP_QUERY` where the kernel has it (6.11+), the text otherwise.
    #[default]
    Auto,
    /// Always the text of `/proc/<pid>/maps` (fixture trees; benchmarks).
    Text,
}

/// A `/proc` mount (the real one, or a fixture directory in tests).
#[derive(Debug, Clone)]
pub struct ProcFs {
    root: PathBuf,
    maps: MapsReader,
}

impl Default for ProcFs {
    fn default() -> Self {
        ProcFs { root: PathBuf::from("/proc"), maps: MapsReader::Auto }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ProcError + '_ {
    move |source| ProcError::Io { path: path.to_path_buf(), source }
}

/// A command line opened for one process, to be read after a check.
#[derive(Debug)]
pub struct OpenedCommand {
    pid: u32,
    cmdline: Option<File>,
}

/// Files opened for one process, to be read after the notification check.
#[derive(Debug)]
pub struct Opened {
    pid: u32,
    maps: (PathBuf, File),
    stat: (PathBuf, File),
}

impl ProcFs {
    /// A fixture tree: its `maps` are text files, read as text.
    pub fn with_root(root: impl Into<PathBuf>) -> ProcFs {
        ProcFs { root: root.into(), maps: MapsReader::Text }
    }

    /// The same mount, reading the mappings as `maps` says.
    pub fn with_maps_reader(mut self, maps: MapsReader) -> ProcFs {
        self.maps = maps;
        self
    }

    fn path(&self, pid: u32, file: &str) -> PathBuf {
        self.root.join(pid.to_string()).join(file)
    }

    fn open(&self, pid: u32, file: &str) -> Result<(PathBuf, File), ProcError> {
        let path = self.path(pid, file);
        let f = File::open(&path).map_err(io_err(&path))?;
        Ok((path, f))
    }

    fn read(&self, pid: u32, file: &str) -> Result<(PathBuf, String), ProcError> {
        let (path, mut f) = self.open(pid, file)?;
        let mut s = String::new();
        f.read_to_string(&mut s).map_err(io_err(&path))?;
        Ok((path, s))
    }

    /// Open what an exact snapshot of `pid` needs.
    pub fn open_snapshot(&self, pid: u32) -> Result<Opened, ProcError> {
        Ok(Opened { pid, maps: self.open(pid, "maps")?, stat: self.open(pid, "stat")? })
    }

    /// Read and parse a snapshot opened with [`ProcFs::open_snapshot`]: the counted heap and the
    /// program break (what admitting and refreshing need).
    pub fn read_snapshot(&self, opened: Opened, buf: &mut String) -> Result<Snapshot, ProcError> {
        self.read_snapshot_for(opened, buf, None)
    }

    /// [`ProcFs::read_snapshot`], plus every mapping overlapping `range` (`[start, end)`), which
    /// a request that looks at memory not yet counted (`mprotect`) needs.
    pub fn read_snapshot_for(
        &self,
        opened: Opened,
        buf: &mut String,
        range: Option<(u64, u64)>,
    ) -> Result<Snapshot, ProcError> {
        let (path, mut stat) = opened.stat;
        let mut text = String::with_capacity(1024); // one read: the line is a few hundred bytes
        stat.read_to_string(&mut text).map_err(io_err(&path))?;
        let start_brk = parse_stat_start_brk(&text).ok_or(ProcError::Format { path, text })?;
        let (path, mut maps) = opened.maps;
        if self.maps == MapsReader::Auto && procmap::supported() {
            match procmap::walk(&maps, range, Some(start_brk)) {
                Ok(vmas) => {
                    let maps = self.classified(opened.pid, Maps::from_vmas(vmas));
                    return Ok(Snapshot { maps, start_brk: Some(start_brk), upper: None });
                }
                Err(procmap::WalkError::Io(source)) => return Err(ProcError::Io { path, source }),
                Err(procmap::WalkError::Unsupported) => {} // the text, from the same fd
            }
        }
        buf.clear();
        maps.read_to_string(buf).map_err(io_err(&path))?;
        let maps = self.classified(opened.pid, Maps::parse(buf)?);
        Ok(Snapshot { maps, start_brk: Some(start_brk), upper: None })
    }

    /// `maps` with its shared file mappings told apart: on a disk-backed mount or not, from the
    /// process's `mountinfo` (read only when there is such a mapping). A device's file system
    /// is the same in every mount namespace, and a mapped file keeps its superblock (and so its
    /// device number) alive, so `mountinfo` read after the mappings cannot mislabel one; if it
    /// cannot be read, every shared file mapping counts (the safe side).
    pub fn classified(&self, pid: u32, mut maps: Maps) -> Maps {
        if maps.has_shared_files() {
            let disks = self.read(pid, "mountinfo").map(|(_, text)| disk_devices(&text)).unwrap_or_default();
            maps.classify(|dev| disks.binary_search(&dev).is_ok());
        }
        maps
    }

    /// Open and read a snapshot at once (for a process whose identity is otherwise checked).
    pub fn snapshot(&self, pid: u32, buf: &mut String) -> Result<Snapshot, ProcError> {
        let opened = self.open_snapshot(pid)?;
        self.read_snapshot(opened, buf)
    }

    /// Open `statm`, for an upper figure of the counted heap ([`ProcFs::read_upper`]) read after
    /// the notification check.
    pub fn open_statm(&self, pid: u32) -> Result<(PathBuf, File), ProcError> {
        self.open(pid, "statm")
    }

    /// From an opened `statm`: the kernel's count of private writable memory plus the stacks
    /// (`data`: `data_vm + stack_vm`, in pages), in bytes. Never below the counted heap (every
    /// private, writable, anonymous mapping is in one of the two), whatever the number of
    /// mappings: one short line, no walk of the maps.
    pub fn read_upper(&self, opened: (PathBuf, File), page: u64) -> Result<u64, ProcError> {
        let (path, mut f) = opened;
        let mut s = String::with_capacity(64);
        f.read_to_string(&mut s).map_err(io_err(&path))?;
        parse_statm_data(&s).map(|pages| pages.saturating_mul(page)).ok_or(ProcError::Format { path, text: s })
    }

    /// `statm`'s upper figure ([`ProcFs::read_upper`]) from a file kept open and read again
    /// (`pread` from the start: the kernel writes it afresh at each read, for the task the file
    /// was opened for, so the figure is always that process's now).
    pub fn read_upper_at(&self, statm: &(PathBuf, File), page: u64) -> Result<u64, ProcError> {
        let text = read_all_at(statm, 64)?;
        parse_statm_data(&text)
            .map(|pages| pages.saturating_mul(page))
            .ok_or_else(|| ProcError::Format { path: statm.0.clone(), text })
    }

    /// `start_brk` from a `stat` file kept open, read again; `None` when the kernel hides it (0:
    /// no ptrace rights over the process).
    pub fn read_start_brk_at(&self, stat: &(PathBuf, File)) -> Result<Option<u64>, ProcError> {
        let text = read_all_at(stat, 1024)?;
        let brk = parse_stat_start_brk(&text).ok_or_else(|| ProcError::Format { path: stat.0.clone(), text })?;
        Ok((brk != 0).then_some(brk))
    }

    /// Open `stat`, to be kept and read again with [`ProcFs::read_start_brk_at`].
    pub fn open_stat(&self, pid: u32) -> Result<(PathBuf, File), ProcError> {
        self.open(pid, "stat")
    }

    /// Open `maps`, to be kept for [`procmap::walk`] (`PROCMAP_QUERY`). The file is bound to the
    /// address space the process had when it was opened: open it again after an exec.
    pub fn open_maps(&self, pid: u32) -> Result<(PathBuf, File), ProcError> {
        self.open(pid, "maps")
    }

    /// The mappings through a `maps` file kept open, with `PROCMAP_QUERY` (`None` where the
    /// kernel has no such query: read the text of a freshly opened file instead).
    pub fn walk_at(
        &self,
        pid: u32,
        maps: &(PathBuf, File),
        range: Option<(u64, u64)>,
        start_brk: Option<u64>,
    ) -> Option<Result<Maps, ProcError>> {
        if self.maps != MapsReader::Auto || !procmap::supported() {
            return None;
        }
        match procmap::walk(&maps.1, range, start_brk) {
            Ok(vmas) => Some(Ok(self.classified(pid, Maps::from_vmas(vmas)))),
            Err(procmap::WalkError::Io(source)) => Some(Err(ProcError::Io { path: maps.0.clone(), source })),
            Err(procmap::WalkError::Unsupported) => None,
        }
    }

    /// Open `status` (to learn a thread's process) for reading after the notification check.
    pub fn open_status(&self, tid: u32) -> Result<(PathBuf, File), ProcError> {
        self.open(tid, "status")
    }

    /// The thread-group id from an opened `status`.
    pub fn read_tgid(&self, opened: (PathBuf, File)) -> Result<u32, ProcError> {
        let (path, mut f) = opened;
        let mut s = String::new();
        f.read_to_string(&mut s).map_err(io_err(&path))?;
        parse_status_tgid(&s).ok_or(ProcError::Format { path, text: s })
    }

    /// What a thread is doing, from `/proc/<tid>/syscall`.
    pub fn thread_state(&self, tid: u32) -> ThreadState {
        match self.open_syscall(tid) {
            Ok(opened) => self.thread_state_at(&opened),
            Err(e) if e.is_gone() => ThreadState::Gone,
            Err(_) => ThreadState::Busy,
        }
    }

    /// Open `/proc/<tid>/syscall`, to be kept and read again with [`ProcFs::thread_state_at`].
    pub fn open_syscall(&self, tid: u32) -> Result<(PathBuf, File), ProcError> {
        self.open(tid, "syscall")
    }

    /// What a thread is doing, from its `syscall` file kept open: one `pread` (the kernel writes
    /// the line afresh at each read from the start, for the thread the file was opened for, and
    /// fails it with `ESRCH` once that thread is gone).
    pub fn thread_state_at(&self, syscall: &(PathBuf, File)) -> ThreadState {
        // The longest line: 9 numbers in hex, well under 256 bytes.
        match read_all_at(syscall, 256) {
            Ok(text) => parse_syscall(&text).unwrap_or(ThreadState::Busy),
            Err(e) if e.is_gone() => ThreadState::Gone,
            Err(_) => ThreadState::Busy,
        }
    }

    /// The command line, for reports: the program's base name and its arguments, joined by
    /// spaces and shortened; `[comm]` if there is none (a kernel thread, a zombie); `?` if
    /// neither can be read.
    pub fn command(&self, pid: u32) -> String {
        self.read_command(self.open_command(pid))
    }

    /// Open what [`ProcFs::read_command`] reads, to read it after a check.
    pub fn open_command(&self, pid: u32) -> OpenedCommand {
        OpenedCommand { pid, cmdline: self.open(pid, "cmdline").ok().map(|(_, f)| f) }
    }

    /// The command line from [`ProcFs::open_command`] (never fails: `?` when nothing reads).
    pub fn read_command(&self, opened: OpenedCommand) -> String {
        const MAX: usize = 60;
        // One read: only the first MAX characters are shown.
        let mut bytes = [0u8; 4 * MAX];
        let cmdline = opened.cmdline.and_then(|mut f| f.read(&mut bytes).ok()).filter(|n| *n > 0);
        let mut cmd = match cmdline {
            Some(n) => {
                let bytes = &bytes[..n];
                let mut args: Vec<String> = bytes
                    .split(|&b| b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                if let Some(program) = args.first_mut() {
                    if let Some((_, base)) = program.rsplit_once('/') {
                        *program = base.to_string();
                    }
                }
                args.join(" ")
            }
            // No command line (a kernel thread, a zombie): its name, read now, for a label.
            None => match self.read(opened.pid, "comm") {
                Ok((_, comm)) => format!("[{}]", comm.trim_end()),
                Err(_) => "?".to_string(),
            },
        };
        if cmd.chars().count() > MAX {
            cmd = cmd.chars().take(MAX - 1).collect::<String>() + "…";
        }
        cmd
    }

    /// The thread ids of process `pid` (empty if it cannot be read).
    pub fn tasks(&self, pid: u32) -> Vec<u32> {
        let Ok(dir) = std::fs::read_dir(self.path(pid, "task")) else { return Vec::new() };
        dir.flatten().filter_map(|t| t.file_name().to_str()?.parse().ok()).collect()
    }

    /// The children of every thread of `pid` (`/proc/<pid>/task/<tid>/children`).
    pub fn children(&self, pid: u32) -> Vec<u32> {
        let mut out = Vec::new();
        for tid in self.tasks(pid) {
            let path = self.root.join(pid.to_string()).join("task").join(tid.to_string()).join("children");
            let Ok(text) = std::fs::read_to_string(path) else { continue };
            out.extend(text.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
        }
        out
    }

    /// Open `/proc/<pid>/ns/ipc`, the caller's IPC namespace (for SysV segment sizes).
    pub fn open_ipc_ns(&self, pid: u32) -> Result<File, ProcError> {
        self.open(pid, "ns/ipc").map(|(_, f)| f)
    }

    /// `Threads:` and `TracerPid:` from an opened `status`.
    pub fn read_threads_tracer(&self, opened: (PathBuf, File)) -> Result<(u32, u32), ProcError> {
        let (path, mut f) = opened;
        let mut s = String::new();
        f.read_to_string(&mut s).map_err(io_err(&path))?;
        let field = |name: &str| s.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse().ok());
        match (field("Threads:"), field("TracerPid:")) {
            (Some(threads), Some(tracer)) => Ok((threads, tracer)),
            _ => Err(ProcError::Format { path, text: s }),
        }
    }

    /// A process other than `tid`'s own that shares its address space, if any: every process
    /// this `/proc` lists is asked with `kcmp(KCMP_VM)` (one cheap call each; one that cannot be
    /// asked, another user's without the rights, cannot share it either). For the rare calls
    /// whose arguments sit in memory, where another writer must be ruled out.
    pub fn vm_sharer(&self, tid: u32) -> Option<u32> {
        let own = self.read(tid, "status").ok().and_then(|(_, s)| parse_status_tgid(&s));
        let dir = std::fs::read_dir(&self.root).ok()?;
        dir.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| Some(*pid) != own && *pid != tid)
            .find(|pid| crate::mmshare::same_vm(tid, *pid).unwrap_or(false))
    }

    /// Open `/proc/<pid>/mem`, to read a caller's memory after the notification check.
    pub fn open_mem(&self, pid: u32) -> Result<(PathBuf, File), ProcError> {
        self.open(pid, "mem")
    }

    /// Read exactly `buf.len()` bytes at `addr` from an opened `mem`.
    pub fn read_mem(&self, opened: &(PathBuf, File), addr: u64, buf: &mut [u8]) -> Result<(), ProcError> {
        opened.1.read_exact_at(buf, addr).map_err(io_err(&opened.0))
    }
}

/// The whole of a `/proc` file kept open, read from its start (`pread`), `hint` bytes expected.
fn read_all_at(opened: &(PathBuf, File), hint: usize) -> Result<String, ProcError> {
    let mut buf = vec![0u8; hint.max(64)];
    let mut len = 0;
    loop {
        let n = opened.1.read_at(&mut buf[len..], len as u64).map_err(io_err(&opened.0))?;
        len += n;
        if n == 0 || len < buf.len() {
            break;
        }
        buf.resize(buf.len() * 2, 0);
    }
    buf.truncate(len);
    String::from_utf8(buf).map_err(|e| ProcError::Format {
        path: opened.0.clone(),
        text: String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

/// `Tgid:` from `/proc/<tid>/status`.
pub fn parse_status_tgid(text: &str) -> Option<u32> {
    text.lines().find_map(|l| l.strip_prefix("Tgid:")).and_then(|v| v.trim().parse().ok())
}

/// `data` (the 6th field, pages) from `/proc/<pid>/statm`.
pub fn parse_statm_data(text: &str) -> Option<u64> {
    text.split_ascii_whitespace().nth(5)?.parse().ok()
}

/// `start_brk` (field 47) from `/proc/<pid>/stat`. The command name (field 2) may hold spaces
/// and parentheses, so fields are counted from the last `)`.
pub fn parse_stat_start_brk(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    rest.split_ascii_whitespace().nth(47 - 3).and_then(|v| v.parse().ok())
}

/// `/proc/<tid>/syscall`: `running`, `-1 sp pc` (not in a syscall), or `nr a1 .. a6 sp pc` in hex.
pub fn parse_syscall(text: &str) -> Option<ThreadState> {
    let text = text.trim();
    if text == "running" {
        return Some(ThreadState::Busy);
    }
    let mut fields = text.split_ascii_whitespace();
    let nr: i64 = fields.next()?.parse().ok()?;
    if nr < 0 {
        return Some(ThreadState::Idle);
    }
    let mut args = [0u64; 6];
    for a in &mut args {
        *a = u64::from_str_radix(fields.next()?.trim_start_matches("0x"), 16).ok()?;
    }
    Some(ThreadState::InCall(CallKey { nr, args }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_stat_and_syscall() {
        assert_eq!(parse_status_tgid("Name:\tx\nUmask:\t0022\nState:\tS\nTgid:\t4242\nNgid:\t0\n"), Some(4242));
        assert_eq!(parse_status_tgid("Name:\tx\n"), None);
        let mut stat = String::from("77 (a) b (c)) S");
        for i in 4..=52 {
            stat.push_str(&format!(" {}", if i == 47 { 94090892935168u64 } else { i }));
        }
        assert_eq!(parse_stat_start_brk(&stat), Some(94090892935168));
        assert_eq!(parse_stat_start_brk("garbage"), None);
        assert_eq!(parse_statm_data("2894 1154 706 2 0 1931 0\n"), Some(1931));
        assert_eq!(parse_statm_data("1 2 3"), None);
        assert_eq!(parse_syscall("running\n"), Some(ThreadState::Busy));
        assert_eq!(parse_syscall("-1 0x7ffd 0x7fe1\n"), Some(ThreadState::Idle));
        let key = CallKey { nr: 9, args: [0, 0x100000, 3, 0x22, 0xffffffffffffffff, 0] };
        assert_eq!(
            parse_syscall("9 0x0 0x100000 0x3 0x22 0xffffffffffffffff 0x0 0x7ffd837744f8 0x7fe178b522ad\n"),
            Some(ThreadState::InCall(key))
        );
        assert_eq!(parse_syscall("9 0x0"), None);
    }

    #[test]
    fn a_kept_syscall_file_follows_its_thread_until_it_is_gone() {
        let proc = ProcFs::default();
        let (mut r, mut w) = std::io::pipe().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() } as u32).unwrap();
            let mut b = [0u8; 1];
            r.read(&mut b).unwrap()
        });
        let tid = rx.recv().unwrap();
        let kept = proc.open_syscall(tid).unwrap();
        // Blocked in read(2) on the pipe: seen in that call, through the kept file and afresh.
        let in_read = |s: ThreadState| matches!(s, ThreadState::InCall(k) if k.nr == libc::SYS_read);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !in_read(proc.thread_state_at(&kept)) {
            assert!(std::time::Instant::now() < deadline, "the thread never blocked in read(2)");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(in_read(proc.thread_state(tid)));
        std::io::Write::write_all(&mut w, b"x").unwrap();
        assert_eq!(reader.join().unwrap(), 1);
        // join returns once the thread cleared its tid, which can be before the kernel released
        // it (it reads `running` until then).
        while proc.thread_state_at(&kept) != ThreadState::Gone {
            assert!(std::time::Instant::now() < deadline, "the kept file's thread never read as gone");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn reads_a_fixture_tree() {
        let dir = std::env::temp_dir().join(format!("heapcap-procfs-{}", std::process::id()));
        let pid_dir = dir.join("55");
        std::fs::create_dir_all(&pid_dir).unwrap();
        std::fs::write(pid_dir.join("maps"), "1000-3000 rw-p 00000000 00:00 0 \n").unwrap();
        let mut stat = String::from("55 (x) S");
        for i in 4..=52 {
            stat.push_str(&format!(" {}", if i == 47 { 8192 } else { 0 }));
        }
        std::fs::write(pid_dir.join("stat"), stat).unwrap();
        std::fs::write(pid_dir.join("cmdline"), b"/usr/bin/python3\0-c\0print(1)\0").unwrap();
        std::fs::write(pid_dir.join("syscall"), "-1 0x1 0x2\n").unwrap();
        let proc = ProcFs::with_root(&dir);
        let snap = proc.snapshot(55, &mut String::new()).unwrap();
        assert_eq!(snap.maps.counted(), 0x2000);
        assert_eq!(snap.start_brk, Some(8192));
        assert_eq!(proc.command(55), "python3 -c print(1)");
        assert_eq!(proc.thread_state(55), ThreadState::Idle);
        assert_eq!(proc.thread_state(56), ThreadState::Gone);
        assert!(proc.snapshot(56, &mut String::new()).unwrap_err().is_gone());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn reads_this_process() {
        let proc = ProcFs::default();
        let me = std::process::id();
        let snap = proc.snapshot(me, &mut String::new()).unwrap();
        assert!(snap.maps.counted() > 0);
        assert!(snap.start_brk.is_some());
        let page = crate::page_size();
        let upper = proc.read_upper(proc.open_statm(me).unwrap(), page).unwrap();
        let counted = proc.snapshot(me, &mut String::new()).unwrap().maps.counted();
        assert!(upper >= counted, "statm {upper} below the counted heap {counted}");
        assert!(matches!(proc.thread_state(me), ThreadState::Busy | ThreadState::Idle | ThreadState::InCall(_)));
    }

    #[test]
    fn the_query_and_the_text_agree() {
        let page = crate::page_size() as usize;
        let pages = 64;
        // SAFETY: a fresh private anonymous mapping nobody else knows of; unmapped below.
        let region = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * page,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(region, libc::MAP_FAILED);
        for i in (0..pages).step_by(2) {
            // SAFETY: inside the region mapped above.
            let rc = unsafe {
                libc::mprotect(region.cast::<u8>().add(i * page).cast(), page, libc::PROT_READ | libc::PROT_WRITE)
            };
            assert_eq!(rc, 0);
        }
        let (lo, hi) = (region as u64, region as u64 + (pages * page) as u64);
        let me = std::process::id();
        let text = ProcFs::default().with_maps_reader(MapsReader::Text);
        let query = ProcFs::default();
        // Other tests map and unmap concurrently in this process: retry until two reads agree.
        let mut agreed = false;
        for _ in 0..20 {
            let t =
                text.read_snapshot_for(text.open_snapshot(me).unwrap(), &mut String::new(), Some((lo, hi))).unwrap();
            let q =
                query.read_snapshot_for(query.open_snapshot(me).unwrap(), &mut String::new(), Some((lo, hi))).unwrap();
            if t.maps.counted() == q.maps.counted() && t.brk(page as u64) == q.brk(page as u64) {
                assert_eq!(q.maps.protect_growth(lo, hi), (pages / 2 * page) as u64);
                assert_eq!(t.maps.protect_growth(lo, hi), q.maps.protect_growth(lo, hi));
                assert_eq!(t.maps.counted_in(lo, hi), q.maps.counted_in(lo, hi));
                agreed = true;
                break;
            }
        }
        // SAFETY: the region mapped above, no longer used.
        unsafe { libc::munmap(region, pages * page) };
        assert!(agreed, "PROCMAP_QUERY and the text never agreed (supported: {})", procmap::supported());
    }
}
