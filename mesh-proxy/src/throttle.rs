//! Bounds the warnings refused peers cause: a client that retries a refused connection
//! in a loop, or garbage sent to a listener on purpose, must not flood the log (the
//! refusal counters count every one). One warning per reason and period passes; the
//! next one says how many were held back.

use std::{
    collections::HashMap,
    sync::{LazyLock, Mutex},
    time::{Duration, Instant},
};

/// How often one reason may warn.
pub const PERIOD: Duration = Duration::from_secs(1);

/// What is throttled: a kind of refusal (`hbone`, `plaintext`) and its reason.
type Key = (&'static str, &'static str);

/// The process's budget for refusal warnings.
static REFUSALS: LazyLock<Throttle> = LazyLock::new(Throttle::default);

/// Whether a warning for a refusal of `kind` for `reason` may be logged now (see
/// [`Throttle::allow`]).
pub fn refusal(kind: &'static str, reason: &'static str) -> Option<u64> {
    REFUSALS.allow((kind, reason), Instant::now())
}

/// Per-reason warning budget.
#[derive(Debug)]
pub struct Throttle {
    period: Duration,
    /// (kind, reason) → when it last warned, and how many were held back since.
    last: Mutex<HashMap<Key, (Instant, u64)>>,
}

impl Default for Throttle {
    fn default() -> Self {
        Self::new(PERIOD)
    }
}

impl Throttle {
    /// At most one warning per reason every `period`.
    pub fn new(period: Duration) -> Self {
        Self {
            period,
            last: Mutex::default(),
        }
    }

    /// Whether a warning for `reason` may be logged now; `Some(n)` says so, `n` being
    /// how many were held back since the last one.
    pub fn allow(&self, reason: Key, now: Instant) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match last.get_mut(&reason) {
            Some((at, held)) if now.duration_since(*at) < self.period => {
                *held += 1;
                None
            }
            Some((at, held)) => {
                let suppressed = std::mem::take(held);
                *at = now;
                Some(suppressed)
            }
            None => {
                last.insert(reason, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_warning_per_reason_and_period_then_the_count_held_back() {
        let t = Throttle::new(Duration::from_secs(1));
        let start = Instant::now();
        let key = ("hbone", "handshake");
        assert_eq!(t.allow(key, start), Some(0));
        for i in 1..=5 {
            assert_eq!(t.allow(key, start + Duration::from_millis(i * 100)), None);
        }
        assert_eq!(
            t.allow(("hbone", "authorization"), start),
            Some(0),
            "reasons are apart"
        );
        assert_eq!(
            t.allow(("plaintext", "handshake"), start),
            Some(0),
            "kinds are apart"
        );
        assert_eq!(t.allow(key, start + Duration::from_secs(1)), Some(5));
        assert_eq!(t.allow(key, start + Duration::from_secs(3)), Some(0));
    }
}
