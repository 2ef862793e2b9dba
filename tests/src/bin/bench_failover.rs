//! `cargo xtask bench failover`: one backend dies under a loop of new
//! connections; Sluice (retry on) and kube-proxy's iptables mode (DNAT with
//! `-m statistic --mode random`) side by side, on the same topology and the
//! same three backends, connections interleaved (Sluice, iptables, Sluice, …).
//!
//! Reported per system: connections that failed for the client, connections
//! sent to the dead backend after it died, and the time from its death to
//! the last connection that reached it.
//!
//! Then a refused first choice: of a service's two backends one has its port
//! closed, and each connect whose Maglev choice it is gets refused there. The
//! time from connect() to established of those connects (the kernel turns
//! the refusal into the client's SYN towards the other backend; before, the
//! connect waited for the client's SYN retransmission, about 1 s), beside
//! connects that went straight through the VIP and connects made directly to
//! the open backend (the LB namespace routing them), all interleaved in the
//! same run; with `--before-object FILE` also the retransmission-based retry
//! of an older build of the kernel programs, same run. `--only
//! death|refused` runs one part.

use std::{
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use std::io::{Read, Write};

use anyhow::{Context, Result, bail};
use sluice_tests::{
    Agent, TempDir,
    bench::{Flags, stats},
    http_get, metric,
};
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
    /// `death`, `refused`, or both (`None`).
    only: Option<String>,
    refused_rounds: usize,
    refused_connections: usize,
    before_object: Option<String>,
    before_connections: usize,
}

fn parse_args() -> Result<Args> {
    let f = Flags::parse(&[
        ("--connections", "N"),
        ("--kill-at", "N"),
        ("--rounds", "N"),
        ("--only", "death|refused"),
        ("--refused-rounds", "N"),
        ("--refused-connections", "N"),
        ("--before-object", "FILE"),
        ("--before-connections", "N"),
    ])?;
    let only = f.text("--only");
    if let Some(part) = &only
        && part != "death"
        && part != "refused"
    {
        bail!("--only {part:?}: death or refused");
    }
    Ok(Args {
        connections: f.get("--connections", 400)?,
        kill_at: f.get("--kill-at", 100)?,
        rounds: f.get("--rounds", 3)?,
        only,
        refused_rounds: f.get("--refused-rounds", 5)?,
        refused_connections: f.get("--refused-connections", 200)?,
        before_object: f.text("--before-object"),
        before_connections: f.get("--before-connections", 20)?,
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
    if args.only.as_deref() != Some("refused") {
        death(&args)?;
    }
    if args.only.as_deref() != Some("death") {
        refused(&args)?;
    }
    Ok(())
}

/// Connect times (µs) of one kind of connection, and its failures.
#[derive(Default)]
struct Times {
    micros: Vec<f64>,
    failed: usize,
}

impl Times {
    fn add(&mut self, outcome: Result<Duration>) {
        match outcome {
            Ok(d) => self.micros.push(d.as_secs_f64() * 1e6),
            Err(_) => self.failed += 1,
        }
    }

    /// The `q` quantile (0..=1) of the times, nearest rank.
    fn quantile(&self, q: f64) -> f64 {
        if self.micros.is_empty() {
            return f64::NAN;
        }
        let mut v = self.micros.clone();
        v.sort_by(f64::total_cmp);
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v[rank - 1]
    }
}

/// One connection to `target` from inside the client namespace: the time
/// from connect() to established (connect() returns on the SYN-ACK), then
/// one exchange, which must succeed for the connection to count.
fn timed_connect(target: SocketAddr) -> Result<Duration> {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(4))
        .with_context(|| format!("connecting to {target}"))?;
    let took = start.elapsed();
    s.set_read_timeout(Some(Duration::from_secs(4)))?;
    s.write_all(b"hello\n")?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    if !reply.starts_with("b0") {
        bail!("{target} answered {reply:?}");
    }
    Ok(took)
}

/// The refusals counted for `closed` so far by the agent.
fn refusals(topo: &Topology, agent: &Agent, closed: SocketAddr) -> Result<f64> {
    let m = http_get(&topo.lb, agent.listen, "/metrics")?.1;
    let closed = closed.to_string();
    Ok(metric(
        &m,
        "sluice_backend_failures_total",
        &[("backend", &closed), ("reason", "refused")],
    )
    .unwrap_or(0.0))
}

/// `n` connects through `vip`, each classified by whether the agent counted
/// a refusal of `closed` on it, and (`direct`) each followed by one
/// directly to that address: (refused first, straight, direct).
fn connects(
    topo: &Topology,
    agent: &Agent,
    vip: SocketAddr,
    closed: SocketAddr,
    direct: Option<SocketAddr>,
    n: usize,
) -> Result<(Times, Times, Times)> {
    let (mut first_refused, mut straight, mut direct_times) =
        (Times::default(), Times::default(), Times::default());
    for _ in 0..n {
        let before = refusals(topo, agent, closed)?;
        let through_vip = topo.client.enter(|| timed_connect(vip))?;
        if refusals(topo, agent, closed)? > before {
            first_refused.add(through_vip);
        } else {
            straight.add(through_vip);
        }
        if let Some(to) = direct {
            direct_times.add(topo.client.enter(|| timed_connect(to))?);
        }
    }
    Ok((first_refused, straight, direct_times))
}

/// The refused first choice, `--refused-rounds` rounds of
/// `--refused-connections` pairs (a connect through the VIP, then one
/// directly to the open backend). With `--before-object FILE` (a build of
/// the kernel programs without the immediate resend, e.g. main's), each
/// round then restarts the agent on it for `--before-connections` connects
/// through the VIP: the retransmission-based retry, measured in the same
/// run.
fn refused(args: &Args) -> Result<()> {
    let topo = Topology::new("bq", 2)?;
    // Backend 0 serves; backend 1's port is closed (it refuses).
    let open = SocketAddr::new(FAM.backend(0), PORT);
    let closed = SocketAddr::new(FAM.backend(1), PORT);
    let _server = NameServer::start(&topo.backends[0], open, "b0")?;
    // Direct connects go to another port of it: a client port reused for
    // both must not make a direct connect's replies look like a flow's.
    let direct_to = SocketAddr::new(FAM.backend(0), IPTABLES_PORT);
    let _direct_server = NameServer::start(&topo.backends[0], direct_to, "b0")?;
    topo.warm_neighbours()?;
    // Direct connects are routed by the LB namespace's kernel (Sluice
    // passes what is not for a VIP).
    topo.route_through_lb()?;
    let dir = TempDir::new("bq")?;
    let mut text = sluice_tests::interfaces_yaml(2);
    // Never ejected: every round has refusals to measure.
    text += &format!(
        "services:\n  - name: web\n    vip: {SLUICE_VIP}\n    port: 80\n    protocol: tcp\n    failure:\n      consecutive_failures: 1000000000\n      retry_on_refused: true\n    backends:\n      - address: {open}\n      - address: {closed}\n"
    );
    let config = dir.path("sluice.yaml");
    std::fs::write(&config, text)?;
    let vip: SocketAddr = format!("{SLUICE_VIP}:80").parse()?;

    println!(
        "\na refused first choice: 2 backends, one with its port closed; {} rounds of {} connects \
         through the VIP, each followed by one directly to the open backend{}\n",
        args.refused_rounds,
        args.refused_connections,
        match &args.before_object {
            Some(o) => format!(
                "; then {} through the VIP with the kernel programs of {o}",
                args.before_connections
            ),
            None => String::new(),
        }
    );
    println!(
        "{:<6} {:>9} {:>10} {:>10} {:>9} {:>10} {:>11} {:>11} {:>10} {:>15} {:>9}",
        "round",
        "refused",
        "p50 µs",
        "p99 µs",
        "straight",
        "p50 µs",
        "direct p50",
        "direct p99",
        "p50 ratio",
        "before: refused",
        "p50 µs"
    );
    let (mut all_refused, mut all_direct, mut all_straight, mut all_before) = (
        Times::default(),
        Times::default(),
        Times::default(),
        Times::default(),
    );
    let (mut p50_ratios, mut p99_ratios) = (Vec::new(), Vec::new());
    let mut failed = 0;
    for round in 0..args.refused_rounds {
        let agent = Agent::start(&topo.lb, &config, dir.path("agent.log"))?;
        let (first_refused, straight, direct) = connects(
            &topo,
            &agent,
            vip,
            closed,
            Some(direct_to),
            args.refused_connections,
        )?;
        drop(agent);
        let before = match &args.before_object {
            Some(object) => {
                let agent = Agent::start_with(
                    &topo.lb,
                    &config,
                    dir.path("agent-before.log"),
                    &["--ebpf-object", object],
                )?;
                let (before, straight_before, _) =
                    connects(&topo, &agent, vip, closed, None, args.before_connections)?;
                failed += straight_before.failed;
                before
            }
            None => Times::default(),
        };
        let failures = first_refused.failed + straight.failed + direct.failed + before.failed;
        failed += failures;
        let p50_ratio = first_refused.quantile(0.5) / direct.quantile(0.5);
        let p99_ratio = first_refused.quantile(0.99) / direct.quantile(0.99);
        p50_ratios.push(p50_ratio);
        p99_ratios.push(p99_ratio);
        println!(
            "{:<6} {:>9} {:>10.0} {:>10.0} {:>9} {:>10.0} {:>11.0} {:>11.0} {:>9.2}× {:>15} {:>9.0}",
            round + 1,
            first_refused.micros.len(),
            first_refused.quantile(0.5),
            first_refused.quantile(0.99),
            straight.micros.len(),
            straight.quantile(0.5),
            direct.quantile(0.5),
            direct.quantile(0.99),
            p50_ratio,
            before.micros.len(),
            before.quantile(0.5),
        );
        all_refused.micros.extend(first_refused.micros);
        all_straight.micros.extend(straight.micros);
        all_direct.micros.extend(direct.micros);
        all_before.micros.extend(before.micros);
    }
    let (p50_median, p50_lo, p50_hi) = stats(&p50_ratios);
    let (p99_median, p99_lo, p99_hi) = stats(&p99_ratios);
    println!(
        "\nall rounds: connect() to established, a refused first choice: p50 {:.0} µs, p99 {:.0} µs \
         ({} connects); through the VIP straight: p50 {:.0} µs; direct: p50 {:.0} µs, p99 {:.0} µs\n\
         ratio to direct, per round: p50 {p50_median:.2}× ({p50_lo:.2}–{p50_hi:.2}), \
         p99 {p99_median:.2}× ({p99_lo:.2}–{p99_hi:.2}); client-visible failures: {failed}; \
         target: p99 < 5 ms",
        all_refused.quantile(0.5),
        all_refused.quantile(0.99),
        all_refused.micros.len(),
        all_straight.quantile(0.5),
        all_direct.quantile(0.5),
        all_direct.quantile(0.99),
    );
    if all_before.micros.is_empty() {
        println!(
            "(before: a refused first choice waits for the client's SYN retransmission, about \
             1 s; --before-object FILE measures it)"
        );
    } else {
        println!(
            "before (the retransmission-based retry), same run: a refused first choice p50 {:.0} µs, \
             p99 {:.0} µs ({} connects): {:.0}× the p50 now",
            all_before.quantile(0.5),
            all_before.quantile(0.99),
            all_before.micros.len(),
            all_before.quantile(0.5) / all_refused.quantile(0.5),
        );
    }
    if failed > 0 {
        bail!("{failed} client-visible failures");
    }
    Ok(())
}

/// The death of a backend under new connections, Sluice beside iptables.
fn death(args: &Args) -> Result<()> {
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
        let (s, i, elapsed) = round(args, r)?;
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
