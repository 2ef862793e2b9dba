//! The admin surface as an outsider meets it: metrics and health on a
//! pod-like address, the API only over loopback or with the bearer token,
//! and the HTTP server's limits under a slowloris flood and too many event
//! streams. Clients sit in the test topology's client namespace, off the
//! agent's host as a node's neighbours are.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use sluice::http::{HEADER_READ_TIMEOUT, MAX_CONNECTIONS, MAX_EVENT_STREAMS};
use sluice_tests::{
    Agent, Bed, StopOnDrop, TempDir, http_get, metric, one_service_yaml, sluice_bin, wait_for,
};
use testbed::{Family, Netns};

/// Every endpoint of the API (everything but metrics and health).
const API_PATHS: [&str; 5] = [
    "/api/v1/services",
    "/api/v1/events",
    "/api/v1/events/recent",
    "/api/v1/dashboard",
    "/",
];

/// The LB's address on the client side: what a pod or node address is to
/// the rest of a cluster.
fn exposed(port: u16) -> SocketAddr {
    SocketAddr::new(Family::V4.client_gateway(), port)
}

/// A bed with one backend and the agent's config written.
fn bed(tag: &str) -> Result<(Bed, std::path::PathBuf)> {
    let bed = Bed::new(tag, 1)?;
    let config = bed.dir.path("sluice.yaml");
    let backend = SocketAddr::new(Family::V4.backend(0), 8080);
    std::fs::write(&config, one_service_yaml(1, Family::V4, false, backend))?;
    Ok((bed, config))
}

struct Response {
    status: u16,
    head: String,
    body: String,
}

/// Reads up to the end of a response head: (status, head).
fn read_head(s: &mut TcpStream) -> Result<(u16, String)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            bail!(
                "connection closed inside the response head: {:?}",
                String::from_utf8_lossy(&head)
            );
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status in {head:?}"))?;
    Ok((status, head))
}

/// One GET from `ns` with extra `headers`. An event stream never ends: for
/// one, only the head is read.
fn get(ns: &Netns, addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<Response> {
    ns.enter(|| -> Result<Response> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for (name, value) in headers {
            request += &format!("{name}: {value}\r\n");
        }
        s.write_all(format!("{request}\r\n").as_bytes())?;
        let (status, head) = read_head(&mut s)?;
        let mut body = String::new();
        if !head.contains("text/event-stream") {
            s.read_to_string(&mut body)?;
        }
        Ok(Response { status, head, body })
    })?
}

fn status(ns: &Netns, addr: SocketAddr, path: &str, token: Option<&str>) -> Result<u16> {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    Ok(get(ns, addr, path, &headers)?.status)
}

/// An event stream held open: (status, the connection).
fn open_event_stream(ns: &Netns, addr: SocketAddr) -> Result<(u16, String, TcpStream)> {
    ns.enter(|| -> Result<(u16, String, TcpStream)> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET /api/v1/events HTTP/1.1\r\nHost: {addr}\r\n\r\n")?;
        let (status, head) = read_head(&mut s)?;
        Ok((status, head, s))
    })?
}

/// `sluice run` with `args`, expected to refuse to start: (exit code,
/// stderr). Killed (by its PID) if it is still running after 10 s.
fn refused_start(ns: &Netns, args: &[&str]) -> Result<(Option<i32>, String)> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(sluice_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("sluice {args:?} started instead of refusing to");
        }
        thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output()?;
    Ok((
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// Open descriptors of a process.
fn open_fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("/proc/{pid}/fd"))?
        .count())
}

/// Resident memory of a process, KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")
}

/// The agent's own PID (`ip netns exec` execs it), checked by name.
fn agent_pid(agent: &Agent) -> Result<u32> {
    let pid = agent.pid();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))?;
    if !comm.starts_with("sluice") {
        bail!("PID {pid} is {comm:?}, not the agent");
    }
    Ok(pid)
}

#[test]
fn an_exposed_api_wants_the_bearer_token() -> Result<()> {
    let (bed, config) = bed("admtok")?;
    let token_file = bed.dir.path("api-token");
    std::fs::write(&token_file, "first-token-4d1f0c\n")?;
    let addr = exposed(9464);
    let agent = Agent::start_on(
        &bed.topo.lb,
        &config,
        bed.dir.path("agent.log"),
        addr,
        &[
            "--api-listen",
            &addr.to_string(),
            "--api-token-file",
            token_file.to_str().context("token path")?,
        ],
    )?;
    let client = &bed.topo.client;

    // Metrics and health need no token.
    let metrics = get(client, addr, "/metrics", &[])?;
    assert_eq!(metrics.status, 200, "{}", metrics.body);
    assert!(metrics.body.contains("sluice_build_info"));
    for path in ["/healthz", "/readyz"] {
        assert_eq!(status(client, addr, path, None)?, 200, "{path}");
    }

    // The API: 401 without the token, with a wrong one or another scheme.
    for path in API_PATHS {
        let refused = get(client, addr, path, &[])?;
        assert_eq!(refused.status, 401, "{path} without a token");
        assert!(
            refused
                .head
                .to_lowercase()
                .contains("www-authenticate: bearer"),
            "{path}: {}",
            refused.head
        );
        assert_eq!(
            status(client, addr, path, Some("first-token-4d1f0d"))?,
            401,
            "{path} with a wrong token"
        );
        let basic = get(
            client,
            addr,
            path,
            &[("Authorization", "Basic Zmlyc3QtdG9rZW4tNGQxZjBj")],
        )?;
        assert_eq!(basic.status, 401, "{path} with Basic");
        assert_eq!(
            status(client, addr, path, Some("first-token-4d1f0c"))?,
            200,
            "{path} with the token"
        );
    }
    let auth = [("Authorization", "Bearer first-token-4d1f0c")];
    let services = get(client, addr, "/api/v1/services", &auth)?;
    let json: serde_json::Value = serde_json::from_str(&services.body)?;
    assert_eq!(json["services"][0]["name"], "web", "{json}");
    let events = get(client, addr, "/api/v1/events", &auth)?;
    assert!(events.head.contains("text/event-stream"), "{}", events.head);

    // A new token in the file replaces the old one without a restart.
    std::fs::write(&token_file, "second-token-77aa\n")?;
    wait_for("the new token", Duration::from_secs(15), || {
        Ok(status(client, addr, "/api/v1/services", Some("second-token-77aa"))? == 200)
    })?;
    assert_eq!(
        status(client, addr, "/api/v1/services", Some("first-token-4d1f0c"))?,
        401
    );
    // One that becomes unusable keeps the last good token.
    std::fs::write(&token_file, "")?;
    thread::sleep(sluice::http::token::RELOAD_POLL + Duration::from_secs(1));
    assert_eq!(
        status(client, addr, "/api/v1/services", Some("second-token-77aa"))?,
        200
    );
    assert!(agent.log_text().contains("API token file unusable"));
    Ok(())
}

#[test]
fn an_exposed_api_without_a_usable_token_refuses_to_start() -> Result<()> {
    let ns = Netns::new(&testbed::unique("admno"))?;
    let dir = TempDir::new("admno")?;
    let config = dir.path("sluice.yaml");
    std::fs::write(&config, "interfaces:\n  - name: lo\nservices: []\n")?;
    let config = config.to_str().context("config path")?;
    let run = ["run", "--config", config, "--listen", "127.0.0.1:9464"];

    let no_token = [&run[..], &["--api-listen", "0.0.0.0:9465"]].concat();
    let (code, stderr) = refused_start(&ns, &no_token)?;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("--api-listen 0.0.0.0:9465") && stderr.contains("--api-token-file"),
        "{stderr}"
    );

    let empty = dir.path("empty-token");
    std::fs::write(&empty, "\n")?;
    let missing = dir.path("no-such-token");
    for (file, why) in [(&empty, "empty"), (&missing, "can't read")] {
        let file = file.to_str().context("token path")?;
        let args = [
            &run[..],
            &["--api-listen", "0.0.0.0:9465", "--api-token-file", file],
        ]
        .concat();
        let (code, stderr) = refused_start(&ns, &args)?;
        assert_eq!(code, Some(2), "{stderr}");
        assert!(stderr.contains(file) && stderr.contains(why), "{stderr}");
    }
    Ok(())
}

#[test]
fn a_pod_address_serves_metrics_and_loopback_the_api() -> Result<()> {
    let (bed, config) = bed("admpod")?;
    let addr = exposed(9464);
    let _agent = Agent::start_on(&bed.topo.lb, &config, bed.dir.path("agent.log"), addr, &[])?;
    let client = &bed.topo.client;

    let metrics = get(client, addr, "/metrics", &[])?;
    assert_eq!(metrics.status, 200);
    assert!(metrics.body.contains("sluice_backend_connections_total"));
    for path in ["/healthz", "/readyz"] {
        assert_eq!(status(client, addr, path, None)?, 200, "{path}");
    }
    // Off the host: no API, with or without a token.
    for path in API_PATHS {
        assert_eq!(status(client, addr, path, None)?, 404, "{path}");
        assert_eq!(status(client, addr, path, Some("anything"))?, 404, "{path}");
    }

    // On the host, over loopback, the same port: the API as always.
    let lb = &bed.topo.lb;
    let loopback: SocketAddr = "127.0.0.1:9464".parse()?;
    let (code, body) = http_get(lb, loopback, "/api/v1/services")?;
    assert_eq!(code, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(json["services"][0]["name"], "web", "{json}");
    let (code, head, _stream) = open_event_stream(lb, loopback)?;
    assert_eq!(code, 200, "{head}");
    assert!(head.contains("text/event-stream"), "{head}");
    Ok(())
}

/// 2,000 connections that each send half a request head and wait, from
/// the client namespace at the agent's pod-like address: the agent keeps
/// at most its cap of them (the oldest idle ones give way), a scrape still
/// gets through, and each is closed within the header timeout. So are a
/// connection that sends nothing and a kept-alive one gone idle.
#[test]
fn slowloris_connections_are_capped_and_timed_out() -> Result<()> {
    const ATTACK: usize = 2000;
    /// Descriptors an accepted connection may keep while its task closes
    /// it, above the cap.
    const MARGIN: usize = 64;
    let (bed, config) = bed("admslow")?;
    let addr = exposed(9464);
    let agent = Agent::start_on(&bed.topo.lb, &config, bed.dir.path("agent.log"), addr, &[])?;
    let pid = agent_pid(&agent)?;
    let client = &bed.topo.client;
    let baseline = open_fds(pid)?;
    let rss_before = rss_kib(pid)?;
    let started = Instant::now();

    // Peak descriptors of the agent, sampled all through the attack.
    let sampling = StopOnDrop::new();
    let stop = sampling.flag();
    let sampler = thread::spawn(move || {
        let mut peak = 0;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            peak = peak.max(open_fds(pid).unwrap_or(0));
            thread::sleep(Duration::from_millis(10));
        }
        peak
    });

    let attack = client.enter(|| -> Result<Vec<TcpStream>> {
        (0..ATTACK)
            .map(|i| {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                    .with_context(|| format!("attack connection {i}"))?;
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: sluice\r\nUser-Agent: slo")?;
                Ok(s)
            })
            .collect()
    })??;
    let burst = started.elapsed();
    // Opened after the burst, so the burst doesn't evict them: only the
    // timeout can close them.
    let silent = client.enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))??;
    let mut kept_alive =
        client.enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))??;
    kept_alive.set_read_timeout(Some(Duration::from_secs(10)))?;
    kept_alive.write_all(b"GET /healthz HTTP/1.1\r\nHost: sluice\r\n\r\n")?;
    let (code, head) = read_head(&mut kept_alive)?;
    assert_eq!(code, 200, "{head}");
    let mut body = [0u8; 3];
    kept_alive.read_exact(&mut body)?;
    assert_eq!(&body, b"ok\n");
    let opened = Instant::now();

    // Scrapes get through while the attack holds its connections.
    for _ in 0..3 {
        let metrics = get(client, addr, "/metrics", &[])?;
        assert_eq!(metrics.status, 200);
        assert!(metrics.body.contains("sluice_build_info"));
    }
    let rss_attacked = rss_kib(pid)?;
    sampling.stop();
    let peak = sampler.join().expect("sampler thread");
    assert!(
        peak <= baseline + MAX_CONNECTIONS + MARGIN,
        "{peak} descriptors open at the peak ({baseline} before the attack, cap {MAX_CONNECTIONS})"
    );

    // Every held connection is closed by the agent within the timeout.
    let mut open: Vec<TcpStream> = attack;
    open.push(silent);
    open.push(kept_alive);
    for s in &open {
        s.set_nonblocking(true)?;
    }
    let deadline = opened + HEADER_READ_TIMEOUT + Duration::from_secs(3);
    let mut buf = [0u8; 512];
    while !open.is_empty() {
        open.retain_mut(|s| {
            loop {
                match s.read(&mut buf) {
                    Ok(0) => return false,
                    // An answer (408, say) before the close: read on.
                    Ok(_) => continue,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                    Err(_) => return false,
                }
            }
        });
        if Instant::now() > deadline {
            bail!(
                "{} of {} connections still open {:?} after they were opened",
                open.len(),
                ATTACK + 2,
                opened.elapsed()
            );
        }
        thread::sleep(Duration::from_millis(100));
    }

    eprintln!(
        "{ATTACK} half-sent requests opened in {burst:?}; agent descriptors {baseline} before, {peak} at the peak; RSS {rss_before} KiB before, {rss_attacked} KiB under attack; all closed {:?} after the last was opened",
        opened.elapsed()
    );
    let (_, metrics) = http_get(client, addr, "/metrics")?;
    let dropped = |reason| {
        metric(
            &metrics,
            "sluice_http_connections_dropped_total",
            &[("reason", reason)],
        )
        .unwrap_or(0.0)
    };
    assert!(
        dropped("evicted") >= (ATTACK - MAX_CONNECTIONS) as f64,
        "{metrics}"
    );
    assert!(dropped("header_timeout") >= 2.0, "{metrics}");
    wait_for(
        "the agent's descriptors back to where they were",
        Duration::from_secs(5),
        || Ok(open_fds(pid)? <= baseline + 4),
    )?;
    Ok(())
}

#[test]
fn event_streams_are_capped() -> Result<()> {
    let (bed, config) = bed("admsse")?;
    let agent = Agent::start(&bed.topo.lb, &config, bed.dir.path("agent.log"))?;
    let lb = &bed.topo.lb;

    // The default listener is loopback: it serves the API with no token.
    let (code, body) = http_get(lb, agent.listen, "/api/v1/services")?;
    assert_eq!(code, 200, "{body}");

    let mut streams = Vec::new();
    for i in 0..MAX_EVENT_STREAMS {
        let (code, head, s) = open_event_stream(lb, agent.listen)?;
        assert_eq!(code, 200, "stream {i}: {head}");
        streams.push(s);
    }
    let (code, head, _) = open_event_stream(lb, agent.listen)?;
    assert_eq!(code, 503, "one stream over the cap: {head}");
    assert!(head.to_lowercase().contains("retry-after"), "{head}");
    let (_, metrics) = http_get(lb, agent.listen, "/metrics")?;
    assert_eq!(
        metric(&metrics, "sluice_http_event_streams", &[]),
        Some(MAX_EVENT_STREAMS as f64)
    );
    assert_eq!(
        metric(&metrics, "sluice_http_event_streams_refused_total", &[]),
        Some(1.0)
    );

    // A client that leaves gives its place back (the agent notices at the
    // stream's next keep-alive write, within 15 s).
    drop(streams.pop());
    wait_for(
        "a freed event stream place",
        Duration::from_secs(30),
        || {
            let (code, _, s) = open_event_stream(lb, agent.listen)?;
            streams.push(s);
            Ok(code == 200)
        },
    )?;
    Ok(())
}
