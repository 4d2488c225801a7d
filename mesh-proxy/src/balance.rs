//! Endpoint choice for one Service port: power of two choices (P2C) over a peak-EWMA
//! latency estimate weighted by outstanding requests, as Linkerd and Finagle balance,
//! with Envoy-style outlier ejection.
//!
//! The cost of an endpoint is `latency estimate * (requests in flight + 1)`. Each pick
//! draws two distinct endpoints at random among those not ejected and takes the cheaper
//! one: nearly as good as the least loaded of all without comparing them all, and without the herd
//! a strict "least loaded" causes when many requests decide on the same stale view.

mod ewma;
mod outlier;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use mesh_common::l7::{Endpoint, Resilience};
use rand::Rng;

use ewma::PeakEwma;
use outlier::{Observation, Outlier};

/// The estimate of an endpoint that has not answered yet (Linkerd's default RTT).
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// The peak-EWMA time constant: after this long, a lower latency has replaced
/// 1 - 1/e of the old estimate (Linkerd's and Finagle's default).
pub const DECAY: Duration = Duration::from_secs(10);

/// The endpoints of one Service port with their load and health. Shared by every
/// request to it (interior lock, held only for a pick's or outcome's arithmetic).
#[derive(Debug)]
pub struct Balancer {
    shared: Arc<Mutex<Shared>>,
}

#[derive(Debug)]
struct Shared {
    cfg: Resilience,
    slots: Vec<Slot>,
    /// Identifies slots across [`Balancer::update`], so an outcome never lands on a
    /// different endpoint that took a removed one's place.
    next_id: u64,
}

#[derive(Debug)]
struct Slot {
    id: u64,
    endpoint: Endpoint,
    ewma: PeakEwma,
    in_flight: u32,
    outlier: Outlier,
}

/// An endpoint chosen for one request. It counts as in flight until it is finished or
/// dropped; dropping it without [`Pick::finish`] means the request was cancelled: no
/// latency sample, no effect on outlier detection.
#[derive(Debug)]
pub struct Pick {
    /// Where to send the request.
    pub endpoint: Endpoint,
    in_flight: InFlight,
}

/// How a request to a picked endpoint ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered: its status (5xx count toward ejection) and the time from
    /// sending the request to the response headers.
    Response {
        /// HTTP status.
        status: u16,
        /// Request sent to response headers received.
        latency: Duration,
    },
    /// No connection could be made.
    ConnectFailure,
    /// The connection was reset or closed before a response.
    Reset,
}

/// An endpoint that an outcome ejected, for the metric and the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ejection {
    /// The ejected endpoint.
    pub endpoint: Endpoint,
    /// How long it stays ejected.
    pub duration: Duration,
}

impl Balancer {
    /// A balancer over `endpoints` (duplicates by address and port are ignored).
    pub fn new(endpoints: &[Endpoint], cfg: &Resilience) -> Self {
        let balancer = Self {
            shared: Arc::new(Mutex::new(Shared {
                cfg: *cfg,
                slots: Vec::new(),
                next_id: 0,
            })),
        };
        balancer.update_at(endpoints, cfg, Instant::now());
        balancer
    }

    /// Replaces the endpoint set and settings. Endpoints that stay keep their latency
    /// estimate, requests in flight and outlier state; new ones start at
    /// [`DEFAULT_RTT`]; requests in flight to removed ones finish without effect.
    pub fn update(&self, endpoints: &[Endpoint], cfg: &Resilience) {
        self.update_at(endpoints, cfg, Instant::now());
    }

    /// Chooses an endpoint; `None` when there is none or every one is ejected.
    pub fn pick(&self) -> Option<Pick> {
        self.pick_except(&[])
    }

    /// As [`Balancer::pick`], never choosing an endpoint in `skip`: those NetworkPolicy
    /// refused to this request's client pod. The refusal says nothing about the
    /// endpoint's health, so it is not recorded; it only steers this one request.
    pub fn pick_except(&self, skip: &[SocketAddr]) -> Option<Pick> {
        self.pick_at(Instant::now(), &mut rand::rng(), skip)
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        lock(&self.shared)
    }

    fn update_at(&self, endpoints: &[Endpoint], cfg: &Resilience, now: Instant) {
        let mut shared = self.lock();
        let shared = &mut *shared;
        shared.cfg = *cfg;
        let mut old: HashMap<(IpAddr, u16), Slot> = std::mem::take(&mut shared.slots)
            .into_iter()
            .map(|slot| (key_of(&slot.endpoint), slot))
            .collect();
        let mut seen = HashSet::with_capacity(endpoints.len());
        for endpoint in endpoints {
            let key = key_of(endpoint);
            if !seen.insert(key) {
                continue;
            }
            let slot = match old.remove(&key) {
                Some(mut slot) => {
                    slot.endpoint = endpoint.clone();
                    slot
                }
                None => {
                    shared.next_id += 1;
                    Slot {
                        id: shared.next_id,
                        endpoint: endpoint.clone(),
                        ewma: PeakEwma::new(DEFAULT_RTT, now),
                        in_flight: 0,
                        outlier: Outlier::default(),
                    }
                }
            };
            shared.slots.push(slot);
        }
    }

    fn pick_at(&self, now: Instant, rng: &mut impl Rng, skip: &[SocketAddr]) -> Option<Pick> {
        let mut shared = self.lock();
        let mut available = 0;
        for slot in &mut shared.slots {
            slot.outlier.recover(now);
            available += usize::from(usable(slot, skip));
        }
        let chosen = match available {
            0 => return None,
            1 => shared.nth_available(0, skip),
            len => {
                // Two distinct draws: the second is drawn from the others.
                let a = rng.random_range(0..len);
                let mut b = rng.random_range(0..len - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (shared.nth_available(a, skip), shared.nth_available(b, skip));
                if shared.cost(b, now) < shared.cost(a, now) {
                    b
                } else {
                    a
                }
            }
        };
        Some(shared.take(chosen, &self.shared))
    }
}

/// Whether `slot` may take a request: not ejected, and not skipped by the caller.
fn usable(slot: &Slot, skip: &[SocketAddr]) -> bool {
    !slot.outlier.is_ejected()
        && !skip.contains(&SocketAddr::new(slot.endpoint.addr, slot.endpoint.port))
}

impl Shared {
    /// The slot index of the `n`-th endpoint that is [`usable`] (there must be one).
    fn nth_available(&self, n: usize, skip: &[SocketAddr]) -> usize {
        if skip.is_empty() && self.slots.iter().all(|s| !s.outlier.is_ejected()) {
            return n;
        }
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| usable(s, skip))
            .nth(n)
            .map(|(i, _)| i)
            .expect("n is below the number of endpoints not ejected")
    }

    fn cost(&self, index: usize, now: Instant) -> f64 {
        let slot = &self.slots[index];
        slot.ewma.current(now, DECAY) * f64::from(slot.in_flight.saturating_add(1))
    }

    /// Hands out slot `index` for one request.
    fn take(&mut self, index: usize, shared: &Arc<Mutex<Shared>>) -> Pick {
        let slot = &mut self.slots[index];
        slot.in_flight += 1;
        Pick {
            endpoint: slot.endpoint.clone(),
            in_flight: InFlight {
                shared: Arc::clone(shared),
                id: slot.id,
                released: false,
            },
        }
    }

    /// Applies an outcome to slot `id` (if it is still there) and releases its
    /// in-flight count.
    fn finish(&mut self, id: u64, outcome: Outcome, now: Instant) -> Option<Ejection> {
        let index = self.slots.iter().position(|s| s.id == id)?;
        let cfg = self.cfg;
        let slot = &mut self.slots[index];
        slot.in_flight = slot.in_flight.saturating_sub(1);
        slot.outlier.recover(now);
        let observation = match outcome {
            Outcome::Response { status, latency } => {
                // Failures carry no latency sample: how fast a connection is refused
                // says nothing about how fast the endpoint serves.
                slot.ewma.observe(latency, now, DECAY);
                if (500..600).contains(&status) {
                    Observation::ServerError
                } else {
                    Observation::Success
                }
            }
            Outcome::ConnectFailure | Outcome::Reset => Observation::ConnectionFailure,
        };
        if !slot.outlier.observe(observation, &cfg) {
            return None;
        }
        let mut ejected = 0;
        for s in &mut self.slots {
            s.outlier.recover(now);
            ejected += usize::from(s.outlier.is_ejected());
        }
        if !outlier::may_eject(ejected, self.slots.len(), cfg.max_ejection_percent) {
            return None;
        }
        let slot = &mut self.slots[index];
        let duration = slot
            .outlier
            .eject(now, Duration::from_millis(cfg.base_ejection_ms));
        tracing::info!(
            component = "balance",
            endpoint = %slot.endpoint.addr,
            port = slot.endpoint.port,
            ejection_ms = duration.as_millis() as u64,
            "endpoint ejected"
        );
        Some(Ejection {
            endpoint: slot.endpoint.clone(),
            duration,
        })
    }
}

impl Pick {
    /// Records how the request ended and releases the endpoint.
    pub fn finish(self, outcome: Outcome) {
        // The caller that wants the ejection uses `finish_report`.
        let _ejection = self.finish_report(outcome);
    }

    /// As [`Pick::finish`], and returns the ejection this outcome caused, if any (for
    /// `ProxyMetrics::record_ejection`).
    pub fn finish_report(self, outcome: Outcome) -> Option<Ejection> {
        self.finish_at(outcome, Instant::now())
    }

    fn finish_at(mut self, outcome: Outcome, now: Instant) -> Option<Ejection> {
        self.in_flight.released = true;
        lock(&self.in_flight.shared).finish(self.in_flight.id, outcome, now)
    }
}

/// The in-flight count a [`Pick`] holds, released on drop unless its outcome was
/// recorded (which releases it too).
#[derive(Debug)]
struct InFlight {
    shared: Arc<Mutex<Shared>>,
    id: u64,
    released: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let mut shared = lock(&self.shared);
        if let Some(slot) = shared.slots.iter_mut().find(|s| s.id == self.id) {
            slot.in_flight = slot.in_flight.saturating_sub(1);
        }
    }
}

fn key_of(endpoint: &Endpoint) -> (IpAddr, u16) {
    (endpoint.addr, endpoint.port)
}

/// The state stays consistent at every step a panic could interrupt, so a poisoned lock
/// is still usable.
fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}
