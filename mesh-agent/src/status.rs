//! `mesh-agent status`: one node's datapath at a glance, read from its pins (so it works
//! with or without a running agent): attached programs, same-node socket redirection,
//! policy verdicts and the fill level, capacity and kernel memory of every map of the
//! registry.

use std::fmt::Write as _;

use mesh_common::maps::REGISTRY;

use crate::metrics::Snapshot;

/// The status report of `node` from `snapshot`.
pub fn render(node: &str, snapshot: &Snapshot) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_report(&mut out, node, snapshot);
    out
}

fn write_report(out: &mut String, node: &str, s: &Snapshot) -> std::fmt::Result {
    writeln!(out, "node {node}")?;
    let attached = s.programs_attached.iter().filter(|(_, a)| *a).count();
    writeln!(
        out,
        "programs: {attached} of {} attached",
        s.programs_attached.len()
    )?;
    for (program, is_attached) in &s.programs_attached {
        let state = if *is_attached { "attached" } else { "-" };
        writeln!(out, "  {program:<20} {state}")?;
    }
    match &s.agent {
        Some(agent) => {
            let src = &agent.source;
            let freshness = match (src.stale, src.stale_since) {
                (true, Some(since)) => format!("STALE since {} (Unix time {since})", ago(since)),
                (true, None) => "STALE".to_owned(),
                (false, _) => "up to date".to_owned(),
            };
            writeln!(out, "source: {}, {freshness}", src.kind.as_str())?;
            writeln!(
                out,
                "  revision           {} delivered, {} applied",
                src.revision, src.applied_revision
            )?;
            writeln!(out, "  rejected objects   {}", src.rejected_objects)?;
            writeln!(
                out,
                "  last plan          {:.1} ms (Services planned: {}), map writes {:.1} ms (entries: {})",
                agent.last_plan_us as f64 / 1e3,
                agent.last_plan_services,
                agent.last_apply_us as f64 / 1e3,
                agent.last_map_writes
            )?;
        }
        None => writeln!(out, "source: unknown (no agent answers for this node)")?,
    }
    let r = &s.sockmap;
    writeln!(out, "sockmap: {}", if r.enabled { "on" } else { "off" })?;
    writeln!(out, "  sockets            {}", r.sockets)?;
    writeln!(
        out,
        "  redirected         {} messages, {} bytes",
        r.redirected_messages, r.redirected_bytes
    )?;
    writeln!(out, "  via TCP/IP stack   {} messages", r.stack_messages)?;
    writeln!(out, "policy verdicts:")?;
    if s.policy_verdicts.is_empty() {
        writeln!(out, "  none")?;
    }
    for v in &s.policy_verdicts {
        writeln!(
            out,
            "  {:<8} {:<8} {:<14} {}",
            v.direction, v.verdict, v.reason, v.count
        )?;
    }
    let total: u64 = s.maps.iter().map(|m| m.memory_bytes).sum();
    writeln!(
        out,
        "maps: {}, {:.1} MiB of kernel memory",
        s.maps.len(),
        total as f64 / f64::from(1 << 20)
    )?;
    writeln!(
        out,
        "  {:<22} {:<12} {:>10} {:>10} {:>12}",
        "NAME", "KIND", "ENTRIES", "CAPACITY", "MEMORY"
    )?;
    for m in &s.maps {
        // Arrays and the ring buffer report their capacity as entries (a fixed fill).
        let kind = REGISTRY
            .iter()
            .find(|spec| spec.name == m.name)
            .map_or("-", |spec| spec.kind.name());
        writeln!(
            out,
            "  {:<22} {kind:<12} {:>10} {:>10} {:>12}",
            m.name, m.entries, m.capacity, m.memory_bytes
        )?;
    }
    Ok(())
}

/// `N s ago` for a Unix time.
fn ago(unix_secs: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{}s ago", now.saturating_sub(unix_secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{MapFill, SockmapCounters};

    #[test]
    fn shows_programs_sockmap_and_maps() {
        let snapshot = Snapshot {
            programs_attached: vec![
                ("mesh_connect4".into(), true),
                ("mesh_sockops".into(), false),
            ],
            maps: vec![
                MapFill {
                    name: "SOCKS_V1".into(),
                    entries: 4,
                    capacity: 65_536,
                    memory_bytes: 1_048_576,
                },
                MapFill {
                    name: "EVENTS_V1".into(),
                    entries: 262_144,
                    capacity: 262_144,
                    memory_bytes: 1_048_576,
                },
            ],
            sockmap: SockmapCounters {
                enabled: false,
                sockets: 4,
                redirected_messages: 7,
                redirected_bytes: 9000,
                stack_messages: 2,
            },
            ..Snapshot::default()
        };
        let text = render("n1", &snapshot);
        for want in [
            "node n1",
            "programs: 1 of 2 attached",
            "  mesh_connect4        attached",
            "  mesh_sockops         -",
            "sockmap: off",
            "  sockets            4",
            "  redirected         7 messages, 9000 bytes",
            "  via TCP/IP stack   2 messages",
            "  none",
            "maps: 2, 2.0 MiB of kernel memory",
            "  SOCKS_V1               sockhash              4      65536      1048576",
            "  EVENTS_V1              ringbuf          262144     262144      1048576",
        ] {
            assert!(
                text.lines().any(|l| l == want),
                "missing {want:?} in:\n{text}"
            );
        }
    }

    #[test]
    fn shows_the_source_and_when_it_went_stale() {
        use crate::source::{SourceKind, SourceStatus};
        use crate::telemetry::AgentStatus;
        let snapshot = Snapshot {
            agent: Some(AgentStatus {
                source: SourceStatus {
                    kind: SourceKind::Etcd,
                    stale: true,
                    stale_since: Some(1_000),
                    revision: 42,
                    applied_revision: 41,
                    rejected_objects: 1,
                },
                last_plan_us: 2_500,
                last_apply_us: 100,
                last_plan_services: 1,
                last_map_writes: 3,
                ..AgentStatus::default()
            }),
            ..Snapshot::default()
        };
        let text = render("n1", &snapshot);
        assert!(
            text.lines()
                .any(|l| l.starts_with("source: etcd, STALE since ")
                    && l.ends_with("(Unix time 1000)")),
            "{text}"
        );
        for want in [
            "  revision           42 delivered, 41 applied",
            "  rejected objects   1",
            "  last plan          2.5 ms (Services planned: 1), map writes 0.1 ms (entries: 3)",
        ] {
            assert!(
                text.lines().any(|l| l == want),
                "missing {want:?} in:\n{text}"
            );
        }
        let text = render("n1", &Snapshot::default());
        assert!(text.contains("source: unknown"), "{text}");
    }
}
