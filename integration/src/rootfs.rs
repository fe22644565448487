//! The root filesystem of every container of the harness: the host's static busybox (`/bin`,
//! with every applet) and the static fixture as `/alloc`; and the host's system directories,
//! for tests that bind them in to run host programs such as python3.

use std::fs;
use std::io;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::fixture::ALLOC_STATIC;
use crate::process::{show, stdout};

const BUSYBOX_PATHS: &[&str] = &["/bin/busybox", "/usr/bin/busybox", "/sbin/busybox", "/usr/sbin/busybox"];

/// Host directories that [`Bundle::with_host_system`](crate::bundle::Bundle::with_host_system) binds read-only.
const HOST_SYSTEM_DIRS: &[&str] = &["/usr", "/lib", "/lib32", "/lib64", "/libx32"];

/// The host's static busybox and its applet names.
pub(crate) fn busybox() -> &'static (PathBuf, Vec<String>) {
    static BUSYBOX: OnceLock<Result<(PathBuf, Vec<String>), String>> = OnceLock::new();
    match BUSYBOX.get_or_init(find_busybox) {
        Ok(found) => found,
        Err(message) => panic!("{message}"),
    }
}

fn find_busybox() -> Result<(PathBuf, Vec<String>), String> {
    let install = "install busybox-static (Debian/Ubuntu: apt-get install busybox-static; or run \
                   scripts/setup-runtimes.sh as root)";
    let path =
        BUSYBOX_PATHS.iter().map(PathBuf::from).find(|path| path.is_file()).ok_or_else(|| {
            format!("the container tests need a static busybox at one of {BUSYBOX_PATHS:?}: {install}")
        })?;
    if !is_static_elf(&path)? {
        return Err(format!(
            "{} is dynamically linked and cannot run in a busybox-only container: {install} \
             (it replaces the dynamic `busybox` package)",
            path.display()
        ));
    }
    let out = Command::new(&path)
        .arg("--list")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `{} --list`: {e}", path.display()))?;
    if !out.status.success() {
        return Err(format!("`{} --list` failed:\n{}", path.display(), show(&out)));
    }
    let applets: Vec<String> = stdout(&out)
        .lines()
        .map(str::trim)
        .filter(|name| !name.is_empty() && !name.contains('/') && *name != "busybox")
        .map(str::to_string)
        .collect();
    for needed in ["sh", "true", "sleep", "cat", "echo"] {
        if !applets.iter().any(|a| a == needed) {
            return Err(format!("{} has no `{needed}` applet: {install}", path.display()));
        }
    }
    Ok((path, applets))
}

/// Whether the ELF file at `path` has no program interpreter (`PT_INTERP`),
/// i.e. runs without a dynamic loader.
pub fn is_static_elf(path: &Path) -> Result<bool, String> {
    const PT_INTERP: usize = 3;
    let data = fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let truncated = || format!("{} is a truncated ELF file", path.display());
    if data.len() < 64 || data[..4] != *b"\x7fELF" {
        return Err(format!("{} is not an ELF file", path.display()));
    }
    if data[5] != 1 {
        return Err(format!("{} is not a little-endian ELF file", path.display()));
    }
    let num = |offset: usize, len: usize| -> Option<usize> {
        let bytes = data.get(offset..offset.checked_add(len)?)?;
        let mut buf = [0u8; 8];
        buf[..len].copy_from_slice(bytes);
        usize::try_from(u64::from_le_bytes(buf)).ok()
    };
    let (phoff, phentsize, phnum) = match data[4] {
        1 => (num(0x1c, 4), num(0x2a, 2), num(0x2c, 2)),
        2 => (num(0x20, 8), num(0x36, 2), num(0x38, 2)),
        class => return Err(format!("{} has unknown ELF class {class}", path.display())),
    };
    let (phoff, phentsize, phnum) =
        (phoff.ok_or_else(truncated)?, phentsize.ok_or_else(truncated)?, phnum.ok_or_else(truncated)?);
    for i in 0..phnum {
        let entry = i.checked_mul(phentsize).and_then(|o| o.checked_add(phoff)).ok_or_else(truncated)?;
        if num(entry, 4).ok_or_else(truncated)? == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Fills `rootfs` with busybox (`/bin/busybox` and a symlink per applet in
/// `/bin`), `/alloc`, minimal `/etc/passwd` and `/etc/group`, and empty
/// `/dev`, `/proc`, `/sys`, `/tmp` (mode 1777) and `/root`.
pub(crate) fn populate_rootfs(rootfs: &Path) {
    let fail =
        |what: &str, e: io::Error| -> ! { panic!("preparing the root filesystem {}: {what}: {e}", rootfs.display()) };
    let (busybox, applets) = busybox();
    for dir in ["bin", "dev", "etc", "proc", "sys", "tmp", "root"] {
        fs::create_dir_all(rootfs.join(dir)).unwrap_or_else(|e| fail(dir, e));
    }
    fs::set_permissions(rootfs.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap_or_else(|e| fail("tmp", e));
    fs::copy(busybox, rootfs.join("bin/busybox")).unwrap_or_else(|e| fail("copying busybox", e));
    for applet in applets {
        let link = rootfs.join("bin").join(applet);
        if fs::symlink_metadata(&link).is_err() {
            symlink("busybox", &link).unwrap_or_else(|e| fail(applet, e));
        }
    }
    fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    .unwrap_or_else(|e| fail("etc/passwd", e));
    fs::write(rootfs.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap_or_else(|e| fail("etc/group", e));
    fs::copy(ALLOC_STATIC, rootfs.join("alloc"))
        .unwrap_or_else(|e| fail(&format!("copying the static fixture {ALLOC_STATIC}"), e));
}

/// The host's `/usr` and `/lib*` directories that exist, each as (its real
/// location, where to mount it): `/lib64` on a merged-/usr host is
/// (`/usr/lib64`, `/lib64`).
pub fn host_system_mounts() -> Vec<(PathBuf, String)> {
    HOST_SYSTEM_DIRS
        .iter()
        .filter_map(|dir| {
            let real = fs::canonicalize(dir).ok()?;
            real.is_dir().then(|| (real, dir.to_string()))
        })
        .collect()
}
