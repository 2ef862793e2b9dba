//! Connection lifecycle like a real conntrack: closed and idle flows leave
//! the map after their state's timeout, an SNAT flow's port returns to the
//! pool, and the active-connections gauge follows flows that expire.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use sluice_tests::{Agent, Bed, http_get, metric, wait_for};
use testbed::{checksum_errors, tcp_ask, udp_ask};

const VIP: &str = "10.100.0.1:80";
const TIMEOUT: Duration = Duration::from_secs(3);

fn start(b: &Bed, extra: &str) -> Result<Agent> {
    let text = format!(
        "{}conntrack:\n  max_entries: 65536\n{extra}services:\n\
         \x20 - name: web\n    vip: 10.100.0.1\n    port: 80\n    protocol: tcp\n    forwarding: snat\n    snat_ip: 10.0.1.1\n    backends:\n      - address: 10.1.0.2:8080\n\
         \x20 - name: dns\n    vip: 10.100.0.1\n    port: 80\n    protocol: udp\n    forwarding: snat\n    snat_ip: 10.0.1.1\n    backends:\n      - address: 10.1.0.2:8080\n",
        sluice_tests::interfaces_yaml(1)
    );
    let path = b.dir.path("sluice.yaml");
    std::fs::write(&path, text)?;
    Agent::start(&b.topo.lb, &path, b.dir.path("agent.log"))
}

/// `n` established connections from the client that then stay idle (the
/// backend echoes; nothing more is sent).
fn idle_connections(b: &Bed, vip: SocketAddr, n: usize) -> Result<Vec<TcpStream>> {
    b.topo.client.enter(|| {
        (0..n)
            .map(|_| {
                let mut s = TcpStream::connect_timeout(&vip, TIMEOUT)?;
                s.set_read_timeout(Some(TIMEOUT))?;
                s.write_all(b"echo\n")?;
                let mut first = [0u8; 64];
                let _ = s.read(&mut first)?;
                Ok(s)
            })
            .collect()
    })?
}

fn metrics(b: &Bed, agent: &Agent) -> Result<String> {
    Ok(http_get(&b.topo.lb, agent.listen, "/metrics")?.1)
}

/// A metric's value; an error if the agent doesn't export it (a missing
/// series must not read as zero).
fn value(m: &str, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    metric(m, name, labels).with_context(|| format!("{name} missing (labels {labels:?})"))
}

/// 100,000 short connections in a row through an snat service with one
/// backend: the SNAT range holds 64,512 ports, so ports serve several
/// connections; closed flows must give theirs back, and a port must not come
/// round while the backend still holds its last connection in TIME_WAIT
/// (the SYN would be refused and retransmitted). None may fail.
#[test]
fn a_hundred_thousand_short_snat_connections_in_a_row() -> Result<()> {
    let b = Bed::new("lc", 1)?;
    let agent = start(&b, "")?;
    let vip: SocketAddr = VIP.parse()?;
    let n = 100_000;
    let started = Instant::now();
    let failures = b.topo.client.enter(|| {
        let mut failures = Vec::new();
        for i in 0..n {
            if let Err(e) = tcp_ask(vip, TIMEOUT) {
                failures.push(format!("connection {i}: {e:#}"));
            }
        }
        failures
    })?;
    let took = started.elapsed();
    let m = metrics(&b, &agent)?;
    for ns in [&b.topo.client, &b.topo.backends[0]] {
        assert_eq!(checksum_errors(ns)?, 0, "checksum errors in {}", ns.name);
    }
    assert!(
        failures.is_empty(),
        "{} of {n} connections failed in {took:?}, first: {:?}\n{m}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    assert_eq!(
        value(
            &m,
            "sluice_drops_total",
            &[("reason", "snat_ports_exhausted")]
        )?,
        0.0
    );
    assert_eq!(
        value(
            &m,
            "sluice_backend_connections_total",
            &[("service", "web")]
        )?,
        n as f64,
        "{m}"
    );
    eprintln!(
        "{n} connections in {took:?} ({:.0}/s); conntrack entries at the end: {}",
        n as f64 / took.as_secs_f64(),
        value(&m, "sluice_conntrack_entries", &[])?
    );
    // Closed flows wait out TIME_WAIT (10 s by default), then the sweep
    // removes both entries of each.
    wait_for(
        "conntrack entries back near zero",
        Duration::from_secs(30),
        || Ok(value(&metrics(&b, &agent)?, "sluice_conntrack_entries", &[])? <= 4.0),
    )?;
    Ok(())
}

/// Idle flows expire by state: an established connection after
/// `tcp_established`, a UDP flow after `udp`. The active-connections gauge
/// drops the expired connections; the entries by state show each phase.
#[test]
fn idle_flows_expire_and_leave_the_active_gauge() -> Result<()> {
    let b = Bed::new("li", 1)?;
    let agent = start(
        &b,
        "  timeouts:\n    tcp_established: 3\n    udp: 3\n    tcp_time_wait: 4\n",
    )?;
    let vip: SocketAddr = VIP.parse()?;
    let streams = idle_connections(&b, vip, 3)?;
    b.topo.client.enter(|| udp_ask(vip, 21_000, TIMEOUT))??;
    let active = || -> Result<f64> {
        value(
            &metrics(&b, &agent)?,
            "sluice_backend_active_connections",
            &[("service", "web")],
        )
    };
    assert_eq!(active()?, 3.0);
    let by_state = |state: &str| -> Result<f64> {
        value(
            &metrics(&b, &agent)?,
            "sluice_conntrack_entries_by_state",
            &[("state", state)],
        )
    };
    wait_for("established flows counted", Duration::from_secs(5), || {
        Ok(by_state("established")? == 6.0 && by_state("udp")? == 2.0)
    })?;
    // Nothing moves for longer than the timeouts: the sweep removes them.
    wait_for("idle flows expired", Duration::from_secs(10), || {
        Ok(value(&metrics(&b, &agent)?, "sluice_conntrack_entries", &[])? == 0.0)
    })?;
    assert_eq!(active()?, 0.0, "expired connections are no longer active");
    drop(streams);
    // A short connection passes through closing to TIME_WAIT, then goes.
    b.topo
        .client
        .enter(|| tcp_ask(vip, TIMEOUT))?
        .context("a new connection")?;
    wait_for("closed flow in time_wait", Duration::from_secs(5), || {
        Ok(by_state("time_wait")? >= 2.0)
    })?;
    wait_for("closed flow removed", Duration::from_secs(10), || {
        Ok(by_state("time_wait")? == 0.0)
    })?;
    Ok(())
}

/// A full map evicts idle connections without a FIN or RST: they leave the
/// active-connections gauge all the same (the sweep finds them missing).
#[test]
fn evicted_connections_leave_the_active_gauge() -> Result<()> {
    let b = Bed::new("le", 1)?;
    let text = format!(
        "{}conntrack:\n  max_entries: 1024\nservices:\n\
         \x20 - name: web\n    vip: 10.100.0.1\n    port: 80\n    protocol: tcp\n    backends:\n      - address: 10.1.0.2:8080\n\
         \x20 - name: dns\n    vip: 10.100.0.1\n    port: 80\n    protocol: udp\n    backends:\n      - address: 10.1.0.2:8080\n",
        sluice_tests::interfaces_yaml(1)
    );
    let path = b.dir.path("sluice.yaml");
    std::fs::write(&path, text)?;
    let agent = Agent::start(&b.topo.lb, &path, b.dir.path("agent.log"))?;
    let vip: SocketAddr = VIP.parse()?;
    let active = || -> Result<f64> {
        value(
            &metrics(&b, &agent)?,
            "sluice_backend_active_connections",
            &[("service", "web")],
        )
    };
    let streams = idle_connections(&b, vip, 4)?;
    assert_eq!(active()?, 4.0);
    let established_entries = || -> Result<f64> {
        value(
            &metrics(&b, &agent)?,
            "sluice_conntrack_entries_by_state",
            &[("state", "established")],
        )
    };
    // UDP flows, 2,000 at a time (4,000 entries), into a map of 1,024 until
    // the LRU has evicted the idle connections' entries (which entries go
    // first is the kernel's choice).
    for chunk in 0..8u16 {
        b.topo.client.enter(|| -> Result<()> {
            for i in 0..2000u16 {
                udp_ask(vip, 20_000 + chunk * 2000 + i, TIMEOUT)?;
            }
            Ok(())
        })??;
        std::thread::sleep(Duration::from_millis(2500)); // a sweep
        if established_entries()? == 0.0 {
            break;
        }
    }
    assert_eq!(
        established_entries()?,
        0.0,
        "the idle connections' entries were never evicted"
    );
    wait_for(
        "evicted connections out of the gauge",
        Duration::from_secs(20),
        || Ok(active()? == 0.0),
    )?;
    drop(streams);
    Ok(())
}
