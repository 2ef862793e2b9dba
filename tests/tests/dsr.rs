//! Direct server return (`forwarding: dsr`) with real sockets: client, LB
//! and backends on one bridge (see `testbed::Segment`), the real agent in
//! the LB's namespace, real servers on the backends bound to the VIP on
//! their loopback. The backend must see the client's own address, and its
//! replies must go to the client directly: the LB forwards none of them.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    process::Command,
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use sluice_tests::{Agent, TempDir, http_get, metric};
use testbed::{Family, NameServer, Segment, tcp_ask, udp_ask};

const PORT: u16 = 80;
const TIMEOUT: Duration = Duration::from_secs(5);
/// Short connections per test: enough for both backends many times over.
const CONNECTIONS: usize = 200;
/// The bulk transfer's size, each way.
const BULK_BYTES: usize = 8 << 20;

struct Bed {
    seg: Segment,
    _servers: Vec<NameServer>,
    _dir: TempDir,
    agent: Agent,
    family: Family,
}

fn config(family: Family, backends: usize) -> String {
    let mut text = String::from("interfaces:\n  - name: eth0\nservices:\n");
    for proto in ["tcp", "udp"] {
        text += &format!(
            "  - name: web-{proto}\n    vip: \"{}\"\n    port: {PORT}\n    protocol: {proto}\n    forwarding: dsr\n    dsr: {{encapsulation: none}}\n    backends:\n",
            family.segment_vip()
        );
        for i in 0..backends {
            let addr = SocketAddr::new(family.segment_backend(i), PORT);
            text += &format!("      - address: \"{addr}\"\n");
        }
    }
    text
}

fn bed(tag: &str, family: Family, backends: usize) -> Result<Bed> {
    let seg = Segment::new(tag, backends)?;
    // Each backend serves on the VIP (on its loopback), as a DSR backend does.
    let servers = seg
        .backends
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            NameServer::start(
                ns,
                SocketAddr::new(family.segment_vip(), PORT),
                &format!("b{i}"),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    seg.warm_neighbours()?;
    let dir = TempDir::new(tag)?;
    std::fs::write(dir.path("sluice.yaml"), config(family, backends))?;
    let agent = Agent::start(&seg.lb, &dir.path("sluice.yaml"), dir.path("agent.log"))?;
    Ok(Bed {
        seg,
        _servers: servers,
        _dir: dir,
        agent,
        family,
    })
}

impl Bed {
    fn vip(&self) -> SocketAddr {
        SocketAddr::new(self.family.segment_vip(), PORT)
    }

    fn metrics(&self) -> Result<String> {
        let (status, body) = http_get(&self.seg.lb, self.agent.listen, "/metrics")?;
        ensure!(status == 200, "/metrics answered {status}");
        Ok(body)
    }

    /// Bytes the LB's device received so far.
    fn lb_rx_bytes(&self) -> Result<u64> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.seg.lb.name])
            .args(["cat", "/sys/class/net/eth0/statistics/rx_bytes"])
            .output()?;
        ensure!(out.status.success(), "reading the LB's rx_bytes");
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    }

    /// Checks what the LB counted for `service`: packets to the backends,
    /// none to the client (the replies bypassed it), no failure.
    fn check_counters(&self, service: &str) -> Result<()> {
        let text = self.metrics()?;
        let packets = |direction| {
            metric(
                &text,
                "sluice_service_packets_total",
                &[("service", service), ("direction", direction)],
            )
        };
        let to_backend = packets("to_backend").context("no to_backend series")?;
        let to_client = packets("to_client").context("no to_client series")?;
        eprintln!("{service}: LB forwarded {to_backend} packets to backends, {to_client} to the client");
        ensure!(to_backend > 0.0, "{service}: nothing forwarded to a backend");
        ensure!(
            to_client == 0.0,
            "{service}: the LB forwarded {to_client} reply packets: replies must bypass it"
        );
        let failures = metric(&text, "sluice_backend_failures_total", &[("service", service)])
            .unwrap_or(0.0);
        ensure!(
            failures == 0.0,
            "{service}: {failures} failures counted, but DSR sees no answer to judge"
        );
        Ok(())
    }
}

/// Many short connections: each reaches a backend, which saw the client's
/// own address; both backends serve.
fn short_connections(b: &Bed) -> Result<()> {
    let vip = b.vip();
    let client = b.family.segment_client();
    let replies = b.seg.client.enter(|| -> Result<Vec<String>> {
        (0..CONNECTIONS)
            .map(|i| tcp_ask(vip, TIMEOUT).with_context(|| format!("connection {i} to {vip}")))
            .collect()
    })??;
    let mut per_backend = BTreeMap::<String, usize>::new();
    for reply in &replies {
        let (name, peer) = parse_reply(reply)?;
        ensure!(
            peer.ip() == client,
            "backend {name} saw {peer}, not the client's address {client}"
        );
        *per_backend.entry(name).or_default() += 1;
    }
    eprintln!("{CONNECTIONS} TCP connections to {vip}: {per_backend:?}");
    ensure!(
        per_backend.len() == b.seg.backends.len(),
        "not every backend was reached: {per_backend:?}"
    );
    Ok(())
}

/// UDP: each flow (client port) stays on one backend, which sees the client.
fn udp_flows(b: &Bed) -> Result<()> {
    let vip = b.vip();
    let client = b.family.segment_client();
    let mut reached = BTreeSet::new();
    b.seg.client.enter(|| -> Result<()> {
        for port in 40_000..40_050u16 {
            let first = udp_ask(vip, port, TIMEOUT)?;
            let again = udp_ask(vip, port, TIMEOUT)?;
            let (name, peer) = parse_reply(&first)?;
            ensure!(peer.ip() == client, "UDP: backend {name} saw {peer}, not {client}");
            ensure!(
                parse_reply(&again)?.0 == name,
                "UDP flow from port {port} moved from {name}: {again}"
            );
            reached.insert(name);
        }
        Ok(())
    })??;
    ensure!(reached.len() == b.seg.backends.len(), "UDP reached only {reached:?}");
    Ok(())
}

/// A bulk transfer both ways on one connection (the backend echoes): every
/// byte comes back intact, so every packet went to the same backend. The
/// LB's device receives the client's half only.
fn bulk(b: &Bed) -> Result<()> {
    let vip = b.vip();
    let rx_before = b.lb_rx_bytes()?;
    let data: Vec<u8> = (0..BULK_BYTES as u64)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let echoed = b.seg.client.enter(|| -> Result<Vec<u8>> {
        let mut s = TcpStream::connect_timeout(&vip, TIMEOUT)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(b"echo\n")?;
        // The server's first line: its name and the peer it saw.
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while line.last() != Some(&b'\n') {
            ensure!(s.read(&mut byte)? == 1, "connection closed before the greeting");
            line.push(byte[0]);
        }
        let (name, peer) = parse_reply(&String::from_utf8_lossy(&line))?;
        ensure!(
            peer.ip() == b.family.segment_client(),
            "bulk: backend {name} saw {peer}"
        );
        let mut writer = s.try_clone()?;
        let sent = data.clone();
        let send = thread::spawn(move || -> std::io::Result<()> {
            writer.write_all(&sent)?;
            writer.shutdown(Shutdown::Write)
        });
        let mut back = Vec::with_capacity(BULK_BYTES);
        s.read_to_end(&mut back)?;
        send.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
        Ok(back)
    })??;
    ensure!(
        echoed.len() == data.len(),
        "bulk: {} bytes came back of {}",
        echoed.len(),
        data.len()
    );
    ensure!(echoed == data, "bulk: the echoed bytes differ from those sent");
    let rx = b.lb_rx_bytes()? - rx_before;
    eprintln!(
        "bulk: {} MB each way intact; the LB's device received {:.1} MB",
        BULK_BYTES >> 20,
        rx as f64 / 1e6
    );
    // Had the replies come through the LB, it would have received both halves.
    ensure!(
        rx < (BULK_BYTES as u64) * 3 / 2,
        "the LB received {rx} bytes for {BULK_BYTES} each way: the replies went through it"
    );
    Ok(())
}

/// "b0 10.90.0.1:40000" → ("b0", the peer).
fn parse_reply(reply: &str) -> Result<(String, SocketAddr)> {
    let mut words = reply.split_whitespace();
    let (Some(name), Some(peer)) = (words.next(), words.next()) else {
        bail!("unexpected reply {reply:?}");
    };
    let peer: SocketAddr = peer
        .parse()
        .with_context(|| format!("peer in reply {reply:?}"))?;
    Ok((name.to_string(), peer))
}

fn l2_dsr(tag: &str, family: Family) -> Result<()> {
    let b = bed(tag, family, 2)?;
    short_connections(&b)?;
    bulk(&b)?;
    b.check_counters("web-tcp")?;
    udp_flows(&b)?;
    b.check_counters("web-udp")?;
    // No reply entries and nothing half-open: the LB never sees a reply.
    let text = b.metrics()?;
    let half_open = metric(&text, "sluice_conntrack_half_open_entries", &[]).unwrap_or(0.0);
    ensure!(half_open == 0.0, "{half_open} DSR flows are half-open");
    Ok(())
}

#[test]
fn l2_dsr_ipv4() -> Result<()> {
    l2_dsr("dsr4", Family::V4)
}

#[test]
fn l2_dsr_ipv6() -> Result<()> {
    l2_dsr("dsr6", Family::V6)
}
