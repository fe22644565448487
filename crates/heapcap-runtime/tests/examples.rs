//! The examples under `examples/` for containerd, CRI-O, Docker and Kubernetes say what the shim
//! needs: each is parsed (TOML with `toml`, JSON with `serde_json`; the Kubernetes YAML with
//! line-based checks, as the workspace has no YAML parser) and its fields that matter are checked.
//! Also: the shim's command line and exit status pass through unchanged (a fake runtime here; the
//! real runtimes in `integration/tests/runtime_shim.rs`).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;

const SHIM: &str = "/usr/local/bin/heapcap-runtime";

fn example(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(path);
    fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

fn toml_at<'v>(value: &'v toml::Value, path: &[&str]) -> &'v toml::Value {
    path.iter().fold(value, |v, k| v.get(k).unwrap_or_else(|| panic!("no {k} in {path:?}")))
}

fn check_containerd(file: &str, version: i64, plugin: &str) {
    let config: toml::Value = toml::from_str(&example(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    assert_eq!(config["version"].as_integer(), Some(version), "{file}");
    let rt = toml_at(&config, &["plugins", plugin, "containerd", "runtimes", "heapcap"]);
    assert_eq!(rt["runtime_type"].as_str(), Some("io.containerd.runc.v2"), "{file}");
    let pod_annotations: Vec<_> = rt["pod_annotations"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
    assert_eq!(pod_annotations, ["heapcap.io/*"], "{file}");
    assert_eq!(rt["options"]["BinaryName"].as_str(), Some(SHIM), "{file}");
}

#[test]
fn containerd_snippets_register_the_shim() {
    check_containerd("examples/containerd/config-1.x.toml", 2, "io.containerd.grpc.v1.cri");
    check_containerd("examples/containerd/config-2.x.toml", 3, "io.containerd.cri.v1.runtime");
}

#[test]
fn crio_drop_in_registers_the_shim() {
    let config: toml::Value = toml::from_str(&example("examples/crio/10-heapcap.conf")).unwrap();
    let rt = toml_at(&config, &["crio", "runtime", "runtimes", "heapcap"]);
    assert_eq!(rt["runtime_path"].as_str(), Some(SHIM));
    assert_eq!(rt["runtime_type"].as_str(), Some("oci"));
}

#[test]
fn docker_daemon_json_registers_the_shim() {
    let config: serde_json::Value = serde_json::from_str(&example("examples/docker/daemon.json")).unwrap();
    assert_eq!(config["runtimes"]["heapcap"]["path"], SHIM);
    let readme = example("examples/docker/README.md");
    assert!(readme.contains("--runtime heapcap -e HEAPCAP_LIMIT="), "the Docker way to pass a limit");
}

#[test]
fn podman_readme_shows_runtime() {
    assert!(example("examples/podman/README.md").contains(&format!("podman --runtime {SHIM} run")));
}

/// `key: value` lines of a YAML file, trimmed (list dashes dropped).
fn yaml_pairs(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.trim().trim_start_matches("- ").split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect()
}

fn has(pairs: &[(String, String)], key: &str, value: &str) -> bool {
    pairs.iter().any(|(k, v)| k == key && v == value)
}

#[test]
fn kubernetes_runtime_class_and_pod() {
    let rc = yaml_pairs(&example("examples/kubernetes/runtimeclass.yaml"));
    assert!(has(&rc, "apiVersion", "node.k8s.io/v1") && has(&rc, "kind", "RuntimeClass"));
    assert!(
        has(&rc, "name", "heapcap") && has(&rc, "handler", "heapcap"),
        "handler = the containerd/CRI-O runtime name"
    );
    assert!(has(&rc, "heapcap.io/installed", "true"), "scheduled where the DaemonSet installed heapcap");

    let pod = yaml_pairs(&example("examples/kubernetes/pod.yaml"));
    assert!(has(&pod, "kind", "Pod") && has(&pod, "runtimeClassName", "heapcap"));
    let annotations: Vec<(&str, &str)> =
        pod.iter().filter(|(k, _)| k.starts_with("heapcap.io/")).map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert!(annotations.iter().any(|(k, _)| *k == "heapcap.io/limit"), "{annotations:?}");
    let settings = heapcap_policy::settings::resolve(annotations, None).expect("valid settings");
    assert_eq!(settings.unwrap().limits.process, Some(256 << 20));
}

#[test]
fn kubernetes_daemonset_installs_and_runs_heapcap() {
    let text = example("examples/kubernetes/daemonset.yaml");
    let pairs = yaml_pairs(&text);
    assert!(has(&pairs, "kind", "DaemonSet") && has(&pairs, "hostPID", "true"));
    assert!(has(&pairs, "privileged", "true"));
    for path in ["/usr/local", "/etc/heapcap", "/etc/containers/oci/hooks.d", "/run/heapcap"] {
        assert!(has(&pairs, "path", path), "hostPath {path}");
    }
    assert!(has(&pairs, "mountPath", "/run/heapcap"), "heapcapd's sockets on the host");
    assert!(has(&pairs, "heapcap.io/installed", "true"), "same label as the RuntimeClass");
    for installed in
        ["/host/usr/local/bin/$b", "heapcapd heapcap heapcap-runtime", "/host/etc/containers/oci/hooks.d/heapcap.json"]
    {
        assert!(text.contains(installed), "the install script handles {installed}");
    }
    assert!(text.contains(r#"command: ["/opt/heapcap/bin/heapcapd""#), "runs heapcapd");
    // The holder in its own container: a restart of heapcapd's container must spare it.
    assert!(text.contains(r#"command: ["/opt/heapcap/bin/heapcap-holder", "--stay"]"#), "runs the holder apart");

    // The hooks.d file in the ConfigMap is valid JSON and points where the script puts the hook.
    let hook_line = text.lines().find(|l| l.trim_start().starts_with(r#"{"version""#)).expect("hooks.d JSON");
    let hook: serde_json::Value = serde_json::from_str(hook_line.trim()).expect("hooks.d file is JSON");
    let hook_path = hook["hook"]["path"].as_str().unwrap();
    assert!(text.contains(&format!("/host{hook_path}")), "the script installs {hook_path}");
    assert_eq!(hook["stages"], serde_json::json!(["prestart"]));
    let regex = hook["when"]["annotations"].as_object().unwrap().keys().next().unwrap().clone();
    assert!(regex.starts_with('^') && regex.ends_with('$'), "anchored: {regex}");

    // The runtime.toml in the ConfigMap is what the shim reads.
    let start = text.find("runtime.toml: |").expect("runtime.toml in the ConfigMap");
    let block: String =
        text[start..].lines().skip(1).take_while(|l| l.starts_with("    ")).map(|l| format!("{}\n", &l[4..])).collect();
    check_shim_accepts(&block);
}

/// The shim accepts `config` as its config file: it runs a fake runtime named there.
fn check_shim_accepts(config: &str) {
    let dir = temp("accepts");
    let fake = fake_runtime(&dir);
    let config = format!("runtime = \"{}\"\n{config}", fake.display());
    let path = dir.join("runtime.toml");
    fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_heapcap-runtime"))
        .env("HEAPCAP_RUNTIME_CONFIG", &path)
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn documented_runtime_toml_is_accepted() {
    // Its `runtime = "runc"` is replaced by the fake (the last `runtime` key would be a duplicate).
    let text: String = example("examples/containerd/runtime.toml")
        .lines()
        .filter(|l| !l.starts_with("runtime ="))
        .map(|l| format!("{l}\n"))
        .collect();
    check_shim_accepts(&text);
}

fn temp(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("heapcap-runtime-test-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// A runtime that prints its arguments, one a line, and exits 7.
fn fake_runtime(dir: &Path) -> PathBuf {
    let path = dir.join("fake-runc");
    fs::write(&path, "#!/bin/sh\nprintf '%s\\n' \"$@\"\nexit 7\n").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn arguments_and_exit_status_pass_through() {
    let dir = temp("passthrough");
    let fake = fake_runtime(&dir);
    let config = dir.join("runtime.toml");
    // heapcapd's agent socket: a container that asks for heapcap is created only if it is reachable.
    let agent = dir.join("agent.sock");
    let _listener = UnixListener::bind(&agent).unwrap();
    fs::write(&config, format!("runtime = \"{}\"\nlistener_path = \"{}\"\n", fake.display(), agent.display())).unwrap();
    fs::create_dir_all(dir.join("bundle")).unwrap();
    fs::write(dir.join("bundle/config.json"), "{\"annotations\": {\"heapcap.io/limit\": \"64Mi\"}}").unwrap();
    let bundle = dir.join("bundle").display().to_string();
    for args in [
        vec![
            "--root",
            "/run/x",
            "--log-format",
            "json",
            "create",
            "--bundle",
            bundle.as_str(),
            "--pid-file",
            "p",
            "id",
        ],
        vec!["state", "id"],
        vec!["weird", "--flag=with spaces", "", "-x"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_heapcap-runtime"))
            .env("HEAPCAP_RUNTIME_CONFIG", &config)
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(7), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let printed: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().split_terminator('\n').collect();
        assert_eq!(printed, args);
    }
    let changed: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("bundle/config.json")).unwrap()).unwrap();
    assert_eq!(changed["linux"]["seccomp"]["listenerPath"], agent.display().to_string());
    fs::remove_dir_all(&dir).unwrap();
}

/// With heapcapd not reachable, `create` of a container that asks for heapcap fails before the
/// runtime runs and before config.json is touched, saying how to fix it (stderr and `--log`);
/// `allow_unsupervised` (file or env) runs the runtime on the untouched file, with a warning.
/// The real runtimes: integration/tests/runtime_shim.rs.
#[test]
fn heapcapd_unreachable_fails_create_unless_allowed() {
    let dir = temp("unreachable");
    let fake = fake_runtime(&dir);
    let agent = dir.join("agent.sock");
    let toml = |extra: &str| {
        let path = dir.join(format!("runtime-{}.toml", extra.len()));
        let text = format!("runtime = \"{}\"\nlistener_path = \"{}\"\n{extra}", fake.display(), agent.display());
        fs::write(&path, text).unwrap();
        path
    };
    let bundle = dir.join("bundle");
    fs::create_dir_all(&bundle).unwrap();
    let asks = "{\"annotations\": {\"heapcap.io/limit\": \"64Mi\"}}";
    fs::write(bundle.join("config.json"), asks).unwrap();
    let log = dir.join("log.json");
    let create = |config: &Path, env: &[(&str, &str)]| {
        let _ = fs::remove_file(&log);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_heapcap-runtime"));
        cmd.env("HEAPCAP_RUNTIME_CONFIG", config).env_remove("HEAPCAP_ALLOW_UNSUPERVISED").envs(env.iter().copied());
        cmd.arg("--log").arg(&log).args(["--log-format", "json", "create", "--bundle"]).arg(&bundle).arg("id");
        cmd.output().unwrap()
    };
    let logged = || -> serde_json::Value {
        let text = fs::read_to_string(&log).expect("a --log line");
        serde_json::from_str(text.lines().last().unwrap()).unwrap()
    };
    let untouched = || assert_eq!(fs::read_to_string(bundle.join("config.json")).unwrap(), asks, "config.json changed");

    let strict = toml("");
    let out = create(&strict, &[]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(out.stdout.is_empty(), "the runtime ran: {}", String::from_utf8_lossy(&out.stdout));
    let reachable = format!("heapcapd is not reachable at {}", agent.display());
    for needle in [reachable.as_str(), "start heapcapd", "allow_unsupervised = true", "HEAPCAP_ALLOW_UNSUPERVISED=1"] {
        assert!(said.contains(needle), "no {needle:?} in: {said}");
    }
    assert_eq!(logged()["level"], "error");
    assert!(logged()["msg"].as_str().unwrap().contains(&reachable), "{}", logged());
    untouched();
    // A container that asks for nothing does not need heapcapd.
    fs::write(bundle.join("config.json"), "{}").unwrap();
    assert_eq!(create(&strict, &[]).status.code(), Some(7), "the runtime runs");
    fs::write(bundle.join("config.json"), asks).unwrap();

    for (config, env) in
        [(toml("allow_unsupervised = true\n"), vec![]), (strict.clone(), vec![("HEAPCAP_ALLOW_UNSUPERVISED", "1")])]
    {
        let out = create(&config, &env);
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(7), "{env:?}: the runtime runs: {said}");
        assert!(said.contains("WITHOUT a heap quota") && said.contains(&reachable), "{env:?}: {said}");
        assert_eq!(logged()["level"], "warning");
        untouched();
    }

    // heapcapd back: the container is changed and created.
    let listener = UnixListener::bind(&agent).unwrap();
    let out = create(&strict, &[]);
    assert_eq!(out.status.code(), Some(7), "{}", String::from_utf8_lossy(&out.stderr));
    let changed: serde_json::Value = serde_json::from_slice(&fs::read(bundle.join("config.json")).unwrap()).unwrap();
    assert_eq!(changed["linux"]["seccomp"]["listenerPath"], agent.display().to_string());
    drop(listener);
    // A config.json that already names heapcapd's socket needs heapcapd too, also when allowed.
    let out = create(&toml("allow_unsupervised = true\n"), &[]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("names heapcapd's socket") && said.contains("start heapcapd"), "{said}");
    fs::remove_dir_all(&dir).unwrap();
}
