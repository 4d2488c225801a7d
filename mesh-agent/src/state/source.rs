//! Reading state from YAML: files of a directory, documents of a file, objects of a
//! document, strictly typed.

use std::any::TypeId;
use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::fmt;
use std::path::{Path, PathBuf};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{ClusterResourceScope, Metadata, Resource};
use serde::Serialize;
use serde::de::{Deserialize, DeserializeOwned};
use serde_json::Value;

use super::istio::{
    AuthorizationPolicy, MESH_CONFIG_NAME, MESH_CONFIG_NAMESPACE, parse_mesh_config,
};
use super::model::{DEFAULT_NAMESPACE, Kind, NAMESPACE_NAME_LABEL, ObjectKey, State, cluster_ips};
use super::validate::{self, Problem};
use super::{DocError, StateError};

/// The state files of `path`: the file itself, or the `*.yaml`/`*.yml` files directly
/// in the directory, sorted by name so that error order and "first definition" are
/// deterministic. Hidden files are skipped (editor swap files, `.#x` locks, the
/// `..data` links of a mounted ConfigMap), as are backups ending in `~`.
pub(super) fn files(path: &Path) -> Result<Vec<PathBuf>, StateError> {
    let io = |source| StateError::Io {
        path: path.to_owned(),
        source,
    };
    if !path.metadata().map_err(io)?.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in path.read_dir().map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let is_yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        if is_yaml && !name.starts_with('.') && entry.path().is_file() {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// Where a document is: file and 1-based document index.
#[derive(Clone, Debug)]
struct Location {
    file: String,
    document: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} document {}", self.file, self.document)
    }
}

/// Accumulates the objects of all files of one update, and every problem found.
#[derive(Default)]
pub(super) struct Builder {
    state: State,
    places: BTreeMap<(Kind, ObjectKey), Location>,
    errors: Vec<DocError>,
}

impl Builder {
    /// Adds the documents of one file. `file` is the name used in messages.
    pub(super) fn add_file(&mut self, file: &str, text: &str) {
        for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let loc = Location {
                file: file.to_owned(),
                document: index + 1,
            };
            let mut yaml = match serde_yaml::Value::deserialize(document) {
                Ok(yaml) => yaml,
                Err(e) => {
                    // The parser cannot resynchronise after a syntax error: the rest of
                    // the file is unread, and this one error says where it stopped.
                    self.errors.push(yaml_error(&loc, &e));
                    return;
                }
            };
            if let Err(e) = yaml.apply_merge() {
                self.errors.push(yaml_error(&loc, &e));
                continue;
            }
            if yaml.is_null() {
                continue; // an empty document, e.g. a trailing `---`
            }
            match serde_json::to_value(&yaml) {
                Ok(json) => self.add_object(&loc, "", &json),
                Err(e) => self.errors.push(doc_error(
                    &loc,
                    None,
                    "",
                    format!("not a JSON-compatible object: {e}"),
                )),
            }
        }
    }

    /// Adds one object; `prefix` is its field path inside the document (`items[2].` in a List).
    fn add_object(&mut self, loc: &Location, prefix: &str, json: &Value) {
        let (api_version, kind) = match (json.get("apiVersion"), json.get("kind")) {
            (Some(Value::String(a)), Some(Value::String(k))) => (a.as_str(), k.as_str()),
            _ => {
                let msg = "apiVersion and kind are required (strings)";
                self.errors.push(doc_error(
                    loc,
                    None,
                    prefix.trim_end_matches('.'),
                    msg.to_owned(),
                ));
                return;
            }
        };
        match (api_version, kind) {
            ("v1", "Service") => {
                if let Some((key, svc)) = self.decode(loc, prefix, json, validate::service) {
                    self.insert(Kind::Service, key, svc, loc, |s| &mut s.services);
                }
            }
            ("v1", "Pod") => {
                if let Some((key, pod)) = self.decode(loc, prefix, json, validate::pod) {
                    self.insert(Kind::Pod, key, pod, loc, |s| &mut s.pods);
                }
            }
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                if let Some((key, slice)) = self.decode(loc, prefix, json, validate::endpoint_slice)
                {
                    self.insert(Kind::EndpointSlice, key, slice, loc, |s| {
                        &mut s.endpoint_slices
                    });
                }
            }
            ("v1", "Namespace") => {
                if let Some((key, mut ns)) = self.decode(loc, prefix, json, validate::namespace) {
                    // The API server sets this label on every Namespace (overwriting
                    // any other value), and selectors rely on it.
                    ns.metadata
                        .labels
                        .get_or_insert_default()
                        .insert(NAMESPACE_NAME_LABEL.to_owned(), key.name.clone());
                    self.insert(Kind::Namespace, key, ns, loc, |s| &mut s.namespaces);
                }
            }
            ("networking.k8s.io/v1", "NetworkPolicy") => {
                if let Some((key, policy)) =
                    self.decode(loc, prefix, json, validate::network_policy)
                {
                    self.insert(Kind::NetworkPolicy, key, policy, loc, |s| {
                        &mut s.network_policies
                    });
                }
            }
            ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", "HTTPRoute") => {
                if let Some((key, route)) = self.decode(loc, prefix, json, validate::http_route) {
                    self.insert(Kind::HttpRoute, key, route, loc, |s| &mut s.http_routes);
                }
            }
            ("security.istio.io/v1" | "security.istio.io/v1beta1", "PeerAuthentication") => {
                if let Some((key, pa)) =
                    self.decode(loc, prefix, json, validate::peer_authentication)
                {
                    self.insert(Kind::PeerAuthentication, key, pa, loc, |s| {
                        &mut s.peer_authentications
                    });
                }
            }
            ("security.istio.io/v1" | "security.istio.io/v1beta1", "AuthorizationPolicy") => {
                if let Some((key, policy)) =
                    self.decode(loc, prefix, json, validate::authorization_policy)
                {
                    warn_ignored_target_refs(loc, &key, &policy);
                    self.insert(Kind::AuthorizationPolicy, key, policy, loc, |s| {
                        &mut s.authorization_policies
                    });
                }
            }
            ("v1", "ConfigMap") => {
                if let Some((key, cm)) = self.decode(loc, prefix, json, validate::config_map)
                    && self.claim(Kind::ConfigMap, &key, loc)
                    && key.namespace == MESH_CONFIG_NAMESPACE
                    && key.name == MESH_CONFIG_NAME
                {
                    // Validation has reported a bad `mesh`; the update is rejected then.
                    let mesh = cm.data.as_ref().and_then(|d| d.get("mesh"));
                    self.state.mesh_config = mesh.and_then(|m| parse_mesh_config(m).ok());
                }
            }
            ("v1", "List") => match json.get("items") {
                Some(Value::Array(items)) => {
                    for (i, item) in items.iter().enumerate() {
                        self.add_object(loc, &format!("{prefix}items[{i}]."), item);
                    }
                }
                None | Some(Value::Null) => {}
                Some(_) => self.errors.push(doc_error(
                    loc,
                    None,
                    &format!("{prefix}items"),
                    "must be a list".into(),
                )),
            },
            _ => tracing::warn!(
                file = %loc.file,
                document = loc.document,
                path = prefix.trim_end_matches('.'),
                api_version,
                kind,
                "skipping object of a kind this agent does not use"
            ),
        }
    }

    /// Types, strictly checks and validates one object. Returns it with its namespace
    /// defaulted, or `None` after recording why it is unusable. Cluster-scoped objects
    /// get namespace "" (key and metadata alike), whatever the document says, as the
    /// API server ignores it.
    fn decode<T>(
        &mut self,
        loc: &Location,
        prefix: &str,
        json: &Value,
        validate: fn(&T) -> Vec<Problem>,
    ) -> Option<(ObjectKey, T)>
    where
        T: Resource + Metadata<Ty = ObjectMeta> + DeserializeOwned + Serialize,
        T::Scope: 'static,
    {
        let str_at = |pointer| json.pointer(pointer).and_then(Value::as_str);
        let name = str_at("/metadata/name").unwrap_or_default();
        let cluster_scoped = TypeId::of::<T::Scope>() == TypeId::of::<ClusterResourceScope>();
        let namespace = if cluster_scoped {
            ""
        } else {
            str_at("/metadata/namespace")
                .filter(|ns| !ns.is_empty())
                .unwrap_or(DEFAULT_NAMESPACE)
        };
        let object = if cluster_scoped {
            format!("{} {name}", T::KIND)
        } else {
            format!("{} {namespace}/{name}", T::KIND)
        };
        let error = |field: &str, message: String| {
            doc_error(
                loc,
                Some(&object),
                format!("{prefix}{field}").trim_end_matches('.'),
                message,
            )
        };

        let mut typed: T = match serde_path_to_error::deserialize(json) {
            Ok(typed) => typed,
            Err(e) => {
                let path = e.path().to_string();
                let path = if path == "." { String::new() } else { path };
                self.errors.push(error(&path, e.into_inner().to_string()));
                return None;
            }
        };
        match serde_json::to_value(&typed) {
            Ok(typed_json) => {
                let mut unknown = Vec::new();
                unknown_fields(json, &typed_json, &mut String::new(), &mut unknown);
                self.errors.extend(
                    unknown
                        .iter()
                        .map(|field| error(field, "unknown field".into())),
                );
            }
            Err(e) => self.errors.push(error(
                "",
                format!("cannot re-encode to check for unknown fields: {e}"),
            )),
        }
        if name.is_empty() {
            self.errors.push(error("metadata.name", "required".into()));
        }
        let problems = validate(&typed);
        self.errors
            .extend(problems.into_iter().map(|p| error(&p.field, p.message)));

        typed.metadata_mut().namespace = (!cluster_scoped).then(|| namespace.to_owned());
        Some((
            ObjectKey {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            },
            typed,
        ))
    }

    fn insert<T>(
        &mut self,
        kind: Kind,
        key: ObjectKey,
        object: T,
        loc: &Location,
        map: fn(&mut State) -> &mut BTreeMap<ObjectKey, T>,
    ) {
        if self.claim(kind, &key, loc) {
            map(&mut self.state).insert(key, object);
        }
    }

    /// Records where the object `key` of `kind` is defined; false (and an error) when
    /// it already was.
    fn claim(&mut self, kind: Kind, key: &ObjectKey, loc: &Location) -> bool {
        match self.places.entry((kind, key.clone())) {
            Entry::Occupied(first) => {
                let object = if key.namespace.is_empty() {
                    format!("{kind} {}", key.name)
                } else {
                    format!("{kind} {key}")
                };
                let message = format!("duplicate object, first defined in {}", first.get());
                self.errors
                    .push(doc_error(loc, Some(&object), "metadata.name", message));
                false
            }
            Entry::Vacant(place) => {
                place.insert(loc.clone());
                true
            }
        }
    }

    /// Runs the checks that span objects, and returns the state or every problem found.
    pub(super) fn finish(mut self) -> Result<State, StateError> {
        let mut owners: BTreeMap<_, &ObjectKey> = BTreeMap::new();
        for (key, svc) in &self.state.services {
            for ip in cluster_ips(svc) {
                match owners.entry(ip) {
                    Entry::Vacant(owner) => {
                        owner.insert(key);
                    }
                    Entry::Occupied(first) => {
                        let first = *first.get();
                        let loc = &self.places[&(Kind::Service, key.clone())];
                        let first_loc = &self.places[&(Kind::Service, first.clone())];
                        let message = format!(
                            "cluster IP {ip} is already used by Service {first} ({first_loc})"
                        );
                        self.errors.push(doc_error(
                            loc,
                            Some(&format!("Service {key}")),
                            "spec.clusterIP",
                            message,
                        ));
                    }
                }
            }
        }
        if self.errors.is_empty() {
            Ok(self.state)
        } else {
            Err(StateError::Invalid(self.errors))
        }
    }
}

/// Gateway targets are enforced by the Gateway's own controller, not by this mesh: a
/// warning says so, the way unknown kinds are reported.
fn warn_ignored_target_refs(loc: &Location, key: &ObjectKey, policy: &AuthorizationPolicy) {
    let refs = policy
        .spec
        .target_ref
        .iter()
        .chain(&policy.spec.target_refs);
    for r in refs.filter(|r| r.kind == "Gateway") {
        tracing::warn!(
            file = %loc.file,
            document = loc.document,
            policy = %key,
            gateway = %r.name,
            "AuthorizationPolicy targetRef to a Gateway is left to the Gateway's controller"
        );
    }
}

fn doc_error(loc: &Location, object: Option<&str>, field: &str, message: String) -> DocError {
    DocError {
        file: loc.file.clone(),
        document: loc.document,
        line: None,
        object: object.map(str::to_owned),
        field: (!field.is_empty()).then(|| field.to_owned()),
        message,
    }
}

fn yaml_error(loc: &Location, e: &serde_yaml::Error) -> DocError {
    let mut message = e.to_string();
    let line = e.location().map(|l| {
        // The line goes in its own field; drop serde_yaml's copy of it from the text.
        let suffix = format!(" at line {} column {}", l.line(), l.column());
        if let Some(stripped) = message.strip_suffix(&suffix) {
            message.truncate(stripped.len());
        }
        l.line()
    });
    DocError {
        line,
        ..doc_error(loc, None, "", message)
    }
}

/// Collects the paths of keys in `original` that the typed object did not keep: fields
/// the schema does not have. k8s-openapi ignores them while deserializing, so this is
/// how `kubectl --validate=strict` behaviour is obtained.
///
/// Keys whose value is null or an empty list or map are not reported: re-encoding may
/// legitimately drop them (an unset optional field), and they carry no configuration.
fn unknown_fields(original: &Value, typed: &Value, path: &mut String, out: &mut Vec<String>) {
    let len = path.len();
    match (original, typed) {
        (Value::Object(original), Value::Object(typed)) => {
            for (key, value) in original {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                match typed.get(key) {
                    Some(typed) => unknown_fields(value, typed, path, out),
                    None if is_empty(value) => {}
                    None => out.push(path.clone()),
                }
                path.truncate(len);
            }
        }
        (Value::Array(original), Value::Array(typed)) => {
            for (i, (value, typed)) in original.iter().zip(typed).enumerate() {
                path.push_str(&format!("[{i}]"));
                unknown_fields(value, typed, path, out);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}
