//! The manifests of `deploy/kubernetes/` are what `kubectl apply` accepts: every
//! document parses as its kind's k8s-openapi type without losing a field (an unknown or
//! misspelled field would be dropped by the type, so re-encoding it must give back the
//! document exactly), and the ClusterRole grants exactly what the agent watches.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use mesh_agent::source::kubernetes::kinds::WATCHED;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn manifest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// Every document of every manifest: (file name, JSON).
fn documents() -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(manifest_dir())
        .expect("deploy/kubernetes")
        .map(|e| e.expect("directory entry").path())
        .collect();
    files.sort();
    let mut documents = Vec::new();
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.ends_with(".yaml"),
            "{name}: only YAML manifests belong here"
        );
        let text = std::fs::read_to_string(&file).unwrap();
        for (i, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let yaml = <serde_yaml::Value as serde::Deserialize>::deserialize(document)
                .unwrap_or_else(|e| panic!("{name} document {}: {e}", i + 1));
            if !yaml.is_null() {
                documents.push((name.clone(), serde_json::to_value(yaml).unwrap()));
            }
        }
    }
    documents
}

/// Parses `json` as `T` and checks that re-encoding keeps every field.
fn typed<T: DeserializeOwned + Serialize>(file: &str, json: &Value) -> T {
    let typed: T = serde_path_to_error::deserialize(json)
        .unwrap_or_else(|e| panic!("{file}: {}: {}", e.path(), e.inner()));
    let again = serde_json::to_value(&typed).unwrap();
    if let Some(path) = difference(json, &again, String::new()) {
        panic!("{file}: {path}: dropped or changed by the type: unknown or misspelled");
    }
    typed
}

/// The path of the first place where `original` and `typed` differ.
fn difference(original: &Value, typed: &Value, path: String) -> Option<String> {
    match (original, typed) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            keys.into_iter().find_map(|k| {
                let (x, y) = (
                    a.get(k).unwrap_or(&Value::Null),
                    b.get(k).unwrap_or(&Value::Null),
                );
                difference(x, y, format!("{path}.{k}"))
            })
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (x, y))| difference(x, y, format!("{path}[{i}]"))),
        (a, b) => (a != b).then_some(path),
    }
}

#[test]
fn every_manifest_parses_as_its_kind() {
    let documents = documents();
    let mut kinds = BTreeSet::new();
    for (file, json) in &documents {
        let kind = (
            json["apiVersion"].as_str().unwrap_or_default(),
            json["kind"].as_str().unwrap_or_default(),
        );
        match kind {
            ("v1", "Namespace") => drop(typed::<Namespace>(file, json)),
            ("v1", "ServiceAccount") => drop(typed::<ServiceAccount>(file, json)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                drop(typed::<ClusterRole>(file, json))
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                drop(typed::<ClusterRoleBinding>(file, json))
            }
            ("apps/v1", "DaemonSet") => drop(typed::<DaemonSet>(file, json)),
            other => panic!("{file}: no test knows {other:?}"),
        }
        kinds.insert(kind.1.to_owned());
    }
    let expected = [
        "ClusterRole",
        "ClusterRoleBinding",
        "DaemonSet",
        "Namespace",
        "ServiceAccount",
    ];
    assert_eq!(kinds, expected.iter().map(|k| (*k).to_owned()).collect());
}

fn one<T: DeserializeOwned + Serialize>(kind: &str) -> T {
    let (file, json) = documents()
        .into_iter()
        .find(|(_, json)| json["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"));
    typed(&file, &json)
}

/// get/list/watch on exactly the watched kinds (and only the one ConfigMap).
#[test]
fn cluster_role_grants_exactly_what_the_agent_watches() {
    let role: ClusterRole = one("ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role.rules.unwrap_or_default() {
        let verbs: BTreeSet<&str> = rule.verbs.iter().map(String::as_str).collect();
        assert_eq!(verbs, BTreeSet::from(["get", "list", "watch"]), "{rule:?}");
        assert!(rule.non_resource_urls.is_none());
        let names = rule.resource_names.clone().unwrap_or_default();
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                assert!(
                    granted.insert((group.clone(), resource, names.clone())),
                    "granted twice"
                );
            }
        }
    }
    let watched: BTreeSet<(String, String, Vec<String>)> = WATCHED
        .iter()
        .map(|k| {
            let names = k
                .only
                .map(|(_, name)| vec![name.to_owned()])
                .unwrap_or_default();
            (k.group.to_owned(), k.plural.to_owned(), names)
        })
        .collect();
    assert_eq!(granted, watched);

    let binding: ClusterRoleBinding = one("ClusterRoleBinding");
    let account: ServiceAccount = one("ServiceAccount");
    assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(Some(&subject.name), account.metadata.name.as_ref());
    assert_eq!(subject.namespace, account.metadata.namespace);
}

/// The DaemonSet runs both containers privileged on the host network, with the mounts
/// the agent needs, and probes the agent's /healthz where it serves it.
#[test]
fn daemonset_runs_agent_and_proxy_on_the_host() {
    let daemonset: DaemonSet = one("DaemonSet");
    let account: ServiceAccount = one("ServiceAccount");
    let pod = daemonset.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.host_pid, Some(true));
    assert_eq!(pod.service_account_name, account.metadata.name);
    let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["agent", "proxy"]);
    let volumes: Vec<(String, String)> = pod
        .volumes
        .unwrap()
        .into_iter()
        .map(|v| (v.name, v.host_path.expect("hostPath volume").path))
        .collect();
    for (name, path) in [
        ("bpffs", "/sys/fs/bpf"),
        ("cgroup", "/sys/fs/cgroup"),
        ("run", "/run/mesh"),
    ] {
        assert!(
            volumes.contains(&(name.into(), path.into())),
            "{name}: {volumes:?}"
        );
    }
    for container in &pod.containers {
        let security = container.security_context.as_ref().unwrap();
        assert_eq!(security.privileged, Some(true), "{}", container.name);
        let probe = container
            .liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(probe.path.as_deref(), Some("/healthz"));
        // The probe must hit the address the container serves on (host loopback).
        let port = match &probe.port {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p) => *p,
            other => panic!("{other:?}"),
        };
        let serves = format!("--metrics-addr={}:{port}", probe.host.as_deref().unwrap());
        let args = container.args.as_ref().unwrap();
        assert!(
            args.contains(&serves),
            "{}: {args:?} lack {serves}",
            container.name
        );
    }
}
