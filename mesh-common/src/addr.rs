//! Addresses as the maps store them: 16 bytes for both families, IPv4 in its
//! IPv4-mapped IPv6 form (`::ffff:a.b.c.d`). One key layout serves connect4 and
//! connect6, and an IPv6 socket dialling `::ffff:<v4 VIP>` finds the IPv4 Service.

/// An IPv6 address, or an IPv4 address mapped into IPv6, as four 32-bit words in
/// network byte order (the layout of `bpf_sock_addr.user_ip6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Addr(pub [u32; 4]);
const _: () = assert!(core::mem::size_of::<Addr>() == 16);

/// Third word of an IPv4-mapped address (`0000:ffff`), network byte order.
const MAPPED_MARK: u32 = 0x0000_ffff_u32.to_be();

impl Addr {
    /// The mapped form of an IPv4 address given in network byte order
    /// (`bpf_sock_addr.user_ip4`).
    pub const fn from_v4_be(ip4_be: u32) -> Self {
        Self([0, 0, MAPPED_MARK, ip4_be])
    }

    /// Whether this is a loopback address (127.0.0.0/8, mapped, or ::1): traffic that
    /// never leaves its network namespace.
    pub const fn is_loopback(&self) -> bool {
        match self.v4_be() {
            // The first byte in network order is the lowest-addressed one.
            Some(v4) => v4.to_ne_bytes()[0] == 127,
            None => self.0[0] == 0 && self.0[1] == 0 && self.0[2] == 0 && self.0[3] == 1u32.to_be(),
        }
    }

    /// The IPv4 address (network byte order) if this is an IPv4-mapped address.
    pub const fn v4_be(&self) -> Option<u32> {
        if self.0[0] == 0 && self.0[1] == 0 && self.0[2] == MAPPED_MARK {
            Some(self.0[3])
        } else {
            None
        }
    }
}

#[cfg(feature = "user")]
mod user {
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::Addr;

    impl From<Ipv4Addr> for Addr {
        fn from(ip: Ipv4Addr) -> Self {
            Self::from_v4_be(u32::from(ip).to_be())
        }
    }

    impl From<Ipv6Addr> for Addr {
        fn from(ip: Ipv6Addr) -> Self {
            let o = ip.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            Self([word(0), word(4), word(8), word(12)])
        }
    }

    impl From<IpAddr> for Addr {
        fn from(ip: IpAddr) -> Self {
            match ip {
                IpAddr::V4(v4) => v4.into(),
                IpAddr::V6(v6) => v6.into(),
            }
        }
    }

    impl From<Addr> for IpAddr {
        fn from(a: Addr) -> Self {
            match a.v4_be() {
                Some(v4) => IpAddr::V4(Ipv4Addr::from(u32::from_be(v4))),
                None => {
                    let mut o = [0u8; 16];
                    for (i, w) in a.0.iter().enumerate() {
                        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
                    }
                    IpAddr::V6(Ipv6Addr::from(o))
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn v4_round_trips_through_the_mapped_form() {
            let ip: IpAddr = "10.96.0.10".parse().unwrap();
            let a = Addr::from(ip);
            assert_eq!(
                a.v4_be(),
                Some(u32::from(Ipv4Addr::new(10, 96, 0, 10)).to_be())
            );
            assert_eq!(IpAddr::from(a), ip);
            // The same bytes as the IPv6 address ::ffff:10.96.0.10.
            let mapped: Ipv6Addr = "::ffff:10.96.0.10".parse().unwrap();
            assert_eq!(Addr::from(mapped), a);
        }

        #[test]
        fn loopback_is_127_slash_8_and_colon_colon_1() {
            for (ip, want) in [
                ("127.0.0.1", true),
                ("127.255.0.9", true),
                ("::1", true),
                ("::ffff:127.0.0.1", true),
                ("128.0.0.1", false),
                ("10.0.0.127", false),
                ("::2", false),
                ("fd00::1", false),
            ] {
                let a = Addr::from(ip.parse::<IpAddr>().unwrap());
                assert_eq!(a.is_loopback(), want, "{ip}");
            }
        }

        #[test]
        fn v6_round_trips() {
            let ip: IpAddr = "fd00:10:96::a".parse().unwrap();
            let a = Addr::from(ip);
            assert_eq!(a.v4_be(), None);
            assert_eq!(IpAddr::from(a), ip);
        }
    }
}
