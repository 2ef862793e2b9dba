//! Hitless operation with a pinned datapath: `kill -9` of the agent, a
//! restart that adopts the pinned state, and an upgrade to another build of
//! the kernel programs (swapped into the links atomically), all while a
//! long-lived TCP stream and a loop of new connections run. Then the
//! refusals: another map layout, another capacity; and `sluice cleanup`.
//! And what a crash in the middle of an apply leaves: backends whose service
//! entry is gone, ended by the next agent.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use agent_common::{Service, ServiceKey};
use anyhow::{Context, Result, bail};
use sluice_tests::{Agent, Bpffs, TempDir, service_json, sluice_bin, wait_for};
use testbed::{Family, Topology, tcp_ask};

const VIP: &str = "10.100.0.1:80";

/// `drained`: a backend listed with weight 0 (draining).
fn config(pin_dir: &Path, conntrack: u32, drained: Option<usize>) -> String {
    let mut text = sluice_tests::interfaces_yaml(3);
    text += &format!(
        "conntrack:\n  max_entries: {conntrack}\npinning:\n  directory: {}\nservices:\n  - name: web\n    vip: 10.100.0.1\n    port: 80\n    protocol: tcp\n    backends:\n",
        pin_dir.display()
    );
    for i in 0..3 {
        let weight = if drained == Some(i) { 0 } else { 1 };
        text += &format!("      - address: 10.1.{i}.2:8080\n        weight: {weight}\n");
    }
    text
}

/// A backend's connections_total and state, from the API.
fn backend(topo: &Topology, agent: &Agent, i: usize) -> Result<(u64, String)> {
    let s = service_json(&topo.lb, agent, "web")?;
    let b = s["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| b["address"] == format!("10.1.{i}.2:8080").as_str())
        .cloned()
        .with_context(|| format!("backend {i} not listed: {s}"))?;
    Ok((
        b["connections_total"].as_u64().unwrap_or(0),
        b["state"].as_str().unwrap_or("").to_string(),
    ))
}

/// New connections through the VIP in a loop until stopped; counts both.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(topo: &Topology) -> Result<Self> {
        let (stop, ok, failed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (s, o, f, e) = (stop.clone(), ok.clone(), failed.clone(), errors.clone());
        let vip: SocketAddr = VIP.parse()?;
        let thread = topo.client.spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match tcp_ask(vip, Duration::from_secs(3)) {
                    Ok(reply) if reply.starts_with('b') => o.fetch_add(1, Ordering::SeqCst),
                    Ok(reply) => {
                        e.lock().unwrap().push(format!("odd reply {reply:?}"));
                        f.fetch_add(1, Ordering::SeqCst)
                    }
                    Err(err) => {
                        e.lock().unwrap().push(format!("{err:#}"));
                        f.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }
        })?;
        Ok(Self {
            stop,
            ok,
            failed,
            errors,
            thread: Some(thread),
        })
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    /// Waits until `more` further connections completed.
    fn wait_more(&self, more: u64) -> Result<()> {
        let target = self.ok() + more;
        wait_for(
            "connections through the VIP",
            Duration::from_secs(30),
            || Ok(self.ok() >= target),
        )
    }

    fn finish(mut self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (
            self.ok(),
            self.failed.load(Ordering::SeqCst),
            self.errors.lock().unwrap().clone(),
        )
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The long-lived stream: each call sends a line and expects it back.
struct Stream {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Stream {
    fn open(topo: &Topology) -> Result<Self> {
        let vip: SocketAddr = VIP.parse()?;
        let (writer, reader) =
            topo.client
                .enter(|| -> Result<(TcpStream, BufReader<TcpStream>)> {
                    let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(3))?;
                    s.set_read_timeout(Some(Duration::from_secs(3)))?;
                    s.write_all(b"echo\n")?;
                    let mut reader = BufReader::new(s.try_clone()?);
                    let mut first = String::new();
                    reader.read_line(&mut first)?;
                    Ok((s, reader))
                })??;
        Ok(Self { writer, reader })
    }

    fn check(&mut self, when: &str) -> Result<()> {
        let line = format!("still here {when}\n");
        self.writer
            .write_all(line.as_bytes())
            .with_context(|| format!("the long-lived stream broke {when}"))?;
        let mut echo = String::new();
        self.reader
            .read_line(&mut echo)
            .with_context(|| format!("the long-lived stream broke {when}"))?;
        if echo != line {
            bail!("the long-lived stream broke {when}: got {echo:?}");
        }
        Ok(())
    }
}

fn connections_total(topo: &Topology, agent: &Agent) -> Result<u64> {
    service_json(&topo.lb, agent, "web")?["connections_total"]
        .as_u64()
        .context("connections_total")
}

fn packets_to_backend(topo: &Topology, agent: &Agent) -> Result<u64> {
    Ok(service_json(&topo.lb, agent, "web")?["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b["packets_to_backend"].as_u64())
        .sum())
}

/// Another build of the kernel programs: the one `cargo xtask test` built
/// without statistics (SLUICE_UPGRADE_OBJECT), or else the built-in one
/// loaded anew (still a new program swapped into the links).
fn upgrade_object(dir: &TempDir) -> Result<(PathBuf, bool)> {
    if let Ok(path) = std::env::var("SLUICE_UPGRADE_OBJECT") {
        return Ok((path.into(), true));
    }
    let path = dir.path("sluice-same.bpf.o");
    std::fs::write(&path, sluice::datapath::EBPF_OBJECT)?;
    Ok((path, false))
}

/// Three backends serving, a bpffs for the pins, and the config (pinned,
/// no backend draining) written.
fn pinned_bed(
    name: &str,
) -> Result<(
    Topology,
    Vec<testbed::NameServer>,
    TempDir,
    Bpffs,
    PathBuf,
    PathBuf,
)> {
    let topo = Topology::new(name, 3)?;
    let servers = topo.serve(Family::V4, 8080)?;
    topo.warm_neighbours()?;
    let dir = TempDir::new(name)?;
    let bpffs = Bpffs::mount(&dir)?;
    let pin_dir = bpffs.0.join("node-a");
    let cfg = dir.path("sluice.yaml");
    std::fs::write(&cfg, config(&pin_dir, 65536, None))?;
    Ok((topo, servers, dir, bpffs, pin_dir, cfg))
}

#[test]
fn kill_restart_and_upgrade_lose_no_connection() -> Result<()> {
    let (topo, _servers, dir, _bpffs, pin_dir, cfg) = pinned_bed("hl")?;

    let mut agent = Agent::start(&topo.lb, &cfg, dir.path("a1.log"))?;
    let mut stream = Stream::open(&topo)?;
    let load = Load::start(&topo)?;
    load.wait_more(200)?;
    stream.check("before the crash")?;

    // 1. kill -9: the pinned datapath forwards on its own.
    agent.kill9()?;
    load.wait_more(300)?;
    stream.check("with no agent running")?;

    // 2. A restart adopts the pinned maps and links, and reconciles them to
    // the config, changed meanwhile (backend 2 drains); counters carry on.
    let before = load.ok();
    std::fs::write(&cfg, config(&pin_dir, 65536, Some(2)))?;
    let agent = Agent::start(&topo.lb, &cfg, dir.path("a2.log"))?;
    let log = agent.log_text();
    assert!(
        log.contains("adopted the pinned datapath"),
        "restart did not adopt:\n{log}"
    );
    let counted = connections_total(&topo, &agent)?;
    assert!(
        counted >= before,
        "counters restarted: {counted} connections counted, {before} made"
    );
    let (drained_before, state) = backend(&topo, &agent, 2)?;
    assert_eq!(state, "draining");
    load.wait_more(300)?;
    stream.check("after the restart")?;
    let (drained_after, _) = backend(&topo, &agent, 2)?;
    assert_eq!(
        drained_before, drained_after,
        "the draining backend got new connections after the restart"
    );
    drop(agent); // SIGTERM: with pinning, the datapath stays

    // 3. An upgrade: another build swapped into the same links.
    let (object, rebuilt) = upgrade_object(&dir)?;
    let object_arg = object.to_string_lossy().into_owned();
    let agent = Agent::start_with(
        &topo.lb,
        &cfg,
        dir.path("a3.log"),
        &["--ebpf-object", &object_arg],
    )?;
    let log = agent.log_text();
    assert!(
        log.contains("program replaced in place"),
        "upgrade did not replace the program in the links:\n{log}"
    );
    load.wait_more(300)?;
    stream.check("after the upgrade")?;
    if rebuilt {
        // The build without statistics runs now: the counters stand still.
        let a = packets_to_backend(&topo, &agent)?;
        load.wait_more(50)?;
        let b = packets_to_backend(&topo, &agent)?;
        assert_eq!(a, b, "the old program still runs after the upgrade");
    }

    let (ok, failed, errors) = load.finish();
    eprintln!("{ok} connections, {failed} failed, across kill -9, restart and upgrade");
    assert!(ok >= 1000, "only {ok} connections ran");
    assert_eq!(
        failed,
        0,
        "failed connections: {:?}",
        &errors[..errors.len().min(5)]
    );
    drop(stream);
    drop(agent);

    // 4. Refusals. Another layout's pins are never reinterpreted.
    let layout = format!("layout-{}", agent_common::MAP_LAYOUT);
    std::fs::rename(pin_dir.join(&layout), pin_dir.join("layout-0"))?;
    let refused = run_expecting_failure(&topo, &cfg, &dir)?;
    assert!(
        refused.contains("layout-0") && refused.contains("sluice cleanup"),
        "another layout was not refused clearly:\n{refused}"
    );
    std::fs::rename(pin_dir.join("layout-0"), pin_dir.join(&layout))?;
    // Another capacity: the map and both sizes are named.
    std::fs::write(&cfg, config(&pin_dir, 131072, Some(2)))?;
    let refused = run_expecting_failure(&topo, &cfg, &dir)?;
    assert!(
        refused.contains("CONNTRACK") && refused.contains("131072"),
        "a capacity change was not refused clearly:\n{refused}"
    );

    // 5. `sluice cleanup` removes the pins: the programs detach.
    let out = Command::new(sluice_bin())
        .args(["cleanup", "--config"])
        .arg(&cfg)
        .output()?;
    assert!(out.status.success(), "cleanup failed: {out:?}");
    assert!(!pin_dir.exists(), "pins left after cleanup");
    // The kernel releases an unpinned link asynchronously.
    wait_for(
        "programs detached after cleanup",
        Duration::from_secs(10),
        || {
            let links = Command::new("ip")
                .args(["netns", "exec", &topo.lb.name, "ip", "-d", "link", "show"])
                .output()?;
            Ok(!String::from_utf8_lossy(&links.stdout).contains("prog/xdp"))
        },
    )?;
    Ok(())
}

/// Runs the agent expecting it to refuse to start; returns its output.
fn run_expecting_failure(topo: &Topology, cfg: &Path, dir: &TempDir) -> Result<String> {
    match Agent::start(&topo.lb, cfg, dir.path("refused.log")) {
        Ok(_) => bail!("the agent started"),
        Err(e) => Ok(format!("{e:#}")),
    }
}

/// An agent killed between removing a service's entry and ending its
/// backends leaves backends that no pinned service owns, and their flows.
/// The next agent ends them as it ends removed backends: their flows are
/// deleted before their ids (and prefilter bits) go, and a connection that
/// goes on is picked up again by the new service's Maglev choice.
#[test]
fn backends_left_without_a_service_are_ended_at_adoption() -> Result<()> {
    let (topo, _servers, dir, _bpffs, pin_dir, cfg) = pinned_bed("ho")?;
    let mut agent = Agent::start(&topo.lb, &cfg, dir.path("a1.log"))?;
    let mut stream = Stream::open(&topo)?;
    stream.check("before the crash")?;
    agent.kill9()?;

    // The crash: the service's entry is gone, its backends are not.
    let pinned = pin_dir.join(format!("layout-{}/maps/SERVICES", agent_common::MAP_LAYOUT));
    let mut services: aya::maps::HashMap<_, ServiceKey, Service> = aya::maps::HashMap::try_from(
        aya::maps::Map::HashMap(aya::maps::MapData::from_pin(&pinned)?),
    )?;
    let keys: Vec<ServiceKey> = services.keys().collect::<Result<_, _>>()?;
    assert_eq!(keys.len(), 1, "one service pinned");
    services.remove(&keys[0])?;
    drop(services);

    let agent = Agent::start(&topo.lb, &cfg, dir.path("a2.log"))?;
    let log = agent.log_text();
    let ended: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("backend removed") && l.contains("(adopted) service #"))
        .collect();
    assert_eq!(ended.len(), 3, "the three ownerless backends ended:\n{log}");
    let flows_closed: u64 = ended
        .iter()
        .filter_map(|l| l.split("flows_closed=").nth(1))
        .filter_map(|n| {
            n.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert!(
        flows_closed >= 2,
        "the stream's two entries were not deleted ({flows_closed}):\n{log}"
    );
    stream.check("after its entries were deleted")?;
    Ok(())
}
