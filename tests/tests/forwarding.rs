//! Real TCP and UDP connections from a client namespace through the VIP to
//! backend namespaces, with the real `sluice` agent in the LB namespace.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use sluice_tests::{Agent, TempDir, http_get, metric};
use testbed::{Family, NameServer, Topology, tcp_ask, udp_ask};

const BACKEND_PORT: u16 = 8080;
const VIP_PORT: u16 = 80;
const TIMEOUT: Duration = Duration::from_secs(3);

struct Bed {
    topo: Topology,
    _servers: Vec<NameServer>,
    dir: TempDir,
    agent: Agent,
    family: Family,
}

struct Setup<'a> {
    family: Family,
    attach: &'a str,
    snat: bool,
    weights: &'a [u32],
    /// Leave the LB's neighbour tables empty: the first packets then take the
    /// kernel's path while it resolves them.
    cold: bool,
}

fn config_text(s: &Setup, weights: &[Option<u32>]) -> String {
    let mut text = String::from("interfaces:\n");
    let n = weights.len();
    for iface in std::iter::once("front".to_string()).chain((0..n).map(|i| format!("back{i}"))) {
        text += &format!("  - name: {iface}\n    attach: {}\n", s.attach);
    }
    text += "conntrack:\n  max_entries: 65536\nmaglev:\n  table_size: 4093\nservices:\n";
    for proto in ["tcp", "udp"] {
        text += &format!(
            "  - name: web-{proto}\n    vip: \"{}\"\n    port: {VIP_PORT}\n    protocol: {proto}\n",
            s.family.vip()
        );
        if s.snat {
            text += &format!(
                "    forwarding: snat\n    snat_ip: \"{}\"\n",
                s.family.snat()
            );
        }
        text += "    backends:\n";
        for (i, w) in weights.iter().enumerate() {
            if let Some(w) = w {
                let addr = SocketAddr::new(s.family.backend(i), BACKEND_PORT);
                text += &format!("      - address: \"{addr}\"\n        weight: {w}\n");
            }
        }
    }
    text
}

fn bed(tag: &str, s: Setup) -> Result<Bed> {
    let topo = Topology::new(tag, s.weights.len())?;
    let servers = topo.serve(s.family, BACKEND_PORT)?;
    if !s.cold {
        topo.warm_neighbours()?;
    }
    let dir = TempDir::new(tag)?;
    let weights: Vec<Option<u32>> = s.weights.iter().map(|w| Some(*w)).collect();
    std::fs::write(dir.path("sluice.yaml"), config_text(&s, &weights))?;
    let agent = Agent::start(&topo.lb, &dir.path("sluice.yaml"), dir.path("agent.log"))?;
    Ok(Bed {
        topo,
        _servers: servers,
        dir,
        agent,
        family: s.family,
    })
}

impl Bed {
    fn vip(&self) -> SocketAddr {
        SocketAddr::new(self.family.vip(), VIP_PORT)
    }

    /// `n` fresh connections (or datagram exchanges); counts per backend name
    /// and checks the source address each backend saw.
    fn spread(
        &self,
        n: usize,
        udp: bool,
        expect_source: IpAddr,
    ) -> Result<BTreeMap<String, usize>> {
        let vip = self.vip();
        let replies = self.topo.client.enter(|| -> Result<Vec<String>> {
            (0..n)
                .map(|i| {
                    if udp {
                        udp_ask(vip, 20_000 + i as u16, TIMEOUT)
                    } else {
                        tcp_ask(vip, TIMEOUT)
                    }
                    .with_context(|| format!("exchange {i} of {n} through {vip}"))
                })
                .collect()
        })??;
        let mut counts = BTreeMap::new();
        for reply in replies {
            let mut words = reply.split_whitespace();
            let (Some(name), Some(peer)) = (words.next(), words.next()) else {
                bail!("malformed reply {reply:?}");
            };
            let peer: SocketAddr = peer.parse()?;
            if peer.ip() != expect_source {
                bail!("backend {name} saw source {peer}, expected {expect_source}");
            }
            *counts.entry(name.to_string()).or_default() += 1;
        }
        Ok(counts)
    }

    fn metrics(&self) -> Result<String> {
        let (status, body) = http_get(&self.topo.lb, self.agent.listen, "/metrics")?;
        assert_eq!(status, 200);
        Ok(body)
    }
}

fn assert_even(counts: &BTreeMap<String, usize>, n: usize, backends: usize, what: &str) {
    assert_eq!(counts.values().sum::<usize>(), n, "{what}: {counts:?}");
    assert_eq!(
        counts.len(),
        backends,
        "{what}: every backend gets traffic: {counts:?}"
    );
    let even = n as f64 / backends as f64;
    for (name, &c) in counts {
        assert!(
            (c as f64 - even).abs() <= even * 0.2,
            "{what}: backend {name} got {c} of {n}, more than 20% off {even}: {counts:?}"
        );
    }
}

fn run_spread(
    tag: &str,
    family: Family,
    attach: &str,
    snat: bool,
    tcp_n: usize,
    udp_n: usize,
) -> Result<()> {
    let b = bed(
        tag,
        Setup {
            family,
            attach,
            snat,
            cold: false,
            weights: &[1, 1, 1],
        },
    )?;
    let source = if snat { family.snat() } else { family.client() };
    let tcp = b.spread(tcp_n, false, source)?;
    assert_even(&tcp, tcp_n, 3, "tcp");
    let udp = b.spread(udp_n, true, source)?;
    assert_even(&udp, udp_n, 3, "udp");

    // The agent's counters agree with what the backends saw.
    let m = b.metrics()?;
    for (i, _) in b.topo.backends.iter().enumerate() {
        let backend = SocketAddr::new(family.backend(i), BACKEND_PORT).to_string();
        let name = format!("b{i}");
        let got = metric(
            &m,
            "sluice_backend_connections_total",
            &[("service", "web-tcp"), ("backend", &backend)],
        );
        assert_eq!(
            got,
            Some(tcp[&name] as f64),
            "tcp connections of {backend}\n{m}"
        );
        let got = metric(
            &m,
            "sluice_backend_connections_total",
            &[("service", "web-udp"), ("backend", &backend)],
        );
        assert_eq!(got, Some(udp[&name] as f64), "udp exchanges of {backend}");
    }
    // On veth, auto picks tc: XDP can't forward what local senders send.
    let mode = if attach == "auto" { "tc" } else { attach };
    assert_eq!(
        metric(
            &m,
            "sluice_interface_attached",
            &[("interface", "front"), ("mode", mode)]
        ),
        Some(1.0)
    );
    // Nothing in this clean run was dropped.
    assert_eq!(
        metric(&m, "sluice_drops_total", &[]).unwrap_or(0.0),
        0.0,
        "{m}"
    );
    Ok(())
}

#[test]
fn ipv4_dnat_auto() -> Result<()> {
    run_spread("f4d", Family::V4, "auto", false, 600, 300)
}

#[test]
fn ipv6_dnat_auto() -> Result<()> {
    run_spread("f6d", Family::V6, "auto", false, 600, 300)
}

#[test]
fn ipv4_snat_auto() -> Result<()> {
    run_spread("f4s", Family::V4, "auto", true, 600, 300)
}

#[test]
fn ipv6_snat_auto() -> Result<()> {
    run_spread("f6s", Family::V6, "auto", true, 600, 300)
}

/// The mode asked for by name takes the same path `auto` chose above.
#[test]
fn ipv6_snat_tc() -> Result<()> {
    run_spread("f6t", Family::V6, "tc", true, 600, 300)
}

#[test]
fn weights_are_honoured() -> Result<()> {
    let b = bed(
        "fw",
        Setup {
            family: Family::V4,
            attach: "auto",
            snat: false,
            cold: false,
            weights: &[1, 2, 3],
        },
    )?;
    let n = 1200;
    let counts = b.spread(n, false, Family::V4.client())?;
    assert_eq!(counts.values().sum::<usize>(), n);
    for (i, w) in [1.0, 2.0, 3.0].iter().enumerate() {
        let want = n as f64 * w / 6.0;
        let got = *counts.get(&format!("b{i}")).unwrap_or(&0) as f64;
        assert!(
            (got - want).abs() <= want * 0.2,
            "b{i} (weight {w}) got {got}, want {want}: {counts:?}"
        );
    }
    Ok(())
}

/// A backend removed by a config change gets no new connections, while a
/// connection already established to it keeps working.
#[test]
fn removed_backend_keeps_established_connections() -> Result<()> {
    let setup = Setup {
        family: Family::V4,
        attach: "auto",
        snat: false,
        cold: false,
        weights: &[1, 1, 1],
    };
    let b = bed("fr", Setup { ..setup })?;
    let vip = b.vip();
    let mut stream = b.topo.client.enter(|| -> Result<TcpStream> {
        let mut s = TcpStream::connect_timeout(&vip, TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.write_all(b"echo\n")?;
        Ok(s)
    })??;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut first = String::new();
    reader.read_line(&mut first)?;
    let held: usize = first
        .trim_start_matches('b')
        .split_whitespace()
        .next()
        .context("reply")?
        .parse()?;

    // Rewrite the config without that backend (write to a new file, rename).
    let setup = Setup {
        family: Family::V4,
        attach: "auto",
        snat: false,
        cold: false,
        weights: &[1, 1, 1],
    };
    let weights: Vec<Option<u32>> = (0..3)
        .map(|i| if i == held { None } else { Some(1) })
        .collect();
    let path = b.dir.path("sluice.yaml");
    let tmp = b.dir.path("sluice.yaml.new");
    std::fs::write(&tmp, config_text(&setup, &weights))?;
    std::fs::rename(&tmp, &path)?;
    let removed = SocketAddr::new(Family::V4.backend(held), BACKEND_PORT).to_string();
    // It drains: listed as draining while its connection is open.
    let state_of_removed = || -> Result<Option<String>> {
        let (_, body) = http_get(&b.topo.lb, b.agent.listen, "/api/v1/services")?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        Ok(v["services"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["name"] == "web-tcp")
            .flat_map(|s| s["backends"].as_array().cloned().unwrap_or_default())
            .find(|b| b["address"] == removed.as_str())
            .map(|b| b["state"].as_str().unwrap_or("").to_string()))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while state_of_removed()?.as_deref() != Some("draining") {
        if Instant::now() > deadline {
            bail!(
                "backend {removed} not draining 10 s after the config change (state {:?}):\n{}",
                state_of_removed()?,
                b.agent.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    let counts = b.spread(300, false, Family::V4.client())?;
    assert!(
        !counts.contains_key(&format!("b{held}")),
        "draining backend b{held} got new connections: {counts:?}"
    );
    assert_eq!(counts.values().sum::<usize>(), 300);

    for line in ["still there?\n", "yes\n"] {
        stream.write_all(line.as_bytes())?;
        let mut echo = String::new();
        reader.read_line(&mut echo)?;
        assert_eq!(
            echo, line,
            "the established connection to the draining backend broke"
        );
    }

    // Its last connection closes: the drain ends and the backend is gone.
    drop(reader);
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(10);
    while state_of_removed()?.is_some() {
        if Instant::now() > deadline {
            bail!(
                "backend {removed} still listed 10 s after its last connection closed:\n{}",
                b.agent.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// With empty neighbour tables the first packet to each backend (and back to
/// the client) is handed to the kernel, which resolves the neighbour and
/// forwards it; every connection still completes.
fn run_cold(tag: &str, family: Family, snat: bool) -> Result<()> {
    let b = bed(
        tag,
        Setup {
            family,
            attach: "auto",
            snat,
            weights: &[1, 1, 1],
            cold: true,
        },
    )?;
    let source = if snat { family.snat() } else { family.client() };
    let counts = b.spread(60, false, source)?;
    assert_eq!(counts.values().sum::<usize>(), 60, "{counts:?}");
    let udp = b.spread(30, true, source)?;
    assert_eq!(udp.values().sum::<usize>(), 30, "{udp:?}");
    let m = b.metrics()?;
    let slow_path =
        metric(&m, "sluice_passed_total", &[("reason", "fib_no_neighbour")]).unwrap_or(0.0);
    assert!(
        slow_path >= 1.0,
        "the first packets went the kernel's way\n{m}"
    );
    Ok(())
}

#[test]
fn ipv4_dnat_cold_neighbours() -> Result<()> {
    run_cold("fc4", Family::V4, false)
}

#[test]
fn ipv4_snat_cold_neighbours() -> Result<()> {
    run_cold("fc4s", Family::V4, true)
}

#[test]
fn ipv6_snat_cold_neighbours() -> Result<()> {
    run_cold("fc6s", Family::V6, true)
}

/// The backend set changes 100 times (each applied at once on SIGHUP) while
/// a loop of connections runs: tables are swapped whole, so every connection
/// completes.
#[test]
fn every_connection_completes_while_the_backend_set_changes_100_times() -> Result<()> {
    let setup = Setup {
        family: Family::V4,
        attach: "auto",
        snat: false,
        cold: false,
        weights: &[1, 1, 1],
    };
    let b = bed("fs", Setup { ..setup })?;
    let vip = b.vip();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = std::sync::Arc::new(std::sync::Mutex::new((0usize, Vec::<String>::new())));
    let worker = {
        let (stop, done) = (stop.clone(), done.clone());
        b.topo.client.spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let result = tcp_ask(vip, TIMEOUT);
                let mut d = done.lock().unwrap();
                match result {
                    Ok(_) => d.0 += 1,
                    Err(e) => d.1.push(format!("{e:#}")),
                }
            }
        })?
    };
    let path = b.dir.path("sluice.yaml");
    let tmp = b.dir.path("sluice.yaml.new");
    let sets: [[Option<u32>; 3]; 5] = [
        [Some(1), Some(1), Some(1)],
        [None, Some(1), Some(1)],
        [Some(2), None, Some(1)],
        [Some(1), Some(3), None],
        [None, None, Some(1)],
    ];
    for k in 0..100 {
        std::fs::write(&tmp, config_text(&setup, &sets[k % sets.len()]))?;
        std::fs::rename(&tmp, &path)?;
        b.agent.reload()?;
        std::thread::sleep(Duration::from_millis(40));
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = worker.join();
    let (completed, failed) = done.lock().unwrap().clone();
    assert!(
        failed.is_empty(),
        "{} of {} connections failed: {:?}",
        failed.len(),
        completed + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        completed >= 100,
        "only {completed} connections ran during the changes"
    );
    let applied = b.agent.log_text().matches("config change applied").count();
    assert!(applied >= 50, "only {applied} of 100 changes were applied");
    Ok(())
}
