//! The operator commands against a live agent with real traffic:
//! `explain` predicts where real connections land (ejected and drained
//! backends included); `drain` stops new connections while established
//! ones finish, and survives a restart; the read commands fall back to the
//! pinned maps when the agent is down; the control socket is root's only.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use sluice_tests::{
    Agent, Bpffs, TempDir, control_socket_of, http_get, metric, sluice_bin, tcp_ask_from,
    tcp_echo_from, wait_for,
};
use testbed::{Family, Topology};

const VIP: &str = "10.100.0.1:80";

/// `sluice ARGS --config CFG --socket SOCK`, from the host (the socket is a
/// path: it reaches the agent in any namespace).
fn sluice(cfg: &Path, args: &[&str]) -> Result<Output> {
    let socket = control_socket_of(cfg);
    Command::new(sluice_bin())
        .args(args)
        .arg("--config")
        .arg(cfg)
        .arg("--socket")
        .arg(socket)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running sluice {args:?}"))
}

/// As `sluice`, with `-o json`, expecting success: the parsed answer.
fn sluice_json(cfg: &Path, args: &[&str]) -> Result<Value> {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = sluice(cfg, &all)?;
    if !out.status.success() {
        bail!(
            "sluice {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "sluice {args:?} printed no JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn config(backends: &[(usize, u32)], pinning: Option<&Path>) -> String {
    let mut text = String::from(
        "interfaces:\n  - name: front\n  - name: back0\n  - name: back1\n  - name: back2\n  - name: back3\n",
    );
    if let Some(dir) = pinning {
        text += &format!("pinning:\n  directory: {}\n", dir.display());
    }
    text += "services:\n  - name: web\n    vip: 10.100.0.1\n    port: 80\n    protocol: tcp\n    failure:\n      min_distinct_clients: 1\n      ejection_seconds: 300\n    backends:\n";
    for (i, w) in backends {
        text += &format!("      - address: 10.1.{i}.2:8080\n        weight: {w}\n");
    }
    text
}

/// The backend's address from the name its server answers with (`b2`).
fn address_of(name: &str) -> String {
    format!("10.1.{}.2:8080", name.trim_start_matches('b'))
}

/// A connection from the client's address and `port` to the VIP: the name
/// of the backend that answered. With `echo`, the connection stays open
/// (the server echoes lines) and is returned.
fn connect_from(port: u16, echo: bool) -> Result<(String, Option<TcpStream>)> {
    let vip: SocketAddr = VIP.parse()?;
    let local = SocketAddr::new(Family::V4.client(), port);
    let timeout = Duration::from_secs(3);
    if echo {
        let (name, s) = tcp_echo_from(local, vip, timeout)?;
        return Ok((name, Some(s)));
    }
    let reply = tcp_ask_from(local, vip, timeout)?;
    Ok((
        reply.split_whitespace().next().unwrap_or("").to_string(),
        None,
    ))
}

fn echo_works(s: &mut TcpStream) -> Result<bool> {
    s.write_all(b"ping\n")?;
    let mut line = String::new();
    let mut reader = BufReader::new(s.try_clone()?);
    // The server's name line came first on this connection; skip to ours.
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(false);
        }
        if line.trim() == "ping" {
            return Ok(true);
        }
    }
}

fn backend<'a>(service: &'a Value, address: &str) -> &'a Value {
    service["backends"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["address"] == address))
        .unwrap_or(&Value::Null)
}

struct Bed {
    topo: Topology,
    servers: Vec<Option<testbed::NameServer>>,
    dir: TempDir,
    cfg: PathBuf,
}

fn bed(tag: &str, backends: &[(usize, u32)], pinning: Option<&Path>) -> Result<Bed> {
    let topo = Topology::new(tag, 4)?;
    let servers = topo
        .serve(Family::V4, 8080)?
        .into_iter()
        .map(Some)
        .collect();
    topo.warm_neighbours()?;
    let dir = TempDir::new(tag)?;
    let cfg = dir.path("sluice.yaml");
    std::fs::write(&cfg, config(backends, pinning))?;
    Ok(Bed {
        topo,
        servers,
        dir,
        cfg,
    })
}

#[test]
fn explain_agrees_with_where_300_connections_land() -> Result<()> {
    let mut bed = bed("opx", &[(0, 1), (1, 2), (2, 1), (3, 1)], None)?;
    let agent = Agent::start_with(
        &bed.topo.lb,
        &bed.cfg,
        bed.dir.path("agent.log"),
        &["--log-format", "json"],
    )?;
    let cfg = bed.cfg.clone();

    // Backend 2 stops answering: its refusals are retried elsewhere and
    // eject it. Backend 3 is drained by an operator.
    bed.servers[2] = None;
    bed.topo.client.enter(|| -> Result<()> {
        for port in 20000..20060 {
            connect_from(port, false)?;
        }
        Ok(())
    })??;
    wait_for("backend 2 ejected", Duration::from_secs(10), || {
        let web = &sluice_json(&cfg, &["services"])?["services"][0];
        Ok(backend(web, "10.1.2.2:8080")["state"] == "ejected")
    })?;
    let drained = sluice_json(&cfg, &["drain", "web", "10.1.3.2:8080"])?;
    assert_eq!(drained["drain"], true, "{drained}");

    let (mut skipped_ejected, mut agreed) = (0, 0);
    for port in 30000..30300u16 {
        let client = format!("{}:{port}", Family::V4.client());
        let predicted = sluice_json(&cfg, &["explain", &client, &format!("{VIP}/tcp")])?;
        assert_eq!(predicted["decision"], "maglev", "{predicted}");
        let (name, _) = bed
            .topo
            .client
            .enter(move || connect_from(port, false))?
            .with_context(|| format!("connection from port {port}"))?;
        assert_eq!(
            predicted["backend"],
            address_of(&name).as_str(),
            "explain predicted {} for port {port}, the connection reached {name}: {predicted}",
            predicted["backend"]
        );
        agreed += 1;
        let probes = predicted["probes"].as_array().unwrap();
        if probes.iter().any(|p| p["verdict"] == "ejected") {
            skipped_ejected += 1;
            assert!(
                predicted["why"].to_string().contains("ejected: skipped"),
                "{predicted}"
            );
        }
        assert!(
            predicted["not_in_table"]
                .to_string()
                .contains("10.1.3.2:8080"),
            "the drained backend is named: {predicted}"
        );
        // A refusal would be retried on another healthy backend.
        let retry = predicted["retry_backend"].as_str().unwrap_or_default();
        assert!(
            retry.starts_with("10.1.")
                && retry != predicted["backend"]
                && retry != "10.1.2.2:8080"
                && retry != "10.1.3.2:8080",
            "retry target: {predicted}"
        );
        // Afterwards the flow's own entry decides, with the same backend.
        let after = sluice_json(&cfg, &["explain", &client, VIP])?;
        assert_eq!(after["decision"], "conntrack", "{after}");
        assert_eq!(after["backend"], predicted["backend"], "{after}");
    }
    assert_eq!(agreed, 300);
    // Backend 2 holds 1/5 of the slots: some flows' first slot was its.
    assert!(
        skipped_ejected >= 20,
        "only {skipped_ejected} of 300 flows skipped the ejected backend"
    );

    // The table view of the same answer names the steps.
    let out = sluice(
        &cfg,
        &["explain", &format!("{}:40000", Family::V4.client()), VIP],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && text.contains("service web → backend 10.1.")
            && text.contains("Maglev"),
        "{text}"
    );

    // status: attachments, readiness, drops by reason.
    let status = sluice_json(&cfg, &["status"])?;
    assert_eq!(status["source"], "agent");
    assert_eq!(status["ready"], true);
    assert_eq!(status["map_layout"], agent_common::MAP_LAYOUT);
    assert!(
        status["attachments"].to_string().contains("\"front\""),
        "{status}"
    );
    assert!(status["drops"]["no_backend"].is_u64(), "{status}");
    assert_eq!(status["ejected_backends"], 1);
    assert_eq!(status["overrides"], 1);
    // conntrack: flows named, filtered and limited.
    let flows = sluice_json(
        &cfg,
        &[
            "conntrack",
            "--service",
            "web",
            "--backend",
            "10.1.1.2:8080",
            "--limit",
            "5",
        ],
    )?;
    assert_eq!(flows["flows"].as_array().unwrap().len(), 5, "{flows}");
    assert!(flows["matched"].as_u64().unwrap() > 5, "{flows}");
    assert!(
        flows["flows"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["backend"] == "10.1.1.2:8080")
    );
    // backends: per-backend counters and latency from the kernel.
    let out = sluice(&cfg, &["backends", "web"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ejected") && text.contains("drain"), "{text}");
    let web = &sluice_json(&cfg, &["services"])?["services"][0];
    assert!(
        backend(web, "10.1.1.2:8080")["latency_p99_ms"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(
        backend(web, "10.1.2.2:8080")["failures"]["refused"]
            .as_u64()
            .unwrap()
            >= 3
    );
    // events: the recent ones, and a followed stream filtered by kind.
    let out = sluice(&cfg, &["events", "--kind", "eject", "-o", "json"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().count() >= 1 && text.lines().all(|l| l.contains("\"eject\"")),
        "{text}"
    );
    let mut follow = Command::new(sluice_bin())
        .args(["events", "-f", "--kind", "open", "-o", "json", "--config"])
        .arg(&cfg)
        .arg("--socket")
        .arg(control_socket_of(&bed.cfg))
        .stdout(Stdio::piped())
        .spawn()?;
    // Lines as they come, read on a thread: the wait below is bounded.
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // New connections until one's open arrives on the stream (recent
    // events first, then live ones: none is lost in between).
    let mut saw_new = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut port = 41000;
    'wait: while std::time::Instant::now() < deadline {
        bed.topo.client.enter(move || connect_from(port, false))??;
        let tag = format!(":{port}\"");
        port += 1;
        while let Ok(line) = rx.recv_timeout(Duration::from_millis(300)) {
            assert!(line.contains("\"open\""), "{line}");
            if line.contains(&tag) {
                saw_new = true;
                break 'wait;
            }
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(
        saw_new,
        "the followed stream did not show the new connection"
    );

    // --log-format json: every log line is a JSON object.
    let log = agent.log_text();
    assert!(log.lines().count() > 3);
    for line in log.lines() {
        serde_json::from_str::<Value>(line).with_context(|| format!("log line {line:?}"))?;
    }
    Ok(())
}

#[test]
fn drain_stops_new_connections_while_established_ones_finish_and_survives_restart() -> Result<()> {
    let bed = bed("opd", &[(0, 1), (1, 1)], None)?;
    let mut agent = Agent::start(&bed.topo.lb, &bed.cfg, bed.dir.path("agent.log"))?;
    let cfg = bed.cfg.clone();

    // Established connections on backend 0, kept open.
    let mut held = bed.topo.client.enter(|| -> Result<Vec<TcpStream>> {
        let mut held = Vec::new();
        for port in 21000..21100 {
            if let (name, Some(s)) = connect_from(port, true)?
                && name == "b0"
            {
                held.push(s);
            }
            if held.len() == 5 {
                break;
            }
        }
        Ok(held)
    })??;
    assert_eq!(held.len(), 5);

    let out = sluice(&cfg, &["drain", "web", "10.1.0.2:8080"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let web = &sluice_json(&cfg, &["services"])?["services"][0];
    let b0 = backend(web, "10.1.0.2:8080");
    assert_eq!(b0["state"], "draining", "{b0}");
    assert_eq!(b0["weight"], 0, "{b0}");
    assert_eq!(b0["override"]["drain"], true, "{b0}");
    let (_, scrape) = http_get(&bed.topo.lb, agent.listen, "/metrics")?;
    let drain_series = [
        ("service", "web"),
        ("backend", "10.1.0.2:8080"),
        ("kind", "drain"),
    ];
    assert_eq!(
        metric(&scrape, "sluice_backend_override", &drain_series),
        Some(1.0),
        "the override is shown in the metrics"
    );

    let reached = |first: u16| -> Result<Vec<String>> {
        bed.topo.client.enter(move || -> Result<Vec<String>> {
            (first..first + 60)
                .map(|p| Ok(connect_from(p, false)?.0))
                .collect()
        })?
    };
    let names = reached(22000)?;
    assert!(
        names.iter().all(|n| n == "b1"),
        "new connections reached a drained backend: {names:?}"
    );
    for s in &mut held {
        assert!(
            echo_works(s)?,
            "an established connection to the drained backend broke"
        );
    }

    // The override survives a restart, before any config or discovery.
    agent.stop()?;
    let mut agent = Agent::start(&bed.topo.lb, &bed.cfg, bed.dir.path("agent2.log"))?;
    let names = reached(23000)?;
    assert!(
        names.iter().all(|n| n == "b1"),
        "after a restart: {names:?}"
    );
    let listed = sluice_json(&cfg, &["services"])?;
    assert_eq!(
        backend(&listed["services"][0], "10.1.0.2:8080")["override"]["drain"],
        true
    );

    // Undrain: backend 0 takes new connections again.
    let out = sluice(&cfg, &["undrain", "web", "10.1.0.2:8080"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names = reached(24000)?;
    assert!(
        names.iter().any(|n| n == "b0"),
        "undrained backend gets nothing: {names:?}"
    );

    // A weight override, shown and cleared.
    let w = sluice_json(&cfg, &["weight", "web", "10.1.1.2:8080", "7"])?;
    assert_eq!(w["weight"], 7, "{w}");
    let web = &sluice_json(&cfg, &["services"])?["services"][0];
    assert_eq!(backend(web, "10.1.1.2:8080")["weight"], 7);
    sluice_json(&cfg, &["weight", "web", "10.1.1.2:8080", "--clear"])?;
    let web = &sluice_json(&cfg, &["services"])?["services"][0];
    assert_eq!(backend(web, "10.1.1.2:8080")["weight"], 1);
    assert!(backend(web, "10.1.1.2:8080")["override"].is_null());

    // Wrong names are refused, naming what exists; nothing changes.
    let out = sluice(&cfg, &["drain", "web", "10.9.9.9:80"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("no backend 10.9.9.9:80")
            && err.contains("10.1.0.2:8080"),
        "{err}"
    );
    let out = sluice(&cfg, &["drain", "nosuch", "10.1.0.2:8080"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("nosuch") && err.contains("web"),
        "{err}"
    );
    let out = sluice(&cfg, &["weight", "web", "10.1.0.2:8080", "5000"])?;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("5000"));
    assert_eq!(sluice_json(&cfg, &["status"])?["overrides"], 0);
    agent.stop()?;
    Ok(())
}

#[test]
fn read_commands_use_the_pinned_maps_when_the_agent_is_down() -> Result<()> {
    let dir = TempDir::new("opp-pins")?;
    let bpffs = Bpffs::mount(&dir)?;
    let pin_dir = bpffs.0.join("node");
    let bed = bed("opp", &[(0, 1), (1, 1)], Some(&pin_dir))?;
    let mut agent = Agent::start(&bed.topo.lb, &bed.cfg, bed.dir.path("agent.log"))?;
    let cfg = bed.cfg.clone();
    let live = bed.topo.client.enter(|| -> Result<Vec<TcpStream>> {
        (25000..25010)
            .map(|p| Ok(connect_from(p, true)?.1.unwrap()))
            .collect()
    })??;
    let client = format!("{}:25003", Family::V4.client());
    let explained_live = sluice_json(&cfg, &["explain", &client, VIP])?;
    agent.stop()?; // pinned: the datapath stays and keeps forwarding

    let status = sluice(&cfg, &["status", "-o", "json"])?;
    let err = String::from_utf8_lossy(&status.stderr);
    assert!(status.status.success(), "{err}");
    assert!(err.contains("pinned under"), "the fallback is said: {err}");
    let status: Value = serde_json::from_slice(&status.stdout)?;
    assert_eq!(status["source"], "pinned maps");
    assert!(
        status["attachments"].to_string().contains("\"front\""),
        "{status}"
    );
    assert!(
        status["conntrack"]["entries"].as_u64().unwrap() >= 20,
        "{status}"
    );
    let web = &sluice_json(&cfg, &["services"])?["services"][0];
    assert_eq!(web["name"], "web", "named from the config: {web}");
    assert!(web["connections_total"].as_u64().unwrap() >= 10, "{web}");
    let flows = sluice_json(&cfg, &["conntrack", "--service", "web"])?;
    assert!(flows["matched"].as_u64().unwrap() >= 10, "{flows}");
    let explained = sluice_json(&cfg, &["explain", &client, VIP])?;
    assert_eq!(explained["decision"], "conntrack");
    assert_eq!(explained["backend"], explained_live["backend"]);
    // Changes need the agent.
    let out = sluice(&cfg, &["drain", "web", "10.1.0.2:8080"])?;
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("running agent")
    );
    drop(live);

    let out = Command::new(sluice_bin())
        .args(["cleanup", "--config"])
        .arg(&cfg)
        .output()?;
    assert!(out.status.success(), "cleanup: {out:?}");
    Ok(())
}

#[test]
fn the_control_socket_is_roots_only_and_the_binary_names_its_build() -> Result<()> {
    let bed = bed("ops", &[(0, 1)], None)?;
    let _agent = Agent::start(&bed.topo.lb, &bed.cfg, bed.dir.path("agent.log"))?;
    let socket = control_socket_of(&bed.cfg);
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    let meta = std::fs::metadata(&socket)?;
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    // Another user can't talk to it, even with the file opened up to all.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))?;
    for dir in [bed.dir.0.as_path(), socket.parent().unwrap()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(sluice_bin())
        .args(["drain", "web", "10.1.0.2:8080", "--socket"])
        .arg(&socket)
        .arg("--config")
        .arg(&bed.cfg)
        .output()?;
    assert!(!out.status.success(), "a non-root user drained a backend");
    assert!(
        sluice_json(&bed.cfg, &["services"])?["services"][0]["backends"][0]["state"] == "active"
    );
    let log = std::fs::read_to_string(bed.dir.path("agent.log"))?;
    assert!(log.contains("from a user other than root"), "{log}");

    // Completions name the commands.
    let out = Command::new(sluice_bin())
        .args(["completions", "bash"])
        .output()?;
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && script.contains("explain") && script.contains("--log-format"));
    // --version names the commit and the map layout.
    let out = Command::new(sluice_bin()).arg("--version").output()?;
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(
        version.contains(&format!("map layout {}", agent_common::MAP_LAYOUT)),
        "{version}"
    );
    Ok(())
}
