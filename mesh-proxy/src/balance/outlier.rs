//! Outlier detection of one endpoint, as Envoy's consecutive-5xx and consecutive
//! connect-failure detectors: a streak of failures ejects the endpoint for a time that
//! grows with every ejection, a success ends the streak, and the endpoint returns by
//! itself when its time is up.

use std::time::{Duration, Instant};

use mesh_common::l7::Resilience;

/// The longest ejection is this many times `base_ejection_ms` (Envoy caps it with
/// `max_ejection_time`, 300 s by default; ten times our 30 s default is the same).
pub(super) const MAX_EJECTION_MULTIPLIER: u32 = 10;

/// The failure streaks and ejection state of one endpoint.
#[derive(Debug, Clone, Default)]
pub(super) struct Outlier {
    consecutive_5xx: u32,
    consecutive_failures: u32,
    ejected_until: Option<Instant>,
    /// The multiplier of the next ejection's time, minus one.
    times_ejected: u32,
    /// When the last ejection ended: time spent healthy since then lowers the
    /// multiplier again, one step per base ejection time (Envoy decrements it per
    /// healthy detection interval).
    returned_at: Option<Instant>,
}

/// What a request's outcome means for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Observation {
    /// A response that is not 5xx.
    Success,
    /// A 5xx response: the connection worked, the endpoint failed.
    ServerError,
    /// A connect failure or a reset.
    ConnectionFailure,
}

impl Outlier {
    /// Whether the endpoint is ejected (call [`Self::recover`] first).
    pub(super) fn is_ejected(&self) -> bool {
        self.ejected_until.is_some()
    }

    /// Ends an ejection whose time is up; true when one ended.
    pub(super) fn recover(&mut self, now: Instant) -> bool {
        match self.ejected_until {
            Some(until) if until <= now => {
                self.ejected_until = None;
                self.returned_at = Some(now);
                true
            }
            _ => false,
        }
    }

    /// Counts `observation`; true when a streak reached its threshold (a threshold of 0
    /// never does). An endpoint already ejected counts nothing: requests picked before
    /// its ejection finish without prolonging it.
    pub(super) fn observe(&mut self, observation: Observation, cfg: &Resilience) -> bool {
        if self.is_ejected() {
            return false;
        }
        match observation {
            Observation::Success => {
                self.consecutive_5xx = 0;
                self.consecutive_failures = 0;
                false
            }
            Observation::ServerError => {
                // The connection worked, so a connect-failure streak is over.
                self.consecutive_failures = 0;
                self.consecutive_5xx = self.consecutive_5xx.saturating_add(1);
                // `>=`, not Envoy's `==`: an endpoint that reached the threshold while
                // the ejection cap was full is ejected by its next failure once there
                // is room.
                cfg.consecutive_5xx != 0 && self.consecutive_5xx >= cfg.consecutive_5xx
            }
            Observation::ConnectionFailure => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                cfg.consecutive_connect_failures != 0
                    && self.consecutive_failures >= cfg.consecutive_connect_failures
            }
        }
    }

    /// Ejects the endpoint at `now`, for `base * n` where n counts its ejections (less
    /// one per base time spent healthy since the last), at most
    /// [`MAX_EJECTION_MULTIPLIER`]; returns the ejection time.
    pub(super) fn eject(&mut self, now: Instant, base: Duration) -> Duration {
        if let Some(returned_at) = self.returned_at {
            let healthy = now.saturating_duration_since(returned_at);
            let periods = if base.is_zero() {
                u128::from(u32::MAX)
            } else {
                healthy.as_nanos() / base.as_nanos()
            };
            let periods = u32::try_from(periods).unwrap_or(u32::MAX);
            self.times_ejected = self.times_ejected.saturating_sub(periods);
        }
        self.times_ejected = (self.times_ejected + 1).min(MAX_EJECTION_MULTIPLIER);
        let duration = base.saturating_mul(self.times_ejected);
        self.ejected_until = Some(now + duration);
        self.consecutive_5xx = 0;
        self.consecutive_failures = 0;
        duration
    }
}

/// The cap on ejections: one more endpoint may be ejected when the share ejected then
/// is at most `max_percent` (with 50 %, one of two endpoints, one of three, but never
/// the single endpoint of a Service: the default cannot empty a Service, whose requests
/// would all fail then, even those the endpoint could answer; 0 % ejects none).
pub(super) fn may_eject(ejected: usize, total: usize, max_percent: u32) -> bool {
    (ejected as u128 + 1) * 100 <= u128::from(max_percent) * (total as u128)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(c5xx: u32, connect: u32) -> Resilience {
        Resilience {
            consecutive_5xx: c5xx,
            consecutive_connect_failures: connect,
            ..Resilience::default()
        }
    }

    #[test]
    fn a_streak_of_5xx_reaches_the_threshold_and_a_success_ends_it() {
        let cfg = cfg(3, 3);
        let mut o = Outlier::default();
        assert!(!o.observe(Observation::ServerError, &cfg));
        assert!(!o.observe(Observation::ServerError, &cfg));
        assert!(!o.observe(Observation::Success, &cfg));
        assert!(!o.observe(Observation::ServerError, &cfg));
        assert!(!o.observe(Observation::ServerError, &cfg));
        assert!(o.observe(Observation::ServerError, &cfg));
    }

    #[test]
    fn connect_failures_count_separately_and_a_5xx_ends_their_streak() {
        let cfg = cfg(0, 2);
        let mut o = Outlier::default();
        assert!(!o.observe(Observation::ConnectionFailure, &cfg));
        assert!(!o.observe(Observation::ServerError, &cfg));
        assert!(!o.observe(Observation::ConnectionFailure, &cfg));
        assert!(o.observe(Observation::ConnectionFailure, &cfg));
        // consecutive_5xx = 0 disables that detector.
        let mut o = Outlier::default();
        for _ in 0..100 {
            assert!(!o.observe(Observation::ServerError, &cfg));
        }
    }

    #[test]
    fn ejection_time_grows_is_capped_and_shrinks_while_healthy() {
        let base = Duration::from_secs(30);
        let t0 = Instant::now();
        let mut o = Outlier::default();
        let mut now = t0;
        for n in 1..=12u32 {
            let d = o.eject(now, base);
            assert_eq!(d, base * n.min(MAX_EJECTION_MULTIPLIER));
            assert!(o.is_ejected());
            assert!(!o.recover(now + d - Duration::from_millis(1)));
            now += d;
            assert!(o.recover(now));
            assert!(!o.is_ejected());
        }
        // Three base periods healthy: the next ejection is 10 - 3 + 1 = 8 times base.
        assert_eq!(o.eject(now + base * 3, base), base * 8);
    }

    #[test]
    fn the_cap_is_the_share_ejected_after_the_ejection() {
        assert!(!may_eject(0, 1, 50), "a single endpoint stays");
        assert!(may_eject(0, 1, 100));
        assert!(may_eject(0, 2, 50));
        assert!(!may_eject(1, 2, 50));
        assert!(may_eject(0, 3, 50));
        assert!(!may_eject(1, 3, 50));
        assert!(!may_eject(0, 5, 0));
        assert!(may_eject(4, 5, 100));
        assert!(!may_eject(5, 5, 100));
    }
}
