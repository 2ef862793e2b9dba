//! `cargo xtask bench control-plane`: the agent with 1,000 services × 10
//! backends, then 5,000 × 10 (options: `--services N --backends N` for one
//! case of your own, `--scrapes N --churns N`). Reports, per case, the time
//! from start to ready (every table written), the time for a 1% churn
//! update (1% of the backends replaced) to reach the kernel, alone and
//! while `/metrics` is scraped in a loop (interleaved rounds: scrapes must
//! not hold up an apply), the time of a full `/metrics` scrape and of
//! `/api/v1/services` (median and min–max), the agent's CPU per scrape, its
//! resident memory and the kernel memory of its maps; then the Maglev table
//! build time against the table size.

use std::{net::SocketAddr, time::Instant};

use agent_common::{Service, ServiceKey};
use aya::maps::{HashMap, Map, MapData};

use anyhow::{Context, Result};
use sluice_tests::{
    Agent, TempDir,
    bench::{Flags, stats},
    http_get, metric,
};
use testbed::{Netns, unique};

#[derive(Clone, Copy)]
struct Args {
    services: usize,
    backends: usize,
    scrapes: usize,
    churns: usize,
}

/// The cases to run: the flags' one, or 1,000 and 5,000 services.
fn parse_args() -> Result<Vec<Args>> {
    let f = Flags::parse(&[
        ("--services", "N"),
        ("--backends", "N"),
        ("--scrapes", "N"),
        ("--churns", "N"),
    ])?;
    let case = |services| -> Result<Args> {
        Ok(Args {
            services: f.get("--services", services)?,
            backends: f.get("--backends", 10)?,
            scrapes: f.get("--scrapes", 10)?,
            churns: f.get("--churns", 10)?,
        })
    };
    if f.text("--services").is_some() {
        return Ok(vec![case(0)?]);
    }
    Ok(vec![case(1000)?, case(5000)?])
}

/// The services whose first backend churn round `round` replaces: 1% of
/// the backends, spread over the services.
fn churned(a: &Args, round: usize) -> Vec<usize> {
    let count = (a.services * a.backends / 100).max(1);
    (0..count)
        .map(|k| (k * a.services / count + round) % a.services)
        .collect()
}

/// The config after `round` churn rounds (0: the initial one).
fn config(a: &Args, round: usize) -> String {
    let mut text = format!(
        "interfaces:\n  - name: cp0\nlimits:\n  max_services: {}\n  max_backends: {}\nservices:\n",
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
            // Each round that churns this service moves its first backend.
            let moved = if b == 0 {
                (1..=round).filter(|&r| churned(a, r).contains(&s)).count()
            } else {
                0
            };
            text += &format!(
                "      - address: 10.{}.{}.{}:8080\n",
                50 + s / 250,
                s % 250,
                b + 2 + moved * 20
            );
        }
    }
    text
}

fn main() -> Result<()> {
    for a in parse_args()? {
        case(&a)?;
    }
    maglev_build_times();
    Ok(())
}

fn case(a: &Args) -> Result<()> {
    let a = *a;
    let ns = Netns::new(&unique("cp"))?;
    ns.exec(&[
        "ip", "link", "add", "cp0", "type", "veth", "peer", "name", "cp1",
    ])?;
    ns.exec(&["ip", "link", "set", "cp0", "up"])?;
    ns.exec(&["ip", "link", "set", "cp1", "up"])?;
    let dir = TempDir::new("cp")?;
    std::fs::write(dir.path("sluice.yaml"), config(&a, 0))?;

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

    // Churn: 1% of the backends replaced per update (file renamed into
    // place, SIGHUP), timed until the last changed service's entry flips to
    // its new table in the kernel (services are applied in config order).
    // Odd rounds run alone, even ones while another thread scrapes
    // /metrics back to back: an apply must not wait for a scrape.
    let services_map = kernel_services_map()?;
    let (mut alone, mut scraped) = (Vec::new(), Vec::new());
    let stop = std::sync::atomic::AtomicBool::new(false);
    let scrapes_during = std::sync::atomic::AtomicUsize::new(0);
    for round in 1..=a.churns {
        let changed = churned(&a, round);
        let last = *changed.iter().max().context("no service churned")?;
        let key = service_key(last)?;
        let before = services_map.get(&key, 0)?.table_offset;
        let tmp = dir.path("sluice.yaml.new");
        std::fs::write(&tmp, config(&a, round))?;
        let with_scrapes = round % 2 == 0;
        let elapsed = std::thread::scope(|scope| -> Result<f64> {
            stop.store(false, std::sync::atomic::Ordering::SeqCst);
            let scraper = with_scrapes.then(|| {
                scope.spawn(|| {
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        if http_get(&ns, agent.listen, "/metrics").is_ok() {
                            scrapes_during.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                })
            });
            if scraper.is_some() {
                // A scrape under way when the update arrives.
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let t = Instant::now();
            std::fs::rename(&tmp, dir.path("sluice.yaml"))?;
            agent.reload()?;
            let result = loop {
                if services_map.get(&key, 0)?.table_offset != before {
                    break Ok(t.elapsed().as_secs_f64() * 1e3);
                }
                if t.elapsed().as_secs() > 30 {
                    break Err(anyhow::anyhow!(
                        "churn round {round} did not reach the kernel in 30 s"
                    ));
                }
                std::thread::yield_now();
            };
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            result
        })?;
        if with_scrapes {
            scraped.push(elapsed);
        } else {
            alone.push(elapsed);
        }
    }
    let (_, after_churn) = http_get(&ns, agent.listen, "/metrics")?;
    let rss_churn =
        metric(&after_churn, "process_resident_memory_bytes", &[]).unwrap_or(0.0) / 1048576.0;
    let kernel = kernel_memory(agent.pid())?;

    let (sm, slo, shi) = stats(&scrape);
    let (am, alo, ahi) = stats(&api);
    println!(
        "\n{} services × {} backends ({} backends, Maglev tables of {} slots), {} scrapes\n",
        a.services,
        a.backends,
        a.services * a.backends,
        services_map.get(&service_key(0)?, 0)?.table_size,
        a.scrapes
    );
    println!(
        "start to ready (load, attach, write every table)   {:>8.2} s",
        ready.as_secs_f64()
    );
    if !alone.is_empty() {
        let (cm, clo, chi) = stats(&alone);
        println!(
            "1% churn update to the kernel ({} backends moved)   median {cm:>7.1} ms   min–max {clo:.1}–{chi:.1} ms   target < 50 ms",
            churned(&a, 1).len()
        );
    }
    if !scraped.is_empty() && !alone.is_empty() {
        let (cm, clo, chi) = stats(&scraped);
        let ratios: Vec<f64> = scraped.iter().zip(&alone).map(|(s, a)| s / a).collect();
        let (rm, rlo, rhi) = stats(&ratios);
        println!(
            "  the same while /metrics is scraped in a loop      median {cm:>7.1} ms   min–max {clo:.1}–{chi:.1} ms   ratio {rm:.2}× ({rlo:.2}–{rhi:.2}), {} scrapes meanwhile",
            scrapes_during.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    println!(
        "GET /metrics ({series} series, {:.1} MiB)        median {sm:>7.1} ms   min–max {slo:.1}–{shi:.1} ms   target < 50 ms",
        first.len() as f64 / 1048576.0
    );
    println!(
        "GET /api/v1/services                              median {am:>7.1} ms   min–max {alo:.1}–{ahi:.1} ms"
    );
    println!("agent CPU per request (mean of both)              {cpu_per_scrape:>8.1} ms");
    println!(
        "agent resident memory                             {rss:>8.1} MiB (after churn {rss_churn:.1} MiB)   target < 100 MiB"
    );
    println!(
        "kernel memory of the maps (memlock)               {:>8.1} MiB, of which MAGLEV {:.1} MiB ({} slots)",
        kernel.total as f64 / 1048576.0,
        kernel.maglev as f64 / 1048576.0,
        kernel.maglev_slots
    );
    drop(agent);
    Ok(())
}

/// The kernel memory of an agent's maps, from its descriptors' fdinfo
/// (each map once, however many descriptors it has).
struct KernelMemory {
    total: u64,
    maglev: u64,
    maglev_slots: u64,
}

fn kernel_memory(pid: u32) -> Result<KernelMemory> {
    let names: std::collections::HashMap<u32, (String, u32)> = aya::maps::loaded_maps()
        .filter_map(Result::ok)
        .map(|m| {
            let name = m.name_as_str().unwrap_or("").to_string();
            (m.id(), (name, m.max_entries()))
        })
        .collect();
    let mut seen = std::collections::HashSet::new();
    let mut memory = KernelMemory {
        total: 0,
        maglev: 0,
        maglev_slots: 0,
    };
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) else {
            continue;
        };
        if !seen.insert(id) {
            continue;
        }
        memory.total += memlock;
        if let Some((name, entries)) = names.get(&(id as u32))
            && name == "MAGLEV"
        {
            memory.maglev += memlock;
            memory.maglev_slots += u64::from(*entries);
        }
    }
    Ok(memory)
}

/// The agent's SERVICES map, found among the kernel's maps by name (the
/// newest, if several agents run).
fn kernel_services_map() -> Result<HashMap<MapData, ServiceKey, Service>> {
    let id = aya::maps::loaded_maps()
        .filter_map(Result::ok)
        .filter(|m| m.name_as_str() == Some("SERVICES"))
        .map(|m| m.id())
        .max()
        .context("no SERVICES map loaded")?;
    let data = MapData::from_id(id)?;
    Ok(HashMap::try_from(Map::HashMap(data))?)
}

fn service_key(s: usize) -> Result<ServiceKey> {
    let vip: std::net::Ipv4Addr = format!("10.{}.{}.1", 100 + s / 250, s % 250).parse()?;
    Ok(ServiceKey {
        addr: agent_common::addr::words(vip.into()),
        port: 80u16.to_be(),
        proto: agent_common::PROTO_TCP,
        family: agent_common::FAMILY_V4,
    })
}

/// Userspace Maglev build time per service against the table size.
fn maglev_build_times() {
    println!("\nMaglev table build (one service, median of 21 builds)");
    println!("  slots     10 backends    100 backends    per slot (100 backends)");
    for size in [1021u32, 4093, 16381, 65537] {
        let mut row = Vec::new();
        for n in [10usize, 100] {
            let backends: Vec<(SocketAddr, u32)> = (0..n)
                .map(|i| {
                    (
                        SocketAddr::from(([10, 9, (i / 250) as u8, (i % 250) as u8], 80)),
                        1,
                    )
                })
                .collect();
            let times: Vec<f64> = (0..21)
                .map(|_| {
                    let t = Instant::now();
                    std::hint::black_box(sluice::maglev::build(&backends, size));
                    t.elapsed().as_secs_f64() * 1e6
                })
                .collect();
            row.push(stats(&times).0);
        }
        println!(
            "  {size:>6}   {:>9.0} µs    {:>10.0} µs    {:>8.1} ns",
            row[0],
            row[1],
            row[1] * 1e3 / f64::from(size)
        );
    }
}
