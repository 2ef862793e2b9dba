//! The soak engine (`cargo xtask soak`) for about 80 s, small enough for CI:
//! mixed TCP and UDP traffic while the config and the DNS records change
//! every few seconds, the agent is killed with `kill -9` and started again
//! over its pinned datapath, and a 5 s SYN flood runs. No connection may
//! fail outside the flood and the restarts, every change must be applied,
//! and every restart must adopt the datapath. (Growth of memory and tables
//! needs a longer run: `cargo xtask soak --minutes 10`.)

use std::time::Duration;

use anyhow::{Result, ensure};
use sluice_tests::{
    TempDir,
    soak::{self, Options},
};

#[test]
fn a_short_soak_fails_no_connection_outside_the_flood_and_restarts() -> Result<()> {
    let logs = TempDir::new("soaklogs")?;
    let opts = Options {
        duration: Duration::from_secs(80),
        warm_up: Duration::from_secs(10),
        sample_every: Duration::from_secs(5),
        restart_every: Some((Duration::from_secs(20), Duration::from_secs(28))),
        restart_down: Duration::from_secs(1),
        config_every: (Duration::from_secs(8), Duration::from_secs(12)),
        dns_every: (Duration::from_secs(6), Duration::from_secs(10)),
        flood_at: Duration::from_secs(40),
        flood_for: Duration::from_secs(5),
        short_every: Duration::from_millis(100),
        idle_each: 3,
        idle_every: Duration::from_secs(8),
        seed: 7,
        progress: true,
        interrupt: None,
        keep_logs: Some(logs.0.clone()),
    };
    let seen = soak::run(&opts)?;
    let summary = seen.summary();
    println!("{summary}");
    let agent_logs = || {
        let mut text = String::new();
        for n in 1..=seen.restarts.len() + 1 {
            let log =
                std::fs::read_to_string(logs.path(&format!("agent-{n}.log"))).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            text += &format!(
                "--- agent-{n}.log (last {} lines)\n{}\n",
                tail.len(),
                tail.join("\n")
            );
        }
        text
    };

    ensure!(
        seen.failures_outside().is_empty() && seen.problems.is_empty(),
        "{summary}\n{}",
        agent_logs()
    );
    ensure!(!seen.restarts.is_empty(), "no restart happened:\n{summary}");
    ensure!(
        seen.config_changes.len() >= 4 && seen.dns_changes.len() >= 4,
        "too little churn:\n{summary}"
    );
    let flood = seen.flood.as_ref().map_or(0, |f| f.sent);
    ensure!(
        flood > 10_000,
        "the flood sent only {flood} SYNs:\n{summary}"
    );
    for (kind, row) in seen.by_kind() {
        let least = if kind.starts_with("idle") { 9 } else { 200 };
        ensure!(
            row[0] >= least,
            "{kind}: only {} attempts (at least {least} expected):\n{summary}",
            row[0]
        );
    }
    ensure!(
        seen.samples.len() >= 8,
        "only {} samples:\n{summary}",
        seen.samples.len()
    );
    Ok(())
}
