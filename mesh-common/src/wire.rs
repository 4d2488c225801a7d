//! Typed views of the one-byte codes the maps and events carry.
//!
//! The `#[repr(C)]` map structs keep these fields as `u8` (every bit pattern of a map
//! value must be valid, and a newer datapath may write a code this build does not know);
//! user space and the eBPF programs name the codes through the enums made here, so each
//! code and its name are written once.

/// Defines a `#[repr(u8)]` enum of wire codes with `from_u8` (for decoding map values
/// and events), `as_str` (the name user space shows) and `Display`.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $($(#[$variant_meta:meta])* $variant:ident = $code:literal => $text:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[repr(u8)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum $name {
            $($(#[$variant_meta])* $variant = $code,)+
        }

        impl $name {
            /// The value a wire code stands for; `None` for a code this build does not
            /// know (a newer datapath, or garbage).
            pub const fn from_u8(code: u8) -> Option<Self> {
                match code {
                    $($code => Some(Self::$variant),)+
                    _ => None,
                }
            }

            /// The name user space shows.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }

            /// The value whose [`as_str`](Self::as_str) is `name`.
            pub fn from_name(name: &str) -> Option<Self> {
                match name {
                    $($text => Some(Self::$variant),)+
                    _ => None,
                }
            }
        }

        impl core::fmt::Display for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use wire_enum;

#[cfg(test)]
mod tests {
    use crate::{
        event::{Reason, Verdict},
        policy::Direction,
        service::{BackendState, Protocol},
    };

    /// Every code decodes to the value it was encoded from, names round-trip, and codes
    /// no enum defines decode to `None`.
    #[test]
    fn codes_and_names_round_trip() {
        macro_rules! check {
            ($ty:ty) => {{
                let mut known = 0;
                for code in 0..=u8::MAX {
                    if let Some(v) = <$ty>::from_u8(code) {
                        known += 1;
                        assert_eq!(v as u8, code);
                        assert_eq!(<$ty>::from_name(v.as_str()), Some(v));
                    }
                }
                known
            }};
        }
        assert_eq!(check!(Protocol), 3);
        assert_eq!(check!(BackendState), 3);
        assert_eq!(check!(Direction), 2);
        assert_eq!(check!(Verdict), 3);
        assert_eq!(check!(Reason), 2);
    }

    #[test]
    fn kernel_numbers_and_names() {
        assert_eq!(Protocol::from_u8(6), Some(Protocol::Tcp));
        assert_eq!(Protocol::from_u8(17), Some(Protocol::Udp));
        assert_eq!(Protocol::from_u8(132), Some(Protocol::Sctp));
        assert_eq!(Protocol::from_u8(1), None);
        assert_eq!(Protocol::from_name("SCTP"), Some(Protocol::Sctp));
        assert_eq!(
            Protocol::from_name("tcp"),
            None,
            "Kubernetes spells them upper case"
        );
        assert_eq!(BackendState::from_u8(2), Some(BackendState::Unhealthy));
        assert_eq!(Direction::from_u8(0), None);
        assert_eq!(Verdict::Forwarded.as_str(), "forwarded");
        assert_eq!(Reason::PolicyDenied.as_str(), "policy-denied");
    }
}
