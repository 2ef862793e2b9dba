//! `cargo xtask bench control-plane`: the agent with 1,000 services × 10
//! backends (options: `--services N --backends N --scrapes N`). Reports the
//! time from start to ready (every table written), the time of a full
//! `/metrics` scrape and of `/api/v1/services` (median and min–max), the
//! agent's CPU per scrape, and its resident memory.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use sluice_tests::{Agent, TempDir, http_get, metric};
use testbed::{Netns, unique};

struct Args {
    services: usize,
    backends: usize,
    scrapes: usize,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        services: 1000,
        backends: 10,
        scrapes: 10,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || -> Result<usize> { Ok(it.next().context("value")?.parse()?) };
        match arg.as_str() {
            "--services" => a.services = value()?,
            "--backends" => a.backends = value()?,
            "--scrapes" => a.scrapes = value()?,
            other => bail!("unknown argument {other:?} (--services N --backends N --scrapes N)"),
        }
    }
    Ok(a)
}

fn config(a: &Args) -> String {
    let mut text = format!(
        "interfaces:\n  - name: cp0\nmaglev:\n  table_size: 1021\nlimits:\n  max_services: {}\n  max_backends: {}\nservices:\n",
        a.services,
        a.services * a.backends
    );
    for s in 0..a.services {
        text += &format!(
            "  - name: svc-{s}\n    vip: 10.{}.{}.1\n    port: 80\n    protocol: tcp\n    backends:\n",
            100 + s / 250,
            s % 250
        );
        for b in 0..a.backends {
            text += &format!(
                "      - address: 10.{}.{}.{}:8080\n",
                50 + s / 250,
                s % 250,
                b + 2
            );
        }
    }
    text
}

fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() -> Result<()> {
    let a = parse_args()?;
    let ns = Netns::new(&unique("cp"))?;
    ns.exec(&[
        "ip", "link", "add", "cp0", "type", "veth", "peer", "name", "cp1",
    ])?;
    ns.exec(&["ip", "link", "set", "cp0", "up"])?;
    ns.exec(&["ip", "link", "set", "cp1", "up"])?;
    let dir = TempDir::new("cp")?;
    std::fs::write(dir.path("sluice.yaml"), config(&a))?;

    let started = Instant::now();
    let agent = Agent::start(&ns, &dir.path("sluice.yaml"), dir.path("agent.log"))?;
    let ready = started.elapsed();

    let mut scrape = Vec::new();
    let mut api = Vec::new();
    let cpu = |text: &str| metric(text, "process_cpu_seconds_total", &[]).unwrap_or(0.0);
    let (_, first) = http_get(&ns, agent.listen, "/metrics")?;
    let series = first.lines().filter(|l| !l.starts_with('#')).count();
    let cpu_before = cpu(&first);
    for _ in 0..a.scrapes {
        let t = Instant::now();
        let (status, _) = http_get(&ns, agent.listen, "/metrics")?;
        scrape.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(status, 200);
        let t = Instant::now();
        http_get(&ns, agent.listen, "/api/v1/services")?;
        api.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (_, last) = http_get(&ns, agent.listen, "/metrics")?;
    let cpu_per_scrape = (cpu(&last) - cpu_before) / (a.scrapes + 1) as f64 * 1e3 / 2.0;
    let rss = metric(&last, "process_resident_memory_bytes", &[]).unwrap_or(0.0) / 1048576.0;

    let (sm, slo, shi) = stats(&mut scrape);
    let (am, alo, ahi) = stats(&mut api);
    println!(
        "\n{} services × {} backends ({} backends, Maglev tables of 1021 slots), {} scrapes\n",
        a.services,
        a.backends,
        a.services * a.backends,
        a.scrapes
    );
    println!(
        "start to ready (load, attach, write every table)   {:>8.2} s",
        ready.as_secs_f64()
    );
    println!(
        "GET /metrics ({series} series)                    median {sm:>7.1} ms   min–max {slo:.1}–{shi:.1} ms   target < 50 ms"
    );
    println!(
        "GET /api/v1/services                              median {am:>7.1} ms   min–max {alo:.1}–{ahi:.1} ms"
    );
    println!("agent CPU per request (mean of both)              {cpu_per_scrape:>8.1} ms");
    println!("agent resident memory                             {rss:>8.1} MiB");
    drop(agent);
    Ok(())
}
