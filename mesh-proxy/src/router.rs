//! Request routing: the frontends of a configuration by (cluster IP, port), and each
//! one's route table compiled once per configuration (regular expressions included).
//!
//! Decision order (l7.rs): the table's matches are already in Gateway API precedence
//! order, so the first match whose every condition holds selects its rule. A match
//! holds when its path condition holds (Exact: equal; PathPrefix: the prefix's
//! `/`-separated elements start the path's; RegularExpression: the whole path), every
//! header condition holds (names case-insensitive, repeated values joined by `,`),
//! every query parameter condition holds (names exact, first value), and the method is
//! the named one. A frontend without routes sends everything to its Service; a frontend
//! with routes answers 404 when nothing matches.

use std::{collections::HashMap, net::SocketAddr};

use mesh_common::l7::{
    Frontend, HeaderMatch, PathMatch, ProxyConfig, RouteTable, Rule, StringMatch,
};
use regex::Regex;

/// The frontends of one configuration.
#[derive(Debug, Default)]
pub struct Routes {
    frontends: HashMap<SocketAddr, CompiledFrontend>,
}

/// A frontend with its compiled table.
#[derive(Debug)]
pub struct CompiledFrontend {
    /// The frontend as configured.
    pub frontend: Frontend,
    /// The Service's `<name>.<namespace>.svc.cluster.local`, made once per configuration
    /// for the metrics of requests answered before a backend is chosen.
    pub host: String,
    table: Option<CompiledTable>,
}

#[derive(Debug)]
struct CompiledTable {
    matches: Vec<CompiledMatch>,
    rules: Vec<Rule>,
}

#[derive(Debug)]
struct CompiledMatch {
    path: CompiledPath,
    headers: Vec<(String, CompiledString)>,
    query: Vec<(String, CompiledString)>,
    method: Option<String>,
    rule: usize,
}

#[derive(Debug)]
enum CompiledPath {
    Exact(String),
    /// Without a trailing `/` ("" for `/`).
    Prefix(String),
    Regex(Regex),
    /// A condition that cannot hold (its regular expression did not compile).
    Never,
}

#[derive(Debug)]
enum CompiledString {
    Exact(String),
    Regex(Regex),
    Never,
}

/// What a request is routed to.
#[derive(Debug, PartialEq)]
pub enum Decision<'a> {
    /// The frontend has no routes: the Service itself.
    Service,
    /// A rule matched.
    Rule {
        /// The rule.
        rule: &'a Rule,
        /// The PathPrefix that matched (as configured), for ReplacePrefixMatch.
        prefix: Option<&'a str>,
    },
    /// Routes exist and none matches: 404.
    NoRoute,
}

impl Routes {
    /// Compiles the frontends of `config`. Invalid regular expressions (the agent
    /// validates them, so only a version skew gets here) are logged and never match.
    pub fn compile(config: &ProxyConfig) -> Self {
        let frontends = config
            .frontends
            .iter()
            .map(|f| {
                let table = f.routes.as_ref().map(|t| compile_table(f, t));
                (
                    SocketAddr::new(f.addr, f.port),
                    CompiledFrontend {
                        frontend: f.clone(),
                        host: format!(
                            "{}.{}.svc.cluster.local",
                            f.service.name, f.service.namespace
                        ),
                        table,
                    },
                )
            })
            .collect();
        Self { frontends }
    }

    /// The frontend for an original destination.
    pub fn frontend(&self, dst: SocketAddr) -> Option<&CompiledFrontend> {
        // An IPv4 destination on a dual-stack socket shows as ::ffff:a.b.c.d.
        let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
        self.frontends.get(&dst)
    }
}

impl CompiledFrontend {
    /// Routes a request.
    pub fn route<'a>(&'a self, req: &http::request::Parts) -> Decision<'a> {
        let Some(table) = &self.table else {
            return Decision::Service;
        };
        let path = req.uri.path();
        let query = req.uri.query().unwrap_or("");
        for m in &table.matches {
            if m.method
                .as_deref()
                .is_some_and(|want| want != req.method.as_str())
            {
                continue;
            }
            if !m.path.matches(path) {
                continue;
            }
            if !m
                .headers
                .iter()
                .all(|(name, cond)| header_matches(&req.headers, name, cond))
            {
                continue;
            }
            if !m
                .query
                .iter()
                .all(|(name, cond)| query_param(query, name).is_some_and(|v| cond.matches(v)))
            {
                continue;
            }
            let Some(rule) = table.rules.get(m.rule) else {
                continue;
            };
            let prefix = match &m.path {
                CompiledPath::Prefix(p) => Some(p.as_str()),
                _ => None,
            };
            return Decision::Rule { rule, prefix };
        }
        Decision::NoRoute
    }
}

fn compile_table(f: &Frontend, t: &RouteTable) -> CompiledTable {
    let where_ = format!("{}/{}:{}", f.service.namespace, f.service.name, f.port);
    let matches = t
        .matches
        .iter()
        .map(|m| CompiledMatch {
            path: match &m.path {
                PathMatch::Exact(p) => CompiledPath::Exact(p.clone()),
                PathMatch::PathPrefix(p) => {
                    CompiledPath::Prefix(p.trim_end_matches('/').to_owned())
                }
                PathMatch::RegularExpression(re) => match anchored(re, &where_) {
                    Some(re) => CompiledPath::Regex(re),
                    None => CompiledPath::Never,
                },
            },
            headers: compile_conditions(&m.headers, &where_, true),
            query: compile_conditions(&m.query_params, &where_, false),
            method: m.method.clone(),
            rule: m.rule as usize,
        })
        .collect();
    CompiledTable {
        matches,
        rules: t.rules.clone(),
    }
}

fn compile_conditions(
    conds: &[HeaderMatch],
    where_: &str,
    lowercase: bool,
) -> Vec<(String, CompiledString)> {
    conds
        .iter()
        .map(|h| {
            let name = if lowercase {
                h.name.to_ascii_lowercase()
            } else {
                h.name.clone()
            };
            let cond = match &h.value {
                StringMatch::Exact(v) => CompiledString::Exact(v.clone()),
                StringMatch::RegularExpression(re) => match anchored(re, where_) {
                    Some(re) => CompiledString::Regex(re),
                    None => CompiledString::Never,
                },
            };
            (name, cond)
        })
        .collect()
}

fn anchored(re: &str, where_: &str) -> Option<Regex> {
    match Regex::new(&format!("^(?:{re})$")) {
        Ok(re) => Some(re),
        Err(e) => {
            tracing::warn!(frontend = where_, regex = re, error = %e, "route regex does not compile; its match never holds");
            None
        }
    }
}

impl CompiledPath {
    fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(p) => p == path,
            Self::Prefix(p) => {
                path.starts_with(p.as_str())
                    && (path.len() == p.len() || path.as_bytes()[p.len()] == b'/')
            }
            Self::Regex(re) => re.is_match(path),
            Self::Never => false,
        }
    }
}

impl CompiledString {
    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(v) => v == value,
            Self::Regex(re) => re.is_match(value),
            Self::Never => false,
        }
    }
}

fn header_matches(headers: &http::HeaderMap, name: &str, cond: &CompiledString) -> bool {
    let mut values = headers.get_all(name).iter().filter_map(|v| v.to_str().ok());
    let Some(first) = values.next() else {
        return false;
    };
    let rest: Vec<&str> = values.collect();
    if rest.is_empty() {
        cond.matches(first)
    } else {
        let joined = std::iter::once(first)
            .chain(rest)
            .collect::<Vec<_>>()
            .join(",");
        cond.matches(&joined)
    }
}

/// The first value of query parameter `name` (exact, case-sensitive name).
fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use mesh_common::l7::{AppProtocol, ObjectRef, RouteMatch, Timeouts};

    use super::*;

    fn rule(i: u32) -> Rule {
        Rule {
            route: ObjectRef {
                namespace: "default".into(),
                name: "r".into(),
            },
            index: i,
            filters: vec![],
            backends: vec![],
            timeouts: Timeouts::default(),
            retry: None,
        }
    }

    fn m(path: PathMatch, rule: u32) -> RouteMatch {
        RouteMatch {
            path,
            headers: vec![],
            query_params: vec![],
            method: None,
            rule,
        }
    }

    fn frontend(matches: Vec<RouteMatch>, rules: u32) -> CompiledFrontend {
        let f = Frontend {
            addr: "10.96.0.10".parse().unwrap(),
            port: 80,
            service: ObjectRef {
                namespace: "default".into(),
                name: "web".into(),
            },
            protocol: AppProtocol::Http,
            routes: Some(RouteTable {
                matches,
                rules: (0..rules).map(rule).collect(),
            }),
        };
        let config = ProxyConfig {
            frontends: vec![f],
            ..Default::default()
        };
        Routes::compile(&config)
            .frontends
            .into_values()
            .next()
            .unwrap()
    }

    fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn which(f: &CompiledFrontend, r: &http::request::Parts) -> Option<u32> {
        match f.route(r) {
            Decision::Rule { rule, .. } => Some(rule.index),
            Decision::NoRoute => None,
            Decision::Service => panic!("table expected"),
        }
    }

    #[test]
    fn path_kinds() {
        let f = frontend(
            vec![
                m(PathMatch::Exact("/exact".into()), 0),
                m(PathMatch::RegularExpression("/v[0-9]+/.*".into()), 1),
                m(PathMatch::PathPrefix("/foo/".into()), 2),
            ],
            3,
        );
        let cases = [
            ("/exact", Some(0)),
            ("/exact/more", None),
            ("/v2/x", Some(1)),
            ("/xv2/x", None), // anchored
            ("/foo", Some(2)),
            ("/foo/bar", Some(2)),
            ("/foobar", None),
            ("/", None),
        ];
        for (path, want) in cases {
            assert_eq!(which(&f, &req("GET", path, &[])), want, "{path}");
        }
    }

    #[test]
    fn first_match_wins_and_conditions_all_hold() {
        let mut specific = m(PathMatch::PathPrefix("/".into()), 0);
        specific.headers = vec![HeaderMatch {
            name: "x-version".into(),
            value: StringMatch::Exact("v2".into()),
        }];
        specific.query_params = vec![HeaderMatch {
            name: "debug".into(),
            value: StringMatch::RegularExpression("1|true".into()),
        }];
        specific.method = Some("POST".into());
        let f = frontend(vec![specific, m(PathMatch::PathPrefix("/".into()), 1)], 2);
        // Header names case-insensitive.
        assert_eq!(
            which(
                &f,
                &req("POST", "/a?x=1&debug=true", &[("X-Version", "v2")])
            ),
            Some(0)
        );
        assert_eq!(
            which(&f, &req("GET", "/a?debug=true", &[("x-version", "v2")])),
            Some(1)
        );
        assert_eq!(
            which(&f, &req("POST", "/a?debug=no", &[("x-version", "v2")])),
            Some(1)
        );
        assert_eq!(
            which(&f, &req("POST", "/a?debug=1", &[("x-version", "v1")])),
            Some(1)
        );
        assert_eq!(
            which(&f, &req("POST", "/a?Debug=1", &[("x-version", "v2")])),
            Some(1)
        );
        // First value of a repeated parameter.
        assert_eq!(
            which(
                &f,
                &req("POST", "/a?debug=1&debug=x", &[("x-version", "v2")])
            ),
            Some(0)
        );
    }

    #[test]
    fn prefix_reported_and_root_prefix() {
        let f = frontend(
            vec![
                m(PathMatch::PathPrefix("/api/".into()), 0),
                m(PathMatch::PathPrefix("/".into()), 1),
            ],
            2,
        );
        let r = req("GET", "/api/x", &[]);
        assert!(matches!(
            f.route(&r),
            Decision::Rule {
                prefix: Some("/api"),
                ..
            }
        ));
        assert_eq!(which(&f, &req("GET", "/anything", &[])), Some(1));
    }

    #[test]
    fn bad_regex_never_matches() {
        let f = frontend(vec![m(PathMatch::RegularExpression("(".into()), 0)], 1);
        assert_eq!(which(&f, &req("GET", "/(", &[])), None);
    }

    #[test]
    fn no_routes_is_the_service_and_lookup_is_canonical() {
        let config = ProxyConfig {
            frontends: vec![Frontend {
                addr: "10.96.0.10".parse().unwrap(),
                port: 80,
                service: ObjectRef::default(),
                protocol: AppProtocol::Http,
                routes: None,
            }],
            ..Default::default()
        };
        let routes = Routes::compile(&config);
        let f = routes
            .frontend("[::ffff:10.96.0.10]:80".parse().unwrap())
            .unwrap();
        assert_eq!(f.route(&req("GET", "/", &[])), Decision::Service);
        assert!(routes.frontend("10.96.0.10:81".parse().unwrap()).is_none());
    }
}
