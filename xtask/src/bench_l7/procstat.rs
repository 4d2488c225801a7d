//! CPU time and memory of a proxy process and its descendants (nginx's master and
//! worker), from `/proc`: utime+stime of `/proc/<pid>/stat`, VmRSS and VmHWM of
//! `/proc/<pid>/status`.

use std::{process::Command, time::Duration};

use anyhow::{Context as _, Result, ensure};

/// Reads CPU and memory of the process tree rooted at one pid.
#[derive(Debug, Clone, Copy)]
pub struct ProcTree {
    root: u32,
    /// Clock ticks per second (`getconf CLK_TCK`), the unit of utime and stime.
    ticks_per_sec: u64,
}

/// Resident memory of a tree, summed over its processes, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// VmRSS now.
    pub rss_kib: u64,
    /// VmHWM: the peak resident set since each process started.
    pub hwm_kib: u64,
}

impl ProcTree {
    /// The tree rooted at `root`.
    pub fn new(root: u32) -> Result<Self> {
        let out = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .context("run getconf CLK_TCK")?;
        let ticks_per_sec: u64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .context("parse getconf CLK_TCK")?;
        ensure!(ticks_per_sec > 0, "getconf CLK_TCK answered 0");
        Ok(Self {
            root,
            ticks_per_sec,
        })
    }

    /// User plus system CPU time of every process of the tree (all their threads).
    pub fn cpu(&self) -> Result<Duration> {
        let mut ticks = 0;
        for pid in self.pids()? {
            let stat = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Ok(stat) => stat,
                // Exited between the listing and the read.
                Err(_) if pid != self.root => continue,
                Err(e) => return Err(e).with_context(|| format!("read /proc/{pid}/stat")),
            };
            let fields = stat_fields(&stat).with_context(|| format!("/proc/{pid}/stat"))?;
            ticks += fields.utime + fields.stime;
        }
        Ok(Duration::from_secs_f64(
            ticks as f64 / self.ticks_per_sec as f64,
        ))
    }

    /// Resident memory of the tree now.
    pub fn memory(&self) -> Result<Memory> {
        let mut memory = Memory::default();
        for pid in self.pids()? {
            let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
                continue;
            };
            let kib = |key: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            memory.rss_kib += kib("VmRSS:");
            memory.hwm_kib += kib("VmHWM:");
        }
        Ok(memory)
    }

    /// The root and its descendants (by parent pid, from one scan of `/proc`).
    fn pids(&self) -> Result<Vec<u32>> {
        let mut parents = Vec::new();
        for entry in std::fs::read_dir("/proc").context("list /proc")? {
            let Ok(pid) = entry?.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                && let Ok(fields) = stat_fields(&stat)
            {
                parents.push((pid, fields.ppid));
            }
        }
        let mut tree = vec![self.root];
        // Each pass adds the children of what is already in; a tree is shallow.
        for _ in 0..8 {
            let before = tree.len();
            for &(pid, ppid) in &parents {
                if tree.contains(&ppid) && !tree.contains(&pid) {
                    tree.push(pid);
                }
            }
            if tree.len() == before {
                break;
            }
        }
        Ok(tree)
    }
}

struct StatFields {
    ppid: u32,
    utime: u64,
    stime: u64,
}

/// Fields of `/proc/<pid>/stat` after the command name (which may hold spaces and
/// parentheses, hence the last `)`): state, ppid, … utime (14th field), stime (15th).
fn stat_fields(stat: &str) -> Result<StatFields> {
    let rest = &stat[stat.rfind(')').context("no `)` after the command name")? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .with_context(|| format!("no field {n}"))?
            .parse()
            .with_context(|| format!("field {n}"))
    };
    Ok(StatFields {
        ppid: u32::try_from(field(4)?).context("ppid")?,
        utime: field(14)?,
        stime: field(15)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_survive_odd_command_names() {
        let stat = "4242 (nginx: a) b) S 4241 4242 4242 0 -1 4194624 10 0 0 0 \
                    37 12 0 0 20 0 1 0 100 1000 200 18446744073709551615";
        let f = stat_fields(stat).unwrap();
        assert_eq!((f.ppid, f.utime, f.stime), (4241, 37, 12));
        assert!(stat_fields("4242 (x) S 1").is_err());
    }

    #[test]
    fn own_process_has_cpu_and_memory() {
        let tree = ProcTree::new(std::process::id()).unwrap();
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(50) {
            std::hint::black_box(0u64);
        }
        assert!(tree.cpu().unwrap() > Duration::ZERO);
        let m = tree.memory().unwrap();
        assert!(m.rss_kib > 0 && m.hwm_kib >= m.rss_kib);
    }
}
