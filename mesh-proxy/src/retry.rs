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
    half + Duration::from_nanos(rand::rng().random_range(0..=jitter_ns))
}
