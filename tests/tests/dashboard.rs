//! The dashboard in a real headless Chromium (driven through ChromeDriver)
//! while traffic flows and a backend fails: the charts must show data, read
//! back through the DOM; a screenshot is saved under target/.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use sluice_tests::{Agent, TempDir, webdriver::Browser};
use testbed::{Family, NameServer, Topology, tcp_ask};

#[test]
fn dashboard_renders_live_data_in_chromium() -> Result<()> {
    let topo = Topology::new("db", 3)?;
    let mut servers: Vec<Option<NameServer>> = topo
        .serve(Family::V4, 8080)?
        .into_iter()
        .map(Some)
        .collect();
    topo.warm_neighbours()?;
    let dir = TempDir::new("db")?;
    let mut text = String::from(
        "interfaces:\n  - name: front\n  - name: back0\n  - name: back1\n  - name: back2\nservices:\n  - name: web\n    vip: 10.100.0.1\n    port: 80\n    protocol: tcp\n    failure:\n      ejection_seconds: 300\n      min_distinct_clients: 1\n    backends:\n",
    );
    for i in 0..3 {
        text += &format!("      - address: 10.1.{i}.2:8080\n");
    }
    std::fs::write(dir.path("sluice.yaml"), text)?;
    let agent = Agent::start(&topo.lb, &dir.path("sluice.yaml"), dir.path("agent.log"))?;

    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        topo.client.spawn(move || {
            let vip = SocketAddr::new(Family::V4.vip(), 80);
            while !stop.load(Ordering::SeqCst) {
                let _ = tcp_ask(vip, Duration::from_secs(3));
                std::thread::sleep(Duration::from_millis(10));
            }
        })?
    };
    let browser = Browser::start(&topo.lb)?;
    browser.open(&format!("http://{}/", agent.listen))?;
    std::thread::sleep(Duration::from_secs(3));
    servers[1] = None; // b1 dies: failures, retries, an ejection

    // What the page shows, read from the DOM the scripts rendered.
    let read = r##"
        const chart = id => { const e = document.querySelector(`[data-chart="${id}"]`);
                              return { points: +(e.dataset.points || 0), last: +(e.dataset.last || 0) }; };
        return {
          conn: chart("conn-rate"), traffic: chart("traffic"), failures: chart("failures"),
          latency: chart("latency"), conntrack: chart("conntrack"),
          shares: [...document.querySelectorAll("[data-share]")].map(e => +e.dataset.share),
          states: [...document.querySelectorAll("tr[data-state]")].map(e => e.dataset.state),
          events: [...document.querySelectorAll("#events [data-kind]")].map(e => e.dataset.kind),
          ready: document.getElementById("status").textContent,
          conntrackText: document.getElementById("conntrack").textContent,
        };"##;
    let deadline = Instant::now() + Duration::from_secs(30);
    // The events panel keeps the newest events only: with the failed
    // connects resent at once, traffic goes on at full rate and the eject
    // event scrolls out within a second or two. Shown once is shown.
    let mut eject_shown = false;
    let view: Value = loop {
        let v = browser.eval(read)?;
        eject_shown |= v["events"]
            .as_array()
            .is_some_and(|e| e.iter().any(|k| k == "eject"));
        let done = v["conn"]["points"].as_f64() > Some(2.0)
            && v["conn"]["last"].as_f64() > Some(0.0)
            && v["traffic"]["last"].as_f64() > Some(0.0)
            && v["latency"]["points"].as_f64() > Some(0.0)
            && v["states"]
                .as_array()
                .is_some_and(|s| s.iter().any(|x| x == "ejected"))
            && eject_shown
            && v["events"]
                .as_array()
                .is_some_and(|e| e.iter().any(|k| k == "open"));
        if done {
            break v;
        }
        if Instant::now() > deadline {
            bail!("the dashboard did not show live data within 30 s: {v:#}");
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    stop.store(true, Ordering::SeqCst);
    let _ = traffic.join();

    assert_eq!(view["ready"], "ready");
    // The conntrack panel shows the map's fill against its real capacity.
    let conntrack = view["conntrackText"].as_str().unwrap_or("");
    assert!(
        conntrack.contains("of 262.1k entries"),
        "conntrack panel: {conntrack:?}"
    );
    let shares: Vec<f64> = view["shares"]
        .as_array()
        .context("shares")?
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    assert_eq!(shares.len(), 3);
    let total: f64 = shares.iter().sum();
    assert!(
        (total - 100.0).abs() < 1.0 || total == 0.0,
        "shares {shares:?}"
    );

    let png = browser.screenshot()?;
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("dashboard.png"), png)?;
    Ok(())
}
