//! `examples/kubernetes/daemonset.yaml` run for real: the image `scripts/image.sh` builds, loaded
//! into the node's containerd with no registry; the DaemonSet's pod run through the CRI as kubelet
//! runs it (hostPID, privileged, its hostPath volumes pointed at a temporary host root, its
//! ConfigMap written as kubelet writes a configMap volume); the install container's work checked,
//! twice (kubelet runs init containers again whenever the pod restarts); heapcapd run from the image
//! as the DaemonSet's main container; and a pod under the handler `heapcap` whose runc binary is
//! the heapcap-runtime the install put on the host root, held at its quota by that heapcapd.
//!
//! What differs from a cluster, and why: the pod runs on the host's network (no CNI here), so
//! heapcapd's `--metrics-addr 0.0.0.0:9464` becomes a free port on 127.0.0.1; the host root is a
//! temporary directory, so the installed heapcap-runtime is given a copy of the installed
//! runtime.toml whose `listener_path` is under it.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use heapcap_integration::fixture::{assert_at_quota, parse_allocated, MIB};
use heapcap_integration::process::{run_captured, show, stdout};
use k8s_cri::v1::{Mount, MountPropagation};
use serde_json::Value;

use crate::kubelet::{ContainerSpec, Node, Pod, PodSpec};
use crate::manifests::{self, Volume};
use crate::{container, handler, pod, test_image, WAIT};

const DAEMONSET: &str = "daemonset.yaml";

/// `scripts/image.sh --out FILE`, as a user runs it: (the archive, the image's name).
fn build_image(dir: &Path) -> (PathBuf, String) {
    let archive = dir.join("heapcap-image.tar");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/image.sh");
    let mut cmd = Command::new(&script);
    cmd.arg("--out").arg(&archive);
    let started = Instant::now();
    // A release build from scratch on a busy 2-CPU machine.
    let out = run_captured(cmd, Duration::from_secs(1200));
    assert!(out.status.success(), "scripts/image.sh: {}", show(&out));
    assert_eq!(stdout(&out).trim(), archive.display().to_string(), "image.sh prints the archive's path");
    eprintln!("scripts/image.sh took {:.1} s", started.elapsed().as_secs_f64());
    let index: Value = serde_json::from_slice(&untar(&archive, "index.json")).expect("index.json");
    let name = index["manifests"][0]["annotations"]["io.containerd.image.name"].as_str().expect("a name").to_string();
    (archive, name)
}

/// One file of a tar archive.
fn untar(archive: &Path, member: &str) -> Vec<u8> {
    let out = Command::new("tar").arg("-xOf").arg(archive).arg(member).output().expect("tar");
    assert!(out.status.success(), "{member} in {}: {}", archive.display(), show(&out));
    out.stdout
}

/// The image's root filesystem, unpacked from its one layer (named by the docker-save manifest).
fn unpack(archive: &Path, into: &Path) {
    let manifest: Value = serde_json::from_slice(&untar(archive, "manifest.json")).expect("manifest.json");
    let layers = manifest[0]["Layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "one layer: {manifest}");
    fs::create_dir_all(into).unwrap();
    let layer = untar(archive, layers[0].as_str().unwrap());
    let tgz = into.with_extension("layer.tgz");
    fs::write(&tgz, layer).unwrap();
    let out = Command::new("tar").arg("-xzf").arg(&tgz).arg("-C").arg(into).output().expect("tar");
    assert!(out.status.success(), "unpacking the layer: {}", show(&out));
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// The DaemonSet's pod spec on this node: its containers' specs with the volumes resolved under
/// `host_root` (hostPath) and `config_dir` (configMap).
struct DaemonPod {
    spec: PodSpec,
    init: ContainerSpec,
    main: ContainerSpec,
}

fn daemon_pod(host_root: &Path, config_dir: &Path, metrics: &str) -> DaemonPod {
    let ds = manifests::document(DAEMONSET, "DaemonSet");
    let template = &ds["spec"]["template"]["spec"];
    assert!(template["runtimeClassName"].is_badvalue(), "heapcapd runs under the node's default runtime");
    let volumes = manifests::volumes(template);
    let mounts = |c: &manifests::Container| -> Vec<Mount> {
        c.mounts
            .iter()
            .map(|(name, at, propagation)| {
                let volume = &volumes.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no volume {name}")).1;
                let (host, readonly) = match volume {
                    Volume::HostPath { path, kind } => {
                        let host = host_root.join(path.trim_start_matches('/'));
                        match kind.as_deref() {
                            Some("DirectoryOrCreate") => {
                                fs::create_dir_all(&host).unwrap();
                                fs::set_permissions(&host, fs::Permissions::from_mode(0o755)).unwrap();
                            }
                            other => panic!("hostPath type {other:?} is not translated here"),
                        }
                        (host, false)
                    }
                    Volume::ConfigMap { name } => {
                        let dir = config_dir.join(name);
                        fs::create_dir_all(&dir).unwrap();
                        for (file, text) in manifests::config_map(DAEMONSET, name) {
                            fs::write(dir.join(file), text).unwrap();
                        }
                        // kubelet mounts configMap volumes read-only.
                        (dir, true)
                    }
                };
                let propagation = match propagation.as_deref() {
                    None | Some("None") => MountPropagation::PropagationPrivate,
                    Some("HostToContainer") => MountPropagation::PropagationHostToContainer,
                    Some("Bidirectional") => MountPropagation::PropagationBidirectional,
                    Some(other) => panic!("mountPropagation {other}"),
                };
                Mount {
                    container_path: at.clone(),
                    host_path: host.display().to_string(),
                    readonly,
                    propagation: propagation as i32,
                    ..Default::default()
                }
            })
            .collect()
    };
    let spec_of = |c: &manifests::Container| ContainerSpec {
        name: c.name.clone(),
        image: c.image.clone(),
        command: c.command.clone(),
        args: c.args.clone(),
        mounts: mounts(c),
        privileged: c.privileged,
        ..Default::default()
    };
    let init = manifests::container(&template["initContainers"][0]);
    let main = manifests::container(&template["containers"][0]);
    let mut main_spec = spec_of(&main);
    // The host's network here: a private port instead of 0.0.0.0:9464.
    let at =
        main_spec.command.iter().position(|a| a == "0.0.0.0:9464").expect("heapcapd's --metrics-addr 0.0.0.0:9464");
    main_spec.command[at] = metrics.to_string();
    DaemonPod {
        spec: PodSpec {
            namespace: manifests::string(&ds["metadata"]["namespace"], "metadata.namespace"),
            name: manifests::string(&ds["metadata"]["name"], "metadata.name"),
            host_pid: template["hostPID"].as_bool() == Some(true),
            privileged: init.privileged || main.privileged,
            ..Default::default()
        },
        init: spec_of(&init),
        main: main_spec,
    }
}

/// Run the install container (the `attempt`-th time) to its end; it must succeed.
fn install(node: &Node, pod: &Pod, spec: &ContainerSpec, attempt: u32) {
    let spec = ContainerSpec { attempt, ..spec.clone() };
    let id = node.run(pod, &spec);
    let status = node.wait_exited(&id, WAIT);
    let (out, err) = node.logs(&status);
    assert_eq!(status.exit_code, 0, "the install container failed: {status:?}\nstdout: {out}\nstderr: {err}");
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o7777
}

/// What the install container must leave on the host root.
fn check_installed(root: &Path, image_root: &Path) {
    let bin = image_root.join("opt/heapcap/bin");
    for (name, at) in [
        ("heapcapd", "usr/local/bin/heapcapd"),
        ("heapcap", "usr/local/bin/heapcap"),
        ("heapcap-runtime", "usr/local/bin/heapcap-runtime"),
        ("heapcap-hook", "usr/local/libexec/heapcap/heapcap-hook"),
    ] {
        let installed = root.join(at);
        assert_eq!(fs::read(&installed).ok(), fs::read(bin.join(name)).ok(), "{at} is the image's {name}");
        assert_eq!(mode(&installed), 0o755, "{at}");
    }
    let configs = manifests::config_map(DAEMONSET, "heapcap-node-files");
    let file = |name: &str| configs.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap();
    let hooks_d = root.join("etc/containers/oci/hooks.d/heapcap.json");
    assert_eq!(fs::read_to_string(&hooks_d).ok(), Some(file("heapcap.json")));
    let hook: Value = serde_json::from_str(&file("heapcap.json")).expect("the hooks.d file is JSON");
    let hook_path = hook["hook"]["path"].as_str().unwrap();
    assert!(root.join(hook_path.trim_start_matches('/')).is_file(), "the hooks.d file names the installed hook");
    assert_eq!(mode(&hooks_d), 0o644);
    assert_eq!(mode(&root.join("run/heapcap")), 0o700, "heapcapd's socket directory is root-only");
    let mut leftovers = Vec::new();
    for dir in ["usr/local/bin", "usr/local/libexec/heapcap", "etc/heapcap", "etc/containers/oci/hooks.d"] {
        for entry in fs::read_dir(root.join(dir)).unwrap().flatten() {
            if entry.file_name().to_string_lossy().ends_with(".new") {
                leftovers.push(entry.path());
            }
        }
    }
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

/// Holders started by a heapcapd run from the image (their executable's path is the image's).
fn image_holders() -> Vec<u32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let exe = fs::read_link(e.path().join("exe")).ok()?;
            (exe == Path::new("/opt/heapcap/bin/heapcap-holder")).then_some(pid)
        })
        .collect()
}

/// The test's directory (the host root, the image, the archive), removed when dropped unless
/// `HEAPCAP_TEST_KEEP` is set.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("HEAPCAP_TEST_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
fn the_daemonset_installs_heapcap_from_its_image_and_runs_heapcapd() {
    let scratch = Scratch(PathBuf::from(format!("/tmp/hc-ds-{}", std::process::id())));
    let dir = scratch.0.clone();
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let (archive, image) = build_image(&dir);
    let root = dir.join("host");
    let image_root = dir.join("image");
    unpack(&archive, &image_root);

    // The node: the `heapcap` handler runs the heapcap-runtime the DaemonSet installs.
    let shim = root.join("usr/local/bin/heapcap-runtime");
    let shim_config = dir.join("runtime-test.toml");
    let node = Node::start(&shim, &test_image().1, &[("HEAPCAP_RUNTIME_CONFIG", &shim_config)]);
    node.import(&test_image().0, &test_image().1);
    node.import(&archive, &image);

    let metrics = format!("127.0.0.1:{}", free_port());
    let ds = daemon_pod(&root, &dir.join("configmaps"), &metrics);
    assert_eq!(
        (ds.init.image.as_str(), ds.main.image.as_str()),
        (image.as_str(), image.as_str()),
        "the DaemonSet runs image.sh's image"
    );
    let p = node.run_pod(&ds.spec).unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", node.log()));

    install(&node, &p, &ds.init, 0);
    check_installed(&root, &image_root);
    let version = Command::new(root.join("usr/local/bin/heapcapd")).arg("--version").output().unwrap();
    assert!(stdout(&version).starts_with("heapcapd "), "the installed heapcapd runs on the host: {}", show(&version));
    // The pod restarts: the init container runs again, replaces the binaries, keeps a runtime.toml
    // the node's admin changed.
    let runtime_toml = root.join("etc/heapcap/runtime.toml");
    let mut edited = fs::read_to_string(&runtime_toml).unwrap();
    edited.push_str("# changed by the node's admin\n");
    fs::write(&runtime_toml, &edited).unwrap();
    install(&node, &p, &ds.init, 1);
    check_installed(&root, &image_root);
    assert_eq!(fs::read_to_string(&runtime_toml).unwrap(), edited, "an existing runtime.toml is kept");

    // heapcapd from the image, as the DaemonSet's main container.
    let heapcapd = node.run(&p, &ds.main);
    let control = root.join("run/heapcap/control.sock");
    let deadline = Instant::now() + WAIT;
    while UnixStream::connect(&control).is_err() {
        let status = node.status(&heapcapd);
        let (out, err) = node.logs(&status);
        let running = status.state == k8s_cri::v1::ContainerState::ContainerRunning as i32;
        assert!(Instant::now() < deadline && running, "heapcapd did not come up: {status:?}\n{out}{err}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let heapcap = |args: &[&str]| {
        let mut cmd = Command::new(root.join("usr/local/bin/heapcap"));
        cmd.args(args).env("HEAPCAP_CONTROL_SOCKET", &control);
        run_captured(cmd, Duration::from_secs(30))
    };
    assert_eq!(stdout(&heapcap(&["ps"])).trim(), "no containers under heapcap");

    // A pod under the installed shim, reporting to that heapcapd (the installed runtime.toml's
    // socket, under the temporary host root).
    let installed = fs::read_to_string(&runtime_toml).unwrap();
    assert!(installed.contains("listener_path = \"/run/heapcap/heapcapd.sock\""), "{installed}");
    let agent = root.join("run/heapcap/heapcapd.sock");
    fs::write(&shim_config, installed.replace("/run/heapcap/heapcapd.sock", &agent.display().to_string())).unwrap();
    let work = node.run_pod(&pod("default", "work", &[("heapcap.io/limit", "64Mi")])).expect("RunPodSandbox");
    assert_eq!(handler(), "heapcap");
    let id = node.run(&work, &container("app", "/alloc mmap 4194304 0; exec sleep 600"));
    let out = node.wait_for_output(&id, "allocated=", WAIT);
    let (allocated, result) = parse_allocated(&out);
    let logs = node.logs(&node.status(&heapcapd));
    assert_at_quota(&format!("under the DaemonSet's heapcapd: {out}\n{logs:?}"), allocated, &result, 64 * MIB, 4 * MIB);
    let table = stdout(&heapcap(&["ps"]));
    assert!(table.contains("default/work/app") && table.contains(&id[..12]), "{table}");
    let mut scrape = std::net::TcpStream::connect(&metrics).expect("heapcapd's metrics");
    std::io::Write::write_all(&mut scrape, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    std::io::Read::read_to_string(&mut scrape, &mut body).unwrap();
    assert!(
        body.contains(&format!("container=\"{id}\",namespace=\"default\",pod=\"work\",container_name=\"app\"")),
        "{body}"
    );

    // The pod goes away (a DaemonSet update, the node drained): heapcapd and its holder with it.
    let holders = image_holders();
    assert_eq!(holders.len(), 1, "heapcapd started its holder from the image: {holders:?}");
    node.remove_pod(&work.id);
    node.remove_pod(&p.id);
    drop(node);
    let left: Vec<u32> = image_holders().into_iter().filter(|p| holders.contains(p)).collect();
    for pid in &left {
        let _ = Command::new("kill").arg(pid.to_string()).status();
    }
    assert!(left.is_empty(), "the holder outlived its pod: {left:?}");
}
