//! Tunnelled streams (and captured plaintext connections) to HTTP ports of a pod: the
//! destination side reads the requests in the stream so AuthorizationPolicy can judge each one with its HTTP fields (method,
//! path, host, headers), as Istio does on HTTP ports. Allowed requests go on to the
//! application over one connection made in its pod, in the protocol the client spoke;
//! denied ones get 403 `RBAC: access denied`, as from Envoy.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version, request::Parts};
use http_body_util::{BodyExt, Full};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{net::TcpStream, sync::Mutex};

use super::inbound::Refusal;
use crate::upstream::{Body, BoxError};

/// The body Envoy answers denied requests with.
const RBAC_DENIED: &str = "RBAC: access denied";

/// The connection to the application, made by the first request in the protocol it
/// came in.
enum App {
    Http1(http1::SendRequest<Incoming>),
    Http2(http2::SendRequest<Incoming>),
}

/// Serves the requests in `stream` until it ends: each judged by `check`, the allowed
/// ones forwarded on `app` (connected to the application's `target` port).
pub async fn serve<S, C>(stream: S, app: TcpStream, target: SocketAddr, check: C)
where
    S: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    C: Fn(&Parts) -> Result<(), Refusal> + Send + Sync + 'static,
{
    let app = std::sync::Arc::new(Mutex::new((Some(app), None::<App>)));
    let check = std::sync::Arc::new(check);
    let service = service_fn(move |req: Request<Incoming>| {
        let (app, check) = (std::sync::Arc::clone(&app), std::sync::Arc::clone(&check));
        async move {
            let (parts, body) = req.into_parts();
            if let Err(refusal) = check(&parts) {
                tracing::info!(
                    %target, method = %parts.method, path = parts.uri.path(),
                    reason = refusal.reason, detail = %refusal.detail, "request refused"
                );
                return Ok::<_, std::convert::Infallible>(local(
                    StatusCode::FORBIDDEN,
                    RBAC_DENIED,
                ));
            }
            let req = Request::from_parts(parts, body);
            let mut slot = app.lock().await;
            if slot.1.is_none() {
                let Some(tcp) = slot.0.take() else {
                    return Ok(local(StatusCode::SERVICE_UNAVAILABLE, "upstream gone"));
                };
                match handshake(tcp, req.version()).await {
                    Ok(a) => slot.1 = Some(a),
                    Err(e) => {
                        tracing::warn!(%target, error = %e, "application handshake failed");
                        return Ok(local(StatusCode::SERVICE_UNAVAILABLE, "upstream handshake"));
                    }
                }
            }
            let sent = match slot.1.as_mut() {
                Some(App::Http1(s)) => {
                    // HTTP/1.1 carries one request at a time: keep the lock until the
                    // connection is ready again.
                    if s.ready().await.is_err() {
                        return Ok(local(StatusCode::SERVICE_UNAVAILABLE, "upstream closed"));
                    }
                    let fut = s.send_request(req);
                    drop(slot);
                    fut.await
                }
                Some(App::Http2(s)) => {
                    let fut = s.send_request(req);
                    drop(slot);
                    fut.await
                }
                None => return Ok(local(StatusCode::SERVICE_UNAVAILABLE, "upstream gone")),
            };
            Ok(match sent {
                Ok(resp) => resp.map(|b| b.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync()),
                Err(e) => {
                    tracing::debug!(%target, error = %e, "application request failed");
                    local(StatusCode::BAD_GATEWAY, "upstream reset")
                }
            })
        }
    });
    let served = auto::Builder::new(TokioExecutor::new())
        .serve_connection(stream, service)
        .await;
    if let Err(e) = served {
        tracing::debug!(%target, error = %e, "tunnelled HTTP stream ended");
    }
}

/// A client connection to the application in `version`'s protocol, its connection task
/// spawned.
async fn handshake(tcp: TcpStream, version: Version) -> Result<App, hyper::Error> {
    let io = TokioIo::new(tcp);
    if version == Version::HTTP_2 {
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await?;
        tokio::spawn(conn);
        Ok(App::Http2(send))
    } else {
        let (send, conn) = http1::handshake(io).await?;
        tokio::spawn(conn);
        Ok(App::Http1(send))
    }
}

fn local(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp
}
