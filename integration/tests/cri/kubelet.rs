//! A node for the CRI tests: a private containerd 1.6 with its CRI plugin (its own root, state,
//! sockets, `opt` and CNI directories, and cgroup parent), driven through the CRI's gRPC API
//! (`runtime.v1` from the `k8s-cri` crate, tonic over containerd's Unix socket) with the calls
//! kubelet makes for a pod: RunPodSandbox with the RuntimeClass's handler and the pod's
//! annotations, CreateContainer (with the sandbox config again) and StartContainer,
//! ContainerStatus, the CRI log file, ExecSync, and StopPodSandbox/RemovePodSandbox.
//!
//! The `heapcap` runtime handler is the one in `examples/containerd/config-1.x.toml`, read from
//! there, with two options changed for this machine: `BinaryName` (the shim built by this test,
//! not `/usr/local/bin`) and `SystemdCgroup = false` (no systemd here). Pods use the host's
//! network (no CNI here), which is why they set no hostname.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use heapcap_integration::process::{run_captured, show, TIMEOUT};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    security_profile::ProfileType, ContainerConfig, ContainerMetadata, ContainerState, ContainerStatus,
    ContainerStatusRequest, CreateContainerRequest, ExecSyncRequest, ExecSyncResponse, ImageSpec, ImageStatusRequest,
    LinuxContainerConfig, LinuxContainerResources, LinuxContainerSecurityContext, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, ListPodSandboxRequest, Mount, NamespaceMode, NamespaceOption, PodSandboxConfig,
    PodSandboxMetadata, PodSandboxStatusRequest, RemovePodSandboxRequest, RunPodSandboxRequest, SecurityProfile,
    StartContainerRequest, StopPodSandboxRequest, VersionRequest,
};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// The containerd example this node registers the `heapcap` handler from.
pub const CONTAINERD_EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/containerd/config-1.x.toml");

/// The containerd namespace of the CRI plugin (where kubelet's images and containers live).
const K8S_NAMESPACE: &str = "k8s.io";

/// A pod as kubelet describes it to the runtime.
#[derive(Debug, Clone, Default)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub annotations: Vec<(String, String)>,
    /// The RuntimeClass's handler (`""`: the default runtime).
    pub handler: String,
    pub host_pid: bool,
    /// A pod with a privileged container has a privileged sandbox (kubelet sets both).
    pub privileged: bool,
}

/// A container as kubelet describes it.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    pub name: String,
    /// How many times kubelet started this container before (its restart count).
    pub attempt: u32,
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub mounts: Vec<Mount>,
    pub privileged: bool,
    /// `None`: Unconfined, as kubelet without `--seccomp-default`.
    pub seccomp_runtime_default: bool,
    pub memory_limit: i64,
}

/// A pod sandbox that was started, with the config kubelet passes again with each container.
#[derive(Debug, Clone)]
pub struct Pod {
    pub id: String,
    pub config: PodSandboxConfig,
    host_pid: bool,
}

/// A private containerd serving the CRI. Every pod is stopped and removed, containerd stopped and
/// its directories and cgroups removed on drop.
pub struct Node {
    child: Option<Child>,
    pub dir: PathBuf,
    socket: PathBuf,
    cgroup_parent: String,
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

static NODES: AtomicU32 = AtomicU32::new(0);

fn toml_table(pairs: Vec<(&str, toml::Value)>) -> toml::Value {
    toml::Value::Table(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

fn path_value(p: &Path) -> toml::Value {
    toml::Value::String(p.display().to_string())
}

impl Node {
    /// Start containerd with the example's `heapcap` handler running `heapcap_runtime` as its runc
    /// binary, `sandbox_image` as the pause image, and `env` in containerd's environment (which
    /// containerd passes on to the runtime binaries it runs).
    pub fn start(heapcap_runtime: &Path, sandbox_image: &str, env: &[(&str, &Path)]) -> Node {
        let n = NODES.fetch_add(1, Ordering::SeqCst);
        let tag = format!("hc-cri-{}-{n}", std::process::id());
        let dir = PathBuf::from("/tmp").join(&tag);
        let _ = fs::remove_dir_all(&dir);
        for sub in ["cni/bin", "cni/conf", "opt", "pods"] {
            fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let socket = dir.join("containerd.sock");

        let example: toml::Value = toml::from_str(&fs::read_to_string(CONTAINERD_EXAMPLE).unwrap())
            .unwrap_or_else(|e| panic!("{CONTAINERD_EXAMPLE}: {e}"));
        let mut heapcap = example["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["heapcap"].clone();
        assert_eq!(heapcap["runtime_type"].as_str(), Some("io.containerd.runc.v2"), "{CONTAINERD_EXAMPLE}");
        let options = heapcap["options"].as_table_mut().expect("the example's options");
        options.insert("BinaryName".into(), path_value(heapcap_runtime));
        options.insert("SystemdCgroup".into(), false.into());
        let runc = toml_table(vec![
            ("runtime_type", "io.containerd.runc.v2".into()),
            ("options", toml_table(vec![("SystemdCgroup", false.into())])),
        ]);
        let cri = toml_table(vec![
            ("sandbox_image", sandbox_image.into()),
            // No CAP_SYS_RESOURCE for the pause container's oom_score_adj on this machine.
            ("restrict_oom_score_adj", true.into()),
            ("stream_server_address", "127.0.0.1".into()),
            ("stream_server_port", "0".into()),
            (
                "containerd",
                toml_table(vec![
                    ("snapshotter", "native".into()),
                    ("default_runtime_name", "runc".into()),
                    ("runtimes", toml_table(vec![("runc", runc), ("heapcap", heapcap)])),
                ]),
            ),
            (
                "cni",
                toml_table(vec![
                    ("bin_dir", path_value(&dir.join("cni/bin"))),
                    ("conf_dir", path_value(&dir.join("cni/conf"))),
                ]),
            ),
        ]);
        let address = |p: PathBuf| toml_table(vec![("address", path_value(&p))]);
        let config = toml_table(vec![
            ("version", 2.into()),
            ("root", path_value(&dir.join("root"))),
            ("state", path_value(&dir.join("state"))),
            ("grpc", address(socket.clone())),
            ("ttrpc", address(dir.join("containerd.sock.ttrpc"))),
            ("debug", toml_table(vec![("address", "".into())])),
            ("metrics", toml_table(vec![("address", "".into())])),
            (
                "plugins",
                toml_table(vec![
                    ("io.containerd.grpc.v1.cri", cri),
                    ("io.containerd.internal.v1.opt", toml_table(vec![("path", path_value(&dir.join("opt")))])),
                ]),
            ),
        ]);
        let config_path = dir.join("config.toml");
        fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();

        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&config_path).stdin(Stdio::null()).stdout(Stdio::null());
        cmd.stderr(fs::File::create(dir.join("containerd.log")).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child =
            cmd.spawn().unwrap_or_else(|e| panic!("the CRI tests need containerd 1.6 (scripts/setup-engines.sh): {e}"));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let channel = {
            let socket = socket.clone();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let socket = socket.clone();
                let endpoint = Endpoint::try_from("http://[::]:50051").unwrap().timeout(TIMEOUT);
                let connect = endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
                    let socket = socket.clone();
                    async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
                }));
                match rt.block_on(connect) {
                    Ok(channel) => break channel,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => panic!("containerd's CRI did not come up ({e}):\n{}", read(&dir.join("containerd.log"))),
                }
            }
        };
        let node = Node {
            child: Some(child),
            dir: dir.clone(),
            socket,
            cgroup_parent: format!("/{tag}"),
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        };
        // The CRI service answers once its plugin is up.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut client = node.runtime.clone();
            match node.rt.block_on(client.version(VersionRequest { version: "v1".into() })) {
                Ok(v) => {
                    let v = v.into_inner();
                    assert_eq!(v.runtime_api_version, "v1", "containerd serves CRI v1: {v:?}");
                    break;
                }
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("containerd's CRI plugin does not answer: {e}\n{}", node.log()),
            }
        }
        node
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        read(&self.dir.join("containerd.log"))
    }

    /// `ctr images import` into the CRI's namespace, unpacked for the CRI's snapshotter; then
    /// asks the CRI's ImageStatus for `name`, as kubelet does before pulling (IfNotPresent).
    pub fn import(&self, archive: &Path, name: &str) {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(&self.socket).args(["--namespace", K8S_NAMESPACE]);
        cmd.args(["images", "import", "--snapshotter", "native"]).arg(archive);
        let out = run_captured(cmd, TIMEOUT);
        assert!(out.status.success(), "ctr images import {}: {}\n{}", archive.display(), show(&out), self.log());
        let mut images = self.images.clone();
        let request =
            ImageStatusRequest { image: Some(ImageSpec { image: name.into(), ..Default::default() }), verbose: false };
        let status = self.rt.block_on(images.image_status(request)).expect("ImageStatus").into_inner();
        assert!(status.image.is_some(), "the CRI does not see {name} after importing {}", archive.display());
    }

    /// RunPodSandbox, as kubelet calls it for `pod`.
    pub fn run_pod(&self, pod: &PodSpec) -> Result<Pod, tonic::Status> {
        let uid = format!("{}-{}", pod.name, NODES.fetch_add(1, Ordering::SeqCst));
        let log_directory = self.dir.join("pods").join(format!("{}_{}_{uid}", pod.namespace, pod.name));
        fs::create_dir_all(&log_directory).unwrap();
        let labels: HashMap<String, String> = [
            ("io.kubernetes.pod.name", pod.name.as_str()),
            ("io.kubernetes.pod.namespace", pod.namespace.as_str()),
            ("io.kubernetes.pod.uid", uid.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: pod.name.clone(),
                uid: uid.clone(),
                namespace: pod.namespace.clone(),
                attempt: 0,
            }),
            // A host-network pod must not set a hostname.
            hostname: String::new(),
            log_directory: log_directory.display().to_string(),
            labels,
            annotations: pod.annotations.iter().cloned().collect(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: format!("{}/pod{uid}", self.cgroup_parent),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(namespaces(pod.host_pid)),
                    privileged: pod.privileged,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let request = RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: pod.handler.clone() };
        let mut client = self.runtime.clone();
        let id = self.rt.block_on(client.run_pod_sandbox(request))?.into_inner().pod_sandbox_id;
        Ok(Pod { id, config, host_pid: pod.host_pid })
    }

    /// Whether the pod's sandbox is ready (PodSandboxStatus).
    pub fn pod_ready(&self, pod: &Pod) -> bool {
        let mut client = self.runtime.clone();
        let request = PodSandboxStatusRequest { pod_sandbox_id: pod.id.clone(), verbose: false };
        let status = self.rt.block_on(client.pod_sandbox_status(request)).expect("PodSandboxStatus").into_inner();
        status.status.is_some_and(|s| s.state == k8s_cri::v1::PodSandboxState::SandboxReady as i32)
    }

    /// CreateContainer, as kubelet calls it (the sandbox config passed again, the log path under
    /// the pod's log directory).
    pub fn create(&self, pod: &Pod, c: &ContainerSpec) -> Result<String, tonic::Status> {
        let log_dir = Path::new(&pod.config.log_directory).join(&c.name);
        fs::create_dir_all(&log_dir).unwrap();
        let seccomp = if c.seccomp_runtime_default { ProfileType::RuntimeDefault } else { ProfileType::Unconfined };
        let metadata = pod.config.metadata.clone().unwrap_or_default();
        let labels: HashMap<String, String> = [
            ("io.kubernetes.pod.name", metadata.name.clone()),
            ("io.kubernetes.pod.namespace", metadata.namespace.clone()),
            ("io.kubernetes.pod.uid", metadata.uid.clone()),
            ("io.kubernetes.container.name", c.name.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata { name: c.name.clone(), attempt: c.attempt }),
            image: Some(ImageSpec { image: c.image.clone(), ..Default::default() }),
            command: c.command.clone(),
            args: c.args.clone(),
            mounts: c.mounts.clone(),
            labels,
            log_path: format!("{}/{}.log", c.name, c.attempt),
            linux: Some(LinuxContainerConfig {
                resources: Some(LinuxContainerResources {
                    memory_limit_in_bytes: c.memory_limit,
                    ..Default::default()
                }),
                security_context: Some(LinuxContainerSecurityContext {
                    privileged: c.privileged,
                    namespace_options: Some(namespaces(pod.host_pid)),
                    seccomp: Some(SecurityProfile { profile_type: seccomp as i32, localhost_ref: String::new() }),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        };
        let request = CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(config),
            sandbox_config: Some(pod.config.clone()),
        };
        let mut client = self.runtime.clone();
        Ok(self.rt.block_on(client.create_container(request))?.into_inner().container_id)
    }

    /// StartContainer.
    pub fn start_container(&self, id: &str) -> Result<(), tonic::Status> {
        let mut client = self.runtime.clone();
        self.rt.block_on(client.start_container(StartContainerRequest { container_id: id.into() }))?;
        Ok(())
    }

    /// CreateContainer and StartContainer; panics with containerd's log if either fails.
    pub fn run(&self, pod: &Pod, c: &ContainerSpec) -> String {
        let id = self.create(pod, c).unwrap_or_else(|e| panic!("CreateContainer {}: {e}\n{}", c.name, self.log()));
        self.start_container(&id).unwrap_or_else(|e| panic!("StartContainer {}: {e}\n{}", c.name, self.log()));
        id
    }

    /// ContainerStatus.
    pub fn status(&self, id: &str) -> ContainerStatus {
        let mut client = self.runtime.clone();
        let request = ContainerStatusRequest { container_id: id.into(), verbose: false };
        let reply = self.rt.block_on(client.container_status(request)).expect("ContainerStatus").into_inner();
        reply.status.expect("a container status")
    }

    /// ContainerStatus until the container has exited (what kubelet's PLEG sees).
    pub fn wait_exited(&self, id: &str, timeout: Duration) -> ContainerStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status(id);
            if status.state == ContainerState::ContainerExited as i32 {
                return status;
            }
            assert!(Instant::now() < deadline, "container {id} still running after {timeout:?}: {status:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What the container printed, from its CRI log file (`TIME STREAM TAG TEXT` lines):
    /// (stdout, stderr).
    pub fn logs(&self, status: &ContainerStatus) -> (String, String) {
        let (mut out, mut err) = (String::new(), String::new());
        for line in read(Path::new(&status.log_path)).lines() {
            let mut fields = line.splitn(4, ' ');
            let (_time, stream, tag, text) = (fields.next(), fields.next(), fields.next(), fields.next().unwrap_or(""));
            let target = if stream == Some("stderr") { &mut err } else { &mut out };
            target.push_str(text);
            if tag == Some("F") {
                target.push('\n');
            }
        }
        (out, err)
    }

    /// Wait until the container's stdout has a line starting with `prefix`; its stdout.
    pub fn wait_for_output(&self, id: &str, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status(id);
            let (out, err) = self.logs(&status);
            if out.lines().any(|l| l.starts_with(prefix)) {
                return out;
            }
            assert!(
                Instant::now() < deadline && status.state != ContainerState::ContainerExited as i32,
                "container {id} printed no line starting with {prefix:?}: {status:?}\nstdout: {out}\nstderr: {err}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// ExecSync (what kubelet's exec probes and `kubectl exec` without a terminal use).
    pub fn exec_sync(&self, id: &str, cmd: &[&str]) -> ExecSyncResponse {
        let mut client = self.runtime.clone();
        let request =
            ExecSyncRequest { container_id: id.into(), cmd: cmd.iter().map(|s| s.to_string()).collect(), timeout: 60 };
        self.rt.block_on(client.exec_sync(request)).unwrap_or_else(|e| panic!("ExecSync {cmd:?}: {e}")).into_inner()
    }

    /// The bundle containerd's runc shim made for a container or sandbox (its `config.json`).
    pub fn bundle(&self, id: &str) -> PathBuf {
        self.dir.join("state/io.containerd.runtime.v2.task").join(K8S_NAMESPACE).join(id)
    }

    /// StopPodSandbox and RemovePodSandbox.
    pub fn remove_pod(&self, id: &str) {
        let mut client = self.runtime.clone();
        let stopped = self.rt.block_on(client.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: id.into() }));
        let removed =
            self.rt.block_on(client.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id.into() }));
        if let Err(e) = stopped.map(drop).and(removed.map(drop)) {
            eprintln!("removing pod {id}: {e}");
        }
    }
}

fn namespaces(host_pid: bool) -> NamespaceOption {
    let pid = if host_pid { NamespaceMode::Node } else { NamespaceMode::Container };
    NamespaceOption {
        network: NamespaceMode::Node as i32,
        pid: pid as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

/// Remove the cgroup `dir` and everything below it (cgroup directories can only be removed empty,
/// from the leaves up).
fn remove_cgroup(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&entry.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

impl Drop for Node {
    fn drop(&mut self) {
        let mut client = self.runtime.clone();
        if let Ok(pods) = self.rt.block_on(client.list_pod_sandbox(ListPodSandboxRequest { filter: None })) {
            for pod in pods.into_inner().items {
                self.remove_pod(&pod.id);
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let parent = self.cgroup_parent.trim_start_matches('/');
        for hierarchy in fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten() {
            remove_cgroup(&hierarchy.path().join(parent));
        }
        if std::env::var_os("HEAPCAP_TEST_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
