//! Identity-based network policy tables.
//!
//! Every pod has a numeric security identity (pods of one namespace with equal labels
//! share it). A socket's pod is found by its network namespace cookie in ENDPOINTS; a
//! peer address is resolved to an identity by longest-prefix match in IPCACHE (pod
//! addresses as /32 or /128, ipBlock CIDRs and their exceptions as prefixes, everything
//! else [`IDENTITY_WORLD`]). POLICY then says which (peer, protocol, port) a subject may
//! talk to, per direction.
//!
//! Decision order for subject S, direction D, peer identity P, protocol p, port d:
//! 1. No isolation entry `(S, D, any peer, any proto, any port)` with
//!    [`POLICY_ISOLATED`]: S is not selected by any policy for D → allow.
//! 2. Otherwise allow iff one of `(S, D, P, p, d)`, `(S, D, P, any, any)`,
//!    `(S, D, any, p, d)`, `(S, D, any, any, any)` matches with [`POLICY_ALLOW`], where
//!    ports match by prefix (port ranges are stored as aligned prefixes); else deny.

use crate::{Addr, wire::wire_enum};

/// Identity of the node's own addresses: the node may always reach its pods (as
/// kubelet health probes need; Cilium's default too), whatever their ingress policy.
pub const IDENTITY_HOST: u32 = 1;
/// Identity of addresses no policy peer covers (outside the cluster).
pub const IDENTITY_WORLD: u32 = 2;
/// First identity handed to pods and CIDRs; lower ones are reserved.
pub const IDENTITY_FIRST_ALLOCATED: u32 = 256;
/// "Any" in [`PolicyKey::peer`] and, with a zero prefix, in ports and protocol.
pub const IDENTITY_ANY: u32 = 0;

wire_enum! {
    /// [`PolicyKey::direction`]: which way traffic goes, seen from the policy's subject.
    #[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
    #[cfg_attr(feature = "user", serde(rename_all = "SCREAMING_SNAKE_CASE"))]
    pub enum Direction {
        /// Traffic the subject sends.
        Egress = 1 => "egress",
        /// Traffic the subject receives.
        Ingress = 2 => "ingress",
    }
}

/// [`PolicyKey::direction`]: [`Direction::Egress`].
pub const DIR_EGRESS: u8 = Direction::Egress as u8;
/// [`PolicyKey::direction`]: [`Direction::Ingress`].
pub const DIR_INGRESS: u8 = Direction::Ingress as u8;

/// [`PolicyValue::flags`]: the subject is isolated in this direction (marker entry).
pub const POLICY_ISOLATED: u32 = 1;
/// [`PolicyValue::flags`]: the matching traffic is allowed.
pub const POLICY_ALLOW: u32 = 2;

/// Value of the ENDPOINTS map (key: network namespace cookie, `u64`, host byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointValue {
    /// Security identity of the pod, host byte order.
    pub identity: u32,
    /// [`ENDPOINT_NO_SOCKMAP`] or 0.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<EndpointValue>() == 8);

/// [`EndpointValue::flags`]: the pod opted out of socket redirection (annotation
/// `mesh.io/sockmap: "false"`), for all its sockets, loopback ones included.
pub const ENDPOINT_NO_SOCKMAP: u32 = 1;

/// [`EndpointValue::flags`]: the pod is in the mesh (Istio ambient enrollment). Its TCP
/// connections to enrolled pods (any node) go through the node proxy's mutual-TLS
/// tunnel (HBONE).
pub const ENDPOINT_MESH: u32 = 2;

/// Key of the IPCACHE LPM trie (the kernel's `bpf_lpm_trie_key` layout: prefix length
/// first, then the data the prefix applies to).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpcacheKey {
    /// Prefix length in bits over `addr` (IPv4: 96 + the IPv4 prefix length), host
    /// byte order.
    pub prefixlen: u32,
    /// Address (IPv4 mapped), network byte order.
    pub addr: Addr,
}
const _: () = assert!(core::mem::size_of::<IpcacheKey>() == 20);

/// Value of the IPCACHE map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpcacheValue {
    /// Identity of the prefix as a policy peer, host byte order. For a pod or node
    /// address this is [`IpcacheValue::owner`], unless ipBlock bounds split the owner's
    /// addresses: then each part has an identity of its own, so that an ipBlock can
    /// allow one pod address and not another of the same identity.
    pub identity: u32,
    /// Identity of the pod (or [`IDENTITY_HOST`] for the node) the address belongs to,
    /// host byte order: what the POLICY entries of a subject are keyed by (ingress
    /// looks its subject up by destination address). Equals `identity` for CIDR
    /// prefixes.
    pub owner: u32,
    /// [`IPCACHE_REDIRECT`] or 0.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<IpcacheValue>() == 12);

/// [`IpcacheValue::flags`]: the address lives on this node (a local pod's, or one of
/// the node's own) and its TCP connections may be redirected socket to socket (the pod
/// is not opted out with the `mesh.io/sockmap: "false"` annotation).
pub const IPCACHE_REDIRECT: u32 = 1;

/// [`IpcacheValue::flags`]: the address is an enrolled pod's (in the mesh, reachable by
/// HBONE on its port 15008).
pub const IPCACHE_MESH: u32 = 2;

/// [`IpcacheValue::flags`]: the address lives on this node (a local pod's or one of the
/// node's own), whatever its socket redirection.
pub const IPCACHE_LOCAL: u32 = 4;

/// [`IpcacheValue::flags`]: the address is a local enrolled pod's whose plaintext
/// inbound connections the node proxy must judge (a PeerAuthentication STRICT on some
/// port, or an AuthorizationPolicy applies): the pod's sk_lookup program hands them to
/// the proxy's listener in INBOUND_SOCKS, or refuses them while there is none.
pub const IPCACHE_INBOUND: u32 = 8;

/// Whether the sk_lookup program hands a TCP connection from `remote` to the local
/// address `local` (port `port`, host byte order) to the node proxy: the address asks
/// for it, the port is not the tunnel's own (HBONE is judged by the proxy already), and
/// the caller is neither the pod itself nor the node (kubelet probes come from the node,
/// and Istio exempts them from PeerAuthentication and AuthorizationPolicy alike).
#[inline(always)]
pub fn inbound_captured(
    local: &IpcacheValue,
    remote: &IpcacheValue,
    same_addr: bool,
    port: u16,
) -> bool {
    local.flags & IPCACHE_INBOUND != 0
        && port != crate::service::HBONE_PORT
        && !same_addr
        && remote.owner != IDENTITY_HOST
}

/// Whether a TCP connection from an enrolled pod to `dst`:`port` is carried by the
/// mesh's tunnel: `dst` is an enrolled pod, on this node or another (same-node traffic
/// is authorized by identity too), and the port is not the tunnel's own (the proxy's
/// tunnel connections must not be captured again; its connections to the application
/// go to the pod's loopback, which no pod address is).
#[inline(always)]
pub fn tunnelled(dst: &IpcacheValue, port_be: u16) -> bool {
    dst.flags & IPCACHE_MESH != 0 && port_be != crate::service::HBONE_PORT.to_be()
}

/// Whether a connection from an enrolled pod (`source_enrolled`) to `dst`:`port` is a
/// tunnel between enrolled pods, which NetworkPolicy does not judge as such: each
/// stream inside it is judged by the node proxies for its own port (one tunnel carries
/// streams to several ports).
#[inline(always)]
pub fn tunnel_port(source_enrolled: bool, dst: &IpcacheValue, port_be: u16) -> bool {
    source_enrolled
        && port_be == crate::service::HBONE_PORT.to_be()
        && dst.flags & IPCACHE_MESH != 0
}

/// Key of the POLICY LPM trie. Every field before `port` is matched exactly (the
/// prefix always covers them: 80 bits); the remaining 0..=16 prefix bits match the port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    /// Prefix length in bits over the fields after it: 80 + port prefix bits.
    pub prefixlen: u32,
    /// Identity of the pod the policy applies to, host byte order (always inside the
    /// exact-match part of the prefix, so its byte order does not matter to the trie).
    pub subject: u32,
    /// Identity of the peer, host byte order; [`IDENTITY_ANY`] for any peer.
    pub peer: u32,
    /// [`DIR_EGRESS`] or [`DIR_INGRESS`].
    pub direction: u8,
    /// IP protocol; 0 for any (then the port prefix is 0 too).
    pub proto: u8,
    /// Port, network byte order (the trie compares bytes from the most significant
    /// bit); only the first `prefixlen - 80` bits count.
    pub port_be: u16,
}
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 16);

/// The part of a [`PolicyKey`] after the prefix length: the `data` of the trie key as
/// the kernel and aya's `lpm_trie::Key<PolicyKeyData>` lay it out.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKeyData {
    /// As [`PolicyKey::subject`].
    pub subject: u32,
    /// As [`PolicyKey::peer`].
    pub peer: u32,
    /// As [`PolicyKey::direction`].
    pub direction: u8,
    /// As [`PolicyKey::proto`].
    pub proto: u8,
    /// As [`PolicyKey::port_be`].
    pub port_be: u16,
}
const _: () = assert!(core::mem::size_of::<PolicyKeyData>() == 12);
const _: () =
    assert!(core::mem::size_of::<PolicyKey>() == 4 + core::mem::size_of::<PolicyKeyData>());

impl PolicyKey {
    /// The trie key's data part.
    pub const fn data(&self) -> PolicyKeyData {
        PolicyKeyData {
            subject: self.subject,
            peer: self.peer,
            direction: self.direction,
            proto: self.proto,
            port_be: self.port_be,
        }
    }

    /// Reassembles a key from its prefix length and data.
    pub const fn from_parts(prefixlen: u32, d: PolicyKeyData) -> Self {
        Self {
            prefixlen,
            subject: d.subject,
            peer: d.peer,
            direction: d.direction,
            proto: d.proto,
            port_be: d.port_be,
        }
    }
}

/// Bits of [`PolicyKey`] matched exactly: subject, peer, direction, protocol.
pub const POLICY_FIXED_PREFIX: u32 = 80;

/// Value of the POLICY map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyValue {
    /// `POLICY_*` bits, host byte order.
    pub flags: u32,
    /// Index of the policy that produced the entry (for flow events), host byte order.
    pub policy_id: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyValue>() == 8);

/// Whether `subject` may exchange `proto`/`port_be` (network byte order) with `peer` in
/// `direction`: the kernel's decision, written once for the eBPF programs and for the
/// planner's tests, which evaluate a plan's POLICY entries with it.
///
/// `lookup` is the POLICY trie's longest-prefix match of a full key (all
/// [`POLICY_FIXED_PREFIX`] + 16 bits). The order, as the module documents it:
/// 1. no isolation entry `(S, D, any peer, any proto, any port)` with
///    [`POLICY_ISOLATED`]: allow;
/// 2. else allow iff `(S, D, P, p, d)`, `(S, D, P, any, any)`, `(S, D, any, p, d)` or
///    `(S, D, any, any, any)` finds an entry with [`POLICY_ALLOW`], tried in that order
///    (the exact peer before any peer, the exact protocol and port before any);
/// 3. else deny.
///
/// At most five lookups, in loops of constant bounds, so the verifier sees every path.
#[inline(always)]
pub fn policy_allows(
    lookup: impl Fn(PolicyKeyData) -> Option<PolicyValue>,
    subject: u32,
    direction: u8,
    peer: u32,
    proto: u8,
    port_be: u16,
) -> bool {
    let key = |peer, proto, port_be| PolicyKeyData {
        subject,
        peer,
        direction,
        proto,
        port_be,
    };
    let isolated = lookup(key(IDENTITY_ANY, 0, 0)).is_some_and(|v| v.flags & POLICY_ISOLATED != 0);
    if !isolated {
        return true;
    }
    for peer in [peer, IDENTITY_ANY] {
        for (proto, port_be) in [(proto, port_be), (0, 0)] {
            if lookup(key(peer, proto, port_be)).is_some_and(|v| v.flags & POLICY_ALLOW != 0) {
                return true;
            }
        }
    }
    false
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all below): plain-old-data, repr(C), explicit padding, every bit pattern
    // valid.
    unsafe impl aya::Pod for super::EndpointValue {}
    unsafe impl aya::Pod for super::IpcacheKey {}
    unsafe impl aya::Pod for super::IpcacheValue {}
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::PolicyKeyData {}
    unsafe impl aya::Pod for super::PolicyValue {}
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUBJECT: u32 = 300;
    const PEER: u32 = 301;
    const OTHER: u32 = 302;
    const TCP: u8 = crate::service::PROTO_TCP;
    const UDP: u8 = crate::service::PROTO_UDP;

    #[test]
    fn inbound_capture_spares_the_tunnel_the_pod_itself_and_the_node() {
        let value = |owner, flags| IpcacheValue {
            identity: owner,
            owner,
            flags,
        };
        let pod = value(SUBJECT, IPCACHE_MESH | IPCACHE_LOCAL | IPCACHE_INBOUND);
        let client = value(PEER, 0);
        assert!(inbound_captured(&pod, &client, false, 8080));
        assert!(!inbound_captured(
            &pod,
            &client,
            false,
            crate::service::HBONE_PORT
        ));
        assert!(!inbound_captured(&pod, &pod, true, 8080), "the pod itself");
        let node = value(IDENTITY_HOST, IPCACHE_LOCAL);
        assert!(
            !inbound_captured(&pod, &node, false, 8080),
            "kubelet probes"
        );
        let plain = value(SUBJECT, IPCACHE_MESH | IPCACHE_LOCAL);
        assert!(
            !inbound_captured(&plain, &client, false, 8080),
            "no policy asks"
        );
    }

    #[test]
    fn only_enrolled_pods_are_tunnelled_and_never_the_tunnel_port() {
        let dst = |flags| IpcacheValue {
            identity: PEER,
            owner: PEER,
            flags,
        };
        let hbone = crate::service::HBONE_PORT.to_be();
        assert!(tunnelled(&dst(IPCACHE_MESH), 80u16.to_be()));
        assert!(
            !tunnelled(&dst(IPCACHE_MESH), hbone),
            "the proxy's own tunnel"
        );
        assert!(
            tunnelled(&dst(IPCACHE_MESH | IPCACHE_LOCAL), 80u16.to_be()),
            "same node"
        );
        assert!(!tunnelled(&dst(0), 80u16.to_be()), "not in the mesh");
        assert!(tunnel_port(true, &dst(IPCACHE_MESH), hbone));
        assert!(
            !tunnel_port(false, &dst(IPCACHE_MESH), hbone),
            "source not enrolled"
        );
        assert!(
            !tunnel_port(true, &dst(0), hbone),
            "destination not enrolled"
        );
        assert!(!tunnel_port(true, &dst(IPCACHE_MESH), 80u16.to_be()));
    }

    fn entry(direction: u8, peer: u32, proto: u8, port: u16, flags: u32) -> (PolicyKeyData, u32) {
        let key = PolicyKeyData {
            subject: SUBJECT,
            peer,
            direction,
            proto,
            port_be: port.to_be(),
        };
        (key, flags)
    }

    /// `policy_allows` over `entries`, each a full port or no port at all, where the
    /// trie's longest-prefix match is an exact match.
    fn allows(entries: &[(PolicyKeyData, u32)], peer: u32, proto: u8, port: u16) -> bool {
        let lookup = |key| {
            entries
                .iter()
                .find(|(k, _)| *k == key)
                .map(|&(_, flags)| PolicyValue {
                    flags,
                    policy_id: 0,
                })
        };
        policy_allows(lookup, SUBJECT, DIR_EGRESS, peer, proto, port.to_be())
    }

    #[test]
    fn isolation_then_exact_peer_then_any_peer_each_exact_port_then_any() {
        let marker = entry(DIR_EGRESS, IDENTITY_ANY, 0, 0, POLICY_ISOLATED);
        assert!(allows(&[], PEER, TCP, 80), "not isolated");
        let ingress_only = [entry(DIR_INGRESS, IDENTITY_ANY, 0, 0, POLICY_ISOLATED)];
        assert!(
            allows(&ingress_only, PEER, TCP, 80),
            "isolated the other way"
        );
        assert!(
            !allows(&[marker], PEER, TCP, 80),
            "isolated, nothing allowed"
        );

        let to_peer_80 = [marker, entry(DIR_EGRESS, PEER, TCP, 80, POLICY_ALLOW)];
        assert!(allows(&to_peer_80, PEER, TCP, 80));
        assert!(!allows(&to_peer_80, PEER, TCP, 81), "other port");
        assert!(!allows(&to_peer_80, PEER, UDP, 80), "other protocol");
        assert!(!allows(&to_peer_80, OTHER, TCP, 80), "other peer");

        let to_peer_any = [marker, entry(DIR_EGRESS, PEER, 0, 0, POLICY_ALLOW)];
        assert!(allows(&to_peer_any, PEER, UDP, 53));
        assert!(!allows(&to_peer_any, OTHER, UDP, 53));

        let anyone_80 = [
            marker,
            entry(DIR_EGRESS, IDENTITY_ANY, TCP, 80, POLICY_ALLOW),
        ];
        assert!(allows(&anyone_80, OTHER, TCP, 80));
        assert!(!allows(&anyone_80, OTHER, TCP, 81));

        // The marker and an allow-all rule share the (any, any, any) key.
        let allow_all = [entry(
            DIR_EGRESS,
            IDENTITY_ANY,
            0,
            0,
            POLICY_ISOLATED | POLICY_ALLOW,
        )];
        assert!(allows(&allow_all, OTHER, UDP, 9));
    }
}
