//! Scenarios on a controlled clock and a seeded random source.

use std::net::{IpAddr, Ipv4Addr};

use rand::SeedableRng;
use rand::rngs::StdRng;

use super::*;

fn ep(port: u16) -> Endpoint {
    Endpoint {
        addr: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
        port,
        pod: None,
        workload: "unknown".to_owned(),
    }
}

fn eps(ports: &[u16]) -> Vec<Endpoint> {
    ports.iter().copied().map(ep).collect()
}

fn ok(ms: u64) -> Outcome {
    Outcome::Response {
        status: 200,
        latency: Duration::from_millis(ms),
    }
}

fn err5xx() -> Outcome {
    Outcome::Response {
        status: 503,
        latency: Duration::from_millis(1),
    }
}

fn cfg(consecutive: u32, base_ms: u64, max_percent: u32) -> Resilience {
    Resilience {
        consecutive_5xx: consecutive,
        consecutive_connect_failures: consecutive,
        base_ejection_ms: base_ms,
        max_ejection_percent: max_percent,
        ..Resilience::default()
    }
}

struct Bench {
    balancer: Balancer,
    rng: StdRng,
    now: Instant,
}

impl Bench {
    fn new(ports: &[u16], cfg: &Resilience) -> Self {
        let now = Instant::now();
        let balancer = Balancer::new(&[], cfg);
        balancer.update_at(&eps(ports), cfg, now);
        Self {
            balancer,
            rng: StdRng::seed_from_u64(7),
            now,
        }
    }

    fn pick(&mut self) -> Option<Pick> {
        self.balancer.pick_at(self.now, &mut self.rng, &[])
    }

    /// Hands out `port` as if P2C had chosen it, for tests of outcomes.
    fn take(&self, port: u16) -> Pick {
        let mut shared = self.balancer.lock();
        let index = shared
            .slots
            .iter()
            .position(|s| s.endpoint.port == port)
            .expect("endpoint present");
        shared.take(index, &self.balancer.shared)
    }

    fn finish(&self, pick: Pick, outcome: Outcome) -> Option<Ejection> {
        pick.finish_at(outcome, self.now)
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    fn in_flight(&self, port: u16) -> u32 {
        self.slot(port, |s| s.in_flight)
    }

    fn estimate_ms(&self, port: u16) -> f64 {
        self.slot(port, |s| s.ewma.current(self.now, DECAY) / 1e6)
    }

    fn ejected(&self, port: u16) -> bool {
        self.slot(port, |s| s.outlier.is_ejected())
    }

    fn slot<T>(&self, port: u16, f: impl FnOnce(&Slot) -> T) -> T {
        let shared = self.balancer.lock();
        f(shared
            .slots
            .iter()
            .find(|s| s.endpoint.port == port)
            .expect("endpoint present"))
    }
}

#[test]
fn no_endpoint_no_pick() {
    let b = Balancer::new(&[], &Resilience::default());
    assert!(b.pick().is_none());
}

#[test]
fn the_public_clock_works_end_to_end() {
    let b = Balancer::new(&eps(&[1, 2]), &Resilience::default());
    let pick = b.pick().expect("two endpoints");
    assert!([1, 2].contains(&pick.endpoint.port));
    assert_eq!(pick.finish_report(ok(5)), None);
}

#[test]
fn p2c_starves_a_slow_endpoint() {
    let mut bench = Bench::new(&[1, 2, 3, 4, 5], &Resilience::default());
    let mut slow = 0;
    for _ in 0..1000 {
        let pick = bench.pick().expect("endpoints");
        let port = pick.endpoint.port;
        let latency = if port == 1 { 250 } else { 10 };
        slow += usize::from(port == 1);
        bench.advance(Duration::from_millis(1));
        bench.finish(pick, ok(latency));
    }
    assert!(slow < 200, "slow endpoint got {slow} of 1000 picks");
    // With P2C, the slow one is only taken when drawn with... nobody: never, once its
    // estimate is known and the others stay fast.
    assert!(slow < 50, "slow endpoint got {slow} of 1000 picks");
}

#[test]
fn p2c_spreads_requests_in_flight() {
    let mut bench = Bench::new(&[1, 2], &Resilience::default());
    let picks: Vec<Pick> = (0..10).map(|_| bench.pick().expect("endpoints")).collect();
    // Equal estimates: each outstanding request raises its endpoint's cost, so two
    // endpoints always both being candidates share them evenly.
    assert_eq!(bench.in_flight(1), 5);
    assert_eq!(bench.in_flight(2), 5);
    let (ones, _twos): (Vec<Pick>, Vec<Pick>) =
        picks.into_iter().partition(|p| p.endpoint.port == 1);
    for pick in ones {
        bench.finish(pick, ok(30));
    }
    assert_eq!(bench.in_flight(1), 0);
    assert_eq!(bench.in_flight(2), 5);
    // Endpoint 2 now costs 6x: the next five picks all go to 1.
    let next: Vec<Pick> = (0..5).map(|_| bench.pick().expect("endpoints")).collect();
    assert!(next.iter().all(|p| p.endpoint.port == 1));
}

#[test]
fn dropping_a_pick_cancels_it_without_stats() {
    let mut bench = Bench::new(&[1], &cfg(1, 1000, 100));
    let before = bench.estimate_ms(1);
    let pick = bench.pick().expect("endpoint");
    assert_eq!(bench.in_flight(1), 1);
    drop(pick);
    assert_eq!(bench.in_flight(1), 0);
    assert!((bench.estimate_ms(1) - before).abs() < 1e-6);
    // A 5xx streak of 1 would have ejected it; a cancel does not count.
    assert!(!bench.ejected(1));
    assert!(bench.pick().is_some());
}

#[test]
fn one_slow_answer_raises_the_estimate_at_once() {
    let mut bench = Bench::new(&[1, 2], &Resilience::default());
    for _ in 0..20 {
        let pick = bench.take(1);
        bench.finish(pick, ok(5));
        let pick = bench.take(2);
        bench.finish(pick, ok(20));
        bench.advance(Duration::from_millis(100));
    }
    assert!(bench.estimate_ms(1) < bench.estimate_ms(2));
    let pick = bench.take(1);
    bench.finish(pick, ok(800));
    assert!((bench.estimate_ms(1) - 800.0).abs() < 1.0);
    // Endpoint 1 now loses every comparison, even with 3 requests waiting on 2.
    let held: Vec<Pick> = (0..3).map(|_| bench.pick().expect("endpoints")).collect();
    assert!(held.iter().all(|p| p.endpoint.port == 2));
}

#[test]
fn consecutive_5xx_eject_and_the_endpoint_returns_after_its_time() {
    let mut bench = Bench::new(&[1, 2], &cfg(3, 1000, 50));
    for i in 0..3 {
        let pick = bench.take(1);
        let ejection = bench.finish(pick, err5xx());
        assert_eq!(ejection.is_some(), i == 2, "after {} 5xx", i + 1);
        if let Some(ejection) = ejection {
            assert_eq!(ejection.endpoint.port, 1);
            assert_eq!(ejection.duration, Duration::from_millis(1000));
        }
    }
    assert!(bench.ejected(1));
    for _ in 0..50 {
        assert_eq!(bench.pick().expect("endpoint 2").endpoint.port, 2);
    }
    bench.advance(Duration::from_millis(999));
    assert_eq!(bench.pick().expect("endpoint 2").endpoint.port, 2);
    bench.advance(Duration::from_millis(1));
    // Recovered (a pick sees it), with a clean streak: two 5xx do not eject it again.
    drop(bench.pick());
    assert!(!bench.ejected(1));
    let pick = bench.take(1);
    bench.finish(pick, err5xx());
    let pick = bench.take(1);
    assert_eq!(bench.finish(pick, err5xx()), None);
    // The third does, for twice the base time.
    let pick = bench.take(1);
    let ejection = bench.finish(pick, err5xx()).expect("ejected again");
    assert_eq!(ejection.duration, Duration::from_millis(2000));
}

#[test]
fn a_success_resets_the_streak() {
    let bench = Bench::new(&[1, 2], &cfg(2, 1000, 50));
    for _ in 0..10 {
        let pick = bench.take(1);
        assert_eq!(bench.finish(pick, err5xx()), None);
        let pick = bench.take(1);
        assert_eq!(bench.finish(pick, ok(1)), None);
    }
    assert!(!bench.ejected(1));
}

#[test]
fn connect_failures_and_resets_eject() {
    let bench = Bench::new(&[1, 2], &cfg(2, 1000, 50));
    let pick = bench.take(2);
    assert_eq!(bench.finish(pick, Outcome::ConnectFailure), None);
    let pick = bench.take(2);
    assert!(bench.finish(pick, Outcome::Reset).is_some());
    assert!(bench.ejected(2));
}

#[test]
fn ejections_stop_at_the_max_percent() {
    let mut bench = Bench::new(&[1, 2, 3, 4], &cfg(1, 1000, 50));
    for port in [1, 2] {
        let pick = bench.take(port);
        assert!(bench.finish(pick, err5xx()).is_some(), "port {port}");
    }
    // Half are out: endpoint 3 keeps serving despite its 5xx.
    for _ in 0..5 {
        let pick = bench.take(3);
        assert_eq!(bench.finish(pick, err5xx()), None);
    }
    assert!(!bench.ejected(3));
    // Once 1 and 2 return, the next 5xx of 3 ejects it.
    bench.advance(Duration::from_millis(1000));
    let pick = bench.take(3);
    assert!(bench.finish(pick, err5xx()).is_some());
}

#[test]
fn every_endpoint_ejected_gives_no_pick() {
    let mut bench = Bench::new(&[1, 2], &cfg(1, 1000, 100));
    for port in [1, 2] {
        let pick = bench.take(port);
        assert!(bench.finish(pick, Outcome::ConnectFailure).is_some());
    }
    assert!(bench.pick().is_none());
    bench.advance(Duration::from_millis(1000));
    assert!(bench.pick().is_some());
}

#[test]
fn a_zero_threshold_never_ejects() {
    let bench = Bench::new(&[1, 2], &cfg(0, 1000, 100));
    for _ in 0..20 {
        let pick = bench.take(1);
        assert_eq!(bench.finish(pick, err5xx()), None);
        let pick = bench.take(1);
        assert_eq!(bench.finish(pick, Outcome::ConnectFailure), None);
    }
}

#[test]
fn update_keeps_the_state_of_endpoints_that_stay() {
    let c = cfg(2, 1000, 100);
    let bench = Bench::new(&[1, 2], &c);
    let slow = bench.take(1);
    bench.finish(slow, ok(400));
    let held = bench.take(1);
    let gone = bench.take(2);
    let streak = bench.take(1);
    bench.finish(streak, err5xx());

    bench.balancer.update_at(&eps(&[3, 1]), &c, bench.now);
    assert!((bench.estimate_ms(1) - 400.0).abs() < 1.0);
    assert_eq!(bench.in_flight(1), 1);
    assert!((bench.estimate_ms(3) - 30.0).abs() < 1.0);
    // The request in flight to the removed endpoint finishes without effect.
    assert_eq!(bench.finish(gone, err5xx()), None);
    // Endpoint 1's 5xx streak survived: one more ejects it.
    assert!(bench.finish(held, err5xx()).is_some());
    // A removed endpoint that comes back starts afresh.
    bench.balancer.update_at(&eps(&[1, 2, 3]), &c, bench.now);
    assert!((bench.estimate_ms(2) - 30.0).abs() < 1.0);
    assert_eq!(bench.in_flight(2), 0);
}

#[test]
fn duplicate_endpoints_count_once() {
    let bench = Bench::new(&[1, 1, 2], &Resilience::default());
    assert_eq!(bench.balancer.lock().slots.len(), 2);
}

#[test]
fn an_avoided_endpoint_is_tried_again_once_its_estimate_decays() {
    let mut bench = Bench::new(&[1, 2], &Resilience::default());
    let pick = bench.take(1);
    bench.finish(pick, ok(1000));
    let mut first_retry = None;
    for step in 0..600u32 {
        bench.advance(Duration::from_millis(100));
        let pick = bench.pick().expect("endpoints");
        if pick.endpoint.port == 1 {
            first_retry = Some(step);
            break;
        }
        bench.finish(pick, ok(10));
    }
    // 1000 ms * exp(-t / 10 s) falls below 10 ms after about 46 s.
    let step = first_retry.expect("endpoint 1 tried again within 60 s");
    assert!((400..=500).contains(&step), "retried at step {step}");
}

#[test]
fn picks_skip_ejected_endpoints_wherever_they_sit() {
    let mut bench = Bench::new(&[1, 2, 3, 4, 5], &cfg(1, 1000, 100));
    for port in [1, 3, 5] {
        let pick = bench.take(port);
        assert!(bench.finish(pick, err5xx()).is_some());
    }
    let mut seen = HashSet::new();
    for _ in 0..200 {
        let pick = bench.pick().expect("2 and 4 remain");
        seen.insert(pick.endpoint.port);
        bench.finish(pick, ok(30));
    }
    assert_eq!(seen, HashSet::from([2, 4]));
}

#[test]
fn shared_types_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Balancer>();
    send_sync::<Pick>();
}

#[test]
fn concurrent_picks_release_every_in_flight_count() {
    let balancer = Arc::new(Balancer::new(&eps(&[1, 2, 3]), &Resilience::default()));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let balancer = Arc::clone(&balancer);
            std::thread::spawn(move || {
                for i in 0..500u64 {
                    let pick = balancer.pick().expect("endpoints");
                    if (i + t) % 3 == 0 {
                        drop(pick);
                    } else {
                        pick.finish(ok(i % 7));
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("no panic");
    }
    let shared = balancer.lock();
    assert!(shared.slots.iter().all(|s| s.in_flight == 0));
}

#[test]
fn skipped_endpoints_are_never_picked_and_leave_no_trace() {
    let mut b = Bench::new(&[1, 2, 3], &cfg(1, 1000, 100));
    let skip = [
        SocketAddr::new(ep(1).addr, 1),
        SocketAddr::new(ep(2).addr, 2),
    ];
    for _ in 0..100 {
        let pick = b
            .balancer
            .pick_at(b.now, &mut b.rng, &skip)
            .expect("endpoint 3 is left");
        assert_eq!(pick.endpoint.port, 3);
    }
    let all = [skip[0], skip[1], SocketAddr::new(ep(3).addr, 3)];
    assert!(b.balancer.pick_at(b.now, &mut b.rng, &all).is_none());
    // Skipping is per request: the next plain pick may choose any endpoint.
    let ports: std::collections::BTreeSet<u16> = (0..100)
        .filter_map(|_| b.pick())
        .map(|p| p.endpoint.port)
        .collect();
    assert_eq!(ports.len(), 3);
}
