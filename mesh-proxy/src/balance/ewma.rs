//! Peak-EWMA latency estimate of one endpoint (Finagle's `PeakEwma`, tower's
//! `load::PeakEwma`): a response slower than the estimate replaces it at once, a faster
//! one pulls it down only as fast as the time constant allows, and an endpoint that
//! answers nothing decays toward zero, so an idle endpoint is tried again.

use std::time::{Duration, Instant};

/// An endpoint's latency estimate, in nanoseconds, and when it last changed.
#[derive(Debug, Clone, Copy)]
pub(super) struct PeakEwma {
    estimate_ns: f64,
    updated_at: Instant,
}

impl PeakEwma {
    /// A new endpoint's estimate: `default_rtt` until it answers.
    pub(super) fn new(default_rtt: Duration, now: Instant) -> Self {
        Self {
            estimate_ns: nanos(default_rtt),
            updated_at: now,
        }
    }

    /// Adds one observed latency at `now`; `decay` is the time constant. The old
    /// estimate keeps the weight `exp(-t / decay)`, t the time since the previous
    /// sample.
    pub(super) fn observe(&mut self, rtt: Duration, now: Instant, decay: Duration) {
        let rtt = nanos(rtt);
        self.estimate_ns = if rtt > self.estimate_ns {
            // Peak: the worst recent latency is the one to plan with.
            rtt
        } else {
            let w = self.weight_of_old(now, decay);
            self.estimate_ns * w + rtt * (1.0 - w)
        };
        self.updated_at = now;
    }

    /// The estimate at `now`: decayed toward zero for the time without a sample, as if
    /// that time had been a stream of instant answers, so that an endpoint that was
    /// avoided for being slow is tried again.
    ///
    /// Unlike tower and Finagle, reading does not store the decayed value: there, every
    /// comparison is a zero sample that restarts the clock, so on a busy balancer a
    /// real sample right after a comparison gets almost no weight. Here a sample's
    /// weight is the time since the previous sample, whatever was read in between.
    pub(super) fn current(&self, now: Instant, decay: Duration) -> f64 {
        self.estimate_ns * self.weight_of_old(now, decay)
    }

    /// `exp(-elapsed / decay)`: how much of the old estimate survives.
    fn weight_of_old(&self, now: Instant, decay: Duration) -> f64 {
        let elapsed = nanos(now.saturating_duration_since(self.updated_at));
        let tau = nanos(decay).max(1.0);
        (-elapsed / tau).exp()
    }
}

fn nanos(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAU: Duration = Duration::from_secs(10);

    #[test]
    fn starts_at_the_default() {
        let t0 = Instant::now();
        let e = PeakEwma::new(Duration::from_millis(30), t0);
        assert!((e.current(t0, TAU) - 30e6).abs() < 1.0);
    }

    #[test]
    fn a_peak_replaces_the_estimate_at_once() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(Duration::from_millis(30), t0);
        e.observe(
            Duration::from_millis(500),
            t0 + Duration::from_millis(1),
            TAU,
        );
        assert!((e.current(t0 + Duration::from_millis(1), TAU) - 500e6).abs() < 1.0);
    }

    #[test]
    fn a_fast_answer_pulls_the_estimate_down_with_the_time_constant() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(Duration::from_millis(100), t0);
        // One time constant later, 1/e of the old estimate is left (plus (1 - 1/e) of
        // the 10 ms sample).
        e.observe(Duration::from_millis(10), t0 + TAU, TAU);
        let want = 100e6 * (-1f64).exp() + 10e6 * (1.0 - (-1f64).exp());
        assert!((e.current(t0 + TAU, TAU) - want).abs() < 1e3);
        // A fast answer right after barely moves it.
        let before = e.current(t0 + TAU, TAU);
        e.observe(
            Duration::from_millis(1),
            t0 + TAU + Duration::from_millis(1),
            TAU,
        );
        let after = e.current(t0 + TAU + Duration::from_millis(1), TAU);
        assert!(after > before * 0.999, "before {before}, after {after}");
    }

    #[test]
    fn an_idle_estimate_decays_toward_zero() {
        let t0 = Instant::now();
        let e = PeakEwma::new(Duration::from_millis(100), t0);
        let later = e.current(t0 + Duration::from_secs(60), TAU);
        assert!(later < 1e6, "{later}");
    }
}
