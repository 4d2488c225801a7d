//! SPIFFE IDs of the mesh's workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<sa>`.
//!
//! Parsing is strict on purpose: the ID is compared as a string against policy and
//! expected peers, so two spellings of one identity (percent-encoding, a port, a trailing
//! slash, upper-case trust domain) must not both be accepted.

use std::{fmt, str::FromStr};

/// `spiffe://`, the only scheme and authority separator the SPIFFE spec allows.
const SCHEME: &str = "spiffe://";

/// Longest trust domain the SPIFFE spec allows (bytes).
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Longest SPIFFE ID the SPIFFE spec allows (bytes, the whole URI).
const MAX_ID_LEN: usize = 2048;

/// Why a string is not a mesh SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    /// The URI does not start with `spiffe://`.
    #[error("{id:?} is not a SPIFFE ID: it must start with spiffe://")]
    Scheme {
        /// The rejected text.
        id: String,
    },
    /// The trust domain breaks the SPIFFE rules.
    #[error(
        "trust domain {trust_domain:?}: {why} (use 1-255 lowercase letters, digits, '.', '-', '_')"
    )]
    TrustDomain {
        /// The rejected trust domain.
        trust_domain: String,
        /// The rule it breaks.
        why: &'static str,
    },
    /// The path is not `/ns/<namespace>/sa/<service-account>`.
    #[error("{id:?}: the path must be /ns/<namespace>/sa/<service-account>")]
    Shape {
        /// The rejected text.
        id: String,
    },
    /// A path segment breaks the SPIFFE rules.
    #[error(
        "{what} {segment:?}: {why} (use letters, digits, '.', '-', '_'; not empty, '.' or '..')"
    )]
    Segment {
        /// Which segment: `namespace` or `service account`.
        what: &'static str,
        /// The rejected segment.
        segment: String,
        /// The rule it breaks.
        why: &'static str,
    },
    /// The whole ID is longer than the spec allows.
    #[error("SPIFFE ID of {len} bytes is longer than the {MAX_ID_LEN} the spec allows")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
}

/// A workload identity of the mesh: the pods of one service account in one namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    /// The identity of service account `service_account` of namespace `namespace`, each
    /// part checked as [`FromStr`] would.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeError> {
        check_trust_domain(trust_domain)?;
        check_segment("namespace", namespace)?;
        check_segment("service account", service_account)?;
        let id = Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        };
        let len = id.to_string().len();
        if len > MAX_ID_LEN {
            return Err(SpiffeError::TooLong { len });
        }
        Ok(id)
    }

    /// The trust domain (`cluster.local`).
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeError;

    fn from_str(id: &str) -> Result<Self, Self::Err> {
        if id.len() > MAX_ID_LEN {
            return Err(SpiffeError::TooLong { len: id.len() });
        }
        let rest = id
            .strip_prefix(SCHEME)
            .ok_or_else(|| SpiffeError::Scheme { id: id.to_owned() })?;
        let (trust_domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        check_trust_domain(trust_domain)?;
        let shape = || SpiffeError::Shape { id: id.to_owned() };
        match path.split('/').collect::<Vec<_>>().as_slice() {
            ["ns", namespace, "sa", service_account] => {
                Self::new(trust_domain, namespace, service_account)
            }
            _ => Err(shape()),
        }
    }
}

/// Checks a trust domain against the SPIFFE spec: 1-255 bytes of lowercase letters,
/// digits, '.', '-' and '_' (no port, no user info, no upper case).
pub fn check_trust_domain(trust_domain: &str) -> Result<(), SpiffeError> {
    let bad = |why| SpiffeError::TrustDomain {
        trust_domain: trust_domain.to_owned(),
        why,
    };
    if trust_domain.is_empty() {
        return Err(bad("empty"));
    }
    if trust_domain.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(bad("longer than 255 bytes"));
    }
    let allowed = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b);
    if !trust_domain.bytes().all(allowed) {
        return Err(bad("character not allowed"));
    }
    Ok(())
}

/// Checks one path segment against the SPIFFE spec: letters, digits, '.', '-', '_';
/// not empty and not a relative-path segment ('.', '..').
fn check_segment(what: &'static str, segment: &str) -> Result<(), SpiffeError> {
    let bad = |why| SpiffeError::Segment {
        what,
        segment: segment.to_owned(),
        why,
    };
    if segment.is_empty() {
        return Err(bad("empty"));
    }
    if segment == "." || segment == ".." {
        return Err(bad("relative path segment"));
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"._-".contains(&b);
    if !segment.bytes().all(allowed) {
        return Err(bad("character not allowed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{SpiffeError, SpiffeId, check_trust_domain};

    #[test]
    fn displays_and_parses_back() {
        let id = SpiffeId::new("cluster.local", "shop", "web").expect("valid");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(id.to_string().parse::<SpiffeId>(), Ok(id.clone()));
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "web");
        for ok in [
            "spiffe://td/ns/a/sa/b",
            "spiffe://my_td-1.example/ns/kube-system/sa/coredns",
            "spiffe://td/ns/N.s_1/sa/Sa-2",
        ] {
            let id: SpiffeId = ok.parse().unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(id.to_string(), ok);
        }
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "",
            "spiffe://",
            "SPIFFE://td/ns/a/sa/b",
            "https://td/ns/a/sa/b",
            "spiffe:/td/ns/a/sa/b",
            "spiffe://td",
            "spiffe://td/",
            "spiffe://TD/ns/a/sa/b",
            "spiffe://td:443/ns/a/sa/b",
            "spiffe://user@td/ns/a/sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://td/ns/a/sa/b/",
            "spiffe://td/ns/a/sa/b?x=1",
            "spiffe://td/ns/a/sa/b#frag",
            "spiffe://td/ns//sa/b",
            "spiffe://td/ns/a/sa/",
            "spiffe://td/ns/./sa/b",
            "spiffe://td/ns/../sa/b",
            "spiffe://td/ns/a%20b/sa/b",
            "spiffe://td/ns/a/sa/b/extra",
            "spiffe://td/sa/b/ns/a",
            "spiffe://td/namespace/a/sa/b",
            "spiffe://td//ns/a/sa/b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad:?} accepted");
        }
        let long = format!("spiffe://td/ns/a/sa/{}", "b".repeat(2048));
        assert!(matches!(
            long.parse::<SpiffeId>(),
            Err(SpiffeError::TooLong { .. })
        ));
    }

    #[test]
    fn errors_name_the_part() {
        let err = "spiffe://Cluster.local/ns/a/sa/b"
            .parse::<SpiffeId>()
            .expect_err("upper case");
        assert!(err.to_string().contains("\"Cluster.local\""), "{err}");
        let err = "spiffe://td/ns/a b/sa/b"
            .parse::<SpiffeId>()
            .expect_err("space");
        assert!(err.to_string().starts_with("namespace \"a b\""), "{err}");
        let err = "spiffe://td/ns/a".parse::<SpiffeId>().expect_err("short");
        assert!(err.to_string().contains("/ns/<namespace>/sa/"), "{err}");
    }

    #[test]
    fn trust_domains_follow_the_spec() {
        for ok in ["cluster.local", "a", "x_y-z.0"] {
            assert_eq!(check_trust_domain(ok), Ok(()), "{ok}");
        }
        for bad in ["", "Cluster", "a b", "td:1", "td/x", &"a".repeat(256)] {
            assert!(check_trust_domain(bad).is_err(), "{bad:?} accepted");
        }
    }
}
