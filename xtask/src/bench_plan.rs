//! `cargo xtask bench plan`: parse + validate + plan (Services and NetworkPolicy) of
//! generated states, timed end to end with `mesh-agent validate --node`, with the peak
//! RSS of each run. Shapes: N Services in one namespace each selecting its own Pod by
//! label (the selector path), the same N Services with one EndpointSlice each and no
//! selector (the baseline: no label matching at all), and N NetworkPolicies each
//! selecting one Pod and allowing ingress from another by label. Growth ratios between
//! sizes show whether planning is linear; the selector/slices ratio shows what label
//! matching costs over the baseline.

use std::{
    fmt::Write as _,
    io::Read as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use mesh_tests::StateDir;

use crate::{build, setup};

/// Runs per measurement; the median time is reported (the peak RSS is the same).
const RUNS: usize = 3;

/// What a generated state holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// N Pods and N Services selecting one Pod each by label.
    Selectors,
    /// N Pods and N Services without selector, each with one EndpointSlice.
    Slices,
    /// N Pods and N NetworkPolicies, each selecting one Pod, ingress from another.
    Policies,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Selectors => "services, selectors",
            Shape::Slices => "services, EndpointSlices",
            Shape::Policies => "network policies",
        }
    }
}

/// One measurement.
struct Sample {
    time: Duration,
    peak_rss_kib: u64,
}

/// Runs the benchmark for Service counts `services` and policy counts `policies`.
pub fn run(services: &[u32], policies: &[u32]) -> Result<()> {
    setup::run()?;
    let bins = build::run(build::Profile::Release)?;
    let dir = StateDir::new("bench-plan")?;
    let mut report = String::new();
    let mut table = |shape: Shape, sizes: &[u32]| -> Result<Vec<Sample>> {
        let mut samples = Vec::new();
        for &n in sizes {
            let file = dir
                .path()
                .join(format!("{:?}-{n}.yaml", shape).to_lowercase());
            std::fs::write(&file, generate(shape, n))
                .with_context(|| format!("writing {}", file.display()))?;
            let sample = measure(&bins.agent, &file)?;
            std::fs::remove_file(&file).ok();
            println!(
                "{:<26} {n:>6}: {:>8.3} s  peak RSS {:>7.1} MiB",
                shape.name(),
                sample.time.as_secs_f64(),
                sample.peak_rss_kib as f64 / 1024.0
            );
            samples.push(sample);
        }
        let _ = writeln!(report, "{}:", shape.name());
        for (i, (&n, s)) in sizes.iter().zip(&samples).enumerate() {
            let growth = match i {
                0 => String::new(),
                _ => {
                    let (prev_n, prev) = (sizes[i - 1], &samples[i - 1]);
                    format!(
                        "  x{:.1} time for x{:.0} objects",
                        s.time.as_secs_f64() / prev.time.as_secs_f64().max(1e-9),
                        f64::from(n) / f64::from(prev_n)
                    )
                }
            };
            let _ = writeln!(
                report,
                "  {n:>6}: {:>8.3} s  {:>7.1} MiB{growth}",
                s.time.as_secs_f64(),
                s.peak_rss_kib as f64 / 1024.0
            );
        }
        Ok(samples)
    };
    let selectors = table(Shape::Selectors, services)?;
    let slices = table(Shape::Slices, services)?;
    table(Shape::Policies, policies)?;
    let _ = writeln!(
        report,
        "selectors / EndpointSlices (label matching over the baseline):"
    );
    for ((&n, sel), base) in services.iter().zip(&selectors).zip(&slices) {
        let _ = writeln!(
            report,
            "  {n:>6}: {:.2}x",
            sel.time.as_secs_f64() / base.time.as_secs_f64().max(1e-9)
        );
    }
    println!("\n{report}");
    Ok(())
}

/// Median time and peak RSS of `mesh-agent validate --node n1 FILE` over [`RUNS`].
fn measure(agent: &Path, file: &Path) -> Result<Sample> {
    let mut times = Vec::with_capacity(RUNS);
    let mut peak = 0;
    for _ in 0..RUNS {
        let start = Instant::now();
        // 50,000 Services need more frontend, slot and backend entries than the
        // default maps hold (a frontend and a VIP marker each).
        let mut child = Command::new(agent)
            .args(["validate", "--node", "n1"])
            .args([
                "--map-size-services",
                "262144",
                "--map-size-backend-slots",
                "262144",
            ])
            .arg(file)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", agent.display()))?;
        let (status, rss) = wait_with_rusage(child.id())?;
        times.push(start.elapsed());
        if !status {
            // The pipe still holds what the reaped child wrote.
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                pipe.read_to_string(&mut stderr).ok();
            }
            bail!("validate rejected {}: {stderr}", file.display());
        }
        peak = peak.max(rss);
    }
    times.sort();
    Ok(Sample {
        time: times[RUNS / 2],
        peak_rss_kib: peak,
    })
}

/// Waits for `pid` and returns whether it succeeded and its peak RSS (KiB), which only
/// wait4(2) reports per child.
fn wait_with_rusage(pid: u32) -> Result<(bool, u64)> {
    let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value to be overwritten.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `status` and `usage` are valid for writes; `pid` is our own child, which
    // nothing else waits for (its `Child` is only used for output after this reaped it).
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if rc != pid {
        bail!("wait4({pid}): {}", std::io::Error::last_os_error());
    }
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    Ok((ok, u64::try_from(usage.ru_maxrss).unwrap_or(0)))
}

/// The address `base.X.Y` of the `i`th object (250 per /24, from .1).
fn addr(base: &str, i: u32) -> String {
    format!("{base}.{}.{}", i / 250, i % 250 + 1)
}

/// A generated state of `shape` with `n` objects, in one namespace, on node n1.
fn generate(shape: Shape, n: u32) -> String {
    let mut yaml = String::with_capacity(n as usize * 600);
    yaml.push_str("apiVersion: v1\nkind: Namespace\nmetadata: {name: bench}\n");
    for i in 0..n {
        let pod_ip = addr("10.244", i);
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: bench, labels: {{app: a{i}, tier: web}}}}\n\
             spec: {{nodeName: n1, containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]}}\n\
             status: {{podIP: {pod_ip}}}\n"
        );
        match shape {
            Shape::Selectors => {
                let _ = write!(
                    yaml,
                    "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: bench}}\n\
                     spec: {{clusterIP: {}, selector: {{app: a{i}}}, ports: [{{port: 80, targetPort: http}}]}}\n",
                    addr("10.96", i)
                );
            }
            Shape::Slices => {
                let _ = write!(
                    yaml,
                    "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: bench}}\n\
                     spec: {{clusterIP: {}, ports: [{{port: 80, targetPort: 8080}}]}}\n\
                     ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                     metadata: {{name: s{i}-1, namespace: bench, labels: {{kubernetes.io/service-name: s{i}}}}}\n\
                     addressType: IPv4\nports: [{{port: 8080}}]\n\
                     endpoints: [{{addresses: ['{pod_ip}'], nodeName: n1, targetRef: {{kind: Pod, name: p{i}, namespace: bench}}}}]\n",
                    addr("10.96", i)
                );
            }
            Shape::Policies => {
                let _ = write!(
                    yaml,
                    "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np{i}, namespace: bench}}\n\
                     spec: {{podSelector: {{matchLabels: {{app: a{i}}}}}, policyTypes: [Ingress, Egress],\n\
                     ingress: [{{from: [{{podSelector: {{matchLabels: {{app: a{}}}}}}}], ports: [{{port: http}}]}}],\n\
                     egress: [{{to: [{{podSelector: {{matchExpressions: [{{key: app, operator: In, values: [a{}]}}]}}}}]}}]}}\n",
                    (i + 1) % n,
                    (i + 2) % n
                );
            }
        }
    }
    yaml
}
