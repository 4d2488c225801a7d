//! Destroys connected UDP sockets whose destination is a removed backend.
//!
//! Socket-level load balancing rewrites `connect()` of a UDP socket to a Service VIP into
//! a connected socket to one backend pod. When that backend leaves the Service, the
//! application would keep sending into the void, because nothing re-runs the translation.
//! The kernel's `sock_diag` interface can abort such a socket (`SOCK_DESTROY`): it gets a
//! pending `ECONNABORTED` (what the next `recv`, `poll` or `SO_ERROR` reports) and is
//! disconnected, so a `send` without an address fails with `EDESTADDRREQ`. Either way the
//! application sees an error, reconnects, and the new `connect()` picks a live backend.
//!
//! `sock_diag` only sees the network namespace the netlink socket was created in, so each
//! pod namespace is entered ([`super::netns`]) and searched from inside.

use std::io;
use std::net::SocketAddr;
use std::path::Path;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    NetlinkSerializable,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_UDP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::message::SockDiagDestroy;
use tracing::{debug, warn};

use super::netns::{Netns, NetnsError, for_each_pod_netns};

/// What one [`destroy_udp_sockets_to`] run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DestroyReport {
    /// Network namespaces that were searched completely (namespaces that failed are
    /// logged and not counted).
    pub namespaces: usize,
    /// Sockets the kernel confirmed as destroyed.
    pub destroyed: usize,
}

/// Why searching the cgroup, or one network namespace, failed.
#[derive(Debug, thiserror::Error)]
pub enum SockDestroyError {
    /// Finding the namespaces (an unreadable cgroup) or entering one failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// Talking `sock_diag` inside the namespace failed (socket I/O or a kernel error reply).
    #[error("sock_diag {op} in netns net:[{netns}] (via pid {pid}): {source}")]
    Netlink {
        /// The process through which the namespace was found.
        pid: u32,
        /// The namespace's inode number.
        netns: u64,
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        source: io::Error,
    },
    /// The kernel's reply could not be decoded.
    #[error("malformed sock_diag reply in netns net:[{netns}] (via pid {pid}): {reason}")]
    Decode {
        /// The process through which the namespace was found.
        pid: u32,
        /// The namespace's inode number.
        netns: u64,
        /// What was wrong with it.
        reason: String,
    },
}

/// Destroys every connected UDP socket, in the network namespaces of the processes in
/// `cgroup` and its descendants, whose destination is one of `backends`.
///
/// A backend matches on IP and port; an IPv4 backend also matches IPv6 sockets connected
/// to its IPv4-mapped address. The agent's own namespace is not searched: the agent and
/// the node are not pods. A namespace that fails (its process exited, the kernel refused)
/// is logged with `tracing::warn!` and skipped, so one bad pod cannot protect the others'
/// stale sockets; only an unreadable `cgroup` (or `/proc/self/ns/net`) is an error
/// ([`for_each_pod_netns`]).
///
/// This blocks (filesystem and netlink I/O, one thread per namespace): call it from
/// `tokio::task::spawn_blocking` or a plain thread.
pub fn destroy_udp_sockets_to(
    cgroup: &Path,
    backends: &[SocketAddr],
) -> Result<DestroyReport, SockDestroyError> {
    if backends.is_empty() {
        return Ok(DestroyReport::default());
    }
    let destroyed = for_each_pod_netns(cgroup, "destroying UDP sockets", |ns| {
        destroy_in_netns(ns, backends)
    })?;
    Ok(DestroyReport {
        namespaces: destroyed.len(),
        destroyed: destroyed.iter().sum(),
    })
}

/// Destroys the matching sockets of `ns`, on a thread that has entered it.
fn destroy_in_netns(ns: &Netns, backends: &[SocketAddr]) -> Result<usize, SockDestroyError> {
    let (pid, netns) = (ns.pid, ns.inode);
    let netlink = |op: &'static str| {
        move |source| SockDestroyError::Netlink {
            pid,
            netns,
            op,
            source,
        }
    };
    // Created here: a netlink socket belongs to its creator's namespace.
    let mut diag = DiagSocket::open().map_err(netlink("socket"))?;
    let mut destroyed = 0;
    for family in [AF_INET, AF_INET6] {
        let targets = diag.dump_matching(family, backends).map_err(|e| match e {
            DiagError::Io(source) => netlink("dump")(source),
            DiagError::Decode(reason) => SockDestroyError::Decode { pid, netns, reason },
        })?;
        // Destroyed only after the dump finished: replies of the two requests must not
        // interleave on the one socket.
        for id in targets {
            match diag.destroy(family, &id) {
                Ok(true) => destroyed += 1,
                // Closed by its owner since the dump: nothing left to do.
                Ok(false) => {}
                // One refused socket must not protect the others.
                Err(error) => warn!(
                    pid,
                    netns,
                    src = %SocketAddr::new(id.source_address, id.source_port),
                    dst = %SocketAddr::new(id.destination_address, id.destination_port),
                    %error,
                    "SOCK_DESTROY failed"
                ),
            }
        }
    }
    if destroyed > 0 {
        debug!(
            pid,
            netns, destroyed, "destroyed UDP sockets to removed backends"
        );
    }
    Ok(destroyed)
}

/// Errors inside a namespace, before the namespace's identity is attached.
#[derive(Debug)]
enum DiagError {
    Io(io::Error),
    Decode(String),
}

impl std::fmt::Display for DiagError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiagError::Io(e) => e.fmt(f),
            DiagError::Decode(reason) => f.write_str(reason),
        }
    }
}

/// A `NETLINK_SOCK_DIAG` socket of the current thread's network namespace.
struct DiagSocket {
    socket: netlink_sys::Socket,
    buf: Vec<u8>,
}

/// Large enough for any one netlink message batch: the kernel caps a dump's batch at 32 KiB.
const RECV_BUF: usize = 64 * 1024;

impl DiagSocket {
    fn open() -> io::Result<Self> {
        let mut socket = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_SOCK_DIAG)?;
        socket.bind_auto()?;
        socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
        Ok(Self {
            socket,
            buf: Vec::with_capacity(RECV_BUF),
        })
    }

    /// Receives one datagram (a batch of netlink messages) into `self.buf`.
    fn recv(&mut self) -> Result<&[u8], DiagError> {
        self.buf.clear();
        // MSG_TRUNC makes recv return the datagram's real length, so truncation shows.
        let len = self
            .socket
            .recv(&mut self.buf, libc::MSG_TRUNC)
            .map_err(DiagError::Io)?;
        if len > self.buf.len() {
            return Err(DiagError::Decode(format!("reply of {len} bytes truncated")));
        }
        Ok(&self.buf)
    }

    /// Ids of `family` UDP sockets whose destination is one of `backends`.
    fn dump_matching(
        &mut self,
        family: u8,
        backends: &[SocketAddr],
    ) -> Result<Vec<SocketId>, DiagError> {
        self.socket
            .send(&dump_request(family), 0)
            .map_err(DiagError::Io)?;
        let mut targets = Vec::new();
        loop {
            if parse_dump_batch(self.recv()?, backends, &mut targets)? {
                return Ok(targets);
            }
        }
    }

    /// Destroys one socket; `Ok(false)` when it no longer exists.
    fn destroy(&mut self, family: u8, id: &SocketId) -> Result<bool, DiagError> {
        self.socket
            .send(&destroy_request(family, id), 0)
            .map_err(DiagError::Io)?;
        parse_ack(self.recv()?)
    }
}

/// Serializes `payload` as one request with `flags`.
fn encode<T>(payload: T, flags: u16) -> Vec<u8>
where
    T: NetlinkSerializable + Into<NetlinkPayload<T>>,
{
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut message = NetlinkMessage::new(header, payload.into());
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    buf
}

fn udp_request(family: u8, socket_id: SocketId) -> SockDiagMessage {
    SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol: IPPROTO_UDP,
        extensions: ExtensionFlags::empty(),
        // A UDP socket is "established" once connected; asking for every state keeps the
        // match purely on the destination, which is what identifies a stale socket.
        states: StateFlags::all(),
        socket_id,
    })
}

/// `SOCK_DIAG_BY_FAMILY` dump of all UDP sockets of `family`.
fn dump_request(family: u8) -> Vec<u8> {
    let wildcard = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    encode(udp_request(family, wildcard), NLM_F_REQUEST | NLM_F_DUMP)
}

/// `SOCK_DESTROY` of exactly the socket `id` (cookie included) from a dump, acknowledged.
fn destroy_request(family: u8, id: &SocketId) -> Vec<u8> {
    encode(
        SockDiagDestroy::new(udp_request(family, id.clone())),
        NLM_F_REQUEST | NLM_F_ACK,
    )
}

/// Parses one batch of dump replies, appending the ids of sockets connected to one of
/// `backends` to `targets`. Returns whether the dump is complete.
fn parse_dump_batch(
    mut batch: &[u8],
    backends: &[SocketAddr],
    targets: &mut Vec<SocketId>,
) -> Result<bool, DiagError> {
    while !batch.is_empty() {
        let message = NetlinkMessage::<SockDiagMessage>::deserialize(batch)
            .map_err(|e| DiagError::Decode(e.to_string()))?;
        match message.payload {
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                if connected_to(&response.header.socket_id, backends) {
                    targets.push(response.header.socket_id);
                }
            }
            NetlinkPayload::Done(_) => return Ok(true),
            NetlinkPayload::Error(error) => return Err(DiagError::Io(error.to_io())),
            other => {
                return Err(DiagError::Decode(format!(
                    "unexpected message type {} in dump",
                    other.message_type()
                )));
            }
        }
        // Messages are 4-byte aligned within a batch.
        let len = (message.header.length as usize).next_multiple_of(4);
        if len == 0 {
            return Err(DiagError::Decode("zero-length netlink message".into()));
        }
        batch = batch.get(len..).unwrap_or_default();
    }
    Ok(false)
}

/// Parses the acknowledgement of a `SOCK_DESTROY`: `Ok(true)` destroyed, `Ok(false)` gone.
fn parse_ack(reply: &[u8]) -> Result<bool, DiagError> {
    let message = NetlinkMessage::<SockDiagMessage>::deserialize(reply)
        .map_err(|e| DiagError::Decode(e.to_string()))?;
    let NetlinkPayload::Error(ack) = message.payload else {
        return Err(DiagError::Decode(format!(
            "expected an acknowledgement, got message type {}",
            message.header.message_type
        )));
    };
    match ack.raw_code().abs() {
        0 => Ok(true),
        // ENOENT: no such socket any more; ESTALE: its id was reused by a new socket
        // (cookie mismatch), which must be left alone.
        libc::ENOENT | libc::ESTALE => Ok(false),
        _ => Err(DiagError::Io(ack.to_io())),
    }
}

/// Whether the socket's destination is one of `backends` (IPv4-mapped IPv6 destinations
/// compare as their IPv4 address, so dual-stack sockets match IPv4 backends).
fn connected_to(id: &SocketId, backends: &[SocketAddr]) -> bool {
    let dst = SocketAddr::new(id.destination_address.to_canonical(), id.destination_port);
    backends
        .iter()
        .any(|b| b.port() == dst.port() && b.ip().to_canonical() == dst.ip())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    const NLMSG_HDR: usize = 16;
    const SOCKID_LEN: usize = 48;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn u16_at(buf: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes(buf[at..at + 2].try_into().unwrap())
    }

    fn u32_at(buf: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap())
    }

    /// `inet_diag_sockid` as the kernel lays it out (ports and addresses big-endian).
    fn sockid(src: SocketAddr, dst: SocketAddr, ifindex: u32, cookie: u64) -> Vec<u8> {
        fn addr(ip: IpAddr) -> [u8; 16] {
            let mut out = [0; 16];
            match ip {
                IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
                IpAddr::V6(v6) => out.copy_from_slice(&v6.octets()),
            }
            out
        }
        let mut id = Vec::with_capacity(SOCKID_LEN);
        id.extend(src.port().to_be_bytes());
        id.extend(dst.port().to_be_bytes());
        id.extend(addr(src.ip()));
        id.extend(addr(dst.ip()));
        id.extend(ifindex.to_ne_bytes());
        id.extend(cookie.to_ne_bytes());
        id
    }

    fn nlmsg(kind: u16, flags: u16, payload: &[u8]) -> Vec<u8> {
        let mut msg = Vec::new();
        msg.extend(((NLMSG_HDR + payload.len()) as u32).to_ne_bytes());
        msg.extend(kind.to_ne_bytes());
        msg.extend(flags.to_ne_bytes());
        msg.extend(7u32.to_ne_bytes()); // seq
        msg.extend(0u32.to_ne_bytes()); // pid
        msg.extend(payload);
        msg.resize(msg.len().next_multiple_of(4), 0);
        msg
    }

    /// A `SOCK_DIAG_BY_FAMILY` reply: `inet_diag_msg` plus one attribute, as the kernel
    /// always appends some (here `INET_DIAG_SHUTDOWN`, padded).
    fn diag_reply(family: u8, src: SocketAddr, dst: SocketAddr, cookie: u64) -> Vec<u8> {
        let mut msg = vec![family, 1 /* TCP_ESTABLISHED */, 0, 0];
        msg.extend(sockid(src, dst, 0, cookie));
        for field in [0u32, 0, 0, 0, 4242] {
            // expires, rqueue, wqueue, uid, inode
            msg.extend(field.to_ne_bytes());
        }
        msg.extend([5, 0, 8, 0, 0, 0, 0, 0]); // nla_len 5, INET_DIAG_SHUTDOWN, u8 0, pad
        nlmsg(20, 2 /* NLM_F_MULTI */, &msg)
    }

    fn done() -> Vec<u8> {
        nlmsg(3, 2, &0i32.to_ne_bytes())
    }

    fn ack(errno: i32) -> Vec<u8> {
        let mut payload = (-errno).to_ne_bytes().to_vec();
        payload.extend(&nlmsg(21, 5, &[])[..NLMSG_HDR]); // the echoed request header
        nlmsg(2, 0, &payload)
    }

    #[test]
    fn dump_request_is_a_udp_wildcard_dump() {
        for family in [AF_INET, AF_INET6] {
            let req = dump_request(family);
            assert_eq!(req.len(), NLMSG_HDR + 8 + SOCKID_LEN);
            assert_eq!(u32_at(&req, 0) as usize, req.len());
            assert_eq!(u16_at(&req, 4), 20, "SOCK_DIAG_BY_FAMILY");
            assert_eq!(u16_at(&req, 6), 0x301, "NLM_F_REQUEST | NLM_F_DUMP");
            assert_eq!(req[16], family);
            assert_eq!(req[17], libc::IPPROTO_UDP as u8);
            assert_eq!(req[18], 0, "no extensions");
            assert_eq!(
                u32_at(&req, 20),
                0xffe,
                "all states TCP_ESTABLISHED..TCP_CLOSING"
            );
            assert!(req[24..].iter().all(|&b| b == 0), "wildcard socket id");
        }
    }

    #[test]
    fn destroy_request_carries_the_exact_socket_id() {
        let cases = [
            (AF_INET, sa("10.0.0.1:40000"), sa("127.0.0.1:5353")),
            (
                AF_INET6,
                sa("[::ffff:10.0.0.1]:40000"),
                sa("[::ffff:127.0.0.1]:5353"),
            ),
            (AF_INET6, sa("[fd00::1]:40000"), sa("[fd00::2]:53")),
        ];
        for (family, src, dst) in cases {
            let reply = diag_reply(family, src, dst, 0xdead_beef_0123_4567);
            let mut targets = Vec::new();
            assert!(!parse_dump_batch(&reply, &[dst], &mut targets).unwrap());
            let [id] = targets.as_slice() else {
                panic!("expected one match, got {targets:?}")
            };

            let req = destroy_request(family, id);
            assert_eq!(req.len(), NLMSG_HDR + 8 + SOCKID_LEN);
            assert_eq!(u16_at(&req, 4), 21, "SOCK_DESTROY");
            assert_eq!(u16_at(&req, 6), 0x5, "NLM_F_REQUEST | NLM_F_ACK");
            assert_eq!(req[16], family);
            assert_eq!(req[17], libc::IPPROTO_UDP as u8);
            // The request's id must be byte-for-byte the id the kernel reported.
            assert_eq!(&req[24..], &sockid(src, dst, 0, 0xdead_beef_0123_4567)[..]);
        }
    }

    #[test]
    fn dump_batch_keeps_only_sockets_to_removed_backends() {
        let backend = sa("127.0.0.1:5353");
        let mut batch = diag_reply(AF_INET, sa("127.0.0.1:40000"), backend, 1);
        batch.extend(diag_reply(
            AF_INET,
            sa("127.0.0.1:40001"),
            sa("127.0.0.1:5354"),
            2,
        ));
        batch.extend(diag_reply(
            AF_INET,
            sa("127.0.0.2:40002"),
            sa("127.0.0.2:5353"),
            3,
        ));
        // Unconnected socket: destination 0.0.0.0:0.
        batch.extend(diag_reply(AF_INET, sa("0.0.0.0:53"), sa("0.0.0.0:0"), 4));
        let mut targets = Vec::new();
        assert!(
            !parse_dump_batch(&batch, &[backend], &mut targets).unwrap(),
            "no DONE yet"
        );
        let cookies: Vec<_> = targets.iter().map(|id| id.cookie).collect();
        assert_eq!(cookies, [1u64.to_ne_bytes()]);

        // The next batch ends the dump; earlier matches are kept.
        let mut last = diag_reply(AF_INET, sa("127.0.0.1:40003"), backend, 5);
        last.extend(done());
        assert!(parse_dump_batch(&last, &[backend], &mut targets).unwrap());
        assert_eq!(targets.len(), 2);
    }

    #[test]
    fn v6_sockets_match_v4_mapped_destinations_of_v4_backends() {
        let id = |dst: SocketAddr| SocketId {
            source_port: 40000,
            destination_port: dst.port(),
            source_address: Ipv6Addr::UNSPECIFIED.into(),
            destination_address: dst.ip(),
            interface_id: 0,
            cookie: [0; 8],
        };
        let v4 = sa("127.0.0.1:5353");
        let v6 = sa("[fd00::2]:53");
        assert!(connected_to(&id(sa("[::ffff:127.0.0.1]:5353")), &[v4]));
        assert!(connected_to(&id(v4), &[v4]));
        assert!(connected_to(&id(v6), &[v4, v6]));
        assert!(!connected_to(&id(sa("[::ffff:127.0.0.1]:5354")), &[v4]));
        assert!(
            !connected_to(&id(sa("[::1]:5353")), &[v4]),
            "not a mapped address"
        );
        assert!(!connected_to(&id(sa("[fd00::2]:54")), &[v6]));
        assert!(!connected_to(
            &id(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0)),
            &[v4]
        ));
    }

    #[test]
    fn dump_error_reply_is_an_error() {
        let err = parse_dump_batch(&ack(libc::EINVAL), &[sa("127.0.0.1:1")], &mut Vec::new());
        assert!(matches!(err, Err(DiagError::Io(e)) if e.raw_os_error() == Some(libc::EINVAL)));
        assert!(matches!(
            parse_dump_batch(&[1, 2, 3], &[sa("127.0.0.1:1")], &mut Vec::new()),
            Err(DiagError::Decode(_))
        ));
    }

    #[test]
    fn destroy_ack_distinguishes_destroyed_gone_and_refused() {
        assert!(parse_ack(&ack(0)).unwrap());
        assert!(!parse_ack(&ack(libc::ENOENT)).unwrap());
        assert!(!parse_ack(&ack(libc::ESTALE)).unwrap());
        assert!(
            matches!(parse_ack(&ack(libc::EPERM)), Err(DiagError::Io(e)) if e.raw_os_error() == Some(libc::EPERM))
        );
        assert!(matches!(parse_ack(&done()), Err(DiagError::Decode(_))));
    }

    #[test]
    fn no_backends_means_nothing_is_looked_at() {
        // Not even the cgroup, which does not exist here.
        let missing = Path::new("/nonexistent/sockdestroy-cgroup");
        assert_eq!(
            destroy_udp_sockets_to(missing, &[]).unwrap(),
            DestroyReport::default()
        );
    }

    mod root {
        //! Destroys real sockets in a throwaway network namespace; needs root.

        use super::super::*;
        use crate::datapath::netns::tests::{Sandbox, cgroup2_mount, root_test};
        use std::io::{BufRead, BufReader, Lines};
        use std::process::{ChildStdout, Command, Stdio};

        /// Where the test's processes run: their netns and cgroup.
        struct Pod<'a> {
            netns: &'a str,
            cgroup: &'a Path,
        }

        /// Python holding a UDP socket connected to `host`:`port` (an IPv6 socket when
        /// `host` is IPv6), reporting what its blocked recv ends with.
        const CHILD: &str = r#"
import socket, sys
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.connect((host, port))
print("ready", flush=True)
s.settimeout(timeout)
try:
    s.recv(10)
    print("data", flush=True)
except socket.timeout:
    print("timeout", flush=True)
except OSError as e:
    print("err", e.errno, flush=True)
"#;

        fn spawn_child(
            sandbox: &mut Sandbox,
            pod: &Pod,
            python: &str,
            dst: SocketAddr,
            timeout: &str,
        ) -> Lines<BufReader<ChildStdout>> {
            let mut child = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", pod.netns))
                .args([python, "-c", CHILD])
                .args([dst.ip().to_string(), dst.port().to_string()])
                .arg(timeout)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
            sandbox.adopt(child, pod.cgroup);
            // Printed once the socket exists, so inside the netns, before any destroying.
            assert_eq!(lines.next().unwrap().unwrap(), "ready");
            lines
        }

        #[test]
        fn destroys_only_sockets_connected_to_the_removed_backend() {
            root_test(
                "sdtest",
                "destroying sockets in a new netns",
                |sandbox, name| {
                    sandbox.add_netns(name);
                    let cgroup = sandbox.add_cgroup(cgroup2_mount().join(name));
                    let pod = Pod {
                        netns: name,
                        cgroup: &cgroup,
                    };

                    // The interpreter itself, not a launcher shim that might fork it.
                    let python = Command::new("python3")
                        .args(["-c", "import sys; print(sys.executable)"])
                        .output()
                        .unwrap();
                    let python = String::from_utf8(python.stdout).unwrap().trim().to_owned();

                    let backend: SocketAddr = "127.0.0.1:5353".parse().unwrap();
                    let mut stale = spawn_child(sandbox, &pod, &python, backend, "20");
                    // A dual-stack socket reaches the same backend through its IPv4-mapped address.
                    let mapped = "[::ffff:127.0.0.1]:5353".parse().unwrap();
                    let mut stale_v6 = spawn_child(sandbox, &pod, &python, mapped, "20");
                    let other = "127.0.0.1:5354".parse().unwrap();
                    let mut live = spawn_child(sandbox, &pod, &python, other, "3");

                    let report = destroy_udp_sockets_to(&cgroup, &[backend]).unwrap();
                    assert_eq!(
                        report,
                        DestroyReport {
                            namespaces: 1,
                            destroyed: 2
                        }
                    );

                    let aborted = format!("err {}", libc::ECONNABORTED);
                    assert_eq!(stale.next().unwrap().unwrap(), aborted);
                    assert_eq!(stale_v6.next().unwrap().unwrap(), aborted);
                    assert_eq!(live.next().unwrap().unwrap(), "timeout");
                },
            );
        }
    }
}
