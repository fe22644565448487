//! Renders the example files under `examples/` at the top of the repository:
//!
//! ```text
//! cargo run -p heapcap-oci --example render -- runc > examples/runc/config.json
//! cargo run -p heapcap-oci --example render -- podman /usr/share/containers/seccomp.json > examples/podman/seccomp.json
//! ```
//!
//! `runc [BASE]` starts from `BASE` (default: `data/runc-1.1.5-spec.json`, what `runc spec`
//! writes), runs `/alloc mmap 4194304 0` without a terminal, sets the annotation
//! `heapcap.io/limit: 64Mi` and puts heapcap's own profile into `linux.seccomp`. `podman PROFILE`
//! merges heapcap into a podman/CRI-O/Docker seccomp profile. Both send the listener to
//! `/run/heapcap/heapcapd.sock`, and `sysinfo` too, so that programs under a quota see it as their
//! machine's memory (heapcapd leaves it to the kernel for a container annotated
//! `heapcap.io/machine-memory: host`). `tests/examples.rs` checks that the committed files are current.

use std::error::Error;
use std::path::Path;
use std::process::ExitCode;

use heapcap_oci::{heapcap_profile_with, ContainersProfile};
use heapcap_policy::ledger::Counting;
use heapcap_policy::rules::Extra;
use oci_spec::runtime::Spec;
use serde::Serialize;
use serde_json::Value;

/// Where the runtime sends the listener: heapcapd's default agent socket.
pub const LISTENER: &str = heapcap_env::paths::AGENT_SOCKET;
/// `runc spec` of runc 1.1.5.
pub const RUNC_SPEC: &str = include_str!("../data/runc-1.1.5-spec.json");
/// The example's limit, as the annotation carries it.
pub const LIMIT: &str = "64Mi";
/// The example container's command: one 4 MiB anonymous mapping after another until one fails.
pub const ARGS: [&str; 4] = ["/alloc", "mmap", "4194304", "0"];

/// JSON the way runc and podman write theirs: tab-indented, with a final newline.
fn to_json(value: &impl Serialize) -> Result<String, Box<dyn Error>> {
    let mut out = Vec::new();
    let mut ser =
        serde_json::Serializer::with_formatter(&mut out, serde_json::ser::PrettyFormatter::with_indent(b"\t"));
    value.serialize(&mut ser)?;
    out.push(b'\n');
    Ok(String::from_utf8(out)?)
}

/// The runc/crun example bundle's config.json, from the `runc spec` output `base`.
pub fn runc_config(base: &str) -> Result<String, Box<dyn Error>> {
    let mut spec: Spec = serde_json::from_str(base).map_err(|e| format!("the base config is not an OCI spec: {e}"))?;
    let process = spec.process_mut().as_mut().ok_or("the base config has no process")?;
    process.set_args(Some(ARGS.map(String::from).to_vec()));
    process.set_terminal(Some(false));
    spec.set_annotations(Some([("heapcap.io/limit".to_string(), LIMIT.to_string())].into()));
    let linux = spec.linux_mut().as_mut().ok_or("the base config has no linux section")?;
    linux.set_seccomp(Some(heapcap_profile_with(Counting::Heap, Path::new(LISTENER), None, Extra { machine: true })));
    // oci-spec keeps capabilities in hash sets: sort them (and, through `Value`, every key) so
    // that the output is the same on every run.
    let mut value = serde_json::to_value(&spec)?;
    if let Some(sets) = value.pointer_mut("/process/capabilities").and_then(Value::as_object_mut) {
        for set in sets.values_mut().filter_map(Value::as_array_mut) {
            set.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
        }
    }
    to_json(&value)
}

/// A podman/CRI-O/Docker seccomp profile with heapcap merged in.
pub fn podman_profile(original: &str) -> Result<String, Box<dyn Error>> {
    let mut profile: ContainersProfile =
        serde_json::from_str(original).map_err(|e| format!("not a containers seccomp profile: {e}"))?;
    profile.merge_with(Counting::Heap, Path::new(LISTENER), None, Extra { machine: true })?;
    to_json(&profile)
}

fn read(path: &str) -> Result<String, Box<dyn Error>> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}").into())
}

fn run(args: &[String]) -> Result<String, Box<dyn Error>> {
    match args {
        [kind] if kind == "runc" => runc_config(RUNC_SPEC),
        [kind, base] if kind == "runc" => runc_config(&read(base)?).map_err(|e| format!("{base}: {e}").into()),
        [kind, profile] if kind == "podman" => {
            podman_profile(&read(profile)?).map_err(|e| format!("{profile}: {e}").into())
        }
        _ => Err("usage: render runc [BASE_CONFIG] | render podman SECCOMP_PROFILE".into()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("render: {e}");
            ExitCode::FAILURE
        }
    }
}
