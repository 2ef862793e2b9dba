//! Network-namespace test beds for Sluice: a client, a load balancer and
//! backends on veth pairs, plus small real servers that say who they are.
//!
//! Used by the integration tests and by the `cargo xtask run` demo. Everything
//! made here is removed on drop (namespaces take their veths with them), so a
//! failing test cleans up too. Names carry the process id and a counter, so
//! tests can run in parallel.

use std::{
    fs::File,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail};

mod segment;
pub use segment::Segment;

/// Runs a command, failing with its stderr when it fails.
pub fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs a command inside a namespace.
pub fn run_in(ns: &str, args: &[&str]) -> Result<()> {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    run(&full)
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this process and call: `{prefix}{pid}x{n}`.
/// Kept short because interface names are limited to 15 bytes.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Result<Self> {
        run(&["ip", "netns", "add", name])?;
        let ns = Self {
            name: name.to_string(),
        };
        run_in(name, &["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn exec(&self, args: &[&str]) -> Result<()> {
        run_in(&self.name, args)
    }

    /// Runs `f` on a thread inside this namespace. Sockets made there belong
    /// to the namespace for their whole life, wherever they are used later.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = format!("/run/netns/{}", self.name);
        thread::scope(|s| {
            s.spawn(|| {
                let file = File::open(&path).with_context(|| format!("opening {path}"))?;
                // SAFETY: setns on a valid namespace fd; it changes only this
                // thread, which ends when the scope does.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("setns {path}: {}", std::io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in namespace {} panicked", self.name))?
        })
    }

    /// Starts `f` on a detached thread that stays inside this namespace.
    pub fn spawn(&self, f: impl FnOnce() + Send + 'static) -> Result<thread::JoinHandle<()>> {
        let path = format!("/run/netns/{}", self.name);
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        Ok(thread::spawn(move || {
            // SAFETY: as in `enter`; the thread is dedicated to this namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                eprintln!("setns {path}: {}", std::io::Error::last_os_error());
                return;
            }
            drop(file);
            f()
        }))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}

/// Packets the namespace's stack dropped for a bad TCP or UDP checksum
/// (`nstat` TcpInCsumErrors, UdpInCsumErrors, Udp6InCsumErrors), since it
/// was made.
pub fn checksum_errors(ns: &Netns) -> Result<u64> {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "nstat", "-asz"])
        .args(["TcpInCsumErrors", "UdpInCsumErrors", "Udp6InCsumErrors"])
        .output()
        .context("running nstat (Debian package iproute2)")?;
    if !out.status.success() {
        bail!(
            "nstat in {}: {}",
            ns.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum())
}

/// Addresses of a test bed for one address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn client(self) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::new(10, 0, 1, 2).into(),
            Family::V6 => "fd00:1::2".parse::<Ipv6Addr>().unwrap().into(),
        }
    }
    pub fn client_gateway(self) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::new(10, 0, 1, 1).into(),
            Family::V6 => "fd00:1::1".parse::<Ipv6Addr>().unwrap().into(),
        }
    }
    pub fn backend(self, i: usize) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::new(10, 1, i as u8, 2).into(),
            Family::V6 => format!("fd01:{i}::2").parse::<Ipv6Addr>().unwrap().into(),
        }
    }
    pub fn backend_gateway(self, i: usize) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::new(10, 1, i as u8, 1).into(),
            Family::V6 => format!("fd01:{i}::1").parse::<Ipv6Addr>().unwrap().into(),
        }
    }
    pub fn vip(self) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::new(10, 100, 0, 1).into(),
            Family::V6 => "fd64::1".parse::<Ipv6Addr>().unwrap().into(),
        }
    }
    /// The LB's own address on the backends' side, used as SNAT source.
    pub fn snat(self) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::new(10, 0, 1, 1).into(),
            Family::V6 => "fd00:1::1".parse::<Ipv6Addr>().unwrap().into(),
        }
    }
    fn prefix(self) -> &'static str {
        match self {
            Family::V4 => "/24",
            Family::V6 => "/64",
        }
    }
}

/// client ⇄ lb ⇄ backend i, each in its own namespace, IPv4 and IPv6.
///
/// In the LB namespace the interface to the client is `front`, the one to
/// backend i is `back{i}`. Client and backends route everything via the LB.
pub struct Topology {
    pub client: Netns,
    pub lb: Netns,
    pub backends: Vec<Netns>,
    /// The unique prefix of every namespace's name (`{base}c`, `{base}l`,
    /// `{base}b{i}`).
    base: String,
}

impl Topology {
    /// Creates the namespaces and wires them; `prefix` keeps names readable.
    pub fn new(prefix: &str, backends: usize) -> Result<Self> {
        let base = unique(prefix);
        let client = Netns::new(&format!("{base}c"))?;
        let lb = Netns::new(&format!("{base}l"))?;
        let mut topo = Topology {
            client,
            lb,
            backends: Vec::new(),
            base: base.clone(),
        };
        for i in 0..backends {
            topo.backends.push(Netns::new(&format!("{base}b{i}"))?);
        }
        topo.wire()?;
        Ok(topo)
    }

    fn wire(&self) -> Result<()> {
        let lb = self.lb.name.as_str();
        link_pair(&self.client.name, "eth0", lb, "front")?;
        for fam in [Family::V4, Family::V6] {
            addr(&self.client.name, "eth0", fam.client(), fam)?;
            addr(lb, "front", fam.client_gateway(), fam)?;
        }
        // Devices exactly as the kernel makes them (GRO off, checksum and
        // segmentation offloads on), as on a container host or a Kubernetes
        // node: what the datapath needs of them, the agent sets itself.
        self.client.exec(&["ip", "link", "set", "eth0", "up"])?;
        self.lb.exec(&["ip", "link", "set", "front", "up"])?;
        route_default(&self.client.name, Family::V4.client_gateway())?;
        route_default(&self.client.name, Family::V6.client_gateway())?;
        for i in 0..self.backends.len() {
            self.wire_backend(i)?;
        }
        wait_for_dad(&self.client)?;
        for b in &self.backends {
            wait_for_dad(b)?;
        }
        wait_for_dad(&self.lb)?;
        Ok(())
    }

    /// Backend i's veth pair (`eth0` there, `back{i}` in the LB), its
    /// addresses and its default route via the LB.
    fn wire_backend(&self, i: usize) -> Result<()> {
        let (b, lb) = (&self.backends[i], self.lb.name.as_str());
        let back = format!("back{i}");
        link_pair(&b.name, "eth0", lb, &back)?;
        for fam in [Family::V4, Family::V6] {
            addr(&b.name, "eth0", fam.backend(i), fam)?;
            addr(lb, &back, fam.backend_gateway(i), fam)?;
        }
        b.exec(&["ip", "link", "set", "eth0", "up"])?;
        self.lb.exec(&["ip", "link", "set", &back, "up"])?;
        route_default(&b.name, Family::V4.backend_gateway(i))?;
        route_default(&b.name, Family::V6.backend_gateway(i))?;
        Ok(())
    }

    /// Adds a backend (namespace and veth pair) to a running topology, as a
    /// new pod's veth appears on a node; returns its index.
    pub fn add_backend(&mut self) -> Result<usize> {
        let i = self.backends.len();
        let name = format!("{}b{i}", self.base);
        self.backends.push(Netns::new(&name)?);
        self.wire_backend(i)?;
        wait_for_dad(&self.backends[i])?;
        Ok(i)
    }

    /// Makes the LB namespace an ordinary router (IPv4 and IPv6
    /// forwarding on), for what benchmarks compare Sluice with: direct
    /// routing, iptables or nftables DNAT, which need the kernel to forward.
    /// Sluice sets what it needs itself; tests of Sluice don't call this.
    pub fn route_through_lb(&self) -> Result<()> {
        for sysctl in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            self.lb.exec(&["sysctl", "-qw", sysctl])?;
        }
        Ok(())
    }

    /// A `NameServer` named `b{i}` on backend i's `family` address and
    /// `port`, for every backend (index i in the result).
    pub fn serve(&self, family: Family, port: u16) -> Result<Vec<NameServer>> {
        self.backends
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                NameServer::start(
                    ns,
                    SocketAddr::new(family.backend(i), port),
                    &format!("b{i}"),
                )
            })
            .collect()
    }

    /// Resolves every neighbour the LB forwards to, so the XDP fast path
    /// (not the kernel's slow path) handles the first packets.
    pub fn warm_neighbours(&self) -> Result<()> {
        for fam in [Family::V4, Family::V6] {
            let mut targets = vec![fam.client()];
            targets.extend((0..self.backends.len()).map(|i| fam.backend(i)));
            for t in targets {
                let t = t.to_string();
                self.lb.exec(&["ping", "-c1", "-W1", "-q", &t])?;
            }
        }
        Ok(())
    }
}

/// A veth pair: `a` in namespace `ns_a`, its peer `b` in `ns_b` (both down).
pub fn link_pair(ns_a: &str, a: &str, ns_b: &str, b: &str) -> Result<()> {
    run(&[
        "ip", "link", "add", a, "netns", ns_a, "type", "veth", "peer", "name", b, "netns", ns_b,
    ])
}

fn addr(ns: &str, dev: &str, ip: IpAddr, fam: Family) -> Result<()> {
    let cidr = format!("{ip}{}", fam.prefix());
    let mut args = vec!["ip", "addr", "add", cidr.as_str(), "dev", dev];
    if fam == Family::V6 {
        args.push("nodad");
    }
    run_in(ns, &args)
}

fn route_default(ns: &str, via: IpAddr) -> Result<()> {
    let via = via.to_string();
    let fam = if via.contains(':') { "-6" } else { "-4" };
    run_in(ns, &["ip", fam, "route", "add", "default", "via", &via])
}

/// Waits until no IPv6 address of `ns` is tentative: addresses added with
/// `nodad` never are, but link-local ones go through duplicate address
/// detection once their link is up. Gives up quietly after 5 s (what needs
/// the addresses then fails by itself, saying what).
pub fn wait_for_dad(ns: &Netns) -> Result<()> {
    for _ in 0..50 {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                "ip",
                "-6",
                "addr",
                "show",
                "tentative",
            ])
            .output()?;
        if out.stdout.is_empty() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// A backend server: TCP (answers each connection with its name and the
/// peer address it saw, then closes) and UDP (answers each datagram likewise).
pub struct NameServer {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
    addr: SocketAddr,
}

impl NameServer {
    /// Serves `name` on `addr` inside `ns`, TCP and UDP.
    pub fn start(ns: &Netns, addr: SocketAddr, name: &str) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tcp, udp) = ns.enter(|| -> Result<(TcpListener, UdpSocket)> {
            let tcp = TcpListener::bind(addr).with_context(|| format!("binding tcp {addr}"))?;
            let udp = UdpSocket::bind(addr).with_context(|| format!("binding udp {addr}"))?;
            Ok((tcp, udp))
        })??;
        // Blocking accepts that give up every 100 ms to look at `stop`:
        // a connection is taken the moment it arrives (polling would add
        // its interval to every connection).
        set_receive_timeout(&tcp, Duration::from_millis(100))?;
        udp.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut threads = Vec::new();
        {
            let stop = stop.clone();
            let name = name.to_string();
            threads.push(thread::spawn(move || serve_tcp(tcp, &name, &stop)));
        }
        {
            let stop = stop.clone();
            let name = name.to_string();
            threads.push(thread::spawn(move || serve_udp(udp, &name, &stop)));
        }
        Ok(Self {
            stop,
            threads,
            addr,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for NameServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// SO_RCVTIMEO on a listener: `accept` returns WouldBlock after `timeout`.
fn set_receive_timeout(listener: &TcpListener, timeout: Duration) -> Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: setsockopt reads a timeval of the size given from a live local.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!("SO_RCVTIMEO: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn serve_tcp(listener: TcpListener, name: &str, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let name = name.to_string();
                thread::spawn(move || answer(stream, peer, &name));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Answers one connection: an HTTP GET or a line gets the server's name and
/// the peer it saw, then the connection closes; a first line `echo` gets the
/// name and then every later line echoed back until the client closes.
fn answer(mut stream: TcpStream, peer: SocketAddr, name: &str) {
    let mut buf = [0u8; 1024];
    let mut request = Vec::new();
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
        if request.windows(4).any(|w| w == b"\r\n\r\n") || request.ends_with(b"\n") {
            break;
        }
    }
    let body = format!("{name} {peer}\n");
    if request.starts_with(b"echo") {
        let _ = stream.set_read_timeout(None);
        if stream.write_all(body.as_bytes()).is_err() {
            return;
        }
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 || stream.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        return;
    }
    let reply = if request.starts_with(b"GET ") {
        format!(
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        body
    };
    let _ = stream.write_all(reply.as_bytes());
}

fn serve_udp(socket: UdpSocket, name: &str, stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        if let Ok((_, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(format!("{name} {peer}\n").as_bytes(), peer);
        }
    }
}

/// One TCP exchange through `target` from inside the client namespace's
/// socket: sends a line, returns the server's reply.
pub fn tcp_ask(target: SocketAddr, timeout: Duration) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&target, timeout)
        .with_context(|| format!("connecting to {target}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"hello\n")?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)
        .with_context(|| format!("reading from {target}"))?;
    Ok(reply)
}

/// One UDP request/reply with `target` from local port `port` (0: any).
/// Distinct ports make distinct flows: the kernel may otherwise hand the
/// same ephemeral port to the next socket, which is the same flow again.
pub fn udp_ask(target: SocketAddr, port: u16, timeout: Duration) -> Result<String> {
    let bind = if target.is_ipv4() {
        SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port)
    } else {
        SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port)
    };
    let s = UdpSocket::bind(bind)?;
    s.set_read_timeout(Some(timeout))?;
    s.connect(target)?;
    let mut buf = [0u8; 2048];
    for _ in 0..3 {
        s.send(b"hello")?;
        if let Ok(n) = s.recv(&mut buf) {
            return Ok(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    bail!("no UDP reply from {target}")
}
