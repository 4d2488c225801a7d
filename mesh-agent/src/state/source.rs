//! Reading state: files of a directory, documents of a file, objects of a document
//! (or of a source's value), strictly typed and validated, then assembled into a
//! [`State`] with the checks that span objects.

use std::any::TypeId;
use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{ClusterResourceScope, Metadata, Resource};
use serde::Serialize;
use serde::de::{Deserialize, DeserializeOwned};
use serde_json::Value;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::httproute::HttpRoute;
use super::istio::{
    AuthorizationPolicy, MESH_CONFIG_NAME, MESH_CONFIG_NAMESPACE, MeshConfig, PeerAuthentication,
    parse_mesh_config,
};
use super::model::{DEFAULT_NAMESPACE, Kind, NAMESPACE_NAME_LABEL, ObjectKey, State, cluster_ips};
use super::validate::{self, Problem};
use super::{DocError, Origin, StateError, StoredObject};

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

/// One typed, validated object.
#[derive(Clone, Debug)]
pub(super) enum Object {
    Service(Arc<Service>),
    Pod(Arc<Pod>),
    EndpointSlice(Arc<EndpointSlice>),
    Namespace(Arc<Namespace>),
    NetworkPolicy(Arc<NetworkPolicy>),
    HttpRoute(Arc<HttpRoute>),
    PeerAuthentication(Arc<PeerAuthentication>),
    AuthorizationPolicy(Arc<AuthorizationPolicy>),
    /// A ConfigMap: only `istio-system/istio` is read, for its MeshConfig (None when it
    /// has none, or for any other ConfigMap).
    ConfigMap(Option<Box<MeshConfig>>),
}

/// An object decoded from one value, with its identity.
#[derive(Clone, Debug)]
pub(super) struct Decoded {
    pub(super) kind: Kind,
    /// Namespace defaulted; "" for cluster-scoped kinds.
    pub(super) key: ObjectKey,
    pub(super) object: Object,
    /// The value as written, namespace filled in (only when asked for: `apply`).
    pub(super) json: Option<Value>,
}

/// Decodes, strictly checks and validates the objects of one value (several for a
/// `v1 List`); `prefix` is the value's field path inside its document (`items[2].` in a
/// List). Usable objects go to `out` (also those with problems: duplicates are still
/// detected), every problem to `errors`.
pub(super) fn decode(
    origin: &Origin,
    prefix: &str,
    json: &Value,
    keep_json: bool,
    out: &mut Vec<Decoded>,
    errors: &mut Vec<DocError>,
) {
    let mut cx = Decoder {
        origin,
        prefix,
        json,
        errors,
    };
    let (api_version, kind) = match (json.get("apiVersion"), json.get("kind")) {
        (Some(Value::String(a)), Some(Value::String(k))) => (a.as_str(), k.as_str()),
        _ => {
            let msg = "apiVersion and kind are required (strings)";
            cx.errors.push(doc_error(
                origin,
                None,
                prefix.trim_end_matches('.'),
                msg.to_owned(),
            ));
            return;
        }
    };
    let decoded = match (api_version, kind) {
        ("v1", "Service") => cx
            .typed(validate::service)
            .map(|(key, svc)| (Kind::Service, key, Object::Service(Arc::new(svc)))),
        ("v1", "Pod") => cx
            .typed(validate::pod)
            .map(|(key, pod)| (Kind::Pod, key, Object::Pod(Arc::new(pod)))),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            cx.typed(validate::endpoint_slice).map(|(key, slice)| {
                (
                    Kind::EndpointSlice,
                    key,
                    Object::EndpointSlice(Arc::new(slice)),
                )
            })
        }
        ("v1", "Namespace") => cx.typed(validate::namespace).map(|(key, mut ns)| {
            // The API server sets this label on every Namespace (overwriting any other
            // value), and selectors rely on it.
            ns.metadata
                .labels
                .get_or_insert_default()
                .insert(NAMESPACE_NAME_LABEL.to_owned(), key.name.clone());
            (Kind::Namespace, key, Object::Namespace(Arc::new(ns)))
        }),
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            cx.typed(validate::network_policy).map(|(key, policy)| {
                (
                    Kind::NetworkPolicy,
                    key,
                    Object::NetworkPolicy(Arc::new(policy)),
                )
            })
        }
        ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", "HTTPRoute") => cx
            .typed(validate::http_route)
            .map(|(key, route)| (Kind::HttpRoute, key, Object::HttpRoute(Arc::new(route)))),
        ("security.istio.io/v1" | "security.istio.io/v1beta1", "PeerAuthentication") => {
            cx.typed(validate::peer_authentication).map(|(key, pa)| {
                (
                    Kind::PeerAuthentication,
                    key,
                    Object::PeerAuthentication(Arc::new(pa)),
                )
            })
        }
        ("security.istio.io/v1" | "security.istio.io/v1beta1", "AuthorizationPolicy") => cx
            .typed(validate::authorization_policy)
            .map(|(key, policy)| {
                warn_ignored_target_refs(origin, &key, &policy);
                (
                    Kind::AuthorizationPolicy,
                    key,
                    Object::AuthorizationPolicy(Arc::new(policy)),
                )
            }),
        ("v1", "ConfigMap") => cx.typed(validate::config_map).map(|(key, cm)| {
            let mesh = (key.namespace == MESH_CONFIG_NAMESPACE && key.name == MESH_CONFIG_NAME)
                .then(|| cm.data.as_ref().and_then(|d| d.get("mesh")))
                .flatten()
                // Validation has reported a bad `mesh`; the update is rejected then.
                .and_then(|m| parse_mesh_config(m).ok())
                .map(Box::new);
            (Kind::ConfigMap, key, Object::ConfigMap(mesh))
        }),
        ("v1", "List") => {
            match json.get("items") {
                Some(Value::Array(items)) => {
                    for (i, item) in items.iter().enumerate() {
                        let prefix = format!("{prefix}items[{i}].");
                        decode(origin, &prefix, item, keep_json, out, cx.errors);
                    }
                }
                None | Some(Value::Null) => {}
                Some(_) => cx.errors.push(doc_error(
                    origin,
                    None,
                    &format!("{prefix}items"),
                    "must be a list".into(),
                )),
            }
            None
        }
        _ => {
            tracing::warn!(
                origin = %origin,
                path = prefix.trim_end_matches('.'),
                api_version,
                kind,
                "skipping object of a kind this agent does not use"
            );
            None
        }
    };
    if let Some((kind, key, object)) = decoded {
        let json = keep_json.then(|| {
            let mut json = json.clone();
            if !kind.cluster_scoped()
                && let Some(meta) = json.get_mut("metadata").and_then(Value::as_object_mut)
            {
                meta.insert("namespace".into(), Value::String(key.namespace.clone()));
            }
            json
        });
        out.push(Decoded {
            kind,
            key,
            object,
            json,
        });
    }
}

/// The value being decoded, and where its problems go.
struct Decoder<'a> {
    origin: &'a Origin,
    prefix: &'a str,
    json: &'a Value,
    errors: &'a mut Vec<DocError>,
}

impl Decoder<'_> {
    /// Types, strictly checks and validates the value as a `T`. Returns it with its
    /// namespace defaulted, or `None` after recording why it is unusable. Cluster-scoped
    /// objects get namespace "" (key and metadata alike), whatever the document says, as
    /// the API server ignores it.
    fn typed<T>(&mut self, validate: fn(&T) -> Vec<Problem>) -> Option<(ObjectKey, T)>
    where
        T: Resource + Metadata<Ty = ObjectMeta> + DeserializeOwned + Serialize,
        T::Scope: 'static,
    {
        let json = self.json;
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
        let (origin, prefix) = (self.origin, self.prefix);
        let error = |field: &str, message: String| {
            doc_error(
                origin,
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
                if matches!(origin, Origin::Api { .. }) {
                    // The API server validated it against its own schema: a field these
                    // types lack comes from a newer API version, and rejecting the object
                    // for it would drop a real Pod or Service from the mesh. Said, not
                    // refused (objects are decoded once per change, so once per change).
                    for field in &unknown {
                        tracing::warn!(
                            %origin, field = %format!("{prefix}{field}"),
                            "field unknown to this agent ignored (newer API version?)"
                        );
                    }
                } else {
                    self.errors.extend(
                        unknown
                            .iter()
                            .map(|field| error(field, "unknown field".into())),
                    );
                }
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
}

/// Accumulates the objects of one update, and every problem found.
#[derive(Default)]
pub(super) struct Builder {
    state: State,
    places: BTreeMap<(Kind, ObjectKey), Origin>,
    errors: Vec<DocError>,
    /// Whether to keep each object's JSON (for `apply`), in insertion order.
    keep_json: bool,
    objects: Vec<StoredObject>,
}

impl Builder {
    /// A builder that also keeps each object's JSON, for [`Builder::finish_with_objects`].
    pub(super) fn keeping_json() -> Self {
        Self {
            keep_json: true,
            ..Self::default()
        }
    }

    /// Adds the documents of one file. `file` is the name used in messages.
    pub(super) fn add_file(&mut self, file: &str, text: &str) {
        for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let origin = Origin::File {
                file: file.to_owned(),
                document: index + 1,
            };
            let mut yaml = match serde_yaml::Value::deserialize(document) {
                Ok(yaml) => yaml,
                Err(e) => {
                    // The parser cannot resynchronise after a syntax error: the rest of
                    // the file is unread, and this one error says where it stopped.
                    self.errors.push(yaml_error(&origin, &e));
                    return;
                }
            };
            if let Err(e) = yaml.apply_merge() {
                self.errors.push(yaml_error(&origin, &e));
                continue;
            }
            if yaml.is_null() {
                continue; // an empty document, e.g. a trailing `---`
            }
            match serde_json::to_value(&yaml) {
                Ok(json) => self.add_value(&origin, &json),
                Err(e) => self.errors.push(doc_error(
                    &origin,
                    None,
                    "",
                    format!("not a JSON-compatible object: {e}"),
                )),
            }
        }
    }

    /// Adds the objects of one value (an object, or a `v1 List`).
    pub(super) fn add_value(&mut self, origin: &Origin, json: &Value) {
        let mut decoded = Vec::new();
        decode(
            origin,
            "",
            json,
            self.keep_json,
            &mut decoded,
            &mut self.errors,
        );
        for object in decoded {
            self.insert(origin, object);
        }
    }

    /// Adds one decoded object, unless its kind, namespace and name are taken.
    pub(super) fn insert(&mut self, origin: &Origin, decoded: Decoded) {
        let Decoded {
            kind,
            key,
            object,
            json,
        } = decoded;
        if !self.claim(kind, &key, origin) {
            return;
        }
        if let Some(json) = json {
            self.objects.push(StoredObject {
                kind,
                key: key.clone(),
                json,
                origin: origin.clone(),
            });
        }
        self.state.put(key, object);
    }

    /// Records where the object `key` of `kind` is defined; false (and an error) when
    /// it already was.
    fn claim(&mut self, kind: Kind, key: &ObjectKey, origin: &Origin) -> bool {
        match self.places.entry((kind, key.clone())) {
            Entry::Occupied(first) => {
                let object = if key.namespace.is_empty() {
                    format!("{kind} {}", key.name)
                } else {
                    format!("{kind} {key}")
                };
                let message = format!("duplicate object, first defined in {}", first.get().place());
                self.errors
                    .push(doc_error(origin, Some(&object), "metadata.name", message));
                false
            }
            Entry::Vacant(place) => {
                place.insert(origin.clone());
                true
            }
        }
    }

    /// Runs the checks that span objects, and returns the state or every problem found.
    pub(super) fn finish(self) -> Result<State, StateError> {
        self.finish_with_objects().map(|(state, _)| state)
    }

    /// [`Builder::finish`], with the JSON of each object kept (see
    /// [`Builder::keeping_json`]).
    pub(super) fn finish_with_objects(mut self) -> Result<(State, Vec<StoredObject>), StateError> {
        let mut owners: BTreeMap<_, &ObjectKey> = BTreeMap::new();
        for (key, svc) in &self.state.services {
            for ip in cluster_ips(svc) {
                match owners.entry(ip) {
                    Entry::Vacant(owner) => {
                        owner.insert(key);
                    }
                    Entry::Occupied(first) => {
                        let first = *first.get();
                        let origin = &self.places[&(Kind::Service, key.clone())];
                        let first_origin = &self.places[&(Kind::Service, first.clone())];
                        let message = format!(
                            "cluster IP {ip} is already used by Service {first} ({})",
                            first_origin.place()
                        );
                        self.errors.push(doc_error(
                            origin,
                            Some(&format!("Service {key}")),
                            "spec.clusterIP",
                            message,
                        ));
                    }
                }
            }
        }
        if self.errors.is_empty() {
            Ok((self.state, self.objects))
        } else {
            Err(StateError::Invalid(self.errors))
        }
    }
}

impl State {
    /// Puts `object` in the state as `key`, replacing what was there.
    pub(super) fn put(&mut self, key: ObjectKey, object: Object) {
        match object {
            Object::Service(o) => _ = self.services.insert(key, o),
            Object::Pod(o) => _ = self.pods.insert(key, o),
            Object::EndpointSlice(o) => _ = self.endpoint_slices.insert(key, o),
            Object::Namespace(o) => _ = self.namespaces.insert(key, o),
            Object::NetworkPolicy(o) => _ = self.network_policies.insert(key, o),
            Object::HttpRoute(o) => _ = self.http_routes.insert(key, o),
            Object::PeerAuthentication(o) => _ = self.peer_authentications.insert(key, o),
            Object::AuthorizationPolicy(o) => _ = self.authorization_policies.insert(key, o),
            Object::ConfigMap(mesh) => {
                if is_mesh_config(&key) {
                    self.mesh_config = mesh.map(|m| *m);
                }
            }
        }
    }

    /// Takes the object `key` of `kind` out of the state.
    pub(super) fn take(&mut self, kind: Kind, key: &ObjectKey) {
        match kind {
            Kind::Service => _ = self.services.remove(key),
            Kind::Pod => _ = self.pods.remove(key),
            Kind::EndpointSlice => _ = self.endpoint_slices.remove(key),
            Kind::Namespace => _ = self.namespaces.remove(key),
            Kind::NetworkPolicy => _ = self.network_policies.remove(key),
            Kind::HttpRoute => _ = self.http_routes.remove(key),
            Kind::PeerAuthentication => _ = self.peer_authentications.remove(key),
            Kind::AuthorizationPolicy => _ = self.authorization_policies.remove(key),
            Kind::ConfigMap => {
                if is_mesh_config(key) {
                    self.mesh_config = None;
                }
            }
        }
    }
}

/// Whether `key` names the ConfigMap holding Istio's MeshConfig.
fn is_mesh_config(key: &ObjectKey) -> bool {
    key.namespace == MESH_CONFIG_NAMESPACE && key.name == MESH_CONFIG_NAME
}

/// Gateway targets are enforced by the Gateway's own controller, not by this mesh: a
/// warning says so, the way unknown kinds are reported.
fn warn_ignored_target_refs(origin: &Origin, key: &ObjectKey, policy: &AuthorizationPolicy) {
    let refs = policy
        .spec
        .target_ref
        .iter()
        .chain(&policy.spec.target_refs);
    for r in refs.filter(|r| r.kind == "Gateway") {
        tracing::warn!(
            origin = %origin,
            policy = %key,
            gateway = %r.name,
            "AuthorizationPolicy targetRef to a Gateway is left to the Gateway's controller"
        );
    }
}

pub(super) fn doc_error(
    origin: &Origin,
    object: Option<&str>,
    field: &str,
    message: String,
) -> DocError {
    DocError {
        origin: origin.clone(),
        line: None,
        object: object.map(str::to_owned),
        field: (!field.is_empty()).then(|| field.to_owned()),
        message,
    }
}

fn yaml_error(origin: &Origin, e: &serde_yaml::Error) -> DocError {
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
        ..doc_error(origin, None, "", message)
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
