//! The client end of the admin API, for `mesh-agent observe`, `policy`, `routes` and
//! `proxy-config`:
//! one blocking HTTP/1.1 request per command over the agent's Unix socket, the body
//! read line by line as it arrives (so `observe --follow` prints each flow at once).

use std::{
    fmt::Write as _,
    io::{self, BufRead, BufReader, Read, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
};

use aya::maps::{LpmTrie, Map, MapData};
use mesh_common::{
    PolicyKeyData, PolicyValue,
    l7::ProxyConfig,
    maps,
    policy::{Direction, IDENTITY_ANY, POLICY_ALLOW, POLICY_FIXED_PREFIX, POLICY_ISOLATED},
    service::Protocol,
};

use super::{FlowQuery, SOCKET_NAME, socket_path};
use crate::{
    plan::routes::RouteStatus,
    report::{Flow, PolicyReport},
};

/// Errors of the admin client, naming the socket or map involved.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No agent socket where one was expected.
    #[error(
        "no agent socket at {0} (is `mesh-agent run` running for this node? see --node and --run-dir)"
    )]
    NoSocket(PathBuf),
    /// No node directory at all.
    #[error("no agent sockets under {0} (is `mesh-agent run` running? see --run-dir)")]
    NoNode(PathBuf),
    /// Several agents; the user must choose.
    #[error("several agents under {dir} ({nodes}); pass --node")]
    AmbiguousNode { dir: PathBuf, nodes: String },
    /// Talking to the agent failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The agent answered with an error.
    #[error("{path}: GET {request}: {status}: {body}")]
    Status {
        path: PathBuf,
        request: String,
        status: String,
        body: String,
    },
    /// The agent's answer did not parse.
    #[error("{path}: {problem}")]
    Protocol { path: PathBuf, problem: String },
    /// The pod is not one of this node's.
    #[error("pod {pod} is not a pod of node {node} that policy applies to (local pods: {known})")]
    UnknownPod {
        pod: String,
        node: String,
        known: String,
    },
    /// The pinned POLICY map could not be read.
    #[error("read {path}: {source} (is the datapath pinned? see --bpffs)")]
    Map {
        path: PathBuf,
        #[source]
        source: Box<aya::maps::MapError>,
    },
}

/// The socket of `node`, or of the only agent under `run_dir` when `node` is `None`.
pub fn agent_socket(run_dir: &Path, node: Option<&str>) -> Result<(String, PathBuf), ClientError> {
    if let Some(node) = node {
        return Ok((node.to_owned(), socket_path(run_dir, node)));
    }
    let entries = std::fs::read_dir(run_dir).map_err(|_| ClientError::NoNode(run_dir.into()))?;
    let mut nodes: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().join(SOCKET_NAME).exists())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    nodes.sort();
    match nodes.len() {
        0 => Err(ClientError::NoNode(run_dir.into())),
        1 => {
            let node = nodes.remove(0);
            let path = socket_path(run_dir, &node);
            Ok((node, path))
        }
        _ => Err(ClientError::AmbiguousNode {
            dir: run_dir.into(),
            nodes: nodes.join(", "),
        }),
    }
}

/// `GET request` on the socket; the body, de-chunked, to read as it arrives.
fn get(socket: &Path, request: &str) -> Result<Box<dyn BufRead>, ClientError> {
    let io_err = |source| ClientError::Io {
        path: socket.into(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            ClientError::NoSocket(socket.into())
        }
        _ => io_err(e),
    })?;
    write!(
        stream,
        "GET {request} HTTP/1.1\r\nHost: mesh-agent\r\nConnection: close\r\n\r\n"
    )
    .map_err(io_err)?;
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status).map_err(io_err)?;
    let mut chunked = false;
    let mut length = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).map_err(io_err)? == 0 {
            return Err(ClientError::Protocol {
                path: socket.into(),
                problem: "response ends in its headers".into(),
            });
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            if name == "transfer-encoding" && value.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if name == "content-length" {
                length = value.parse::<u64>().ok();
            }
        }
    }
    let body: Box<dyn BufRead> = match (chunked, length) {
        (true, _) => Box::new(BufReader::new(Chunked {
            inner: reader,
            left: 0,
            done: false,
        })),
        (false, Some(n)) => Box::new(BufReader::new(reader.take(n))),
        (false, None) => Box::new(reader),
    };
    let status = status.trim_end().to_owned();
    if status.split_whitespace().nth(1) != Some("200") {
        let mut text = String::new();
        let mut body = body;
        let _ = body.read_to_string(&mut text);
        return Err(ClientError::Status {
            path: socket.into(),
            request: request.into(),
            status,
            body: text.trim_end().to_owned(),
        });
    }
    Ok(body)
}

/// A `Transfer-Encoding: chunked` body as a plain byte stream.
struct Chunked<R> {
    inner: R,
    /// Bytes left in the current chunk.
    left: u64,
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            if self.done {
                return Ok(0);
            }
            let mut line = String::new();
            if self.inner.read_line(&mut line)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let size = line.trim_end().split(';').next().unwrap_or_default();
            self.left = u64::from_str_radix(size.trim(), 16).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad chunk size {size:?}"),
                )
            })?;
            if self.left == 0 {
                // Trailers (none from the agent) end with an empty line; the connection
                // closes after it anyway.
                self.done = true;
                return Ok(0);
            }
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.left -= n as u64;
        if self.left == 0 {
            let mut crlf = String::new();
            self.inner.read_line(&mut crlf)?;
        }
        Ok(n)
    }
}

/// `mesh-agent observe`: prints the flows of `query` (as NDJSON with `json`, else as
/// Hubble-like lines); with `query.follow`, keeps printing until the agent stops or the
/// process is interrupted.
pub fn observe(socket: &Path, query: &FlowQuery, json: bool) -> Result<(), ClientError> {
    let request = format!("/v1/flows?{}", query.to_query());
    let body = get(socket, &request)?;
    let stdout = io::stdout();
    for line in body.lines() {
        let line = line.map_err(|source| ClientError::Io {
            path: socket.into(),
            source,
        })?;
        let mut out = stdout.lock();
        let written = if json {
            writeln!(out, "{line}")
        } else {
            let flow: Flow = serde_json::from_str(&line).map_err(|e| ClientError::Protocol {
                path: socket.into(),
                problem: format!("flow {line:?}: {e}"),
            })?;
            writeln!(out, "{}", flow.line())
        };
        // A closed stdout (`observe | head`) ends the command quietly.
        if written.and_then(|()| out.flush()).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// The first snapshot of `GET /v1/proxy/config`: the node proxy's current
/// configuration (waits until the agent has applied a state).
pub fn proxy_config(socket: &Path) -> Result<ProxyConfig, ClientError> {
    let mut line = String::new();
    get(socket, "/v1/proxy/config")?
        .read_line(&mut line)
        .map_err(|source| ClientError::Io {
            path: socket.into(),
            source,
        })?;
    serde_json::from_str(&line).map_err(|e| ClientError::Protocol {
        path: socket.into(),
        problem: format!("proxy configuration: {e}"),
    })
}

/// `GET /v1/policy`.
pub fn policy_report(socket: &Path) -> Result<PolicyReport, ClientError> {
    get_json(socket, "/v1/policy", "policy report")
}

/// `GET /v1/status`.
pub fn agent_status(socket: &Path) -> Result<crate::telemetry::AgentStatus, ClientError> {
    get_json(socket, "/v1/status", "agent status")
}

/// `GET /v1/routes`.
pub fn route_statuses(socket: &Path) -> Result<Vec<RouteStatus>, ClientError> {
    get_json(socket, "/v1/routes", "route statuses")
}

/// `GET path`, its whole body parsed as the JSON of `what`.
fn get_json<T: serde::de::DeserializeOwned>(
    socket: &Path,
    path: &str,
    what: &str,
) -> Result<T, ClientError> {
    let mut text = String::new();
    get(socket, path)?
        .read_to_string(&mut text)
        .map_err(|source| ClientError::Io {
            path: socket.into(),
            source,
        })?;
    serde_json::from_str(&text).map_err(|e| ClientError::Protocol {
        path: socket.into(),
        problem: format!("{what}: {e}"),
    })
}

/// One entry of the pinned POLICY map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyEntry {
    /// Port prefix bits (the key's prefix length minus the fixed part).
    pub port_bits: u32,
    /// The key's data.
    pub key: PolicyKeyData,
    /// The value.
    pub value: PolicyValue,
}

/// The POLICY entries pinned under `node_dir` whose subject is `identity`, in key order.
pub fn kernel_policy(node_dir: &Path, identity: u32) -> Result<Vec<PolicyEntry>, ClientError> {
    let path = node_dir.join(maps::POLICY);
    let map_err = |e| ClientError::Map {
        path: path.clone(),
        source: Box::new(e),
    };
    let data = MapData::from_pin(&path).map_err(map_err)?;
    let trie =
        LpmTrie::<_, PolicyKeyData, PolicyValue>::try_from(Map::LpmTrie(data)).map_err(map_err)?;
    let mut entries: Vec<PolicyEntry> = trie
        .iter()
        .filter_map(Result::ok)
        .filter(|(key, _)| key.data().subject == identity)
        .map(|(key, value)| PolicyEntry {
            port_bits: key.prefix_len().saturating_sub(POLICY_FIXED_PREFIX),
            key: key.data(),
            value,
        })
        .collect();
    entries.sort_by_key(|e| {
        (
            e.key.direction,
            e.value.flags & POLICY_ALLOW,
            e.key.peer,
            e.key.proto,
            u16::from_be(e.key.port_be),
        )
    });
    Ok(entries)
}

/// `mesh-agent policy` for one pod: the policies selecting it, and the entries the
/// kernel holds for its identity, named from the report.
pub fn render_pod_policy(report: &PolicyReport, pod: &str, entries: &[PolicyEntry]) -> String {
    let identity_name = |id: u32| -> String {
        match report.identities.iter().find(|i| i.id == id) {
            Some(i) => i.name.clone(),
            None if id == IDENTITY_ANY => "any".to_owned(),
            None => "world".to_owned(),
        }
    };
    let policy_name = |id: u32| {
        report
            .policies
            .get(id as usize)
            .map_or_else(|| format!("#{id}"), |p| p.name.clone())
    };
    let mut out = String::new();
    let local = report.local_pods.iter().find(|p| p.pod == pod);
    let _ = match local {
        Some(p) => writeln!(
            out,
            "pod {pod} (ID:{} {}){}",
            p.identity,
            identity_name(p.identity),
            if p.discovered {
                ""
            } else {
                " [netns not found yet: egress not enforced]"
            }
        ),
        None => writeln!(out, "pod {pod}"),
    };
    let selecting: Vec<_> = report
        .policies
        .iter()
        .filter(|p| p.selects.iter().any(|s| s == pod))
        .collect();
    let _ = writeln!(
        out,
        "policies selecting it:{}",
        if selecting.is_empty() { " none" } else { "" }
    );
    for p in selecting {
        let dirs = [(p.ingress, "ingress"), (p.egress, "egress")]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, d)| *d)
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            out,
            "  {} (isolates: {})",
            p.name,
            if dirs.is_empty() { "nothing" } else { &dirs }
        );
    }
    let _ = writeln!(
        out,
        "kernel POLICY entries:{}",
        if entries.is_empty() {
            " none (not isolated)"
        } else {
            ""
        }
    );
    for e in entries {
        let dir = Direction::from_u8(e.key.direction)
            .map_or("?", Direction::as_str)
            .to_ascii_uppercase();
        let what = if e.value.flags & POLICY_ALLOW != 0 {
            "allow"
        } else if e.value.flags & POLICY_ISOLATED != 0 {
            "isolated"
        } else {
            "?"
        };
        let peer = if e.key.peer == IDENTITY_ANY {
            "any peer".to_owned()
        } else {
            format!("ID:{} {}", e.key.peer, identity_name(e.key.peer))
        };
        let _ = writeln!(
            out,
            "  {dir:7} {what:8} {peer} {} {} (policy {})",
            proto_name(e.key.proto),
            ports(e.key.proto, e.port_bits, e.key.port_be),
            policy_name(e.value.policy_id)
        );
    }
    out
}

fn proto_name(proto: u8) -> String {
    match (proto, Protocol::from_u8(proto)) {
        (0, _) => "any-proto".to_owned(),
        (_, Some(p)) => p.as_str().to_owned(),
        (n, None) => format!("proto-{n}"),
    }
}

/// `port 80`, `ports 8000-8063`, `any port`.
fn ports(proto: u8, bits: u32, port_be: u16) -> String {
    if proto == 0 || bits == 0 {
        return "any port".to_owned();
    }
    let port = u16::from_be(port_be);
    if bits >= 16 {
        return format!("port {port}");
    }
    let mask = u16::MAX << (16 - bits);
    let start = port & mask;
    format!("ports {start}-{}", start | !mask)
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    #[test]
    fn chunked_bodies_are_decoded_across_chunks() {
        let raw = "5\r\nhello\r\n7;ext=1\r\n world\n\r\n0\r\n\r\n";
        let mut text = String::new();
        Chunked {
            inner: Cursor::new(raw),
            left: 0,
            done: false,
        }
        .read_to_string(&mut text)
        .expect("read");
        assert_eq!(text, "hello world\n");
    }

    #[test]
    fn port_prefixes_read_as_ranges() {
        assert_eq!(ports(6, 16, 8081u16.to_be()), "port 8081");
        assert_eq!(ports(6, 10, 8000u16.to_be()), "ports 8000-8063");
        assert_eq!(ports(6, 0, 0), "any port");
        assert_eq!(ports(0, 0, 0), "any port");
    }
}
