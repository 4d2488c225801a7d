//! Connecting to the API server: the in-cluster configuration (the pod's ServiceAccount
//! token, `KUBERNETES_SERVICE_HOST`) or a kubeconfig file, and a client that records
//! whether the API server answers, so the source can say it is stale.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, client::ClientBuilder};
use tokio::sync::watch;
use tracing::{info, warn};

/// Where the API server is and how to authenticate to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Connect {
    /// In a pod: its ServiceAccount and the `KUBERNETES_SERVICE_*` environment.
    InCluster,
    /// A kubeconfig file (its current context).
    Kubeconfig(PathBuf),
}

/// Why no client could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Not in a pod, or its ServiceAccount files are unreadable.
    #[error("in-cluster Kubernetes configuration")]
    InCluster(#[source] kube::config::InClusterError),
    /// The kubeconfig file is unreadable or invalid.
    #[error("kubeconfig {}", path.display())]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// The HTTP client could not be built (e.g. bad TLS material).
    #[error("Kubernetes API client")]
    Client(#[source] kube::Error),
}

/// The settings read when the source starts, so that a missing kubeconfig or a
/// process outside a pod fails the start instead of a background task.
#[derive(Clone, Debug)]
pub enum Prepared {
    /// The in-cluster configuration.
    InCluster(Box<Config>),
    /// A parsed kubeconfig file (turning it into a configuration may run its
    /// credential plugins, which is done asynchronously).
    Kubeconfig(PathBuf, Box<Kubeconfig>),
}

/// Reads the settings `connect` names.
pub fn prepare(connect: &Connect) -> Result<Prepared, ConnectError> {
    match connect {
        Connect::InCluster => Ok(Prepared::InCluster(Box::new(
            Config::incluster().map_err(ConnectError::InCluster)?,
        ))),
        Connect::Kubeconfig(path) => {
            let file = Kubeconfig::read_from(path).map_err(|source| ConnectError::Kubeconfig {
                path: path.clone(),
                source,
            })?;
            Ok(Prepared::Kubeconfig(path.clone(), Box::new(file)))
        }
    }
}

/// Whether the API server answers: the outcome of the client's latest request,
/// published as "failing since" (None while it answers).
#[derive(Debug)]
pub struct Reachability {
    failing_since: watch::Sender<Option<SystemTime>>,
}

impl Reachability {
    /// Publishes to `failing_since`.
    pub fn new(failing_since: watch::Sender<Option<SystemTime>>) -> Self {
        Self { failing_since }
    }

    fn answered(&self) {
        self.failing_since.send_if_modified(|since| {
            let was_failing = since.take().is_some();
            if was_failing {
                info!("Kubernetes API server answers again");
            }
            was_failing
        });
    }

    fn failed(&self) {
        self.failing_since.send_if_modified(|since| {
            if since.is_some() {
                return false;
            }
            warn!("Kubernetes API server unreachable; the last good state stays in force");
            *since = Some(SystemTime::now());
            true
        });
    }
}

/// A client for `prepared` whose requests report to `reach`.
pub async fn client(prepared: &Prepared, reach: Arc<Reachability>) -> Result<Client, ConnectError> {
    let config = match prepared {
        Prepared::InCluster(config) => (**config).clone(),
        Prepared::Kubeconfig(path, file) => {
            Config::from_custom_kubeconfig((**file).clone(), &KubeConfigOptions::default())
                .await
                .map_err(|source| ConnectError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
    };
    let builder = ClientBuilder::try_from(config).map_err(ConnectError::Client)?;
    Ok(builder.with_layer(&ObserveLayer(reach)).build())
}

/// Records each response (or failure) of the client in a [`Reachability`]. A watch
/// that was answered counts as reachable although its events may be rare, which the
/// watch stream alone could not tell.
struct ObserveLayer(Arc<Reachability>);

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe {
            inner,
            reach: self.0.clone(),
        }
    }
}

#[derive(Clone)]
struct Observe<S> {
    inner: S,
    reach: Arc<Reachability>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> tower::Service<http::Request<B>> for Observe<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    RB: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let response = self.inner.call(request);
        let reach = self.reach.clone();
        Box::pin(async move {
            let response = response.await;
            match &response {
                Ok(r) if serves(r.status()) => reach.answered(),
                _ => reach.failed(),
            }
            response
        })
    }
}

/// Whether a reply means the API server serves this agent: most 4xx are answers (410
/// Gone, 404 for a missing CRD), but 401 and 403 (an expired token, RBAC lacking) cut
/// the agent off as surely as 5xx or no reply.
fn serves(status: http::StatusCode) -> bool {
    !status.is_server_error()
        && status != http::StatusCode::UNAUTHORIZED
        && status != http::StatusCode::FORBIDDEN
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Service as _, ServiceExt as _};

    #[test]
    fn an_unreadable_kubeconfig_fails_the_start_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let err = prepare(&Connect::Kubeconfig(missing.clone())).unwrap_err();
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "clusters: [").unwrap();
        let err = prepare(&Connect::Kubeconfig(bad.clone())).unwrap_err();
        assert!(err.to_string().contains("bad"), "{err}");
    }

    #[tokio::test]
    async fn replies_and_failures_set_reachability() {
        let (tx, rx) = watch::channel(None);
        let reach = Arc::new(Reachability::new(tx));
        let inner = tower::service_fn(|request: http::Request<()>| async move {
            let code = request.uri().path().trim_start_matches('/');
            match code.parse::<u16>() {
                Ok(code) => {
                    let mut response = http::Response::new(());
                    *response.status_mut() = http::StatusCode::from_u16(code).unwrap();
                    Ok(response)
                }
                Err(_) => Err("connection refused"),
            }
        });
        let mut service = tower::Layer::layer(&ObserveLayer(reach), inner);
        let mut call = async |path: &str| {
            let request = http::Request::get(path).body(()).unwrap();
            let _ = service.ready().await.unwrap().call(request).await;
            *rx.borrow()
        };
        assert_eq!(call("/200").await, None);
        let since = call("/refused").await.expect("failing");
        assert_eq!(
            call("/503").await,
            Some(since),
            "still failing since the first"
        );
        assert_eq!(call("/410").await, None, "410 Gone is an answer");
        assert!(call("/403").await.is_some(), "403 cuts the agent off");
        assert_eq!(call("/404").await, None);
        assert!(call("/401").await.is_some());
    }
}
