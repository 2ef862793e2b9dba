//! `cargo xtask bench bulk`: one iperf3 TCP stream through the VIP in every
//! attach mode, IPv4 and IPv6, against direct routing to the same backend on
//! the same topology (devices as the kernel makes them), rounds interleaved.
//!
//! Reported per mode: the median throughput, its ratio to direct routing
//! (median, min–max over rounds), and the checksum errors the client and the
//! backend counted (`nstat` TcpInCsumErrors, UdpInCsumErrors). A mode that
//! can't forward on veth is refused by the agent; its reason is printed.

use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use sluice_tests::{
    Agent, Daemon, OneService, TempDir,
    bench::{Flags, stats},
    one_service_yaml_with, wait_for,
};
use testbed::{Family, Topology, checksum_errors as csum_errors};

const IPERF_PORT: u16 = 5201;
const MODES: [&str; 3] = ["tc", "xdp-native", "xdp-generic"];

struct Args {
    rounds: usize,
    seconds: u32,
}

fn parse_args() -> Result<Args> {
    let f = Flags::parse(&[("--rounds", "N"), ("--seconds", "N")])?;
    Ok(Args {
        rounds: f.get("--rounds", 5)?,
        seconds: f.get("--seconds", 3)?,
    })
}

/// One iperf3 run from the client to `target`: received bits per second.
fn iperf(topo: &Topology, target: IpAddr, seconds: u32) -> Result<f64> {
    let out = Command::new("ip")
        .args(["netns", "exec", &topo.client.name, "iperf3", "-J", "-c"])
        .arg(target.to_string())
        .args(["-p", &IPERF_PORT.to_string(), "-t", &seconds.to_string()])
        .args(["--connect-timeout", "3000"])
        .output()
        .context("running iperf3 (Debian package iperf3)")?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stdout)))?;
    if let Some(e) = json["error"].as_str() {
        bail!("iperf3 to {target}: {e}");
    }
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON without end.sum_received")
}

/// The VIP's port is iperf3's too: the same client command for both.
fn config(family: Family, mode: &str) -> String {
    one_service_yaml_with(&OneService {
        lb_interfaces: 1,
        family,
        snat: false,
        backend: SocketAddr::new(family.backend(0), IPERF_PORT),
        attach: Some(mode),
        port: IPERF_PORT,
    })
}

struct Row {
    label: String,
    /// Gbit/s per round.
    rates: Vec<f64>,
    ratios: Vec<f64>,
    csum_errors: u64,
    refused: Option<String>,
}

impl Row {
    fn new(label: String) -> Self {
        Self {
            label,
            rates: vec![],
            ratios: vec![],
            csum_errors: 0,
            refused: None,
        }
    }
}

/// Waits until iperf3 listens in the backend's namespace.
fn wait_listening(topo: &Topology, server: &Daemon) -> Result<()> {
    let filter = format!("sport = :{IPERF_PORT}");
    wait_for("iperf3 listening", Duration::from_secs(5), || {
        let out = Command::new("ip")
            .args(["netns", "exec", &topo.backends[0].name])
            .args(["ss", "-Hltn", &filter])
            .output()
            .context("running ss (Debian package iproute2)")?;
        Ok(out.status.success() && !out.stdout.is_empty())
    })
    .with_context(|| format!("iperf3 log:\n{}", server.log_text()))
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let topo = Topology::new("bb", 1)?;
    let dir = TempDir::new("bb")?;
    let server = Daemon::start(
        &topo.backends[0],
        "iperf3",
        &["-s".into(), "-p".into(), IPERF_PORT.to_string()],
        dir.path("iperf3.log"),
    )?;
    wait_listening(&topo, &server)?;
    // The baseline: the LB namespace routes to the backend by itself.
    topo.route_through_lb()?;
    topo.warm_neighbours()?;
    let mut rows: Vec<Row> = Vec::new();
    for family in [Family::V4, Family::V6] {
        let fam = if family == Family::V4 { "IPv4" } else { "IPv6" };
        let mut direct = Row::new(format!("{fam} direct routing"));
        let mut modes: Vec<Row> = MODES
            .iter()
            .map(|m| Row::new(format!("{fam} Sluice {m}")))
            .collect();
        for round in 0..args.rounds {
            eprintln!("{fam} round {}/{}", round + 1, args.rounds);
            let base = iperf(&topo, family.backend(0), args.seconds)? / 1e9;
            direct.rates.push(base);
            for (mode, row) in MODES.iter().zip(modes.iter_mut()) {
                if row.refused.is_some() {
                    continue;
                }
                let path = dir.path("sluice.yaml");
                std::fs::write(&path, config(family, mode))?;
                let log = dir.path(&format!("agent-{mode}.log"));
                let mut agent = match Agent::start(&topo.lb, &path, log.clone()) {
                    Ok(a) => a,
                    Err(e) => {
                        // A refusal (the mode can't forward here) is a
                        // result; any other failure is the benchmark's.
                        let text = std::fs::read_to_string(&log).unwrap_or_default();
                        let Some(why) = text.lines().find(|l| l.contains("refused")) else {
                            return Err(e.context(format!("{fam} Sluice {mode}")));
                        };
                        row.refused = Some(why.to_string());
                        continue;
                    }
                };
                let errors_before = csum_errors(&topo.client)? + csum_errors(&topo.backends[0])?;
                let rate = iperf(&topo, family.vip(), args.seconds)? / 1e9;
                row.csum_errors +=
                    csum_errors(&topo.client)? + csum_errors(&topo.backends[0])? - errors_before;
                agent.stop()?;
                row.rates.push(rate);
                row.ratios.push(rate / base);
            }
        }
        rows.push(direct);
        rows.extend(modes);
    }
    drop(server);
    println!(
        "\none iperf3 TCP stream, {} s per run, {} interleaved rounds; veths as the kernel makes them\n",
        args.seconds, args.rounds
    );
    println!(
        "{:<26} {:>12} {:>22} {:>16}",
        "mode", "Gbit/s", "× direct (min–max)", "csum errors"
    );
    for row in &rows {
        if let Some(why) = &row.refused {
            println!("{:<26} refused by the agent: {why}", row.label);
            continue;
        }
        let ratio = if row.ratios.is_empty() {
            "1.00 (baseline)".to_string()
        } else {
            let (median, lo, hi) = stats(&row.ratios);
            format!("{median:.2} ({lo:.2}–{hi:.2})")
        };
        println!(
            "{:<26} {:>12.2} {:>22} {:>16}",
            row.label,
            stats(&row.rates).0,
            ratio,
            row.csum_errors
        );
    }
    Ok(())
}
