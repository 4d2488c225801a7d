//! Connecting to etcd: endpoints, timeouts, and TLS client authentication.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use super::layout::Layout;

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one request may take (a watch: until its stream is set up).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 keepalive: a member that stops answering (not only one that closes its
/// connections) is noticed within about interval + timeout.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// How to reach an etcd cluster, and where the mesh's keys live in it.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// Member URLs (`http://10.0.0.1:2379`, `https://...` with TLS).
    pub endpoints: Vec<String>,
    /// The key layout under `--etcd-prefix`.
    pub layout: Layout,
    /// CA certificate (PEM) that signed the members' certificates.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for TLS client authentication.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl EtcdConfig {
    /// The connection options: timeouts, keepalive, and TLS when a CA or a client
    /// identity is given (TLS files are read now, so a bad path fails at once).
    pub fn options(&self) -> anyhow::Result<ConnectOptions> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
            .with_keep_alive_while_idle(true)
            // A member cut off from its cluster's leader must not serve a stale view.
            .with_require_leader(true);
        if self.ca.is_some() || self.identity.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.ca {
                let pem = std::fs::read(ca)
                    .with_context(|| format!("reading the etcd CA {}", ca.display()))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let Some((cert, key)) = &self.identity {
                let cert_pem = std::fs::read(cert).with_context(|| {
                    format!("reading the etcd client certificate {}", cert.display())
                })?;
                let key_pem = std::fs::read(key)
                    .with_context(|| format!("reading the etcd client key {}", key.display()))?;
                tls = tls.identity(Identity::from_pem(cert_pem, key_pem));
            }
            options = options.with_tls(tls);
        }
        Ok(options)
    }

    /// Connects (lazily: the first request reaches a member).
    pub async fn connect(&self, options: &ConnectOptions) -> anyhow::Result<Client> {
        Client::connect(&self.endpoints, Some(options.clone()))
            .await
            .with_context(|| format!("connecting to etcd at {}", self.endpoints.join(",")))
    }
}
