//! Names unique on this host for one test run: container ids and names, and the temporary
//! directories bundles and images are built in.

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

/// A container id (or name) unique on this host for this test run:
/// `hc-<pid>-<counter>-<tag>`, with `tag` reduced to `[A-Za-z0-9_.-]`.
pub fn unique_id(tag: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tag: String = tag
        .chars()
        .take(40)
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' })
        .collect();
    format!("hc-{}-{n}-{tag}", std::process::id())
}

/// A directory removed (recursively) when dropped, unless `HEAPCAP_TEST_KEEP` is set.
#[derive(Debug)]
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    /// A fresh, empty directory named after [`unique_id`] in the system's temporary directory.
    pub(crate) fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(unique_id(tag));
        // A leftover of an earlier process with the same pid: start afresh.
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("HEAPCAP_TEST_KEEP").is_some() {
            eprintln!("HEAPCAP_TEST_KEEP: keeping {}", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}
