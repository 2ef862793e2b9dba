//! A SYN flood from random spoofed sources (inside the test's own range,
//! routed back to the client's namespace, whose kernel resets the SYN-ACKs
//! as a real network's hosts would) for 10 seconds, against the real agent
//! in its default attach mode. Meanwhile established connections of three
//! kinds idle (client-first, server-first, SNAT) and new connections keep
//! arriving. Every established connection must survive, and at least 99% of
//! the new ones complete: connects being made live in their own table, and a
//! flood churns that one only.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, bail, ensure};
use sluice_tests::{
    Agent, StopOnDrop, TempDir, flood, http_get, metric,
    raw::{RawSender, mac_of},
};
use testbed::{Family, Netns, Topology};

const FAM: Family = Family::V4;
/// The echo servers (client-first: the client speaks, the server answers).
const ECHO_PORT: u16 = 8080;
/// The push servers (server-first: they speak on their own, every second).
const PUSH_PORT: u16 = 9090;
const FLOOD: Duration = Duration::from_secs(10);
const EACH_KIND: usize = 10;

fn vip_snat() -> IpAddr {
    Ipv4Addr::new(10, 100, 0, 2).into()
}

fn config(backends: usize) -> String {
    let mut text = sluice_tests::interfaces_yaml(backends);
    text += "services:\n";
    for (name, vip, port, backend_port, snat) in [
        ("echo", FAM.vip(), 80, ECHO_PORT, false),
        ("push", FAM.vip(), 90, PUSH_PORT, false),
        ("echo-snat", vip_snat(), 80, ECHO_PORT, true),
    ] {
        text += &format!("  - name: {name}\n    vip: {vip}\n    port: {port}\n    protocol: tcp\n");
        if snat {
            text += &format!("    forwarding: snat\n    snat_ip: {}\n", FAM.snat());
        }
        text += "    backends:\n";
        for i in 0..backends {
            text += &format!(
                "      - address: {}\n",
                SocketAddr::new(FAM.backend(i), backend_port)
            );
        }
    }
    text
}

/// An idle connection and how to tell it still works.
enum Idle {
    /// Answers a line with the same line.
    Echo(BufReader<TcpStream>),
    /// Keeps receiving the server's pushes.
    Push(BufReader<TcpStream>),
}

impl Idle {
    fn still_works(&mut self) -> Result<()> {
        let mut line = String::new();
        match self {
            Idle::Echo(r) => {
                r.get_mut().write_all(b"still there?\n")?;
                r.read_line(&mut line)?;
                ensure!(line == "still there?\n", "echoed {line:?}");
            }
            Idle::Push(r) => {
                // What came during the flood is drained; then a push must
                // come from after it.
                let stream = r.get_mut();
                stream.set_nonblocking(true)?;
                let mut drained = [0u8; 4096];
                while let Ok(n) = stream.read(&mut drained) {
                    ensure!(n > 0, "the server closed the connection");
                }
                stream.set_nonblocking(false)?;
                let mut fresh = [0u8; 5];
                stream.read_exact(&mut fresh)?;
                ensure!(fresh.contains(&b'\n'), "pushed {fresh:?}");
            }
        }
        Ok(())
    }
}

fn open_idle(client: &Netns, target: SocketAddr, push: bool) -> Result<Idle> {
    client.enter(move || -> Result<Idle> {
        let stream = TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut r = BufReader::new(stream);
        let mut line = String::new();
        if push {
            r.read_line(&mut line)?;
            ensure!(line == "push\n", "first push {line:?}");
            return Ok(Idle::Push(r));
        }
        // The echo servers' protocol: "echo", their name, then echoes.
        r.get_mut().write_all(b"echo\n")?;
        r.read_line(&mut line)?;
        ensure!(!line.is_empty(), "no greeting from {target}");
        Ok(Idle::Echo(r))
    })?
}

#[test]
fn established_connections_survive_a_syn_flood_and_new_ones_complete() -> Result<()> {
    let topo = Topology::new("fl", 3)?;
    let _servers = topo.serve(FAM, ECHO_PORT)?;
    let guard = StopOnDrop::new();
    for (i, ns) in topo.backends.iter().enumerate() {
        sluice_tests::start_push_server(
            ns,
            SocketAddr::new(FAM.backend(i), PUSH_PORT),
            Duration::from_secs(1),
            guard.flag(),
        )?;
    }
    topo.warm_neighbours()?;
    // The flood's sources belong to the client's side: the LB routes them
    // there, and the client's kernel takes them as its own (and resets the
    // SYN-ACKs it never asked for).
    flood::route_sources(&topo)?;

    let dir = TempDir::new("fl")?;
    std::fs::write(dir.path("sluice.yaml"), config(3))?;
    let agent = Agent::start(&topo.lb, &dir.path("sluice.yaml"), dir.path("agent.log"))?;

    let echo = SocketAddr::new(FAM.vip(), 80);
    let push = SocketAddr::new(FAM.vip(), 90);
    let snat = SocketAddr::new(vip_snat(), 80);
    let mut idle = Vec::new();
    for _ in 0..EACH_KIND {
        idle.push(("client-first", open_idle(&topo.client, echo, false)?));
        idle.push(("server-first", open_idle(&topo.client, push, true)?));
        idle.push(("snat", open_idle(&topo.client, snat, false)?));
    }

    let lb_mac = mac_of(&topo.lb, "front")?;
    let sender = RawSender::open(&topo.client, "eth0")?;
    let flooding = Arc::new(AtomicBool::new(false));
    let (attempts, completed) = (AtomicU64::new(0), AtomicU64::new(0));
    let sent = thread::scope(|scope| -> Result<u64> {
        let flooder = {
            let stop = flooding.clone();
            let IpAddr::V4(vip) = FAM.vip() else {
                unreachable!("FAM is IPv4")
            };
            let target = SocketAddrV4::new(vip, 80);
            scope.spawn(move || flood::syn_flood(&sender, lb_mac, target, 0x9e37_79b9, &stop))
        };
        // New connections all through the flood, one at a time.
        let started = Instant::now();
        while started.elapsed() < FLOOD {
            attempts.fetch_add(1, Ordering::Relaxed);
            let answered = topo
                .client
                .enter(|| testbed::tcp_ask(echo, Duration::from_secs(5)))?;
            if answered.is_ok() {
                completed.fetch_add(1, Ordering::Relaxed);
            }
            thread::sleep(Duration::from_millis(20));
        }
        flooding.store(true, Ordering::Relaxed);
        Ok(flooder.join().expect("flood thread"))
    })?;

    let metrics = http_get(&topo.lb, agent.listen, "/metrics")?.1;
    let value = |name: &str| metric(&metrics, name, &[]).unwrap_or(0.0);
    println!(
        "flood: {sent} SYNs in {FLOOD:?} ({:.0}/s); conntrack entries {}, half-open {} of {}",
        sent as f64 / FLOOD.as_secs_f64(),
        value("sluice_conntrack_entries"),
        value("sluice_conntrack_half_open_entries"),
        value("sluice_conntrack_half_open_capacity"),
    );
    ensure!(sent > 100_000, "the flood sent only {sent} SYNs");

    let (n, ok) = (
        attempts.load(Ordering::Relaxed),
        completed.load(Ordering::Relaxed),
    );
    println!("new connections during the flood: {ok} of {n} completed");
    ensure!(
        ok * 100 >= n * 99,
        "only {ok} of {n} new connections completed during the flood"
    );

    let mut broken = Vec::new();
    for (kind, conn) in &mut idle {
        if let Err(e) = conn.still_works() {
            broken.push(format!("{kind}: {e:#}"));
        }
    }
    if !broken.is_empty() {
        bail!(
            "{} of {} established connections broke: {broken:?}\n{}",
            broken.len(),
            idle.len(),
            agent.log_text()
        );
    }
    Ok(())
}
