//! The workload identities of the node's enrolled pods: an X.509 SVID per SPIFFE ID,
//! issued by this node's intermediate CA for its local pods only, kept in memory (the
//! private keys never touch a disk or a log), and re-issued at half life. New
//! handshakes present the new certificate; connections made with the old one go on.

use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use mesh_identity::{
    NodeCa, SpiffeId,
    rotation::Decision,
    svid::{Svid, SvidInfo},
    tls::{self, ClientSvid, ServerSvids},
};
use time::OffsetDateTime;

/// Why the identities could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The node CA could not be loaded.
    #[error("node CA in {dir}: {source}")]
    Ca {
        /// The CA directory.
        dir: String,
        #[source]
        source: mesh_identity::ca::CaError,
    },
}

/// One local identity: its current SVID and what presents it as a client.
struct Local {
    svid: Svid,
    client_svid: Arc<ClientSvid>,
    client: Arc<rustls::ClientConfig>,
}

/// SVIDs of the node's enrolled pods, and the TLS configurations presenting them.
pub struct Identities {
    ca: NodeCa,
    ttl: Duration,
    trust_domain: RwLock<String>,
    server_svids: Arc<ServerSvids>,
    server: RwLock<Option<Arc<rustls::ServerConfig>>>,
    locals: Mutex<HashMap<String, Local>>,
}

impl Identities {
    /// Loads the node CA from `dir` (Istio's `cacerts` layout); SVIDs will live `ttl`.
    pub fn load(dir: &Path, ttl: Duration) -> Result<Self, IdentityError> {
        let ca = NodeCa::load(dir).map_err(|source| IdentityError::Ca {
            dir: dir.display().to_string(),
            source,
        })?;
        Ok(Self {
            ca,
            ttl,
            trust_domain: RwLock::default(),
            server_svids: Arc::new(ServerSvids::new()),
            server: RwLock::default(),
            locals: Mutex::default(),
        })
    }

    /// Makes the SVIDs match `wanted` (the SPIFFE IDs of the local enrolled pods) in
    /// `trust_domain`: new identities get one, identities no pod has any more lose
    /// theirs. A trust domain change re-issues everything.
    pub fn sync<'a>(&self, trust_domain: &str, wanted: impl Iterator<Item = &'a str>) {
        let changed = {
            let mut td = self.trust_domain.write().unwrap_or_else(|p| p.into_inner());
            let changed = *td != trust_domain;
            *td = trust_domain.to_owned();
            changed
        };
        if changed {
            let server = tls::server_config(
                Arc::clone(&self.server_svids),
                self.ca.roots(),
                trust_domain,
            );
            let server = match server {
                Ok(s) => Some(with_h2_server(&s)),
                Err(e) => {
                    tracing::warn!(%trust_domain, error = %e, "no HBONE server configuration");
                    None
                }
            };
            *self.server.write().unwrap_or_else(|p| p.into_inner()) = server;
        }
        let wanted: BTreeSet<&str> = wanted.collect();
        let mut locals = self.locals.lock().unwrap_or_else(|p| p.into_inner());
        locals.retain(|id, local| {
            let keep = !changed && wanted.contains(id.as_str());
            if !keep {
                self.server_svids.remove(local.svid.id());
            }
            keep
        });
        for id in wanted {
            if !locals.contains_key(id)
                && let Some(local) = self.issue(id, trust_domain)
            {
                locals.insert(id.to_owned(), local);
            }
        }
    }

    /// Re-issues the SVIDs past half life; returns how long until the next one is due
    /// (at most a minute, so a failed issue is retried soon).
    pub fn rotate(&self) -> Duration {
        let now = OffsetDateTime::now_utc();
        let mut next = Duration::from_secs(60);
        let mut locals = self.locals.lock().unwrap_or_else(|p| p.into_inner());
        for (id, local) in locals.iter_mut() {
            match local.svid.decide(now) {
                Decision::Keep(left) => next = next.min(left),
                Decision::Reissue => match self.ca.issue_svid(local.svid.id(), self.ttl) {
                    Ok(svid) => {
                        let presented = self
                            .server_svids
                            .insert(&svid)
                            .and_then(|()| local.client_svid.replace(&svid));
                        match presented {
                            Ok(()) => {
                                tracing::info!(%id, serial = svid.serial(), "SVID rotated");
                                local.svid = svid;
                            }
                            Err(e) => tracing::warn!(%id, error = %e, "rotated SVID unusable"),
                        }
                    }
                    Err(e) => tracing::warn!(%id, error = %e, "SVID rotation failed"),
                },
            }
        }
        next.max(Duration::from_millis(100))
    }

    /// The client configuration presenting `identity`'s SVID.
    pub fn client(&self, identity: &str) -> Option<Arc<rustls::ClientConfig>> {
        let locals = self.locals.lock().unwrap_or_else(|p| p.into_inner());
        locals.get(identity).map(|l| Arc::clone(&l.client))
    }

    /// The server configuration presenting every local SVID (by SNI), when `identity`
    /// has one.
    pub fn server(&self, identity: &str) -> Option<Arc<rustls::ServerConfig>> {
        if !self
            .locals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(identity)
        {
            return None;
        }
        self.server
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The current SVIDs (identity, serial, validity, chain), without keys.
    pub fn infos(&self) -> Vec<SvidInfo> {
        let locals = self.locals.lock().unwrap_or_else(|p| p.into_inner());
        let mut infos: Vec<SvidInfo> = locals.values().map(|l| l.svid.info()).collect();
        infos.sort_by(|a, b| a.identity.cmp(&b.identity));
        infos
    }

    /// Writes [`Identities::infos`] as JSON to `path` (for `mesh-agent certs`), through
    /// a temporary file renamed over it, so a reader never sees half a list.
    pub fn publish(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(&self.infos()).map_err(std::io::Error::other)?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, path)
    }

    fn issue(&self, id: &str, trust_domain: &str) -> Option<Local> {
        let spiffe: SpiffeId = match id.parse() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%id, error = %e, "not a SPIFFE ID; no SVID");
                return None;
            }
        };
        let made = (|| -> Result<Local, String> {
            let svid = self
                .ca
                .issue_svid(&spiffe, self.ttl)
                .map_err(|e| e.to_string())?;
            let client_svid = Arc::new(ClientSvid::new(&svid).map_err(|e| e.to_string())?);
            let client = tls::client_config(
                Arc::clone(&client_svid),
                self.ca.roots(),
                trust_domain,
                None,
            )
            .map_err(|e| e.to_string())?;
            self.server_svids.insert(&svid).map_err(|e| e.to_string())?;
            Ok(Local {
                svid,
                client_svid,
                client: with_h2(&client),
            })
        })();
        match made {
            Ok(local) => {
                tracing::info!(%id, serial = local.svid.serial(), "SVID issued");
                Some(local)
            }
            Err(e) => {
                tracing::warn!(%id, error = %e, "cannot issue SVID");
                None
            }
        }
    }
}

/// HBONE speaks HTTP/2 over TLS: ALPN `h2`, as Istio's HBONE endpoints announce it.
fn with_h2(config: &rustls::ClientConfig) -> Arc<rustls::ClientConfig> {
    let mut config = config.clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// [`with_h2`] for the server side.
fn with_h2_server(config: &rustls::ServerConfig) -> Arc<rustls::ServerConfig> {
    let mut config = config.clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}
