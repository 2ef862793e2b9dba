//! Path MTU through the LB: a router between the LB and the backend has a
//! narrower link (1,300 bytes) than both ends (1,500: their MSS doesn't
//! help). Its "fragmentation needed" / "packet too big" quotes the packet as
//! the LB rewrote it; Sluice translates it to quote what the client sent, or
//! the client never learns the path MTU and a large upload stalls.
//!
//! client ─ lb ─ router (backend 0 of the topology) ─[1300]─ server

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use sluice_tests::{Agent, StopOnDrop, TempDir};
use testbed::{Family, Netns, Topology, link_pair, unique, wait_for_dad};

const UPLOAD: usize = 2 << 20;

fn server_addr(family: Family) -> IpAddr {
    match family {
        Family::V4 => "10.2.0.2".parse().unwrap(),
        Family::V6 => "fd02::2".parse().unwrap(),
    }
}

/// Puts `server` behind the topology's backend 0, which routes to it over a
/// 1,300-byte link.
fn wire_server(topo: &Topology, server: &Netns) -> Result<()> {
    let router = &topo.backends[0];
    link_pair(&router.name, "eth1", &server.name, "eth0")?;
    router.exec(&["ip", "addr", "add", "10.2.0.1/24", "dev", "eth1"])?;
    router.exec(&["ip", "addr", "add", "fd02::1/64", "dev", "eth1", "nodad"])?;
    router.exec(&["ip", "link", "set", "eth1", "mtu", "1300", "up"])?;
    // A router forwards: its own setting, nothing Sluice needs.
    router.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    router.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
    server.exec(&["ip", "addr", "add", "10.2.0.2/24", "dev", "eth0"])?;
    server.exec(&["ip", "addr", "add", "fd02::2/64", "dev", "eth0", "nodad"])?;
    server.exec(&["ip", "link", "set", "eth0", "up"])?;
    server.exec(&["ip", "route", "add", "default", "via", "10.2.0.1"])?;
    server.exec(&["ip", "-6", "route", "add", "default", "via", "fd02::1"])?;
    let lb = &topo.lb;
    lb.exec(&["ip", "route", "add", "10.2.0.0/24", "via", "10.1.0.2"])?;
    lb.exec(&["ip", "-6", "route", "add", "fd02::/64", "via", "fd01:0::2"])?;
    // The new link's IPv6 link-local addresses (neighbour discovery's
    // source) must be usable.
    wait_for_dad(router)?;
    wait_for_dad(server)?;
    Ok(())
}

/// Counts what each connection uploads and answers with the count, until
/// dropped (which stops and joins its thread, failures included).
struct CountServer {
    stop: StopOnDrop,
    thread: Option<JoinHandle<()>>,
}

/// How long the server's blocking calls wait before looking at `stop`.
const POLL: Duration = Duration::from_millis(100);
/// A connection idle this long is answered with what it sent so far.
const IDLE: Duration = Duration::from_secs(30);

impl CountServer {
    fn start(server: &Netns, addr: SocketAddr) -> Result<Self> {
        let listener = server.enter(|| TcpListener::bind(addr))??;
        // Blocking accepts that give up every POLL to look at `stop`.
        socket2::SockRef::from(&listener).set_read_timeout(Some(POLL))?;
        let stop = StopOnDrop::new();
        let flag = stop.flag();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => count(stream, &flag),
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(_) => std::thread::sleep(POLL),
                }
            }
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for CountServer {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn count(mut stream: TcpStream, stop: &Arc<AtomicBool>) {
    let _ = stream.set_read_timeout(Some(POLL));
    let mut buf = vec![0u8; 65_536];
    let mut total = 0usize;
    let mut last = Instant::now();
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                total += n;
                last = Instant::now();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                if last.elapsed() > IDLE {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    let _ = stream.write_all(format!("{total}\n").as_bytes());
}

fn run_upload(family: Family, snat: bool) -> Result<()> {
    let tag = if snat { "pms" } else { "pmd" };
    let topo = Topology::new(tag, 1)?;
    let server = Netns::new(&unique("pmx"))?;
    wire_server(&topo, &server)?;
    let backend = SocketAddr::new(server_addr(family), 8080);
    let _count = CountServer::start(&server, backend)?;
    topo.warm_neighbours()?;
    let dir = TempDir::new(tag)?;
    let text = sluice_tests::one_service_yaml(1, family, snat, backend);
    std::fs::write(dir.path("sluice.yaml"), text)?;
    let agent = Agent::start(&topo.lb, &dir.path("sluice.yaml"), dir.path("agent.log"))?;

    let vip = SocketAddr::new(family.vip(), 80);
    let answer = topo.client.enter(|| -> Result<String> {
        let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(3))?;
        s.set_write_timeout(Some(Duration::from_secs(20)))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.write_all(&vec![b'x'; UPLOAD])
            .context("uploading (a path MTU black hole stalls here)")?;
        s.shutdown(Shutdown::Write)?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok(answer)
    })?;
    let answer = match answer {
        Ok(a) => a,
        Err(e) => bail!("{e:#}\nagent log:\n{}", agent.log_text()),
    };
    assert_eq!(answer.trim(), UPLOAD.to_string(), "the server got it all");
    Ok(())
}

#[test]
fn ipv4_dnat_upload_through_a_narrow_link() -> Result<()> {
    run_upload(Family::V4, false)
}

#[test]
fn ipv4_snat_upload_through_a_narrow_link() -> Result<()> {
    run_upload(Family::V4, true)
}

#[test]
fn ipv6_dnat_upload_through_a_narrow_link() -> Result<()> {
    run_upload(Family::V6, false)
}

#[test]
fn ipv6_snat_upload_through_a_narrow_link() -> Result<()> {
    run_upload(Family::V6, true)
}
