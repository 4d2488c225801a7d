//! Istio's security APIs (`security.istio.io/v1`, also `v1beta1`): PeerAuthentication
//! and AuthorizationPolicy, typed, and the two MeshConfig settings the mesh reads from
//! the `istio-system/istio` ConfigMap.
//!
//! k8s-openapi has only the core API groups, so the kinds are modelled here field for
//! field as Istio's CRDs define them. Every field is serialized back, so the loader's
//! strict check (a key the typed object did not keep is an unknown field) works as for
//! the k8s-openapi kinds. Lists that Istio distinguishes as absent or empty (`rules`,
//! `from`, `to`) stay `Option`s so that validation can tell them apart. `status` is
//! accepted and ignored.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use super::model::Cidr;

/// The API group of PeerAuthentication and AuthorizationPolicy.
pub const SECURITY_GROUP: &str = "security.istio.io";

/// Namespace of the ConfigMap holding Istio's MeshConfig.
pub const MESH_CONFIG_NAMESPACE: &str = "istio-system";
/// Name of the ConfigMap holding Istio's MeshConfig (key `mesh`).
pub const MESH_CONFIG_NAME: &str = "istio";
/// Trust domain when neither `--trust-domain` nor MeshConfig gives one.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Root namespace when MeshConfig gives none.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// Implements the k8s-openapi traits the loader's `decode` relies on.
macro_rules! istio_resource {
    ($ty:ty, $kind:literal, $plural:literal) => {
        impl k8s_openapi::Resource for $ty {
            const API_VERSION: &'static str = "security.istio.io/v1";
            const GROUP: &'static str = SECURITY_GROUP;
            const KIND: &'static str = $kind;
            const VERSION: &'static str = "v1";
            const URL_PATH_SEGMENT: &'static str = $plural;
            type Scope = k8s_openapi::NamespaceResourceScope;
        }

        impl k8s_openapi::Metadata for $ty {
            type Ty = ObjectMeta;

            fn metadata(&self) -> &ObjectMeta {
                &self.metadata
            }

            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

/// A PeerAuthentication: which mTLS mode a workload's ports accept.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthentication {
    /// `security.istio.io/v1` or `.../v1beta1` (the same schema).
    pub api_version: String,
    /// `PeerAuthentication`.
    pub kind: String,
    /// Standard object metadata; `creationTimestamp` breaks ties (the oldest wins).
    pub metadata: ObjectMeta,
    /// The policy.
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
    /// Written by Istio; ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

istio_resource!(
    PeerAuthentication,
    "PeerAuthentication",
    "peerauthentications"
);

/// PeerAuthentication `spec`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// The workloads it applies to; absent (or no labels): the whole namespace, or the
    /// mesh in the root namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// The mode of every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<PeerMtls>,
    /// Per container port (the key, a number) overrides; needs a selector.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level_mtls: BTreeMap<String, PeerMtls>,
}

/// `mtls` and `portLevelMtls` values.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerMtls {
    /// `UNSET` (default: inherit), `DISABLE`, `PERMISSIVE` or `STRICT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// `selector`: pods whose labels include all of these.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Label pairs, all required.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

/// An AuthorizationPolicy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    /// `security.istio.io/v1` or `.../v1beta1` (the same schema).
    pub api_version: String,
    /// `AuthorizationPolicy`.
    pub kind: String,
    /// Standard object metadata.
    pub metadata: ObjectMeta,
    /// The policy.
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
    /// Written by Istio; ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

istio_resource!(
    AuthorizationPolicy,
    "AuthorizationPolicy",
    "authorizationpolicies"
);

/// AuthorizationPolicy `spec`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// The workloads it applies to; exclusive with `targetRef(s)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Deprecated single form of `targetRefs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetReference>,
    /// Services (their pods) or Gateways it applies to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    /// `ALLOW` (default), `DENY`, `AUDIT` or `CUSTOM` (not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// The external authorizer of a CUSTOM policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ExtensionProvider>,
    /// Absent or empty: an ALLOW policy matches nothing, a DENY policy denies nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<AuthzRule>>,
}

/// `targetRef(s)`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetReference {
    /// `""` (core) for a Service, `gateway.networking.k8s.io` for a Gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// `Service` or `Gateway`.
    pub kind: String,
    /// The target's name.
    pub name: String,
    /// Must be the policy's own namespace when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// `provider`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionProvider {
    /// A MeshConfig `extensionProviders` name.
    pub name: String,
}

/// `rules[]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzRule {
    /// Sources; absent: any. Must not be empty when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<RuleFrom>>,
    /// Operations; absent: any. Must not be empty when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<RuleTo>>,
    /// Extra conditions, all required.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<AuthzCondition>,
}

/// `from[]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleFrom {
    /// Required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<AuthzSource>,
}

/// `from[].source`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzSource {
    /// Peer identities (`<trust domain>/ns/<ns>/sa/<sa>`, `*` forms).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    /// Negated `principals`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    /// JWT principals (not supported).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    /// Negated `requestPrincipals` (not supported).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
    /// Peer namespaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Negated `namespaces`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    /// Source addresses or CIDRs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    /// Negated `ipBlocks`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
    /// Original client addresses or CIDRs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<String>,
    /// Negated `remoteIpBlocks`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<String>,
}

/// `to[]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleTo {
    /// Required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<AuthzOperation>,
}

/// `to[].operation`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzOperation {
    /// Request hosts (HTTP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Negated `hosts`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    /// Destination ports, as strings of numbers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    /// Negated `ports`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<String>,
    /// Request methods (HTTP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Negated `methods`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    /// Request paths (HTTP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Negated `paths`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

/// `when[]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzCondition {
    /// The attribute, e.g. `source.ip` or `request.headers[x-token]`.
    pub key: String,
    /// One must match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    /// None may match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

/// The MeshConfig settings the mesh uses, from the `mesh` key of the
/// `istio-system/istio` ConfigMap (a YAML document; its other keys are ignored, since
/// MeshConfig has many settings that concern Istio's own proxies only).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshConfig {
    /// `trustDomain`.
    pub trust_domain: Option<String>,
    /// `rootNamespace`.
    pub root_namespace: Option<String>,
}

/// Reads [`MeshConfig`] from the text of the ConfigMap's `mesh` key. The error says
/// which setting is wrong, prefixed by its key when it is one of ours.
pub fn parse_mesh_config(text: &str) -> Result<MeshConfig, (Option<&'static str>, String)> {
    let value: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| (None, format!("not YAML: {e}")))?;
    let map = match value {
        serde_yaml::Value::Mapping(map) => map,
        serde_yaml::Value::Null => return Ok(MeshConfig::default()),
        _ => return Err((None, "must be a YAML mapping (MeshConfig)".into())),
    };
    let string = |key: &'static str| match map.get(key) {
        None | Some(serde_yaml::Value::Null) => Ok(None),
        Some(serde_yaml::Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err((Some(key), "must be a string".to_owned())),
    };
    Ok(MeshConfig {
        trust_domain: string("trustDomain")?,
        root_namespace: string("rootNamespace")?,
    })
}

/// Checks a SPIFFE trust domain: 1-255 lowercase letters, digits, `.`, `-` and `_`
/// (the SPIFFE ID specification's character set).
pub fn check_trust_domain(domain: &str) -> Result<(), String> {
    let ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b);
    if domain.is_empty() || domain.len() > 255 || !domain.bytes().all(ok) {
        return Err(format!(
            "{domain:?} is not a SPIFFE trust domain (1-255 lowercase letters, digits, '.', '-', '_')"
        ));
    }
    Ok(())
}

/// The header name of a `request.headers[NAME]` key (a token, lowercased later).
pub fn header_name(key: &str) -> Option<&str> {
    let name = key.strip_prefix("request.headers[")?.strip_suffix(']')?;
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    (!name.is_empty() && name.bytes().all(token)).then_some(name)
}

/// An `ipBlocks` value as a prefix: an address is a full-length one.
pub fn parse_ip_block(v: &str) -> Result<Cidr, String> {
    if v.contains('/') {
        return Cidr::parse(v);
    }
    match v.parse::<std::net::IpAddr>() {
        Ok(ip) => Ok(Cidr::new(ip, if ip.is_ipv4() { 32 } else { 128 })),
        Err(_) => Err(format!("{v:?} is not an IP address or CIDR")),
    }
}

/// A decimal port in 1-65535.
pub fn parse_port(v: &str) -> Option<u16> {
    if !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse::<u16>().ok().filter(|&p| p != 0)
}
