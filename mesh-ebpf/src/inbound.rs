//! Inbound capture without iptables (sk_lookup, attached to each local pod's network
//! namespace): a plaintext TCP connection arriving at an enrolled pod whose
//! PeerAuthentication or AuthorizationPolicy must see it is handed to the node proxy's
//! listener for that pod (INBOUND_SOCKS), which refuses it (STRICT) or authorizes it.
//! Which addresses ask for it, and who is exempt, is `inbound_captured`'s decision.
//! Fail closed: while the proxy has no listener there, such a connection is dropped,
//! never delivered unjudged.

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    macros::sk_lookup,
    programs::SkLookupContext,
};
use mesh_common::{policy::inbound_captured, service::PROTO_TCP};

use crate::{ctx::Lookup, maps::INBOUND_SOCKS, policy::ipcache};

#[sk_lookup]
pub fn mesh_inbound(ctx: SkLookupContext) -> u32 {
    let lookup = Lookup::new(&ctx);
    if lookup.protocol() != PROTO_TCP {
        return SK_PASS;
    }
    let Some(key) = lookup.key() else {
        return SK_PASS;
    };
    let captured = inbound_captured(
        &ipcache(&key.local),
        &ipcache(&key.remote),
        key.local == key.remote,
        key.local_port as u16,
    );
    if !captured {
        return SK_PASS;
    }
    match INBOUND_SOCKS.redirect_sk_lookup(&ctx, key.local, 0) {
        Ok(()) => SK_PASS,
        Err(_) => SK_DROP,
    }
}
