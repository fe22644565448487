//! Kubernetes end to end, without kubelet: a private containerd 1.6 driven through the CRI exactly
//! as kubelet drives it ([`kubelet`]), with the `heapcap` runtime handler of
//! `examples/containerd/config-1.x.toml` (heapcap-runtime as runc's binary, `pod_annotations =
//! ["heapcap.io/*"]`) and a real heapcapd:
//!
//! - `examples/kubernetes/pod.yaml` as it is (its annotations, RuntimeClass, command and memory
//!   limit; only its image is this test's, with the host's /usr for python3): `MemoryError`;
//! - an annotated pod held at its quota, in its container and under ExecSync, and named by
//!   namespace, pod and container in `heapcap ps`, the events and the metrics; its sandbox (pause)
//!   container untouched and never under heapcapd;
//! - an unannotated pod: both its config.json files byte for byte as containerd wrote them;
//! - `seccompProfile: RuntimeDefault`: containerd's profile kept, heapcap's rules merged in;
//! - a bad annotation: the pod's sandbox runs, the container fails to start with the reason, in
//!   the message kubelet turns into the container's event;
//! - heapcapd killed and restarted mid-pod: the pod's container still held, still named;
//! - `examples/kubernetes/daemonset.yaml`: the image of `scripts/image.sh` loaded, the install
//!   container run with its hostPath volumes pointed at a temporary host root, what it installed
//!   checked, heapcapd run from the image as the DaemonSet runs it, and a pod under the installed
//!   shim held at its quota by that heapcapd.

mod kubelet;
mod manifests;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use heapcap_integration::binaries;
use heapcap_integration::daemon::Daemon;
use heapcap_integration::fixture::{assert_at_quota, parse_allocated, MIB};
use heapcap_integration::podman;
use heapcap_integration::process::{run_captured, show, stdout, TIMEOUT};
use heapcap_integration::rootfs::host_system_mounts;
use k8s_cri::v1::Mount;
use serde_json::Value;

use kubelet::{ContainerSpec, Node, Pod, PodSpec};

const WAIT: Duration = Duration::from_secs(120);

/// The RuntimeClass's handler (`examples/kubernetes/runtimeclass.yaml`), which is the name of the
/// runtime in the containerd example.
fn handler() -> String {
    manifests::string(&manifests::document("runtimeclass.yaml", "RuntimeClass")["handler"], "handler")
}

/// The image of every test pod and of the pods' sandboxes: the harness's root filesystem (busybox,
/// `/alloc`) with a command that sleeps (the pause container's), saved as an archive for
/// `ctr images import`. Made once per test process.
fn test_image() -> &'static (PathBuf, String) {
    static IMAGE: OnceLock<(PathBuf, String)> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let base = podman::image();
        let tag = base.rsplit(':').next().expect("a tagged image");
        let name = format!("localhost/heapcap-cri:{tag}");
        // Named after the content (the harness image's tag): made once, kept for the next run.
        let archive = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cri-image-{tag}.tar"));
        if archive.is_file() {
            return (archive, name);
        }
        let holder = format!("hc-cri-image-{}", std::process::id());
        let podman = |args: &[&str]| {
            let mut cmd = podman::command();
            cmd.args(args);
            let out = run_captured(cmd, TIMEOUT);
            assert!(out.status.success(), "podman {args:?}: {}", show(&out));
        };
        let _ = podman::command().args(["rm", "-f", &holder]).output();
        podman(&["create", "--name", &holder, base, "true"]);
        podman(&["commit", "-q", "--change", r#"CMD ["/bin/sleep", "2147483647"]"#, &holder, &name]);
        podman(&["rm", &holder]);
        let partial = archive.with_extension(format!("{}.tmp", std::process::id()));
        let _ = fs::remove_file(&partial);
        podman(&["save", "-q", "--format", "docker-archive", "-o", partial.to_str().unwrap(), &name]);
        podman(&["rmi", &name]);
        fs::rename(&partial, &archive).unwrap();
        (archive, name)
    })
}

/// A node whose `heapcap` handler runs heapcap-runtime reporting to `daemon`, through a wrapper
/// that first keeps the config.json containerd wrote as `config.json.containerd` beside it.
fn node(daemon: &Daemon) -> Node {
    let config = daemon.dir.join("runtime.toml");
    fs::write(&config, format!("listener_path = \"{}\"\n", daemon.agent.display())).unwrap();
    let wrapper = daemon.dir.join("heapcap-runtime.sh");
    let script = format!(
        "#!/bin/sh\n\
         # What containerd wrote, before heapcap-runtime sees it.\n\
         prev=\n\
         for a in \"$@\"; do [ \"$prev\" = --bundle ] && cp \"$a/config.json\" \"$a/config.json.containerd\"; prev=$a; done\n\
         exec {} \"$@\"\n",
        binaries::binary("heapcap-runtime").display()
    );
    fs::write(&wrapper, script).unwrap();
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
    let (archive, image) = test_image();
    let node = Node::start(&wrapper, image, &[("HEAPCAP_RUNTIME_CONFIG", &config)]);
    node.import(archive, image);
    node
}

fn pod(namespace: &str, name: &str, annotations: &[(&str, &str)]) -> PodSpec {
    PodSpec {
        namespace: namespace.into(),
        name: name.into(),
        annotations: annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        handler: handler(),
        ..Default::default()
    }
}

fn container(name: &str, script: &str) -> ContainerSpec {
    ContainerSpec {
        name: name.into(),
        image: test_image().1.clone(),
        command: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

/// The config.json the runtime ran a container with, and the one containerd wrote.
fn configs(node: &Node, id: &str) -> (Vec<u8>, Vec<u8>) {
    let bundle = node.bundle(id);
    let read = |f: &str| fs::read(bundle.join(f)).unwrap_or_else(|e| panic!("{}/{f}: {e}", bundle.display()));
    (read("config.json"), read("config.json.containerd"))
}

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).expect("config.json is JSON")
}

fn ps_containers(daemon: &Daemon) -> Vec<Value> {
    daemon.ps()["containers"].as_array().cloned().unwrap_or_default()
}

#[test]
fn the_pod_example_is_held_to_its_annotation() {
    let d = Daemon::start();
    let node = node(&d);
    let example = manifests::document("pod.yaml", "Pod");
    let class = manifests::document("runtimeclass.yaml", "RuntimeClass");
    assert_eq!(example["spec"]["runtimeClassName"], class["metadata"]["name"], "pod.yaml names runtimeclass.yaml");
    let spec = PodSpec {
        namespace: example["metadata"]["namespace"].as_str().unwrap_or("default").into(),
        name: manifests::string(&example["metadata"]["name"], "metadata.name"),
        annotations: manifests::annotations(&example),
        handler: handler(),
        ..Default::default()
    };
    let app = manifests::container(&example["spec"]["containers"][0]);
    let mounts = host_system_mounts()
        .into_iter()
        .map(|(host, at)| Mount {
            container_path: at,
            host_path: host.display().to_string(),
            readonly: true,
            ..Default::default()
        })
        .collect();
    let c = ContainerSpec {
        name: app.name.clone(),
        // python:3.12-slim cannot be pulled here: the test image, with the host's python3.
        image: test_image().1.clone(),
        command: app.command.clone(),
        mounts,
        memory_limit: manifests::quantity(app.memory_limit.as_deref().expect("pod.yaml sets a memory limit")),
        ..Default::default()
    };
    let p = node.run_pod(&spec).unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", node.log()));
    let id = node.run(&p, &c);
    let status = node.wait_exited(&id, WAIT);
    let (out, err) = node.logs(&status);
    assert_eq!(status.exit_code, 1, "python3 exits 1 on MemoryError: {status:?}\n{out}\n{err}\nheapcapd:\n{}", d.log());
    assert!(err.contains("MemoryError"), "what kubectl logs shows: {err}");
    // The sandbox got the pod's annotations too, and was left alone.
    let (ran, wrote) = configs(&node, &p.id);
    assert_eq!(json(&wrote)["annotations"]["heapcap.io/limit"], "256Mi", "containerd copied the pod annotation");
    assert_eq!(ran, wrote, "the sandbox's config.json is containerd's, byte for byte");
    assert!(!d.log().contains(&p.id), "heapcapd never heard of the sandbox:\n{}", d.log());
}

#[test]
fn an_annotated_pod_is_held_and_named_and_its_sandbox_left_alone() {
    let d = Daemon::start();
    let node = node(&d);
    let p = node.run_pod(&pod("team-a", "leaky", &[("heapcap.io/limit", "64Mi")])).expect("RunPodSandbox");
    let id = node.run(&p, &container("app", "/alloc mmap 4194304 0; exec sleep 600"));
    let out = node.wait_for_output(&id, "allocated=", WAIT);
    let (allocated, result) = parse_allocated(&out);
    assert_at_quota(&format!("pod container: {out}\n{}", d.log()), allocated, &result, 64 * MIB, 4 * MIB);

    // ExecSync (exec probes, kubectl exec): under the same quota.
    let exec = node.exec_sync(&id, &["/alloc", "mmap", "4194304", "0"]);
    let text = String::from_utf8_lossy(&exec.stdout).into_owned();
    let (allocated, result) = parse_allocated(&text);
    assert_at_quota(&format!("ExecSync: {text}"), allocated, &result, 64 * MIB, 4 * MIB);

    // heapcap ps: the container, by its CRI id and its Kubernetes names; never the sandbox.
    let containers = ps_containers(&d);
    assert_eq!(containers.len(), 1, "only the pod's container, not its sandbox: {containers:?}");
    assert_eq!(containers[0]["id"], id.as_str());
    assert_eq!(containers[0]["pod"], serde_json::json!({"namespace": "team-a", "name": "leaky", "container": "app"}));
    let table = stdout(&d.heapcap(&["ps"]));
    assert!(table.contains("team-a/leaky/app") && table.contains(&id[..12]), "{table}");

    // The events: the denials, named (the JSON and the line `heapcap events` prints).
    let events = stdout(&d.heapcap(&["events", "--json"]));
    let first: Value = serde_json::from_str(events.lines().next().expect("a denial event")).unwrap();
    assert_eq!((first["container"].as_str(), first["pod"]["name"].as_str()), (Some(id.as_str()), Some("leaky")));
    assert_eq!(first["pod"]["container"], "app");
    let lines = stdout(&d.heapcap(&["events"]));
    assert!(lines.lines().all(|l| l.contains(&format!("{id} team-a/leaky/app mmap of 4.0 MiB denied"))), "{lines}");

    // The metrics: the container's heap, labelled with its names.
    let labels = format!(
        "heapcap_container_heap_bytes{{container=\"{id}\",namespace=\"team-a\",pod=\"leaky\",container_name=\"app\"}}"
    );
    let metrics = d.metrics();
    assert!(metrics.lines().any(|l| l.starts_with(&labels)), "no {labels} in\n{metrics}");

    // What the runtime got: the sandbox's config.json untouched, the container's changed.
    let (ran, wrote) = configs(&node, &p.id);
    assert_eq!(json(&wrote)["annotations"]["io.kubernetes.cri.container-type"], "sandbox");
    assert_eq!(json(&wrote)["annotations"]["heapcap.io/limit"], "64Mi");
    assert_eq!(ran, wrote, "the sandbox's config.json is containerd's, byte for byte");
    let (ran, wrote) = configs(&node, &id);
    assert_ne!(ran, wrote);
    assert_eq!(json(&ran)["linux"]["seccomp"]["listenerPath"], d.agent.display().to_string());
}

#[test]
fn an_unannotated_pod_is_untouched() {
    let d = Daemon::start();
    let node = node(&d);
    let p = node.run_pod(&pod("default", "free", &[])).expect("RunPodSandbox");
    let id = node.run(&p, &container("app", "/alloc mmap 4194304 419430400; exec sleep 600"));
    let out = node.wait_for_output(&id, "allocated=", WAIT);
    assert_eq!(parse_allocated(&out), (400 * MIB, "ok".to_string()), "no quota: {out}");
    for which in [&p.id, &id] {
        let (ran, wrote) = configs(&node, which);
        assert_eq!(ran, wrote, "{which}: config.json as containerd wrote it, byte for byte");
    }
    assert!(ps_containers(&d).is_empty(), "heapcapd never heard of it");
}

#[test]
fn runtime_default_seccomp_is_kept_and_heapcaps_rules_merged_in() {
    let d = Daemon::start();
    let node = node(&d);
    let p = node.run_pod(&pod("default", "confined", &[("heapcap.io/limit", "32Mi")])).expect("RunPodSandbox");
    // containerd's default profile refuses unshare(2) without CAP_SYS_ADMIN; unconfined, it works.
    let probe = "unshare -U true 2>/dev/null; echo unshare=$?; /alloc mmap 4194304 0; exec sleep 600";
    let mut confined = container("confined", probe);
    confined.seccomp_runtime_default = true;
    let id = node.run(&p, &confined);
    let out = node.wait_for_output(&id, "allocated=", WAIT);
    assert!(out.contains("unshare=1"), "RuntimeDefault still refuses unshare: {out}");
    let (allocated, result) = parse_allocated(&out);
    assert_at_quota(&format!("RuntimeDefault: {out}"), allocated, &result, 32 * MIB, 4 * MIB);
    let unconfined = node.run(&p, &container("unconfined", probe));
    let out = node.wait_for_output(&unconfined, "allocated=", WAIT);
    assert!(out.contains("unshare=0"), "unconfined, unshare works (so the probe means something): {out}");

    let (ran, wrote) = configs(&node, &id);
    let (ran, wrote) = (json(&ran)["linux"]["seccomp"].clone(), json(&wrote)["linux"]["seccomp"].clone());
    assert_eq!(ran["defaultAction"], wrote["defaultAction"], "containerd's default action kept");
    assert_eq!(wrote["defaultAction"], "SCMP_ACT_ERRNO");
    assert!(ran["syscalls"].as_array().unwrap().len() > wrote["syscalls"].as_array().unwrap().len());
    assert_eq!(ran["listenerPath"], d.agent.display().to_string());
}

#[test]
fn a_bad_annotation_fails_the_container_and_not_the_pod() {
    let d = Daemon::start();
    let node = node(&d);
    let p = node.run_pod(&pod("default", "typo", &[("heapcap.io/limit", "lots")]));
    let p: Pod = p.unwrap_or_else(|e| panic!("the sandbox of a pod with a bad heapcap annotation runs: {e}"));
    assert!(node.pod_ready(&p), "the pod's sandbox is ready");
    // containerd 1.6 runs the runtime's `create` at StartContainer.
    let id = node.create(&p, &container("app", "echo started")).expect("CreateContainer");
    let status = node.start_container(&id).expect_err("StartContainer must fail");
    // kubelet records it as the container's event: reason Failed, message "Error: " + this.
    let event = format!("Error: {}", status.message());
    let why = "heapcap: bad setting in the container's annotations: heapcap.io/limit: 'lots' is not a size";
    assert!(event.contains(why), "kubectl describe pod shows: {event}");
    assert!(node.pod_ready(&p), "the sandbox still runs: only the container failed");
    assert!(ps_containers(&d).is_empty(), "nothing under heapcapd");
}

#[test]
fn heapcapd_restarted_mid_pod_still_holds_and_names_it() {
    let mut d = Daemon::start();
    let node = node(&d);
    let p = node.run_pod(&pod("team-b", "steady", &[("heapcap.io/limit", "64Mi")])).expect("RunPodSandbox");
    let script = "/alloc mmap 4194304 33554432; while [ ! -e /tmp/go ]; do sleep 0.05; done; \
                  /alloc mmap 4194304 0; exec sleep 600";
    let id = node.run(&p, &container("app", script));
    let out = node.wait_for_output(&id, "allocated=", WAIT);
    assert_eq!(parse_allocated(&out), (32 * MIB, "ok".to_string()), "{out}");
    d.kill9();
    d.restart(None);
    let containers = ps_containers(&d);
    assert_eq!(containers.len(), 1, "taken back from the holder: {containers:?}\n{}", d.log());
    assert_eq!(containers[0]["pod"]["name"], "steady", "its names survive the restart");
    assert_eq!(containers[0]["limit"], 64 * MIB);
    let exec = node.exec_sync(&id, &["touch", "/tmp/go"]);
    assert_eq!(exec.exit_code, 0, "{exec:?}");
    let deadline = std::time::Instant::now() + WAIT;
    let out = loop {
        let (out, _) = node.logs(&node.status(&id));
        if out.lines().filter(|l| l.starts_with("allocated=")).count() == 2 {
            break out;
        }
        assert!(std::time::Instant::now() < deadline, "the second allocation never ended: {out}\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    let (allocated, result) = parse_allocated(out.lines().filter(|l| l.starts_with("allocated=")).nth(1).unwrap());
    assert_at_quota(&format!("after the restart: {out}\n{}", d.log()), allocated, &result, 64 * MIB, 4 * MIB);
}

// ------------------------------------------------------------------ the DaemonSet

mod daemonset;
