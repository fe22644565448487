//! Changing a bundle's `config.json` in place, atomically.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use heapcap_oci::spec::{self, Defaults, Outcome, SpecError};

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("heapcap-runtime: cannot read {path}: {source} (is --bundle the container's bundle directory?)")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("heapcap-runtime: {path} is not JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{source} (in {path})")]
    Spec { path: PathBuf, source: SpecError },
    #[error("heapcap-runtime: cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// A bundle's `config.json`, read and, if the container asks for heapcap, changed in memory only:
/// nothing is written until [`Plan::write`].
#[derive(Debug)]
pub struct Plan {
    path: PathBuf,
    /// What heapcap's spec change does to this container.
    pub outcome: Outcome,
    /// The file's `linux.seccomp.listenerPath` as read (before any change), if it names one.
    pub listener_path: Option<PathBuf>,
    changed: Option<Vec<u8>>,
}

/// Read `<bundle>/config.json` and apply heapcap's spec change to it in memory.
pub fn plan(bundle: &Path, defaults: &Defaults) -> Result<Plan, BundleError> {
    let path = bundle.join("config.json");
    let bytes = fs::read(&path).map_err(|source| BundleError::Read { path: path.clone(), source })?;
    let mut config: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|source| BundleError::Json { path: path.clone(), source })?;
    let listener_path =
        config["linux"]["seccomp"]["listenerPath"].as_str().filter(|p| !p.is_empty()).map(PathBuf::from);
    let outcome =
        spec::apply_json(&mut config, defaults).map_err(|source| BundleError::Spec { path: path.clone(), source })?;
    let changed = matches!(outcome, Outcome::Changed { .. }).then(|| {
        let mut text = serde_json::to_vec(&config).expect("a JSON value serializes");
        text.push(b'\n');
        text
    });
    Ok(Plan { path, outcome, listener_path, changed })
}

impl Plan {
    /// Write the changed `config.json` (atomically); an unchanged one is not touched.
    pub fn write(self) -> Result<Outcome, BundleError> {
        if let Some(text) = &self.changed {
            replace(&self.path, text).map_err(|source| BundleError::Write { path: self.path.clone(), source })?;
        }
        Ok(self.outcome)
    }
}

/// Replace `path` with `contents`: a temp file in the same directory with the same mode, written
/// and fsynced, renamed over `path`, and the directory fsynced. Readers see the old or the new
/// file, never a part of one.
fn replace(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mode = fs::metadata(path)?.permissions().mode() & 0o7777;
    let tmp = dir.join(format!(".config.json.heapcap-{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepare(bundle: &Path, defaults: &Defaults) -> Result<Outcome, BundleError> {
        plan(bundle, defaults)?.write()
    }

    fn tempdir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("heapcap-runtime-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn unasked_is_byte_for_byte_untouched_and_asked_is_replaced() {
        let dir = tempdir("bundle");
        let original = "{ \"ociVersion\": \"1.0.2\",\n  \"process\": {\"args\": [\"sh\"]} }";
        fs::write(dir.join("config.json"), original).unwrap();
        fs::set_permissions(dir.join("config.json"), fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(prepare(&dir, &Defaults::default()).unwrap(), Outcome::Unchanged);
        assert_eq!(fs::read_to_string(dir.join("config.json")).unwrap(), original);

        let d = Defaults { settings: vec![("heapcap.io/limit".into(), "64Mi".into())], ..Defaults::default() };
        assert!(matches!(prepare(&dir, &d).unwrap(), Outcome::Changed { .. }));
        let v: serde_json::Value = serde_json::from_slice(&fs::read(dir.join("config.json")).unwrap()).unwrap();
        assert_eq!(v["linux"]["seccomp"]["listenerPath"], "/run/heapcap/heapcapd.sock");
        assert_eq!(v["process"]["args"][0], "sh");
        assert_eq!(fs::metadata(dir.join("config.json")).unwrap().permissions().mode() & 0o777, 0o640);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "no temp file left");
        let again = plan(&dir, &d).unwrap();
        assert_eq!(again.outcome, Outcome::Unchanged, "already heapcap's listener");
        assert_eq!(again.listener_path, Some(PathBuf::from("/run/heapcap/heapcapd.sock")));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_plan_is_written_only_when_asked() {
        let dir = tempdir("plan");
        let original = "{\"annotations\": {\"heapcap.io/limit\": \"64Mi\"}}";
        fs::write(dir.join("config.json"), original).unwrap();
        let p = plan(&dir, &Defaults::default()).unwrap();
        assert!(matches!(p.outcome, Outcome::Changed { .. }) && p.listener_path.is_none(), "{p:?}");
        drop(p);
        assert_eq!(fs::read_to_string(dir.join("config.json")).unwrap(), original, "planning writes nothing");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn errors_leave_the_file_alone() {
        let dir = tempdir("bad");
        let bad = "{\"annotations\": {\"heapcap.io/limit\": \"lots\"}}";
        fs::write(dir.join("config.json"), bad).unwrap();
        let e = prepare(&dir, &Defaults::default()).unwrap_err().to_string();
        assert!(e.contains("'lots' is not a size") && e.contains("config.json"), "{e}");
        assert_eq!(fs::read_to_string(dir.join("config.json")).unwrap(), bad);
        let e = prepare(&dir.join("missing"), &Defaults::default()).unwrap_err().to_string();
        assert!(e.contains("cannot read") && e.contains("--bundle"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
