//! Test bed for the mesh: clusters built from real network namespaces, veths and
//! cgroups, a test workload (`mesh-testpod`) and the helpers to drive both.
//!
//! Used by this crate's integration tests and by `cargo xtask demo`/`bench`, so it is
//! an ordinary library. Everything it creates is uniquely named and removed on drop,
//! also when a test panics (see [`topology`] for the layout and naming).
//!
//! ```no_run
//! use std::time::Duration;
//! use mesh_tests::{Cluster, require_root, testpod};
//!
//! # fn main() -> anyhow::Result<()> {
//! if !require_root() {
//!     return Ok(());
//! }
//! let cluster = Cluster::builder("lb")
//!     .node("n1")
//!     .node("n2")
//!     .pod("n1", "client", "10.244.1.10")
//!     .pod("n2", "web-1", "10.244.2.11")
//!     .build()?;
//! let _server = testpod::start_server(cluster.pod("web-1"), 8080, "web-1")?;
//! let target = (cluster.pod("web-1").ip(), 8080).into();
//! let summary = testpod::connect(cluster.pod("client"), target, 10)?;
//! assert_eq!(summary.by_backend["web-1"], 10);
//! # Ok(())
//! # }
//! ```
#![deny(unsafe_op_in_unsafe_fn)]

pub mod agent;
mod binaries;
pub mod capture;
mod cgroup;
pub mod etcd;
pub mod kubeapi;
pub mod l7;
pub mod manifests;
mod netns;
mod process;
pub mod proxy;
pub mod reachability;
pub mod scenario;
mod sys;
pub mod testpod;
pub mod topology;

use std::time::{Duration, Instant};

pub use agent::{Agent, StateDir};
pub use binaries::{
    AGENT_BIN_ENV, PROXY_BIN_ENV, TESTPOD_BIN_ENV, agent_bin, proxy_bin, testpod_bin,
};
pub use cgroup::cgroup2_mount;
pub use process::{ChildGuard, DEFAULT_RUN_TIMEOUT};
pub use proxy::Proxy;
pub use topology::{Cluster, ClusterBuilder, Ipv4Cidr, Node, Pod, cleanup_stale};

/// Whether this process may build clusters (it must be root).
///
/// Root-only tests start with `if !require_root() { return; }`. Without root this
/// prints "skipping: needs root" and returns false, except under CI (`CI=true`), where
/// a missing privilege must fail the run rather than silently skip it: then it panics.
pub fn require_root() -> bool {
    if sys::euid() == 0 {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    assert!(
        !ci,
        "this test needs root, and CI={} forbids skipping it",
        std::env::var("CI").unwrap_or_default()
    );
    eprintln!("skipping: needs root");
    false
}

/// Polls `condition` until it holds or `timeout` has passed; returns whether it held.
///
/// Use instead of sleeps when waiting for convergence (an agent applying state, a
/// server binding). The polling interval starts at 1 ms and backs off to 50 ms.
pub fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if condition() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Asserts that a condition becomes true within a timeout (see [`eventually`]).
///
/// ```no_run
/// # use std::time::Duration;
/// # let ready = || true;
/// mesh_tests::assert_eventually!(ready(), Duration::from_secs(5));
/// mesh_tests::assert_eventually!(ready(), Duration::from_secs(5), "agent never became ready");
/// ```
#[macro_export]
macro_rules! assert_eventually {
    ($cond:expr, $timeout:expr $(,)?) => {
        $crate::assert_eventually!($cond, $timeout, "condition `{}` did not hold", stringify!($cond))
    };
    ($cond:expr, $timeout:expr, $($msg:tt)+) => {{
        let timeout: ::std::time::Duration = $timeout;
        if !$crate::eventually(timeout, || $cond) {
            panic!("{} (waited {:?})", format_args!($($msg)+), timeout);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventually_is_bounded() {
        let start = Instant::now();
        assert!(!eventually(Duration::from_millis(30), || false));
        assert!(start.elapsed() < Duration::from_secs(1));
        let mut calls = 0;
        assert!(eventually(Duration::from_secs(1), || {
            calls += 1;
            calls == 3
        }));
        assert_eventually!(true, Duration::from_millis(1));
    }

    #[test]
    #[should_panic(expected = "never")]
    fn assert_eventually_panics_with_message() {
        assert_eventually!(false, Duration::from_millis(5), "never {}", "true");
    }
}
