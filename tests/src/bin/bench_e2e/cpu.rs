//! Where the CPU goes. The load generator and the backends run on one CPU,
//! the LB on the other, and the LB's share is read from the kernel's own
//! accounting, so that each mode's cost per request is the LB's alone.
//!
//! On veth, a packet's receive processing runs on the CPU whose backlog it
//! was queued to; RPS picks that CPU per receiving device. So every device
//! in the LB namespace steers to `LB_CPU` (its tc programs, routing,
//! netfilter, HAProxy's sockets) and every client and backend device to
//! `LOAD_CPU`. The LB's cost is then the hard and soft interrupt time of
//! `LB_CPU` plus the CPU time of the LB's own processes (HAProxy, the
//! agent), which are pinned there too.

use std::process::Command;

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
fn rps(ns: &Netns, cpu: usize) -> Result<()> {
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

/// The LB's CPU time so far, in clock ticks (USER_HZ).
#[derive(Clone, Copy, Debug, Default)]
pub struct LbTicks {
    /// Hard and soft interrupt time of `LB_CPU`: the packet path.
    pub kernel: u64,
    /// User and system time of the LB's processes (HAProxy, the agent).
    pub processes: u64,
}

impl std::ops::Sub for LbTicks {
    type Output = LbTicks;
    fn sub(self, earlier: LbTicks) -> LbTicks {
        LbTicks {
            kernel: self.kernel.saturating_sub(earlier.kernel),
            processes: self.processes.saturating_sub(earlier.processes),
        }
    }
}

/// The LB's CPU time so far, `processes` being its processes' PIDs.
pub fn lb_ticks(processes: &[u32]) -> Result<LbTicks> {
    let mut ticks = LbTicks {
        kernel: interrupt_ticks(LB_CPU)?,
        processes: 0,
    };
    for &pid in processes {
        ticks.processes += process_ticks(pid)?;
    }
    Ok(ticks)
}

/// Seconds per clock tick of /proc/stat and /proc/PID/stat.
pub fn seconds_per_tick() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    1.0 / if hz > 0 { hz as f64 } else { 100.0 }
}

/// `irq` + `softirq` of `cpu` in /proc/stat.
fn interrupt_ticks(cpu: usize) -> Result<u64> {
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
    if fields.len() < 7 {
        bail!("/proc/stat line {line:?} has fewer than 7 counters");
    }
    Ok(fields[5] + fields[6])
}

/// utime + stime of process `pid` (all its threads).
fn process_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name may hold spaces: fields are counted after its ')'.
    let rest = text
        .rsplit_once(')')
        .with_context(|| format!("{path}: no ')'"))?
        .1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state(3) … utime(14) stime(15), so indices 11 and 12.
    let field = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("{path}: field {} unreadable", i + 3))
    };
    Ok(field(11)? + field(12)?)
}
