//! Failure handling end to end: real backends that stop, refuse, go silent or
//! answer UDP with ICMP; the real agent; real client connections, from two
//! client addresses in turn (an ejection needs failures seen by two distinct
//! clients by default: `min_distinct_clients`).

use std::{
    cell::Cell,
    collections::BTreeMap,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use sluice_tests::{Agent, TempDir, http_get, metric};
use testbed::{Family, NameServer, Topology};

const FAM: Family = Family::V4;
const PORT: u16 = 8080;
/// Long enough for one SYN retransmission (1 s) and a reply.
const CONNECT: Duration = Duration::from_secs(4);

/// The second client's address, beside `FAM.client()` on the client's link.
const SECOND_CLIENT: &str = "10.0.1.3";

fn clients() -> [IpAddr; 2] {
    [FAM.client(), SECOND_CLIENT.parse().unwrap()]
}

struct Bed {
    topo: Topology,
    /// Which client connects next.
    turn: Cell<usize>,
    servers: Vec<Option<NameServer>>,
    _dir: TempDir,
    agent: Agent,
}

fn backend(i: usize) -> SocketAddr {
    SocketAddr::new(FAM.backend(i), PORT)
}

fn bed(tag: &str, failure: &str) -> Result<Bed> {
    let topo = Topology::new(tag, 3)?;
    topo.client.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{SECOND_CLIENT}/24"),
        "dev",
        "eth0",
    ])?;
    let servers = topo.serve(FAM, PORT)?.into_iter().map(Some).collect();
    topo.warm_neighbours()?;
    let dir = TempDir::new(tag)?;
    let mut text = sluice_tests::interfaces_yaml(3);
    text += "services:\n";
    for proto in ["tcp", "udp"] {
        text += &format!(
            "  - name: web-{proto}\n    vip: {}\n    port: 80\n    protocol: {proto}\n    failure:\n{failure}    backends:\n",
            FAM.vip()
        );
        for i in 0..3 {
            text += &format!("      - address: {}\n", backend(i));
        }
    }
    std::fs::write(dir.path("sluice.yaml"), text)?;
    let agent = Agent::start(&topo.lb, &dir.path("sluice.yaml"), dir.path("agent.log"))?;
    Ok(Bed {
        topo,
        turn: Cell::new(0),
        servers,
        _dir: dir,
        agent,
    })
}

impl Bed {
    fn vip(&self) -> SocketAddr {
        SocketAddr::new(FAM.vip(), 80)
    }

    /// Stops backend i's server: its port refuses TCP and answers UDP with
    /// ICMP port unreachable.
    fn stop(&mut self, i: usize) {
        self.servers[i] = None;
    }

    fn start(&mut self, i: usize) -> Result<()> {
        self.servers[i] = Some(NameServer::start(
            &self.topo.backends[i],
            backend(i),
            &format!("b{i}"),
        )?);
        Ok(())
    }

    /// The client address whose turn it is now.
    fn next_client(&self) -> IpAddr {
        let turn = self.turn.get();
        self.turn.set(turn + 1);
        clients()[turn % 2]
    }

    /// One TCP connection through the VIP from the next client: the name of
    /// the backend that answered, or the error.
    fn connect(&self) -> Result<String> {
        let vip = self.vip();
        let from = self.next_client();
        self.topo.client.enter(|| -> Result<String> {
            let reply = tcp_ask_from(from, vip, CONNECT)?;
            Ok(reply.split_whitespace().next().unwrap_or("").to_string())
        })?
    }

    fn metrics(&self) -> Result<String> {
        Ok(http_get(&self.topo.lb, self.agent.listen, "/metrics")?.1)
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(metric(&self.metrics()?, name, labels).unwrap_or(0.0))
    }

    fn state(&self, service: &str, i: usize) -> Result<String> {
        let (_, body) = http_get(&self.topo.lb, self.agent.listen, "/api/v1/services")?;
        let json: serde_json::Value = serde_json::from_str(&body)?;
        for s in json["services"].as_array().context("services")? {
            if s["name"] != service {
                continue;
            }
            for b in s["backends"].as_array().context("backends")? {
                if b["address"] == backend(i).to_string() {
                    return Ok(b["state"].as_str().unwrap_or("").to_string());
                }
            }
        }
        bail!("backend {} of {service} not listed", backend(i))
    }

    fn wait_state(&self, service: &str, i: usize, want: &str, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let state = self.state(service, i)?;
            if state == want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "b{i} of {service} is {state}, not {want}, after {within:?}:\n{}",
                    self.agent.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `tcp_ask` from the address `from`.
fn tcp_ask_from(from: IpAddr, target: SocketAddr, timeout: Duration) -> Result<String> {
    sluice_tests::tcp_ask_from(SocketAddr::new(from, 0), target, timeout)
}

fn failures(bed: &Bed, service: &str, i: usize, reason: &str) -> Result<f64> {
    let b = backend(i).to_string();
    bed.value(
        "sluice_backend_failures_total",
        &[("service", service), ("backend", &b), ("reason", reason)],
    )
}

/// Runs `n` connections; `midway` is called before connection `at`.
fn run_loop(
    bed: &mut Bed,
    n: usize,
    at: usize,
    midway: impl FnOnce(&mut Bed),
) -> Result<(BTreeMap<String, usize>, usize, Vec<String>)> {
    let mut counts = BTreeMap::new();
    let mut failed = 0;
    let mut order = Vec::new();
    let mut midway = Some(midway);
    for k in 0..n {
        if k == at
            && let Some(f) = midway.take()
        {
            f(bed);
        }
        match bed.connect() {
            Ok(name) => {
                order.push(name.clone());
                *counts.entry(name).or_default() += 1;
            }
            Err(e) => {
                failed += 1;
                let refused = e.chain().any(|c| {
                    c.downcast_ref::<std::io::Error>()
                        .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
                });
                order.push(if refused { "refused" } else { "failed" }.into());
            }
        }
    }
    Ok((counts, failed, order))
}

/// These tests count exactly `consecutive_failures` failed connects to an
/// ejection, whichever client they come from; distinct clients have a test
/// of their own.
const RETRY: &str = "      consecutive_failures: 3\n      ejection_seconds: 60\n      retry_on_refused: true\n      min_distinct_clients: 1\n";

/// With the default `min_distinct_clients: 2`, a stopped backend is ejected
/// at the first refusal that is both the third in a row and makes two
/// distinct clients (never by one client alone), and no later.
#[test]
fn refusals_from_two_clients_eject_with_the_defaults() -> Result<()> {
    let mut b = bed(
        "x2",
        "      consecutive_failures: 3\n      ejection_seconds: 60\n      retry_on_refused: false\n",
    )?;
    b.stop(1);
    let mut refused_by = Vec::new();
    while b.state("web-tcp", 1)? != "ejected" {
        anyhow::ensure!(refused_by.len() < 20, "not ejected: {refused_by:?}");
        let client = clients()[b.turn.get() % 2];
        if let Err(e) = b.connect() {
            let refused = e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
            });
            anyhow::ensure!(refused, "a connect failed otherwise: {e:#}");
            refused_by.push(client);
        }
    }
    // Where the ejection must have come: the first refusal with at least
    // three in a row and two clients among them.
    let expected = (1..=refused_by.len())
        .find(|&n| n >= 3 && refused_by[..n].iter().any(|c| *c != refused_by[0]))
        .context("two clients never refused")?;
    assert_eq!(refused_by.len(), expected, "refused by {refused_by:?}");
    assert_eq!(failures(&b, "web-tcp", 1, "refused")?, expected as f64);
    Ok(())
}

/// A backend stops mid-run. With retry, no client connection fails, and the
/// backend is ejected after exactly `consecutive_failures` refusals.
#[test]
fn refused_with_retry_loses_no_connection() -> Result<()> {
    let mut b = bed("xr", RETRY)?;
    let (counts, failed, order) = run_loop(&mut b, 500, 100, |b| b.stop(1))?;
    assert_eq!(failed, 0, "client-visible failures: {counts:?}");
    assert_eq!(failures(&b, "web-tcp", 1, "refused")?, 3.0);
    let b1 = backend(1).to_string();
    assert_eq!(
        b.value(
            "sluice_backend_ejections_total",
            &[("service", "web-tcp"), ("backend", &b1)]
        )?,
        1.0
    );
    // Every failed connect was retried once: the three refusals, and any
    // SYN a loaded machine answered too late (a timeout) is retried too.
    let timeouts = b.value(
        "sluice_backend_failures_total",
        &[("service", "web-tcp"), ("reason", "timeout")],
    )?;
    assert_eq!(
        b.value("sluice_connection_retries_total", &[("service", "web-tcp")])?,
        3.0 + timeouts
    );
    assert_eq!(b.state("web-tcp", 1)?, "ejected");
    assert!(
        !order[100..].contains(&"b1".to_string()),
        "b1 answered after it stopped"
    );
    // The other two share b1's part evenly (±25%).
    let (c0, c2) = (counts["b0"] as f64, counts["b2"] as f64);
    assert!((c0 - c2).abs() / (c0 + c2) < 0.25, "{counts:?}");
    // The agent logs the ejection when it next reads the health words: the
    // last refusal may be only microseconds old (the retry is immediate).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !b
        .agent
        .log_text()
        .contains("backend ejected by the datapath")
    {
        assert!(Instant::now() < deadline, "no ejection logged");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

#[test]
fn refused_without_retry_fails_at_most_the_threshold() -> Result<()> {
    let mut b = bed(
        "xn",
        "      consecutive_failures: 3\n      ejection_seconds: 60\n      retry_on_refused: false\n      min_distinct_clients: 1\n",
    )?;
    let (counts, failed, order) = run_loop(&mut b, 300, 50, |b| b.stop(1))?;
    // Refusals reach the client until the ejection; a loaded machine may
    // add a slow connect that times out, which is not what is tested here.
    let refused = order.iter().filter(|o| *o == "refused").count();
    assert!(
        (1..=3).contains(&refused),
        "refused {refused}, failed {failed}: {counts:?}"
    );
    assert!(
        failed - refused <= 2,
        "{} connects failed otherwise",
        failed - refused
    );
    assert_eq!(failures(&b, "web-tcp", 1, "refused")?, 3.0);
    assert_eq!(b.state("web-tcp", 1)?, "ejected");
    Ok(())
}

/// A backend that drops everything: clients that retransmit get through on
/// another backend; the backend is ejected by the timeout path.
#[test]
fn silent_backend_times_out_and_is_ejected() -> Result<()> {
    let mut b = bed("xt", RETRY)?;
    let ns = &b.topo.backends[1];
    ns.exec(&["nft", "add", "table", "inet", "sluicetest"])?;
    ns.exec(&[
        "nft",
        "add",
        "chain",
        "inet",
        "sluicetest",
        "input",
        "{ type filter hook input priority 0 ; policy accept ; }",
    ])?;
    ns.exec(&[
        "nft",
        "add",
        "rule",
        "inet",
        "sluicetest",
        "input",
        "tcp",
        "dport",
        "8080",
        "drop",
    ])?;
    let (counts, failed, _) = run_loop(&mut b, 60, 0, |_| {})?;
    assert_eq!(failed, 0, "{counts:?}");
    assert!(!counts.contains_key("b1"));
    assert_eq!(failures(&b, "web-tcp", 1, "timeout")?, 3.0);
    assert_eq!(b.state("web-tcp", 1)?, "ejected");
    Ok(())
}

/// UDP to a stopped server: its kernel answers with ICMP port unreachable,
/// which is counted (and ejects); UDP is never retried.
#[test]
fn icmp_unreachable_is_counted_for_udp() -> Result<()> {
    let mut b = bed("xu", RETRY)?;
    b.stop(1);
    let vip = b.vip();
    let answered = b.topo.client.enter(|| -> Result<usize> {
        let mut answered = 0;
        for port in 0..60u16 {
            let from = clients()[usize::from(port) % 2];
            let s = UdpSocket::bind((from, 21_000 + port))?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            s.send_to(b"hello", vip)?;
            let mut buf = [0u8; 256];
            if s.recv(&mut buf).is_ok() {
                answered += 1;
            }
        }
        Ok(answered)
    })??;
    assert!(failures(&b, "web-udp", 1, "unreachable")? >= 3.0);
    b.wait_state("web-udp", 1, "ejected", Duration::from_secs(2))?;
    // Only the datagrams that went to b1 before its ejection went unanswered.
    assert!(answered >= 57, "{answered} of 60 answered");
    Ok(())
}

/// Readmission after the ejection time; an ejection soon after a
/// readmission lasts twice as long.
#[test]
fn readmitted_after_the_ejection_time_then_longer() -> Result<()> {
    let mut b = bed(
        "xa",
        "      consecutive_failures: 3\n      ejection_seconds: 1\n      probe: false\n",
    )?;
    b.stop(1);
    // Counted by the kernel's ejection counter, not by polling the state: a
    // slow connect could miss a whole (short) ejection.
    let b1 = backend(1).to_string();
    let ejections = |b: &Bed| {
        b.value(
            "sluice_backend_ejections_total",
            &[("service", "web-tcp"), ("backend", &b1)],
        )
    };
    let until_ejected = |b: &Bed, n: f64| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while ejections(b)? < n {
            b.connect()?; // retried: must succeed
            if Instant::now() > deadline {
                bail!("b1 not ejected {n} times");
            }
        }
        Ok(())
    };
    until_ejected(&b, 1.0)?;
    b.wait_state("web-tcp", 1, "active", Duration::from_secs(3))?;
    until_ejected(&b, 2.0)?;
    b.wait_state("web-tcp", 1, "active", Duration::from_secs(5))?;
    let log = b.agent.log_text();
    let events: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("service=\"web-tcp\""))
        .filter_map(|l| {
            if l.contains("event=\"ejected\"") {
                Some(if l.contains("ejected_for_s=1") {
                    "ejected 1s"
                } else if l.contains("ejected_for_s=2") {
                    "ejected 2s"
                } else {
                    "ejected ?"
                })
            } else if l.contains("backend readmitted") {
                Some("readmitted")
            } else {
                None
            }
        })
        .collect();
    assert!(
        events.starts_with(&["ejected 1s", "readmitted", "ejected 2s", "readmitted"]),
        "{events:?}\n{log}"
    );

    // Back up: readmitted connections reach it again.
    b.start(1)?;
    let (counts, failed, _) = run_loop(&mut b, 60, 0, |_| {})?;
    assert_eq!(failed, 0);
    assert!(counts.contains_key("b1"), "{counts:?}");
    Ok(())
}

/// With `probe`, a backend whose server is still down stays ejected.
#[test]
fn probe_keeps_a_dead_backend_out() -> Result<()> {
    let mut b = bed(
        "xp",
        "      consecutive_failures: 3\n      ejection_seconds: 1\n",
    )?;
    b.stop(1);
    while b.state("web-tcp", 1)? != "ejected" {
        b.connect()?;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !b.agent.log_text().contains("readmission probe failed") {
        assert!(Instant::now() < deadline, "no probe failure logged");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(b.state("web-tcp", 1)?, "ejected");
    b.start(1)?;
    b.wait_state("web-tcp", 1, "active", Duration::from_secs(6))?;
    Ok(())
}

/// Every backend failing: `max_ejected_percent` (50% of 3 = 1) holds, and
/// the service says it fails open.
#[test]
fn all_backends_failing_respects_max_ejected_percent() -> Result<()> {
    let mut b = bed(
        "xm",
        "      consecutive_failures: 2\n      ejection_seconds: 60\n      retry_on_refused: false\n",
    )?;
    for i in 0..3 {
        b.stop(i);
    }
    for _ in 0..30 {
        assert!(b.connect().is_err());
    }
    let ejected = (0..3)
        .filter(|&i| b.state("web-tcp", i).is_ok_and(|s| s == "ejected"))
        .count();
    assert_eq!(ejected, 1);
    assert!(b.value("sluice_service_fail_open_total", &[("service", "web-tcp")])? > 0.0);
    Ok(())
}

/// The connect latency histogram counts every connection, with plausible
/// values; active connections follow open and closed streams.
#[test]
fn latency_histogram_and_active_connections() -> Result<()> {
    let b = bed("xl", RETRY)?;
    let n = 50;
    for _ in 0..n {
        b.connect()?;
    }
    let m = b.metrics()?;
    let name = "sluice_backend_connect_latency_seconds";
    let count = metric(&m, &format!("{name}_count"), &[("service", "web-tcp")]).unwrap_or(0.0);
    let sum = metric(&m, &format!("{name}_sum"), &[("service", "web-tcp")]).unwrap_or(0.0);
    assert_eq!(count, n as f64, "{m}");
    assert!(
        sum > 0.0 && sum / count < CONNECT.as_secs_f64(),
        "mean {}",
        sum / count
    );
    let inf = metric(
        &m,
        &format!("{name}_bucket"),
        &[("service", "web-tcp"), ("le", "+Inf")],
    );
    assert_eq!(inf, Some(n as f64));

    // Long-lived streams count as active until they close.
    let vip = b.vip();
    let streams = b.topo.client.enter(|| -> Result<Vec<TcpStream>> {
        (0..4)
            .map(|_| {
                let mut s = TcpStream::connect_timeout(&vip, CONNECT)?;
                s.write_all(b"echo\n")?;
                s.set_read_timeout(Some(CONNECT))?;
                let mut first = [0u8; 64];
                let _ = s.read(&mut first)?;
                Ok(s)
            })
            .collect()
    })??;
    let active = |b: &Bed| {
        b.value(
            "sluice_backend_active_connections",
            &[("service", "web-tcp")],
        )
    };
    assert_eq!(active(&b)?, 4.0);
    drop(streams);
    let deadline = Instant::now() + Duration::from_secs(5);
    while active(&b)? != 0.0 {
        assert!(
            Instant::now() < deadline,
            "active connections stay at {}",
            active(&b)?
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Reads Server-Sent Events from the agent in the background.
struct EventReader {
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl EventReader {
    fn start(b: &Bed) -> Result<Self> {
        let listen = b.agent.listen;
        let mut stream = b.topo.lb.enter(|| -> Result<TcpStream> {
            let mut s = TcpStream::connect_timeout(&listen, Duration::from_secs(2))?;
            write!(
                s,
                "GET /api/v1/events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
            )?;
            Ok(s)
        })??;
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut pending = String::new();
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                pending.push_str(&String::from_utf8_lossy(&buf[..n]));
                while let Some(i) = pending.find('\n') {
                    let line: String = pending.drain(..=i).collect();
                    if let Some(data) = line.trim_end().strip_prefix("data: ") {
                        sink.lock().unwrap().push(data.to_string());
                    }
                }
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        Ok(Self { lines })
    }

    fn events(&self) -> Vec<serde_json::Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn count(&self, service: &str, kind: &str, reason: Option<&str>) -> usize {
        self.events()
            .iter()
            .filter(|e| {
                e["service"] == service
                    && e["kind"] == kind
                    && reason.is_none_or(|r| e["reason"] == r)
            })
            .count()
    }

    fn wait(&self, what: &str, cond: impl Fn(&Self) -> bool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond(self) {
            if Instant::now() > deadline {
                bail!("{what}: events so far: {:#?}", self.events());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

/// The event stream has an event for each connection of a known workload,
/// with the right reasons for failures.
#[test]
fn event_stream_reports_each_connection_and_failure() -> Result<()> {
    let mut b = bed("xe", RETRY)?;
    let events = EventReader::start(&b)?;
    for _ in 0..10 {
        b.connect()?;
    }
    events.wait("10 opens and 10 closes", |e| {
        e.count("web-tcp", "open", None) == 10 && e.count("web-tcp", "close", None) == 10
    })?;
    let open = events
        .events()
        .into_iter()
        .find(|e| e["kind"] == "open")
        .context("an open event")?;
    assert_eq!(open["vip"], "10.100.0.1:80");
    assert!(open["client"].as_str().unwrap().starts_with("10.0.1.2:"));
    assert!(
        open["duration_ms"].as_f64().unwrap() > 0.0,
        "connect latency: {open}"
    );

    let vip = SocketAddr::new(FAM.vip(), 80);
    b.topo.client.enter(|| -> Result<()> {
        for port in 0..5u16 {
            let s = UdpSocket::bind(("0.0.0.0", 22_000 + port))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.send_to(b"hi", vip)?;
            let mut buf = [0u8; 64];
            s.recv(&mut buf)?;
        }
        Ok(())
    })??;
    events.wait("5 UDP opens", |e| e.count("web-udp", "open", None) == 5)?;

    b.stop(1);
    for _ in 0..30 {
        b.connect()?;
    }
    events.wait("3 refusals, 3 retries, 1 ejection", |e| {
        e.count("web-tcp", "fail", Some("refused")) == 3
            && e.count("web-tcp", "retry", None) == 3
            && e.count("web-tcp", "eject", Some("refused")) == 1
    })?;
    let eject = events
        .events()
        .into_iter()
        .find(|e| e["kind"] == "eject")
        .context("an eject event")?;
    assert_eq!(eject["backend"], backend(1).to_string());

    let (_, recent) = http_get(
        &b.topo.lb,
        b.agent.listen,
        "/api/v1/events/recent?limit=1000",
    )?;
    let recent: Vec<serde_json::Value> = serde_json::from_str(&recent)?;
    assert_eq!(
        recent.len(),
        events.events().len(),
        "recent events match the stream"
    );
    Ok(())
}

/// TCP_INFO's `tcpi_options` bits (linux/tcp.h).
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;

/// The client's TCP segments retransmitted so far (`RetransSegs` of its
/// namespace's /proc/net/snmp; a SYN sent again counts). Read from a thread
/// inside the namespace.
fn retransmitted_segments() -> Result<u64> {
    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next(), tcp.next());
    let (Some(names), Some(values)) = (names, values) else {
        bail!("no Tcp lines in /proc/net/snmp");
    };
    let at = names
        .split_whitespace()
        .position(|n| n == "RetransSegs")
        .context("no RetransSegs in /proc/net/snmp")?;
    Ok(values
        .split_whitespace()
        .nth(at)
        .context("RetransSegs has no value")?
        .parse()?)
}

/// One connection: the options TCP_INFO says were negotiated, and the name
/// of the backend that answered.
fn connect_with_options(vip: SocketAddr) -> Result<(u8, String)> {
    use std::os::fd::AsRawFd;
    let mut s = TcpStream::connect_timeout(&vip, CONNECT)
        .with_context(|| format!("connecting to {vip}"))?;
    // SAFETY: a zeroed tcp_info is valid; getsockopt writes at most `len`
    // bytes into it.
    let options = unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        );
        if rc != 0 {
            bail!(
                "TCP_INFO of the connection to {vip}: {}",
                std::io::Error::last_os_error()
            );
        }
        info.tcpi_options
    };
    s.set_read_timeout(Some(CONNECT))?;
    s.write_all(b"hello\n")?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)
        .with_context(|| format!("reading from {vip}"))?;
    Ok((
        options,
        reply.split_whitespace().next().unwrap_or("").to_string(),
    ))
}

/// Backend 1's port is closed: connections whose first Maglev choice it is
/// are refused there, and the kernel turns each refusal into the client's
/// SYN towards the next backend at once. Every connection completes, none
/// needs the client to send its SYN again, and each negotiated the
/// client's SYN options (the backend's SYN-ACK carries them only if the
/// SYN it got did).
fn refused_first_choice_goes_on_at_once(fam: Family, tag: &str) -> Result<()> {
    let topo = Topology::new(tag, 3)?;
    let _servers = [0, 2].map(|i| {
        NameServer::start(
            &topo.backends[i],
            SocketAddr::new(fam.backend(i), PORT),
            &format!("b{i}"),
        )
    });
    let _servers = _servers.into_iter().collect::<Result<Vec<_>>>()?;
    topo.warm_neighbours()?;
    let dir = TempDir::new(tag)?;
    let mut text = sluice_tests::interfaces_yaml(3);
    text += &format!(
        "services:\n  - name: web\n    vip: \"{}\"\n    port: 80\n    protocol: tcp\n    failure:\n      consecutive_failures: 1000\n      retry_on_refused: true\n    backends:\n",
        fam.vip()
    );
    for i in 0..3 {
        text += &format!(
            "      - address: \"{}\"\n",
            SocketAddr::new(fam.backend(i), PORT)
        );
    }
    std::fs::write(dir.path("sluice.yaml"), text)?;
    let agent = Agent::start(&topo.lb, &dir.path("sluice.yaml"), dir.path("agent.log"))?;
    let vip = SocketAddr::new(fam.vip(), 80);
    let (before, outcomes, after) = topo.client.enter(|| -> Result<_> {
        let before = retransmitted_segments()?;
        let outcomes: Vec<Result<(u8, String)>> =
            (0..30).map(|_| connect_with_options(vip)).collect();
        Ok((before, outcomes, retransmitted_segments()?))
    })??;
    let log = || agent.log_text();
    let all = TCPI_OPT_TIMESTAMPS | TCPI_OPT_SACK | TCPI_OPT_WSCALE;
    for outcome in &outcomes {
        let (options, name) = outcome
            .as_ref()
            .map_err(|e| anyhow::anyhow!("a client-visible failure: {e:#}\n{}", log()))?;
        assert!(name == "b0" || name == "b2", "answered by {name:?}");
        assert_eq!(options & all, all, "negotiated options {options:#x}");
    }
    let m = http_get(&topo.lb, agent.listen, "/metrics")?.1;
    let b1 = SocketAddr::new(fam.backend(1), PORT).to_string();
    let refused = metric(
        &m,
        "sluice_backend_failures_total",
        &[("service", "web"), ("backend", &b1), ("reason", "refused")],
    )
    .unwrap_or(0.0);
    let retries = metric(&m, "sluice_connection_retries_total", &[("service", "web")]);
    assert!(refused >= 1.0, "no connection chose b1 first:\n{m}");
    assert_eq!(retries, Some(refused), "each refusal retried once");
    assert_eq!(
        after - before,
        0,
        "the client sent {} segments again ({refused} refusals)",
        after - before
    );
    Ok(())
}

#[test]
fn refused_first_choice_goes_on_at_once_ipv4() -> Result<()> {
    refused_first_choice_goes_on_at_once(Family::V4, "xq")
}

#[test]
fn refused_first_choice_goes_on_at_once_ipv6() -> Result<()> {
    refused_first_choice_goes_on_at_once(Family::V6, "xs")
}
