//! A cluster made of network namespaces: one per node, one per pod.
//!
//! Addressing (all of it exists only inside the namespaces, none of which has a route
//! out of the machine):
//! - node `i` (1-based, in the order of [`ClusterBuilder::node`]) owns pod CIDR
//!   `10.244.i.0/24` and has address `192.168.250.i/24` on its fabric link `fab0`;
//! - nodes are linked by one veth pair when there are two, and through a bridge `br0` in
//!   an extra "fabric" namespace when there are more; each node routes every other
//!   node's pod CIDR via that node's fabric address, and forwards (ip_forward=1);
//! - pods are routed, not bridged (the Calico layout): the pod has its IP as a /32 on
//!   `eth0` and a default route via the link-local gateway [`POD_GATEWAY`]
//!   (169.254.1.1). The host side of the veth lives in the node namespace, carries the
//!   gateway address itself (so it answers ARP for it without proxy_arp) and the node
//!   has a /32 route to the pod IP through it.
//!
//! A [dual-stack](ClusterBuilder::dual_stack) cluster mirrors all of that in IPv6:
//! - node `i` owns pod prefix `fd00:244:i::/64` and has `fd00:250::i/64` on `fab0`, with
//!   routes to the other nodes' pod prefixes and IPv6 forwarding on;
//! - the pod with IPv4 address `10.244.i.h` also gets `fd00:244:i::h`, as a /128 on
//!   `eth0`, a default route via the link-local gateway [`POD_GATEWAY6`] (`fe80::1`, on
//!   each host-side veth) and a /128 route to it in the node;
//! - `i` and `h` are written with the same digits as in the IPv4 address (pod
//!   `10.244.2.11` is `fd00:244:2::11`), which makes the two families easy to match
//!   up in logs, at the price of reading decimal digits as hex groups;
//! - duplicate address detection is off in every namespace (`accept_dad=0`, and `nodad`
//!   on every address): there are no duplicates to find, and DAD would leave addresses
//!   "tentative", i.e. unusable, for about a second after they are added.
//!
//! Each node also has a cgroup2 directory `<cgroup2>/mesh-test-<id>/<node>`; pod
//! processes run inside it, the agent outside it, and the node proxy inside it (the
//! cgroup the agent attaches to: the egress hooks then judge the proxy's in-pod outbound
//! sockets as the pod's, as on a real node).
//!
//! Names are `<prefix>-<pid>-<counter>` ("the id"): unique across the threads of one
//! test process and across processes, and they carry the creator's pid so that
//! [`cleanup_stale`] can remove what a crashed run left behind.

use std::borrow::BorrowMut;
use std::collections::HashSet;
use std::fmt;
use std::fs;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};

use crate::cgroup::{CgroupDir, cgroup2_mount, remove_cgroup_tree};
use crate::netns::{NETNS_RUN_DIR, Netns, delete_netns, ip_in};
use crate::process::{self, ChildGuard, DEFAULT_RUN_TIMEOUT, Placement, Registry};
use crate::sys;

/// The gateway address every pod routes through: present on each host-side veth.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The IPv6 gateway of every pod in a dual-stack cluster: present on each host-side veth.
pub const POD_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// Name of each node's interface towards the other nodes.
pub const FABRIC_IFNAME: &str = "fab0";
/// Name of a pod's interface (inside the pod namespace).
pub const POD_IFNAME: &str = "eth0";

/// Start of every netns name this test bed creates (see [`cleanup_stale`]).
const NETNS_MARK: &str = "mt.";
/// Start of the per-cluster cgroup directory name.
const CGROUP_MARK: &str = "mesh-test-";
/// Interface names must fit IFNAMSIZ (16 bytes with the NUL).
const IFNAMSIZ_MAX: usize = 15;
/// Longest node/pod/prefix name: a pod's host-side veth is `v<pod name>`, which must
/// fit IFNAMSIZ; names also go into netns names and cgroup paths, hence `[a-z0-9-]`.
const MAX_NAME: usize = IFNAMSIZ_MAX - 1;
/// Nodes get `10.244.<i>.0/24` and `192.168.250.<i>`; `i` must fit an octet and avoid .255.
const MAX_NODES: usize = 254;

/// An IPv4 prefix such as `10.244.1.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    /// Network address.
    pub addr: Ipv4Addr,
    /// Prefix length in bits.
    pub prefix_len: u8,
}

impl Ipv4Cidr {
    /// Whether `ip` lies inside this prefix.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        // A /0 shifts by 32 (None, i.e. mask 0); an invalid length > 32 acts like /32.
        let host_bits = 32u32.saturating_sub(u32::from(self.prefix_len));
        let mask = u32::MAX.checked_shl(host_bits).unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Scenario-style description of a cluster; [`ClusterBuilder::build`] creates it.
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until .build()"]
pub struct ClusterBuilder {
    prefix: String,
    nodes: Vec<String>,
    pods: Vec<(String, String, String)>,
    dual_stack: bool,
}

impl ClusterBuilder {
    /// Adds a node; the `i`-th node added (from 1) owns pod CIDR `10.244.i.0/24`.
    pub fn node(mut self, name: &str) -> Self {
        self.nodes.push(name.to_owned());
        self
    }

    /// Adds a pod on `node` with address `ip`, which must lie in that node's pod CIDR.
    pub fn pod(mut self, node: &str, name: &str, ip: &str) -> Self {
        self.pods
            .push((node.to_owned(), name.to_owned(), ip.to_owned()));
        self
    }

    /// Gives every node and pod an IPv6 address and IPv6 routes beside the IPv4 ones:
    /// pod `10.244.i.h` also gets `fd00:244:i::h` (see the [module docs](self)).
    pub fn dual_stack(mut self) -> Self {
        self.dual_stack = true;
        self
    }

    /// Creates every namespace, link, route and cgroup. On error, whatever was already
    /// created is removed again.
    pub fn build(self) -> Result<Cluster> {
        // Once per process: a crashed earlier run (or one built with panic=abort) left
        // things behind; removing them keeps the machine from filling up.
        static STALE: Once = Once::new();
        STALE.call_once(|| {
            if let Err(e) = cleanup_stale() {
                eprintln!("mesh-tests: cleanup of stale test resources failed: {e:#}");
            }
        });
        let spec = Spec::validate(self)?;
        Cluster::create(spec)
    }
}

/// Checked form of the builder.
struct Spec {
    prefix: String,
    nodes: Vec<String>,
    pods: Vec<PodSpec>,
    dual_stack: bool,
}

/// A checked pod of the builder.
struct PodSpec {
    node_index: usize,
    name: String,
    ip: Ipv4Addr,
    ip6: Option<Ipv6Addr>,
}

impl Spec {
    fn validate(b: ClusterBuilder) -> Result<Self> {
        check_name("prefix", &b.prefix)?;
        ensure!(!b.nodes.is_empty(), "a cluster needs at least one node");
        ensure!(b.nodes.len() <= MAX_NODES, "at most {MAX_NODES} nodes");
        let mut names = HashSet::new();
        for node in &b.nodes {
            check_name("node", node)?;
            ensure!(names.insert(node.as_str()), "duplicate node {node:?}");
        }
        let mut pod_names = HashSet::new();
        let mut pod_ips = HashSet::new();
        let mut pods = Vec::new();
        for (node, name, ip) in b.pods {
            check_name("pod", &name)?;
            ensure!(pod_names.insert(name.clone()), "duplicate pod {name:?}");
            let index = b
                .nodes
                .iter()
                .position(|n| *n == node)
                .ok_or_else(|| anyhow!("pod {name:?}: unknown node {node:?}"))?;
            let ip: Ipv4Addr = ip
                .parse()
                .with_context(|| format!("pod {name:?}: bad IPv4 address {ip:?}"))?;
            let cidr = pod_cidr(index);
            ensure!(
                cidr.contains(ip)
                    && ![cidr.addr, Ipv4Addr::from(u32::from(cidr.addr) | 0xff)].contains(&ip),
                "pod {name:?}: {ip} is not a host address of node {node:?}'s pod CIDR {cidr}"
            );
            ensure!(
                pod_ips.insert(ip),
                "pod {name:?}: address {ip} already used"
            );
            let ip6 = b.dual_stack.then(|| pod_ip6(index, ip));
            pods.push(PodSpec {
                node_index: index,
                name,
                ip,
                ip6,
            });
        }
        Ok(Self {
            prefix: b.prefix,
            nodes: b.nodes,
            pods,
            dual_stack: b.dual_stack,
        })
    }
}

/// Names become parts of netns names, cgroup paths and interface names.
fn check_name(what: &str, name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= MAX_NAME
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
        "{what} name {name:?} must be 1..={MAX_NAME} characters of [a-z0-9-]"
    );
    Ok(())
}

/// Pod CIDR of the node at 0-based `index`.
fn pod_cidr(index: usize) -> Ipv4Cidr {
    Ipv4Cidr {
        addr: Ipv4Addr::new(10, 244, octet(index), 0),
        prefix_len: 24,
    }
}

/// Fabric address of the node at 0-based `index`.
fn node_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 250, octet(index))
}

fn octet(index: usize) -> u8 {
    u8::try_from(index + 1).expect("node count checked against MAX_NODES")
}

/// IPv6 pod address beside `ip` (`10.244.i.h`) on the node at 0-based `index`:
/// `fd00:244:i::h`.
fn pod_ip6(index: usize, ip: Ipv4Addr) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfd00,
        0x244,
        same_digits(octet(index)),
        0,
        0,
        0,
        0,
        same_digits(ip.octets()[3]),
    )
}

/// IPv6 pod prefix (`/64`) of the node at 0-based `index`: `fd00:244:i::`.
fn pod_prefix6(index: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x244, same_digits(octet(index)), 0, 0, 0, 0, 0)
}

/// IPv6 fabric address of the node at 0-based `index`: `fd00:250::i` (in a /64).
fn node_ip6(index: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x250, 0, 0, 0, 0, 0, same_digits(octet(index)))
}

/// The hex group written with the decimal digits of `n` (11 → 0x11), so that IPv6
/// addresses repeat the numbers of their IPv4 twins.
fn same_digits(n: u8) -> u16 {
    u16::from_str_radix(&n.to_string(), 16).expect("at most three decimal digits fit a hex group")
}

/// A node: a network namespace plus a cgroup directory.
#[derive(Debug)]
pub struct Node {
    name: String,
    index: usize,
    netns: Netns,
    cgroup: CgroupDir,
    registry: Arc<Registry>,
    dual_stack: bool,
}

impl Node {
    /// The node's name as given to the builder.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Name of its network namespace (for `ip -n`, `nsenter --net=/run/netns/<name>`).
    pub fn netns_name(&self) -> &str {
        self.netns.name()
    }

    /// `/run/netns/<netns_name>`.
    pub fn netns_path(&self) -> PathBuf {
        self.netns.path()
    }

    /// The node's cgroup2 directory: pod processes run here; attach the node's cgroup
    /// programs here.
    pub fn cgroup_dir(&self) -> &Path {
        self.cgroup.path()
    }

    /// Address on the fabric link (`192.168.250.i`).
    pub fn ip(&self) -> Ipv4Addr {
        node_ip(self.index)
    }

    /// The node's pod CIDR (`10.244.i.0/24`).
    pub fn pod_cidr(&self) -> Ipv4Cidr {
        pod_cidr(self.index)
    }

    /// IPv6 address on the fabric link (`fd00:250::i`) in a dual-stack cluster.
    pub fn ip6(&self) -> Option<Ipv6Addr> {
        self.dual_stack.then(|| node_ip6(self.index))
    }

    /// Starts `cmd` in the node's netns but NOT in its cgroup: for the agent, whose
    /// own sockets must not pass through the hooks it attaches to the node cgroup.
    pub fn spawn_outside_cgroup(&self, cmd: impl BorrowMut<Command>) -> Result<ChildGuard> {
        process::spawn(cmd, &self.placement(), &self.registry)
    }

    /// Starts `cmd` in the node's netns AND in its cgroup: for the node proxy, whose
    /// sockets must pass through the node's hooks as the pods' do.
    pub fn spawn_in_cgroup(&self, cmd: impl BorrowMut<Command>) -> Result<ChildGuard> {
        let placement = Placement {
            netns: self.netns_path(),
            cgroup: Some(self.cgroup_dir()),
        };
        process::spawn(cmd, &placement, &self.registry)
    }

    /// Runs `cmd` to completion in the node's netns (not in its cgroup), like
    /// `Command::output` but killed after [`DEFAULT_RUN_TIMEOUT`].
    pub fn run_outside_cgroup(&self, cmd: impl BorrowMut<Command>) -> Result<Output> {
        process::run(cmd, &self.placement(), &self.registry, DEFAULT_RUN_TIMEOUT)
    }

    /// Runs `f` on a thread inside the node's netns (the thread stays in the test
    /// runner's cgroup, so mesh hooks on the node cgroup do not see its sockets).
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        sys::in_netns(&self.netns_path(), f)
            .with_context(|| format!("enter netns of node {}", self.name))
    }

    fn placement(&self) -> Placement<'_> {
        Placement {
            netns: self.netns_path(),
            cgroup: None,
        }
    }
}

/// A pod: a network namespace wired to its node, whose processes run in the node's
/// cgroup.
#[derive(Debug)]
pub struct Pod {
    name: String,
    node: String,
    ip: Ipv4Addr,
    ip6: Option<Ipv6Addr>,
    host_ifname: String,
    netns: Netns,
    cgroup: PathBuf,
    registry: Arc<Registry>,
}

impl Pod {
    /// The pod's name as given to the builder.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name of the node it runs on.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The pod IP.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The pod's IPv6 address (`fd00:244:i::h`) in a dual-stack cluster.
    pub fn ip6(&self) -> Option<Ipv6Addr> {
        self.ip6
    }

    /// Name of the host side of its veth, inside the node's netns (where tc programs
    /// for this pod attach).
    pub fn host_ifname(&self) -> &str {
        &self.host_ifname
    }

    /// Name of its network namespace.
    pub fn netns_name(&self) -> &str {
        self.netns.name()
    }

    /// `/run/netns/<netns_name>`.
    pub fn netns_path(&self) -> PathBuf {
        self.netns.path()
    }

    /// The cgroup its processes run in (its node's).
    pub fn cgroup_dir(&self) -> &Path {
        &self.cgroup
    }

    /// The cookie of the pod's netns (`SO_NETNS_COOKIE`), the key eBPF programs see
    /// via `bpf_get_netns_cookie`.
    pub fn netns_cookie(&self) -> Result<u64> {
        sys::in_netns(&self.netns_path(), sys::current_netns_cookie)
            .and_then(|cookie| cookie)
            .with_context(|| format!("netns cookie of pod {}", self.name))
    }

    /// Starts `cmd` inside the pod netns and the node cgroup. The returned guard kills
    /// it on drop. Hooks are added to `cmd`; don't reuse it for another pod.
    pub fn spawn(&self, cmd: impl BorrowMut<Command>) -> Result<ChildGuard> {
        process::spawn(cmd, &self.placement(), &self.registry)
    }

    /// Starts an idle process in the pod, so that the agent finds its network
    /// namespace (it finds pods through their processes, and short-lived clients are
    /// found only by chance). It lives until the guard drops.
    pub fn spawn_anchor(&self) -> Result<ChildGuard> {
        let mut cmd = Command::new("sleep");
        cmd.arg("infinity")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        self.spawn(cmd)
    }

    /// Runs `cmd` to completion like [`Pod::spawn`] and returns its output (a non-zero
    /// exit is not an error); killed and an error after [`DEFAULT_RUN_TIMEOUT`].
    pub fn run(&self, cmd: impl BorrowMut<Command>) -> Result<Output> {
        self.run_timeout(cmd, DEFAULT_RUN_TIMEOUT)
    }

    /// [`Pod::run`] with an explicit timeout.
    pub fn run_timeout(&self, cmd: impl BorrowMut<Command>, timeout: Duration) -> Result<Output> {
        process::run(cmd, &self.placement(), &self.registry, timeout)
    }

    /// Runs `f` on a thread inside the pod's netns. The thread stays in the test
    /// runner's cgroup, so mesh hooks do NOT see its sockets; use [`Pod::spawn`] for
    /// traffic that should go through the mesh.
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        sys::in_netns(&self.netns_path(), f)
            .with_context(|| format!("enter netns of pod {}", self.name))
    }

    fn placement(&self) -> Placement<'_> {
        Placement {
            netns: self.netns_path(),
            cgroup: Some(&self.cgroup),
        }
    }
}

/// A running test cluster. Dropping it (also while unwinding from a panic) kills every
/// process started in it and removes its namespaces, links and cgroups.
#[derive(Debug)]
pub struct Cluster {
    id: String,
    // Field order is irrelevant: Drop tears down explicitly, in dependency order.
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    fabric: Option<Netns>,
    cgroup_root: CgroupDir,
    registry: Arc<Registry>,
}

impl Cluster {
    /// Starts describing a cluster; `prefix` (1..=14 of `[a-z0-9-]`) starts every
    /// name it creates, e.g. the test's name.
    pub fn builder(prefix: &str) -> ClusterBuilder {
        ClusterBuilder {
            prefix: prefix.to_owned(),
            nodes: Vec::new(),
            pods: Vec::new(),
            dual_stack: false,
        }
    }

    /// The unique id of this cluster (`<prefix>-<pid>-<counter>`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The node called `name`. Panics on an unknown name (a bug in the test).
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| {
                panic!(
                    "no node {name:?} in cluster {} (nodes: {:?})",
                    self.id,
                    self.nodes.iter().map(Node::name).collect::<Vec<_>>()
                )
            })
    }

    /// The pod called `name`. Panics on an unknown name (a bug in the test).
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| {
                panic!(
                    "no pod {name:?} in cluster {} (pods: {:?})",
                    self.id,
                    self.pods.iter().map(Pod::name).collect::<Vec<_>>()
                )
            })
    }

    /// All nodes, in the order they were added.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// All pods, in the order they were added.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The directory holding the node cgroups (`<cgroup2>/mesh-test-<id>`).
    pub fn cgroup_root(&self) -> &Path {
        self.cgroup_root.path()
    }

    /// Names of every network namespace of the cluster (nodes, pods, fabric).
    pub fn netns_names(&self) -> Vec<String> {
        let nodes = self.nodes.iter().map(|n| n.netns.name());
        let pods = self.pods.iter().map(|p| p.netns.name());
        nodes
            .chain(pods)
            .chain(self.fabric.as_ref().map(Netns::name))
            .map(str::to_owned)
            .collect()
    }

    fn create(spec: Spec) -> Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "{}-{}-{}",
            spec.prefix,
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let registry = Arc::new(Registry::default());
        let cgroup_root = CgroupDir::create(cgroup2_mount()?.join(format!("{CGROUP_MARK}{id}")))?;
        // From here on `cluster` owns everything created, so an error (or a panic)
        // part-way through tears down the partial cluster.
        let mut cluster = Self {
            id,
            nodes: Vec::new(),
            pods: Vec::new(),
            fabric: None,
            cgroup_root,
            registry,
        };
        for (index, name) in spec.nodes.iter().enumerate() {
            let netns = Netns::create(format!("{NETNS_MARK}{}.n.{name}", cluster.id))?;
            let cgroup = CgroupDir::create(cluster.cgroup_root.path().join(name))?;
            let registry = Arc::clone(&cluster.registry);
            cluster.nodes.push(Node {
                name: name.clone(),
                index,
                netns,
                cgroup,
                registry,
                dual_stack: spec.dual_stack,
            });
            let node = cluster.nodes.last().expect("just pushed");
            if spec.dual_stack {
                // Before any link exists: new links take their settings from "default".
                no_dad(&node.netns)?;
            }
            netns_forwarding(node)?;
        }
        cluster.wire_fabric()?;
        for PodSpec {
            node_index,
            name,
            ip,
            ip6,
        } in spec.pods
        {
            let node = &cluster.nodes[node_index];
            let netns = Netns::create(format!("{NETNS_MARK}{}.p.{name}", cluster.id))?;
            if ip6.is_some() {
                no_dad(&netns)?;
            }
            let host_ifname = format!("v{name}");
            debug_assert!(
                host_ifname.len() <= IFNAMSIZ_MAX,
                "MAX_NAME keeps `v<name>` within IFNAMSIZ"
            );
            let pod = Pod {
                name,
                node: node.name.clone(),
                ip,
                ip6,
                host_ifname,
                netns,
                cgroup: node.cgroup.path().to_owned(),
                registry: Arc::clone(&cluster.registry),
            };
            let wired = wire_pod(node, &pod);
            cluster.pods.push(pod);
            wired?;
        }
        Ok(cluster)
    }

    /// Links the nodes: a veth pair for two nodes, a bridge netns for more.
    fn wire_fabric(&mut self) -> Result<()> {
        match self.nodes.as_slice() {
            [] | [_] => return Ok(()),
            [a, b] => ip_in(
                a.netns.name(),
                &[
                    "link",
                    "add",
                    FABRIC_IFNAME,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    FABRIC_IFNAME,
                    "netns",
                    b.netns.name(),
                ],
            )?,
            _ => {
                let fabric = self
                    .fabric
                    .insert(Netns::create(format!("{NETNS_MARK}{}.fabric", self.id))?);
                // Without snooping the bridge floods multicast, so IPv6 neighbour
                // solicitations never depend on having seen an MLD report first.
                ip_in(
                    fabric.name(),
                    &[
                        "link",
                        "add",
                        "br0",
                        "type",
                        "bridge",
                        "mcast_snooping",
                        "0",
                    ],
                )?;
                ip_in(fabric.name(), &["link", "set", "br0", "up"])?;
                for node in &self.nodes {
                    let port = format!("n{}", node.index + 1);
                    ip_in(
                        fabric.name(),
                        &[
                            "link",
                            "add",
                            &port,
                            "type",
                            "veth",
                            "peer",
                            "name",
                            FABRIC_IFNAME,
                            "netns",
                            node.netns.name(),
                        ],
                    )?;
                    ip_in(
                        fabric.name(),
                        &["link", "set", &port, "master", "br0", "up"],
                    )?;
                }
            }
        }
        for node in &self.nodes {
            let ns = node.netns.name();
            ip_in(
                ns,
                &[
                    "addr",
                    "add",
                    &format!("{}/24", node.ip()),
                    "dev",
                    FABRIC_IFNAME,
                ],
            )?;
            ip_in(ns, &["link", "set", FABRIC_IFNAME, "up"])?;
            for other in self.nodes.iter().filter(|o| o.index != node.index) {
                let (cidr, via) = (other.pod_cidr().to_string(), other.ip().to_string());
                ip_in(
                    ns,
                    &["route", "add", &cidr, "via", &via, "dev", FABRIC_IFNAME],
                )?;
            }
            let Some(ip6) = node.ip6() else { continue };
            ip_in(
                ns,
                &[
                    "addr",
                    "add",
                    &format!("{ip6}/64"),
                    "dev",
                    FABRIC_IFNAME,
                    "nodad",
                ],
            )?;
            for other in self.nodes.iter().filter(|o| o.index != node.index) {
                let prefix = format!("{}/64", pod_prefix6(other.index));
                let via = node_ip6(other.index).to_string();
                ip_in(
                    ns,
                    &[
                        "-6",
                        "route",
                        "add",
                        &prefix,
                        "via",
                        &via,
                        "dev",
                        FABRIC_IFNAME,
                    ],
                )?;
            }
        }
        Ok(())
    }
}

/// Nodes route between their pods and the other nodes.
fn netns_forwarding(node: &Node) -> Result<()> {
    node.netns.sysctl("net.ipv4.ip_forward", "1")?;
    if node.dual_stack {
        node.netns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    }
    Ok(())
}

/// Turns off IPv6 duplicate address detection for the links created afterwards (and
/// the existing ones), so addresses are usable at once instead of "tentative".
fn no_dad(netns: &Netns) -> Result<()> {
    netns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
    netns.sysctl("net.ipv6.conf.default.accept_dad", "0")
}

/// Creates the pod's veth (pod end `eth0`, host end in the node netns), its address and
/// routes, and the node's route to it.
fn wire_pod(node: &Node, pod: &Pod) -> Result<()> {
    let (pod_ns, node_ns, host) = (
        pod.netns.name(),
        node.netns.name(),
        pod.host_ifname.as_str(),
    );
    let gateway = POD_GATEWAY.to_string();
    ip_in(
        pod_ns,
        &[
            "link", "add", POD_IFNAME, "type", "veth", "peer", "name", host, "netns", node_ns,
        ],
    )?;
    ip_in(
        pod_ns,
        &["addr", "add", &format!("{}/32", pod.ip), "dev", POD_IFNAME],
    )?;
    ip_in(pod_ns, &["link", "set", POD_IFNAME, "up"])?;
    ip_in(
        pod_ns,
        &["route", "add", &gateway, "dev", POD_IFNAME, "scope", "link"],
    )?;
    ip_in(
        pod_ns,
        &[
            "route", "add", "default", "via", &gateway, "dev", POD_IFNAME,
        ],
    )?;
    ip_in(
        node_ns,
        &["addr", "add", &format!("{gateway}/32"), "dev", host],
    )?;
    ip_in(node_ns, &["link", "set", host, "up"])?;
    ip_in(
        node_ns,
        &[
            "route",
            "add",
            &format!("{}/32", pod.ip),
            "dev",
            host,
            "scope",
            "link",
        ],
    )?;
    let Some(ip6) = pod.ip6 else { return Ok(()) };
    // Mirrors the IPv4 layout; `nodad` because the address must work immediately.
    let gateway6 = POD_GATEWAY6.to_string();
    ip_in(
        pod_ns,
        &[
            "addr",
            "add",
            &format!("{ip6}/128"),
            "dev",
            POD_IFNAME,
            "nodad",
        ],
    )?;
    ip_in(
        pod_ns,
        &[
            "-6", "route", "add", "default", "via", &gateway6, "dev", POD_IFNAME,
        ],
    )?;
    ip_in(
        node_ns,
        &[
            "addr",
            "add",
            &format!("{gateway6}/64"),
            "dev",
            host,
            "nodad",
        ],
    )?;
    ip_in(
        node_ns,
        &["-6", "route", "add", &format!("{ip6}/128"), "dev", host],
    )?;
    Ok(())
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // 1. Processes first: a live process pins its netns (and the veths in it) and
        //    keeps its cgroup non-removable.
        self.registry.kill_all();
        for node in &self.nodes {
            if let Err(e) = node.cgroup.kill_all() {
                eprintln!("mesh-tests: cleanup: {e:#}");
            }
        }
        // 2. Namespaces: deleting a netns destroys the veths in it, so nothing is left in
        //    the root namespace (none of our links ever lived there).
        let netns = self
            .pods
            .iter_mut()
            .map(|p| &mut p.netns)
            .chain(self.nodes.iter_mut().map(|n| &mut n.netns));
        for ns in netns.chain(self.fabric.as_mut()) {
            if let Err(e) = ns.delete() {
                eprintln!("mesh-tests: cleanup: {e:#}");
            }
        }
        // 3. cgroups, children before the parent.
        for node in &mut self.nodes {
            if let Err(e) = node.cgroup.remove() {
                eprintln!("mesh-tests: cleanup: {e:#}");
            }
        }
        if let Err(e) = self.cgroup_root.remove() {
            eprintln!("mesh-tests: cleanup: {e:#}");
        }
    }
}

/// Removes namespaces and cgroups left by test runs whose process no longer exists
/// (crashed, killed, or built with `panic = "abort"` so no Drop ran). Resources of live
/// processes, including parallel test runs, are never touched.
pub fn cleanup_stale() -> Result<()> {
    let mut errors = Vec::new();
    if let Ok(entries) = fs::read_dir(NETNS_RUN_DIR) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let id = name
                .strip_prefix(NETNS_MARK)
                .and_then(|rest| rest.split('.').next());
            if id.is_some_and(creator_is_dead) {
                errors.extend(delete_netns(&name).err());
            }
        }
    }
    let root = cgroup2_mount()?;
    for entry in fs::read_dir(root)
        .with_context(|| format!("list {}", root.display()))?
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.strip_prefix(CGROUP_MARK).is_some_and(creator_is_dead) {
            errors.extend(remove_cgroup_tree(&entry.path()).err());
        }
    }
    // Report every failure, fail with the first: one stuck leftover must not hide others.
    for later in errors.iter().skip(1) {
        eprintln!("mesh-tests: stale cleanup: {later:#}");
    }
    match errors.into_iter().next() {
        None => Ok(()),
        Some(first) => Err(first),
    }
}

/// Whether the process that created the cluster id `<prefix>-<pid>-<counter>` is gone.
/// Ids that don't parse are not ours and count as alive (never touched).
fn creator_is_dead(id: &str) -> bool {
    let mut parts = id.rsplitn(3, '-');
    let (Some(counter), Some(pid), Some(_prefix)) = (parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    match (counter.parse::<u32>(), pid.parse::<u32>()) {
        (Ok(_), Ok(pid)) => !Path::new(&format!("/proc/{pid}")).exists(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_contains() {
        let cidr = pod_cidr(1);
        assert_eq!(cidr.to_string(), "10.244.2.0/24");
        assert!(cidr.contains(Ipv4Addr::new(10, 244, 2, 11)));
        assert!(!cidr.contains(Ipv4Addr::new(10, 244, 1, 11)));
        let all = Ipv4Cidr {
            addr: Ipv4Addr::UNSPECIFIED,
            prefix_len: 0,
        };
        assert!(all.contains(Ipv4Addr::new(1, 2, 3, 4)));
    }

    #[test]
    fn validation_rejects_bad_specs() {
        let err = |b: ClusterBuilder| {
            Spec::validate(b)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(
            err(Cluster::builder("t")
                .node("n1")
                .pod("n1", "a", "10.244.2.5"))
            .contains("pod CIDR")
        );
        assert!(
            err(Cluster::builder("t")
                .node("n1")
                .pod("n1", "a", "10.244.1.0"))
            .contains("pod CIDR")
        );
        assert!(
            err(Cluster::builder("t")
                .node("n1")
                .pod("n9", "a", "10.244.1.5"))
            .contains("unknown node")
        );
        assert!(err(Cluster::builder("t").node("n1").node("n1")).contains("duplicate node"));
        assert!(err(Cluster::builder("t").node("N1")).contains("[a-z0-9-]"));
        assert!(
            err(Cluster::builder("t")
                .node("n1")
                .pod("n1", "a-very-long-pod-name", "10.244.1.5"))
            .contains("1..=")
        );
        assert!(
            err(Cluster::builder("t")
                .node("n1")
                .pod("n1", "a", "10.244.1.5")
                .pod("n1", "b", "10.244.1.5"))
            .contains("already used")
        );
        assert!(
            Spec::validate(Cluster::builder("t").node("n1").node("n2").pod(
                "n2",
                "web",
                "10.244.2.11"
            ))
            .is_ok()
        );
    }

    #[test]
    fn ipv6_addresses_repeat_the_ipv4_digits() {
        assert_eq!(
            pod_ip6(1, Ipv4Addr::new(10, 244, 2, 11)).to_string(),
            "fd00:244:2::11"
        );
        assert_eq!(pod_prefix6(0).to_string(), "fd00:244:1::");
        assert_eq!(node_ip6(253).to_string(), "fd00:250::254");
        let pod_ip6s = |b: ClusterBuilder| {
            Spec::validate(b.node("n1").pod("n1", "a", "10.244.1.5"))
                .unwrap()
                .pods
                .iter()
                .map(|p| p.ip6)
                .collect::<Vec<_>>()
        };
        assert_eq!(pod_ip6s(Cluster::builder("t")), [None]);
        assert_eq!(
            pod_ip6s(Cluster::builder("t").dual_stack()),
            [Some("fd00:244:1::5".parse().unwrap())]
        );
    }

    #[test]
    fn stale_ids_are_parsed_conservatively() {
        assert!(!creator_is_dead(&format!("lb-{}-0", std::process::id())));
        assert!(!creator_is_dead("not-ours"));
        assert!(!creator_is_dead("x-12ab-0"));
        // pid_max is at most 2^22, so this pid cannot exist.
        assert!(creator_is_dead("my-test-99999999-3"));
    }
}
