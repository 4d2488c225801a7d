use mesh_common::l7::{
    AppProtocol, BackendTarget, Filter, HeaderMatch, HeaderModifier, Mirror, PathMatch,
    PathModifier, Redirect, RetryPolicy, Rewrite, RouteTable, ServicePortRef, StringMatch,
    Timeouts,
};

use super::*;

/// Service `shop/web` (http 80 with appProtocol h2c, admin 9000, dns 53/UDP) and
/// `shop/api` (8080), plus `other/ext` (80), then `extra`.
fn state(extra: &str) -> State {
    let base = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  ports:
  - {name: http, port: 80, appProtocol: kubernetes.io/h2c}
  - {name: admin, port: 9000}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  ports: [{name: http, port: 8080, appProtocol: grpc}]
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: other}
spec:
  ports: [{name: http, port: 80}]
";
    crate::state::parse_str("t.yaml", &format!("{base}---\n{extra}"))
        .unwrap_or_else(|e| panic!("state rejected:\n{e}"))
}

/// An HTTPRoute in `shop` named `name`, with the given spec body (YAML, indented 2).
fn route(name: &str, meta_extra: &str, spec: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: shop{meta_extra}}}\nspec:\n{spec}\n---\n"
    )
}

const WEB: &str = "  parentRefs: [{group: '', kind: Service, name: web, port: 80}]\n";

fn port(svc: &str, port: u16) -> ServicePortRef {
    ServicePortRef {
        service: ObjectRef {
            namespace: "shop".into(),
            name: svc.into(),
        },
        port,
    }
}

fn web80(compiled: &CompiledRoutes) -> &RouteTable {
    compiled
        .tables
        .get(&port("web", 80))
        .expect("table for web:80")
}

/// The matches of a table as `route/rule path`, in order.
fn order(table: &RouteTable) -> Vec<String> {
    table
        .matches
        .iter()
        .map(|m| {
            let rule = &table.rules[m.rule as usize];
            let path = match &m.path {
                PathMatch::Exact(p) => format!("={p}"),
                PathMatch::PathPrefix(p) => p.clone(),
                PathMatch::RegularExpression(p) => format!("~{p}"),
            };
            format!("{}#{} {path}", rule.route.name, rule.index)
        })
        .collect()
}

fn parent(compiled: &CompiledRoutes, route: &str) -> ParentStatus {
    compiled
        .statuses
        .iter()
        .find(|s| s.route.name == route)
        .and_then(|s| s.parents.first().cloned())
        .unwrap_or_else(|| panic!("no status for {route}"))
}

#[test]
fn precedence_orders_matches_across_routes() {
    let a = route(
        "a",
        ", creationTimestamp: '2024-01-02T00:00:00Z'",
        &format!(
            "{WEB}  rules:
  - matches: [{{path: {{type: PathPrefix, value: /api}}}}]
  - matches: [{{path: {{type: PathPrefix, value: /api/v1/}}}}]
  - matches: [{{path: {{type: RegularExpression, value: '/a.*'}}}}]
  - matches: [{{path: {{type: PathPrefix, value: /x}}, headers: [{{name: h1, value: v}}]}}]
  - matches: [{{path: {{type: PathPrefix, value: /q}}, queryParams: [{{name: q, value: v}}]}}]
  - matches: [{{path: {{type: PathPrefix, value: /same}}}}]"
        ),
    );
    let b = route(
        "b",
        ", creationTimestamp: '2024-01-01T00:00:00Z'",
        &format!(
            "{WEB}  rules:
  - matches: [{{path: {{type: Exact, value: /a}}}}]
  - matches: [{{path: {{type: PathPrefix, value: /api}}, method: GET}}]
  - matches: [{{path: {{type: PathPrefix, value: /x}}, headers: [{{name: h1, value: v}}, {{name: h2, value: v}}]}}]
  - matches: [{{path: {{type: PathPrefix, value: /q}}, queryParams: [{{name: q, value: v}}, {{name: r, value: v}}]}}]
  - matches: [{{path: {{type: PathPrefix, value: /same}}}}]"
        ),
    );
    // c and d have no timestamp (newest); c sorts before d by name.
    let c = route(
        "c",
        "",
        &format!("{WEB}  rules: [{{matches: [{{path: {{value: /same}}}}]}}]"),
    );
    let d = route(
        "d",
        "",
        &format!("{WEB}  rules: [{{matches: [{{path: {{value: /same}}}}]}}]"),
    );
    let compiled = compile(&state(&format!("{d}{c}{a}{b}")));
    assert_eq!(
        order(web80(&compiled)),
        [
            "b#0 =/a",      // Exact before any prefix, even a longer one
            "a#1 /api/v1/", // longest prefix (its trailing '/' not counted)
            "b#4 /same",    // equal matches: the oldest route first
            "a#5 /same",
            "c#0 /same", // no creationTimestamp: newest; then by name
            "d#0 /same",
            "b#1 /api", // same prefix: the method match first
            "a#0 /api",
            "b#2 /x", // more header matches first
            "a#3 /x",
            "b#3 /q", // more query parameter matches first
            "a#4 /q",
            "a#2 ~/a.*", // regular expressions last
        ]
    );
    // Each rule is listed once, in the order of its first match.
    let table = web80(&compiled);
    assert_eq!(table.rules.len(), 13);
    assert_eq!(table.matches[0].rule, 0);
    assert_eq!(table.matches[12].rule, 12);
}

#[test]
fn rule_order_and_match_order_break_the_last_ties() {
    let r = route(
        "r",
        "",
        &format!(
            "{WEB}  rules:
  - matches: [{{path: {{value: /b}}}}, {{path: {{value: /a}}}}]
  - matches: [{{path: {{value: /c}}}}]
  - {{}}"
        ),
    );
    let compiled = compile(&state(&r));
    // Equal length prefixes: rule order, then match order; a rule without matches
    // matches every path (prefix /) and comes last.
    assert_eq!(
        order(web80(&compiled)),
        ["r#0 /b", "r#0 /a", "r#1 /c", "r#2 /"]
    );
    assert_eq!(web80(&compiled).rules.len(), 3);
}

#[test]
fn a_parent_without_port_attaches_to_every_tcp_port() {
    let r = route(
        "all",
        "",
        "  parentRefs: [{group: '', kind: Service, name: web}]\n  rules: [{backendRefs: [{name: web}]}]",
    );
    let compiled = compile(&state(&r));
    let ports: Vec<&ServicePortRef> = compiled.tables.keys().collect();
    assert_eq!(ports, [&port("web", 80), &port("web", 9000)]);
    // A portless backendRef to the parent Service takes each table's own port.
    for p in [80, 9000] {
        let table = &compiled.tables[&port("web", p)];
        assert_eq!(
            table.rules[0].backends[0].target,
            BackendTarget::Service(port("web", p))
        );
    }
    let status = parent(&compiled, "all");
    assert_eq!(status.attached_ports, [80, 9000]);
    assert!(status.accepted.status, "{status:?}");
    assert!(status.resolved_refs.status, "{status:?}");
    // l7_ports: routes make ports HTTP, appProtocol wins where it says more.
    assert_eq!(compiled.l7_ports[&port("web", 80)], AppProtocol::H2c);
    assert_eq!(compiled.l7_ports[&port("web", 9000)], AppProtocol::Http);
    assert_eq!(compiled.l7_ports[&port("api", 8080)], AppProtocol::Grpc);
    assert!(!compiled.tables.contains_key(&port("api", 8080)));
    assert_eq!(compiled.l7_ports.len(), 3);
}

#[test]
fn app_protocol_alone_makes_ports_l7_without_tables() {
    let compiled = compile(&state(""));
    assert!(compiled.tables.is_empty());
    assert!(compiled.statuses.is_empty());
    assert_eq!(
        compiled.l7_ports.into_iter().collect::<Vec<_>>(),
        [
            (port("api", 8080), AppProtocol::Grpc),
            (port("web", 80), AppProtocol::H2c),
        ]
    );
}

#[test]
fn parents_that_cannot_be_attached_are_not_accepted() {
    let routes = [
        route(
            "missing",
            "",
            "  parentRefs: [{group: '', kind: Service, name: nope}]",
        ),
        route(
            "badport",
            "",
            "  parentRefs: [{group: '', kind: Service, name: web, port: 81}]",
        ),
        route(
            "udp",
            "",
            "  parentRefs: [{group: '', kind: Service, name: web, port: 53}]",
        ),
        route(
            "consumer",
            "",
            "  parentRefs: [{group: '', kind: Service, name: ext, namespace: other}]",
        ),
        route(
            "section",
            "",
            "  parentRefs: [{group: '', kind: Service, name: web, sectionName: http}]",
        ),
        route("gateway", "", "  parentRefs: [{name: gw}]"),
        route(
            "core",
            "",
            "  parentRefs: [{group: core, kind: Service, name: api}]",
        ),
    ];
    let compiled = compile(&state(&routes.concat()));
    let reason = |r: &str| {
        let p = parent(&compiled, r);
        (p.accepted.status, p.accepted.reason, p.accepted.message)
    };
    assert_eq!(
        reason("missing"),
        (
            false,
            "NoMatchingParent".into(),
            "Service shop/nope not found".into()
        )
    );
    assert_eq!(reason("badport").1, "NoMatchingParent");
    assert_eq!(reason("badport").2, "Service shop/web has no TCP port 81");
    assert_eq!(reason("udp").1, "NoMatchingParent");
    let consumer = reason("consumer");
    assert_eq!(
        (consumer.0, consumer.1.as_str()),
        (false, "UnsupportedValue")
    );
    assert!(
        consumer.2.contains("consumer routes are not supported"),
        "{consumer:?}"
    );
    assert!(reason("section").2.contains("sectionName"));
    let gateway = parent(&compiled, "gateway");
    assert_eq!(gateway.kind, "gateway.networking.k8s.io/Gateway");
    assert!(!gateway.accepted.status);
    assert!(gateway.accepted.message.contains("not a Service"));
    assert!(reason("core").0, "group core is the core group");
    // Only the accepted route got a table.
    assert_eq!(
        compiled.tables.keys().collect::<Vec<_>>(),
        [&port("api", 8080)]
    );
    // Every route has a status, in namespace/name order.
    let names: Vec<&str> = compiled
        .statuses
        .iter()
        .map(|s| s.route.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "badport", "consumer", "core", "gateway", "missing", "section", "udp"
        ]
    );
}

#[test]
fn unresolved_backends_stay_in_the_rule_as_invalid() {
    let r = route(
        "refs",
        "",
        &format!(
            "{WEB}  rules:
  - backendRefs:
    - {{name: gone, port: 80}}
    - {{name: api, port: 9999}}
    - {{name: ext, namespace: other, port: 80}}
    - {{group: example.com, kind: Bucket, name: b}}
    - {{name: api}}
    - {{name: api, port: 8080, weight: 0}}"
        ),
    );
    let compiled = compile(&state(&r));
    let rule = &web80(&compiled).rules[0];
    let targets: Vec<&BackendTarget> = rule.backends.iter().map(|b| &b.target).collect();
    let invalid = |reason: &str| BackendTarget::Invalid {
        reason: reason.into(),
    };
    assert_eq!(
        targets,
        [
            &invalid("BackendNotFound"),
            &invalid("BackendNotFound"),
            &invalid("RefNotPermitted"),
            &invalid("InvalidKind"),
            &invalid("BackendNotFound"), // no port, and api is not the parent
            &BackendTarget::Service(port("api", 8080)),
        ]
    );
    let weights: Vec<u32> = rule.backends.iter().map(|b| b.weight).collect();
    assert_eq!(weights, [1, 1, 1, 1, 1, 0], "default 1, and 0 is kept");
    let status = parent(&compiled, "refs");
    assert!(status.accepted.status);
    assert!(!status.resolved_refs.status);
    assert_eq!(status.resolved_refs.reason, "BackendNotFound");
    let message = &status.resolved_refs.message;
    for part in [
        "spec.rules[0].backendRefs[0]: Service shop/gone not found",
        "spec.rules[0].backendRefs[1]: Service shop/api has no TCP port 9999",
        "spec.rules[0].backendRefs[2]: Service other/ext is in another namespace (ReferenceGrant is not supported)",
        "spec.rules[0].backendRefs[3]: example.com/Bucket is not supported (only Service)",
        "spec.rules[0].backendRefs[4]: port is required (Service shop/api is not an attached parent)",
    ] {
        assert!(message.contains(part), "{part:?} missing from {message}");
    }
}

#[test]
fn cross_namespace_backend_is_ref_not_permitted() {
    let r = route(
        "x",
        "",
        &format!("{WEB}  rules: [{{backendRefs: [{{name: ext, namespace: other, port: 80}}]}}]"),
    );
    let status = parent(&compile(&state(&r)), "x");
    assert_eq!(
        (
            status.resolved_refs.status,
            status.resolved_refs.reason.as_str()
        ),
        (false, "RefNotPermitted")
    );
}

#[test]
fn filters_timeouts_and_retries_compile() {
    let r = route(
        "f",
        "",
        &format!(
            "{WEB}  rules:
  - matches: [{{path: {{type: PathPrefix, value: /v1}}, headers: [{{name: X-User, value: a}}, {{name: x-user, value: b}}, {{name: Env, type: RegularExpression, value: 'prod|stage'}}], queryParams: [{{name: Q, value: '1'}}], method: POST}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {{set: [{{name: X-A, value: '1'}}], add: [{{name: X-B, value: '2'}}], remove: [X-C]}}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {{remove: [Server]}}
    - type: URLRewrite
      urlRewrite: {{hostname: api.internal, path: {{type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}}
    - type: RequestMirror
      requestMirror: {{backendRef: {{name: api, port: 8080}}, percent: 25}}
    - type: RequestMirror
      requestMirror: {{backendRef: {{name: api, port: 8080}}, fraction: {{numerator: 1, denominator: 3}}}}
    - type: RequestMirror
      requestMirror: {{backendRef: {{name: api, port: 8080}}}}
    - type: RequestMirror
      requestMirror: {{backendRef: {{name: gone, port: 1}}}}
    backendRefs:
    - name: api
      port: 8080
      weight: 3
      filters:
      - type: RequestHeaderModifier
        requestHeaderModifier: {{set: [{{name: X-Backend, value: api}}]}}
    timeouts: {{request: 2m, backendRequest: 1m0s500ms}}
    retry: {{codes: [503, 502], attempts: 3, backoff: 100ms}}
  - matches: [{{path: {{type: Exact, value: /old}}}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {{scheme: https, hostname: new.example, port: 8443, path: {{type: ReplaceFullPath, replaceFullPath: /new}}}}
    timeouts: {{request: 0s}}
    retry: {{}}
  - matches: [{{path: {{type: Exact, value: /noretry}}}}]
    retry: {{attempts: 0}}"
        ),
    );
    let compiled = compile(&state(&r));
    let table = web80(&compiled);
    // Exact matches first, the longer first: /noretry, /old, then the prefix /v1.
    let m = &table.matches[2];
    assert_eq!(m.path, PathMatch::PathPrefix("/v1".into()));
    assert_eq!(
        m.headers,
        [
            HeaderMatch {
                name: "x-user".into(),
                value: StringMatch::Exact("a".into())
            },
            HeaderMatch {
                name: "env".into(),
                value: StringMatch::RegularExpression("prod|stage".into())
            },
        ],
        "lowercased, first condition per name only"
    );
    assert_eq!(
        m.query_params,
        [HeaderMatch {
            name: "Q".into(),
            value: StringMatch::Exact("1".into())
        }]
    );
    assert_eq!(m.method.as_deref(), Some("POST"));
    let rule = &table.rules[m.rule as usize];
    let mirror = |ppm| {
        Filter::RequestMirror(Mirror {
            target: BackendTarget::Service(port("api", 8080)),
            fraction_ppm: ppm,
        })
    };
    assert_eq!(
        rule.filters,
        [
            Filter::RequestHeaderModifier(HeaderModifier {
                set: vec![("x-a".into(), "1".into())],
                add: vec![("x-b".into(), "2".into())],
                remove: vec!["x-c".into()],
            }),
            Filter::ResponseHeaderModifier(HeaderModifier {
                remove: vec!["server".into()],
                ..HeaderModifier::default()
            }),
            Filter::UrlRewrite(Rewrite {
                hostname: Some("api.internal".into()),
                path: Some(PathModifier::ReplacePrefixMatch("/v2".into())),
            }),
            mirror(250_000),
            mirror(333_333),
            mirror(1_000_000),
            // The mirror to a missing Service is not configured.
        ]
    );
    assert_eq!(rule.backends[0].weight, 3);
    assert_eq!(
        rule.backends[0].filters,
        [Filter::RequestHeaderModifier(HeaderModifier {
            set: vec![("x-backend".into(), "api".into())],
            ..HeaderModifier::default()
        })]
    );
    assert_eq!(
        rule.timeouts,
        Timeouts {
            request_ms: Some(120_000),
            backend_request_ms: Some(60_500),
        }
    );
    assert_eq!(
        rule.retry,
        Some(RetryPolicy {
            attempts: 3,
            codes: vec![503, 502],
            backoff_ms: 100,
        })
    );
    let status = parent(&compiled, "f");
    assert_eq!(status.resolved_refs.reason, "BackendNotFound");
    assert!(status.resolved_refs.message.contains(
        "spec.rules[0].filters[6].requestMirror.backendRef: Service shop/gone not found"
    ));

    let noretry = &table.rules[table.matches[0].rule as usize];
    assert_eq!(noretry.index, 2);
    assert_eq!(noretry.retry, None, "attempts: 0 disables retries");
    let old = &table.rules[table.matches[1].rule as usize];
    assert_eq!(old.index, 1);
    assert_eq!(
        old.filters,
        [Filter::RequestRedirect(Redirect {
            scheme: Some("https".into()),
            hostname: Some("new.example".into()),
            port: Some(8443),
            path: Some(PathModifier::ReplaceFullPath("/new".into())),
            status: 302,
        })]
    );
    assert_eq!(old.timeouts, Timeouts::default(), "0s is no timeout");
    assert_eq!(
        old.retry,
        Some(RetryPolicy {
            attempts: DEFAULT_RETRY_ATTEMPTS,
            codes: vec![],
            backoff_ms: DEFAULT_RETRY_BACKOFF_MS,
        })
    );
}

#[test]
fn extension_filters_make_the_rule_answer_500() {
    let r = route(
        "ext",
        "",
        &format!(
            "{WEB}  rules:
  - filters: [{{type: ExtensionRef, extensionRef: {{group: example.com, kind: Auth, name: a}}}}]
    backendRefs: [{{name: web}}]"
        ),
    );
    let compiled = compile(&state(&r));
    let rule = &web80(&compiled).rules[0];
    assert!(
        rule.filters.is_empty() && rule.backends.is_empty(),
        "{rule:?}"
    );
    let status = parent(&compiled, "ext");
    assert_eq!(status.resolved_refs.reason, "InvalidKind");
    assert!(
        status
            .resolved_refs
            .message
            .contains("extension filters are not supported")
    );
}

#[test]
fn session_persistence_is_ignored_with_a_note() {
    let r = route(
        "sp",
        "",
        &format!(
            "{WEB}  rules: [{{sessionPersistence: {{sessionName: s}}, backendRefs: [{{name: web}}]}}]"
        ),
    );
    let status = parent(&compile(&state(&r)), "sp");
    assert!(status.accepted.status);
    assert!(
        status
            .accepted
            .message
            .contains("sessionPersistence is not supported")
    );
}

#[test]
fn hostnames_do_not_apply_to_service_parents() {
    let r = route(
        "h",
        "",
        &format!(
            "{WEB}  hostnames: [web.shop.svc.cluster.local]\n  rules: [{{backendRefs: [{{name: web}}]}}]"
        ),
    );
    let compiled = compile(&state(&r));
    assert_eq!(order(web80(&compiled)), ["h#0 /"]);
}

#[test]
fn a_route_without_rules_matches_everything_and_answers_500() {
    let compiled = compile(&state(&route("bare", "", WEB)));
    let table = web80(&compiled);
    assert_eq!(order(table), ["bare#0 /"]);
    assert!(table.rules[0].backends.is_empty());
}
