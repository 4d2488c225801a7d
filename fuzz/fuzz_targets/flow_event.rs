//! Arbitrary bytes as an EVENTS ring buffer record, through what the flow reader does
//! with each one: decode, stamp with wall-clock time, name against the view of the
//! last applied state. The named flow must keep the kernel's facts (addresses it
//! reported, ports, identities), render as a log line, and survive the JSON round trip
//! between `GET /v1/flows` and `mesh-agent observe`.

#![no_main]

#[path = "fixture.rs"]
mod fixture;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use mesh_agent::flows::{View, decode, rfc3339};
use mesh_agent::report::Flow;
use mesh_common::FlowEvent;

/// A CLOCK_MONOTONIC → Unix offset as the reader measures it (fixed: the runs must be
/// reproducible).
const CLOCK_OFFSET_NS: i128 = 1_764_650_000_000_000_000;

static VIEW: LazyLock<View> = LazyLock::new(|| {
    let local_netns: BTreeMap<IpAddr, u64> = [
        ("10.244.1.10".parse().expect("ip"), 1),
        ("10.244.1.11".parse().expect("ip"), 2),
    ]
    .into();
    fixture::view(&local_netns)
});

fuzz_target!(|record: &[u8]| {
    let Some(event) = decode(record) else {
        assert_ne!(
            record.len(),
            size_of::<FlowEvent>(),
            "a full record was refused"
        );
        return;
    };
    assert_eq!(
        record.len(),
        size_of::<FlowEvent>(),
        "a short or long record decoded"
    );
    let time = rfc3339(i128::from(event.timestamp_ns) + CLOCK_OFFSET_NS);
    assert_rfc3339(&time);
    let flow = VIEW.flow(&event, time);

    let reported =
        |addr: mesh_common::Addr| Some(IpAddr::from(addr)).filter(|ip| !ip.is_unspecified());
    for (peer, addr, port_be, identity) in [
        (&flow.source, event.src, event.src_port, event.src_identity),
        (
            &flow.destination,
            event.dst,
            event.dst_port,
            event.dst_identity,
        ),
    ] {
        if let Some(ip) = reported(addr) {
            assert_eq!(peer.ip, Some(ip), "the reported address was replaced");
        }
        assert_eq!(peer.port, u16::from_be(port_be));
        assert_eq!(peer.identity, identity);
        assert!(
            !peer.identity_name.is_empty(),
            "identity {identity} has no name"
        );
    }
    let line = flow.line();
    // The line shows direction and verdict in capitals, as Hubble does.
    let shown = |name: &str| line.contains(&name.to_ascii_uppercase());
    assert!(
        shown(flow.direction.as_str()) && shown(flow.verdict.as_str()),
        "{line}"
    );

    let json = serde_json::to_string(&flow).expect("a flow serializes");
    let back: Flow = serde_json::from_str(&json).expect("a served flow parses");
    assert_eq!(back, flow, "the flow changed on its way through JSON");
});

/// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ` with fields in range (a u64 of nanoseconds after
/// 2025 stays within four-digit years).
fn assert_rfc3339(time: &str) {
    let field = |range: std::ops::Range<usize>| -> u32 {
        time.get(range)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("malformed time {time}"))
    };
    assert_eq!(time.len(), 30, "malformed time {time}");
    for (at, sep) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (29, b'Z'),
    ] {
        assert_eq!(time.as_bytes()[at], sep, "malformed time {time}");
    }
    let (month, day) = (field(5..7), field(8..10));
    assert!(
        (1..=12).contains(&month) && (1..=31).contains(&day),
        "bad date {time}"
    );
    assert!(
        field(11..13) < 24 && field(14..16) < 60 && field(17..19) < 60,
        "bad time {time}"
    );
    field(0..4);
    field(20..29);
}
