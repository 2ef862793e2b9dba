//! Session affinity by client address, end to end: 20 client addresses on
//! the client's link, real short TCP connections through the real agent to
//! name servers that answer with their identity. Each client reaches one
//! backend; it moves when that backend is ejected (its server stopped:
//! real refusals) or drained (`sluice drain`), to one new backend, and
//! stays there; an expired entry lets Maglev choose again. At packet level
//! (BPF_PROG_TEST_RUN): a refusal retried on another backend moves the
//! client's affinity there, forged RSTs don't.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    path::PathBuf,
    process::{Command, Output, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use sluice_tests::{
    Agent, TempDir, backend_states, control_socket_of,
    fib::{CLIENT_MAC, FibBed, T0_MAC, T1_MAC, XDP_REDIRECT, XDP_TX, backend_mac, backend_of},
    packet::{CLIENT_SEQ, Pkt, TCP_ACK, TCP_RST, TCP_SYN},
    sluice_bin,
};
use testbed::{Family, NameServer, Topology};

const PORT: u16 = 8080;
const CLIENTS: usize = 20;
/// Long enough for one SYN retransmission (1 s) and a reply.
const CONNECT: Duration = Duration::from_secs(4);

/// Client address i (besides the topology's own client address).
fn client(fam: Family, i: usize) -> IpAddr {
    match fam {
        Family::V4 => format!("10.0.1.{}", 10 + i).parse().unwrap(),
        Family::V6 => format!("fd00:1::{:x}", 0x10 + i).parse().unwrap(),
    }
}

fn backend(fam: Family, i: usize) -> SocketAddr {
    SocketAddr::new(fam.backend(i), PORT)
}

struct Bed {
    fam: Family,
    topo: Topology,
    servers: Vec<Option<NameServer>>,
    cfg: PathBuf,
    agent: Agent,
    _dir: TempDir,
}

/// The topology with `backends` backends serving, 20 client addresses,
/// and the agent with one affinity service (`timeout` seconds).
fn bed(tag: &str, fam: Family, backends: usize, timeout: u32) -> Result<Bed> {
    let topo = Topology::new(tag, backends)?;
    let prefix = if fam == Family::V4 { 24 } else { 64 };
    for i in 0..CLIENTS {
        let cidr = format!("{}/{prefix}", client(fam, i));
        let mut args = vec!["ip", "addr", "add", cidr.as_str(), "dev", "eth0"];
        if fam == Family::V6 {
            args.push("nodad");
        }
        topo.client.exec(&args)?;
    }
    let servers = topo.serve(fam, PORT)?.into_iter().map(Some).collect();
    topo.warm_neighbours()?;
    let dir = TempDir::new(tag)?;
    let mut text = sluice_tests::interfaces_yaml(backends);
    text += &format!(
        "services:\n  - name: web\n    vip: \"{}\"\n    port: 80\n    protocol: tcp\n    affinity:\n      client_ip:\n        timeout_seconds: {timeout}\n    failure:\n      consecutive_failures: 3\n      min_distinct_clients: 1\n      ejection_seconds: 120\n      max_ejected_percent: 50\n    backends:\n",
        fam.vip()
    );
    for i in 0..backends {
        text += &format!("      - address: \"{}\"\n", backend(fam, i));
    }
    // The same over UDP (the name servers answer datagrams too).
    text += &format!(
        "  - name: dns\n    vip: \"{}\"\n    port: 53\n    protocol: udp\n    affinity:\n      client_ip: {{}}\n    backends:\n",
        fam.vip()
    );
    for i in 0..backends {
        text += &format!("      - address: \"{}\"\n", backend(fam, i));
    }
    let cfg = dir.path("sluice.yaml");
    std::fs::write(&cfg, text)?;
    let agent = Agent::start(&topo.lb, &cfg, dir.path("agent.log"))?;
    Ok(Bed {
        fam,
        topo,
        servers,
        cfg,
        agent,
        _dir: dir,
    })
}

/// Client → the backends its connections reached, with counts.
type Reached = BTreeMap<IpAddr, BTreeMap<String, usize>>;

impl Bed {
    fn vip(&self) -> SocketAddr {
        SocketAddr::new(self.fam.vip(), 80)
    }

    /// `per_client` connections from each client in turn (round-robin, so
    /// that each client's connections are spread over the whole round):
    /// which backends each reached. Every connection must succeed.
    fn round(&self, per_client: usize) -> Result<Reached> {
        let (vip, fam) = (self.vip(), self.fam);
        self.topo.client.enter(move || -> Result<Reached> {
            let mut reached = Reached::new();
            for k in 0..per_client {
                for i in 0..CLIENTS {
                    let from = client(fam, i);
                    let reply = sluice_tests::tcp_ask_from(SocketAddr::new(from, 0), vip, CONNECT)
                        .with_context(|| format!("connection {k} from {from}"))?;
                    let name = reply.split_whitespace().next().unwrap_or("").to_string();
                    *reached.entry(from).or_default().entry(name).or_default() += 1;
                }
            }
            Ok(reached)
        })?
    }

    /// As `round`, with UDP datagrams to the `dns` service, each from a
    /// socket of its own (a new flow each).
    fn udp_round(&self, per_client: usize) -> Result<Reached> {
        let (vip, fam) = (SocketAddr::new(self.fam.vip(), 53), self.fam);
        self.topo.client.enter(move || -> Result<Reached> {
            let mut reached = Reached::new();
            for k in 0..per_client {
                for i in 0..CLIENTS {
                    let from = client(fam, i);
                    let s = UdpSocket::bind(SocketAddr::new(from, 0))?;
                    s.set_read_timeout(Some(Duration::from_secs(1)))?;
                    s.connect(vip)?;
                    let mut buf = [0u8; 512];
                    let n = (0..3)
                        .find_map(|_| {
                            s.send(b"hello").ok()?;
                            s.recv(&mut buf).ok()
                        })
                        .with_context(|| format!("datagram {k} from {from}: no answer"))?;
                    let reply = String::from_utf8_lossy(&buf[..n]);
                    let name = reply.split_whitespace().next().unwrap_or("").to_string();
                    *reached.entry(from).or_default().entry(name).or_default() += 1;
                }
            }
            Ok(reached)
        })?
    }

    fn sluice(&self, args: &[&str]) -> Result<Output> {
        Command::new(sluice_bin())
            .args(args)
            .arg("--config")
            .arg(&self.cfg)
            .arg("--socket")
            .arg(control_socket_of(&self.cfg))
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running sluice {args:?}"))
    }

    fn sluice_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.sluice(&all)?;
        if !out.status.success() {
            bail!(
                "sluice {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    fn state(&self, i: usize) -> Result<String> {
        let states = backend_states(&self.topo.lb, &self.agent, "web")?;
        Ok(states
            .get(&backend(self.fam, i).to_string())
            .cloned()
            .unwrap_or_default())
    }
}

/// Each client's one backend; fails if a client reached several.
fn one_each(reached: &Reached, when: &str) -> Result<BTreeMap<IpAddr, String>> {
    reached
        .iter()
        .map(|(c, counts)| {
            ensure!(
                counts.len() == 1,
                "{when}: client {c} reached several backends: {counts:?}"
            );
            Ok((*c, counts.keys().next().unwrap().clone()))
        })
        .collect()
}

/// How many clients each backend has.
fn spread(chosen: &BTreeMap<IpAddr, String>) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for b in chosen.values() {
        *by.entry(b.clone()).or_insert(0) += 1;
    }
    by
}

/// The busiest backend's index (by its name `b{i}`) other than `except`.
fn busiest(chosen: &BTreeMap<IpAddr, String>, except: &[usize]) -> Option<usize> {
    spread(chosen)
        .into_iter()
        .filter_map(|(name, n)| Some((name.strip_prefix('b')?.parse::<usize>().ok()?, n)))
        .filter(|(i, _)| !except.contains(i))
        .max_by_key(|&(_, n)| n)
        .map(|(i, _)| i)
}

#[test]
fn twenty_clients_keep_one_backend_until_it_is_ejected_or_drained() -> Result<()> {
    let mut b = bed("aff4", Family::V4, 4, 3600)?;
    // 200 connections from each of 20 clients: each reaches one backend,
    // and the clients spread over several (Maglev of the client address).
    let first = one_each(&b.round(200)?, "round 1")?;
    let by_backend = spread(&first);
    println!("round 1: clients per backend {by_backend:?}");
    ensure!(
        by_backend.len() > 1,
        "all clients on one backend: {by_backend:?}"
    );

    // UDP: each client's datagrams (a new flow each) reach one backend,
    // and the same as its TCP connections: the first choice is Maglev's
    // of the client's address, and both services have the same backends.
    let udp = one_each(&b.udp_round(20)?, "UDP")?;
    ensure!(
        udp == first,
        "UDP {:?}, TCP {:?}",
        spread(&udp),
        spread(&first)
    );

    // `explain` says where a client's next connection goes, from its
    // affinity entry.
    for (c, name) in first.iter().take(3) {
        let e = b.sluice_json(&[
            "explain",
            &SocketAddr::new(*c, 45_000).to_string(),
            &format!("{}/tcp", b.vip()),
        ])?;
        ensure!(e["decision"] == "affinity", "{c}: {e}");
        let want = backend(b.fam, name[1..].parse()?).to_string();
        ensure!(e["backend"] == want.as_str(), "{c}: {e}, want {want}");
    }

    // The busiest backend's server stops (its port refuses: the refusals
    // are retried elsewhere and eject it); the next busiest is drained.
    let gone = busiest(&first, &[]).context("a busiest backend")?;
    let drained = busiest(&first, &[gone]).context("a second backend")?;
    b.servers[gone] = None;
    let out = b.sluice(&["drain", "web", &backend(b.fam, drained).to_string()])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let second = one_each(&b.round(50)?, "round 2")?;
    let third = one_each(&b.round(50)?, "round 3")?;
    println!(
        "b{gone} stopped, b{drained} drained: clients per backend {:?}",
        spread(&second)
    );
    ensure!(b.state(gone)? == "ejected", "b{gone}: {}", b.state(gone)?);
    ensure!(
        b.state(drained)? == "draining",
        "b{drained}: {}",
        b.state(drained)?
    );
    let (gone, drained) = (format!("b{gone}"), format!("b{drained}"));
    let mut moved = 0;
    for (c, before) in &first {
        let (now, later) = (&second[c], &third[c]);
        if *before == gone || *before == drained {
            // One new backend, neither the stopped nor the drained one,
            // and it stays there.
            ensure!(
                *now != gone && *now != drained,
                "{c} was on {before}, now on {now}"
            );
            moved += 1;
        } else {
            ensure!(now == before, "{c} left {before} for {now}");
        }
        ensure!(later == now, "{c} moved again: {now} then {later}");
    }
    println!("{moved} clients moved, the others stayed");
    Ok(())
}

#[test]
fn an_expired_entry_lets_maglev_choose_again_ipv6() -> Result<()> {
    let b = bed("aff6", Family::V6, 3, 2)?;
    let first = one_each(&b.round(20)?, "round 1")?;
    let by_backend = spread(&first);
    println!("IPv6 round 1: clients per backend {by_backend:?}");
    ensure!(
        by_backend.len() > 1,
        "all clients on one backend: {by_backend:?}"
    );

    // Drained: its clients move, one new backend each.
    let x = busiest(&first, &[]).context("a busiest backend")?;
    let addr = backend(b.fam, x).to_string();
    let out = b.sluice(&["drain", "web", &addr])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let moved = one_each(&b.round(10)?, "drained")?;
    let xname = format!("b{x}");
    for (c, before) in &first {
        if *before == xname {
            ensure!(moved[c] != xname, "{c} still on {xname}");
        } else {
            ensure!(moved[c] == *before, "{c} left {before} for {}", moved[c]);
        }
    }

    // Back in the table: Maglev would choose it again, but the moved
    // clients' entries are live (each connection refreshes its client's
    // entry) and keep them where they are.
    let out = b.sluice(&["undrain", "web", &addr])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(b.state(x)? == "active", "b{x}: {}", b.state(x)?);
    let kept = one_each(&b.round(10)?, "undrained")?;
    ensure!(
        kept == moved,
        "within the timeout: {kept:?}, before {moved:?}"
    );

    // Idle past the timeout (2 s, on a clock of whole seconds): the
    // entries have expired, Maglev places every client as at first.
    std::thread::sleep(Duration::from_millis(3500));
    let again = one_each(&b.round(10)?, "expired")?;
    ensure!(
        again == first,
        "after expiry: {:?}, at first {:?}",
        spread(&again),
        spread(&first)
    );
    Ok(())
}

// Packet level: the retry path and forged RSTs.

fn services(fam: Family) -> String {
    let mut text = format!(
        "services:\n  - name: web\n    vip: \"{}\"\n    port: 80\n    protocol: tcp\n    affinity: {{client_ip: {{timeout_seconds: 600}}}}\n    failure:\n      consecutive_failures: 3\n      retry_on_refused: true\n      max_ejected_percent: 100\n      min_distinct_clients: 1\n    backends:\n",
        fam.vip()
    );
    for i in 0..3 {
        text += &format!("      - address: \"{}\"\n", backend(fam, i));
    }
    text
}

fn syn_from(fam: Family, port: u16) -> Pkt {
    Pkt {
        smac: CLIENT_MAC,
        dmac: T1_MAC,
        ..Pkt::tcp(fam.client(), port, fam.vip(), 80, TCP_SYN)
    }
}

fn from_backend(fam: Family, b: usize, port: u16, flags: u8) -> Pkt {
    Pkt {
        smac: backend_mac(b),
        dmac: T0_MAC,
        ack: CLIENT_SEQ + 1,
        ..Pkt::tcp(fam.backend(b), PORT, fam.client(), port, flags)
    }
}

/// Where a new connect from the client (source `port`) goes, completing it
/// with the backend's SYN-ACK.
fn connect(bed: &mut FibBed, fam: Family, port: u16) -> Result<usize> {
    let (rc, out) = bed.run_in("t1", &syn_from(fam, port).bytes())?;
    ensure!(rc == XDP_REDIRECT, "SYN from port {port}: {rc}");
    let b = backend_of(&out);
    let (rc, _) = bed.run_in("t0", &from_backend(fam, b, port, TCP_SYN | TCP_ACK).bytes())?;
    ensure!(rc == XDP_REDIRECT, "SYN-ACK to port {port}: {rc}");
    Ok(b)
}

/// The client's affinity entry: its backend id.
fn entry(bed: &FibBed, fam: Family) -> Option<u32> {
    let words = sluice::reconcile::service_key_of(fam.client(), 0, sluice::config::Protocol::Tcp);
    let key = agent_common::AffinityKey {
        service_id: bed.reconciler.services["web"].id,
        family: words.family,
        _pad: [0; 3],
        client: words.addr,
    };
    bed.reconciler.affinity_entry(&key).map(|e| e.backend_id)
}

fn retry_moves_affinity_forged_rsts_do_not(fam: Family) -> Result<()> {
    let mut bed = FibBed::new(&services(fam))?;
    let id = |bed: &FibBed, b: usize| bed.backend_id("web", backend(fam, b));
    let first = connect(&mut bed, fam, 40_000)?;
    ensure!(
        entry(&bed, fam) == Some(id(&bed, first)),
        "no entry for b{first}"
    );
    ensure!(
        connect(&mut bed, fam, 40_001)? == first,
        "the affinity was not followed"
    );

    // A connect to the same backend, then RSTs acknowledging its SYN that
    // claim to be the backend's: from the clients' side, and without ACK.
    let port = 40_002;
    let (rc, out) = bed.run_in("t1", &syn_from(fam, port).bytes())?;
    ensure!(rc == XDP_REDIRECT && backend_of(&out) == first);
    let rst = from_backend(fam, first, port, TCP_RST | TCP_ACK);
    let spoofed = Pkt {
        smac: CLIENT_MAC,
        dmac: T1_MAC,
        ..rst.clone()
    };
    let (rc, out) = bed.run_in("t1", &spoofed.bytes())?;
    ensure!(
        !(rc == XDP_TX && (0..3).any(|i| out[..6] == backend_mac(i))),
        "a spoofed RST resent the SYN"
    );
    bed.run_in("t0", &from_backend(fam, first, port, TCP_RST).bytes())?;
    // The backend answers after all: nothing moved.
    let syn_ack = from_backend(fam, first, port, TCP_SYN | TCP_ACK);
    ensure!(bed.run_in("t0", &syn_ack.bytes())?.0 == XDP_REDIRECT);
    ensure!(
        entry(&bed, fam) == Some(id(&bed, first)),
        "a forged RST moved the entry"
    );
    ensure!(
        connect(&mut bed, fam, 40_003)? == first,
        "a forged RST moved the client"
    );

    // A real refusal (from the backend's side, acknowledging the SYN): the
    // SYN goes to another backend at once (`resyn`), whose SYN-ACK makes
    // it the client's backend.
    let port = 40_004;
    let (rc, out) = bed.run_in("t1", &syn_from(fam, port).bytes())?;
    ensure!(rc == XDP_REDIRECT && backend_of(&out) == first);
    let (rc, out) = bed.run_in(
        "t0",
        &from_backend(fam, first, port, TCP_RST | TCP_ACK).bytes(),
    )?;
    ensure!(rc == XDP_TX, "the refusal was not turned into a SYN: {rc}");
    let next = backend_of(&out);
    ensure!(next != first, "resent to the refusing backend");
    // Not yet: the retried connect is not answered.
    ensure!(entry(&bed, fam) == Some(id(&bed, first)));
    let syn_ack = from_backend(fam, next, port, TCP_SYN | TCP_ACK);
    ensure!(bed.run_in("t0", &syn_ack.bytes())?.0 == XDP_REDIRECT);
    ensure!(
        entry(&bed, fam) == Some(id(&bed, next)),
        "the retry did not move the entry"
    );
    // One refusal ejects nothing (threshold 3), yet the client stays with
    // the backend that took its connection.
    for port in 40_005..40_010 {
        ensure!(connect(&mut bed, fam, port)? == next, "port {port}");
    }
    Ok(())
}

#[test]
fn a_retry_moves_the_affinity_and_forged_rsts_do_not() -> Result<()> {
    retry_moves_affinity_forged_rsts_do_not(Family::V4)?;
    retry_moves_affinity_forged_rsts_do_not(Family::V6)
}

/// Affinity with least connections: a client's entry decides first, even
/// towards the busiest backend; a new client is placed by least
/// connections, never on that backend.
#[test]
fn affinity_comes_before_least_connections() -> Result<()> {
    let fam = Family::V4;
    let text = services(fam).replace(
        "    failure:\n",
        "    algorithm: least_connections\n    failure:\n",
    );
    let mut bed = FibBed::new(&text)?;
    let first = connect(&mut bed, fam, 41_000)?;
    // 30 more connects of the same client, all kept open: its backend
    // becomes by far the busiest, and the client stays with it.
    for port in 41_001..41_031 {
        ensure!(connect(&mut bed, fam, port)? == first, "port {port}");
    }
    // New clients: each has two candidates, at most one of them the busy
    // backend (the second is never the first's backend), and the other
    // has no connection: none lands there.
    for i in 0..20u8 {
        let other: IpAddr = std::net::Ipv4Addr::new(10, 0, 1, 100 + i).into();
        let syn = Pkt {
            smac: CLIENT_MAC,
            dmac: T1_MAC,
            ..Pkt::tcp(other, 42_000, fam.vip(), 80, TCP_SYN)
        };
        let (rc, out) = bed.run_in("t1", &syn.bytes())?;
        ensure!(rc == XDP_REDIRECT, "client {other}: {rc}");
        ensure!(
            backend_of(&out) != first,
            "new client {other} placed on the busiest backend b{first}"
        );
    }
    Ok(())
}
