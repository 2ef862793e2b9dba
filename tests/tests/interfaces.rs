//! Interfaces as a fleet has them: globs that match devices which appear
//! after start-up, and route/neighbour changes followed at once (rtnetlink),
//! not on a timer.
//!
//! "At once" still allows for the kernel's message to reach the agent and
//! the agent to act on it: 50 ms after a neighbour change (it takes well
//! under 1 ms here; a change not followed costs the SYN's 1 s
//! retransmission), and 2 s for a new interface, which the agent attaches
//! while the test is still wiring it.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::Result;
use sluice_tests::{Agent, Bed, backends_reached, http_get, metric, wait_for};
use testbed::{Family, NameServer, Topology, tcp_ask};

const VIP: &str = "10.100.0.1:80";

fn config(backends: usize) -> String {
    let mut text = String::from(
        "interfaces:\n  - name: front\n  - name: \"back*\"\nservices:\n  - name: web\n    vip: 10.100.0.1\n    port: 80\n    protocol: tcp\n    backends:\n",
    );
    for i in 0..backends {
        text += &format!("      - address: 10.1.{i}.2:8080\n");
    }
    text
}

fn attached_mode(topo: &Topology, agent: &Agent, iface: &str) -> Result<Option<f64>> {
    let m = http_get(&topo.lb, agent.listen, "/metrics")?.1;
    Ok(metric(
        &m,
        "sluice_interface_attached",
        &[("interface", iface), ("mode", "tc")],
    ))
}

/// `back*` attaches to the backends' veths present at start, and to one
/// that appears later (as a new pod's veth does): its backend then serves.
#[test]
fn a_glob_attaches_interfaces_that_appear_later() -> Result<()> {
    let mut b = Bed::new("ig", 2)?;
    let path = b.dir.path("sluice.yaml");
    std::fs::write(&path, config(2))?;
    let agent = Agent::start(&b.topo.lb, &path, b.dir.path("agent.log"))?;
    let topo = &mut b.topo;
    let vip: SocketAddr = VIP.parse()?;
    assert_eq!(backends_reached(topo, vip, 40)?.len(), 2);
    assert_eq!(attached_mode(topo, &agent, "back1")?, Some(1.0));

    let i = topo.add_backend()?;
    b.servers.push(NameServer::start(
        &topo.backends[i],
        SocketAddr::new(Family::V4.backend(i), 8080),
        &format!("b{i}"),
    )?);
    wait_for("back2 attached", Duration::from_secs(2), || {
        Ok(attached_mode(topo, &agent, "back2")? == Some(1.0))
    })?;
    assert!(agent.log_text().contains("interface appeared: attached"));
    std::fs::write(&path, config(3))?;
    agent.reload()?;
    wait_for("b2 serving", Duration::from_secs(10), || {
        Ok(backends_reached(topo, vip, 30)?.contains("b2"))
    })?;
    Ok(())
}

/// A backend's MAC address changes: once the LB's neighbour entry says so,
/// the next connection goes to the new address at once. (A cached FIB
/// result with the old MAC would lose its SYN, and the client would retry
/// only after a second.)
#[test]
fn a_neighbour_change_is_followed_at_once() -> Result<()> {
    let b = Bed::new("in", 1)?;
    let path = b.dir.path("sluice.yaml");
    std::fs::write(&path, config(1))?;
    let _agent = Agent::start(&b.topo.lb, &path, b.dir.path("agent.log"))?;
    let topo = &b.topo;
    let vip: SocketAddr = VIP.parse()?;
    for round in 0..5u8 {
        topo.client
            .enter(|| tcp_ask(vip, Duration::from_secs(3)))??;
        let mac = format!("02:00:00:00:aa:{round:02x}");
        topo.backends[0].exec(&["ip", "link", "set", "eth0", "address", &mac])?;
        topo.lb.exec(&[
            "ip",
            "neigh",
            "replace",
            &Family::V4.backend(0).to_string(),
            "lladdr",
            &mac,
            "dev",
            "back0",
        ])?;
        // The allowance for the change to reach the agent (see above).
        std::thread::sleep(Duration::from_millis(50));
        let started = Instant::now();
        topo.client
            .enter(|| tcp_ask(vip, Duration::from_secs(3)))??;
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(500),
            "round {round}: the connection after the MAC change took {took:?}"
        );
    }
    Ok(())
}
