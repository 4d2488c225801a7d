//! cgroup_skb/ingress: ingress network policy where packets are delivered to sockets of
//! the node's pods. Attached to the same cgroup as the socket hooks, so it needs no
//! per-pod attachment and sees exactly the traffic the pods' processes receive, after
//! the pod's own stack has reassembled it.
//!
//! The node's own addresses (IPCACHE identity host) and loopback always pass, and so
//! do tunnels between enrolled pods (port 15008): the node proxy judges each stream in
//! a tunnel for the stream's own port. Only new inbound
//! flows are judged: TCP segments with SYN and without ACK, and UDP
//! datagrams from a peer the receiving socket has not exchanged with yet (UDP_PEERS,
//! written by the connect/sendmsg hooks and by this program for allowed flows). Replies
//! to the pod's own connections pass. Everything
//! that is neither TCP nor UDP, non-first fragments and IPv6 with extension headers
//! pass too. Denied packets are dropped (the sender sees a timeout, as with any
//! firewall), counted, and reported.

use aya_ebpf::{
    EbpfContext, helpers::bpf_get_socket_cookie, macros::cgroup_skb, programs::SkBuffContext,
};
use mesh_common::{
    Addr, RevNatKey,
    policy::{DIR_INGRESS, IDENTITY_HOST, IPCACHE_MESH, tunnel_port},
    service::{PROTO_TCP, PROTO_UDP},
};

use crate::{
    maps::UDP_PEERS,
    policy::{self, Flow},
};

const PASS: i32 = 1;
const DROP: i32 = 0;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

#[cgroup_skb(ingress)]
pub fn mesh_ingress(ctx: SkBuffContext) -> i32 {
    // A packet we cannot parse is not ours to judge.
    match try_ingress(&ctx) {
        Ok(true) | Err(()) => PASS,
        Ok(false) => DROP,
    }
}

fn try_ingress(ctx: &SkBuffContext) -> Result<bool, ()> {
    // SAFETY: the kernel hands the program a valid __sk_buff.
    let protocol = u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16);
    let (src, dst, proto, l4) = match protocol {
        ETH_P_IP => {
            let h: [u8; 20] = ctx.load(0).map_err(|_| ())?;
            let fragment_offset = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
            if fragment_offset != 0 {
                return Ok(true);
            }
            let v4 = |o: usize| u32::from_ne_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
            (
                Addr::from_v4_be(v4(12)),
                Addr::from_v4_be(v4(16)),
                h[9],
                usize::from(h[0] & 0x0f) * 4,
            )
        }
        ETH_P_IPV6 => {
            let h: [u8; 40] = ctx.load(0).map_err(|_| ())?;
            let word = |o: usize| u32::from_ne_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
            let src = Addr([word(8), word(12), word(16), word(20)]);
            let dst = Addr([word(24), word(28), word(32), word(36)]);
            (src, dst, h[6], 40)
        }
        _ => return Ok(true),
    };
    let ports: [u8; 4] = match proto {
        PROTO_TCP | PROTO_UDP => ctx.load(l4).map_err(|_| ())?,
        _ => return Ok(true),
    };
    // Ports stay in network byte order, as the maps store them.
    let src_port = u16::from_ne_bytes([ports[0], ports[1]]);
    let dst_port = u16::from_ne_bytes([ports[2], ports[3]]);
    // Established traffic returns before any map lookup: this runs for every packet.
    let key = if proto == PROTO_TCP {
        let flags: u8 = ctx.load(l4 + 13).map_err(|_| ())?;
        if flags & TCP_SYN == 0 || flags & TCP_ACK != 0 {
            return Ok(true);
        }
        None
    } else {
        // SAFETY: helper call on the program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let key = RevNatKey {
            cookie,
            addr: src,
            port: src_port,
            _pad: [0; 6],
        };
        // SAFETY: plain data.
        if unsafe { UDP_PEERS.get(&key) }.is_some() {
            return Ok(true);
        }
        Some(key)
    };
    // Loopback never left the pod: NetworkPolicy does not apply to it.
    if src.is_loopback() {
        return Ok(true);
    }
    // The node's own addresses always pass (probes), also where an ipBlock gave one of
    // them a peer identity of its own.
    let peer = policy::ipcache(&src);
    if peer.owner == IDENTITY_HOST {
        return Ok(true);
    }
    let local = policy::ipcache(&dst);
    // A tunnel between enrolled pods: the destination's node proxy judges each stream
    // in it for the stream's own port.
    if proto == PROTO_TCP && tunnel_port(peer.flags & IPCACHE_MESH != 0, &local, dst_port) {
        return Ok(true);
    }
    let flow = Flow {
        src,
        dst,
        src_port,
        dst_port,
        proto,
    };
    let allowed = policy::judge(local.owner, peer.identity, DIR_INGRESS, &flow);
    if let (true, Some(key)) = (allowed, key) {
        // The socket may now answer this peer even under egress isolation: a reply
        // belongs to the flow ingress policy just allowed (see connect.rs).
        let _ = UDP_PEERS.insert(&key, &1, 0);
    }
    Ok(allowed)
}
