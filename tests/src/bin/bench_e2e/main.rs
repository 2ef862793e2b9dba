//! `cargo xtask bench e2e`: Sluice next to what users would run instead, on
//! one topology in one run: a client, an LB namespace, two nginx backends
//! on veths as the kernel makes them.
//!
//! Modes, interleaved round by round (A B C … A B C …): direct routing to
//! backend 0, kube-proxy's iptables DNAT (`statistic`) and nftables DNAT
//! (`numgen`) shapes, HAProxy in tcp mode, and Sluice in every attach mode
//! (a mode the agent refuses on veth is reported with its reason).
//!
//! Per mode and round: keep-alive requests/s and new connections/s
//! (`Connection: close`) with wrk, their p50/p99 latency, UDP
//! request/response rate with sockperf ping-pong, and the LB's CPU per
//! request: the load runs on one CPU and the LB on the other (see cpu.rs),
//! so the LB's share is read apart from the client's and the backends'.
//! Ratios are taken against iptables DNAT in the same round.
//!
//! Then the DSR row (dsr.rs): a response-heavy workload through Sluice with
//! direct server return, L2 and IPIP, against Sluice dnat (`--only dsr`
//! runs it with only the baseline of the main table).
//!
//! Artifacts kept out: the client uses the whole port range 1024–65535,
//! every mode starts with the LB's connection tracking flushed, and the
//! backends' TIME_WAIT sockets take a reused port's new SYN by its newer
//! timestamp (TCP timestamps on, as by default).

mod cpu;
mod dsr;
mod load;
mod modes;
mod servers;

use anyhow::Result;
use sluice_tests::{
    TempDir,
    bench::{Flags, stats},
};
use testbed::Topology;

use load::{Http, Udp};
use modes::{HTTP_PORT, Mode, UDP_PORT};

struct Args {
    rounds: usize,
    seconds: u32,
    connections: u32,
    /// Services configured besides the measured one (iptables, nftables,
    /// Sluice): what a lookup costs in a node with many Services.
    others: usize,
    /// Only the modes whose label contains this (iptables DNAT, the
    /// baseline, always runs).
    only: Option<String>,
}

fn parse_args() -> Result<Args> {
    let f = Flags::parse(&[
        ("--rounds", "N"),
        ("--seconds", "N"),
        ("--connections", "N"),
        ("--only", "MODE"),
        ("--services", "N"),
    ])?;
    Ok(Args {
        rounds: f.get("--rounds", 5)?,
        seconds: f.get("--seconds", 3)?,
        connections: f.get("--connections", 32)?,
        only: f.text("--only"),
        others: f.get::<usize>("--services", 1)?.saturating_sub(1),
    })
}

/// The attach modes tried; the agent refuses those that can't forward on
/// the device (native and generic XDP on veth), which is reported.
const ATTACH_MODES: [&str; 3] = ["tc", "xdp-native", "xdp-generic"];

/// One workload's result in one round, with the LB's CPU per request.
#[derive(Clone, Copy)]
struct Measured<T> {
    load: T,
    lb_us_per_request: f64,
    /// The part of it spent in the LB's processes (HAProxy, the agent).
    process_us_per_request: f64,
}

#[derive(Clone, Copy)]
struct Round {
    /// `LB_CPU`'s busy fraction with no load, just before this mode ran.
    background: f64,
    keep_alive: Measured<Http>,
    new_connections: Measured<Http>,
    udp: Option<Measured<Udp>>,
}

struct Row {
    mode: Mode,
    rounds: Vec<Round>,
    refused: Option<String>,
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let topo = Topology::new("be", 2)?;
    let dir = TempDir::new("be")?;
    topo.client
        .exec(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"])?;
    cpu::steer(&topo)?;
    let _servers = servers::start(&topo, &dir)?;

    let mut rows: Vec<Row> = [Mode::Direct, Mode::Iptables, Mode::Nftables, Mode::Haproxy]
        .into_iter()
        .chain(ATTACH_MODES.into_iter().map(Mode::Sluice))
        .filter(|m| {
            *m == Mode::Iptables
                || args
                    .only
                    .as_ref()
                    .is_none_or(|o| m.label().contains(o.as_str()))
        })
        .map(|mode| Row {
            mode,
            rounds: vec![],
            refused: None,
        })
        .collect();

    for round in 0..args.rounds {
        for row in rows.iter_mut().filter(|r| r.refused.is_none()) {
            eprintln!("round {}/{}: {}", round + 1, args.rounds, row.mode.label());
            match measure(&topo, row.mode, &dir, &args) {
                Ok(r) => row.rounds.push(r),
                Err(e) => match refusal(row.mode, &dir) {
                    Some(why) => row.refused = Some(why),
                    None => return Err(e.context(row.mode.label())),
                },
            }
        }
    }
    report(&rows, &args);
    // The DSR row has a topology of its own (one L2 segment).
    drop(_servers);
    drop(topo);
    if args
        .only
        .as_ref()
        .is_none_or(|o| o.to_lowercase().contains("dsr"))
    {
        dsr::run(&args)?;
    }
    Ok(())
}

/// Why the agent refused this Sluice mode at start-up, from its log.
fn refusal(mode: Mode, dir: &TempDir) -> Option<String> {
    let Mode::Sluice(attach) = mode else {
        return None;
    };
    let log = std::fs::read_to_string(dir.path(&format!("agent-{attach}.log"))).ok()?;
    log.lines()
        .find(|l| l.contains("refused"))
        .map(|l| l.trim().to_string())
}

/// One round of one mode: start it, warm it, measure, tear it down.
fn measure(topo: &Topology, mode: Mode, dir: &TempDir, args: &Args) -> Result<Round> {
    let background = cpu::background(1.0)?;
    let running = modes::start(topo, mode, args.others, dir)?;
    let lb = running.processes();
    let http = mode.target(HTTP_PORT);
    // Warm-up (discarded): neighbours resolved, servers' first accepts.
    load::wrk(&topo.client, http, false, 1, args.connections)?;
    let keep_alive = metered(
        &lb,
        background,
        |h: &Http| h.requests,
        || load::wrk(&topo.client, http, false, args.seconds, args.connections),
    )?;
    let new_connections = metered(
        &lb,
        background,
        |h: &Http| h.requests,
        || load::wrk(&topo.client, http, true, args.seconds, args.connections),
    )?;
    let udp = if mode.serves_udp() {
        let target = mode.target(UDP_PORT);
        Some(metered(
            &lb,
            background,
            |u: &Udp| u.requests,
            || load::sockperf(&topo.client, target, args.seconds),
        )?)
    } else {
        None
    };
    running.stop()?;
    Ok(Round {
        background,
        keep_alive,
        new_connections,
        udp,
    })
}

/// Runs `f` and divides the LB's CPU time spent meanwhile, less the
/// `background` busy fraction, by its requests.
fn metered<T>(
    lb: &[u32],
    background: f64,
    requests: impl Fn(&T) -> u64,
    f: impl FnOnce() -> Result<T>,
) -> Result<Measured<T>> {
    let before = cpu::LbCpu::read(lb)?;
    let load = f()?;
    let spent = cpu::LbCpu::read(lb)?.since(&before);
    let us = |seconds: f64| seconds * 1e6 / requests(&load).max(1) as f64;
    Ok(Measured {
        lb_us_per_request: us((spent.busy - background * spent.wall).max(0.0)),
        process_us_per_request: us(spent.processes),
        load,
    })
}

/// `value` of each round over the same round's iptables value.
fn ratios(row: &Row, base: &Row, value: impl Fn(&Round) -> Option<f64>) -> Vec<f64> {
    row.rounds
        .iter()
        .zip(&base.rounds)
        .filter_map(|(r, b)| Some(value(r)? / value(b)?))
        .collect()
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    stats(&values.collect::<Vec<_>>()).0
}

fn ratio_text(v: &[f64]) -> String {
    let v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return "—".into();
    }
    let (m, lo, hi) = stats(&v);
    format!("{m:.2} ({lo:.2}–{hi:.2})")
}

fn report(rows: &[Row], args: &Args) {
    let base = rows
        .iter()
        .find(|r| r.mode == Mode::Iptables)
        .expect("iptables is always measured");
    println!(
        "\nclient → LB → 2 nginx backends on veth; wrk -t1 -c{} for {} s, sockperf ping-pong for {} s; \
         {} interleaved rounds; load on CPU {}, LB on CPU {}",
        args.connections,
        args.seconds,
        args.seconds,
        args.rounds,
        cpu::LOAD_CPU,
        cpu::LB_CPU
    );
    if args.others > 0 {
        println!(
            "{} more TCP services configured before the measured one (iptables: rules a new \
             connection passes first; nftables and Sluice: entries of a hash lookup)",
            args.others
        );
    }
    println!(
        "medians; × iptables: the same round's ratio, median (min–max); LB µs: the LB \
         namespace's CPU per request (the time its CPU was not idle), procs: the part \
         in its processes (HAProxy, the agent)\n"
    );
    type Pick = fn(&Round) -> Option<Measured<Http>>;
    let http: [(&str, Pick); 2] = [
        ("keep-alive HTTP requests", |r| Some(r.keep_alive)),
        ("new connections (Connection: close)", |r| {
            Some(r.new_connections)
        }),
    ];
    for (title, pick) in http {
        println!("{title}");
        println!(
            "{:<20} {:>10} {:>8} {:>8} {:>7} {:>7} {:>7} {:>20} {:>20}",
            "mode",
            "per s",
            "p50 ms",
            "p99 ms",
            "LB µs",
            "procs",
            "errors",
            "× iptables rate",
            "× iptables LB CPU"
        );
        for row in rows {
            if let Some(why) = &row.refused {
                println!("{:<20} refused by the agent: {why}", row.mode.label());
                continue;
            }
            let m = |f: fn(&Measured<Http>) -> f64| {
                median(row.rounds.iter().filter_map(pick).map(|x| f(&x)))
            };
            let errors: u64 = row
                .rounds
                .iter()
                .filter_map(pick)
                .map(|x| x.load.errors)
                .sum();
            let rate = ratios(row, base, |r| pick(r).map(|x| x.load.per_second));
            let cpu = ratios(row, base, |r| pick(r).map(|x| x.lb_us_per_request));
            println!(
                "{:<20} {:>10.0} {:>8.3} {:>8.3} {:>7.1} {:>7.1} {:>7} {:>20} {:>20}",
                row.mode.label(),
                m(|x| x.load.per_second),
                m(|x| x.load.p50_ms),
                m(|x| x.load.p99_ms),
                m(|x| x.lb_us_per_request),
                m(|x| x.process_us_per_request),
                errors,
                ratio_text(&rate),
                ratio_text(&cpu)
            );
        }
        println!();
    }
    println!("UDP request/response (one in flight)");
    println!(
        "{:<20} {:>10} {:>8} {:>8} {:>7} {:>7} {:>20} {:>20}",
        "mode",
        "per s",
        "p50 µs",
        "p99 µs",
        "LB µs",
        "procs",
        "× iptables rate",
        "× iptables LB CPU"
    );
    for row in rows.iter().filter(|r| r.refused.is_none()) {
        let udp: Vec<Measured<Udp>> = row.rounds.iter().filter_map(|r| r.udp).collect();
        if udp.is_empty() {
            println!("{:<20} (no UDP)", row.mode.label());
            continue;
        }
        let rate = ratios(row, base, |r| r.udp.map(|u| u.load.per_second));
        let cpu = ratios(row, base, |r| r.udp.map(|u| u.lb_us_per_request));
        println!(
            "{:<20} {:>10.0} {:>8.1} {:>8.1} {:>7.1} {:>7.1} {:>20} {:>20}",
            row.mode.label(),
            median(udp.iter().map(|u| u.load.per_second)),
            median(udp.iter().map(|u| u.load.p50_us)),
            median(udp.iter().map(|u| u.load.p99_us)),
            median(udp.iter().map(|u| u.lb_us_per_request)),
            median(udp.iter().map(|u| u.process_us_per_request)),
            ratio_text(&rate),
            ratio_text(&cpu)
        );
    }
    let background: Vec<f64> = rows
        .iter()
        .flat_map(|r| r.rounds.iter().map(|x| x.background * 100.0))
        .collect();
    let (m, lo, hi) = stats(&background);
    println!(
        "\nCPU {} busy with no load (measured for 1 s before each mode, subtracted from \
         its LB µs): median {m:.1}% ({lo:.1}–{hi:.1}%); above a few percent, another \
         program shares the LB's CPU and the CPU figures are noisy",
        cpu::LB_CPU
    );
    targets(rows, base);
}

/// A target: what, the same-round ratios, the bound, and whether the
/// ratio must be at least (true) or at most (false) the bound.
type Target = (String, Vec<f64>, f64, bool);

/// The targets of issue #14, each with its measured ratio.
fn targets(rows: &[Row], iptables: &Row) {
    let haproxy = rows.iter().find(|r| r.mode == Mode::Haproxy);
    println!("\ntarget                                         measured (min–max)    verdict");
    for row in rows
        .iter()
        .filter(|r| matches!(r.mode, Mode::Sluice(_)) && r.refused.is_none())
    {
        let l = row.mode.label();
        let mut checks: Vec<Target> = vec![
            (
                format!("{l} keep-alive req/s ≥ 1.0× iptables"),
                ratios(row, iptables, |r| Some(r.keep_alive.load.per_second)),
                1.0,
                true,
            ),
            (
                format!("{l} new conn/s ≥ 1.0× iptables"),
                ratios(row, iptables, |r| Some(r.new_connections.load.per_second)),
                1.0,
                true,
            ),
            (
                format!("{l} LB CPU/req keep-alive ≤ 0.6× iptables"),
                ratios(row, iptables, |r| Some(r.keep_alive.lb_us_per_request)),
                0.6,
                false,
            ),
            (
                format!("{l} LB CPU/conn new conns ≤ 0.6× iptables"),
                ratios(row, iptables, |r| Some(r.new_connections.lb_us_per_request)),
                0.6,
                false,
            ),
        ];
        if let Some(haproxy) = haproxy {
            checks.push((
                format!("{l} keep-alive req/s ≥ 1.5× HAProxy"),
                ratios(row, haproxy, |r| Some(r.keep_alive.load.per_second)),
                1.5,
                true,
            ));
            checks.push((
                format!("{l} new conn/s ≥ 1.5× HAProxy"),
                ratios(row, haproxy, |r| Some(r.new_connections.load.per_second)),
                1.5,
                true,
            ));
        }
        for (what, v, bound, at_least) in checks {
            let finite: Vec<f64> = v.into_iter().filter(|x| x.is_finite()).collect();
            let verdict = match (finite.is_empty(), stats(&finite).0) {
                (true, _) => "no data",
                (false, m) if (at_least && m >= bound) || (!at_least && m <= bound) => "met",
                _ => "MISSED",
            };
            println!("{what:<46} {:>20}   {verdict}", ratio_text(&finite));
        }
    }
}
