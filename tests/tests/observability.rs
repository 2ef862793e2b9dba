//! Metrics against real tools: `promtool check metrics` on a live scrape,
//! `promtool check rules` on the shipped alerts, and a real Prometheus that
//! scrapes a running agent with live traffic, on which every PromQL
//! expression of the shipped Grafana dashboard and alert rules returns data.

use std::{
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use sluice_tests::{Agent, TempDir, http_get};
use testbed::{Family, NameServer, Netns, Topology, tcp_ask, udp_ask};

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// A Prometheus server in a namespace, ended (by its PID) on drop.
/// `promtool check metrics` accepts `scrape` (valid exposition format).
fn check_exposition(scrape: &str) -> Result<()> {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("promtool (Debian package prometheus)")?;
    promtool
        .stdin
        .take()
        .context("promtool's stdin")?
        .write_all(scrape.as_bytes())?;
    let out = promtool.wait_with_output()?;
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

struct Prometheus {
    child: Child,
    listen: SocketAddr,
}

impl Prometheus {
    fn start(ns: &Netns, dir: &TempDir, target: SocketAddr) -> Result<Self> {
        let config = dir.path("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: sluice\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )?;
        let listen: SocketAddr = "127.0.0.1:9090".parse()?;
        let log = std::fs::File::create(dir.path("prometheus.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "prometheus"])
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path("tsdb").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting prometheus (Debian package prometheus)")?;
        Ok(Self { child, listen })
    }

    /// An instant query: the number of series in the result.
    fn series(&self, ns: &Netns, expr: &str) -> Result<usize> {
        let path = format!("/api/v1/query?query={}", sluice::cli::percent_encode(expr));
        let (status, body) = http_get(ns, self.listen, &path)?;
        if status != 200 {
            bail!("query {expr:?}: HTTP {status}: {body}");
        }
        let json: serde_json::Value = serde_json::from_str(&body)?;
        Ok(json["data"]["result"].as_array().map_or(0, Vec::len))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // SAFETY: signalling the child this test started, by its PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every PromQL expression of the Grafana dashboard, with its variables
/// given the values Grafana would: all agents, a one-minute rate window.
fn dashboard_exprs() -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(repo_file("deploy/grafana/sluice-dashboard.json"))?;
    let dash: serde_json::Value = serde_json::from_str(&text)?;
    assert_eq!(dash["uid"], "sluice-overview", "a stable uid");
    let templating = dash["templating"]["list"]
        .as_array()
        .context("templating")?;
    assert!(
        templating.iter().any(|v| v["type"] == "datasource"),
        "a datasource variable"
    );
    let mut exprs = Vec::new();
    for panel in dash["panels"].as_array().context("panels")? {
        assert_eq!(panel["type"], "timeseries");
        assert_eq!(panel["datasource"]["uid"], "${datasource}");
        for target in panel["targets"].as_array().context("targets")? {
            let expr = target["expr"].as_str().context("expr")?;
            let expr = expr
                .replace("$__rate_interval", "1m")
                .replace("$job", ".*")
                .replace("$instance", ".*")
                .replace("$service", ".*");
            exprs.push((panel["title"].as_str().unwrap_or("").to_string(), expr));
        }
    }
    Ok(exprs)
}

/// Every alert rule's expression without its threshold: the data it
/// compares must exist (a firing alert is not expected on a healthy run).
fn alert_exprs() -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(repo_file("deploy/prometheus/sluice-alerts.yaml"))?;
    let mut exprs = Vec::new();
    let mut name = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim();
        if let Some(n) = t.strip_prefix("- alert: ") {
            name = n.to_string();
        } else if let Some(e) = t.strip_prefix("expr: ") {
            let mut expr = e.to_string();
            if expr == "|" {
                expr.clear();
                while let Some(next) = lines.peek() {
                    if next.trim().is_empty()
                        || next.trim_start().starts_with("for:")
                        || next.trim_start().starts_with("labels:")
                    {
                        break;
                    }
                    expr.push_str(next.trim());
                    expr.push(' ');
                    lines.next();
                }
            }
            let lhs = ["==", ">", "<"]
                .iter()
                .filter_map(|op| expr.rfind(&format!(" {op} ")))
                .max()
                .map_or(expr.as_str(), |i| &expr[..i]);
            // absent(X) fires when X has no data: X is what must exist.
            let lhs = lhs
                .trim()
                .strip_prefix("absent(")
                .and_then(|x| x.strip_suffix(')'))
                .unwrap_or(lhs);
            exprs.push((name.clone(), lhs.trim().to_string()));
        }
    }
    assert_eq!(exprs.len(), 11, "{exprs:?}");
    Ok(exprs)
}

#[test]
fn alert_rules_pass_promtool() -> Result<()> {
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(repo_file("deploy/prometheus/sluice-alerts.yaml"))
        .output()
        .context("promtool (Debian package prometheus)")?;
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn dashboard_and_alert_queries_return_data_from_a_live_agent() -> Result<()> {
    let topo = Topology::new("ob", 3)?;
    let mut servers: Vec<Option<NameServer>> = topo
        .serve(Family::V4, 8080)?
        .into_iter()
        .map(Some)
        .collect();
    topo.warm_neighbours()?;
    let dir = TempDir::new("ob")?;
    let mut text = String::from(
        "interfaces:\n  - name: front\n  - name: back0\n  - name: back1\n  - name: back2\nservices:\n",
    );
    for proto in ["tcp", "udp"] {
        text += &format!(
            "  - name: web-{proto}\n    vip: 10.100.0.1\n    port: 80\n    protocol: {proto}\n    failure:\n      ejection_seconds: 300\n      max_ejected_percent: 0\n    backends:\n"
        );
        for i in 0..3 {
            text += &format!("      - address: 10.1.{i}.2:8080\n");
        }
    }
    // A discovery service whose DNS server is not there: its provider's
    // metrics exist (unhealthy) for the discovery panel and alert.
    text += "  - name: web-dns\n    vip: 10.100.0.2\n    port: 80\n    protocol: tcp\n    discovery:\n      dns:\n        name: _web._tcp.sluice.test\n        server: 127.0.0.1:9\n        min_interval_seconds: 1\n";
    std::fs::write(dir.path("sluice.yaml"), text)?;
    let agent = Agent::start(&topo.lb, &dir.path("sluice.yaml"), dir.path("agent.log"))?;

    // A live scrape is valid exposition format.
    let (_, scrape) = http_get(&topo.lb, agent.listen, "/metrics")?;
    check_exposition(&scrape)?;

    let prometheus = Prometheus::start(&topo.lb, &dir, agent.listen)?;

    // Live traffic; a backend that dies gives failures and (with a 0% cap)
    // fail-open counts; long-lived streams give active connections.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        topo.client.spawn(move || {
            let vip = SocketAddr::new(Family::V4.vip(), 80);
            let mut held = Vec::new();
            let mut n = 0u16;
            while !stop.load(Ordering::SeqCst) {
                n = n.wrapping_add(1);
                let _ = tcp_ask(vip, Duration::from_secs(3));
                let _ = udp_ask(vip, 30_000 + n % 1000, Duration::from_millis(300));
                if held.len() < 3
                    && let Ok(mut s) = std::net::TcpStream::connect(vip)
                {
                    let _ = s.write_all(b"echo\n");
                    held.push(s);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })?
    };
    std::thread::sleep(Duration::from_secs(3));
    servers[1] = None;

    let mut exprs = dashboard_exprs()?;
    exprs.extend(alert_exprs()?);
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut missing: Vec<(String, String)>;
    loop {
        missing = Vec::new();
        for (what, expr) in &exprs {
            if prometheus.series(&topo.lb, expr).unwrap_or(0) == 0 {
                missing.push((what.clone(), expr.clone()));
            }
        }
        if missing.is_empty() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    stop.store(true, Ordering::SeqCst);
    let _ = traffic.join();
    assert!(
        missing.is_empty(),
        "queries without data after 40 s: {missing:#?}\nprometheus log: {}",
        std::fs::read_to_string(dir.path("prometheus.log")).unwrap_or_default()
    );
    Ok(())
}

/// Sample lines of a scrape whose labels include all of `labels` and none
/// of the label names in `without`.
fn series_count(scrape: &str, labels: &[(&str, &str)], without: &[&str]) -> usize {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter(|l| {
            let labels_text = l.split_once('{').map_or("", |(_, rest)| rest);
            labels
                .iter()
                .all(|(k, v)| labels_text.contains(&format!("{k}=\"{v}\"")))
                && without
                    .iter()
                    .all(|k| !labels_text.contains(&format!("{k}=\"")))
        })
        .count()
}

/// The series budget docs/metrics.md states: `| ROW | ON | OFF |`.
fn documented_budget(row: &str) -> Result<(usize, usize)> {
    let doc = std::fs::read_to_string(repo_file("docs/metrics.md"))?;
    let line = doc
        .lines()
        .find(|l| l.starts_with(&format!("| {row} |")))
        .with_context(|| format!("docs/metrics.md has no budget row {row:?}"))?;
    let cells: Vec<&str> = line.split('|').map(str::trim).collect();
    Ok((cells[2].parse()?, cells[3].parse()?))
}

/// What each setting of the latency histogram switch costs per backend,
/// counted on live scrapes (and checked against docs/metrics.md), and the
/// switch applied live: globally, and per service both ways.
#[test]
fn the_latency_histogram_switch_applies_live_and_the_documented_budget_holds() -> Result<()> {
    let topo = Topology::new("obh", 2)?;
    let dir = TempDir::new("obh")?;
    let path = dir.path("sluice.yaml");
    // metrics: the global setting; tcp_override: services[0]'s.
    let config = |global: Option<bool>, tcp_override: Option<bool>| {
        let mut text = String::from(
            "interfaces:\n  - name: front\n  - name: back0\n  - name: back1\nservices:\n",
        );
        for proto in ["tcp", "udp"] {
            text += &format!(
                "  - name: web-{proto}\n    vip: 10.100.0.1\n    port: 80\n    protocol: {proto}\n    backends:\n      - address: 10.1.0.2:8080\n      - address: 10.1.1.2:8080\n"
            );
            if let (Some(on), "tcp") = (tcp_override, proto) {
                text += &format!("    metrics:\n      backend_latency_histogram: {on}\n");
            }
        }
        // Another TCP service, never overridden.
        text += "  - name: api-tcp\n    vip: 10.100.0.3\n    port: 80\n    protocol: tcp\n    backends:\n      - address: 10.1.0.2:8080\n";
        // A discovery service: its provider's series count too.
        text += "  - name: web-dns\n    vip: 10.100.0.2\n    port: 80\n    protocol: tcp\n    discovery:\n      dns:\n        name: _web._tcp.sluice.test\n        server: 127.0.0.1:9\n";
        if let Some(on) = global {
            text += &format!("metrics:\n  backend_latency_histogram: {on}\n");
        }
        text
    };
    std::fs::write(&path, config(None, None))?;
    let agent = Agent::start(&topo.lb, &path, dir.path("agent.log"))?;
    let scrape = || -> Result<String> { Ok(http_get(&topo.lb, agent.listen, "/metrics")?.1) };
    let backend = |scrape: &str, service: &str| {
        series_count(
            scrape,
            &[("service", service), ("backend", "10.1.0.2:8080")],
            &[],
        )
    };
    let histogram = |scrape: &str, service: &str| {
        series_count(
            scrape,
            &[
                ("service", service),
                ("backend", "10.1.0.2:8080"),
                ("le", "+Inf"),
            ],
            &[],
        ) > 0
    };
    // Waits for a reload to show: the histogram of web-tcp on or off.
    let reload_to = |text: String, tcp_histogram: bool| -> Result<String> {
        std::fs::write(&path, text)?;
        agent.reload()?;
        let mut last = String::new();
        sluice_tests::wait_for(
            "the reloaded metrics settings",
            Duration::from_secs(10),
            || {
                last = scrape()?;
                Ok(histogram(&last, "web-tcp") == tcp_histogram)
            },
        )?;
        Ok(last)
    };

    // The default: on.
    let on = scrape()?;
    assert!(histogram(&on, "web-tcp") && !histogram(&on, "web-udp"));
    // The agent's own series, and the datapath's that are per node.
    let fixed = |s: &str| series_count(s, &[], &["service", "interface"]);
    // Per TCP backend, per UDP backend, per service, per discovery
    // service, per agent.
    let measure = |s: &str| {
        [
            backend(s, "web-tcp"),
            backend(s, "web-udp"),
            series_count(s, &[("service", "web-tcp")], &["backend"]),
            series_count(s, &[("service", "web-dns")], &["backend"]),
            fixed(s),
        ]
    };
    let measured_on = measure(&on);

    // Off globally, live: every backend's histogram series go.
    let off = reload_to(config(Some(false), None), false)?;
    assert!(
        !off.contains("sluice_backend_connect_latency_seconds"),
        "no series and no family left: {off}"
    );
    let measured_off = measure(&off);
    eprintln!(
        "series (on, off): TCP backend {:?}, UDP backend {:?}, service {:?}, \
         service with discovery {:?}, per agent {:?}",
        (measured_on[0], measured_off[0]),
        (measured_on[1], measured_off[1]),
        (measured_on[2], measured_off[2]),
        (measured_on[3], measured_off[3]),
        (measured_on[4], measured_off[4]),
    );
    for (i, row) in [
        "TCP backend",
        "UDP backend",
        "service",
        "service with discovery",
        "per agent",
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(
            documented_budget(row)?,
            (measured_on[i], measured_off[i]),
            "docs/metrics.md's budget for {row} (on, off) against a live scrape"
        );
    }

    // Off globally, on for web-tcp: its backends only.
    let one = reload_to(config(Some(false), Some(true)), true)?;
    assert_eq!(backend(&one, "web-tcp"), measured_on[0]);
    assert!(!histogram(&one, "api-tcp") && !histogram(&one, "web-udp"));
    // A scrape with some histograms on and some off is valid exposition.
    check_exposition(&one)?;

    // On globally, off for web-tcp: every backend but its.
    let other = reload_to(config(Some(true), Some(false)), false)?;
    assert_eq!(backend(&other, "web-tcp"), measured_off[0]);
    assert!(histogram(&other, "api-tcp"));
    assert_eq!(backend(&other, "api-tcp"), measured_on[0]);
    Ok(())
}

/// `sluice_build_info` and `sluice --version` name the same build: the
/// version, a commit of this repository (or "unknown" outside a checkout)
/// and the map layout.
#[test]
fn build_info_and_version_name_the_commit_and_the_map_layout() -> Result<()> {
    let out = Command::new(sluice_tests::sluice_bin())
        .arg("--version")
        .output()?;
    assert!(out.status.success());
    let version_line = String::from_utf8(out.stdout)?;
    let commit = version_line
        .split_once("(commit ")
        .and_then(|(_, rest)| rest.split_once(','))
        .map(|(commit, _)| commit.to_string())
        .with_context(|| format!("no commit in {version_line:?}"))?;
    let layout = agent_common::MAP_LAYOUT;
    assert_eq!(
        version_line.trim(),
        format!(
            "sluice {} (commit {commit}, map layout {layout})",
            env!("CARGO_PKG_VERSION")
        )
    );
    // A commit git knows here, when this is a git checkout.
    let in_git = Command::new("git")
        .args(["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "--git-dir"])
        .output()
        .is_ok_and(|o| o.status.success());
    if in_git && commit != "unknown" {
        let known = Command::new("git")
            .args(["-C", env!("CARGO_MANIFEST_DIR"), "cat-file", "-e"])
            .arg(format!("{commit}^{{commit}}"))
            .status()?;
        assert!(known.success(), "commit {commit} is not in this repository");
    } else {
        assert_eq!(commit, "unknown");
    }

    let topo = Topology::new("obb", 1)?;
    let dir = TempDir::new("obb")?;
    std::fs::write(
        dir.path("sluice.yaml"),
        "interfaces:\n  - name: front\n  - name: back0\n",
    )?;
    let agent = Agent::start(&topo.lb, &dir.path("sluice.yaml"), dir.path("agent.log"))?;
    let (_, scrape) = http_get(&topo.lb, agent.listen, "/metrics")?;
    let labels = [
        ("version", env!("CARGO_PKG_VERSION")),
        ("commit", commit.as_str()),
        ("map_layout", &layout.to_string()),
    ];
    assert_eq!(
        sluice_tests::metric(&scrape, "sluice_build_info", &labels),
        Some(1.0),
        "{labels:?} not in the scrape:\n{scrape}"
    );
    Ok(())
}
