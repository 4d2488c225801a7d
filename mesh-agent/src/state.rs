//! Cluster state: typed Kubernetes objects, the files they come from, validation.
//!
//! State is read from multi-document YAML (one file, or the `*.yaml`/`*.yml` files of a
//! directory). Understood kinds: `v1 Service`, `v1 Pod`, `discovery.k8s.io/v1
//! EndpointSlice`, `v1 Namespace`, `networking.k8s.io/v1 NetworkPolicy`,
//! `gateway.networking.k8s.io/v1` (or `v1beta1`) `HTTPRoute`, `security.istio.io/v1`
//! (or `v1beta1`) `PeerAuthentication` and `AuthorizationPolicy`, `v1 ConfigMap` (only
//! `istio-system/istio` is read, for MeshConfig's `trustDomain` and `rootNamespace`;
//! other ConfigMaps are accepted and ignored), and `v1 List` of those; other kinds are
//! skipped with a warning.
//! Parsing is strict like `kubectl --validate=strict`: unknown fields are errors.
//! Both address families are understood (dual-stack Services and Pods), and validation
//! follows the API server's rules for the fields the datapath uses: cluster IPs and
//! their families, session affinity, traffic distribution, addresses and ports,
//! NetworkPolicy selectors, peers, CIDRs and ports, the HTTPRoute CRD's schema and
//! CEL rules (see `validate/httproute.rs`), and Istio's validation of its security
//! APIs (see `validate/istio.rs`).
//!
//! An update is all-or-nothing: every problem of every file is collected and returned
//! together, and no partial [`State`] is ever produced, so the caller keeps the last
//! good state in force.
//!
//! Sources that deliver objects one at a time (etcd keys, Kubernetes API objects) keep
//! them in [`Objects`] instead: each object is decoded and validated once, when it
//! changes, with the same rules; a bad one is rejected with its [`Origin`] while its last
//! good version stays, and the cross-object checks run on every assembled [`State`].

mod changes;
pub mod httproute;
pub mod istio;
mod model;
mod objects;
pub mod resilience;
mod source;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};

pub use changes::Changes;
pub use model::{
    Cidr, Kind, ObjectKey, SERVICE_NAME_LABEL, State, affinity_timeout, cluster_ips, pod_ips,
    prefers_close, protocol, selector_matches, service_selector, target_port,
};
pub use objects::{Expected, Objects};

/// Why a state update was rejected.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file or directory could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Some documents are malformed or invalid; one entry per problem, in file order.
    #[error("{}", Lines(.0))]
    Invalid(Vec<DocError>),
}

/// Where an object came from, as messages name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A document of a YAML file.
    File {
        /// The file, as given to [`load`] or [`parse_str`].
        file: String,
        /// 1-based index of the YAML document in the file (the first document is 1).
        document: usize,
    },
    /// The value of an etcd key.
    Etcd {
        /// The full key, prefix included.
        key: String,
    },
    /// An object read from the Kubernetes API.
    Api {
        /// Its kind, e.g. `Service`.
        kind: String,
        /// Its namespace, "" for cluster-scoped kinds.
        namespace: String,
        /// Its name.
        name: String,
    },
}

impl Origin {
    /// The origin as a reference inside a message: `a.yaml document 1`,
    /// `etcd key /mesh/core/Service/default/web`, `API Service default/web`.
    pub fn place(&self) -> String {
        match self {
            Origin::File { file, document } => format!("{file} document {document}"),
            other => other.to_string(),
        }
    }
}

/// The head of an error line: `a.yaml: document 1`, `etcd key /mesh/core/Service/default/web`,
/// `API Service default/web` (`API Namespace shop` when cluster-scoped).
impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { file, document } => write!(f, "{file}: document {document}"),
            Origin::Etcd { key } => write!(f, "etcd key {key}"),
            Origin::Api {
                kind,
                namespace,
                name,
            } if namespace.is_empty() => write!(f, "API {kind} {name}"),
            Origin::Api {
                kind,
                namespace,
                name,
            } => write!(f, "API {kind} {namespace}/{name}"),
        }
    }
}

/// One problem in one object. Displays as one line:
/// `deploy/x.yaml: document 2 (Service default/web): spec.ports[0].port: 70000 is not a valid port (1-65535)`,
/// or `etcd key /mesh/core/Service/default/web (Service default/web): ...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocError {
    /// Where the object came from.
    pub origin: Origin,
    /// 1-based line, for YAML syntax errors.
    pub line: Option<usize>,
    /// `Kind namespace/name`, when the document got far enough to tell.
    pub object: Option<String>,
    /// Field path inside the document, e.g. `spec.ports[0].targetPort`.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for DocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        if let Some(line) = self.line {
            write!(f, ", line {line}")?;
        }
        if let Some(object) = &self.object {
            write!(f, " ({object})")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Displays problems one per line.
struct Lines<'a>(&'a [DocError]);

impl fmt::Display for Lines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Loads the state of a file, or of the YAML files in a directory (not recursive).
pub fn load(path: &Path) -> Result<State, StateError> {
    read_files(path, source::Builder::default())?.finish()
}

/// `builder` with the documents of the files at `path` added.
fn read_files(path: &Path, mut builder: source::Builder) -> Result<source::Builder, StateError> {
    for file in source::files(path)? {
        let text = std::fs::read_to_string(&file).map_err(|source| StateError::Io {
            path: file.clone(),
            source,
        })?;
        builder.add_file(&file.display().to_string(), &text);
    }
    Ok(builder)
}

/// Parses one file's text the way [`load`] parses each file; `file` names it in error
/// messages (tests and fuzz targets feed their inputs this way).
pub fn parse_str(file: &str, text: &str) -> Result<State, StateError> {
    let mut builder = source::Builder::default();
    builder.add_file(file, text);
    builder.finish()
}

/// One object as a store keeps it.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredObject {
    /// Its kind.
    pub kind: Kind,
    /// Namespace (defaulted; "" for cluster-scoped kinds) and name.
    pub key: ObjectKey,
    /// The object as written, `metadata.namespace` filled in for namespaced kinds.
    pub json: serde_json::Value,
    /// Where it was read.
    pub origin: Origin,
}

/// The objects of the YAML files at `path` (as [`load`] reads them), each checked alone
/// and together as [`load`] checks them: what `mesh-agent apply` stores. Kinds the
/// agent does not use are skipped with a warning, as [`load`] skips them.
pub fn read_objects(path: &Path) -> Result<Vec<StoredObject>, StateError> {
    let (_, objects) = read_files(path, source::Builder::keeping_json())?.finish_with_objects()?;
    Ok(objects)
}

#[cfg(test)]
mod tests;
