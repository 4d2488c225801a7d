//! Finds the network namespace cookie of every local pod.
//!
//! Network policy in the connect hooks identifies the calling pod by its network namespace
//! cookie (`bpf_get_netns_cookie`), so the agent must map each local pod to that cookie to
//! fill the endpoints map. Cluster state gives pod IPs, not namespaces; each pod namespace
//! ([`super::netns`]) is entered to read its cookie and the addresses configured in it.
//! Matching those addresses with the pod IPs ([`by_ip`]) links a pod to its cookie.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::net::IpAddr;
use std::os::fd::AsFd as _;
use std::path::Path;

use nix::errno::Errno;
use nix::net::if_::InterfaceFlags;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrLike, SockaddrStorage};
use tracing::{debug, warn};

use super::netns::{Netns, NetnsError, for_each_pod_netns};

/// One network namespace of the local pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalNetns {
    /// A process in the namespace, through which it was found: the node proxy opens
    /// `/proc/<pid>/ns/net` to enter it.
    pub pid: u32,
    /// The namespace's inode (`net:[inode]`), to tell it from a later namespace should
    /// `pid` exit and be reused.
    pub inode: u64,
    /// The namespace's cookie, as `bpf_get_netns_cookie` reports it to the connect hooks.
    pub cookie: u64,
    /// Addresses configured in the namespace, sorted and without duplicates: those of every
    /// interface except loopback ones, IPv4 and IPv6, without IPv6 link-local (`fe80::/10`)
    /// addresses, which every interface has and which never identify a pod.
    pub addrs: Vec<IpAddr>,
}

/// Why discovery, or one of its namespaces, failed.
///
/// [`discover`] returns only [`EndpointsError::Netns`] (an unreadable cgroup or own
/// namespace); the others concern a single namespace, which is logged and skipped.
#[derive(Debug, thiserror::Error)]
pub enum EndpointsError {
    /// Finding the namespaces, or entering one, failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// Creating a socket in the namespace, or reading `SO_NETNS_COOKIE` from it, failed.
    #[error("reading the cookie of netns net:[{netns}] (via pid {pid}): {source}")]
    Cookie {
        /// The process through which the namespace was found.
        pid: u32,
        /// The namespace's inode number.
        netns: u64,
        /// The underlying error.
        source: Errno,
    },
    /// Listing the namespace's addresses (`getifaddrs`) failed.
    #[error("listing addresses of netns net:[{netns}] (via pid {pid}): {source}")]
    Addresses {
        /// The process through which the namespace was found.
        pid: u32,
        /// The namespace's inode number.
        netns: u64,
        /// The underlying error.
        source: Errno,
    },
    /// Listing the agent's own (the node's) addresses failed.
    #[error("listing the node's addresses: {0}")]
    NodeAddresses(#[source] Errno),
}

/// The node's own addresses: those of the namespace the agent runs in (same filter as
/// for pods). Traffic from them to a pod is the node's (health probes), which ingress
/// policy always lets in.
pub fn node_addrs() -> Result<Vec<IpAddr>, EndpointsError> {
    let ifaddrs = nix::ifaddrs::getifaddrs().map_err(EndpointsError::NodeAddresses)?;
    Ok(pod_addrs(ifaddrs.map(|ifa| (ifa.flags, ifa.address))))
}

/// Network namespaces of the processes in `cgroup`'s subtree, each with its cookie and the
/// IP addresses configured in it (all interfaces except loopback; IPv4 and IPv6, excluding
/// link-local `fe80::/10`).
///
/// The agent's own namespace is left out even when its processes share the cgroup: the
/// agent and the node are not pods. Processes that exit meanwhile are skipped, and a
/// namespace that fails is logged with `tracing::warn!` and skipped, so one terminating
/// pod cannot hide the others; only an unreadable `cgroup` or `/proc/self/ns/net` is an
/// error. The result is sorted by cookie.
///
/// This blocks (filesystem I/O, one thread per namespace): call it from
/// `tokio::task::spawn_blocking` or a plain thread.
pub fn discover(cgroup: &Path) -> Result<Vec<LocalNetns>, EndpointsError> {
    let mut found = for_each_pod_netns(cgroup, "discovering endpoints", inspect_netns)?;
    found.sort_by_key(|local| local.cookie);
    Ok(found)
}

/// Pod IP → netns cookie, from a discovery.
///
/// An address configured in more than one namespace is left out (and logged): attributing
/// it to either would give one pod the other's identity in policy decisions.
pub fn by_ip(found: &[LocalNetns]) -> BTreeMap<IpAddr, u64> {
    let mut map = BTreeMap::new();
    let mut ambiguous: BTreeMap<IpAddr, Vec<u64>> = BTreeMap::new();
    for local in found {
        for &ip in &local.addrs {
            match map.entry(ip) {
                Entry::Vacant(entry) => {
                    entry.insert(local.cookie);
                }
                Entry::Occupied(entry) if *entry.get() != local.cookie => {
                    ambiguous
                        .entry(ip)
                        .or_insert_with(|| vec![*entry.get()])
                        .push(local.cookie);
                }
                Entry::Occupied(_) => {}
            }
        }
    }
    for (ip, cookies) in ambiguous {
        map.remove(&ip);
        warn!(%ip, ?cookies, "address configured in several network namespaces; not mapped");
    }
    map
}

/// Reads the cookie and addresses of `ns`, on a thread that has entered it.
fn inspect_netns(ns: &Netns) -> Result<LocalNetns, EndpointsError> {
    let (pid, netns) = (ns.pid, ns.inode);
    let cookie =
        current_netns_cookie().map_err(|source| EndpointsError::Cookie { pid, netns, source })?;
    // getifaddrs asks the kernel over a netlink socket it creates on this thread, so it
    // lists the entered namespace's interfaces.
    let ifaddrs = nix::ifaddrs::getifaddrs().map_err(|source| EndpointsError::Addresses {
        pid,
        netns,
        source,
    })?;
    let addrs = pod_addrs(ifaddrs.map(|ifa| (ifa.flags, ifa.address)));
    debug!(pid, netns, cookie, ?addrs, "found pod netns");
    Ok(LocalNetns {
        pid,
        inode: netns,
        cookie,
        addrs,
    })
}

/// Cookie of the calling thread's network namespace.
///
/// A socket belongs to the namespace of the thread that created it, and `SO_NETNS_COOKIE`
/// reports that namespace's cookie, the same value `bpf_get_netns_cookie` gives.
fn current_netns_cookie() -> Result<u64, Errno> {
    let socket = nix::sys::socket::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    crate::sys::netns_cookie(socket.as_fd())
}

/// The addresses among `ifaddrs` (`getifaddrs` entries: interface flags and address) that
/// can belong to a pod, sorted and without duplicates.
///
/// Loopback interfaces and IPv6 link-local addresses are left out: every namespace has
/// them, so they cannot tell pods apart. Entries without an IP address (the link-layer
/// entries `getifaddrs` also returns) are skipped.
fn pod_addrs(
    ifaddrs: impl IntoIterator<Item = (InterfaceFlags, Option<SockaddrStorage>)>,
) -> Vec<IpAddr> {
    let mut addrs: Vec<IpAddr> = ifaddrs
        .into_iter()
        .filter(|(flags, _)| !flags.contains(InterfaceFlags::IFF_LOOPBACK))
        .filter_map(|(_, addr)| {
            let addr = addr?;
            match addr.family()? {
                AddressFamily::Inet => Some(IpAddr::V4(addr.as_sockaddr_in()?.ip())),
                AddressFamily::Inet6 => Some(IpAddr::V6(addr.as_sockaddr_in6()?.ip())),
                _ => None,
            }
        })
        .filter(|ip| !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()))
        .collect();
    addrs.sort_unstable();
    addrs.dedup();
    addrs
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn local(cookie: u64, addrs: &[&str]) -> LocalNetns {
        LocalNetns {
            pid: 100,
            inode: cookie + 4_026_531_000,
            cookie,
            addrs: addrs.iter().map(|a| ip(a)).collect(),
        }
    }

    #[test]
    fn by_ip_maps_every_address_to_its_namespace() {
        let found = [
            local(7, &["10.0.1.5", "fd00::1:5"]),
            local(9, &["10.0.1.6"]),
            local(11, &[]),
        ];
        let map = by_ip(&found);
        assert_eq!(
            map.into_iter().collect::<Vec<_>>(),
            [
                (ip("10.0.1.5"), 7),
                (ip("10.0.1.6"), 9),
                (ip("fd00::1:5"), 7)
            ]
        );
        assert!(by_ip(&[]).is_empty());
    }

    #[test]
    fn by_ip_drops_addresses_of_several_namespaces() {
        let found = [
            local(7, &["10.0.1.5", "10.0.9.9"]),
            local(9, &["10.0.1.6", "10.0.9.9"]),
            local(11, &["10.0.9.9"]),
            // The same namespace listed twice is not a conflict.
            local(9, &["10.0.1.6"]),
        ];
        let map = by_ip(&found);
        assert_eq!(
            map.into_iter().collect::<Vec<_>>(),
            [(ip("10.0.1.5"), 7), (ip("10.0.1.6"), 9)]
        );
    }

    #[test]
    fn pod_addrs_skips_loopback_link_local_and_non_ip_entries() {
        let up = InterfaceFlags::IFF_UP;
        let lo = InterfaceFlags::IFF_UP | InterfaceFlags::IFF_LOOPBACK;
        let sa = |s: &str| Some(SockaddrStorage::from(s.parse::<SocketAddr>().unwrap()));
        let entries = [
            (lo, sa("127.0.0.1:0")),
            (lo, sa("[::1]:0")),
            (up, sa("10.250.1.1:0")),
            (up, sa("[fe80::1]:0")),
            (up, sa("[febf::1]:0")), // still fe80::/10
            (up, sa("[fec0::1]:0")), // just outside it
            (up, sa("[fd00:250:1::1]:0")),
            (up, None),
            // The same address on a second interface is listed once.
            (InterfaceFlags::empty(), sa("10.250.1.1:0")),
            // A pod address on a down interface is still the pod's.
            (InterfaceFlags::empty(), sa("10.250.1.0:0")),
        ];
        assert_eq!(
            pod_addrs(entries),
            [
                ip("10.250.1.0"),
                ip("10.250.1.1"),
                ip("fd00:250:1::1"),
                ip("fec0::1")
            ]
        );
    }

    mod root {
        //! Discovers two throwaway network namespaces through a cgroup; needs root.

        use super::super::*;
        use crate::datapath::netns::tests::{Sandbox, cgroup2_mount, root_test, run};
        use nix::sched::CloneFlags;
        use std::fs::File;
        use std::os::unix::fs::MetadataExt;
        use std::process::Command;
        use std::thread;
        use std::time::{Duration, Instant};

        /// A netns with a veth pair whose `v0` end has `addrs` (both ends up, so the kernel
        /// also gives them IPv6 link-local addresses).
        fn add_pod_netns(sandbox: &mut Sandbox, name: &str, addrs: &[&str]) {
            sandbox.add_netns(name);
            let ip = |args: &[&str]| run(Command::new("ip").args(["-n", name]).args(args));
            ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
            for addr in addrs {
                // nodad: the address is usable at once rather than tentative.
                let extra: &[&str] = if addr.contains(':') { &["nodad"] } else { &[] };
                ip(&[&["addr", "add", addr, "dev", "v0"], extra].concat());
            }
            ip(&["link", "set", "v0", "up"]);
            ip(&["link", "set", "v1", "up"]);
        }

        /// A `sleep` in `cgroup` and (when given) the netns `netns`, once it is there.
        fn spawn_sleep(sandbox: &mut Sandbox, cgroup: &Path, netns: Option<&str>) {
            let mut cmd = match netns {
                Some(netns) => {
                    let mut cmd = Command::new("nsenter");
                    cmd.arg(format!("--net=/run/netns/{netns}")).arg("sleep");
                    cmd
                }
                None => Command::new("sleep"),
            };
            let pid = sandbox.adopt(cmd.arg("30").spawn().unwrap(), cgroup);
            if let Some(netns) = netns {
                // nsenter switches namespaces only after it started: wait for that, or
                // discovery could still see the process in the test's own netns.
                let want = ns_id(&format!("/run/netns/{netns}"));
                let deadline = Instant::now() + Duration::from_secs(5);
                while ns_id(&format!("/proc/{pid}/ns/net")) != want {
                    assert!(Instant::now() < deadline, "pid {pid} never entered {netns}");
                    thread::sleep(Duration::from_millis(10));
                }
            }
        }

        fn ns_id(path: &str) -> (u64, u64) {
            let meta = std::fs::metadata(path).unwrap();
            (meta.dev(), meta.ino())
        }

        /// The cookie read by a thread that entered `/run/netns/<name>` directly, without
        /// going through a process.
        fn cookie_of(name: &str) -> u64 {
            let file = File::open(format!("/run/netns/{name}")).unwrap();
            thread::spawn(move || {
                nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).unwrap();
                current_netns_cookie().unwrap()
            })
            .join()
            .unwrap()
        }

        #[test]
        fn discovers_cookies_and_addresses_of_pod_namespaces() {
            root_test(
                "epd",
                "creating network namespaces and cgroups",
                |sandbox, tag| {
                    let (a, b) = (format!("{tag}-a"), format!("{tag}-b"));
                    add_pod_netns(sandbox, &a, &["10.250.1.1/32", "fd00:250:1::1/128"]);
                    add_pod_netns(sandbox, &b, &["10.250.2.1/32", "fd00:250:2::1/128"]);

                    let root = sandbox.add_cgroup(cgroup2_mount().join(tag));
                    // Processes only in leaves, as cgroup2 requires once controllers are enabled.
                    let pod_a = sandbox.add_cgroup(root.join("pod-a"));
                    let pod_b = sandbox.add_cgroup(root.join("pod-b"));
                    let pod_b_ctr = sandbox.add_cgroup(pod_b.join("ctr"));
                    let host = sandbox.add_cgroup(root.join("host"));
                    // Two processes of one pod share its namespace: it is listed once.
                    spawn_sleep(sandbox, &pod_a, Some(&a));
                    spawn_sleep(sandbox, &pod_a, Some(&a));
                    spawn_sleep(sandbox, &pod_b_ctr, Some(&b));
                    // A process in the test's own (the "agent's") namespace is not a pod.
                    spawn_sleep(sandbox, &host, None);

                    let found = discover(&root).unwrap();
                    let (cookie_a, cookie_b) = (cookie_of(&a), cookie_of(&b));
                    let own = current_netns_cookie().unwrap();
                    assert_ne!(cookie_a, 0);
                    assert_ne!(cookie_b, 0);
                    assert!(cookie_a != cookie_b && cookie_a != own && cookie_b != own);

                    // Each is found through one of its processes, and names its inode.
                    for local in &found {
                        assert_eq!(ns_id(&format!("/proc/{}/ns/net", local.pid)).1, local.inode);
                    }
                    let pid_of = |cookie| {
                        found
                            .iter()
                            .find(|l| l.cookie == cookie)
                            .map_or(0, |l| l.pid)
                    };
                    let mut expected = vec![
                        LocalNetns {
                            pid: pid_of(cookie_a),
                            inode: ns_id(&format!("/run/netns/{a}")).1,
                            cookie: cookie_a,
                            addrs: vec![
                                "10.250.1.1".parse().unwrap(),
                                "fd00:250:1::1".parse().unwrap(),
                            ],
                        },
                        LocalNetns {
                            pid: pid_of(cookie_b),
                            inode: ns_id(&format!("/run/netns/{b}")).1,
                            cookie: cookie_b,
                            addrs: vec![
                                "10.250.2.1".parse().unwrap(),
                                "fd00:250:2::1".parse().unwrap(),
                            ],
                        },
                    ];
                    expected.sort_by_key(|local| local.cookie);
                    assert_eq!(found, expected);

                    let map = by_ip(&found);
                    assert_eq!(map.len(), 4);
                    assert_eq!(map[&"10.250.1.1".parse::<IpAddr>().unwrap()], cookie_a);
                    assert_eq!(map[&"fd00:250:2::1".parse::<IpAddr>().unwrap()], cookie_b);
                },
            );
        }
    }
}
