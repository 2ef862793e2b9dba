//! Direct server return (`forwarding: dsr`) with real sockets: client, LB
//! and backends on one bridge (see `testbed::Segment`), the real agent in
//! the LB's namespace, real servers on the backends bound to the VIP on
//! their loopback. The backend must see the client's own address, and its
//! replies must go to the client directly: the LB forwards none of them.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command},
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use sluice_tests::{
    Agent, TempDir, http_get, metric,
    packet::{Pkt, checksum},
    raw::{RawSender, mac_of},
    sluice_bin, wait_for,
};
use testbed::{Family, NameServer, Netns, Segment, tcp_ask, udp_ask};

const PORT: u16 = 80;
const TIMEOUT: Duration = Duration::from_secs(5);
/// Short connections per test: enough for both backends many times over.
const CONNECTIONS: usize = 200;
/// The bulk transfer's size, each way.
const BULK_BYTES: usize = 8 << 20;

/// How the LB's packets reach the backends.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    /// L2 DSR: the destination MAC only.
    L2,
    /// IPIP / IP6IP6 from the LB's address, unwrapped by `sluice
    /// backend-decap` on each backend.
    Ipip,
}

struct Bed {
    // Dropped first: the decaps detach before their namespaces go.
    decaps: Vec<Decap>,
    seg: Segment,
    _servers: Vec<NameServer>,
    _dir: TempDir,
    agent: Agent,
    family: Family,
}

fn config(family: Family, backends: usize, variant: Variant) -> String {
    let mut text = String::from("interfaces:\n  - name: eth0\nservices:\n");
    for proto in ["tcp", "udp"] {
        text += &format!(
            "  - name: web-{proto}\n    vip: \"{}\"\n    port: {PORT}\n    protocol: {proto}\n    forwarding: dsr\n",
            family.segment_vip()
        );
        text += &match variant {
            Variant::L2 => "    dsr: {encapsulation: none}\n".to_string(),
            Variant::Ipip => format!(
                "    dsr: {{encapsulation: ipip}}\n    snat_ip: \"{}\"\n",
                family.segment_lb()
            ),
        };
        text += "    backends:\n";
        for i in 0..backends {
            let addr = SocketAddr::new(family.segment_backend(i), PORT);
            text += &format!("      - address: \"{addr}\"\n");
        }
    }
    text
}

/// A running `sluice backend-decap` on a backend; dropping it kills it by
/// its PID.
struct Decap {
    child: Option<Child>,
    log: PathBuf,
}

impl Decap {
    fn start(ns: &Netns, vips: &[IpAddr], log: PathBuf) -> Result<Self> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name])
            .arg(sluice_bin())
            .args(["backend-decap", "--interface", "eth0"]);
        for vip in vips {
            cmd.args(["--vip", &vip.to_string()]);
        }
        let out = std::fs::File::create(&log)?;
        let child = cmd
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting sluice backend-decap")?;
        let mut d = Self {
            child: Some(child),
            log,
        };
        wait_for("backend-decap to attach", Duration::from_secs(20), || {
            if let Some(status) = d.child.as_mut().unwrap().try_wait()? {
                bail!("backend-decap exited with {status}: {}", d.text());
            }
            Ok(d.text().contains("attached"))
        })?;
        Ok(d)
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then what it said it counted: (unwrapped, malformed,
    /// passed untouched).
    fn stop(&mut self) -> Result<(u64, u64, u64)> {
        let mut child = self.child.take().context("already stopped")?;
        // SAFETY: signalling the child this struct started, by its PID.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait()?;
        let text = self.text();
        ensure!(
            status.success(),
            "backend-decap exited with {status}: {text}"
        );
        let line = text
            .lines()
            .find(|l| l.starts_with("detached"))
            .with_context(|| format!("no summary from backend-decap: {text}"))?;
        // "detached from eth0: N packets unwrapped, M malformed dropped, K encapsulated ..."
        let numbers: Vec<u64> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|w| w.parse().ok())
            .collect();
        let [.., a, b, c] = numbers[..] else {
            bail!("unexpected summary {line:?}");
        };
        Ok((a, b, c))
    }
}

impl Drop for Decap {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A name server on every backend of `seg`, on the VIP (on its loopback),
/// as a DSR backend serves.
fn serve_vip(seg: &Segment, family: Family) -> Result<Vec<NameServer>> {
    seg.backends
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            NameServer::start(
                ns,
                SocketAddr::new(family.segment_vip(), PORT),
                &format!("b{i}"),
            )
        })
        .collect()
}

fn bed(tag: &str, family: Family, backends: usize, variant: Variant) -> Result<Bed> {
    let seg = Segment::new(tag, backends)?;
    let servers = serve_vip(&seg, family)?;
    seg.warm_neighbours()?;
    let dir = TempDir::new(tag)?;
    let mut decaps = Vec::new();
    if variant == Variant::Ipip {
        for (i, ns) in seg.backends.iter().enumerate() {
            let vips = [family.segment_vip()];
            decaps.push(Decap::start(ns, &vips, dir.path(&format!("decap{i}.log")))?);
        }
    }
    std::fs::write(dir.path("sluice.yaml"), config(family, backends, variant))?;
    let agent = Agent::start(&seg.lb, &dir.path("sluice.yaml"), dir.path("agent.log"))?;
    Ok(Bed {
        decaps,
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
        eprintln!(
            "{service}: LB forwarded {to_backend} packets to backends, {to_client} to the client"
        );
        ensure!(
            to_backend > 0.0,
            "{service}: nothing forwarded to a backend"
        );
        ensure!(
            to_client == 0.0,
            "{service}: the LB forwarded {to_client} reply packets: replies must bypass it"
        );
        let failures = metric(
            &text,
            "sluice_backend_failures_total",
            &[("service", service)],
        )
        .unwrap_or(0.0);
        ensure!(
            failures == 0.0,
            "{service}: {failures} failures counted, but DSR sees no answer to judge"
        );
        // Nothing dropped for want of a neighbour, room or headroom: with the
        // MSS clamped, wrapped segments fit the MTU.
        for reason in ["dsr_no_neighbour", "dsr_too_big", "dsr_encap_failed"] {
            let n = metric(&text, "sluice_drops_total", &[("reason", reason)]).unwrap_or(0.0);
            ensure!(n == 0.0, "{n} packets dropped as {reason}");
        }
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
        // The second ask binds the port the first just closed; once, that
        // bind found the port still held (EADDRINUSE): a moment later it is
        // free.
        let ask = |port| {
            let mut tries = 0;
            loop {
                match udp_ask(vip, port, TIMEOUT) {
                    Err(e)
                        if tries < 5
                            && e.downcast_ref::<std::io::Error>().map(std::io::Error::kind)
                                == Some(std::io::ErrorKind::AddrInUse) =>
                    {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    other => return other,
                }
            }
        };
        for port in 40_000..40_050u16 {
            let first = ask(port)?;
            let again = ask(port)?;
            let (name, peer) = parse_reply(&first)?;
            ensure!(
                peer.ip() == client,
                "UDP: backend {name} saw {peer}, not {client}"
            );
            ensure!(
                parse_reply(&again)?.0 == name,
                "UDP flow from port {port} moved from {name}: {again}"
            );
            reached.insert(name);
        }
        Ok(())
    })??;
    ensure!(
        reached.len() == b.seg.backends.len(),
        "UDP reached only {reached:?}"
    );
    Ok(())
}

/// A bulk transfer both ways on one connection (the backend echoes): every
/// byte comes back intact, so every packet went to the same backend. The
/// LB's device receives the client's half only.
fn bulk(b: &Bed, variant: Variant) -> Result<()> {
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
            ensure!(
                s.read(&mut byte)? == 1,
                "connection closed before the greeting"
            );
            line.push(byte[0]);
        }
        let (name, peer) = parse_reply(&String::from_utf8_lossy(&line))?;
        ensure!(
            peer.ip() == b.family.segment_client(),
            "bulk: backend {name} saw {peer}"
        );
        if variant == Variant::Ipip {
            check_clamped(b, &name, peer)?;
        }
        let mut writer = s.try_clone()?;
        let sent = data.clone();
        let send = thread::spawn(move || -> std::io::Result<()> {
            writer.write_all(&sent)?;
            writer.shutdown(Shutdown::Write)
        });
        let mut back = Vec::with_capacity(BULK_BYTES);
        s.read_to_end(&mut back)?;
        send.join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))??;
        Ok(back)
    })??;
    ensure!(
        echoed.len() == data.len(),
        "bulk: {} bytes came back of {}",
        echoed.len(),
        data.len()
    );
    ensure!(
        echoed == data,
        "bulk: the echoed bytes differ from those sent"
    );
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

/// Through the tunnel both ends' segments must fit once wrapped: the
/// client's SYN had its MSS clamped by the LB, the backend's SYN-ACK by
/// `sluice backend-decap`. Each end's send MSS (`ss`'s `mss:`, which is
/// less the TCP options in use) is at most the MTU (1500) less the outer
/// header, the IP header and TCP's: 1440 (IPv4), 1400 (IPv6). Unclamped it
/// would be 1448 (IPv4) or 1428 (IPv6) with timestamps.
fn check_clamped(b: &Bed, backend: &str, client: SocketAddr) -> Result<()> {
    let limit = match b.family {
        Family::V4 => 1440,
        Family::V6 => 1400,
    };
    let i: usize = backend.trim_start_matches('b').parse()?;
    let vip = b.vip();
    let at_client = send_mss(&b.seg.client, &format!("dst {vip} and src {client}"))?;
    let at_backend = send_mss(&b.seg.backends[i], &format!("src {vip} and dst {client}"))?;
    eprintln!("tunnel: send MSS {at_client} at the client, {at_backend} at backend {backend}");
    ensure!(
        at_client <= limit && at_backend <= limit,
        "send MSS {at_client} (client) and {at_backend} (backend): more than {limit}, the tunnel's room"
    );
    Ok(())
}

/// The send MSS of the one TCP connection in `ns` that `filter` (an `ss`
/// filter) names.
fn send_mss(ns: &Netns, filter: &str) -> Result<u32> {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "ss", "-Htin"])
        .args(filter.split_whitespace())
        .output()
        .context("running ss")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|w| w.strip_prefix("mss:"))
        .with_context(|| format!("no connection {filter} in {}: {text}", ns.name))?
        .parse()
        .with_context(|| format!("ss in {}: {text}", ns.name))
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

fn dsr(tag: &str, family: Family, variant: Variant) -> Result<()> {
    let mut b = bed(tag, family, 2, variant)?;
    short_connections(&b)?;
    bulk(&b, variant)?;
    b.check_counters("web-tcp")?;
    udp_flows(&b)?;
    b.check_counters("web-udp")?;
    // No reply entries and nothing half-open: the LB never sees a reply.
    let text = b.metrics()?;
    let half_open = metric(&text, "sluice_conntrack_half_open_entries", &[]).unwrap_or(0.0);
    ensure!(half_open == 0.0, "{half_open} DSR flows are half-open");
    if variant == Variant::Ipip {
        forged_ipip(&b)?;
        let mut unwrapped = 0;
        for (i, d) in b.decaps.iter_mut().enumerate() {
            let (n, malformed, other) = d.stop()?;
            eprintln!(
                "backend {i}'s decap: {n} unwrapped, {malformed} malformed, {other} not ours"
            );
            // Backend 0 got the forged packets (see `forged_ipip`).
            let (want_malformed, want_other) = if i == 0 { (FORGED, FORGED) } else { (0, 0) };
            ensure!(
                malformed == want_malformed && other == want_other,
                "backend {i}'s decap counted {malformed} malformed and {other} not ours"
            );
            unwrapped += n;
        }
        ensure!(unwrapped > 0, "the decaps unwrapped nothing");
    }
    Ok(())
}

/// Forged packets of each kind `forged_ipip` sends.
const FORGED: u64 = 3;

/// Forged IPIP / IP6IP6 from the client (any host on the segment) to
/// backend 0: wrapping a packet to an address that is no configured VIP
/// passes untouched (the backend's kernel, with no ipip module, sees an
/// unknown protocol); a wrapped VIP packet cut short is dropped and counted,
/// and reaches no socket.
fn forged_ipip(b: &Bed) -> Result<()> {
    let fam = b.family;
    let backend = &b.seg.backends[0];
    let sender = RawSender::open(&b.seg.client, "eth0")?;
    let (smac, dmac) = (mac_of(&b.seg.client, "eth0")?, mac_of(backend, "eth0")?);
    let (outer_src, outer_dst) = (fam.segment_client(), fam.segment_backend(0));
    let other: IpAddr = match fam {
        Family::V4 => "10.92.0.1".parse()?,
        Family::V6 => "fd92::1".parse()?,
    };
    let unknown_before = unknown_protocols(backend, fam)?;
    for i in 0..FORGED as u16 {
        // A whole packet to another address.
        let inner = Pkt::udp(fam.segment_client(), 7000 + i, other, PORT).bytes()[14..].to_vec();
        ensure!(sender.send(&wrap(smac, dmac, outer_src, outer_dst, &inner, None)));
        // A VIP packet whose inner header claims more than is there.
        let mut inner = Pkt::udp(fam.segment_client(), 7100 + i, fam.segment_vip(), PORT).bytes()
            [14..]
            .to_vec();
        inner.truncate(inner.len() - 6);
        ensure!(sender.send(&wrap(smac, dmac, outer_src, outer_dst, &inner, None)));
    }
    wait_for(
        "the kernel to see the forged IPIP",
        Duration::from_secs(5),
        || Ok(unknown_protocols(backend, fam)? >= unknown_before + FORGED),
    )?;
    Ok(())
}

/// An Ethernet frame: an outer IPv4 (IPIP) or IPv6 (IP6IP6) header around
/// `inner`; `claimed`: the outer length field, if not the true one.
fn wrap(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    inner: &[u8],
    claimed: Option<u16>,
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dmac);
    f.extend_from_slice(&smac);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f.extend_from_slice(&0x0800u16.to_be_bytes());
            let len = claimed.unwrap_or((20 + inner.len()) as u16);
            let mut ip = vec![0x45, 0];
            ip.extend_from_slice(&len.to_be_bytes());
            ip.extend_from_slice(&[0, 0, 0, 0, 64, 4, 0, 0]);
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let c = checksum(&ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f.extend_from_slice(&0x86ddu16.to_be_bytes());
            let len = claimed.unwrap_or(inner.len() as u16);
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&len.to_be_bytes());
            f.extend_from_slice(&[41, 64]);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
        }
        _ => unreachable!("mixed families"),
    }
    f.extend_from_slice(inner);
    f
}

/// Packets `ns`'s kernel received for a protocol it has no handler for.
fn unknown_protocols(ns: &Netns, fam: Family) -> Result<u64> {
    let counter = match fam {
        Family::V4 => "IpInUnknownProtos",
        Family::V6 => "Ip6InUnknownProtos",
    };
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "nstat", "-asz", counter])
        .output()
        .context("running nstat")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum())
}

#[test]
fn l2_dsr_ipv4() -> Result<()> {
    dsr("dsr4", Family::V4, Variant::L2)
}

#[test]
fn l2_dsr_ipv6() -> Result<()> {
    dsr("dsr6", Family::V6, Variant::L2)
}

#[test]
fn ipip_dsr_ipv4() -> Result<()> {
    dsr("dsrt4", Family::V4, Variant::Ipip)
}

#[test]
fn ipip_dsr_ipv6() -> Result<()> {
    dsr("dsrt6", Family::V6, Variant::Ipip)
}

/// `sluice backend-decap` refuses a VIP the host doesn't have: the
/// unwrapped packets would be dropped (or forwarded) by its kernel.
#[test]
fn backend_decap_refuses_a_vip_not_on_a_local_interface() -> Result<()> {
    let seg = Segment::new("dsrr", 1)?;
    let out = Command::new("ip")
        .args(["netns", "exec", &seg.backends[0].name])
        .arg(sluice_bin())
        .args(["backend-decap", "--interface", "eth0", "--vip", "10.93.0.1"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "backend-decap accepted a VIP the host doesn't have"
    );
    ensure!(
        stderr.contains("VIP 10.93.0.1 is not on a local interface"),
        "the refusal doesn't name the VIP: {stderr}"
    );
    Ok(())
}

/// Neighbours: with nothing resolved beforehand (the agent has the kernel
/// resolve DSR backends when they are added), and after the LB's
/// neighbour table is flushed (as the kernel's garbage collection may do):
/// the first packets are dropped as `dsr_no_neighbour`, the agent has the
/// backends resolved again, and the client's retransmission gets through.
#[test]
fn l2_dsr_resolves_backend_neighbours() -> Result<()> {
    let family = Family::V4;
    let seg = Segment::new("dsrn", 2)?;
    let _servers = serve_vip(&seg, family)?;
    let dir = TempDir::new("dsrn")?;
    std::fs::write(dir.path("sluice.yaml"), config(family, 2, Variant::L2))?;
    let agent = Agent::start(&seg.lb, &dir.path("sluice.yaml"), dir.path("agent.log"))?;
    let vip = SocketAddr::new(family.segment_vip(), PORT);
    let ask = |n: usize| -> Result<()> {
        seg.client.enter(|| -> Result<()> {
            for i in 0..n {
                tcp_ask(vip, Duration::from_secs(10))
                    .with_context(|| format!("connection {i} to {vip}"))?;
            }
            Ok(())
        })?
    };
    let misses = || -> Result<f64> {
        let (_, text) = http_get(&seg.lb, agent.listen, "/metrics")?;
        Ok(metric(
            &text,
            "sluice_drops_total",
            &[("reason", "dsr_no_neighbour")],
        )
        .unwrap_or(0.0))
    };
    ask(20)?;
    let before = misses()?;
    seg.lb.exec(&["ip", "neigh", "flush", "dev", "eth0"])?;
    ask(20)?;
    let after = misses()?;
    eprintln!("dsr_no_neighbour drops: {before} before the flush, {after} after");
    // The flush did leave the LB without the backends' neighbours (else the
    // connections above would prove nothing), and they completed anyway.
    ensure!(
        after > before,
        "no dsr_no_neighbour drop after the flush: the recovery was not exercised"
    );
    Ok(())
}

/// The flows of `service` from `client` in `/api/v1/conntrack`: (state,
/// backend) of each.
fn flows_of(b: &Bed, service: &str, client: SocketAddr) -> Result<Vec<(String, String)>> {
    let (status, body) = http_get(
        &b.seg.lb,
        b.agent.listen,
        &format!("/api/v1/conntrack?service={service}"),
    )?;
    ensure!(status == 200, "/api/v1/conntrack answered {status}: {body}");
    let answer: serde_json::Value = serde_json::from_str(&body)?;
    Ok(answer["flows"]
        .as_array()
        .context("no flows in /api/v1/conntrack")?
        .iter()
        .filter(|f| f["client"] == client.to_string())
        .map(|f| {
            (
                f["state"].as_str().unwrap_or_default().to_string(),
                f["backend"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}

/// A DSR connect as the LB sees it, the client's side only, forged from
/// outside so that each step is exact: the SYN makes one flow in
/// `syn_sent` (it expires after the SYN timeout if nothing follows, not
/// after the established one); retransmissions of that SYN, and a SYN that
/// also carries RST, stay on it (same backend, one connection counted);
/// the client's first ACK establishes it; its FIN begins the close.
#[test]
fn a_dsr_connect_follows_the_clients_packets() -> Result<()> {
    let b = bed("dsrcs", Family::V4, 2, Variant::L2)?;
    let tx = RawSender::open(&b.seg.client, "eth0")?;
    let (client_mac, lb_mac) = (mac_of(&b.seg.client, "eth0")?, mac_of(&b.seg.lb, "eth0")?);
    let client = SocketAddr::new(b.family.segment_client(), 61_000);
    let vip = b.vip();
    let send = |flags: u8, seq_offset: u32| -> Result<()> {
        let mut p = Pkt::tcp(client.ip(), client.port(), vip.ip(), vip.port(), flags);
        p.smac = client_mac;
        p.dmac = lb_mac;
        p.payload.clear();
        p.seq = p.seq.wrapping_add(seq_offset);
        ensure!(tx.send(&p.bytes()), "sending a forged segment");
        Ok(())
    };
    let connections = || -> Result<u64> {
        let s = sluice_tests::service_json(&b.seg.lb, &b.agent, "web-tcp")?;
        s["connections_total"]
            .as_u64()
            .context("no connections_total")
    };
    let before = connections()?;
    let state_is = |want: &str| -> Result<String> {
        let mut backend = String::new();
        wait_for(
            &format!("the flow of {client} in {want}"),
            Duration::from_secs(5),
            || {
                let flows = flows_of(&b, "web-tcp", client)?;
                ensure!(
                    flows.len() <= 1,
                    "{client} has {} flows: {flows:?}",
                    flows.len()
                );
                Ok(match flows.first() {
                    Some((state, to)) if state == want => {
                        backend = to.clone();
                        true
                    }
                    _ => false,
                })
            },
        )?;
        Ok(backend)
    };

    const SYN: u8 = 0x02;
    const RST: u8 = 0x04;
    const ACK: u8 = 0x10;
    const FIN: u8 = 0x01;
    send(SYN, 0)?;
    let first = state_is("syn_sent")?;
    for _ in 0..3 {
        send(SYN, 0)?;
    }
    send(SYN | RST, 0)?;
    thread::sleep(Duration::from_millis(300));
    ensure!(
        state_is("syn_sent")? == first,
        "a retransmitted SYN moved the flow off {first}"
    );
    ensure!(
        connections()? == before + 1,
        "connections counted: {} (was {before}): a retransmission counted as a connection",
        connections()?
    );
    send(ACK, 1)?;
    ensure!(state_is("established")? == first, "the ACK moved the flow");
    send(FIN | ACK, 1)?;
    ensure!(state_is("closing")? == first, "the FIN moved the flow");
    Ok(())
}
