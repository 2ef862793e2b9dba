//! `cargo xtask bench failover`: one backend dies under a loop of new
//! connections; Sluice (retry on) and kube-proxy's iptables mode (DNAT with
//! `-m statistic --mode random`) side by side, on the same topology and the
//! same three backends, connections interleaved (Sluice, iptables, Sluice, …).
//!
//! Reported per system: connections that failed for the client, connections
//! sent to the dead backend after it died, and the time from its death to
//! the last connection that reached it.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use sluice_tests::{Agent, TempDir, bench::Flags, http_get, metric};
use testbed::{Family, NameServer, Topology, run_in};

const FAM: Family = Family::V4;
const PORT: u16 = 8080;
/// The iptables VIP's backends listen on their own port: Sluice's reply
/// entries are keyed by (backend address, port, client address, port), and a
/// client port reused across the two VIPs must not make them look alike.
const IPTABLES_PORT: u16 = 8081;
const SLUICE_VIP: &str = "10.100.0.1";
const IPTABLES_VIP: &str = "10.100.0.2";

struct Args {
    connections: usize,
    kill_at: usize,
    rounds: usize,
}

fn parse_args() -> Result<Args> {
    let f = Flags::parse(&[
        ("--connections", "N"),
        ("--kill-at", "N"),
        ("--rounds", "N"),
    ])?;
    Ok(Args {
        connections: f.get("--connections", 400)?,
        kill_at: f.get("--kill-at", 100)?,
        rounds: f.get("--rounds", 3)?,
    })
}

#[derive(Default, Clone)]
struct Outcome {
    failed: usize,
    to_dead_after_death: usize,
    /// From the death to the moment no new connection goes there any more.
    stopped_after: Option<Duration>,
}

/// One exchange: which backend answered (`None`: the connection failed).
fn ask(vip: SocketAddr) -> Option<String> {
    testbed::tcp_ask(vip, Duration::from_secs(4))
        .ok()
        .and_then(|r| r.split_whitespace().next().map(str::to_string))
}

fn iptables_dnat(topo: &Topology) -> Result<()> {
    // kube-proxy's iptables mode: one rule per backend with the probability
    // that makes the choice uniform.
    let lb = &topo.lb.name;
    let n = 3;
    for i in 0..n {
        let target = format!("{}:{IPTABLES_PORT}", FAM.backend(i));
        let mut rule = vec![
            "iptables",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            IPTABLES_VIP,
            "-p",
            "tcp",
            "--dport",
            "80",
        ];
        let probability = format!("{:.5}", 1.0 / (n - i) as f64);
        if i + 1 < n {
            rule.extend([
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &probability,
            ]);
        }
        rule.extend(["-j", "DNAT", "--to-destination", &target]);
        run_in(lb, &rule)?;
    }
    Ok(())
}

fn round(args: &Args, round: usize) -> Result<(Outcome, Outcome, f64)> {
    let topo = Topology::new("bf", 3)?;
    let mut servers: Vec<Vec<NameServer>> = Vec::new();
    for (i, ns) in topo.backends.iter().enumerate() {
        let mut pair = Vec::new();
        for port in [PORT, IPTABLES_PORT] {
            let addr = SocketAddr::new(FAM.backend(i), port);
            pair.push(NameServer::start(ns, addr, &format!("b{i}"))?);
        }
        servers.push(pair);
    }
    topo.warm_neighbours()?;
    // The iptables VIP is routed like Sluice's: via the LB, which forwards
    // by itself for iptables.
    topo.route_through_lb()?;
    iptables_dnat(&topo)?;

    let dir = TempDir::new("bf")?;
    let mut text = sluice_tests::interfaces_yaml(3);
    text += &format!(
        "services:\n  - name: web\n    vip: {SLUICE_VIP}\n    port: 80\n    protocol: tcp\n    failure:\n      consecutive_failures: 3\n      ejection_seconds: 300\n      retry_on_refused: true\n      min_distinct_clients: 1\n    backends:\n"
    );
    for i in 0..3 {
        text += &format!("      - address: {}:{PORT}\n", FAM.backend(i));
    }
    std::fs::write(dir.path("sluice.yaml"), text)?;
    let agent = Agent::start(&topo.lb, &dir.path("sluice.yaml"), dir.path("agent.log"))?;

    let sluice_vip: SocketAddr = format!("{SLUICE_VIP}:80").parse()?;
    let iptables_vip: SocketAddr = format!("{IPTABLES_VIP}:80").parse()?;
    let (mut sluice, mut iptables) = (Outcome::default(), Outcome::default());
    let mut died_at = None;
    let b1 = format!("{}:{PORT}", FAM.backend(1));
    let mut iptables_last_failure = None;
    for k in 0..args.connections {
        if k == args.kill_at {
            servers[1].clear();
            died_at = Some(Instant::now());
        }
        for (vip, outcome) in [(sluice_vip, &mut sluice), (iptables_vip, &mut iptables)] {
            let reply = topo.client.enter(|| ask(vip))?;
            match reply.as_deref() {
                None => {
                    outcome.failed += 1;
                    if vip == iptables_vip {
                        iptables_last_failure = Some(Instant::now());
                    }
                }
                Some("b1") if died_at.is_some() => bail!("b1 answered after it died"),
                _ => {}
            }
        }
        // Sluice has stopped using the dead backend once it is ejected.
        if let Some(died) = died_at
            && sluice.stopped_after.is_none()
        {
            let m = http_get(&topo.lb, agent.listen, "/metrics")?.1;
            let state = metric(
                &m,
                "sluice_backend_state",
                &[("backend", &b1), ("state", "ejected")],
            );
            if state == Some(1.0) {
                sluice.stopped_after = Some(died.elapsed());
            }
        }
    }
    iptables.stopped_after = None;
    let _ = iptables_last_failure;
    // Connections the dead backend got after its death: for Sluice, its
    // refusals (each retried); for iptables, every failure (it has no other).
    let m = http_get(&topo.lb, agent.listen, "/metrics")?.1;
    let refused = metric(
        &m,
        "sluice_backend_failures_total",
        &[("backend", &b1), ("reason", "refused")],
    )
    .unwrap_or(0.0);
    sluice.to_dead_after_death = refused as usize;
    iptables.to_dead_after_death = iptables.failed;
    let ejected = metric(
        &m,
        "sluice_backend_state",
        &[("backend", &b1), ("state", "ejected")],
    );
    if ejected != Some(1.0) {
        bail!("round {round}: b1 not ejected:\n{}", agent.log_text());
    }
    let elapsed = died_at.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
    drop(agent);
    drop(servers);
    Ok((sluice, iptables, elapsed))
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if args.kill_at >= args.connections {
        bail!("--kill-at must be below --connections");
    }
    println!(
        "\none of 3 backends dies after {} of {} new connections per system; {} rounds; \
         connections interleaved Sluice / iptables\n",
        args.kill_at, args.connections, args.rounds
    );
    println!(
        "{:<6} {:>14} {:>16} {:>24} {:>24} {:>20}",
        "round",
        "Sluice failed",
        "iptables failed",
        "Sluice conns to the dead",
        "iptables conns to dead",
        "Sluice stopped after"
    );
    let mut totals = (0, 0, 0, 0);
    for r in 0..args.rounds {
        let (s, i, elapsed) = round(&args, r)?;
        let stopped = s
            .stopped_after
            .map(|d| format!("{:.2} s", d.as_secs_f64()))
            .unwrap_or_else(|| "never".into());
        println!(
            "{:<6} {:>14} {:>16} {:>24} {:>24} {:>20}   (run lasted {elapsed:.1} s after the death; iptables: never stops)",
            r + 1,
            s.failed,
            i.failed,
            s.to_dead_after_death,
            i.to_dead_after_death,
            stopped
        );
        totals.0 += s.failed;
        totals.1 += i.failed;
        totals.2 += s.to_dead_after_death;
        totals.3 += i.to_dead_after_death;
    }
    let after = args.connections - args.kill_at;
    println!(
        "\nover {} rounds: Sluice {} failed connections, stopped using the dead backend after {} attempts per round (mean);\n\
         iptables {} failed connections ({:.0}% of the {} connections after the death), and never stops using it \
         until its rules change.",
        args.rounds,
        totals.0,
        totals.2 as f64 / args.rounds as f64,
        totals.1,
        100.0 * totals.1 as f64 / (after * args.rounds) as f64,
        after
    );
    Ok(())
}
