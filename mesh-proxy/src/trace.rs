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
    let value = match parse(headers) {
        Some(parent) => format_traceparent(parent.trace_id, span_id, parent.flags),
        None => {
            headers.remove(&TRACESTATE);
            format_traceparent(random_nonzero_u128(), span_id, 0)
        }
    };
    let value = HeaderValue::from_str(&value).expect("lowercase hex and dashes are valid");
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
/// with a higher one.
fn format_traceparent(trace_id: u128, span_id: u64, flags: u8) -> String {
    format!("00-{trace_id:032x}-{span_id:016x}-{flags:02x}")
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
