//! Retry budget and backoff.
//!
//! The budget is Finagle's and Linkerd's: over a sliding window, retries may add at most
//! `retry_budget_percent` % of the original requests, plus a floor of
//! `retry_budget_min_per_sec` per second so that a quiet Service can still retry. When a
//! backend fails, retries thus add a bounded share of load instead of multiplying it.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use mesh_common::l7::Resilience;
use rand::Rng;

/// The budget's sliding window (Finagle's and Linkerd's default TTL).
pub const WINDOW: Duration = Duration::from_secs(10);
/// The window is kept as this many buckets; it slides one bucket (1 s) at a time.
const BUCKETS: usize = 10;
const BUCKET: Duration = Duration::from_secs(1);

/// The longest backoff is this many times the base (the first retry's delay).
pub const BACKOFF_CAP_FACTOR: u32 = 10;

/// The retry budget of one Service port, shared by every request to it.
#[derive(Debug)]
pub struct RetryBudget {
    state: Mutex<Budget>,
}

#[derive(Debug)]
struct Budget {
    percent: u32,
    min_per_sec: u32,
    /// Origin of bucket numbering.
    start: Instant,
    /// Ring of buckets; `buckets[n % BUCKETS]` holds bucket number n when its `number`
    /// says so, anything else is stale and counts as empty.
    buckets: [Bucket; BUCKETS],
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    number: u64,
    deposits: u64,
    withdrawals: u64,
}

impl RetryBudget {
    /// An empty budget: only the per-second floor is available until requests arrive.
    pub fn new(cfg: &Resilience) -> Self {
        Self::new_at(cfg, Instant::now())
    }

    /// Takes new settings; the requests and retries already counted stay.
    pub fn update(&self, cfg: &Resilience) {
        let mut b = self.lock();
        b.percent = cfg.retry_budget_percent;
        b.min_per_sec = cfg.retry_budget_min_per_sec;
    }

    /// Counts one original request (not a retry).
    pub fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    /// Takes one retry from the budget; false when it is exhausted: do not retry.
    pub fn try_withdraw(&self) -> bool {
        self.try_withdraw_at(Instant::now())
    }

    fn new_at(cfg: &Resilience, now: Instant) -> Self {
        Self {
            state: Mutex::new(Budget {
                percent: cfg.retry_budget_percent,
                min_per_sec: cfg.retry_budget_min_per_sec,
                start: now,
                buckets: [Bucket::default(); BUCKETS],
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Budget> {
        // Counters only: a panic cannot leave them inconsistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn deposit_at(&self, now: Instant) {
        let mut b = self.lock();
        let bucket = b.current(now);
        bucket.deposits = bucket.deposits.saturating_add(1);
    }

    fn try_withdraw_at(&self, now: Instant) -> bool {
        let mut b = self.lock();
        let (deposits, withdrawals) = b.sums(now);
        // withdrawals + 1 <= deposits * percent / 100 + min_per_sec * window, in
        // integers (times 100).
        let allowed = u128::from(deposits) * u128::from(b.percent)
            + u128::from(b.min_per_sec) * u128::from(WINDOW.as_secs()) * 100;
        if (u128::from(withdrawals) + 1) * 100 > allowed {
            return false;
        }
        let bucket = b.current(now);
        bucket.withdrawals = bucket.withdrawals.saturating_add(1);
        true
    }
}

impl Budget {
    fn number_at(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.start);
        u64::try_from(elapsed.as_nanos() / BUCKET.as_nanos()).unwrap_or(u64::MAX)
    }

    /// The bucket for `now`, emptied first if it held an older one.
    fn current(&mut self, now: Instant) -> &mut Bucket {
        let number = self.number_at(now);
        let bucket = &mut self.buckets[(number % BUCKETS as u64) as usize];
        if bucket.number != number {
            *bucket = Bucket {
                number,
                ..Bucket::default()
            };
        }
        bucket
    }

    /// Deposits and withdrawals in the window ending at `now`.
    fn sums(&self, now: Instant) -> (u64, u64) {
        let number = self.number_at(now);
        self.buckets
            .iter()
            .filter(|b| b.number <= number && number - b.number < BUCKETS as u64)
            .fold((0, 0), |(d, w), b| {
                (
                    d.saturating_add(b.deposits),
                    w.saturating_add(b.withdrawals),
                )
            })
    }
}

/// The delay before retry number `retry` (1 for the first): `base * 2^(retry - 1)`,
/// capped at [`BACKOFF_CAP_FACTOR`] times `base`, with equal jitter (a uniformly random
/// value between half of that and all of it), so that clients that failed together do
/// not retry together, yet each still waits at least half its share. A zero base gives
/// zero; `retry` 0 counts as 1.
pub fn backoff(base: Duration, retry: u32) -> Duration {
    let exponent = retry.saturating_sub(1).min(31);
    let full = base
        .saturating_mul(1u32 << exponent)
        .min(base.saturating_mul(BACKOFF_CAP_FACTOR));
    let half = full / 2;
    let jitter_ns = u64::try_from((full - half).as_nanos()).unwrap_or(u64::MAX);
    half.saturating_add(Duration::from_nanos(
        rand::rng().random_range(0..=jitter_ns),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(percent: u32, min_per_sec: u32) -> Resilience {
        Resilience {
            retry_budget_percent: percent,
            retry_budget_min_per_sec: min_per_sec,
            ..Resilience::default()
        }
    }

    /// Deposits `requests` spread over `over` from `start`, each followed by a retry
    /// attempt; returns the retries allowed.
    fn run(budget: &RetryBudget, start: Instant, requests: u32, over: Duration) -> u32 {
        let mut allowed = 0;
        for i in 0..requests {
            let now = start + over * i / requests;
            budget.deposit_at(now);
            allowed += u32::from(budget.try_withdraw_at(now));
        }
        allowed
    }

    #[test]
    fn retries_are_bounded_by_the_percentage_plus_the_floor() {
        let t0 = Instant::now();
        let budget = RetryBudget::new_at(&cfg(20, 10), t0);
        // 20 % of 1000, plus 10 per second over the 10 s window.
        assert_eq!(run(&budget, t0, 1000, Duration::from_secs(1)), 200 + 100);
        // Nothing left in the window.
        assert!(!budget.try_withdraw_at(t0 + Duration::from_secs(2)));
    }

    #[test]
    fn the_floor_alone_allows_retries_without_requests() {
        let t0 = Instant::now();
        let budget = RetryBudget::new_at(&cfg(20, 3), t0);
        let allowed = (0..100).filter(|_| budget.try_withdraw_at(t0)).count();
        assert_eq!(allowed, 30);
    }

    #[test]
    fn a_zero_budget_allows_nothing() {
        let t0 = Instant::now();
        let budget = RetryBudget::new_at(&cfg(0, 0), t0);
        assert_eq!(run(&budget, t0, 1000, Duration::from_secs(5)), 0);
    }

    #[test]
    fn the_window_slides() {
        let t0 = Instant::now();
        let budget = RetryBudget::new_at(&cfg(20, 0), t0);
        assert_eq!(run(&budget, t0, 100, Duration::from_millis(500)), 20);
        // Still in the window: the 100 requests are spent.
        assert!(!budget.try_withdraw_at(t0 + Duration::from_millis(9_900)));
        // Five more requests earn one more retry.
        assert_eq!(
            run(&budget, t0 + Duration::from_secs(9), 5, Duration::ZERO),
            1
        );
        // Once the first second has left the window, its requests and retries have too:
        // only the five later requests count, and their retry is spent.
        let t10 = t0 + Duration::from_secs(10);
        assert!(!budget.try_withdraw_at(t10));
        // Ten seconds after those, nothing is left at all; new requests start over.
        let t19 = t0 + Duration::from_secs(19);
        assert_eq!(run(&budget, t19, 50, Duration::ZERO), 10);
    }

    #[test]
    fn update_changes_the_share_and_keeps_the_counts() {
        let t0 = Instant::now();
        let budget = RetryBudget::new_at(&cfg(10, 0), t0);
        assert_eq!(run(&budget, t0, 100, Duration::ZERO), 10);
        budget.update(&cfg(50, 0));
        // 100 requests at 50 % allow 50 retries, 10 of which were taken.
        let more = (0..100).filter(|_| budget.try_withdraw_at(t0)).count();
        assert_eq!(more, 40);
    }

    #[test]
    fn backoff_doubles_with_equal_jitter_and_is_capped() {
        let base = Duration::from_millis(100);
        for _ in 0..200 {
            for (retry, full_ms) in [(0, 100), (1, 100), (2, 200), (3, 400), (4, 800)] {
                let d = backoff(base, retry);
                let full = Duration::from_millis(full_ms);
                assert!(d >= full / 2 && d <= full, "retry {retry}: {d:?}");
            }
            for retry in [5, 6, 40, u32::MAX] {
                let d = backoff(base, retry);
                assert!(
                    d >= base * 5 && d <= base * BACKOFF_CAP_FACTOR,
                    "retry {retry}: {d:?}"
                );
            }
        }
    }

    #[test]
    fn the_budget_is_shared_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<RetryBudget>();
    }

    #[test]
    fn backoff_edges() {
        assert_eq!(backoff(Duration::ZERO, 1), Duration::ZERO);
        assert_eq!(backoff(Duration::ZERO, 30), Duration::ZERO);
        // Huge bases saturate instead of overflowing.
        let d = backoff(Duration::MAX, 3);
        assert!(d >= Duration::MAX / 2);
        // Jitter does vary.
        let base = Duration::from_secs(1);
        let distinct: std::collections::HashSet<Duration> =
            (0..20).map(|_| backoff(base, 2)).collect();
        assert!(distinct.len() > 1);
    }
}
