//! `POST /v1/proxy/flows`: the node proxy reports the connections and requests it
//! refused ([`ProxyFlow`], one JSON object per line), and they join the flow log next
//! to the kernel's, named like them, with both SPIFFE identities. A report is taken
//! whole or not at all: one bad line refuses it (400, naming the line).

use http_body_util::{BodyExt as _, Limited};
use hyper::{Request, Response, StatusCode, body::Incoming};
use mesh_common::l7::ProxyFlow;

use super::{ApiBody, PLAIN_TEXT, reply};
use crate::flows::{FlowLog, SharedView};

/// Largest report accepted: a proxy batches at most a few hundred flows.
const MAX_REPORT: usize = 1 << 20;

/// Takes one report.
pub async fn receive(
    request: Request<Incoming>,
    view: &SharedView,
    log: &FlowLog,
) -> Response<ApiBody> {
    let body = match Limited::new(request.into_body(), MAX_REPORT)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                PLAIN_TEXT,
                format!("report refused: {e} (at most {MAX_REPORT} bytes)\n"),
            );
        }
    };
    match parse(&body) {
        Ok(flows) => {
            let view = view.get();
            for f in &flows {
                log.push(view.proxy_flow(f));
            }
            reply(
                StatusCode::OK,
                PLAIN_TEXT,
                format!("{} flows\n", flows.len()),
            )
        }
        Err(problem) => reply(StatusCode::BAD_REQUEST, PLAIN_TEXT, format!("{problem}\n")),
    }
}

/// Every line of `body` as a flow, or the first problem (with its 1-based line).
fn parse(body: &[u8]) -> Result<Vec<ProxyFlow>, String> {
    body.split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace))
        .map(|(i, line)| serde_json::from_slice(line).map_err(|e| format!("line {}: {e}", i + 1)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"timeUnixNs":1,"src":"10.0.0.1:40000","dst":"10.0.0.2:8080","sourcePrincipal":"spiffe://td/ns/a/sa/b","destinationPrincipal":null,"denial":"authorization","policy":"a/p"}"#;

    #[test]
    fn lines_parse_and_blank_lines_are_skipped() {
        let flows = parse(format!("{GOOD}\n\n{GOOD}\n").as_bytes()).unwrap();
        assert_eq!(flows.len(), 2);
        assert_eq!(flows[0].policy.as_deref(), Some("a/p"));
    }

    #[test]
    fn one_bad_line_refuses_the_report_and_names_the_line() {
        let err = parse(format!("{GOOD}\n{{\"junk\":1}}\n").as_bytes()).unwrap_err();
        assert!(err.starts_with("line 2: "), "{err}");
        let err = parse(b"\xff\xfe").unwrap_err();
        assert!(err.starts_with("line 1: "), "{err}");
    }
}
