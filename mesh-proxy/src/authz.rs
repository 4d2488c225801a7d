//! Istio authorization, evaluated: the AuthorizationPolicies the agent compiled for a
//! workload ([`WorkloadSecurity::policies`]) against one connection or request, and the
//! mTLS mode PeerAuthentication gives a workload port. Pure: no I/O.
//!
//! The order is Istio's: DENY policies first (any match denies), then ALLOW policies
//! (when the workload has any, one must match; when it has none, everything is
//! allowed); AUDIT policies change nothing but mark the decision. A rule with
//! HTTP-only fields (hosts, methods, paths, `request.headers[...]`) judged against a
//! plain TCP connection never matches in an ALLOW policy, and has those fields ignored
//! in a DENY or AUDIT policy (the rest of the rule may match), as Istio documents: either
//! way the result is the stricter one.

use std::net::IpAddr;

use http::HeaderMap;
use mesh_common::l7::ObjectRef;
use mesh_common::security::{
    AuthzAction, AuthzPolicy, AuthzRule, Condition, IpNet, Matches, MtlsMode, Operation, Pattern,
    Source, WorkloadSecurity,
};

/// What a connection or request is, as authorization sees it.
#[derive(Clone, Copy, Debug)]
pub struct RequestContext<'a> {
    /// The peer's SPIFFE identity (`spiffe://td/ns/x/sa/y`, or without the scheme);
    /// `None` for plaintext.
    pub source_principal: Option<&'a str>,
    /// The peer's namespace (from its identity); `None` for plaintext.
    pub source_namespace: Option<&'a str>,
    /// The connection's source address.
    pub source_ip: IpAddr,
    /// The original client's address (`X-Forwarded-For`, PROXY protocol), else the
    /// source address.
    pub remote_ip: IpAddr,
    /// The workload address connected to.
    pub destination_ip: IpAddr,
    /// The container port connected to.
    pub destination_port: u16,
    /// The request, for HTTP; `None` for a plain TCP connection.
    pub http: Option<HttpRequest<'a>>,
}

/// The parts of an HTTP request that policies look at.
#[derive(Clone, Copy, Debug)]
pub struct HttpRequest<'a> {
    /// `GET`, `POST`...
    pub method: &'a str,
    /// The path; a query string, if any, is not matched.
    pub path: &'a str,
    /// `Host` / `:authority`.
    pub host: &'a str,
    /// The request headers.
    pub headers: &'a HeaderMap,
}

/// A policy rule that decided, for logs and reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyRule {
    /// The AuthorizationPolicy.
    pub policy: ObjectRef,
    /// Index of the matching rule in its `spec.rules`.
    pub rule: usize,
}

/// The outcome of [`evaluate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Whether the connection or request may proceed.
    pub allowed: bool,
    /// What decided: the DENY rule that denied, or the ALLOW rule that allowed. `None`
    /// when no policy matched: denied because the workload has ALLOW policies and none
    /// matched, or allowed because it has none.
    pub by: Option<PolicyRule>,
    /// The first AUDIT rule that matched, if any: the decision is to be audited.
    pub audit: Option<PolicyRule>,
}

/// Decides whether `ctx` may reach the workload `policies` apply to.
pub fn evaluate(policies: &[AuthzPolicy], ctx: &RequestContext<'_>) -> Decision {
    let first_match = |action: AuthzAction| {
        policies
            .iter()
            .filter(|p| p.action == action)
            .find_map(|p| {
                let rule = p.rules.iter().position(|r| rule_matches(r, action, ctx))?;
                Some(PolicyRule {
                    policy: p.policy.clone(),
                    rule,
                })
            })
    };
    let audit = first_match(AuthzAction::Audit);
    if let Some(by) = first_match(AuthzAction::Deny) {
        return Decision {
            allowed: false,
            by: Some(by),
            audit,
        };
    }
    let has_allow = policies.iter().any(|p| p.action == AuthzAction::Allow);
    let by = first_match(AuthzAction::Allow);
    Decision {
        allowed: by.is_some() || !has_allow,
        by,
        audit,
    }
}

/// The mode the workload requires on container port `port`: its port-level mode, else
/// its own.
pub fn peer_auth_mode(security: &WorkloadSecurity, port: u16) -> MtlsMode {
    security
        .port_mtls
        .iter()
        .find(|p| p.port == port)
        .map_or(security.mtls, |p| p.mode)
}

fn rule_matches(rule: &AuthzRule, action: AuthzAction, ctx: &RequestContext<'_>) -> bool {
    let http_fields =
        rule.to.iter().any(Operation::has_http_fields) || rule.when.iter().any(Condition::is_http);
    if ctx.http.is_none() && http_fields && action == AuthzAction::Allow {
        return false;
    }
    (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, ctx)))
        && (rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, ctx)))
        && rule.when.iter().all(|c| condition_matches(c, ctx))
}

fn source_matches(s: &Source, ctx: &RequestContext<'_>) -> bool {
    let principal = ctx.source_principal.map(istio_principal);
    check(&s.principals, |p| principal.is_some_and(|v| p.matches(v)))
        && check(&s.namespaces, |p| {
            ctx.source_namespace.is_some_and(|v| p.matches(v))
        })
        && check(&s.ip_blocks, |net| net.contains(ctx.source_ip))
        && check(&s.remote_ip_blocks, |net| net.contains(ctx.remote_ip))
}

/// HTTP-only fields of a plain TCP connection are not checked: [`rule_matches`] has
/// already refused such a rule for ALLOW, and DENY and AUDIT ignore them.
fn operation_matches(o: &Operation, ctx: &RequestContext<'_>) -> bool {
    let port = check(&o.ports, |p| *p == ctx.destination_port);
    let Some(http) = &ctx.http else {
        return port;
    };
    let path = http.path.split_once('?').map_or(http.path, |(p, _)| p);
    port && check(&o.hosts, |p| host_matches(p, http.host))
        && check(&o.methods, |p| p.matches(http.method))
        && check(&o.paths, |p| p.matches(path))
}

fn condition_matches(c: &Condition, ctx: &RequestContext<'_>) -> bool {
    match c {
        Condition::SourcePrincipal(m) => {
            let principal = ctx.source_principal.map(istio_principal);
            check(m, |p| principal.is_some_and(|v| p.matches(v)))
        }
        Condition::SourceNamespace(m) => {
            check(m, |p| ctx.source_namespace.is_some_and(|v| p.matches(v)))
        }
        Condition::SourceIp(m) => check(m, |net: &IpNet| net.contains(ctx.source_ip)),
        Condition::RemoteIp(m) => check(m, |net: &IpNet| net.contains(ctx.remote_ip)),
        Condition::DestinationIp(m) => check(m, |net: &IpNet| net.contains(ctx.destination_ip)),
        Condition::DestinationPort(m) => check(m, |p| *p == ctx.destination_port),
        Condition::RequestHeader { name, matches } => match &ctx.http {
            Some(http) => {
                let value = header_value(http.headers, name);
                check(matches, |p| value.as_deref().is_some_and(|v| p.matches(v)))
            }
            None => true,
        },
    }
}

/// `values` (when given) has a match and `not_values` none.
fn check<T>(m: &Matches<T>, matches: impl Fn(&T) -> bool) -> bool {
    (m.values.is_empty() || m.values.iter().any(&matches)) && !m.not_values.iter().any(&matches)
}

/// Istio writes principals without the `spiffe://` scheme.
fn istio_principal(principal: &str) -> &str {
    principal.strip_prefix("spiffe://").unwrap_or(principal)
}

/// Hosts compare case-insensitively, and a pattern without a port matches the host
/// with any port, as Istio generates both forms.
fn host_matches(pattern: &Pattern, host: &str) -> bool {
    if pattern.matches_ignore_case(host) {
        return true;
    }
    let without_port = match host.rsplit_once(':') {
        // An IPv6 literal without a port ends with `]`, not with digits.
        Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => return false,
    };
    pattern.matches_ignore_case(without_port)
}

/// A header's values joined with `,`, as Envoy's header matcher sees a repeated header;
/// `None` when absent or not text.
fn header_value(headers: &HeaderMap, name: &str) -> Option<String> {
    let values: Vec<&str> = headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().ok())
        .collect::<Option<_>>()?;
    (!values.is_empty()).then(|| values.join(","))
}

#[cfg(test)]
mod tests {
    use mesh_common::security::PortMtls;

    use super::*;

    fn pats(values: &[&str]) -> Vec<Pattern> {
        values.iter().map(|v| Pattern::parse(v)).collect()
    }

    fn m<T>(values: Vec<T>, not_values: Vec<T>) -> Matches<T> {
        Matches { values, not_values }
    }

    fn net(s: &str) -> IpNet {
        let (addr, prefix) = s.split_once('/').unwrap();
        IpNet {
            addr: addr.parse().unwrap(),
            prefix: prefix.parse().unwrap(),
        }
    }

    fn policy(name: &str, action: AuthzAction, rules: Vec<AuthzRule>) -> AuthzPolicy {
        AuthzPolicy {
            policy: ObjectRef {
                namespace: "shop".into(),
                name: name.into(),
            },
            action,
            rules,
        }
    }

    fn from(source: Source) -> AuthzRule {
        AuthzRule {
            from: vec![source],
            ..AuthzRule::default()
        }
    }

    fn to(operation: Operation) -> AuthzRule {
        AuthzRule {
            to: vec![operation],
            ..AuthzRule::default()
        }
    }

    fn when(condition: Condition) -> AuthzRule {
        AuthzRule {
            when: vec![condition],
            ..AuthzRule::default()
        }
    }

    /// An mTLS connection from `cluster.local/ns/front/sa/web` at 10.0.0.1 to
    /// 10.0.1.1:8080.
    fn tcp() -> RequestContext<'static> {
        RequestContext {
            source_principal: Some("spiffe://cluster.local/ns/front/sa/web"),
            source_namespace: Some("front"),
            source_ip: "10.0.0.1".parse().unwrap(),
            remote_ip: "203.0.113.9".parse().unwrap(),
            destination_ip: "10.0.1.1".parse().unwrap(),
            destination_port: 8080,
            http: None,
        }
    }

    fn headers() -> &'static HeaderMap {
        static HEADERS: std::sync::OnceLock<HeaderMap> = std::sync::OnceLock::new();
        HEADERS.get_or_init(|| {
            let mut h = HeaderMap::new();
            h.insert("x-token", "abc".parse().unwrap());
            h.append("x-multi", "a".parse().unwrap());
            h.append("x-multi", "b".parse().unwrap());
            h
        })
    }

    /// [`tcp`] carrying `GET /api/items?x=1` for `Web.Shop:8080`.
    fn get() -> RequestContext<'static> {
        RequestContext {
            http: Some(HttpRequest {
                method: "GET",
                path: "/api/items?x=1",
                host: "Web.Shop:8080",
                headers: headers(),
            }),
            ..tcp()
        }
    }

    /// Whether the single ALLOW rule `rule` lets `ctx` through.
    fn allows(rule: AuthzRule, ctx: &RequestContext<'_>) -> bool {
        evaluate(&[policy("p", AuthzAction::Allow, vec![rule])], ctx).allowed
    }

    #[test]
    fn no_policy_allows_and_allow_without_rules_denies() {
        let d = evaluate(&[], &tcp());
        assert_eq!(
            d,
            Decision {
                allowed: true,
                by: None,
                audit: None
            }
        );
        let deny_all = policy("deny-all", AuthzAction::Allow, vec![]);
        let d = evaluate(&[deny_all], &tcp());
        assert!(!d.allowed);
        assert_eq!(d.by, None);
        // DENY without rules denies nothing; an empty rule matches everything.
        assert!(evaluate(&[policy("d", AuthzAction::Deny, vec![])], &tcp()).allowed);
        let d = evaluate(
            &[policy("d", AuthzAction::Deny, vec![AuthzRule::default()])],
            &tcp(),
        );
        assert!(!d.allowed);
        assert!(allows(AuthzRule::default(), &tcp()));
    }

    #[test]
    fn deny_wins_over_allow_and_names_the_rule() {
        let no_match = when(Condition::DestinationPort(m(vec![1], vec![])));
        let policies = [
            policy("allow", AuthzAction::Allow, vec![AuthzRule::default()]),
            policy(
                "deny",
                AuthzAction::Deny,
                vec![no_match.clone(), AuthzRule::default()],
            ),
        ];
        let d = evaluate(&policies, &tcp());
        assert!(!d.allowed);
        let by = d.by.unwrap();
        assert_eq!((by.policy.name.as_str(), by.rule), ("deny", 1));
        // Only the second ALLOW policy matches: one is enough.
        let policies = [
            policy("a", AuthzAction::Allow, vec![no_match.clone()]),
            policy(
                "b",
                AuthzAction::Allow,
                vec![no_match, AuthzRule::default()],
            ),
        ];
        let d = evaluate(&policies, &tcp());
        assert!(d.allowed);
        assert_eq!(d.by.map(|b| (b.policy.name, b.rule)), Some(("b".into(), 1)));
    }

    #[test]
    fn audit_only_marks() {
        let audit = policy("audit", AuthzAction::Audit, vec![AuthzRule::default()]);
        let d = evaluate(std::slice::from_ref(&audit), &tcp());
        assert!(d.allowed);
        assert_eq!(d.by, None);
        assert_eq!(d.audit.map(|a| a.policy.name), Some("audit".into()));
        let d = evaluate(&[audit, policy("none", AuthzAction::Allow, vec![])], &tcp());
        assert!(!d.allowed);
        assert!(d.audit.is_some());
    }

    #[test]
    fn source_matchers() {
        let ctx = tcp();
        let principals = |v: &[&str], n: &[&str]| {
            from(Source {
                principals: m(pats(v), pats(n)),
                ..Source::default()
            })
        };
        assert!(allows(
            principals(&["cluster.local/ns/front/sa/web"], &[]),
            &ctx
        ));
        assert!(allows(principals(&["cluster.local/ns/front/*"], &[]), &ctx));
        assert!(allows(principals(&["*/sa/web"], &[]), &ctx));
        assert!(allows(principals(&["*"], &[]), &ctx));
        assert!(!allows(principals(&["cluster.local/ns/back/*"], &[]), &ctx));
        assert!(!allows(principals(&[], &["*/sa/web"]), &ctx));
        // Plaintext: no principal, so `*` does not match and notPrincipals `*` does.
        let plain = RequestContext {
            source_principal: None,
            source_namespace: None,
            ..tcp()
        };
        assert!(!allows(principals(&["*"], &[]), &plain));
        assert!(allows(principals(&[], &["*"]), &plain));

        let namespaces = |v: &[&str], n: &[&str]| {
            from(Source {
                namespaces: m(pats(v), pats(n)),
                ..Source::default()
            })
        };
        assert!(allows(namespaces(&["front"], &[]), &ctx));
        assert!(!allows(namespaces(&["back"], &[]), &ctx));
        assert!(!allows(namespaces(&[], &["fr*"]), &ctx));
        assert!(!allows(namespaces(&["*"], &[]), &plain));

        let ips = |v: &[&str], n: &[&str]| {
            from(Source {
                ip_blocks: m(
                    v.iter().map(|s| net(s)).collect(),
                    n.iter().map(|s| net(s)).collect(),
                ),
                ..Source::default()
            })
        };
        assert!(allows(ips(&["10.0.0.0/24"], &[]), &ctx));
        assert!(!allows(ips(&["10.0.0.0/24"], &["10.0.0.1/32"]), &ctx));
        assert!(!allows(ips(&["fd00::/8"], &[]), &ctx));
        let remote = |v: &[&str], n: &[&str]| {
            from(Source {
                remote_ip_blocks: m(
                    v.iter().map(|s| net(s)).collect(),
                    n.iter().map(|s| net(s)).collect(),
                ),
                ..Source::default()
            })
        };
        assert!(allows(remote(&["203.0.113.0/24"], &[]), &ctx));
        assert!(!allows(remote(&[], &["203.0.113.0/24"]), &ctx));
        // Fields of one source must all match; any source of a rule may.
        let both = from(Source {
            principals: m(pats(&["*"]), vec![]),
            ip_blocks: m(vec![net("192.168.0.0/16")], vec![]),
            ..Source::default()
        });
        assert!(!allows(both.clone(), &ctx));
        let mut either = both;
        either.from.push(Source {
            namespaces: m(pats(&["front"]), vec![]),
            ..Source::default()
        });
        assert!(allows(either, &ctx));
    }

    #[test]
    fn operation_matchers() {
        let ctx = get();
        let op = |o: Operation| to(o);
        let ports = |v: Vec<u16>, n: Vec<u16>| Operation {
            ports: m(v, n),
            ..Operation::default()
        };
        assert!(allows(op(ports(vec![8080], vec![])), &ctx));
        assert!(!allows(op(ports(vec![80], vec![])), &ctx));
        assert!(!allows(op(ports(vec![], vec![8080])), &ctx));
        let hosts = |v: &[&str], n: &[&str]| Operation {
            hosts: m(pats(v), pats(n)),
            ..Operation::default()
        };
        assert!(allows(op(hosts(&["web.shop"], &[])), &ctx));
        assert!(allows(op(hosts(&["WEB.SHOP:8080"], &[])), &ctx));
        assert!(allows(op(hosts(&["*.shop"], &[])), &ctx));
        assert!(!allows(op(hosts(&["web.shop:80"], &[])), &ctx));
        assert!(!allows(op(hosts(&[], &["web.*"])), &ctx));
        let methods = |v: &[&str], n: &[&str]| Operation {
            methods: m(pats(v), pats(n)),
            ..Operation::default()
        };
        assert!(allows(op(methods(&["GET", "HEAD"], &[])), &ctx));
        assert!(!allows(op(methods(&["POST"], &[])), &ctx));
        assert!(!allows(op(methods(&[], &["GET"])), &ctx));
        let paths = |v: &[&str], n: &[&str]| Operation {
            paths: m(pats(v), pats(n)),
            ..Operation::default()
        };
        // The query string is not part of the path.
        assert!(allows(op(paths(&["/api/items"], &[])), &ctx));
        assert!(allows(op(paths(&["/api/*"], &[])), &ctx));
        assert!(allows(op(paths(&["*/items"], &[])), &ctx));
        assert!(!allows(op(paths(&["/admin*"], &[])), &ctx));
        assert!(!allows(op(paths(&[], &["/api/*"])), &ctx));
    }

    #[test]
    fn condition_matchers() {
        let ctx = get();
        let cases = [
            (
                Condition::SourcePrincipal(m(pats(&["cluster.local/ns/front/sa/web"]), vec![])),
                true,
            ),
            (Condition::SourcePrincipal(m(vec![], pats(&["*"]))), false),
            (
                Condition::SourceNamespace(m(pats(&["front"]), vec![])),
                true,
            ),
            (
                Condition::SourceNamespace(m(vec![], pats(&["front"]))),
                false,
            ),
            (
                Condition::SourceIp(m(vec![net("10.0.0.0/8")], vec![])),
                true,
            ),
            (
                Condition::SourceIp(m(vec![], vec![net("10.0.0.0/8")])),
                false,
            ),
            (
                Condition::RemoteIp(m(vec![net("203.0.113.9/32")], vec![])),
                true,
            ),
            (
                Condition::RemoteIp(m(vec![net("10.0.0.0/8")], vec![])),
                false,
            ),
            (
                Condition::DestinationIp(m(vec![net("10.0.1.0/24")], vec![])),
                true,
            ),
            (
                Condition::DestinationIp(m(vec![], vec![net("10.0.1.1/32")])),
                false,
            ),
            (Condition::DestinationPort(m(vec![8080], vec![])), true),
            (Condition::DestinationPort(m(vec![], vec![8080])), false),
        ];
        for (condition, expected) in cases {
            assert_eq!(
                allows(when(condition.clone()), &ctx),
                expected,
                "{condition:?}"
            );
        }
        let header = |name: &str, v: &[&str], n: &[&str]| {
            when(Condition::RequestHeader {
                name: name.into(),
                matches: m(pats(v), pats(n)),
            })
        };
        assert!(allows(header("x-token", &["abc"], &[]), &ctx));
        assert!(allows(header("x-token", &["*"], &[]), &ctx));
        assert!(!allows(header("x-absent", &["*"], &[]), &ctx));
        assert!(allows(header("x-absent", &[], &["*"]), &ctx));
        assert!(!allows(header("x-token", &[], &["a*"]), &ctx));
        assert!(allows(header("x-multi", &["a,b"], &[]), &ctx));
        // All conditions of a rule must hold.
        let mut both = header("x-token", &["abc"], &[]);
        both.when
            .push(Condition::DestinationPort(m(vec![81], vec![])));
        assert!(!allows(both, &ctx));
    }

    #[test]
    fn http_fields_on_tcp_never_match_allow_and_are_ignored_by_deny() {
        let methods = Operation {
            methods: m(pats(&["GET"]), vec![]),
            ports: m(vec![8080], vec![]),
            ..Operation::default()
        };
        let header = Condition::RequestHeader {
            name: "x-token".into(),
            matches: m(pats(&["nope"]), vec![]),
        };
        for rule in [to(methods.clone()), when(header.clone())] {
            // ALLOW: the rule cannot match a TCP connection, so it is denied...
            assert!(!allows(rule.clone(), &tcp()), "{rule:?}");
            // ...DENY: the HTTP fields are dropped and the rest matches: denied too.
            let deny = policy("deny", AuthzAction::Deny, vec![rule.clone()]);
            let d = evaluate(&[deny], &tcp());
            assert!(!d.allowed, "{rule:?}");
            let audit = policy("audit", AuthzAction::Audit, vec![rule.clone()]);
            assert!(evaluate(&[audit], &tcp()).audit.is_some(), "{rule:?}");
        }
        // The non-HTTP rest of a DENY rule still has to match.
        let other_port = Operation {
            ports: m(vec![9090], vec![]),
            ..methods
        };
        assert!(
            evaluate(
                &[policy("deny", AuthzAction::Deny, vec![to(other_port)])],
                &tcp()
            )
            .allowed
        );
        // Over HTTP the fields count: GET matches, the header does not.
        assert!(allows(
            to(Operation {
                methods: m(pats(&["GET"]), vec![]),
                ..Operation::default()
            }),
            &get()
        ));
        assert!(!allows(when(header.clone()), &get()));
        assert!(
            evaluate(
                &[policy("deny", AuthzAction::Deny, vec![when(header)])],
                &get()
            )
            .allowed
        );
    }

    #[test]
    fn port_level_modes_override_the_workload() {
        let s = WorkloadSecurity {
            mtls: MtlsMode::Strict,
            port_mtls: vec![PortMtls {
                port: 8080,
                mode: MtlsMode::Disable,
            }],
            policies: vec![],
            http_ports: vec![],
        };
        assert_eq!(peer_auth_mode(&s, 8080), MtlsMode::Disable);
        assert_eq!(peer_auth_mode(&s, 9090), MtlsMode::Strict);
    }
}
