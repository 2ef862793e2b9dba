//! Discovery against real servers started by the tests: dnsmasq (SRV and A
//! records) and etcd v3 (a watched key prefix). Backends follow the source;
//! a source that dies, or says something unusable, or would empty a service,
//! never takes a backend away; a draining backend keeps its connection.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use sluice_tests::{Agent, Bed, Daemon, backend_states, http_get, metric, service_json, wait_for};
use testbed::Topology;

const VIP: &str = "10.100.0.1:80";

fn bed(tag: &str, backends: usize) -> Result<Bed> {
    Bed::new(tag, backends)
}

fn backend(i: usize) -> String {
    format!("10.1.{i}.2:8080")
}

/// Which backends (by the name their server answers with) `n` new
/// connections through the VIP reach.
fn reached(topo: &Topology, n: usize) -> Result<BTreeSet<String>> {
    sluice_tests::backends_reached(topo, "10.100.0.1:80".parse()?, n)
}

/// The service's backends that take new connections.
fn active(b: &Bed, agent: &Agent, service: &str) -> Result<BTreeSet<String>> {
    Ok(backend_states(&b.topo.lb, agent, service)?
        .into_iter()
        .filter(|(_, state)| state == "active")
        .map(|(addr, _)| addr)
        .collect())
}

fn set(items: &[usize]) -> BTreeSet<String> {
    items.iter().map(|&i| backend(i)).collect()
}

fn names(items: &[usize]) -> BTreeSet<String> {
    items.iter().map(|i| format!("b{i}")).collect()
}

fn healthy(b: &Bed, agent: &Agent, service: &str) -> Result<bool> {
    Ok(service_json(&b.topo.lb, agent, service)?["discovery"]["healthy"] == true)
}

/// Waits until the active set is `want`; returns how long that took.
fn wait_active(
    b: &Bed,
    agent: &Agent,
    service: &str,
    want: &[usize],
    limit: Duration,
) -> Result<Duration> {
    let started = Instant::now();
    let want = set(want);
    wait_for(&format!("{service} active = {want:?}"), limit, || {
        Ok(active(b, agent, service)? == want)
    })
    .with_context(|| {
        format!(
            "now {:?}; agent log:\n{}",
            backend_states(&b.topo.lb, agent, service).unwrap_or_default(),
            agent.log_text()
        )
    })?;
    Ok(started.elapsed())
}

// ---------------------------------------------------------------- dnsmasq

/// dnsmasq serving `_web._tcp.sluice.test` (SRV, weight 10 each) and
/// `web.sluice.test` (A) for the given backends, with a 2 s TTL.
fn dnsmasq(b: &Bed, backends: &[usize]) -> Result<Daemon> {
    let mut records = Vec::new();
    for &i in backends {
        records.push(format!("--host-record=b{i}.sluice.test,10.1.{i}.2"));
        records.push(format!(
            "--srv-host=_web._tcp.sluice.test,b{i}.sluice.test,8080,0,10"
        ));
        records.push(format!("--address=/web.sluice.test/10.1.{i}.2"));
    }
    dnsmasq_with(b, &records)
}

/// dnsmasq with these record options, authoritative for `sluice.test`
/// (a name it doesn't have is NXDOMAIN), with a 2 s TTL.
fn dnsmasq_with(b: &Bed, records: &[String]) -> Result<Daemon> {
    let mut args: Vec<String> = [
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        "--user=root",
        "--port=5353",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--local-ttl=2",
        "--local=/sluice.test/",
        "--log-facility=-",
        "--pid-file=",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(records.iter().cloned());
    let d = Daemon::start(&b.topo.lb, "dnsmasq", &args, b.dir.path("dnsmasq.log"))?;
    // Ready once it answers on its port.
    wait_for("dnsmasq to listen", Duration::from_secs(10), || {
        Ok(std::process::Command::new("ip")
            .args(["netns", "exec", &b.topo.lb.name])
            .args(["dig", "+short", "+time=1", "+tries=1", "-p", "5353"])
            .args(["@127.0.0.1", "_web._tcp.sluice.test", "SRV"])
            .output()
            .is_ok_and(|o| o.status.success() && !o.stdout.is_empty()))
    })
    .with_context(|| d.log_text())?;
    Ok(d)
}

#[test]
fn dns_srv_and_a_records_follow_dnsmasq_and_survive_its_death() -> Result<()> {
    let b = bed("dns", 3)?;
    let mut dns = dnsmasq(&b, &[0, 1])?;
    let config = sluice_tests::interfaces_yaml(3)
        + "services:
  - name: web
    vip: 10.100.0.1
    port: 80
    protocol: tcp
    discovery:
      dns:
        name: _web._tcp.sluice.test
        server: 127.0.0.1:5353
        min_interval_seconds: 1
        max_interval_seconds: 30
  - name: web-a
    vip: 10.100.0.2
    port: 80
    protocol: tcp
    discovery:
      dns:
        name: web.sluice.test
        type: a
        port: 8080
        server: 127.0.0.1:5353
        min_interval_seconds: 1
";
    std::fs::write(b.dir.path("sluice.yaml"), config)?;
    let agent = Agent::start(&b.topo.lb, &b.dir.path("sluice.yaml"), b.dir.path("a.log"))?;
    wait_active(&b, &agent, "web", &[0, 1], Duration::from_secs(10))?;
    wait_active(&b, &agent, "web-a", &[0, 1], Duration::from_secs(10))?;
    assert_eq!(reached(&b.topo, 60)?, names(&[0, 1]));

    // New records (dnsmasq restarted with them): followed within the TTL
    // (2 s) plus a query.
    dns.kill();
    let mut dns = dnsmasq(&b, &[1, 2])?;
    let took = wait_active(&b, &agent, "web", &[1, 2], Duration::from_secs(10))?;
    eprintln!("SRV change followed in {took:?} (TTL 2 s)");
    wait_active(&b, &agent, "web-a", &[1, 2], Duration::from_secs(10))?;
    assert_eq!(reached(&b.topo, 60)?, names(&[1, 2]));

    // dnsmasq dies: the backends stay, the provider is unhealthy.
    dns.kill();
    wait_for("provider unhealthy", Duration::from_secs(15), || {
        Ok(!healthy(&b, &agent, "web")?)
    })?;
    assert_eq!(active(&b, &agent, "web")?, set(&[1, 2]));
    assert_eq!(reached(&b.topo, 30)?, names(&[1, 2]));
    let (status, body) = http_get(&b.topo.lb, agent.listen, "/readyz")?;
    assert_eq!(
        status, 200,
        "a discovery failure must not unready the agent"
    );
    assert!(
        body.contains("discovery unhealthy: service web: dns"),
        "/readyz names the failing provider: {body}"
    );
    let (_, metrics) = http_get(&b.topo.lb, agent.listen, "/metrics")?;
    assert_eq!(
        metric(&metrics, "sluice_discovery_healthy", &[("service", "web")]),
        Some(0.0)
    );
    assert_eq!(
        metric(&metrics, "sluice_discovery_backends", &[("service", "web")]),
        Some(2.0)
    );

    // Back: healthy again, by itself.
    let _dns = dnsmasq(&b, &[1, 2])?;
    wait_for("provider healthy again", Duration::from_secs(15), || {
        healthy(&b, &agent, "web")
    })?;
    assert_eq!(active(&b, &agent, "web")?, set(&[1, 2]));
    Ok(())
}

/// One bad SRV target (a name that doesn't exist, or one that resolves
/// to a loopback address) is skipped on its own, and the answer's other
/// targets serve; an answer of more than 512 records is capped, the same
/// first 512 on every node, with a log line.
#[test]
fn a_bad_srv_target_skips_only_itself_and_big_answers_are_capped() -> Result<()> {
    let b = bed("dnsbad", 3)?;
    let mut records = vec![
        "--host-record=b0.sluice.test,10.1.0.2".to_string(),
        "--host-record=b1.sluice.test,10.1.1.2".to_string(),
        "--host-record=lo.sluice.test,127.0.0.1".to_string(),
    ];
    for target in ["b0", "gone", "lo", "b1"] {
        records.push(format!(
            "--srv-host=_web._tcp.sluice.test,{target}.sluice.test,8080,0,10"
        ));
    }
    // 600 A records of one name (10.2.0.0 to 10.2.2.87).
    for i in 0..600u32 {
        let ip = std::net::Ipv4Addr::from(0x0a02_0000 + i);
        records.push(format!("--host-record=many.sluice.test,{ip}"));
    }
    let _dns = dnsmasq_with(&b, &records)?;
    let config = sluice_tests::interfaces_yaml(3)
        + "services:
  - name: web
    vip: 10.100.0.1
    port: 80
    protocol: tcp
    discovery:
      dns:
        name: _web._tcp.sluice.test
        server: 127.0.0.1:5353
        min_interval_seconds: 1
  - name: many
    vip: 10.100.0.2
    port: 80
    protocol: tcp
    discovery:
      dns:
        name: many.sluice.test
        type: a
        port: 8080
        server: 127.0.0.1:5353
        min_interval_seconds: 1
";
    std::fs::write(b.dir.path("sluice.yaml"), config)?;
    let agent = Agent::start(&b.topo.lb, &b.dir.path("sluice.yaml"), b.dir.path("a.log"))?;
    wait_active(&b, &agent, "web", &[0, 1], Duration::from_secs(10))?;
    assert!(healthy(&b, &agent, "web")?);
    assert_eq!(reached(&b.topo, 40)?, names(&[0, 1]));
    let log = agent.log_text();
    for note in [
        "note=\"SRV target gone.sluice.test.: ",
        "note=\"SRV target lo.sluice.test.: backend 127.0.0.1:8080: a loopback address can't be a backend; skipped\"",
    ] {
        assert!(log.contains(note), "not logged: {note}\n{log}");
    }

    wait_for("the capped answer applied", Duration::from_secs(15), || {
        Ok(backend_states(&b.topo.lb, &agent, "many")?.len() == 512)
    })
    .with_context(|| agent.log_text())?;
    let many = backend_states(&b.topo.lb, &agent, "many")?;
    assert!(many.contains_key("10.2.0.0:8080") && many.contains_key("10.2.1.255:8080"));
    assert!(!many.contains_key("10.2.2.0:8080"), "past the first 512");
    let log = agent.log_text();
    assert!(
        log.contains("note=\"600 backends; the first 512 by address are used\""),
        "{log}"
    );
    Ok(())
}

// ---------------------------------------------------------------- etcd

struct Etcd {
    daemon: Daemon,
    data_dir: std::path::PathBuf,
}

const ETCD_URL: &str = "http://127.0.0.1:2379";

fn etcd(b: &Bed) -> Result<Etcd> {
    let data_dir = b.dir.path("etcd-data");
    let args: Vec<String> = [
        "--name=sluice-test",
        &format!("--data-dir={}", data_dir.display()),
        &format!("--listen-client-urls={ETCD_URL}"),
        &format!("--advertise-client-urls={ETCD_URL}"),
        "--listen-peer-urls=http://127.0.0.1:2380",
        "--initial-advertise-peer-urls=http://127.0.0.1:2380",
        "--initial-cluster=sluice-test=http://127.0.0.1:2380",
        "--log-outputs=stderr",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let daemon = Daemon::start(&b.topo.lb, "etcd", &args, b.dir.path("etcd.log"))?;
    let e = Etcd { daemon, data_dir };
    wait_for("etcd to serve", Duration::from_secs(30), || {
        Ok(etcdctl(b, &["endpoint", "health"]).is_ok())
    })
    .with_context(|| e.daemon.log_text())?;
    Ok(e)
}

fn etcdctl(b: &Bed, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &b.topo.lb.name, "etcdctl"])
        .arg(format!("--endpoints={ETCD_URL}"))
        .args(["--dial-timeout=1s", "--command-timeout=2s"])
        .args(args)
        .env("ETCDCTL_API", "3")
        .output()?;
    if !out.status.success() {
        bail!("etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn put(b: &Bed, i: usize, weight: u32) -> Result<()> {
    let value = format!(r#"{{"address": "{}", "weight": {weight}}}"#, backend(i));
    etcdctl(b, &["put", &format!("/sluice/web/b{i}"), &value]).map(drop)
}

#[test]
fn etcd_watch_follows_keys_resumes_after_a_restart_and_never_empties() -> Result<()> {
    let b = bed("etcd", 3)?;
    let mut server = etcd(&b)?;
    put(&b, 0, 1)?;
    put(&b, 1, 1)?;
    let config = sluice_tests::interfaces_yaml(3)
        + &format!(
            "services:
  - name: web
    vip: 10.100.0.1
    port: 80
    protocol: tcp
    drain_timeout_seconds: 5
    discovery:
      etcd:
        endpoints: [\"{ETCD_URL}\"]
        prefix: /sluice/web/
"
        );
    std::fs::write(b.dir.path("sluice.yaml"), config)?;
    let agent = Agent::start(&b.topo.lb, &b.dir.path("sluice.yaml"), b.dir.path("a.log"))?;
    wait_active(&b, &agent, "web", &[0, 1], Duration::from_secs(10))?;
    assert_eq!(reached(&b.topo, 60)?, names(&[0, 1]));

    // Puts and deletes follow (the issue asks for within a second; the
    // limit here is loose for a loaded CI machine, the time is printed).
    put(&b, 2, 1)?;
    let took = wait_active(&b, &agent, "web", &[0, 1, 2], Duration::from_secs(5))?;
    eprintln!("etcd put followed in {took:?}");
    etcdctl(&b, &["del", "/sluice/web/b0"])?;
    let took = wait_active(&b, &agent, "web", &[1, 2], Duration::from_secs(5))?;
    eprintln!("etcd delete followed in {took:?}");
    assert_eq!(reached(&b.topo, 60)?, names(&[1, 2]));

    // A value that is not a backend: refused, the last good set stays.
    etcdctl(&b, &["put", "/sluice/web/junk", "not json"])?;
    wait_for("garbage refused", Duration::from_secs(5), || {
        Ok(!healthy(&b, &agent, "web")?)
    })?;
    let s = service_json(&b.topo.lb, &agent, "web")?;
    assert!(
        s["discovery"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("/sluice/web/junk")),
        "the error names the key: {s}"
    );
    assert_eq!(active(&b, &agent, "web")?, set(&[1, 2]));
    etcdctl(&b, &["del", "/sluice/web/junk"])?;
    wait_for("healthy after the fix", Duration::from_secs(5), || {
        healthy(&b, &agent, "web")
    })?;

    // Every key deleted: held back, the service keeps serving.
    etcdctl(&b, &["del", "--prefix", "/sluice/web/"])?;
    wait_for("empty update held back", Duration::from_secs(5), || {
        Ok(service_json(&b.topo.lb, &agent, "web")?["discovery"]["held_back"] == true)
    })?;
    assert_eq!(active(&b, &agent, "web")?, set(&[1, 2]));
    assert_eq!(reached(&b.topo, 30)?, names(&[1, 2]));
    put(&b, 1, 1)?;
    put(&b, 2, 1)?;

    // etcd killed: unhealthy, nothing removed.
    server.daemon.kill();
    wait_for("provider unhealthy", Duration::from_secs(10), || {
        Ok(!healthy(&b, &agent, "web")?)
    })?;
    assert_eq!(active(&b, &agent, "web")?, set(&[1, 2]));
    assert_eq!(reached(&b.topo, 30)?, names(&[1, 2]));

    // Restarted on the same data: the watch resumes from its revision and
    // sees the change made before it reconnected.
    let data_dir = server.data_dir.clone();
    drop(server);
    assert!(data_dir.exists());
    let _server = etcd(&b)?;
    put(&b, 0, 1)?;
    wait_active(&b, &agent, "web", &[0, 1, 2], Duration::from_secs(15))?;
    wait_for("healthy after the restart", Duration::from_secs(10), || {
        healthy(&b, &agent, "web")
    })?;
    assert_eq!(reached(&b.topo, 90)?, names(&[0, 1, 2]));
    // One list, at the start; after the restart the watch resumed from the
    // revision it had reached.
    let log = agent.log_text();
    assert_eq!(
        log.matches("etcd prefix listed").count(),
        1,
        "the provider listed again instead of resuming:\n{log}"
    );
    assert!(
        log.matches("etcd watch started").count() >= 2,
        "the watch was not resumed:\n{log}"
    );
    Ok(())
}

/// `etcdctl put KEY` with the value on stdin (a command line holds at
/// most 128 KiB per argument).
fn put_stdin(b: &Bed, key: &str, value: &[u8]) -> Result<()> {
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &b.topo.lb.name, "etcdctl"])
        .arg(format!("--endpoints={ETCD_URL}"))
        .args(["--dial-timeout=1s", "--command-timeout=5s", "put", key])
        .env("ETCDCTL_API", "3")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("etcdctl stdin")?
        .write_all(value)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "etcdctl put {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A value over the 4 KiB a backend value may take (here 1 MiB of valid
/// JSON padding around a real backend) is refused with the key and the
/// limit named, and keys and values over 8 MiB under the prefix are
/// refused whole: either way the last good set keeps serving, and the
/// provider recovers once the keys are gone.
#[test]
fn oversized_etcd_values_and_prefixes_are_refused_and_the_last_set_serves() -> Result<()> {
    let b = bed("etcdbig", 3)?;
    let _server = etcd(&b)?;
    put(&b, 0, 1)?;
    put(&b, 1, 1)?;
    let config = sluice_tests::interfaces_yaml(3)
        + &format!(
            "services:
  - name: web
    vip: 10.100.0.1
    port: 80
    protocol: tcp
    discovery:
      etcd:
        endpoints: [\"{ETCD_URL}\"]
        prefix: /sluice/web/
"
        );
    std::fs::write(b.dir.path("sluice.yaml"), config)?;
    let agent = Agent::start(&b.topo.lb, &b.dir.path("sluice.yaml"), b.dir.path("a.log"))?;
    wait_active(&b, &agent, "web", &[0, 1], Duration::from_secs(10))?;

    // A real backend, padded to 1 MiB.
    let mut value = format!(r#"{{"address": "{}", "weight": 1"#, backend(2)).into_bytes();
    value.resize(1 << 20, b' ');
    value.push(b'}');
    put_stdin(&b, "/sluice/web/big", &value)?;
    wait_for("the big value refused", Duration::from_secs(10), || {
        Ok(!healthy(&b, &agent, "web")?)
    })?;
    let error = service_json(&b.topo.lb, &agent, "web")?["discovery"]["error"].clone();
    assert_eq!(
        error,
        "key /sluice/web/big: value of 1048577 bytes, over the 4096-byte limit of a backend value"
    );
    assert_eq!(active(&b, &agent, "web")?, set(&[0, 1]));
    assert_eq!(reached(&b.topo, 30)?, names(&[0, 1]));
    let log = agent.log_text();
    assert!(
        log.contains("over the 4096-byte limit of a backend value"),
        "{log}"
    );
    etcdctl(&b, &["del", "/sluice/web/big"])?;
    wait_for("healthy again", Duration::from_secs(10), || {
        healthy(&b, &agent, "web")
    })?;

    // More than 8 MiB under the prefix: refused as a whole, listed again
    // (and refused) after a backoff.
    let filler = vec![b'x'; 1_400_000];
    for i in 0..7 {
        put_stdin(&b, &format!("/sluice/web/fill{i}"), &filler)?;
    }
    wait_for("the prefix refused", Duration::from_secs(15), || {
        let s = service_json(&b.topo.lb, &agent, "web")?;
        Ok(s["discovery"]["error"].as_str().is_some_and(|e| {
            e.contains("the prefix's keys and values") && e.contains("over the 8388608-byte limit")
        }))
    })
    .with_context(|| agent.log_text())?;
    assert_eq!(active(&b, &agent, "web")?, set(&[0, 1]));
    assert_eq!(reached(&b.topo, 30)?, names(&[0, 1]));
    etcdctl(&b, &["del", "--prefix", "/sluice/web/fill"])?;
    put(&b, 2, 1)?;
    wait_active(&b, &agent, "web", &[0, 1, 2], Duration::from_secs(20))?;
    wait_for("healthy after the cleanup", Duration::from_secs(10), || {
        healthy(&b, &agent, "web")
    })?;
    Ok(())
}

// ---------------------------------------------------------------- drain

/// A draining backend's connection lives until the drain timeout; then its
/// flows are closed and the backend is gone.
#[test]
fn drain_timeout_closes_the_remaining_connections() -> Result<()> {
    let b = bed("drain", 2)?;
    let config = |backends: &[usize]| {
        let mut text = sluice_tests::interfaces_yaml(2)
            + "services:
  - name: web
    vip: 10.100.0.1
    port: 80
    protocol: tcp
    drain_timeout_seconds: 3
    backends:
";
        for &i in backends {
            text += &format!("      - address: {}\n", backend(i));
        }
        text
    };
    std::fs::write(b.dir.path("sluice.yaml"), config(&[0, 1]))?;
    let agent = Agent::start(&b.topo.lb, &b.dir.path("sluice.yaml"), b.dir.path("a.log"))?;
    let vip: SocketAddr = VIP.parse()?;
    let (mut stream, held) = b.topo.client.enter(|| -> Result<(TcpStream, String)> {
        let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.write_all(b"echo\n")?;
        let mut first = String::new();
        BufReader::new(s.try_clone()?).read_line(&mut first)?;
        let name = first.split_whitespace().next().unwrap_or("").to_string();
        Ok((s, name))
    })??;
    let held: usize = held.trim_start_matches('b').parse()?;
    let other = 1 - held;
    std::fs::write(b.dir.path("sluice.yaml"), config(&[other]))?;

    wait_for("draining", Duration::from_secs(5), || {
        Ok(
            backend_states(&b.topo.lb, &agent, "web")?.get(&backend(held))
                == Some(&"draining".to_string()),
        )
    })?;
    assert_eq!(reached(&b.topo, 30)?, names(&[other]));
    let mut reader = BufReader::new(stream.try_clone()?);
    stream.write_all(b"during the drain\n")?;
    let mut echo = String::new();
    reader.read_line(&mut echo)?;
    assert_eq!(echo, "during the drain\n");

    // After the timeout: gone from the API, the connection closed.
    wait_for("drain timed out", Duration::from_secs(10), || {
        Ok(!backend_states(&b.topo.lb, &agent, "web")?.contains_key(&backend(held)))
    })?;
    let broken = (|| -> std::io::Result<usize> {
        stream.write_all(b"after the drain\n")?;
        let mut line = String::new();
        reader.read_line(&mut line)
    })();
    assert!(
        !matches!(broken, Ok(n) if n > 0),
        "the connection outlived its drain timeout: {broken:?}"
    );
    let log = agent.log_text();
    assert!(
        log.lines().any(|l| l.contains("backend removed")
            && l.contains(&backend(held))
            && !l.contains("flows_closed=0")),
        "the removal closed no flows:\n{log}"
    );
    Ok(())
}
