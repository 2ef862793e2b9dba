//! Consistency across nodes: two agents, each in its own LB namespace with
//! the same config, must send the same 5-tuple to the same backend (ECMP in
//! front of several nodes may hand a connection's packets to any of them).
//! Then one node learns of a removed backend before the other: only the
//! tuples that were on that backend may disagree.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use anyhow::{Context, Result};
use sluice_tests::{Agent, TempDir, backend_states, tcp_ask_from, wait_for};
use testbed::{Family, NameServer, Topology, udp_ask};

const TUPLES: u16 = 1000;
const FIRST_PORT: u16 = 21_000;

struct Node {
    topo: Topology,
    _servers: Vec<NameServer>,
    dir: TempDir,
    agent: Agent,
}

fn config(backends: &[(usize, u32)]) -> String {
    let mut text = sluice_tests::interfaces_yaml(4);
    text += "services:\n";
    for proto in ["tcp", "udp"] {
        text += &format!(
            "  - name: web-{proto}\n    vip: 10.100.0.1\n    port: 80\n    protocol: {proto}\n    drain_timeout_seconds: 0\n    backends:\n"
        );
        for (i, weight) in backends {
            text += &format!("      - address: 10.1.{i}.2:8080\n        weight: {weight}\n");
        }
    }
    text
}

fn node(tag: &str, backends: &[(usize, u32)]) -> Result<Node> {
    let topo = Topology::new(tag, 4)?;
    let servers = topo.serve(Family::V4, 8080)?;
    topo.warm_neighbours()?;
    let dir = TempDir::new(tag)?;
    std::fs::write(dir.path("sluice.yaml"), config(backends))?;
    let agent = Agent::start(&topo.lb, &dir.path("sluice.yaml"), dir.path("agent.log"))?;
    Ok(Node {
        topo,
        _servers: servers,
        dir,
        agent,
    })
}

/// A TCP connection from the client's address and `port` to the VIP: the
/// name of the backend that answered.
fn tcp_from(port: u16) -> Result<String> {
    let vip: SocketAddr = "10.100.0.1:80".parse()?;
    let local: SocketAddr = SocketAddr::new(Family::V4.client(), port);
    let reply = tcp_ask_from(local, vip, Duration::from_secs(3))?;
    Ok(reply.split_whitespace().next().unwrap_or("").to_string())
}

/// Backend name per client port, for TCP and UDP tuples.
fn choices(n: &Node, first_port: u16) -> Result<BTreeMap<(char, u16), String>> {
    let vip: SocketAddr = "10.100.0.1:80".parse()?;
    n.topo
        .client
        .enter(|| -> Result<BTreeMap<(char, u16), String>> {
            let mut out = BTreeMap::new();
            for port in first_port..first_port + TUPLES {
                let name = tcp_from(port).with_context(|| format!("TCP from port {port}"))?;
                out.insert(('t', port), name);
                let reply = udp_ask(vip, port, Duration::from_secs(3))
                    .with_context(|| format!("UDP from port {port}"))?;
                out.insert(
                    ('u', port),
                    reply.split_whitespace().next().unwrap_or("").to_string(),
                );
            }
            Ok(out)
        })?
}

#[test]
fn two_nodes_choose_the_same_backend_for_the_same_tuples() -> Result<()> {
    let weighted = [(0, 1), (1, 2), (2, 1), (3, 3)];
    let a = node("ca", &weighted)?;
    let b = node("cb", &weighted)?;

    let on_a = choices(&a, FIRST_PORT)?;
    let on_b = choices(&b, FIRST_PORT)?;
    let differ: Vec<_> = on_a
        .iter()
        .filter(|(k, v)| on_b.get(*k) != Some(*v))
        .collect();
    assert!(
        differ.is_empty(),
        "{} of {} tuples went to different backends, e.g. {:?}",
        differ.len(),
        on_a.len(),
        &differ[..differ.len().min(5)]
    );
    // Every backend got its weighted share on both (the choice is not
    // degenerate): backend 3 (weight 3) well above backend 0 (weight 1).
    let count = |name: &str| on_a.values().filter(|v| *v == name).count();
    assert!(
        count("b3") > 2 * count("b0"),
        "{:?}",
        [count("b0"), count("b3")]
    );

    // Node A learns first that backend 1 is gone; B still has it. New
    // tuples (fresh ports) disagree only where B picks backend 1.
    std::fs::write(a.dir.path("sluice.yaml"), config(&[(0, 1), (2, 1), (3, 3)]))?;
    wait_for("backend 1 removed on A", Duration::from_secs(10), || {
        Ok(!backend_states(&a.topo.lb, &a.agent, "web-tcp")?.contains_key("10.1.1.2:8080"))
    })?;
    let next = FIRST_PORT + TUPLES;
    let on_a = choices(&a, next)?;
    let on_b = choices(&b, next)?;
    // Backend 1's tuples must all move; Maglev moves few others (a slot
    // freed by backend 1 can displace a neighbour's claim).
    let (mut moved_off_1, mut moved_other) = (0, 0);
    for (k, v) in &on_a {
        let other = &on_b[k];
        assert_ne!(
            v, "b1",
            "tuple {k:?} still went to the removed backend on A"
        );
        if other != v {
            if other == "b1" {
                moved_off_1 += 1;
            } else {
                moved_other += 1;
            }
        }
    }
    let on_1 = on_b.values().filter(|v| *v == "b1").count();
    assert_eq!(moved_off_1, on_1);
    assert!(
        moved_other * 100 <= on_a.len() * 3,
        "{moved_other} of {} tuples not on backend 1 moved too",
        on_a.len()
    );
    eprintln!(
        "while the nodes disagree, {} of {} tuples ({:.1}%) differ: {on_1} that were on the removed backend, {moved_other} others",
        on_1 + moved_other,
        on_a.len(),
        100.0 * (on_1 + moved_other) as f64 / on_a.len() as f64
    );
    Ok(())
}
