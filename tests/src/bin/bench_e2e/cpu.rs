//! Where the CPU goes. The load generator and the backends run on one CPU,
//! the LB on the other, and the LB's share is read from the kernel's own
//! accounting, so that each mode's cost per request is the LB's alone.
//!
//! On veth, a packet's receive processing runs on the CPU whose backlog it
//! was queued to; RPS picks that CPU per receiving device. So every device
//! in the LB namespace steers to `LB_CPU` (its tc programs, routing,
//! netfilter, HAProxy's sockets) and every client and backend device to
//! `LOAD_CPU`. The LB's own processes (HAProxy, the agent) are pinned to
//! `LB_CPU` too, so the LB's cost is the time `LB_CPU` is not idle.

use std::{process::Command, time::Instant};

use anyhow::{Context, Result, bail};
use testbed::{Netns, Topology};

/// The client's and the backends' CPU.
pub const LOAD_CPU: usize = 0;
/// The LB's CPU.
pub const LB_CPU: usize = 1;

/// Steers receive processing: the LB namespace's devices to `LB_CPU`, the
/// client's and the backends' to `LOAD_CPU`.
pub fn steer(topo: &Topology) -> Result<()> {
    rps(&topo.lb, LB_CPU)?;
    rps(&topo.client, LOAD_CPU)?;
    for b in &topo.backends {
        rps(b, LOAD_CPU)?;
    }
    Ok(())
}

/// Every receive queue of every device in `ns` but `lo` to `cpu`.
pub fn rps(ns: &Netns, cpu: usize) -> Result<()> {
    let mask = format!("{:x}", 1u64 << cpu);
    let script = format!(
        "for q in /sys/class/net/*/queues/rx-*/rps_cpus; do \
           case $q in /sys/class/net/lo/*) continue;; esac; echo {mask} > $q || exit 1; \
         done"
    );
    ns.exec(&["sh", "-c", &script]).with_context(|| {
        format!(
            "steering namespace {}'s receive queues to CPU {cpu}",
            ns.name
        )
    })
}

/// Pins every thread of process `pid` to `cpu`.
pub fn pin(pid: u32, cpu: usize) -> Result<()> {
    let out = Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .output()
        .context("running taskset (Debian package util-linux)")?;
    if !out.status.success() {
        bail!(
            "taskset of process {pid} to CPU {cpu}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The command line `args` run on `cpu` inside `ns`.
pub fn on_cpu(ns: &Netns, cpu: usize, args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, "taskset", "-c", &cpu.to_string()])
        .args(args);
    cmd
}

/// The LB CPU's busy time and the LB's processes' CPU time so far.
#[derive(Clone, Copy, Debug)]
pub struct LbCpu {
    at: Instant,
    /// Idle and I/O-wait time of `LB_CPU`, in clock ticks (USER_HZ). The
    /// kernel keeps idle time exactly (from the idle loop's entry and exit,
    /// not by sampling), so wall time minus idle time is the CPU's busy
    /// time however short its bursts. Interrupt time read from tick samples
    /// would over-count a mostly idle CPU: ticks stop while it idles and
    /// fire only when it is awake.
    idle: u64,
    /// CPU time of the LB's processes (HAProxy, the agent), in seconds.
    processes: f64,
}

/// Seconds of what happened between two readings.
#[derive(Clone, Copy, Debug)]
pub struct Spent {
    /// `LB_CPU` not idle: its packet processing and the LB's processes
    /// (and anything else that ran there: see `background`).
    pub busy: f64,
    /// The part of it in the LB's processes.
    pub processes: f64,
    pub wall: f64,
}

impl LbCpu {
    /// A reading now; `processes` are the LB's processes' PIDs.
    pub fn read(processes: &[u32]) -> Result<Self> {
        let mut total = 0.0;
        for &pid in processes {
            total += process_seconds(pid)?;
        }
        Ok(Self {
            at: Instant::now(),
            idle: idle_ticks(LB_CPU)?,
            processes: total,
        })
    }

    /// What was spent since `earlier`.
    pub fn since(&self, earlier: &LbCpu) -> Spent {
        let tick = seconds_per_tick();
        let wall = self.at.duration_since(earlier.at).as_secs_f64();
        let idle = self.idle.saturating_sub(earlier.idle) as f64 * tick;
        Spent {
            busy: (wall - idle).max(0.0),
            processes: (self.processes - earlier.processes).max(0.0),
            wall,
        }
    }
}

/// How busy `LB_CPU` is with no load at all, as a fraction, over
/// `seconds`: what the LB's figures carry on top of its own work (another
/// program on the machine). Shown with the results.
pub fn background(seconds: f64) -> Result<f64> {
    let before = LbCpu::read(&[])?;
    std::thread::sleep(std::time::Duration::from_secs_f64(seconds));
    let spent = LbCpu::read(&[])?.since(&before);
    Ok(spent.busy / spent.wall)
}

/// Seconds per clock tick of /proc/stat.
fn seconds_per_tick() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    1.0 / if hz > 0 { hz as f64 } else { 100.0 }
}

/// `idle` + `iowait` of `cpu` in /proc/stat.
fn idle_ticks(cpu: usize) -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let label = format!("cpu{cpu}");
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(label.as_str()))
        .with_context(|| format!("/proc/stat has no line for {label}"))?;
    // cpuN user nice system idle iowait irq softirq …
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("/proc/stat line {line:?}"))?;
    if fields.len() < 5 {
        bail!("/proc/stat line {line:?} has fewer than 5 counters");
    }
    Ok(fields[3] + fields[4])
}

/// CPU time of every thread of process `pid` so far, in seconds, from
/// the scheduler's exact run-time accounting (`/proc/PID/task/*/schedstat`)
/// rather than tick samples.
fn process_seconds(pid: u32) -> Result<f64> {
    let dir = format!("/proc/{pid}/task");
    let mut ns: u64 = 0;
    for task in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let path = task?.path().join("schedstat");
        // A thread may end between the listing and the read.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        ns += text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("{}: {text:?}", path.display()))?;
    }
    Ok(ns as f64 / 1e9)
}
