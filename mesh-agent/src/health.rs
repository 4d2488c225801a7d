//! Optional active health checks of load-balancing backends (`--health-checks`).
//!
//! The kernel picks backends without knowing whether they answer. With health checks
//! on, the agent connects to every TCP backend from its own network namespace each
//! interval; a backend that fails [`HealthConfig::unhealthy_threshold`] probes in a row
//! is reported unhealthy (the planner then leaves it out of the load-balancing slots),
//! and healthy again after [`HealthConfig::healthy_threshold`] successes in a row.
//!
//! Decide, then do: [`Tracker`] is the pure per-backend state machine; [`HealthChecker`]
//! owns the probing task and only feeds probe results into it.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use mesh_common::service::PROTO_TCP;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::MissedTickBehavior;
use tracing::{debug, info, warn};

/// Probes in flight at once. Bounds sockets and ephemeral ports used by a round when
/// there are many backends; a round of N unreachable backends then takes about
/// `ceil(N / 64) * timeout`.
const MAX_IN_FLIGHT: usize = 64;

/// Shortest probing interval; `tokio::time::interval` panics on a zero period.
const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// Probing cadence and the thresholds that turn probe results into health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthConfig {
    /// Time from the start of one round of probes to the start of the next. A round
    /// that takes longer delays the next one; rounds never overlap.
    pub interval: Duration,
    /// How long a connect may take before the probe counts as failed.
    pub timeout: Duration,
    /// Failed probes in a row that make a healthy backend unhealthy (0 acts as 1).
    pub unhealthy_threshold: u32,
    /// Successful probes in a row that make an unhealthy backend healthy (0 acts as 1).
    pub healthy_threshold: u32,
}

impl Default for HealthConfig {
    /// 2 s / 1 s / 3 / 2:
    /// - the 1 s timeout is half the interval, so a round of up to 64 dead backends
    ///   still finishes before the next tick;
    /// - 1 s is also Linux's initial SYN retransmission timeout, so a single lost SYN
    ///   fails a probe; 3 failures in a row are therefore needed, which still takes a
    ///   dead backend out within about 5-7 s;
    /// - 2 successes in a row keep a backend that is restarting or flapping from
    ///   getting traffic back on one lucky connect, at the cost of ~2 s of recovery.
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            unhealthy_threshold: 3,
            healthy_threshold: 2,
        }
    }
}

/// Target of a probe: a backend address and its IP protocol number (only TCP=6 is
/// probed; others are ignored).
pub type Target = (SocketAddr, u8);

/// A change of a target's health, as decided by [`Tracker::record`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transition {
    /// The target just reached the unhealthy threshold.
    Unhealthy { consecutive_failures: u32 },
    /// The target just reached the healthy threshold.
    Healthy { consecutive_successes: u32 },
}

/// Per-target probe history.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct TargetState {
    unhealthy: bool,
    consecutive_failures: u32,
    consecutive_successes: u32,
}

/// Pure health state machine over a set of targets: no I/O, no clock.
#[derive(Clone, Debug)]
struct Tracker {
    unhealthy_threshold: u32,
    healthy_threshold: u32,
    targets: BTreeMap<Target, TargetState>,
}

impl Tracker {
    fn new(unhealthy_threshold: u32, healthy_threshold: u32) -> Self {
        Self {
            // A threshold of 0 would mean "unhealthy without any probe"; treat it as 1.
            unhealthy_threshold: unhealthy_threshold.max(1),
            healthy_threshold: healthy_threshold.max(1),
            targets: BTreeMap::new(),
        }
    }

    /// Replaces the tracked set with the TCP targets in `targets`. Targets already
    /// tracked keep their history; new ones start healthy with a clean history;
    /// removed ones are forgotten, so a backend that comes back starts healthy.
    fn set_targets(&mut self, targets: BTreeSet<Target>) {
        let mut next: BTreeMap<Target, TargetState> = BTreeMap::new();
        for target in targets.into_iter().filter(|&(_, proto)| proto == PROTO_TCP) {
            let state = self.targets.get(&target).copied().unwrap_or_default();
            next.insert(target, state);
        }
        self.targets = next;
    }

    /// Targets to probe this round.
    fn targets(&self) -> Vec<Target> {
        self.targets.keys().copied().collect()
    }

    /// Targets currently unhealthy.
    fn unhealthy(&self) -> BTreeSet<Target> {
        self.targets
            .iter()
            .filter(|(_, s)| s.unhealthy)
            .map(|(t, _)| *t)
            .collect()
    }

    /// Records one probe result and returns the transition it causes, if any. Results
    /// for targets no longer tracked (removed while the probe was in flight) are
    /// dropped.
    fn record(&mut self, target: Target, ok: bool) -> Option<Transition> {
        let state = self.targets.get_mut(&target)?;
        if ok {
            state.consecutive_failures = 0;
            state.consecutive_successes = state.consecutive_successes.saturating_add(1);
            if state.unhealthy && state.consecutive_successes >= self.healthy_threshold {
                state.unhealthy = false;
                return Some(Transition::Healthy {
                    consecutive_successes: state.consecutive_successes,
                });
            }
        } else {
            state.consecutive_successes = 0;
            state.consecutive_failures = state.consecutive_failures.saturating_add(1);
            if !state.unhealthy && state.consecutive_failures >= self.unhealthy_threshold {
                state.unhealthy = true;
                return Some(Transition::Unhealthy {
                    consecutive_failures: state.consecutive_failures,
                });
            }
        }
        None
    }
}

/// Why a probe failed. Only logged: every failure counts the same towards the threshold.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect: {0}")]
    Connect(#[source] io::Error),
}

/// Connects to `addr` and closes at once: a completed handshake is all we ask of a
/// backend, which is what a kubelet `tcpSocket` probe checks too.
async fn probe(addr: SocketAddr, timeout: Duration) -> Result<(), ProbeError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            drop(stream);
            Ok(())
        }
        Ok(Err(err)) => Err(ProbeError::Connect(err)),
        Err(_elapsed) => Err(ProbeError::Timeout(timeout)),
    }
}

/// Locks the tracker. A panic while holding the lock cannot leave the tracker half
/// updated (every update is a few field writes), so a poisoned lock is still usable.
fn lock(tracker: &Mutex<Tracker>) -> MutexGuard<'_, Tracker> {
    tracker.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Active TCP health checking of backends, running as a task on the tokio runtime.
/// Dropping it stops the task and any probes in flight.
pub struct HealthChecker {
    // A std mutex: it is never held across an await, and `set_targets`/`unhealthy`
    // are called from synchronous planning code.
    tracker: Arc<Mutex<Tracker>>,
    task: JoinHandle<()>,
}

impl HealthChecker {
    /// Starts the probing task on the current tokio runtime. `changed` gets a message
    /// whenever the set of unhealthy targets changes because of probe results;
    /// messages coalesce (a full channel already means "re-plan pending").
    ///
    /// # Panics
    /// If called outside a tokio runtime.
    pub fn spawn(config: HealthConfig, changed: mpsc::Sender<()>) -> Self {
        let tracker = Arc::new(Mutex::new(Tracker::new(
            config.unhealthy_threshold,
            config.healthy_threshold,
        )));
        let task = tokio::spawn(run(config, Arc::clone(&tracker), changed));
        Self { tracker, task }
    }

    /// Replaces the set of targets (called after each plan). New targets start
    /// healthy; removed targets are forgotten. Pass every backend, including the ones
    /// currently unhealthy: a target left out forgets its history and comes back
    /// healthy. Changes made here are not signalled on `changed`: the caller made them.
    pub fn set_targets(&self, targets: BTreeSet<Target>) {
        lock(&self.tracker).set_targets(targets);
    }

    /// Targets currently considered unhealthy.
    pub fn unhealthy(&self) -> BTreeSet<Target> {
        lock(&self.tracker).unhealthy()
    }
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        // Aborting drops the task's JoinSet, which aborts the probes in flight.
        self.task.abort();
    }
}

/// The probing loop: one round per tick, never two rounds at once.
async fn run(config: HealthConfig, tracker: Arc<Mutex<Tracker>>, changed: mpsc::Sender<()>) {
    let mut ticks = tokio::time::interval(config.interval.max(MIN_INTERVAL));
    // A round slower than the interval pushes the next tick back instead of firing a
    // burst of catch-up rounds.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let targets = lock(&tracker).targets();
        probe_round(&targets, config.timeout, &tracker, &changed).await;
    }
}

/// Probes `targets` concurrently, at most [`MAX_IN_FLIGHT`] at a time, feeding each
/// result into the tracker as it arrives and signalling `changed` at once on a
/// transition, rather than after the slowest probe of the round.
async fn probe_round(
    targets: &[Target],
    timeout: Duration,
    tracker: &Mutex<Tracker>,
    changed: &mpsc::Sender<()>,
) {
    let mut probes = JoinSet::new();
    for &target in targets {
        if probes.len() >= MAX_IN_FLIGHT
            && let Some(done) = probes.join_next().await
        {
            settle(done, tracker, changed);
        }
        probes.spawn(async move { (target, probe(target.0, timeout).await) });
    }
    while let Some(done) = probes.join_next().await {
        settle(done, tracker, changed);
    }
}

/// Records one finished probe, and logs and signals the transition it causes.
fn settle(
    done: Result<(Target, Result<(), ProbeError>), tokio::task::JoinError>,
    tracker: &Mutex<Tracker>,
    changed: &mpsc::Sender<()>,
) {
    // Probes do not panic and are only cancelled together with this task, so a join
    // error cannot reach here in practice; it would carry no target to record anyway.
    let Ok((target, result)) = done else {
        return;
    };
    let (backend, _) = target;
    match result {
        Ok(()) => {
            let Some(Transition::Healthy {
                consecutive_successes,
            }) = lock(tracker).record(target, true)
            else {
                return;
            };
            info!(%backend, consecutive_successes, "backend healthy again");
        }
        Err(err) => {
            debug!(%backend, error = %err, "health probe failed");
            let Some(Transition::Unhealthy {
                consecutive_failures,
            }) = lock(tracker).record(target, false)
            else {
                return;
            };
            warn!(%backend, consecutive_failures, last_error = %err, "backend unhealthy");
        }
    }
    // Full: a notification is already pending. Closed: nobody re-plans any more, but
    // `unhealthy()` still answers, so keep probing.
    let _ = changed.try_send(());
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use mesh_common::service::PROTO_UDP;
    use tokio::net::TcpListener;

    use super::*;

    fn tcp(port: u16) -> Target {
        (
            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), port)),
            PROTO_TCP,
        )
    }

    fn set(targets: &[Target]) -> BTreeSet<Target> {
        targets.iter().copied().collect()
    }

    /// One scenario for a single target: each step is a probe result and the
    /// transition it must cause.
    struct Case {
        name: &'static str,
        unhealthy_threshold: u32,
        healthy_threshold: u32,
        steps: &'static [(bool, Option<Transition>)],
        unhealthy_at_end: bool,
    }

    #[test]
    fn thresholds_and_flapping() {
        use Transition::{Healthy, Unhealthy};
        const OK: bool = true;
        const FAIL: bool = false;
        let cases = [
            Case {
                name: "all ok stays healthy",
                unhealthy_threshold: 3,
                healthy_threshold: 2,
                steps: &[(OK, None), (OK, None), (OK, None)],
                unhealthy_at_end: false,
            },
            Case {
                name: "failures below threshold stay healthy",
                unhealthy_threshold: 3,
                healthy_threshold: 2,
                steps: &[(FAIL, None), (FAIL, None)],
                unhealthy_at_end: false,
            },
            Case {
                name: "threshold failures make unhealthy, once",
                unhealthy_threshold: 3,
                healthy_threshold: 2,
                steps: &[
                    (FAIL, None),
                    (FAIL, None),
                    (
                        FAIL,
                        Some(Unhealthy {
                            consecutive_failures: 3,
                        }),
                    ),
                    (FAIL, None),
                ],
                unhealthy_at_end: true,
            },
            Case {
                name: "a success resets the failure count",
                unhealthy_threshold: 3,
                healthy_threshold: 2,
                steps: &[
                    (FAIL, None),
                    (FAIL, None),
                    (OK, None),
                    (FAIL, None),
                    (FAIL, None),
                ],
                unhealthy_at_end: false,
            },
            Case {
                name: "recovery needs consecutive successes, once",
                unhealthy_threshold: 2,
                healthy_threshold: 2,
                steps: &[
                    (FAIL, None),
                    (
                        FAIL,
                        Some(Unhealthy {
                            consecutive_failures: 2,
                        }),
                    ),
                    (OK, None),
                    (FAIL, None),
                    (OK, None),
                    (
                        OK,
                        Some(Healthy {
                            consecutive_successes: 2,
                        }),
                    ),
                    (OK, None),
                ],
                unhealthy_at_end: false,
            },
            Case {
                name: "flapping healthy backend never goes unhealthy",
                unhealthy_threshold: 2,
                healthy_threshold: 2,
                steps: &[
                    (FAIL, None),
                    (OK, None),
                    (FAIL, None),
                    (OK, None),
                    (FAIL, None),
                ],
                unhealthy_at_end: false,
            },
            Case {
                name: "flapping unhealthy backend never recovers",
                unhealthy_threshold: 1,
                healthy_threshold: 2,
                steps: &[
                    (
                        FAIL,
                        Some(Unhealthy {
                            consecutive_failures: 1,
                        }),
                    ),
                    (OK, None),
                    (FAIL, None),
                    (OK, None),
                    (FAIL, None),
                ],
                unhealthy_at_end: true,
            },
            Case {
                name: "threshold 1 reacts to every change",
                unhealthy_threshold: 1,
                healthy_threshold: 1,
                steps: &[
                    (
                        FAIL,
                        Some(Unhealthy {
                            consecutive_failures: 1,
                        }),
                    ),
                    (
                        OK,
                        Some(Healthy {
                            consecutive_successes: 1,
                        }),
                    ),
                    (
                        FAIL,
                        Some(Unhealthy {
                            consecutive_failures: 1,
                        }),
                    ),
                ],
                unhealthy_at_end: true,
            },
            Case {
                name: "threshold 0 acts as 1",
                unhealthy_threshold: 0,
                healthy_threshold: 0,
                steps: &[
                    (OK, None),
                    (
                        FAIL,
                        Some(Unhealthy {
                            consecutive_failures: 1,
                        }),
                    ),
                ],
                unhealthy_at_end: true,
            },
        ];
        for case in cases {
            let name = case.name;
            let mut tracker = Tracker::new(case.unhealthy_threshold, case.healthy_threshold);
            tracker.set_targets(set(&[tcp(80)]));
            for (i, &(ok, want)) in case.steps.iter().enumerate() {
                assert_eq!(tracker.record(tcp(80), ok), want, "{name}: step {i}");
            }
            let want_end = if case.unhealthy_at_end {
                set(&[tcp(80)])
            } else {
                BTreeSet::new()
            };
            assert_eq!(tracker.unhealthy(), want_end, "{name}: final unhealthy set");
        }
    }

    #[test]
    fn targets_are_independent() {
        let mut tracker = Tracker::new(2, 2);
        tracker.set_targets(set(&[tcp(80), tcp(81)]));
        assert_eq!(tracker.record(tcp(80), false), None);
        assert_eq!(tracker.record(tcp(81), true), None);
        assert_eq!(
            tracker.record(tcp(80), false),
            Some(Transition::Unhealthy {
                consecutive_failures: 2
            })
        );
        assert_eq!(tracker.unhealthy(), set(&[tcp(80)]));
    }

    #[test]
    fn set_targets_keeps_forgets_and_filters() {
        let udp = (tcp(53).0, PROTO_UDP);
        let mut tracker = Tracker::new(2, 2);
        tracker.set_targets(set(&[tcp(80), tcp(81), udp]));
        // Only TCP is tracked, so only TCP is probed and can be unhealthy.
        assert_eq!(tracker.targets(), vec![tcp(80), tcp(81)]);
        assert_eq!(tracker.record(udp, false), None);

        for target in [tcp(80), tcp(81)] {
            tracker.record(target, false);
            tracker.record(target, false);
        }
        assert_eq!(tracker.unhealthy(), set(&[tcp(80), tcp(81)]));

        // Kept targets keep their state (and history); new ones start healthy.
        tracker.set_targets(set(&[tcp(80), tcp(82)]));
        assert_eq!(tracker.unhealthy(), set(&[tcp(80)]));
        assert_eq!(
            tracker.record(tcp(80), true),
            None,
            "one success is below threshold"
        );
        // A result for a removed target (probe in flight) is dropped.
        assert_eq!(tracker.record(tcp(81), true), None);

        // A removed target that comes back starts healthy with a clean history.
        tracker.set_targets(set(&[tcp(80), tcp(81), tcp(82)]));
        assert_eq!(tracker.unhealthy(), set(&[tcp(80)]));
        assert_eq!(
            tracker.record(tcp(81), false),
            None,
            "one failure is below threshold"
        );
    }

    /// Waits for notifications on `changed` until `unhealthy()` equals `want`, failing
    /// after `limit`.
    async fn await_unhealthy(
        checker: &HealthChecker,
        changed: &mut mpsc::Receiver<()>,
        want: BTreeSet<Target>,
        limit: Duration,
    ) {
        let wait = async {
            while checker.unhealthy() != want {
                changed.recv().await.expect("health task stopped");
            }
        };
        tokio::time::timeout(limit, wait).await.unwrap_or_else(|_| {
            panic!(
                "unhealthy set is {:?}, want {want:?} within {limit:?}",
                checker.unhealthy()
            )
        });
    }

    /// Accepts and drops connections so the listener's backlog never fills.
    fn serve(listener: TcpListener) -> JoinHandle<()> {
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                drop(conn);
            }
        })
    }

    #[tokio::test]
    async fn loopback_backend_goes_unhealthy_and_recovers() {
        const LIMIT: Duration = Duration::from_secs(5);
        let up = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let up_target = (up.local_addr().unwrap(), PROTO_TCP);
        let _up = serve(up);
        // A port nothing listens on: connects are refused at once.
        let down_addr = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let down_target = (down_addr, PROTO_TCP);

        let config = HealthConfig {
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(500),
            unhealthy_threshold: 2,
            healthy_threshold: 2,
        };
        let (tx, mut changed) = mpsc::channel(1);
        let checker = HealthChecker::spawn(config, tx);
        checker.set_targets(set(&[up_target, down_target]));

        await_unhealthy(&checker, &mut changed, set(&[down_target]), LIMIT).await;

        let back = TcpListener::bind(down_addr)
            .await
            .expect("rebind the closed port");
        let _back = serve(back);
        await_unhealthy(&checker, &mut changed, BTreeSet::new(), LIMIT).await;

        // Dropping the checker stops the task, which drops its sender.
        drop(checker);
        let closed =
            tokio::time::timeout(LIMIT, async { while changed.recv().await.is_some() {} }).await;
        assert!(closed.is_ok(), "health task still running after drop");
    }
}
