//! Connecting to etcd: endpoints, timeouts, and TLS client authentication.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use etcd_client::{
    Certificate, Client, ConnectOptions, GetOptions, Identity, KeyValue, TlsOptions,
};

use super::layout::Layout;

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one request may take (a watch: until its stream is set up).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 keepalive: a member that stops answering (not only one that closes its
/// connections) is noticed within about interval + timeout.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Keys per page of a list: bounds each response, as the API server's lists of etcd do.
const PAGE: i64 = 1000;
/// Largest watch response accepted: one revision's events arrive in one message, and
/// a transaction of 20,000 objects is about 10 MB.
pub const MAX_WATCH_MESSAGE: usize = 256 << 20;

/// Every key under `prefix` at one revision, read in pages of [`PAGE`] keys; returns
/// them with that revision.
pub async fn list(
    client: &mut Client,
    prefix: &str,
) -> Result<(Vec<KeyValue>, i64), etcd_client::Error> {
    let end = prefix_end(prefix.as_bytes());
    let mut kvs = Vec::new();
    let mut from = prefix.as_bytes().to_vec();
    let mut revision = 0;
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if revision != 0 {
            // Later pages read the first page's revision: one consistent snapshot.
            options = options.with_revision(revision);
        }
        let mut page = client.get(from.clone(), Some(options)).await?;
        if revision == 0 {
            revision = page.header().map_or(0, |h| h.revision());
        }
        let more = page.more();
        let page = page.take_kvs();
        if let Some(last) = page.last() {
            from = [last.key(), b"\0"].concat();
        }
        kvs.extend(page);
        if !more {
            return Ok((kvs, revision));
        }
    }
}

/// The end of the key range of `prefix`: its last byte below 0xff incremented.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

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

    /// Connects to one member that answers and has a leader, trying the endpoints in
    /// order from the `start`th (callers rotate it, so a retry after a failure tries the
    /// next member first). One member at a time, as etcd's own clients do: a balanced
    /// channel keeps sending a share of the requests to a dead member.
    pub async fn connect(&self, options: &ConnectOptions, start: usize) -> anyhow::Result<Client> {
        let mut problems = Vec::new();
        let count = self.endpoints.len();
        for endpoint in (0..count).map(|i| &self.endpoints[(start + i) % count]) {
            match probe(endpoint, options).await {
                Ok(client) => return Ok(client),
                Err(err) => problems.push(format!("{endpoint}: {err:#}")),
            }
        }
        Err(NoMember(problems).into())
    }
}

/// No member answered (each endpoint's problem).
#[derive(Debug, thiserror::Error)]
#[error("no etcd member answers: {}", .0.join("; "))]
pub struct NoMember(pub Vec<String>);

/// A client of the member at `endpoint`, once it answered and named a leader.
async fn probe(endpoint: &str, options: &ConnectOptions) -> anyhow::Result<Client> {
    let mut client = Client::connect([endpoint], Some(options.clone())).await?;
    let status = client.status().await?;
    anyhow::ensure!(status.leader() != 0, "the member has no leader");
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_ends_are_the_next_key_range() {
        assert_eq!(prefix_end(b"/mesh/"), b"/mesh0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), b"\0");
    }
}
