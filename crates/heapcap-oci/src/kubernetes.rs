//! What Kubernetes' container runtimes write into each container's annotations, read without I/O:
//! whether the container is a pod's sandbox (the pause container that holds the pod's
//! namespaces), and its [`Pod`] names.
//!
//! - containerd's CRI plugin: `io.kubernetes.cri.container-type` (`sandbox` or `container`),
//!   `io.kubernetes.cri.sandbox-namespace`, `io.kubernetes.cri.sandbox-name` and
//!   `io.kubernetes.cri.container-name`.
//! - CRI-O: `io.kubernetes.cri-o.ContainerType` (`sandbox` or `container`), and kubelet's labels,
//!   which CRI-O keeps as JSON in `io.kubernetes.cri-o.Labels` (`io.kubernetes.pod.namespace`,
//!   `io.kubernetes.pod.name`, `io.kubernetes.container.name`); failing those, its own
//!   `io.kubernetes.cri-o.Namespace`, `io.kubernetes.cri-o.KubeName` and the `name` of
//!   `io.kubernetes.cri-o.Metadata`.
//!
//! Sandboxes are never put under heapcap: containerd copies a pod's `heapcap.io/*` annotations to
//! its sandbox as well (CRI-O copies pod annotations to every container too), and a quota, or a bad
//! setting, is about the pod's containers. A bad `heapcap.io/limit` then fails the container's
//! start, with the reason in what kubelet turns into the container's event, and never the pod's
//! sandbox (which kubelet would retry forever as `FailedCreatePodSandBox`).

pub use heapcap_control::Pod;

/// containerd's CRI plugin: `sandbox` or `container`.
pub const CONTAINERD_TYPE: &str = "io.kubernetes.cri.container-type";
/// containerd's CRI plugin: the pod's namespace.
pub const CONTAINERD_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
/// containerd's CRI plugin: the pod's name.
pub const CONTAINERD_POD: &str = "io.kubernetes.cri.sandbox-name";
/// containerd's CRI plugin: the container's name in the pod.
pub const CONTAINERD_CONTAINER: &str = "io.kubernetes.cri.container-name";
/// CRI-O: `sandbox` or `container`.
pub const CRIO_TYPE: &str = "io.kubernetes.cri-o.ContainerType";
/// CRI-O: kubelet's labels of the container, as a JSON object.
pub const CRIO_LABELS: &str = "io.kubernetes.cri-o.Labels";
/// CRI-O: the pod's namespace.
pub const CRIO_NAMESPACE: &str = "io.kubernetes.cri-o.Namespace";
/// CRI-O: the pod's name.
pub const CRIO_POD: &str = "io.kubernetes.cri-o.KubeName";
/// CRI-O: the CRI metadata of the container (`{"name": ..., "attempt": ...}`) as JSON.
pub const CRIO_METADATA: &str = "io.kubernetes.cri-o.Metadata";
/// The value of [`CONTAINERD_TYPE`] and [`CRIO_TYPE`] on a pod's sandbox.
pub const SANDBOX: &str = "sandbox";

/// kubelet's labels on every container it creates (in CRI-O's [`CRIO_LABELS`]).
const LABEL_NAMESPACE: &str = "io.kubernetes.pod.namespace";
const LABEL_POD: &str = "io.kubernetes.pod.name";
const LABEL_CONTAINER: &str = "io.kubernetes.container.name";

fn get<'a>(annotations: &[(&str, &'a str)], key: &str) -> Option<&'a str> {
    // Of a key given twice the last wins, as in a JSON object.
    annotations.iter().rev().find(|(k, _)| *k == key).map(|(_, v)| *v)
}

/// Whether the annotations are those of a pod's sandbox (containerd or CRI-O).
pub fn is_sandbox<'a>(annotations: impl IntoIterator<Item = (&'a str, &'a str)>) -> bool {
    let annotations: Vec<(&str, &str)> = annotations.into_iter().collect();
    [CONTAINERD_TYPE, CRIO_TYPE].iter().any(|key| get(&annotations, key).is_some_and(|v| v.trim() == SANDBOX))
}

/// The container's Kubernetes names, when a CRI runtime wrote them (all three, none empty); for a
/// sandbox, the container name is empty.
pub fn pod<'a>(annotations: impl IntoIterator<Item = (&'a str, &'a str)>) -> Option<Pod> {
    let annotations: Vec<(&str, &str)> = annotations.into_iter().collect();
    let sandbox = is_sandbox(annotations.iter().copied());
    containerd(&annotations, sandbox).or_else(|| crio(&annotations, sandbox))
}

fn containerd(annotations: &[(&str, &str)], sandbox: bool) -> Option<Pod> {
    let namespace = get(annotations, CONTAINERD_NAMESPACE)?;
    let name = get(annotations, CONTAINERD_POD)?;
    let container = if sandbox { "" } else { get(annotations, CONTAINERD_CONTAINER)? };
    complete(namespace, name, container, sandbox)
}

fn crio(annotations: &[(&str, &str)], sandbox: bool) -> Option<Pod> {
    let object = |key: &str| -> serde_json::Map<String, serde_json::Value> {
        let text = get(annotations, key).unwrap_or_default();
        match serde_json::from_str(text) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => Default::default(),
        }
    };
    let labels = object(CRIO_LABELS);
    let metadata = object(CRIO_METADATA);
    let label = |key: &str| labels.get(key).and_then(|v| v.as_str());
    let namespace = label(LABEL_NAMESPACE).or_else(|| get(annotations, CRIO_NAMESPACE))?;
    let name = label(LABEL_POD).or_else(|| get(annotations, CRIO_POD))?;
    let container = match sandbox {
        true => "",
        false => label(LABEL_CONTAINER).or_else(|| metadata.get("name").and_then(|v| v.as_str()))?,
    };
    complete(namespace, name, container, sandbox)
}

fn complete(namespace: &str, name: &str, container: &str, sandbox: bool) -> Option<Pod> {
    let ok = |s: &str| !s.trim().is_empty();
    (ok(namespace) && ok(name) && (sandbox || ok(container))).then(|| Pod {
        namespace: namespace.to_string(),
        name: name.to_string(),
        container: container.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What containerd 1.6's CRI plugin writes for a container (checked on this project's machine).
    const CONTAINERD: &[(&str, &str)] = &[
        ("io.kubernetes.cri.container-type", "container"),
        ("io.kubernetes.cri.container-name", "app"),
        ("io.kubernetes.cri.image-name", "localhost/heapcap-test:1"),
        ("io.kubernetes.cri.sandbox-id", "5f0c"),
        ("io.kubernetes.cri.sandbox-name", "leaky-service"),
        ("io.kubernetes.cri.sandbox-namespace", "default"),
        ("heapcap.io/limit", "256Mi"),
    ];

    fn names(namespace: &str, name: &str, container: &str) -> Option<Pod> {
        Some(Pod { namespace: namespace.into(), name: name.into(), container: container.into() })
    }

    #[test]
    fn containerd_containers_and_sandboxes() {
        assert!(!is_sandbox(CONTAINERD.iter().copied()));
        assert_eq!(pod(CONTAINERD.iter().copied()), names("default", "leaky-service", "app"));
        let sandbox: Vec<(&str, &str)> = CONTAINERD
            .iter()
            .filter(|(k, _)| *k != CONTAINERD_CONTAINER)
            .map(|&(k, v)| if k == CONTAINERD_TYPE { (k, SANDBOX) } else { (k, v) })
            .collect();
        assert!(is_sandbox(sandbox.iter().copied()));
        assert_eq!(pod(sandbox.iter().copied()), names("default", "leaky-service", ""));
        assert_eq!(pod(sandbox.iter().copied()).unwrap().to_string(), "default/leaky-service/");
    }

    #[test]
    fn crio_containers_and_sandboxes() {
        let labels = r#"{"io.kubernetes.container.name":"app","io.kubernetes.pod.name":"leaky-service","io.kubernetes.pod.namespace":"team-a","io.kubernetes.pod.uid":"1b2c"}"#;
        let container = [
            (CRIO_TYPE, "container"),
            (CRIO_LABELS, labels),
            (CRIO_METADATA, r#"{"name":"app","attempt":0}"#),
            ("io.kubernetes.cri-o.Name", "k8s_app_leaky-service_team-a_1b2c_0"),
        ];
        assert!(!is_sandbox(container));
        assert_eq!(pod(container), names("team-a", "leaky-service", "app"));
        // Without kubelet's labels: CRI-O's own annotations.
        let own = [
            (CRIO_TYPE, "container"),
            (CRIO_NAMESPACE, "team-a"),
            (CRIO_POD, "leaky-service"),
            (CRIO_METADATA, r#"{"name":"app","attempt":0}"#),
        ];
        assert_eq!(pod(own), names("team-a", "leaky-service", "app"));
        let sandbox = [(CRIO_TYPE, "sandbox"), (CRIO_NAMESPACE, "team-a"), (CRIO_POD, "leaky-service")];
        assert!(is_sandbox(sandbox));
        assert_eq!(pod(sandbox), names("team-a", "leaky-service", ""));
    }

    #[test]
    fn no_kubernetes_no_names_and_no_sandbox() {
        let podman = [("io.container.manager", "libpod"), ("heapcap.io/limit", "64Mi")];
        assert!(!is_sandbox(podman));
        assert_eq!(pod(podman), None);
        // Half a set is no set: a name is never made up.
        let half = [(CONTAINERD_NAMESPACE, "default"), (CONTAINERD_CONTAINER, "app")];
        assert_eq!(pod(half), None);
        let empty = [(CONTAINERD_NAMESPACE, "default"), (CONTAINERD_POD, " "), (CONTAINERD_CONTAINER, "app")];
        assert_eq!(pod(empty), None);
        // Garbled CRI-O JSON is no label.
        assert_eq!(pod([(CRIO_TYPE, "container"), (CRIO_LABELS, "{{"), (CRIO_NAMESPACE, "a")]), None);
        assert!(!is_sandbox([(CONTAINERD_TYPE, "Sandbox-ish")]));
    }
}
