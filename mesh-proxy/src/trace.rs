//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>) propagation: the proxy is
//! one hop of the trace, so it forwards the caller's trace with a span id of its own as
//! parent, or starts a trace when the caller sent none (or a broken one).
//!
//! A trace the proxy starts is not sampled (flags `00`): the proxy records no spans, so
//! asking the servers behind it to record theirs would give traces with a missing root.
//! Sampling stays the decision of the first traced application.

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};

/// `traceparent`: version, trace id, parent (span) id, flags.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `tracestate`: vendor data that travels with a valid `traceparent`.
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The parts of a valid `traceparent` this proxy forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TraceParent {
    trace_id: u128,
    flags: u8,
}

/// Rewrites the request's trace headers for the next hop: a valid `traceparent` keeps
/// its trace id and flags and gets a new parent id (this proxy's span), `tracestate`
/// unchanged; otherwise a new trace starts (random ids, flags `00`) and any
/// `tracestate` is dropped, since it belonged to the broken trace.
pub fn propagate(headers: &mut HeaderMap) {
    let span_id = random_nonzero_u64();
    let mut value = match parse(headers) {
        Some(parent) => format_traceparent(parent.trace_id, span_id, parent.flags),
        None => {
            headers.remove(&TRACESTATE);
            format_traceparent(random_nonzero_u128(), span_id, 0)
        }
    };
    // A value unique to each request gains nothing from HTTP/2 header compression's
    // table: marked sensitive, HPACK sends it as never-indexed instead of inserting it
    // and evicting the headers that repeat (which then had to be sent again in full).
    value.set_sensitive(true);
    headers.insert(TRACEPARENT.clone(), value);
}

/// The request's `traceparent`, if there is exactly one and it is valid.
fn parse(headers: &HeaderMap) -> Option<TraceParent> {
    let mut values = headers.get_all(&TRACEPARENT).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    parse_value(value.to_str().ok()?)
}

/// Parses a `traceparent` value. Version `00` must be exactly
/// `00-<32 hex>-<16 hex>-<2 hex>`; a higher version may carry more fields after a
/// `-`, and only the first four are read (the spec's forward compatibility). Version
/// `ff`, uppercase hex and all-zero ids are invalid.
fn parse_value(value: &str) -> Option<TraceParent> {
    let value = value.trim_matches([' ', '\t']);
    let bytes = value.as_bytes();
    if bytes.len() < 55 {
        return None;
    }
    let version = hex_u8(&value[0..2])?;
    if version == 0xff || (version == 0 && bytes.len() != 55) {
        return None;
    }
    if bytes.len() > 55 && bytes[55] != b'-' {
        return None;
    }
    if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
        return None;
    }
    let trace_id = hex_u128(&value[3..35])?;
    let parent_id = hex_u128(&value[36..52])?;
    let flags = hex_u8(&value[53..55])?;
    if trace_id == 0 || parent_id == 0 {
        return None;
    }
    Some(TraceParent { trace_id, flags })
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn hex_u128(s: &str) -> Option<u128> {
    is_lower_hex(s)
        .then(|| u128::from_str_radix(s, 16).ok())
        .flatten()
}

fn hex_u8(s: &str) -> Option<u8> {
    is_lower_hex(s)
        .then(|| u8::from_str_radix(s, 16).ok())
        .flatten()
}

/// Always version `00`: the version this proxy speaks, also for a trace that arrived
/// with a higher one. Written into a fixed buffer: this runs on every request.
fn format_traceparent(trace_id: u128, span_id: u64, flags: u8) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    fn put(out: &mut [u8], mut value: u128) {
        for b in out.iter_mut().rev() {
            *b = HEX[(value & 0xf) as usize];
            value >>= 4;
        }
    }
    let mut buf = *b"00-00000000000000000000000000000000-0000000000000000-00";
    put(&mut buf[3..35], trace_id);
    put(&mut buf[36..52], u128::from(span_id));
    put(&mut buf[53..55], u128::from(flags));
    HeaderValue::from_bytes(&buf).expect("lowercase hex and dashes are valid")
}

fn random_nonzero_u64() -> u64 {
    loop {
        let id = rand::random::<u64>();
        if id != 0 {
            return id;
        }
    }
}

fn random_nonzero_u128() -> u128 {
    loop {
        let id = rand::random::<u128>();
        if id != 0 {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";

    fn headers(traceparent: &[&str], tracestate: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in traceparent {
            h.append(TRACEPARENT.clone(), HeaderValue::from_str(v).unwrap());
        }
        if let Some(s) = tracestate {
            h.insert(TRACESTATE.clone(), HeaderValue::from_str(s).unwrap());
        }
        h.insert("x-other", HeaderValue::from_static("kept"));
        h
    }

    /// The single traceparent after propagation, split into its four fields, each
    /// checked to be well formed.
    fn out(h: &HeaderMap) -> [String; 4] {
        let all: Vec<_> = h.get_all(&TRACEPARENT).iter().collect();
        assert_eq!(all.len(), 1, "exactly one traceparent");
        let v = all[0].to_str().unwrap();
        assert!(parse_value(v).is_some(), "valid: {v}");
        let parts: Vec<String> = v.split('-').map(str::to_owned).collect();
        assert_eq!(parts.len(), 4, "{v}");
        assert_eq!(h["x-other"], "kept");
        parts.try_into().unwrap()
    }

    #[test]
    fn traceparent_is_zero_padded_lowercase_hex() {
        let v = format_traceparent(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736, 0xab, 1);
        assert_eq!(v, "00-4bf92f3577b34da6a3ce929d0e0e4736-00000000000000ab-01");
    }

    #[test]
    fn a_valid_traceparent_gets_this_hop_as_parent() {
        for flags in ["01", "00", "03"] {
            let incoming = format!("00-{TRACE}-{PARENT}-{flags}");
            let mut h = headers(
                &[&incoming],
                Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"),
            );
            propagate(&mut h);
            let [version, trace, parent, out_flags] = out(&h);
            assert_eq!(version, "00");
            assert_eq!(trace, TRACE);
            assert_ne!(parent, PARENT);
            assert_ne!(parent, "0000000000000000");
            assert_eq!(out_flags, flags);
            assert_eq!(h[&TRACESTATE], "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7");
        }
    }

    #[test]
    fn each_hop_gets_a_fresh_span_id() {
        let incoming = format!("00-{TRACE}-{PARENT}-01");
        let parents: std::collections::HashSet<String> = (0..20)
            .map(|_| {
                let mut h = headers(&[&incoming], None);
                propagate(&mut h);
                out(&h)[2].clone()
            })
            .collect();
        assert_eq!(parents.len(), 20);
    }

    #[test]
    fn no_traceparent_starts_an_unsampled_trace_and_drops_tracestate() {
        let mut h = headers(&[], Some("congo=t61rcWkgMzE"));
        propagate(&mut h);
        let [version, trace, parent, flags] = out(&h);
        assert_eq!(version, "00");
        assert_ne!(trace, "0".repeat(32));
        assert_ne!(parent, "0".repeat(16));
        assert_eq!(flags, "00");
        assert!(h.get(&TRACESTATE).is_none());
        // Unique per request: kept out of HPACK's table.
        assert!(h[&TRACEPARENT].is_sensitive());
    }

    #[test]
    fn an_invalid_traceparent_restarts_the_trace() {
        let zero_trace = "0".repeat(32);
        let zero_parent = "0".repeat(16);
        let upper = TRACE.to_ascii_uppercase();
        let invalid = [
            format!("00-{zero_trace}-{PARENT}-01"),
            format!("00-{TRACE}-{zero_parent}-01"),
            format!("00-{upper}-{PARENT}-01"),
            format!("ff-{TRACE}-{PARENT}-01"),
            format!("0g-{TRACE}-{PARENT}-01"),
            format!("00-{TRACE}-{PARENT}-1"),
            format!("00-{TRACE}-{PARENT}-0x"),
            format!("00-{TRACE}-{PARENT}-01-extra"),
            format!("00_{TRACE}_{PARENT}_01"),
            format!("00-{}-{PARENT}-01", &TRACE[1..]),
            format!("00-{TRACE}-{PARENT}1-01"),
            format!("cc-{TRACE}-{PARENT}-01x"),
            "garbage".to_owned(),
            String::new(),
        ];
        for incoming in &invalid {
            let mut h = headers(&[incoming], Some("congo=t61rcWkgMzE"));
            propagate(&mut h);
            let [_, trace, _, flags] = out(&h);
            assert_ne!(trace, TRACE, "{incoming:?} was accepted");
            assert_eq!(flags, "00", "{incoming:?}");
            assert!(h.get(&TRACESTATE).is_none(), "{incoming:?} kept tracestate");
        }
    }

    #[test]
    fn two_traceparents_are_invalid() {
        let a = format!("00-{TRACE}-{PARENT}-01");
        let b = format!("00-{TRACE}-{PARENT}-00");
        let mut h = headers(&[&a, &b], Some("congo=t61rcWkgMzE"));
        propagate(&mut h);
        assert_ne!(out(&h)[1], TRACE);
        assert!(h.get(&TRACESTATE).is_none());
    }

    #[test]
    fn a_future_version_is_read_by_its_first_four_fields() {
        for incoming in [
            format!("cc-{TRACE}-{PARENT}-01"),
            format!("cc-{TRACE}-{PARENT}-01-what-the-future-holds"),
        ] {
            let mut h = headers(&[&incoming], Some("congo=t61rcWkgMzE"));
            propagate(&mut h);
            let [version, trace, parent, flags] = out(&h);
            // Forwarded in the version this proxy speaks.
            assert_eq!(version, "00", "{incoming}");
            assert_eq!(trace, TRACE);
            assert_ne!(parent, PARENT);
            assert_eq!(flags, "01");
            assert_eq!(h[&TRACESTATE], "congo=t61rcWkgMzE");
        }
    }

    #[test]
    fn surrounding_whitespace_is_tolerated() {
        let incoming = format!(" 00-{TRACE}-{PARENT}-01\t");
        let mut h = headers(&[&incoming], None);
        propagate(&mut h);
        assert_eq!(out(&h)[1], TRACE);
    }
}
