//! `cargo xtask run`: a client, the load balancer and three HTTP backends in
//! network namespaces, the real agent, and live traffic until Ctrl-C.

use std::{
    collections::BTreeMap,
    io::Write,
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use testbed::{Family, NameServer, Netns, Topology, tcp_ask, udp_ask};

use crate::step;

const BACKENDS: usize = 3;
const AGENT_LISTEN: &str = "127.0.0.1:9464";

fn config(dir: &Path) -> String {
    let mut text = String::from(
        "# The demo's config: written by `cargo xtask run`.\ninterfaces:\n  - name: front\n",
    );
    for i in 0..BACKENDS {
        text += &format!("  - name: back{i}\n");
    }
    // The operator commands find the agent by this config; the demo's
    // overrides go away with it.
    text += &format!(
        "control:\n  socket: {}\n  state_directory: {}\n",
        dir.join("sluice.sock").display(),
        dir.join("state").display()
    );
    text += "services:\n";
    for (name, fam, proto) in [
        ("web", Family::V4, "tcp"),
        ("web-v6", Family::V6, "tcp"),
        ("echo-udp", Family::V4, "udp"),
    ] {
        text += &format!(
            "  - name: {name}\n    vip: \"{}\"\n    port: 80\n    protocol: {proto}\n    failure:\n      min_distinct_clients: 1  # the demo has one client\n    backends:\n",
            fam.vip()
        );
        for i in 0..BACKENDS {
            text += &format!(
                "      - address: \"{}\"\n",
                SocketAddr::new(fam.backend(i), 8080)
            );
        }
    }
    text
}

pub fn run(bin: &Path) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
    }

    step("creating the topology: client ⇄ lb ⇄ 3 backends (network namespaces, veth)");
    let topo = Topology::new("sd", BACKENDS)?;
    let mut servers = Vec::new();
    for (i, ns) in topo.backends.iter().enumerate() {
        servers.push(start_backend(ns, i)?);
    }
    topo.warm_neighbours()?;
    println!(
        "    namespaces: {} (client), {} (lb), {}",
        topo.client.name,
        topo.lb.name,
        topo.backends
            .iter()
            .map(|b| b.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );

    let dir = std::env::temp_dir().join(format!("sluice-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config_path = dir.join("sluice.yaml");
    std::fs::write(&config_path, config(&dir))?;
    let log_path = dir.join("agent.log");

    step("starting the agent in the lb namespace");
    let mut agent = Agent::start(&topo.lb, bin, &config_path, &log_path)?;
    let result = (|| -> Result<()> {
        agent.wait_ready(&topo.lb, &log_path)?;
        let port = forward_port(&topo.lb, stop.clone())?;
        println!();
        println!(
            "    config:    {}  (edit it: changes apply live)",
            config_path.display()
        );
        println!("    agent log: {}", log_path.display());
        println!(
            "    operate:   {} status --config {}  (services, backends web, explain, events -f, drain ...)",
            bin.display(),
            config_path.display()
        );
        println!("    dashboard: http://127.0.0.1:{port}/");
        println!("    metrics:   http://127.0.0.1:{port}/metrics");
        println!("    services:  http://127.0.0.1:{port}/api/v1/services");
        println!(
            "    try:       ip netns exec {} curl -s http://10.100.0.1/",
            topo.client.name
        );
        println!();
        step("driving traffic: HTTP over IPv4 and IPv6, UDP (Ctrl-C to stop and tear down)");
        println!(
            "    backend-1 stops for {DOWN_S} s of every {CYCLE_S} s: watch it fail, get ejected and come back"
        );
        drive_traffic(&topo, &mut servers, &stop)
    })();

    step("tearing down");
    agent.stop();
    drop(servers);
    drop(topo);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// backend-1's outage: from `CYCLE_S - DOWN_S` to `CYCLE_S` of every cycle.
const CYCLE_S: u64 = 60;
const DOWN_S: u64 = 20;

/// Backend i's HTTP servers (IPv4 and IPv6).
fn start_backend(ns: &Netns, i: usize) -> Result<Vec<NameServer>> {
    [Family::V4, Family::V6]
        .into_iter()
        .map(|fam| {
            NameServer::start(
                ns,
                SocketAddr::new(fam.backend(i), 8080),
                &format!("backend-{i}"),
            )
        })
        .collect()
}

/// Connections per backend, printed as one live line; backend-1 goes down
/// and comes back on a cycle, so the failure handling has something to show.
fn drive_traffic(
    topo: &Topology,
    servers: &mut [Vec<NameServer>],
    stop: &Arc<AtomicBool>,
) -> Result<()> {
    let client = &topo.client;
    let counts: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let errors = Arc::new(Mutex::new(0u64));
    let worker = {
        let (counts, errors, stop) = (counts.clone(), errors.clone(), stop.clone());
        client.spawn(move || {
            let mut n: u64 = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let reply = match n % 6 {
                    0 => udp_ask(
                        SocketAddr::new(Family::V4.vip(), 80),
                        0,
                        Duration::from_secs(1),
                    ),
                    1 | 3 => tcp_ask(
                        SocketAddr::new(Family::V6.vip(), 80),
                        Duration::from_secs(2),
                    ),
                    _ => tcp_ask(
                        SocketAddr::new(Family::V4.vip(), 80),
                        Duration::from_secs(2),
                    ),
                };
                match reply {
                    Ok(text) => {
                        let name = text.split_whitespace().next().unwrap_or("?").to_string();
                        *counts.lock().unwrap().entry(name).or_default() += 1;
                    }
                    Err(_) => *errors.lock().unwrap() += 1,
                }
                thread::sleep(Duration::from_millis(20));
            }
        })?
    };
    let started = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(500));
        let in_cycle = started.elapsed().as_secs() % CYCLE_S;
        let down = in_cycle >= CYCLE_S - DOWN_S;
        if down && !servers[1].is_empty() {
            servers[1].clear();
        } else if !down && servers[1].is_empty() {
            servers[1] = start_backend(&topo.backends[1], 1)?;
        }
        let counts = counts.lock().unwrap().clone();
        let total: u64 = counts.values().sum();
        let line: Vec<String> = counts.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        print!(
            "\r    {:>4}s  {}  | total {total}, failed {}   ",
            started.elapsed().as_secs(),
            line.join("  "),
            errors.lock().unwrap()
        );
        let _ = std::io::stdout().flush();
    }
    println!();
    let _ = worker.join();
    Ok(())
}

/// Makes the agent's HTTP port (inside the lb namespace) reachable on the
/// host's 127.0.0.1: a small TCP relay. Returns the host port.
fn forward_port(lb: &Netns, stop: Arc<AtomicBool>) -> Result<u16> {
    let listener = (9464..9480)
        .find_map(|p| TcpListener::bind(("127.0.0.1", p)).ok())
        .context("no free port in 9464..9480 on 127.0.0.1")?;
    let port = listener.local_addr()?.port();
    listener.set_nonblocking(true)?;
    let lb_path = format!("/run/netns/{}", lb.name);
    thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            let Ok((downstream, _)) = listener.accept() else {
                thread::sleep(Duration::from_millis(50));
                continue;
            };
            let lb_path = lb_path.clone();
            thread::spawn(move || {
                let Ok(upstream) = connect_in(&lb_path, AGENT_LISTEN) else {
                    return;
                };
                let _ = downstream.set_nonblocking(false);
                relay(downstream, upstream);
            });
        }
    });
    Ok(port)
}

fn connect_in(netns_path: &str, addr: &str) -> Result<TcpStream> {
    let addr: SocketAddr = addr.parse()?;
    let path = netns_path.to_string();
    thread::spawn(move || -> Result<TcpStream> {
        let file = std::fs::File::open(&path)?;
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a valid namespace fd, for this short-lived thread only.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {path}: {}", std::io::Error::last_os_error());
        }
        Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(2))?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("relay thread panicked"))?
}

fn relay(a: TcpStream, b: TcpStream) {
    let (Ok(mut a2), Ok(mut b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let (mut a, mut b) = (a, b);
    let t = thread::spawn(move || {
        let _ = std::io::copy(&mut a2, &mut b2);
        let _ = b2.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut b, &mut a);
    let _ = a.shutdown(std::net::Shutdown::Write);
    let _ = t.join();
}

/// The agent process, in its own process group so that Ctrl-C reaches only
/// the demo, which then stops the agent in order.
struct Agent {
    child: Option<Child>,
}

impl Agent {
    fn start(lb: &Netns, bin: &Path, config: &Path, log: &Path) -> Result<Self> {
        let log_file = std::fs::File::create(log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &lb.name])
            .arg(bin)
            .args(["run", "--config"])
            .arg(config)
            .args(["--listen", AGENT_LISTEN])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .process_group(0)
            .spawn()
            .context("starting sluice")?;
        Ok(Self { child: Some(child) })
    }

    fn wait_ready(&mut self, lb: &Netns, log: &Path) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let lb_path = format!("/run/netns/{}", lb.name);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                bail!(
                    "the agent exited ({status}):\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            if let Ok(mut s) = connect_in(&lb_path, AGENT_LISTEN) {
                let _ = s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n");
                let mut text = String::new();
                let _ = std::io::Read::read_to_string(&mut s, &mut text);
                if text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200") {
                    return Ok(());
                }
            }
            thread::sleep(Duration::from_millis(200));
        }
        bail!("the agent was not ready within 60 s; see {}", log.display())
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: signalling the child this demo started, by its PID.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}
