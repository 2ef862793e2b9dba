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
        let path = format!("/api/v1/query?query={}", urlencode(expr));
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

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
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
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())?;
    let out = promtool.wait_with_output()?;
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

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
