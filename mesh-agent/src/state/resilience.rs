//! A Service's resilience settings for the node proxy (circuit breaking, outlier
//! ejection, retry budget), read from its `mesh.io/*` annotations. One parser for both
//! validation (which reports every bad value) and the planner (which sees only valid
//! states, so gets no errors).

use std::collections::BTreeMap;

use mesh_common::l7::Resilience;

/// `mesh.io/max-connections`: [`Resilience::max_connections`], at least 1.
pub const MAX_CONNECTIONS: &str = "mesh.io/max-connections";
/// `mesh.io/max-pending-requests`: [`Resilience::max_pending_requests`].
pub const MAX_PENDING_REQUESTS: &str = "mesh.io/max-pending-requests";
/// `mesh.io/max-requests-per-connection`: [`Resilience::max_requests_per_connection`].
pub const MAX_REQUESTS_PER_CONNECTION: &str = "mesh.io/max-requests-per-connection";
/// `mesh.io/outlier-consecutive-5xx`: [`Resilience::consecutive_5xx`].
pub const OUTLIER_CONSECUTIVE_5XX: &str = "mesh.io/outlier-consecutive-5xx";
/// `mesh.io/outlier-consecutive-connect-failures`:
/// [`Resilience::consecutive_connect_failures`].
pub const OUTLIER_CONSECUTIVE_CONNECT_FAILURES: &str =
    "mesh.io/outlier-consecutive-connect-failures";
/// `mesh.io/outlier-base-ejection-time`: [`Resilience::base_ejection_ms`], a duration
/// such as `30s` or `500ms`.
pub const OUTLIER_BASE_EJECTION_TIME: &str = "mesh.io/outlier-base-ejection-time";
/// `mesh.io/outlier-max-ejection-percent`: [`Resilience::max_ejection_percent`], 0..=100.
pub const OUTLIER_MAX_EJECTION_PERCENT: &str = "mesh.io/outlier-max-ejection-percent";
/// `mesh.io/retry-budget-percent`: [`Resilience::retry_budget_percent`], 0..=1000.
pub const RETRY_BUDGET_PERCENT: &str = "mesh.io/retry-budget-percent";
/// `mesh.io/retry-budget-min-per-second`: [`Resilience::retry_budget_min_per_sec`].
pub const RETRY_BUDGET_MIN_PER_SECOND: &str = "mesh.io/retry-budget-min-per-second";

/// A bad annotation value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnnotationError {
    /// The annotation key.
    pub key: &'static str,
    /// What is wrong with its value.
    pub message: String,
}

/// The settings `annotations` give, on top of [`Resilience::default`], and the problems
/// of the values that could not be used (those settings keep their default).
pub fn resilience(
    annotations: Option<&BTreeMap<String, String>>,
) -> (Resilience, Vec<AnnotationError>) {
    let mut out = Resilience::default();
    let mut errors = Vec::new();
    let Some(annotations) = annotations else {
        return (out, errors);
    };
    let mut count = |key: &'static str, min: u32, max: u32, field: &mut u32| {
        if let Some(value) = annotations.get(key) {
            match parse_count(value, min, max) {
                Ok(n) => *field = n,
                Err(message) => errors.push(AnnotationError { key, message }),
            }
        }
    };
    count(MAX_CONNECTIONS, 1, u32::MAX, &mut out.max_connections);
    count(
        MAX_PENDING_REQUESTS,
        0,
        u32::MAX,
        &mut out.max_pending_requests,
    );
    count(
        MAX_REQUESTS_PER_CONNECTION,
        0,
        u32::MAX,
        &mut out.max_requests_per_connection,
    );
    count(
        OUTLIER_CONSECUTIVE_5XX,
        0,
        u32::MAX,
        &mut out.consecutive_5xx,
    );
    count(
        OUTLIER_CONSECUTIVE_CONNECT_FAILURES,
        0,
        u32::MAX,
        &mut out.consecutive_connect_failures,
    );
    count(
        OUTLIER_MAX_EJECTION_PERCENT,
        0,
        100,
        &mut out.max_ejection_percent,
    );
    count(RETRY_BUDGET_PERCENT, 0, 1000, &mut out.retry_budget_percent);
    count(
        RETRY_BUDGET_MIN_PER_SECOND,
        0,
        u32::MAX,
        &mut out.retry_budget_min_per_sec,
    );
    if let Some(value) = annotations.get(OUTLIER_BASE_EJECTION_TIME) {
        match parse_duration_ms(value) {
            Ok(ms) => out.base_ejection_ms = ms,
            Err(message) => errors.push(AnnotationError {
                key: OUTLIER_BASE_EJECTION_TIME,
                message,
            }),
        }
    }
    (out, errors)
}

/// A decimal integer in `min..=max`.
fn parse_count(value: &str, min: u32, max: u32) -> Result<u32, String> {
    let range = || {
        if max == u32::MAX {
            format!("at least {min}")
        } else {
            format!("{min} to {max}")
        }
    };
    // Digits only: u32's parser would also take a leading `+`.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{value:?} is not a whole number ({})", range()));
    }
    match value.parse::<u32>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("{value} is out of range ({})", range())),
    }
}

/// A positive duration: whole number and unit `ms`, `s`, `m` or `h` (`30s`, `500ms`),
/// in milliseconds.
fn parse_duration_ms(value: &str) -> Result<u64, String> {
    let bad = || format!("{value:?} is not a duration like 30s or 500ms (units ms, s, m, h)");
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .filter(|&i| i > 0)
        .ok_or_else(bad)?;
    let (number, unit) = value.split_at(split);
    let factor: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(bad()),
    };
    let ms = number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(factor))
        .ok_or_else(|| format!("{value:?} is too long"))?;
    if ms == 0 {
        return Err(format!("{value:?} must be more than 0"));
    }
    Ok(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn no_annotations_give_the_defaults() {
        assert_eq!(resilience(None), (Resilience::default(), Vec::new()));
        let other = annotations(&[("mesh.io/sockmap", "true")]);
        assert_eq!(
            resilience(Some(&other)),
            (Resilience::default(), Vec::new())
        );
    }

    #[test]
    fn every_annotation_sets_its_field() {
        let all = annotations(&[
            (MAX_CONNECTIONS, "10"),
            (MAX_PENDING_REQUESTS, "0"),
            (MAX_REQUESTS_PER_CONNECTION, "100"),
            (OUTLIER_CONSECUTIVE_5XX, "3"),
            (OUTLIER_CONSECUTIVE_CONNECT_FAILURES, "2"),
            (OUTLIER_BASE_EJECTION_TIME, "500ms"),
            (OUTLIER_MAX_EJECTION_PERCENT, "100"),
            (RETRY_BUDGET_PERCENT, "1000"),
            (RETRY_BUDGET_MIN_PER_SECOND, "0"),
        ]);
        let want = Resilience {
            max_connections: 10,
            max_pending_requests: 0,
            max_requests_per_connection: 100,
            consecutive_5xx: 3,
            consecutive_connect_failures: 2,
            base_ejection_ms: 500,
            max_ejection_percent: 100,
            retry_budget_percent: 1000,
            retry_budget_min_per_sec: 0,
        };
        assert_eq!(resilience(Some(&all)), (want, Vec::new()));
    }

    #[test]
    fn durations_take_whole_numbers_with_a_unit() {
        for (text, ms) in [
            ("30s", 30_000),
            ("500ms", 500),
            ("2m", 120_000),
            ("1h", 3_600_000),
        ] {
            assert_eq!(parse_duration_ms(text), Ok(ms), "{text}");
        }
        for bad in [
            "",
            "30",
            "s",
            "1.5s",
            "-1s",
            "0s",
            "30 s",
            "10d",
            "99999999999999999999h",
        ] {
            assert!(parse_duration_ms(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn bad_values_are_reported_and_keep_the_default() {
        let bad = annotations(&[
            (MAX_CONNECTIONS, "0"),
            (MAX_PENDING_REQUESTS, "-1"),
            (OUTLIER_MAX_EJECTION_PERCENT, "101"),
            (RETRY_BUDGET_PERCENT, "+5"),
            (RETRY_BUDGET_MIN_PER_SECOND, "4294967296"),
            (OUTLIER_BASE_EJECTION_TIME, "soon"),
        ]);
        let (settings, errors) = resilience(Some(&bad));
        assert_eq!(settings, Resilience::default());
        let keys: Vec<&str> = errors.iter().map(|e| e.key).collect();
        assert_eq!(
            keys,
            [
                MAX_CONNECTIONS,
                MAX_PENDING_REQUESTS,
                OUTLIER_MAX_EJECTION_PERCENT,
                RETRY_BUDGET_PERCENT,
                RETRY_BUDGET_MIN_PER_SECOND,
                OUTLIER_BASE_EJECTION_TIME,
            ]
        );
        assert_eq!(errors[0].message, "0 is out of range (at least 1)");
        assert_eq!(errors[2].message, "101 is out of range (0 to 100)");
    }

    #[test]
    fn validation_names_file_document_and_annotation() {
        let text = "
apiVersion: v1
kind: Service
metadata: {name: ok, namespace: shop, annotations: {mesh.io/max-connections: '5'}}
spec: {ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  annotations: {mesh.io/max-connections: 'many', mesh.io/outlier-base-ejection-time: '30'}
spec: {ports: [{port: 80}]}
";
        let Err(crate::state::StateError::Invalid(problems)) =
            crate::state::parse_str("s.yaml", text)
        else {
            panic!("bad annotations accepted");
        };
        let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                r#"s.yaml: document 2 (Service shop/web): metadata.annotations["mesh.io/max-connections"]: "many" is not a whole number (at least 1)"#,
                r#"s.yaml: document 2 (Service shop/web): metadata.annotations["mesh.io/outlier-base-ejection-time"]: "30" is not a duration like 30s or 500ms (units ms, s, m, h)"#,
            ]
        );
    }
}
