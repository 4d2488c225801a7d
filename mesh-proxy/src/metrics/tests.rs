use std::collections::{BTreeMap, BTreeSet};

use regex::Regex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

fn labels(code: u16) -> RequestLabels {
    RequestLabels {
        reporter: "source",
        source_workload: "client".to_owned(),
        source_workload_namespace: "default".to_owned(),
        destination_service: "web.default.svc.cluster.local".to_owned(),
        destination_service_name: "web".to_owned(),
        destination_service_namespace: "default".to_owned(),
        destination_workload: "web".to_owned(),
        destination_workload_namespace: "default".to_owned(),
        request_protocol: "http",
        response_code: code,
        connection_security_policy: "none",
        ..RequestLabels::default()
    }
}

/// A sample line of the text exposition: name, labels, value.
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the text exposition strictly enough to catch what Prometheus rejects: every
/// line a comment (`# HELP name text`, `# TYPE name type`, `# EOF`) or a sample whose
/// family was declared by TYPE before it.
fn parse(text: &str) -> (BTreeMap<String, String>, BTreeSet<String>, Vec<Sample>) {
    let sample = Regex::new(r#"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$"#).unwrap();
    let label = Regex::new(r#"([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)""#).unwrap();
    let mut types = BTreeMap::new();
    let mut helps = BTreeSet::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            types.insert(name.to_owned(), kind.to_owned());
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, _) = rest.split_once(' ').expect("HELP name text");
            helps.insert(name.to_owned());
        } else if line == "# EOF" || line.is_empty() {
        } else {
            let caps = sample
                .captures(line)
                .unwrap_or_else(|| panic!("not a sample: {line}"));
            let name = caps[1].to_owned();
            let family = types
                .keys()
                .find(|f| {
                    name == **f
                        || ["_total", "_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| name == format!("{f}{s}"))
                })
                .unwrap_or_else(|| panic!("no TYPE for {name}"));
            assert!(helps.contains(family), "no HELP for {family}");
            let labels = caps
                .get(3)
                .map(|m| {
                    label
                        .captures_iter(m.as_str())
                        .map(|c| (c[1].to_owned(), c[2].to_owned()))
                        .collect()
                })
                .unwrap_or_default();
            let value = caps[4]
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("bad value: {line}"));
            samples.push(Sample {
                name,
                labels,
                value,
            });
        }
    }
    (types, helps, samples)
}

fn value(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            with.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

#[test]
fn exposition_has_istio_names_labels_and_counts() {
    let metrics = ProxyMetrics::new();
    for _ in 0..3 {
        metrics.record_request(&labels(200), Duration::from_millis(7), 10, 2_000);
    }
    metrics.record_request(&labels(503), Duration::from_millis(700), 0, 0);
    let text = metrics.encode();
    let (types, _, samples) = parse(&text);

    for (name, kind) in [
        // Text format 0.0.4 names a counter's family with its `_total`.
        ("istio_requests_total", "counter"),
        ("istio_request_duration_milliseconds", "histogram"),
        ("istio_request_bytes", "histogram"),
        ("istio_response_bytes", "histogram"),
        ("mesh_proxy_config_version", "gauge"),
        ("mesh_proxy_active_connections", "gauge"),
    ] {
        assert_eq!(types.get(name).map(String::as_str), Some(kind), "{name}");
    }
    assert_eq!(value(&samples, "istio_requests_total", &[]), 4.0);
    assert_eq!(
        value(
            &samples,
            "istio_requests_total",
            &[("response_code", "200")]
        ),
        3.0
    );
    assert_eq!(
        value(&samples, "istio_request_duration_milliseconds_count", &[]),
        4.0
    );
    // 3 x 7 ms are in the 10 ms bucket, the 700 ms one is not.
    assert_eq!(
        value(
            &samples,
            "istio_request_duration_milliseconds_bucket",
            &[("response_code", "200"), ("le", "10")]
        ),
        3.0
    );
    assert_eq!(
        value(
            &samples,
            "istio_request_duration_milliseconds_bucket",
            &[("response_code", "503"), ("le", "500")]
        ),
        0.0
    );
    assert_eq!(
        value(
            &samples,
            "istio_response_bytes_sum",
            &[("response_code", "200")]
        ),
        6_000.0
    );
    let buckets: BTreeSet<&str> = samples
        .iter()
        .filter(|s| s.name == "istio_request_duration_milliseconds_bucket")
        .map(|s| s.labels["le"].as_str())
        .collect();
    assert_eq!(buckets.len(), DURATION_BUCKETS_MS.len() + 1, "{buckets:?}");
    assert!(buckets.contains("+Inf"));

    let series = samples
        .iter()
        .find(|s| s.name == "istio_requests_total")
        .expect("a request series");
    let names: BTreeSet<&str> = series.labels.keys().map(String::as_str).collect();
    for label in [
        "reporter",
        "source_workload",
        "source_workload_namespace",
        "source_principal",
        "source_app",
        "source_version",
        "source_canonical_service",
        "source_canonical_revision",
        "source_cluster",
        "destination_service",
        "destination_service_name",
        "destination_service_namespace",
        "destination_workload",
        "destination_workload_namespace",
        "destination_principal",
        "destination_app",
        "destination_version",
        "destination_canonical_service",
        "destination_canonical_revision",
        "destination_cluster",
        "request_protocol",
        "response_code",
        "grpc_response_status",
        "response_flags",
        "connection_security_policy",
    ] {
        assert!(names.contains(label), "missing label {label}");
    }
    assert_eq!(names.len(), 25);
    // Unknown values read `unknown`, as Istio writes them.
    assert_eq!(series.labels["source_principal"], "unknown");
    assert_eq!(series.labels["destination_principal"], "unknown");
    assert_eq!(series.labels["source_canonical_service"], "client");
    assert_eq!(series.labels["response_flags"], "-");
    assert_eq!(series.labels["reporter"], "source");
}

#[test]
fn proxy_metrics_count_and_set() {
    let metrics = ProxyMetrics::new();
    let svc = "web.default.svc.cluster.local";
    metrics.record_retry(svc, false);
    metrics.record_retry(svc, false);
    metrics.record_retry(svc, true);
    metrics.record_overflow(svc);
    metrics.record_ejection(svc, "10.244.1.5:8080");
    metrics.set_config_version(42);
    metrics.set_connections(3);
    metrics.set_connections(2);
    let (types, _, samples) = parse(&metrics.encode());
    for name in [
        "mesh_proxy_retries_total",
        "mesh_proxy_overflows_total",
        "mesh_proxy_ejections_total",
    ] {
        assert_eq!(
            types.get(name).map(String::as_str),
            Some("counter"),
            "{name}"
        );
    }
    let svc_label = ("destination_service", svc);
    assert_eq!(
        value(
            &samples,
            "mesh_proxy_retries_total",
            &[svc_label, ("outcome", "allowed")]
        ),
        2.0
    );
    assert_eq!(
        value(
            &samples,
            "mesh_proxy_retries_total",
            &[svc_label, ("outcome", "budget_exhausted")]
        ),
        1.0
    );
    assert_eq!(
        value(&samples, "mesh_proxy_overflows_total", &[svc_label]),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "mesh_proxy_ejections_total",
            &[svc_label, ("endpoint", "10.244.1.5:8080")]
        ),
        1.0
    );
    assert_eq!(value(&samples, "mesh_proxy_config_version", &[]), 42.0);
    assert_eq!(value(&samples, "mesh_proxy_active_connections", &[]), 2.0);
}

#[test]
fn metrics_are_shared_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<ProxyMetrics>();
}

#[test]
fn concurrent_requests_are_counted_exactly() {
    // Threads race to make the same series (the handle cache and the families must
    // agree on one), and keep counting in it and in another.
    let metrics = Arc::new(ProxyMetrics::new());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let metrics = Arc::clone(&metrics);
            std::thread::spawn(move || {
                for i in 0..500 {
                    let code = if (i + t) % 2 == 0 { 200 } else { 503 };
                    metrics.record_request(&labels(code), Duration::from_millis(1), 1, 1);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let (_, _, samples) = parse(&metrics.encode());
    let count = |code| value(&samples, "istio_requests_total", &[("response_code", code)]);
    assert_eq!((count("200"), count("503")), (1000.0, 1000.0));
    assert_eq!(
        value(&samples, "istio_request_duration_milliseconds_count", &[]),
        2000.0
    );
    assert_eq!(value(&samples, "istio_response_bytes_count", &[]), 2000.0);
}

#[test]
fn label_values_are_escaped() {
    let metrics = ProxyMetrics::new();
    let mut l = labels(200);
    l.source_workload = "we\"ird\\name\n".to_owned();
    metrics.record_request(&l, Duration::from_millis(1), 0, 0);
    let (_, _, samples) = parse(&metrics.encode());
    assert_eq!(value(&samples, "istio_requests_total", &[]), 1.0);
}

/// Sends one request over a fresh connection and returns the raw response.
async fn get(addr: std::net::SocketAddr, method: &str, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read response");
    response
}

#[tokio::test]
async fn serve_answers_metrics_healthz_and_404_then_shuts_down() {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let metrics = Arc::new(ProxyMetrics::new());
    metrics.record_request(&labels(200), Duration::from_millis(1), 1, 1);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, Arc::clone(&metrics), async {
        let _ = stopped.await;
    }));

    let check = async {
        let response = get(addr, "GET", "/metrics").await;
        let (head, body) = response.split_once("\r\n\r\n").expect("head and body");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        assert!(body.contains("istio_requests_total{"), "{body}");

        let response = get(addr, "GET", "/healthz").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.ends_with("\r\n\r\nok"), "{response}");

        for (method, path) in [("GET", "/"), ("POST", "/metrics"), ("GET", "/metricsx")] {
            let response = get(addr, method, path).await;
            assert!(
                response.starts_with("HTTP/1.1 404"),
                "{method} {path}: {response}"
            );
        }
    };
    tokio::time::timeout(Duration::from_secs(10), check)
        .await
        .expect("answers within 10 s");

    stop.send(()).expect("server still running");
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("shuts down within 10 s")
        .expect("server task")
        .expect("serve returns Ok");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
