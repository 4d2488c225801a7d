//! ipBlock prefixes, and how they split the addresses of pods and of the node into peer
//! identities.
//!
//! An ipBlock selects addresses, pods' included (as the upstream Kubernetes e2e suite,
//! Calico and Antrea have it), while the datapath resolves a peer address to a single
//! identity. A pod address that lies in no ipBlock prefix resolves to its pod's
//! identity. Otherwise what decides every ipBlock about it is the set of prefixes it lies
//! in (its *signature*): it is in `cidr` minus `except` iff `cidr` is in the set and no
//! `except` is. So the addresses of one owner (pods sharing an identity, or the node)
//! are grouped by signature; the first group (in signature order, the empty one first)
//! keeps the owner's identity, every other group becomes a [`IdentityKey::Part`] with an
//! identity of its own. In the common case (no ipBlock cuts through a set of pods that
//! share labels) nothing is split and nothing is added.
//!
//! The blow-up is bounded: at most one part per address that some ipBlock prefix covers,
//! and a rule that selects an owner by label allows each of its parts too.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::networking::v1::NetworkPolicyPeer;

use crate::state::Cidr;

/// The prefixes of an ipBlock peer; validation has checked that they parse.
pub(super) fn block_of(peer: &NetworkPolicyPeer) -> Option<(Cidr, Vec<Cidr>)> {
    let block = peer.ip_block.as_ref()?;
    let cidr = Cidr::parse(&block.cidr).ok()?;
    let except = block.except.iter().flatten();
    Some((cidr, except.filter_map(|e| Cidr::parse(e).ok()).collect()))
}

/// Every distinct `cidr` and `except` prefix of the policies' ipBlocks.
#[derive(Debug, Default)]
pub(super) struct Blocks {
    prefixes: BTreeSet<Cidr>,
    /// The same prefixes, for membership tests by (masked address, length).
    set: HashSet<Cidr>,
    /// The prefix lengths in use, per family (IPv4, IPv6), longest first.
    lengths: [BTreeSet<u8>; 2],
}

impl Blocks {
    /// The prefixes of `blocks`.
    pub(super) fn new(blocks: impl IntoIterator<Item = (Cidr, Vec<Cidr>)>) -> Self {
        let mut out = Self::default();
        for (cidr, except) in blocks {
            for prefix in std::iter::once(cidr).chain(except) {
                out.lengths[usize::from(prefix.addr.is_ipv6())].insert(prefix.len);
                out.set.insert(prefix);
                out.prefixes.insert(prefix);
            }
        }
        out
    }

    /// Every prefix, in order.
    pub(super) fn prefixes(&self) -> &BTreeSet<Cidr> {
        &self.prefixes
    }

    /// The prefixes `addr` lies in, in order: its signature. Costs one set lookup per
    /// prefix length in use, not one per prefix.
    pub(super) fn signature(&self, addr: IpAddr) -> Vec<Cidr> {
        let mut within: Vec<Cidr> = self.lengths[usize::from(addr.is_ipv6())]
            .iter()
            .map(|&len| Cidr::new(addr, len))
            .filter(|p| self.set.contains(p))
            .collect();
        within.sort();
        within
    }

    /// The prefixes within `cidr` (`cidr` itself included), in order: a range of the
    /// ordered set (a contained prefix's address lies between `cidr`'s first and last).
    pub(super) fn within(&self, cidr: Cidr) -> impl Iterator<Item = Cidr> + '_ {
        let first = Cidr { len: 0, ..cidr };
        let last = Cidr {
            addr: last_address(cidr),
            len: u8::MAX,
        };
        self.prefixes
            .range(first..=last)
            .copied()
            .filter(move |p| cidr.contains(p))
    }
}

/// The last address of a prefix.
fn last_address(cidr: Cidr) -> IpAddr {
    match cidr.addr {
        IpAddr::V4(a) => {
            let host = u32::MAX.checked_shr(u32::from(cidr.len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) | host))
        }
        IpAddr::V6(a) => {
            let host = u128::MAX.checked_shr(u32::from(cidr.len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) | host))
        }
    }
}

/// Whether an address of signature `within` lies in `cidr` minus every `except`.
pub(super) fn in_block(within: &[Cidr], cidr: &Cidr, except: &[Cidr]) -> bool {
    within.binary_search(cidr).is_ok() && !except.iter().any(|e| within.binary_search(e).is_ok())
}

/// The addresses of one owner grouped by signature, the first group (which keeps the
/// owner's identity) first.
pub(super) fn split<T>(
    blocks: &Blocks,
    addrs: impl IntoIterator<Item = (IpAddr, T)>,
) -> BTreeMap<Vec<Cidr>, Vec<(IpAddr, T)>> {
    let mut parts: BTreeMap<Vec<Cidr>, Vec<(IpAddr, T)>> = BTreeMap::new();
    for (addr, tag) in addrs {
        parts
            .entry(blocks.signature(addr))
            .or_default()
            .push((addr, tag));
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        Cidr::parse(s).expect("cidr")
    }

    fn blocks() -> Blocks {
        Blocks::new([
            (cidr("10.0.0.0/8"), vec![cidr("10.244.1.0/24")]),
            (cidr("10.244.1.5/32"), vec![]),
            (cidr("fd00::/8"), vec![]),
        ])
    }

    #[test]
    fn signature_lists_the_prefixes_an_address_lies_in() {
        let b = blocks();
        let sig = |a: &str| b.signature(a.parse().expect("ip"));
        assert_eq!(sig("10.1.2.3"), [cidr("10.0.0.0/8")]);
        assert_eq!(
            sig("10.244.1.7"),
            [cidr("10.0.0.0/8"), cidr("10.244.1.0/24")]
        );
        assert_eq!(
            sig("10.244.1.5"),
            [
                cidr("10.0.0.0/8"),
                cidr("10.244.1.0/24"),
                cidr("10.244.1.5/32")
            ]
        );
        assert_eq!(sig("192.168.0.1"), []);
        assert_eq!(sig("fd00::1"), [cidr("fd00::/8")]);
    }

    #[test]
    fn in_block_is_cidr_minus_except() {
        let b = blocks();
        let sig = |a: &str| b.signature(a.parse().expect("ip"));
        let (c, e) = (cidr("10.0.0.0/8"), [cidr("10.244.1.0/24")]);
        assert!(in_block(&sig("10.1.2.3"), &c, &e));
        assert!(!in_block(&sig("10.244.1.7"), &c, &e));
        assert!(!in_block(&sig("192.168.0.1"), &c, &e));
        assert!(in_block(&sig("10.244.1.5"), &cidr("10.244.1.5/32"), &[]));
    }

    #[test]
    fn within_is_the_contained_prefixes() {
        let b = blocks();
        let inside: Vec<Cidr> = b.within(cidr("10.0.0.0/8")).collect();
        assert_eq!(
            inside,
            [
                cidr("10.0.0.0/8"),
                cidr("10.244.1.0/24"),
                cidr("10.244.1.5/32")
            ]
        );
        assert_eq!(b.within(cidr("10.244.1.0/24")).count(), 2);
        assert_eq!(b.within(cidr("0.0.0.0/0")).count(), 3, "IPv4 only");
        assert_eq!(
            b.within(cidr("::/0")).collect::<Vec<_>>(),
            [cidr("fd00::/8")]
        );
    }

    #[test]
    fn split_groups_addresses_by_signature_empty_first() {
        let b = blocks();
        let ip = |a: &str| a.parse::<IpAddr>().expect("ip");
        let parts = split(
            &b,
            [
                (ip("10.244.1.5"), 0),
                (ip("192.168.0.1"), 1),
                (ip("10.1.1.1"), 2),
            ],
        );
        let keys: Vec<&Vec<Cidr>> = parts.keys().collect();
        assert_eq!(keys.len(), 3);
        assert!(
            keys[0].is_empty(),
            "the unsplit addresses keep the owner's identity"
        );
    }
}
