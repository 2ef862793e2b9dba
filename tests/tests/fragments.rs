//! Large UDP datagrams (DNS answers over 1,500 bytes, EDNS) through the VIP:
//! their fragments follow the first fragment's backend, both ways, both
//! families.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use sluice_tests::{Agent, StopOnDrop, TempDir, http_get, metric};
use testbed::{Family, Netns, Topology};

const SIZE: usize = 4000;
const PORT: u16 = 5353;

/// Answers every datagram with `SIZE` bytes: its name, the peer and the
/// size of the request it got, padded; until `stop`.
fn serve(
    ns: &Netns,
    addr: SocketAddr,
    name: String,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>> {
    let socket = ns.enter(|| UdpSocket::bind(addr))??;
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    Ok(std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        while !stop.load(Ordering::SeqCst) {
            if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                let mut reply = format!("{name} {peer} {n}\n").into_bytes();
                reply.resize(SIZE, b'.');
                let _ = socket.send_to(&reply, peer);
            }
        }
    }))
}

/// The servers' threads: stopped and joined on drop, failures included.
struct Servers {
    stop: StopOnDrop,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.stop();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn run(family: Family) -> Result<()> {
    let topo = Topology::new("fr", 3)?;
    let mut servers = Servers {
        stop: StopOnDrop::new(),
        threads: Vec::new(),
    };
    for (i, ns) in topo.backends.iter().enumerate() {
        servers.threads.push(serve(
            ns,
            SocketAddr::new(family.backend(i), PORT),
            format!("b{i}"),
            servers.stop.flag(),
        )?);
    }
    topo.warm_neighbours()?;
    let dir = TempDir::new("fr")?;
    let mut text = sluice_tests::interfaces_yaml(3);
    text += &format!(
        "services:\n  - name: dns\n    vip: \"{}\"\n    port: 53\n    protocol: udp\n    backends:\n",
        family.vip()
    );
    for i in 0..3 {
        text += &format!(
            "      - address: \"{}\"\n",
            SocketAddr::new(family.backend(i), PORT)
        );
    }
    std::fs::write(dir.path("sluice.yaml"), text)?;
    let agent = Agent::start(&topo.lb, &dir.path("sluice.yaml"), dir.path("agent.log"))?;

    let vip = SocketAddr::new(family.vip(), 53);
    let counts = topo.client.enter(|| -> Result<BTreeMap<String, usize>> {
        let mut counts = BTreeMap::new();
        for i in 0..60u16 {
            let any = match family {
                Family::V4 => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 30_000 + i),
                Family::V6 => SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 30_000 + i),
            };
            let s = UdpSocket::bind(any)?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            s.connect(vip)?;
            let request = vec![b'q'; SIZE];
            let mut buf = vec![0u8; 65_536];
            let mut got = None;
            for _ in 0..3 {
                s.send(&request)?;
                if let Ok(n) = s.recv(&mut buf) {
                    got = Some(n);
                    break;
                }
            }
            let n = got.with_context(|| format!("no answer to request {i} through {vip}"))?;
            if n != SIZE {
                bail!("answer {i}: {n} bytes, not {SIZE}");
            }
            let head = String::from_utf8_lossy(&buf[..80]).into_owned();
            let mut words = head.split_whitespace();
            let (Some(name), Some(_peer), Some(size)) = (words.next(), words.next(), words.next())
            else {
                bail!("malformed answer {head:?}");
            };
            if size != SIZE.to_string() {
                bail!("{name} got a request of {size} bytes, not {SIZE}");
            }
            *counts.entry(name.to_string()).or_default() += 1;
        }
        Ok(counts)
    })??;
    drop(servers);
    assert_eq!(counts.values().sum::<usize>(), 60);
    assert_eq!(
        counts.len(),
        3,
        "the datagrams spread over the backends: {counts:?}"
    );
    // Every later fragment found its first: none was passed to the kernel
    // for want of it.
    let m = http_get(&topo.lb, agent.listen, "/metrics")?.1;
    assert_eq!(
        metric(&m, "sluice_passed_total", &[("reason", "fragment")]),
        Some(0.0),
        "{m}"
    );
    Ok(())
}

#[test]
fn ipv4_large_udp_datagrams_are_balanced_whole() -> Result<()> {
    run(Family::V4)
}

#[test]
fn ipv6_large_udp_datagrams_are_balanced_whole() -> Result<()> {
    run(Family::V6)
}
