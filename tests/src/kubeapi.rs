//! An in-process stand-in for the Kubernetes API server, speaking its list/watch wire
//! protocol over plain HTTP/1.1, so the agent's Kubernetes source can be tested where
//! no API server can run.
//!
//! What it serves, as the real one does:
//! - `GET /api/v1/<plural>`, `/api/v1/namespaces/<ns>/<plural>`,
//!   `/apis/<group>/<version>/<plural>` and the namespaced form: a JSON `<Kind>List`
//!   whose `metadata.resourceVersion` is the store's current version (items without
//!   `apiVersion`/`kind` for built-in kinds, as the API server sends typed lists);
//! - with `?watch=1&resourceVersion=N&allowWatchBookmarks=true`: a chunked stream of
//!   JSON lines `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":...}`, first
//!   the events after version N that are still remembered, then live ones;
//! - a watch from a version older than the remembered events ([`KubeApi::compact`]):
//!   an `ERROR` event holding a `Status` with code 410 (`Expired`), which is what the
//!   API server's watch cache does, or, with [`GoneStyle::Http`], an HTTP 410 reply; a
//!   list at an exact version that old is an HTTP 410 too;
//! - `fieldSelector` on `metadata.name` and `metadata.namespace`;
//! - 404 with a `Status` for a resource it does not serve (a CRD not installed).
//!
//! Versions are one counter for all resources, as etcd's revision is. Tests drive it
//! with [`KubeApi::apply`], [`KubeApi::delete`], [`KubeApi::bookmark`],
//! [`KubeApi::compact`], [`KubeApi::end_watches`] (a watch timeout),
//! [`KubeApi::disconnect`] (cuts every open connection, as a restarting API server or
//! a network failure does) and [`KubeApi::set_reachable`], and check what clients
//! asked with [`KubeApi::requests`].

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::Node;

/// How a watch from an expired resourceVersion is refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GoneStyle {
    /// HTTP 200, then one `ERROR` event with a 410 `Status`, then the end of the
    /// stream: what the API server does.
    #[default]
    Event,
    /// An HTTP 410 reply with a `Status` body.
    Http,
}

/// One request a client made, for assertions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiRequest {
    /// The resource (plural), e.g. `services`.
    pub resource: String,
    /// Whether it was a watch (else a list).
    pub watch: bool,
    /// Its `resourceVersion` parameter.
    pub resource_version: Option<String>,
}

/// A served resource.
#[derive(Clone, Debug)]
struct Resource {
    api_version: String,
    kind: String,
    namespaced: bool,
    /// Defined by a CRD: list items keep `apiVersion` and `kind`.
    custom: bool,
}

/// One remembered change.
#[derive(Clone, Debug)]
struct Change {
    version: u64,
    resource: String,
    kind: &'static str,
    object: Value,
}

/// An open watch.
struct Watcher {
    resource: String,
    filter: Filter,
    bookmarks: bool,
    events: mpsc::UnboundedSender<Bytes>,
}

/// `fieldSelector` and the namespace of the path.
#[derive(Clone, Debug, Default)]
struct Filter {
    namespace: Option<String>,
    name: Option<String>,
}

impl Filter {
    fn matches(&self, object: &Value) -> bool {
        let field = |f: &str| {
            object["metadata"][f]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        };
        self.namespace
            .as_ref()
            .is_none_or(|ns| *ns == field("namespace"))
            && self.name.as_ref().is_none_or(|n| *n == field("name"))
    }
}

#[derive(Default)]
struct Store {
    version: u64,
    resources: BTreeMap<String, Resource>,
    /// Objects by resource, then (namespace, name).
    objects: BTreeMap<String, BTreeMap<(String, String), Value>>,
    /// Changes after `compacted`, oldest first.
    changes: Vec<Change>,
    compacted: u64,
    watchers: Vec<Watcher>,
    requests: Vec<ApiRequest>,
    gone: GoneStyle,
    reachable: bool,
}

struct Shared {
    store: Mutex<Store>,
    /// Bumped to cut every open connection.
    cut: watch::Sender<u64>,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The kinds the mesh reads, as an API server with the Gateway API and Istio CRDs
/// installed serves them: (apiVersion, kind, plural, namespaced, custom).
const KINDS: [(&str, &str, &str, bool, bool); 9] = [
    ("v1", "Service", "services", true, false),
    ("v1", "Pod", "pods", true, false),
    ("v1", "Namespace", "namespaces", false, false),
    ("v1", "ConfigMap", "configmaps", true, false),
    (
        "discovery.k8s.io/v1",
        "EndpointSlice",
        "endpointslices",
        true,
        false,
    ),
    (
        "networking.k8s.io/v1",
        "NetworkPolicy",
        "networkpolicies",
        true,
        false,
    ),
    (
        "gateway.networking.k8s.io/v1",
        "HTTPRoute",
        "httproutes",
        true,
        true,
    ),
    (
        "security.istio.io/v1",
        "PeerAuthentication",
        "peerauthentications",
        true,
        true,
    ),
    (
        "security.istio.io/v1",
        "AuthorizationPolicy",
        "authorizationpolicies",
        true,
        true,
    ),
];

/// The fake API server; stops (closing every connection) when dropped.
pub struct KubeApi {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl KubeApi {
    /// Serves on an ephemeral port of this network namespace's loopback.
    pub fn start() -> Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
        Self::serve(listener)
    }

    /// Serves on an ephemeral port of `node`'s loopback, where an agent running in that
    /// node's network namespace reaches it (and nothing outside does). The socket is
    /// made by a thread that entered the namespace; it stays there.
    pub fn start_on(node: &Node) -> Result<Self> {
        let listener = crate::sys::in_netns(&node.netns_path(), || {
            std::net::TcpListener::bind("127.0.0.1:0")
        })
        .context("enter the node netns")?
        .context("bind 127.0.0.1:0 in the node netns")?;
        Self::serve(listener)
    }

    fn serve(listener: std::net::TcpListener) -> Result<Self> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let mut store = Store {
            reachable: true,
            ..Store::default()
        };
        for (api_version, kind, plural, namespaced, custom) in KINDS {
            store.resources.insert(
                plural.to_owned(),
                Resource {
                    api_version: api_version.to_owned(),
                    kind: kind.to_owned(),
                    namespaced,
                    custom,
                },
            );
        }
        let shared = Arc::new(Shared {
            store: Mutex::new(store),
            cut: watch::channel(0).0,
        });
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("tokio runtime")?;
        let thread = std::thread::Builder::new()
            .name("kubeapi".into())
            .spawn({
                let shared = shared.clone();
                move || {
                    runtime.block_on(async move {
                        let listener = match tokio::net::TcpListener::from_std(listener) {
                            Ok(l) => l,
                            Err(err) => return eprintln!("kubeapi: listener: {err}"),
                        };
                        tokio::select! {
                            () = accept(listener, shared) => {}
                            _ = stopped => {}
                        }
                    });
                }
            })
            .context("spawn the kubeapi thread")?;
        Ok(Self {
            shared,
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Writes a kubeconfig for this server (plain HTTP, a dummy bearer token) into
    /// `dir` and returns its path.
    pub fn write_kubeconfig(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1
kind: Config
clusters:
  - name: fake
    cluster: {{server: \"http://{}\"}}
users:
  - name: fake
    user: {{token: test-token}}
contexts:
  - name: fake
    context: {{cluster: fake, user: fake}}
current-context: fake
",
            self.addr
        );
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    }

    /// Creates or replaces an object (its `apiVersion` and `kind` say which resource);
    /// watchers get ADDED or MODIFIED. Sets `metadata.resourceVersion` (and defaults
    /// the namespace); returns the new version.
    pub fn apply(&self, mut object: Value) -> Result<u64> {
        let mut store = self.shared.store();
        let (plural, resource) = store.resource_of(&object)?;
        let metadata = object
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .context("object without metadata")?;
        if resource.namespaced && !metadata.contains_key("namespace") {
            metadata.insert("namespace".into(), json!("default"));
        }
        let key = object_key(&object);
        let version = store.version + 1;
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        let objects = store.objects.entry(plural.clone()).or_default();
        let kind = match objects.insert(key, object.clone()) {
            Some(_) => "MODIFIED",
            None => "ADDED",
        };
        store.record(plural, kind, object);
        Ok(version)
    }

    /// [`KubeApi::apply`] for each object of a multi-document YAML text.
    pub fn apply_yaml(&self, yaml: &str) -> Result<()> {
        for document in yaml_documents(yaml)? {
            self.apply(document)?;
        }
        Ok(())
    }

    /// Deletes an object; watchers get DELETED. False when there was none.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<bool> {
        let mut store = self.shared.store();
        let probe = json!({"apiVersion": api_version, "kind": kind});
        let (plural, _) = store.resource_of(&probe)?;
        let key = (namespace.to_owned(), name.to_owned());
        let Some(mut object) = store.objects.get_mut(&plural).and_then(|o| o.remove(&key)) else {
            return Ok(false);
        };
        object["metadata"]["resourceVersion"] = json!((store.version + 1).to_string());
        store.record(plural, "DELETED", object);
        Ok(true)
    }

    /// Sends a BOOKMARK at the current version on every open watch that allows them.
    pub fn bookmark(&self) {
        let mut store = self.shared.store();
        let version = store.version.to_string();
        let resources = store.resources.clone();
        store.watchers.retain(|w| {
            let Some(resource) = resources.get(&w.resource).filter(|_| w.bookmarks) else {
                return true;
            };
            let event = json!({"type": "BOOKMARK", "object": {
                "apiVersion": resource.api_version,
                "kind": resource.kind,
                "metadata": {"resourceVersion": version},
            }});
            w.events.send(line(&event)).is_ok()
        });
    }

    /// Forgets every change made so far: a watch from an older version is refused
    /// with 410 Gone, as after etcd compacted the history.
    pub fn compact(&self) {
        let mut store = self.shared.store();
        store.compacted = store.version;
        store.changes.clear();
    }

    /// Ends every open watch after the events already sent, as the API server does
    /// when a watch's timeout expires: clients resume from the newest version they
    /// saw (a bookmark's included).
    pub fn end_watches(&self) {
        self.shared.store().watchers.clear();
    }

    /// Cuts every open connection (watches included) without finishing their
    /// responses, as a restarting API server or a broken network does.
    pub fn disconnect(&self) {
        self.shared.store().watchers.clear();
        self.shared.cut.send_modify(|n| *n += 1);
    }

    /// While false, every connection is cut at once: clients see the server as down.
    pub fn set_reachable(&self, reachable: bool) {
        self.shared.store().reachable = reachable;
        if !reachable {
            self.disconnect();
        }
    }

    /// How a watch from an expired version is refused (see [`GoneStyle`]).
    pub fn set_gone_style(&self, style: GoneStyle) {
        self.shared.store().gone = style;
    }

    /// Stops serving `plural` (404, as for a CRD that is not installed).
    pub fn remove_resource(&self, plural: &str) {
        let mut store = self.shared.store();
        store.resources.remove(plural);
        store.objects.remove(plural);
    }

    /// Every list and watch request so far, oldest first.
    pub fn requests(&self) -> Vec<ApiRequest> {
        self.shared.store().requests.clone()
    }

    /// How many lists of `resource` were made.
    pub fn lists(&self, resource: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.resource == resource && !r.watch)
            .count()
    }

    /// The resourceVersions the watches of `resource` started from, oldest first.
    pub fn watches(&self, resource: &str) -> Vec<Option<String>> {
        self.requests()
            .into_iter()
            .filter(|r| r.resource == resource && r.watch)
            .map(|r| r.resource_version)
            .collect()
    }

    /// Number of watches open now on `resource`.
    pub fn open_watches(&self, resource: &str) -> usize {
        let mut store = self.shared.store();
        store.watchers.retain(|w| !w.events.is_closed());
        store
            .watchers
            .iter()
            .filter(|w| w.resource == resource)
            .count()
    }

    /// The current resourceVersion.
    pub fn version(&self) -> u64 {
        self.shared.store().version
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.disconnect();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Store {
    /// The resource an object belongs to, by its `apiVersion` and `kind`.
    fn resource_of(&self, object: &Value) -> Result<(String, Resource)> {
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let kind = object["kind"].as_str().unwrap_or_default();
        match self
            .resources
            .iter()
            .find(|(_, r)| r.api_version == api_version && r.kind == kind)
        {
            Some((plural, resource)) => Ok((plural.clone(), resource.clone())),
            None => bail!("the server does not serve {api_version} {kind}"),
        }
    }

    /// Bumps the version, remembers the change and sends it to matching watches.
    fn record(&mut self, resource: String, kind: &'static str, object: Value) {
        self.version += 1;
        let event = line(&json!({"type": kind, "object": object}));
        self.watchers.retain(|w| {
            if w.resource != resource || !w.filter.matches(&object) {
                return !w.events.is_closed();
            }
            w.events.send(event.clone()).is_ok()
        });
        self.changes.push(Change {
            version: self.version,
            resource,
            kind,
            object,
        });
    }
}

/// `(namespace, name)` of an object.
fn object_key(object: &Value) -> (String, String) {
    let field = |f: &str| {
        object["metadata"][f]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    (field("namespace"), field("name"))
}

/// One watch event as a JSON line.
fn line(event: &Value) -> Bytes {
    let mut text = event.to_string();
    text.push('\n');
    Bytes::from(text)
}

/// The documents of a multi-document YAML text, as JSON.
fn yaml_documents(yaml: &str) -> Result<Vec<Value>> {
    let mut documents = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let value = <serde_yaml::Value as serde::Deserialize>::deserialize(document)
            .with_context(|| format!("YAML document {}", i + 1))?;
        if !value.is_null() {
            documents.push(serde_json::to_value(value).context("YAML to JSON")?);
        }
    }
    Ok(documents)
}

type Body = BoxBody<Bytes, Infallible>;

async fn accept(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        if !shared.store().reachable {
            drop(stream);
            continue;
        }
        let shared = shared.clone();
        let mut cut = shared.cut.subscribe();
        tokio::spawn(async move {
            let service = service_fn({
                let shared = shared.clone();
                move |request| {
                    let shared = shared.clone();
                    async move { Ok::<_, Infallible>(handle(&shared, &request)) }
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                // Dropping the connection closes the socket mid-response.
                _ = cut.changed() => {}
            }
        });
    }
}

/// Answers one request.
fn handle(shared: &Shared, request: &Request<Incoming>) -> Response<Body> {
    if request.method() != Method::GET {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "read only",
        );
    }
    let Some((namespace, plural)) = parse_path(request.uri().path()) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    let query: BTreeMap<String, String> = request
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect();
    let watch = query.get("watch").is_some_and(|w| w == "1" || w == "true");
    let mut store = shared.store();
    store.requests.push(ApiRequest {
        resource: plural.clone(),
        watch,
        resource_version: query.get("resourceVersion").cloned(),
    });
    let Some(resource) = store.resources.get(&plural).cloned() else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    let mut filter = Filter {
        namespace: namespace.filter(|_| resource.namespaced),
        name: None,
    };
    if let Some(selector) = query.get("fieldSelector") {
        for term in selector.split(',').filter(|t| !t.is_empty()) {
            match term.split_once('=') {
                Some(("metadata.name", v)) => filter.name = Some(v.to_owned()),
                Some(("metadata.namespace", v)) => filter.namespace = Some(v.to_owned()),
                _ => {
                    let message = format!("field label not supported: {term}");
                    return status(StatusCode::BAD_REQUEST, "BadRequest", &message);
                }
            }
        }
    }
    let version = query
        .get("resourceVersion")
        .filter(|v| !v.is_empty() && *v != "0")
        .map(|v| v.parse::<u64>());
    let version = match version {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(_)) => {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "invalid resourceVersion",
            );
        }
    };
    if watch {
        let bookmarks = query
            .get("allowWatchBookmarks")
            .is_some_and(|b| b == "true");
        start_watch(&mut store, plural, filter, version, bookmarks)
    } else {
        let exact = query
            .get("resourceVersionMatch")
            .is_some_and(|m| m == "Exact");
        if exact && version.is_some_and(|v| v < store.compacted) {
            return gone();
        }
        list(&store, &plural, &resource, &filter)
    }
}

/// `/api/v1/...` or `/apis/<group>/<version>/...` → (namespace, plural).
fn parse_path(path: &str) -> Option<(Option<String>, String)> {
    let rest = match path.strip_prefix("/api/v1/") {
        Some(rest) => rest,
        None => {
            let rest = path.strip_prefix("/apis/")?;
            let mut parts = rest.splitn(3, '/');
            let (_group, _version, rest) = (parts.next()?, parts.next()?, parts.next()?);
            rest
        }
    };
    let segments: Vec<&str> = rest.split('/').collect();
    match segments.as_slice() {
        [plural] => Some((None, (*plural).to_owned())),
        ["namespaces", namespace, plural] => {
            Some((Some((*namespace).to_owned()), (*plural).to_owned()))
        }
        _ => None,
    }
}

fn list(store: &Store, plural: &str, resource: &Resource, filter: &Filter) -> Response<Body> {
    let items: Vec<Value> = store
        .objects
        .get(plural)
        .into_iter()
        .flat_map(|o| o.values())
        .filter(|o| filter.matches(o))
        .map(|o| {
            let mut item = o.clone();
            if !resource.custom
                && let Some(map) = item.as_object_mut()
            {
                map.remove("apiVersion");
                map.remove("kind");
            }
            item
        })
        .collect();
    let body = json!({
        "apiVersion": resource.api_version,
        "kind": format!("{}List", resource.kind),
        "metadata": {"resourceVersion": store.version.to_string()},
        "items": items,
    });
    respond(StatusCode::OK, body.to_string())
}

fn start_watch(
    store: &mut Store,
    plural: String,
    filter: Filter,
    version: Option<u64>,
    bookmarks: bool,
) -> Response<Body> {
    let (events, receiver) = mpsc::unbounded_channel();
    match version {
        Some(v) if v < store.compacted => {
            if store.gone == GoneStyle::Http {
                return gone();
            }
            let event = json!({"type": "ERROR", "object": status_json(
                410, "Expired", &format!("too old resource version: {v} ({})", store.compacted))});
            let _ = events.send(line(&event));
            drop(events);
            return stream(receiver);
        }
        Some(v) => {
            for change in store
                .changes
                .iter()
                .filter(|c| c.version > v && c.resource == plural && filter.matches(&c.object))
            {
                let _ = events.send(line(&json!({"type": change.kind, "object": change.object})));
            }
        }
        // No version: the current objects as ADDED, then what follows.
        None => {
            for object in store
                .objects
                .get(&plural)
                .into_iter()
                .flat_map(|o| o.values())
            {
                if filter.matches(object) {
                    let _ = events.send(line(&json!({"type": "ADDED", "object": object})));
                }
            }
        }
    }
    store.watchers.push(Watcher {
        resource: plural,
        filter,
        bookmarks,
        events,
    });
    stream(receiver)
}

fn stream(receiver: mpsc::UnboundedReceiver<Bytes>) -> Response<Body> {
    let frames =
        UnboundedReceiverStream::new(receiver).map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let mut response = Response::new(StreamBody::new(frames).boxed());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        "application/json".parse().expect("header value"),
    );
    response
}

fn gone() -> Response<Body> {
    status(StatusCode::GONE, "Expired", "too old resource version")
}

fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    respond(
        code,
        status_json(code.as_u16(), reason, message).to_string(),
    )
}

fn respond(code: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed());
    *response.status_mut() = code;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        "application/json".parse().expect("header value"),
    );
    response
}

/// Decodes `%XX` escapes and `+` of a query value.
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| value.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_query_values() {
        assert_eq!(
            parse_path("/api/v1/services"),
            Some((None, "services".into()))
        );
        assert_eq!(
            parse_path("/api/v1/namespaces"),
            Some((None, "namespaces".into()))
        );
        assert_eq!(
            parse_path("/api/v1/namespaces/istio-system/configmaps"),
            Some((Some("istio-system".into()), "configmaps".into()))
        );
        assert_eq!(
            parse_path("/apis/gateway.networking.k8s.io/v1/httproutes"),
            Some((None, "httproutes".into()))
        );
        assert_eq!(parse_path("/version"), None);
        assert_eq!(
            percent_decode("metadata.name%3Distio"),
            "metadata.name=istio"
        );
        assert_eq!(percent_decode("a+b%2"), "a b%2");
    }

    /// The wire format, as a client sees it over a socket.
    #[test]
    fn speaks_list_watch_and_gone() {
        let api = KubeApi::start().unwrap();
        let service = json!({"apiVersion": "v1", "kind": "Service",
                             "metadata": {"name": "web"}, "spec": {}});
        assert_eq!(api.apply(service.clone()).unwrap(), 1);
        let get = |path: &str| crate::agent::http_get(api.addr(), path);

        let list: Value = serde_json::from_str(&get("/api/v1/services").unwrap()).unwrap();
        assert_eq!(list["kind"], "ServiceList");
        assert_eq!(list["metadata"]["resourceVersion"], "1");
        let item = &list["items"][0];
        assert_eq!(item["metadata"]["namespace"], "default");
        assert!(item.get("kind").is_none(), "typed list items carry no kind");

        api.apply(service).unwrap();
        // A watch whose stream ends (Connection: close ends it after what is queued).
        api.compact();
        let gone = get("/api/v1/services?watch=1&resourceVersion=1").unwrap();
        let event: Value = serde_json::from_str(gone.lines().next().unwrap()).unwrap();
        assert_eq!(event["type"], "ERROR");
        assert_eq!(event["object"]["code"], 410);
        assert_eq!(event["object"]["reason"], "Expired");
        let exact = get("/api/v1/services?resourceVersion=1&resourceVersionMatch=Exact");
        assert!(exact.unwrap_err().to_string().contains(" 410 "));
        api.set_gone_style(GoneStyle::Http);
        let refused = get("/api/v1/services?watch=1&resourceVersion=1");
        assert!(refused.unwrap_err().to_string().contains(" 410 "));

        api.remove_resource("httproutes");
        let missing = get("/apis/gateway.networking.k8s.io/v1/httproutes");
        assert!(missing.unwrap_err().to_string().contains(" 404 "));
        let selected =
            get("/api/v1/namespaces/default/services?fieldSelector=metadata.name%3Dother");
        let selected: Value = serde_json::from_str(&selected.unwrap()).unwrap();
        assert_eq!(selected["items"], json!([]));
        assert_eq!(api.lists("services"), 3);
        assert_eq!(
            api.watches("services"),
            [Some("1".to_owned()), Some("1".to_owned())]
        );
    }
}
