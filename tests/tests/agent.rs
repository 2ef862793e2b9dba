//! The `sluice` binary's contract: exit codes, signals, HTTP endpoints, and
//! live config changes (in place, rename, symlink swap; invalid ones refused).

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::programs::{ProgramError, SchedClassifier, TcAttachType};
use sluice_tests::{Agent, Bed, http_get, sluice_bin};
use testbed::{Netns, Topology, tcp_ask};

fn config(backends: &[usize]) -> String {
    let mut text = String::from(
        "interfaces:\n  - name: front\n    attach: tc\n  - name: back0\n  - name: back1\nservices:\n  - name: web\n    vip: 10.100.0.1\n    port: 80\n    protocol: tcp\n    backends:\n",
    );
    for i in backends {
        text += &format!("      - address: 10.1.{i}.2:8080\n");
    }
    text
}

/// The exit code of `sluice run` when it can't start for a reason other
/// than its config (here: an attach mode refused on the device).
const EXIT_FAILURE: i32 = 1;

/// Interfaces of `ns` that have an XDP program or a tcx program attached,
/// one line each ("front: tcx 1", "front: xdp").
fn attached(ns: &Netns) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "ip", "-o", "-d", "link", "show"])
        .output()?;
    if !out.status.success() {
        bail!(
            "ip link show in {}: {}",
            ns.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut found = Vec::new();
    for line in text.lines() {
        let Some(name) = line
            .split(": ")
            .nth(1)
            .map(|n| n.split('@').next().unwrap_or(n))
        else {
            continue;
        };
        if line.contains("prog/xdp") {
            found.push(format!("{name}: xdp"));
        }
        let tcx =
            ns.enter(
                || match SchedClassifier::query_tcx(name, TcAttachType::Ingress) {
                    Ok((_, progs)) => Ok(progs.len()),
                    // A program detached between the query and the look-up of its id.
                    Err(ProgramError::SyscallError(e))
                        if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
                    {
                        Ok(0)
                    }
                    Err(e) => Err(anyhow::Error::new(e).context(format!(
                        "querying the tcx programs of {name} in {}",
                        ns.name
                    ))),
                },
            )??;
        if tcx > 0 {
            found.push(format!("{name}: tcx {tcx}"));
        }
    }
    Ok(found.join("\n"))
}

/// `sluice run` on `config` in `ns`, for a config it must refuse: its
/// output once it has exited. One still running after 15 s has accepted
/// it: it is killed (by its own PID) and that is the error.
fn run_to_exit(ns: &Netns, config: &std::path::Path) -> Result<std::process::Output> {
    // Files, not pipes: a running agent that filled a pipe nobody reads
    // would block instead of saying what it does.
    let (out_path, err_path) = (
        config.with_extension("stdout"),
        config.with_extension("stderr"),
    );
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(sluice_bin())
        .args(["run", "--config"])
        .arg(config)
        .args(["--listen", "127.0.0.1:9464"])
        .env("SLUICE_CONTROL_SOCKET", config.with_extension("sock"))
        .env("SLUICE_STATE_DIR", config.with_extension("state"))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?)
        .spawn()
        .context("starting sluice")?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{} accepted: still running after 15 s:\n{}",
                config.display(),
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(std::process::Output {
        status,
        stdout: std::fs::read(&out_path)?,
        stderr: std::fs::read(&err_path)?,
    })
}

fn bed(tag: &str) -> Result<Bed> {
    Bed::new(tag, 2)
}

fn backends_reached(topo: &Topology, n: usize) -> Result<Vec<String>> {
    let reached = sluice_tests::backends_reached(topo, "10.100.0.1:80".parse()?, n)?;
    Ok(reached.into_iter().collect())
}

fn wait_for(what: &str, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if f()? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("timed out waiting for {what}")
}

#[test]
fn bad_config_exits_2_naming_the_field_and_attaches_nothing() -> Result<()> {
    let b = bed("ab")?;
    let cases = [
        (
            config(&[0]).replace("10.1.0.2:8080", "10.1.0.2"),
            "services[0].backends[0].address",
            "10.1.0.2",
        ),
        (
            config(&[0]).replace("port: 80", "port: 0"),
            "services[0].port",
            "0",
        ),
        (
            config(&[0]).replace("name: back1", "name: nosuchif0"),
            "interfaces[2].name",
            "nosuchif0",
        ),
        (
            config(&[0]).replace("port: 80", "port: eighty"),
            "services[0].port",
            "\"eighty\"",
        ),
        (
            config(&[0]).replace("protocol: tcp", "protocol: icmp"),
            "protocol",
            "icmp",
        ),
        ("interfaces: [".to_string(), "config file", ""),
    ];
    for (text, field, value) in cases {
        let path = b.dir.path("bad.yaml");
        std::fs::write(&path, &text)?;
        let out = run_to_exit(&b.topo.lb, &path)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "exit status for {field}: {stderr}"
        );
        let error_lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
        assert_eq!(error_lines.len(), 1, "one error line: {stderr}");
        assert!(
            error_lines[0].contains(field) && error_lines[0].contains(value),
            "{stderr}"
        );
        assert_eq!(
            attached(&b.topo.lb)?,
            "",
            "nothing attached after a bad config"
        );
    }
    // `sluice check` agrees.
    let path = b.dir.path("bad.yaml");
    std::fs::write(&path, config(&[0]).replace("port: 80", "port: 0"))?;
    let out = Command::new(sluice_bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    std::fs::write(&path, config(&[0]))?;
    let out = Command::new(sluice_bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn endpoints_and_sigterm() -> Result<()> {
    let b = bed("ae")?;
    // A VXLAN device has no native XDP: `attach: auto` must fall back.
    b.topo.lb.exec(&[
        "ip", "link", "add", "vx0", "type", "vxlan", "id", "42", "dstport", "4789", "local",
        "10.0.1.1", "dev", "front",
    ])?;
    b.topo.lb.exec(&["ip", "link", "set", "vx0", "up"])?;
    let path = b.dir.path("sluice.yaml");
    std::fs::write(
        &path,
        config(&[0, 1]).replace("  - name: back1\n", "  - name: back1\n  - name: vx0\n"),
    )?;
    let mut agent = Agent::start(&b.topo.lb, &path, b.dir.path("agent.log"))?;
    assert_ne!(attached(&b.topo.lb)?, "", "programs attached while running");

    let (status, body) = http_get(&b.topo.lb, agent.listen, "/healthz")?;
    assert_eq!(status, 200, "{body}");
    let (status, _) = http_get(&b.topo.lb, agent.listen, "/readyz")?;
    assert_eq!(status, 200);

    assert_eq!(backends_reached(&b.topo, 40)?, ["b0", "b1"]);
    let (status, body) = http_get(&b.topo.lb, agent.listen, "/api/v1/services")?;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body)?;
    let web = &json["services"][0];
    assert_eq!(web["name"], "web");
    assert_eq!(web["vip"], "10.100.0.1");
    assert_eq!(web["port"], 80);
    assert_eq!(web["protocol"], "tcp");
    let backends = web["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 2);
    let total: u64 = backends
        .iter()
        .map(|b| b["connections_total"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 40, "{body}");
    for b in backends {
        assert_eq!(b["state"], "active");
        assert_eq!(b["weight"], 1);
    }

    let (status, metrics) = http_get(&b.topo.lb, agent.listen, "/metrics")?;
    assert_eq!(status, 200);
    let mode = |iface: &str, mode: &str| {
        sluice_tests::metric(
            &metrics,
            "sluice_interface_attached",
            &[("interface", iface), ("mode", mode)],
        )
    };
    assert_eq!(mode("front", "tc"), Some(1.0), "{metrics}");
    assert_eq!(
        mode("back0", "tc"),
        Some(1.0),
        "auto on a veth: tc (XDP can't forward what local senders send)"
    );
    assert_eq!(
        mode("vx0", "tc"),
        Some(1.0),
        "auto on VXLAN: no native XDP, so tc (never generic XDP)"
    );
    assert!(
        agent
            .log_text()
            .contains("attach mode unavailable, trying the next")
    );
    for name in [
        "sluice_build_info",
        "sluice_service_packets_total",
        "sluice_service_bytes_total",
        "sluice_backend_connections_total",
        "sluice_backend_state",
        "sluice_conntrack_entries",
        "sluice_conntrack_capacity",
        "process_resident_memory_bytes",
    ] {
        assert!(metrics.contains(name), "metric {name} missing");
    }

    assert_eq!(agent.stop()?, Some(0), "exit status after SIGTERM");
    assert_eq!(
        attached(&b.topo.lb)?,
        "",
        "everything detached after SIGTERM"
    );
    Ok(())
}

#[test]
fn config_changes_apply_live_and_invalid_ones_are_refused() -> Result<()> {
    let b = bed("ar")?;
    // The agent reads a symlink, as with a Kubernetes ConfigMap volume.
    let v1 = b.dir.path("v1.yaml");
    let link = b.dir.path("sluice.yaml");
    std::fs::write(&v1, config(&[0]))?;
    std::os::unix::fs::symlink(&v1, &link)?;
    let agent = Agent::start(&b.topo.lb, &link, b.dir.path("agent.log"))?;
    assert_eq!(backends_reached(&b.topo, 20)?, ["b0"]);

    // 1. Symlink swap.
    let v2 = b.dir.path("v2.yaml");
    std::fs::write(&v2, config(&[1]))?;
    let tmp_link = b.dir.path("sluice.yaml.tmp");
    std::os::unix::fs::symlink(&v2, &tmp_link)?;
    std::fs::rename(&tmp_link, &link)?;
    wait_for("symlink swap applied", || {
        Ok(backends_reached(&b.topo, 10)? == ["b1"])
    })?;

    // 2. Written in place.
    std::fs::write(&v2, config(&[0, 1]))?;
    wait_for("in-place write applied", || {
        Ok(backends_reached(&b.topo, 30)? == ["b0", "b1"])
    })?;

    // 3. Replaced by rename.
    let v3 = b.dir.path("v3.yaml");
    std::fs::write(&v3, config(&[0]))?;
    std::fs::rename(&v3, &v2)?;
    wait_for("rename applied", || {
        Ok(backends_reached(&b.topo, 10)? == ["b0"])
    })?;

    // 4. An invalid edit is refused: the last good config keeps serving.
    std::fs::write(&v2, config(&[1]).replace("port: 80", "port: 99999"))?;
    wait_for("the rejection logged", || {
        Ok(agent.log_text().contains("config change rejected"))
    })?;
    let log = agent.log_text();
    assert!(
        log.contains("services[0].port") && log.contains("99999"),
        "{log}"
    );
    assert_eq!(
        backends_reached(&b.topo, 20)?,
        ["b0"],
        "last good config still serves"
    );
    let (status, _) = http_get(&b.topo.lb, agent.listen, "/readyz")?;
    assert_eq!(status, 200);
    Ok(())
}

/// A service whose every backend drains (weight 0) drops new connections;
/// the kernel says so through aya-log in the agent's log, and the drop
/// counter counts it.
#[test]
fn kernel_log_records_reach_the_agent_log() -> Result<()> {
    let b = bed("al")?;
    let path = b.dir.path("sluice.yaml");
    std::fs::write(
        &path,
        config(&[0, 1]).replace("8080\n", "8080\n        weight: 0\n"),
    )?;
    let agent = Agent::start(&b.topo.lb, &path, b.dir.path("agent.log"))?;
    let vip: SocketAddr = "10.100.0.1:80".parse()?;
    let refused = b
        .topo
        .client
        .enter(|| tcp_ask(vip, Duration::from_millis(500)).is_err())?;
    assert!(
        refused,
        "a service without active backends must not connect"
    );
    wait_for("the kernel's log record in the agent log", || {
        Ok(agent.log_text().contains("new flow dropped: no backend"))
    })?;
    let (_, metrics) = http_get(&b.topo.lb, agent.listen, "/metrics")?;
    let drops = sluice_tests::metric(&metrics, "sluice_drops_total", &[("reason", "no_backend")]);
    assert!(drops.unwrap_or(0.0) >= 1.0, "{metrics}");
    let (_, body) = http_get(&b.topo.lb, agent.listen, "/api/v1/services")?;
    assert!(body.contains("\"draining\""), "{body}");
    Ok(())
}

/// On a veth, the XDP modes can't forward what local senders send (partial
/// checksums, GSO super-packets): asked for explicitly, they are refused
/// with the device and the reason, and nothing stays attached. Auto picks
/// tc and says why.
#[test]
fn xdp_modes_that_cannot_forward_on_veth_are_refused_and_auto_says_why() -> Result<()> {
    let b = bed("ax")?;
    // Auto first: it also shows that `attached` sees what the agent
    // attaches here, so the "nothing attached" checks below mean something.
    let path = b.dir.path("auto.yaml");
    std::fs::write(&path, config(&[0]).replace("    attach: tc\n", ""))?;
    let mut agent = Agent::start(&b.topo.lb, &path, b.dir.path("agent.log"))?;
    let log = agent.log_text();
    assert!(
        log.contains("auto attach: modes to try") && log.contains("veth: XDP can't complete"),
        "{log}"
    );
    assert_eq!(
        attached(&b.topo.lb)?,
        "front: tcx 1\nback0: tcx 1\nback1: tcx 1",
        "auto on veths: tc on every interface"
    );
    assert_eq!(backends_reached(&b.topo, 10)?, ["b0"]);
    assert_eq!(agent.stop()?, Some(0), "exit status after SIGTERM");
    assert_eq!(
        attached(&b.topo.lb)?,
        "",
        "everything detached after SIGTERM"
    );

    for (mode, why) in [
        ("xdp-native", "partial checksums"),
        ("xdp-generic", "GSO super-packets"),
    ] {
        let path = b.dir.path("refused.yaml");
        std::fs::write(
            &path,
            config(&[0]).replace("attach: tc", &format!("attach: {mode}")),
        )?;
        let out = run_to_exit(&b.topo.lb, &path)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Refused at start-up, not as a bad config (that would be 2).
        assert_eq!(
            out.status.code(),
            Some(EXIT_FAILURE),
            "{mode} on veth: exit status: {stderr}"
        );
        assert!(
            stderr.contains("interface front refused") && stderr.contains(why),
            "{mode}: the refusal names the device and the reason: {stderr}"
        );
        assert_eq!(attached(&b.topo.lb)?, "", "nothing attached after {mode}");
    }
    Ok(())
}
