//! Reachability truth tables in the style of the upstream Kubernetes NetworkPolicy e2e
//! suite (`test/e2e/network/netpol`, kubernetes/kubernetes): every peer against every
//! peer, an expected verdict per pair written with a few rules ("nothing reaches
//! namespace x", "x/b reaches x/a"), and observed outcomes printed as grids beside
//! them when they differ.
//!
//! Peers are named `namespace/pod` (`x/a`), or by a bare name for an address that is
//! no pod (an "external" host). A pair of a peer with itself is not judged: like
//! upstream (which ignores loopback), the grids show it as `-`.
//!
//! ```
//! use mesh_tests::reachability::{Peer, Reachability};
//!
//! let mut r = Reachability::new(&["x/a", "x/b", "y/a"], true);
//! r.expect_peer(Peer::ANY, Peer::ns("x"), false);
//! r.expect("x/b", "x/a", true);
//! assert!(!r.allowed("y/a", "x/b"));
//! assert!(r.allowed("x/b", "x/a"));
//! assert!(r.allowed("x/a", "y/a"));
//! ```

use std::fmt::Write as _;

/// A set of peers, matched by namespace and pod name (upstream's `Peer`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Peer {
    /// `None`: any namespace, and peers that are no pod.
    pub namespace: Option<&'static str>,
    /// `None`: any pod of the namespace.
    pub pod: Option<&'static str>,
}

impl Peer {
    /// Every peer.
    pub const ANY: Self = Self {
        namespace: None,
        pod: None,
    };

    /// Every pod of namespace `namespace`.
    pub const fn ns(namespace: &'static str) -> Self {
        Self {
            namespace: Some(namespace),
            pod: None,
        }
    }

    /// Pod `namespace/pod`.
    pub const fn pod(namespace: &'static str, pod: &'static str) -> Self {
        Self {
            namespace: Some(namespace),
            pod: Some(pod),
        }
    }

    fn matches(self, peer: &str) -> bool {
        match (self.namespace, peer.split_once('/')) {
            (None, _) => self.pod.is_none(),
            (Some(_), None) => false,
            (Some(ns), Some((peer_ns, peer_pod))) => {
                ns == peer_ns && self.pod.is_none_or(|p| p == peer_pod)
            }
        }
    }
}

/// What a probe of one pair gave: its verdict (`Some(true)` reachable, `Some(false)`
/// denied, `None` neither) and its outcome as probed.
pub type Observation = (Option<bool>, String);

/// The expected verdict of every ordered pair of peers.
#[derive(Clone, Debug)]
pub struct Reachability {
    peers: Vec<String>,
    /// `allowed[from][to]`.
    allowed: Vec<Vec<bool>>,
}

impl Reachability {
    /// Every pair of `peers` `allowed` (upstream's `NewReachability`).
    pub fn new(peers: &[&str], allowed: bool) -> Self {
        Self {
            peers: peers.iter().map(|&p| p.to_owned()).collect(),
            allowed: vec![vec![allowed; peers.len()]; peers.len()],
        }
    }

    /// The peers, in row/column order.
    pub fn peers(&self) -> &[String] {
        &self.peers
    }

    fn index(&self, peer: &str) -> usize {
        self.peers
            .iter()
            .position(|p| p == peer)
            .unwrap_or_else(|| panic!("{peer} is not a peer of this table"))
    }

    /// Sets one pair.
    ///
    /// # Panics
    /// If either peer is not in the table.
    pub fn expect(&mut self, from: &str, to: &str, allowed: bool) -> &mut Self {
        let (f, t) = (self.index(from), self.index(to));
        self.allowed[f][t] = allowed;
        self
    }

    /// Sets every pair from a peer of `from` to a peer of `to`.
    pub fn expect_peer(&mut self, from: Peer, to: Peer, allowed: bool) -> &mut Self {
        for (f, row) in self.allowed.iter_mut().enumerate() {
            if !from.matches(&self.peers[f]) {
                continue;
            }
            for (t, cell) in row.iter_mut().enumerate() {
                if to.matches(&self.peers[t]) {
                    *cell = allowed;
                }
            }
        }
        self
    }

    /// Sets every pair towards `to`.
    pub fn expect_all_ingress(&mut self, to: &str, allowed: bool) -> &mut Self {
        let t = self.index(to);
        for row in &mut self.allowed {
            row[t] = allowed;
        }
        self
    }

    /// Sets every pair from `from`.
    pub fn expect_all_egress(&mut self, from: &str, allowed: bool) -> &mut Self {
        let f = self.index(from);
        self.allowed[f].fill(allowed);
        self
    }

    /// The expected verdict of `from` → `to`.
    pub fn allowed(&self, from: &str, to: &str) -> bool {
        self.allowed[self.index(from)][self.index(to)]
    }

    /// Every judged pair (`from != to`) with its expected verdict.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str, bool)> {
        self.peers.iter().enumerate().flat_map(move |(f, from)| {
            self.peers
                .iter()
                .enumerate()
                .filter(move |&(t, _)| t != f)
                .map(move |(t, to)| (from.as_str(), to.as_str(), self.allowed[f][t]))
        })
    }

    /// Expected and observed grids side by side with the pairs that differ, upstream
    /// style: `.` reachable, `X` not, `?` an outcome that is neither (listed below the
    /// grids), `-` not judged; rows are clients, columns servers. `observed` gives the
    /// [`Observation`] of each pair of [`Reachability::pairs`].
    pub fn report(&self, observed: &dyn Fn(&str, &str) -> Observation) -> String {
        let width = self.peers.iter().map(String::len).max().unwrap_or(1);
        let mut expected = String::new();
        let mut got = String::new();
        let mut diff = String::new();
        let mut mismatches = String::new();
        let header = |out: &mut String| {
            let _ = write!(out, "{:width$}", "");
            for p in &self.peers {
                let _ = write!(out, " {p:>width$}");
            }
            out.push('\n');
        };
        header(&mut expected);
        header(&mut got);
        header(&mut diff);
        for (f, from) in self.peers.iter().enumerate() {
            for out in [&mut expected, &mut got, &mut diff] {
                let _ = write!(out, "{from:>width$}");
            }
            for (t, to) in self.peers.iter().enumerate() {
                if f == t {
                    for out in [&mut expected, &mut got, &mut diff] {
                        let _ = write!(out, " {:>width$}", "-");
                    }
                    continue;
                }
                let want = self.allowed[f][t];
                let (seen, raw) = observed(from, to);
                let _ = write!(expected, " {:>width$}", mark(Some(want)));
                let _ = write!(got, " {:>width$}", mark(seen));
                let same = seen == Some(want);
                let _ = write!(diff, " {:>width$}", if same { "." } else { "X" });
                if !same {
                    let _ = writeln!(
                        mismatches,
                        "  {from} -> {to}: expected {}, got {raw}",
                        if want { "reachable" } else { "denied" }
                    );
                }
            }
            for out in [&mut expected, &mut got, &mut diff] {
                out.push('\n');
            }
        }
        format!(
            "expected:\n{expected}observed:\n{got}comparison (X: differs):\n{diff}differences:\n{mismatches}"
        )
    }
}

fn mark(verdict: Option<bool>) -> &'static str {
    match verdict {
        Some(true) => ".",
        Some(false) => "X",
        None => "?",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEERS: &[&str] = &["x/a", "x/b", "y/a", "ext"];

    #[test]
    fn rules_apply_in_order_and_filters_match_by_namespace_and_pod() {
        let mut r = Reachability::new(PEERS, true);
        r.expect_all_ingress("x/a", false)
            .expect("x/b", "x/a", true)
            .expect_peer(Peer::ns("y"), Peer::ANY, false);
        assert!(!r.allowed("ext", "x/a"), "ingress of x/a closed");
        assert!(r.allowed("x/b", "x/a"), "then x/b -> x/a opened");
        assert!(!r.allowed("y/a", "x/a") && !r.allowed("y/a", "ext"));
        assert!(r.allowed("ext", "y/a"));
        // A namespace filter never matches a peer that is no pod.
        r.expect_peer(Peer::ANY, Peer::ns("x"), false);
        assert!(r.allowed("x/a", "ext"));
        assert!(!r.allowed("ext", "x/b"));
        r.expect_all_egress("ext", true);
        assert!(r.allowed("ext", "x/b"));
        assert!(!Peer::pod("x", "a").matches("x/b"));
        assert!(Peer::pod("x", "a").matches("x/a"));
    }

    #[test]
    fn pairs_leave_out_each_peer_with_itself() {
        let r = Reachability::new(PEERS, false);
        let pairs: Vec<_> = r.pairs().collect();
        assert_eq!(pairs.len(), PEERS.len() * (PEERS.len() - 1));
        assert!(pairs.iter().all(|&(f, t, allowed)| f != t && !allowed));
    }

    #[test]
    fn report_marks_differences_and_lists_their_outcomes() {
        let mut r = Reachability::new(&["x/a", "x/b"], true);
        r.expect("x/b", "x/a", false);
        let report = r.report(&|from, _| match from {
            "x/a" => (Some(true), "ok".to_owned()),
            _ => (None, "probe failed: boom".to_owned()),
        });
        let want = "expected:
    x/a x/b
x/a   -   .
x/b   X   -
observed:
    x/a x/b
x/a   -   .
x/b   ?   -
comparison (X: differs):
    x/a x/b
x/a   -   .
x/b   X   -
differences:
  x/b -> x/a: expected denied, got probe failed: boom
";
        assert_eq!(report, want);
    }
}
