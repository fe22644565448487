//! The one change heapcap makes to a container's OCI spec (`config.json`), shared by the runtime
//! shim (`heapcap-runtime`) and the podman `precreate` hook.
//!
//! A container asks for heapcap when any of these name a setting (later ones win, key by key):
//! 1. [`Defaults::settings`]: defaults for every container (e.g. a default limit for an engine
//!    that cannot pass annotations);
//! 2. with [`Defaults::env_fallback`], the container's own environment (`process.env`):
//!    `HEAPCAP_LIMIT`, `HEAPCAP_TOTAL_LIMIT`, `HEAPCAP_MODE`, `HEAPCAP_STRICT`,
//!    `HEAPCAP_MACHINE_MEMORY` (Docker cannot set OCI annotations, but `docker run -e
//!    HEAPCAP_LIMIT=64Mi` reaches `config.json`);
//! 3. its `heapcap.io/*` annotations.
//!
//! Every value is validated first; a bad one is an error naming where it came from and what to
//! write, never a container that runs silently unlimited. Then `linux.seccomp` gets heapcap's
//! notify rules ([`merge_into_with`] an existing profile, which never
//! widens it, or [`heapcap_profile_with`] when there is none; the
//! strict rules when the settings ask for strict mode, and `sysinfo` where the container's
//! programs are to see their quota as their machine's memory, [`Settings::quota_as_machine`]),
//! `listenerPath`, and the settings as `listenerMetadata` (`key=value` pairs), so heapcapd has
//! them also when they did not come from annotations. A container that asks for nothing is not
//! touched: [`Outcome::Unchanged`]; nor is a
//! Kubernetes pod's sandbox ([`kubernetes::is_sandbox`]), whatever its annotations say: containerd
//! copies the pod's `heapcap.io/*` annotations to it, and they are meant for the pod's containers
//! (a bad one fails the container that gets it, never the pod's sandbox).
//!
//! [`apply_json`] changes only `linux.seccomp` of a `config.json` read as JSON, so fields this
//! crate's `oci-spec` does not know survive; [`apply`] does the same for a typed [`Spec`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use heapcap_env::paths::AGENT_SOCKET;
use heapcap_policy::rules::Extra;
use heapcap_policy::settings::{self, Settings, SettingsError, LIMIT, MACHINE_MEMORY, MODE, STRICT, TOTAL_LIMIT};
use oci_spec::runtime::{Linux, LinuxSeccomp, Spec};
use serde_json::Value;

use crate::{heapcap_profile_with, kubernetes, merge_into_with, MergeError};

/// The environment variables read with [`Defaults::env_fallback`], and the setting each gives.
pub const ENV_VARS: [(&str, &str); 5] = [
    ("HEAPCAP_LIMIT", LIMIT),
    ("HEAPCAP_TOTAL_LIMIT", TOTAL_LIMIT),
    ("HEAPCAP_MODE", MODE),
    ("HEAPCAP_STRICT", STRICT),
    ("HEAPCAP_MACHINE_MEMORY", MACHINE_MEMORY),
];

/// What the caller (the shim's config file, the hook's flags) decides for every container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    /// heapcapd's agent socket, written as `listenerPath`.
    pub listener_path: PathBuf,
    /// `heapcap.io/*` key and value for every container, overridden by its env and annotations.
    pub settings: Vec<(String, String)>,
    /// Read `HEAPCAP_LIMIT`, `HEAPCAP_TOTAL_LIMIT`, `HEAPCAP_MODE`, `HEAPCAP_STRICT` and
    /// `HEAPCAP_MACHINE_MEMORY` from `process.env`.
    pub env_fallback: bool,
}

/// heapcapd's default agent socket ([`AGENT_SOCKET`]), no settings, no env fallback.
impl Default for Defaults {
    fn default() -> Self {
        Defaults { listener_path: PathBuf::from(AGENT_SOCKET), settings: Vec::new(), env_fallback: false }
    }
}

/// Where a setting came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    Env(&'static str),
    Annotation,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Default => f.write_str("the runtime's default settings"),
            Source::Env(var) => write!(f, "the container's environment variable {var}"),
            Source::Annotation => f.write_str("the container's annotations"),
        }
    }
}

/// What [`apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The container asks for no heapcap setting (or already has heapcap's listener, or is a
    /// Kubernetes pod's sandbox): not touched.
    Unchanged,
    /// The spec now sends heap growth to heapcapd with these settings (also in `listenerMetadata`).
    Changed { settings: Settings, metadata: String },
}

/// Why the spec cannot be changed; the message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("heapcap: bad setting in {source_of}: {source}")]
    Setting {
        source_of: Source,
        #[source]
        source: SettingsError,
    },
    #[error("heapcap: {key}: '{value}' from {source_of} must not contain spaces, commas, semicolons or '='")]
    Separator { key: String, value: String, source_of: Source },
    #[error("heapcap: cannot add heapcap's seccomp rules to the container's profile: {0}")]
    Merge(#[from] MergeError),
    #[error("heapcap: config.json: {what} is not what the OCI runtime spec says it is: {detail}")]
    Shape { what: &'static str, detail: String },
}

/// Change `spec` for heapcap if it asks for it (see the module docs).
pub fn apply(spec: &mut Spec, defaults: &Defaults) -> Result<Outcome, SpecError> {
    let annotations: Vec<(String, String)> =
        spec.annotations().iter().flatten().map(|(k, v)| (k.clone(), v.clone())).collect();
    let env: Vec<String> = spec.process().as_ref().and_then(|p| p.env().clone()).unwrap_or_default();
    let existing = spec.linux().as_ref().and_then(|l| l.seccomp().clone());
    let (outcome, profile) = decide(&annotations, &env, existing, defaults)?;
    if let Some(profile) = profile {
        if spec.linux().is_none() {
            // Empty, not `Linux::default()`, which fills in namespaces and masked paths.
            let linux: Linux = serde_json::from_value(Value::Object(Default::default()))
                .map_err(|e| SpecError::Shape { what: "linux", detail: e.to_string() })?;
            spec.set_linux(Some(linux));
        }
        if let Some(linux) = spec.linux_mut() {
            linux.set_seccomp(Some(profile));
        }
    }
    Ok(outcome)
}

/// [`apply`] on `config.json` as JSON: only `linux.seccomp` is replaced, every other field is kept
/// as it was (also fields unknown to `oci-spec`).
pub fn apply_json(config: &mut Value, defaults: &Defaults) -> Result<Outcome, SpecError> {
    let shape = |what: &'static str, detail: &str| SpecError::Shape { what, detail: detail.to_string() };
    let root = config.as_object_mut().ok_or_else(|| shape("the document", "not a JSON object"))?;
    let mut annotations = Vec::new();
    if let Some(value) = root.get("annotations").filter(|v| !v.is_null()) {
        let map = value.as_object().ok_or_else(|| shape("annotations", "not an object"))?;
        for (k, v) in map {
            let v = v.as_str().ok_or_else(|| shape("annotations", &format!("{k} is not a string")))?;
            annotations.push((k.clone(), v.to_string()));
        }
    }
    let mut env = Vec::new();
    if let Some(value) = root.get("process").and_then(|p| p.get("env")).filter(|v| !v.is_null()) {
        let list = value.as_array().ok_or_else(|| shape("process.env", "not an array"))?;
        for item in list {
            env.push(item.as_str().ok_or_else(|| shape("process.env", "has an entry that is not a string"))?.into());
        }
    }
    let existing = match root.get("linux").and_then(|l| l.get("seccomp")).filter(|v| !v.is_null()) {
        Some(value) => Some(
            serde_json::from_value::<LinuxSeccomp>(value.clone())
                .map_err(|e| SpecError::Shape { what: "linux.seccomp", detail: e.to_string() })?,
        ),
        None => None,
    };
    let (outcome, profile) = decide(&annotations, &env, existing, defaults)?;
    if let Some(profile) = profile {
        let profile = serde_json::to_value(profile)
            .map_err(|e| SpecError::Shape { what: "linux.seccomp", detail: e.to_string() })?;
        let linux = root.entry("linux").or_insert_with(|| Value::Object(Default::default()));
        if linux.is_null() {
            *linux = Value::Object(Default::default());
        }
        let linux = linux.as_object_mut().ok_or_else(|| shape("linux", "not an object"))?;
        linux.insert("seccomp".to_string(), profile);
    }
    Ok(outcome)
}

/// The settings a container asks for, each with its source, later sources winning; validated.
fn requested(
    annotations: &[(String, String)],
    env: &[String],
    defaults: &Defaults,
) -> Result<BTreeMap<String, (String, Source)>, SpecError> {
    let mut wanted: BTreeMap<String, (String, Source)> = BTreeMap::new();
    for (k, v) in &defaults.settings {
        wanted.insert(k.clone(), (v.clone(), Source::Default));
    }
    if defaults.env_fallback {
        for entry in env {
            let Some((name, value)) = entry.split_once('=') else { continue };
            if let Some((var, key)) = ENV_VARS.iter().find(|(var, _)| *var == name) {
                wanted.insert(key.to_string(), (value.to_string(), Source::Env(var)));
            }
        }
    }
    for (k, v) in annotations.iter().filter(|(k, _)| k.starts_with("heapcap.io/")) {
        wanted.insert(k.clone(), (v.clone(), Source::Annotation));
    }
    for (key, (value, source)) in &wanted {
        settings::resolve([(key.as_str(), value.as_str())], None)
            .map_err(|e| SpecError::Setting { source_of: source.clone(), source: e })?;
        if value.trim().contains(|c: char| c.is_whitespace() || matches!(c, ',' | ';' | '=')) {
            return Err(SpecError::Separator { key: key.clone(), value: value.clone(), source_of: source.clone() });
        }
    }
    Ok(wanted)
}

/// The outcome and, when changed, the new `linux.seccomp`.
fn decide(
    annotations: &[(String, String)],
    env: &[String],
    existing: Option<LinuxSeccomp>,
    defaults: &Defaults,
) -> Result<(Outcome, Option<LinuxSeccomp>), SpecError> {
    if kubernetes::is_sandbox(annotations.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
        return Ok((Outcome::Unchanged, None));
    }
    let wanted = requested(annotations, env, defaults)?;
    if wanted.is_empty() {
        return Ok((Outcome::Unchanged, None));
    }
    let metadata = wanted.iter().map(|(k, (v, _))| format!("{k}={}", v.trim())).collect::<Vec<_>>().join(" ");
    let ann = annotations.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    let settings = settings::resolve(ann, Some(&metadata))
        .map_err(|e| SpecError::Setting { source_of: Source::Annotation, source: e })?
        .expect("at least one heapcap.io/ key");
    let profile = match existing {
        // Already changed (e.g. `create` retried on the same bundle): heapcapd reads this spec's
        // own annotations and metadata, so there is nothing to add.
        Some(p) if p.listener_path().as_deref() == Some(defaults.listener_path.as_path()) => {
            return Ok((Outcome::Unchanged, None))
        }
        Some(mut p) => {
            merge_into_with(settings.counting, &mut p, &defaults.listener_path, Some(&metadata), Extra::of(&settings))?;
            p
        }
        None => heapcap_profile_with(settings.counting, &defaults.listener_path, Some(&metadata), Extra::of(&settings)),
    };
    Ok((Outcome::Changed { settings, metadata }, Some(profile)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use heapcap_policy::ledger::{Counting, Mode};
    use oci_spec::runtime::LinuxSeccompAction;
    use serde_json::json;
    use std::path::Path;

    use crate::testdata::{PODMAN_CAPS as CAPS, PODMAN_DEFAULT as PODMAN_PROFILE, RUNC_SPEC};
    const MIB: u64 = 1 << 20;

    fn runc_spec() -> Value {
        serde_json::from_str(RUNC_SPEC).unwrap()
    }

    /// podman's default profile as podman writes it into config.json for an amd64 container with
    /// podman's default capabilities (containers/common `setupSeccomp`): rules scoped to other
    /// arches or to capabilities it lacks dropped, `includes`/`excludes`/`comment` gone.
    fn podman_oci_profile() -> Value {
        let list = |v: &Value, key: &str| -> Vec<String> {
            v[key].as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_string).collect()
        };
        let p: Value = serde_json::from_str(PODMAN_PROFILE).unwrap();
        let syscalls: Vec<Value> = p["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| {
                let (inc, exc) = (&s["includes"], &s["excludes"]);
                let has = |c: &String| CAPS.contains(&c.as_str());
                let arches = list(inc, "arches");
                !(list(exc, "arches").iter().any(|a| a == "amd64")
                    || list(exc, "caps").iter().any(has)
                    || !arches.is_empty() && !arches.iter().any(|a| a == "amd64")
                    || !list(inc, "caps").iter().all(has))
            })
            .map(|s| {
                let mut o = s.as_object().unwrap().clone();
                for k in ["includes", "excludes", "comment", "errno"] {
                    o.remove(k);
                }
                if let Some(name) = o.remove("name") {
                    o.insert("names".into(), json!([name]));
                }
                Value::Object(o)
            })
            .collect();
        json!({
            "defaultAction": p["defaultAction"],
            "defaultErrnoRet": p["defaultErrnoRet"],
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": syscalls,
        })
    }

    /// A podman-style config.json: runc's spec with podman's default profile in OCI form and
    /// podman's annotations and environment.
    fn podman_spec() -> Value {
        let mut spec = runc_spec();
        spec["linux"]["seccomp"] = podman_oci_profile();
        spec["annotations"] = json!({"io.container.manager": "libpod", "org.opencontainers.image.stopSignal": "15"});
        spec["process"]["env"] = json!([
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "TERM=xterm",
            "container=podman"
        ]);
        spec
    }

    fn annotate(spec: &mut Value, key: &str, value: &str) {
        if !spec["annotations"].is_object() {
            spec["annotations"] = json!({});
        }
        spec["annotations"][key] = json!(value);
    }

    fn defaults() -> Defaults {
        Defaults { listener_path: "/run/x/agent.sock".into(), ..Defaults::default() }
    }

    #[test]
    fn not_asking_leaves_the_spec_alone() {
        for spec in [runc_spec(), podman_spec()] {
            let mut changed = spec.clone();
            assert_eq!(apply_json(&mut changed, &defaults()).unwrap(), Outcome::Unchanged);
            assert_eq!(changed, spec);
        }
        // HEAPCAP_LIMIT without env_fallback is the program's business, not ours.
        let mut spec = runc_spec();
        spec["process"]["env"] = json!(["HEAPCAP_LIMIT=64Mi"]);
        let before = spec.clone();
        assert_eq!(apply_json(&mut spec, &defaults()).unwrap(), Outcome::Unchanged);
        assert_eq!(spec, before);
    }

    #[test]
    fn runc_spec_without_profile_gets_heapcaps_own() {
        let mut spec = runc_spec();
        assert!(spec["linux"].get("seccomp").is_none(), "runc spec has no profile");
        annotate(&mut spec, LIMIT, "64Mi");
        let before = spec.clone();
        let Outcome::Changed { settings, metadata } = apply_json(&mut spec, &defaults()).unwrap() else {
            panic!("asked for heapcap")
        };
        assert_eq!(settings.limits.process, Some(64 * MIB));
        assert_eq!(metadata, "heapcap.io/limit=64Mi");
        let seccomp: LinuxSeccomp = serde_json::from_value(spec["linux"]["seccomp"].clone()).unwrap();
        let machine = Extra { machine: true };
        assert_eq!(
            seccomp,
            heapcap_profile_with(
                Counting::Heap,
                Path::new("/run/x/agent.sock"),
                Some("heapcap.io/limit=64Mi"),
                machine
            )
        );
        // Only linux.seccomp changed.
        let mut without = spec.clone();
        without["linux"].as_object_mut().unwrap().remove("seccomp");
        assert_eq!(without, before);
    }

    #[test]
    fn podman_profile_is_merged_not_replaced() {
        let mut spec = podman_spec();
        annotate(&mut spec, LIMIT, "256Mi");
        annotate(&mut spec, MODE, "audit");
        let original: LinuxSeccomp = serde_json::from_value(spec["linux"]["seccomp"].clone()).unwrap();
        apply_json(&mut spec, &defaults()).unwrap();
        let merged: LinuxSeccomp = serde_json::from_value(spec["linux"]["seccomp"].clone()).unwrap();
        let mut expected = original.clone();
        let metadata = Some("heapcap.io/limit=256Mi heapcap.io/mode=audit");
        merge_into_with(Counting::Heap, &mut expected, Path::new("/run/x/agent.sock"), metadata, Extra::default())
            .unwrap();
        assert_eq!(merged, expected);
        assert_eq!(merged.default_action(), original.default_action());
        assert!(merged.syscalls().iter().flatten().any(|s| s.action() == LinuxSeccompAction::ScmpActNotify));
    }

    #[test]
    fn env_and_defaults_fill_in_and_annotations_win() {
        let mut d = defaults();
        d.settings = vec![(LIMIT.into(), "128Mi".into()), (MODE.into(), "audit".into())];
        let mut spec = runc_spec();
        let Outcome::Changed { settings, metadata } = apply_json(&mut spec, &d).unwrap() else { panic!() };
        assert_eq!((settings.limits.process, settings.mode), (Some(128 * MIB), Mode::Audit));
        assert_eq!(metadata, "heapcap.io/limit=128Mi heapcap.io/mode=audit");
        assert_eq!(spec["linux"]["seccomp"]["listenerMetadata"], json!(metadata));

        d.env_fallback = true;
        let mut spec = runc_spec();
        spec["process"]["env"] = json!(["PATH=/bin", "HEAPCAP_LIMIT=32Mi", "HEAPCAP_TOTAL_LIMIT=1Gi"]);
        let Outcome::Changed { settings, .. } = apply_json(&mut spec, &d).unwrap() else { panic!() };
        assert_eq!(settings.limits.process, Some(32 * MIB));
        assert_eq!(settings.limits.total, Some(1024 * MIB));

        annotate(&mut spec, LIMIT, "16Mi");
        spec["linux"].as_object_mut().unwrap().remove("seccomp");
        let Outcome::Changed { settings, metadata } = apply_json(&mut spec, &d).unwrap() else { panic!() };
        assert_eq!(settings.limits.process, Some(16 * MIB));
        assert!(metadata.contains("heapcap.io/limit=16Mi"), "{metadata}");
    }

    #[test]
    fn sysinfo_is_sent_where_a_quota_is_enforced_unless_the_host_is_asked_for() {
        let sends_sysinfo = |spec: &Value| {
            let p: LinuxSeccomp = serde_json::from_value(spec["linux"]["seccomp"].clone()).unwrap();
            p.syscalls()
                .iter()
                .flatten()
                .any(|s| s.action() == LinuxSeccompAction::ScmpActNotify && s.names().iter().any(|n| n == "sysinfo"))
        };
        for (pairs, env, sends) in [
            (vec![(LIMIT, "256Mi")], vec![], true),
            (vec![(TOTAL_LIMIT, "1Gi")], vec![], true),
            (vec![(LIMIT, "256Mi"), (MACHINE_MEMORY, "host")], vec![], false),
            (vec![(LIMIT, "256Mi"), (MODE, "audit")], vec![], false),
            (vec![(MACHINE_MEMORY, "quota")], vec![], false),
            (vec![(LIMIT, "256Mi")], vec!["HEAPCAP_MACHINE_MEMORY=host"], false),
        ] {
            for mut spec in [runc_spec(), podman_spec()] {
                for (k, v) in &pairs {
                    annotate(&mut spec, k, v);
                }
                spec["process"]["env"] = json!(env);
                let d = Defaults { env_fallback: true, ..defaults() };
                assert!(matches!(apply_json(&mut spec, &d).unwrap(), Outcome::Changed { .. }));
                assert_eq!(sends_sysinfo(&spec), sends, "{pairs:?} {env:?}");
            }
        }
        let mut spec = runc_spec();
        annotate(&mut spec, MACHINE_MEMORY, "virtual");
        let e = apply_json(&mut spec, &defaults()).unwrap_err().to_string();
        assert!(e.contains("heapcap.io/machine-memory: 'virtual' is not a machine memory: write quota"), "{e}");
    }

    #[test]
    fn bad_values_are_errors_that_name_their_source() {
        let mut spec = runc_spec();
        annotate(&mut spec, LIMIT, "lots");
        let before = spec.clone();
        let e = apply_json(&mut spec, &defaults()).unwrap_err().to_string();
        assert!(e.contains("annotations") && e.contains("'lots' is not a size"), "{e}");
        assert_eq!(spec, before, "untouched on error");

        let mut spec = runc_spec();
        spec["process"]["env"] = json!(["HEAPCAP_MODE=strict"]);
        let d = Defaults { env_fallback: true, ..defaults() };
        let e = apply_json(&mut spec, &d).unwrap_err().to_string();
        assert!(e.contains("HEAPCAP_MODE") && e.contains("enforce or audit"), "{e}");

        let mut spec = runc_spec();
        annotate(&mut spec, "heapcap.io/limits", "64Mi");
        assert!(apply_json(&mut spec, &defaults()).unwrap_err().to_string().contains("unknown setting"));

        let d = Defaults { settings: vec![(LIMIT.into(), "0".into())], ..defaults() };
        let e = apply_json(&mut runc_spec(), &d).unwrap_err().to_string();
        assert!(e.contains("default settings"), "{e}");
    }

    #[test]
    fn a_pods_sandbox_is_never_touched_and_its_containers_are() {
        // containerd copies the pod's annotations to the sandbox (pause) container and to each
        // container; CRI-O marks its sandbox with its own key.
        let d = Defaults { settings: vec![(TOTAL_LIMIT.into(), "1Gi".into())], env_fallback: true, ..defaults() };
        for (key, limit) in
            [("io.kubernetes.cri.container-type", "64Mi"), ("io.kubernetes.cri-o.ContainerType", "lots")]
        {
            let mut spec = runc_spec();
            annotate(&mut spec, key, "sandbox");
            annotate(&mut spec, LIMIT, limit);
            spec["process"]["env"] = json!(["HEAPCAP_MODE=strict"]);
            let before = spec.clone();
            assert_eq!(apply_json(&mut spec, &d).unwrap(), Outcome::Unchanged, "{key}");
            assert_eq!(spec, before, "{key}");
            let mut typed: Spec = serde_json::from_value(before.clone()).unwrap();
            assert_eq!(apply(&mut typed, &d).unwrap(), Outcome::Unchanged, "{key}");

            let mut container = before.clone();
            annotate(&mut container, key, "container");
            container["process"]["env"] = json!([]);
            match limit {
                "64Mi" => assert!(matches!(apply_json(&mut container, &d).unwrap(), Outcome::Changed { .. })),
                _ => assert!(apply_json(&mut container, &d).unwrap_err().to_string().contains("'lots' is not a size")),
            }
        }
    }

    #[test]
    fn unmergeable_profiles_fail_loudly() {
        let mut spec = podman_spec();
        annotate(&mut spec, LIMIT, "64Mi");
        spec["linux"]["seccomp"]["listenerPath"] = json!("/run/other-agent.sock");
        let before = spec.clone();
        assert!(matches!(apply_json(&mut spec, &defaults()), Err(SpecError::Merge(MergeError::HasListener { .. }))));
        assert_eq!(spec, before);
    }

    #[test]
    fn applying_twice_is_a_no_op() {
        let mut spec = podman_spec();
        annotate(&mut spec, LIMIT, "64Mi");
        apply_json(&mut spec, &defaults()).unwrap();
        let once = spec.clone();
        assert_eq!(apply_json(&mut spec, &defaults()).unwrap(), Outcome::Unchanged);
        assert_eq!(spec, once);
    }

    #[test]
    fn typed_spec_gets_the_same_change() {
        let mut json_spec = podman_spec();
        annotate(&mut json_spec, LIMIT, "64Mi");
        let mut typed: Spec = serde_json::from_value(json_spec.clone()).unwrap();
        let a = apply_json(&mut json_spec, &defaults()).unwrap();
        let b = apply(&mut typed, &defaults()).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            serde_json::to_value(typed.linux().as_ref().unwrap().seccomp()).unwrap(),
            json_spec["linux"]["seccomp"]
        );

        let mut bare: Spec = serde_json::from_str(RUNC_SPEC).unwrap();
        bare.set_linux(None);
        let before = bare.clone();
        assert_eq!(apply(&mut bare, &defaults()).unwrap(), Outcome::Unchanged);
        assert_eq!(bare, before);
        let d = Defaults { settings: vec![(LIMIT.into(), "1Gi".into())], ..defaults() };
        assert!(matches!(apply(&mut bare, &d).unwrap(), Outcome::Changed { .. }));
        let linux = serde_json::to_value(bare.linux()).unwrap();
        assert_eq!(linux.as_object().unwrap().keys().collect::<Vec<_>>(), ["seccomp"], "nothing but seccomp added");
    }

    #[test]
    fn strict_gets_the_strict_rules_from_an_annotation_or_the_environment() {
        let names = |v: &Value| -> Vec<String> {
            let entries = v["linux"]["seccomp"]["syscalls"].as_array().cloned().unwrap_or_default();
            entries
                .iter()
                .flat_map(|e| e["names"].as_array().cloned().unwrap_or_default())
                .filter_map(|n| n.as_str().map(str::to_string))
                .collect()
        };
        let mut config = runc_spec();
        config["annotations"] = json!({"heapcap.io/limit": "64Mi", "heapcap.io/strict": "true"});
        let outcome = apply_json(&mut config, &Defaults::default()).unwrap();
        let Outcome::Changed { settings, .. } = outcome else { panic!("changed") };
        assert_eq!(settings.counting, heapcap_policy::ledger::Counting::Strict);
        assert!(names(&config).contains(&"shmat".to_string()), "{:?}", names(&config));
        assert_eq!(config["linux"]["seccomp"]["listenerMetadata"], "heapcap.io/limit=64Mi heapcap.io/strict=true");

        let mut config = runc_spec();
        config["process"]["env"] = json!(["HEAPCAP_LIMIT=64Mi", "HEAPCAP_STRICT=1"]);
        let defaults = Defaults { env_fallback: true, ..Defaults::default() };
        let Outcome::Changed { settings, .. } = apply_json(&mut config, &defaults).unwrap() else { panic!("changed") };
        assert_eq!(settings.counting, heapcap_policy::ledger::Counting::Strict);
        assert!(names(&config).contains(&"shmat".to_string()));

        let mut config = runc_spec();
        config["annotations"] = json!({"heapcap.io/limit": "64Mi"});
        apply_json(&mut config, &Defaults::default()).unwrap();
        assert!(!names(&config).contains(&"shmat".to_string()), "the heap rules by default");

        let mut config = runc_spec();
        config["annotations"] = json!({"heapcap.io/strict": "sometimes"});
        let e = apply_json(&mut config, &Defaults::default()).unwrap_err();
        assert!(
            e.to_string().contains("heapcap.io/strict: 'sometimes' is not a yes or a no: write true or false"),
            "{e}"
        );
    }
}
