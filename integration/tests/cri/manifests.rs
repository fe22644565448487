//! The Kubernetes examples (`examples/kubernetes/*.yaml`) read with a YAML parser, and what kubelet
//! would make of them: the fields the CRI tests pass on as they are.

use std::fs;

use yaml_rust2::{Yaml, YamlLoader};

/// Every document of an example file.
pub fn load(file: &str) -> Vec<Yaml> {
    let path = format!("{}/../examples/kubernetes/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{path} is not YAML: {e}"))
}

/// The one document of `kind` in `file`.
pub fn document(file: &str, kind: &str) -> Yaml {
    let mut docs: Vec<Yaml> = load(file).into_iter().filter(|d| d["kind"].as_str() == Some(kind)).collect();
    assert_eq!(docs.len(), 1, "{file} has one {kind}");
    docs.remove(0)
}

pub fn string(y: &Yaml, what: &str) -> String {
    y.as_str().unwrap_or_else(|| panic!("{what} is not a string: {y:?}")).to_string()
}

pub fn strings(y: &Yaml) -> Vec<String> {
    y.as_vec().into_iter().flatten().map(|s| string(s, "a list item")).collect()
}

/// `metadata.annotations` as (key, value) pairs.
pub fn annotations(doc: &Yaml) -> Vec<(String, String)> {
    doc["metadata"]["annotations"]
        .as_hash()
        .into_iter()
        .flatten()
        .map(|(k, v)| (string(k, "an annotation key"), string(v, "an annotation value")))
        .collect()
}

/// A container of a pod template, as far as the tests need it.
#[derive(Debug, Clone)]
pub struct Container {
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub privileged: bool,
    /// (volume name, mount path, mountPropagation).
    pub mounts: Vec<(String, String, Option<String>)>,
    pub memory_limit: Option<String>,
}

pub fn container(y: &Yaml) -> Container {
    Container {
        name: string(&y["name"], "a container's name"),
        image: string(&y["image"], "a container's image"),
        command: strings(&y["command"]),
        args: strings(&y["args"]),
        privileged: y["securityContext"]["privileged"].as_bool().unwrap_or(false),
        mounts: y["volumeMounts"]
            .as_vec()
            .into_iter()
            .flatten()
            .map(|m| {
                (
                    string(&m["name"], "a volume mount's name"),
                    string(&m["mountPath"], "a mountPath"),
                    m["mountPropagation"].as_str().map(str::to_string),
                )
            })
            .collect(),
        memory_limit: y["resources"]["limits"]["memory"].as_str().map(str::to_string),
    }
}

/// A volume of a pod template.
#[derive(Debug, Clone)]
pub enum Volume {
    HostPath { path: String, kind: Option<String> },
    ConfigMap { name: String },
}

pub fn volumes(spec: &Yaml) -> Vec<(String, Volume)> {
    spec["volumes"]
        .as_vec()
        .into_iter()
        .flatten()
        .map(|v| {
            let name = string(&v["name"], "a volume's name");
            let volume = if !v["hostPath"].is_badvalue() {
                Volume::HostPath {
                    path: string(&v["hostPath"]["path"], "hostPath.path"),
                    kind: v["hostPath"]["type"].as_str().map(str::to_string),
                }
            } else if !v["configMap"].is_badvalue() {
                Volume::ConfigMap { name: string(&v["configMap"]["name"], "configMap.name") }
            } else {
                panic!("volume {name}: only hostPath and configMap volumes are translated here: {v:?}")
            };
            (name, volume)
        })
        .collect()
}

/// The files of a ConfigMap (`data`), as kubelet writes them into its volume.
pub fn config_map(file: &str, name: &str) -> Vec<(String, String)> {
    let doc = load(file)
        .into_iter()
        .find(|d| d["kind"].as_str() == Some("ConfigMap") && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("{file} has no ConfigMap {name}"));
    doc["data"]
        .as_hash()
        .into_iter()
        .flatten()
        .map(|(k, v)| (string(k, "a ConfigMap key"), string(v, "a ConfigMap value")))
        .collect()
}

/// A Kubernetes memory quantity as kubelet passes it (bytes): `2Gi`, `512Mi`.
pub fn quantity(q: &str) -> i64 {
    let (number, unit) = q.split_at(q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len()));
    let n: i64 = number.parse().unwrap_or_else(|_| panic!("quantity {q}"));
    n * match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => panic!("quantity {q}: unit {unit} not translated here"),
    }
}
