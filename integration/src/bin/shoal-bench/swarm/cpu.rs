//! What a run costs in CPU: the share of all CPUs busy during it (`/proc/stat`), and the CPU
//! seconds its own processes used (`/proc/PID/stat`), this process's clients included.

use std::fs;

use anyhow::{Context, Result, ensure};

/// Linux reports process CPU times in these ticks per second (USER_HZ).
const USER_HZ: f64 = 100.0;

/// CPU seconds of this process and `pids` (0 for any that has gone).
fn cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter()
        .chain([&std::process::id()])
        .filter_map(|&pid| process_cpu_seconds(pid).ok())
        .sum()
}

/// Utime + stime of a process, from `/proc/PID/stat`.
pub(super) fn process_cpu_seconds(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let rest = stat.rsplit_once(')').context("odd /proc/PID/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        Ok(fields
            .get(i - 3)
            .context("short /proc/PID/stat")?
            .parse::<f64>()?)
    };
    Ok((ticks(14)? + ticks(15)?) / USER_HZ)
}

/// CPU use during a run: system-wide (`/proc/stat`), and by the run's processes.
pub(super) struct CpuMeter {
    busy: u64,
    total: u64,
    pids: Vec<u32>,
    procs: f64,
}

impl CpuMeter {
    /// Starts measuring; `pids` (and this process) are the run's processes so far.
    pub(super) fn start(pids: &[Option<u32>]) -> Result<CpuMeter> {
        let (busy, total) = Self::read()?;
        let pids: Vec<u32> = pids.iter().flatten().copied().collect();
        Ok(CpuMeter {
            busy,
            total,
            procs: cpu_seconds(&pids),
            pids,
        })
    }

    /// (share of all CPUs busy, CPU seconds of the run's processes) since `start`; `new_pids`
    /// are processes started since, counted whole.
    pub(super) fn finish(&self, new_pids: &[Option<u32>]) -> Result<(f64, f64)> {
        let (busy, total) = Self::read()?;
        let new: Vec<u32> = new_pids.iter().flatten().copied().collect();
        let procs = cpu_seconds(&self.pids) - self.procs + cpu_seconds(&new);
        Ok((
            (busy - self.busy) as f64 / (total - self.total).max(1) as f64,
            procs,
        ))
    }

    fn read() -> Result<(u64, u64)> {
        let stat = fs::read_to_string("/proc/stat")?;
        let line = stat.lines().next().context("empty /proc/stat")?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        ensure!(v.len() >= 5, "odd /proc/stat: {line}");
        // user nice system idle iowait irq softirq steal ...; idle and iowait are not busy.
        let total: u64 = v.iter().take(8).sum();
        Ok((total - v[3] - v[4], total))
    }
}
