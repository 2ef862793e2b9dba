//! `algorithm: least_connections` end to end: two backends, one holding
//! every connection open until the test closes it, one answering and
//! closing at once. New connections are opened one after another, the
//! long-lived ones kept open: under Maglev the holding backend gets about
//! half, under least connections few. The kernel's active counts
//! (`BACKEND_ACTIVE`, read from the pinned map) follow the open
//! connections and return to zero when they close by FIN, by RST, and by
//! expiry (the sweep's correction): no leak.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use sluice_tests::{Agent, Bpffs, TempDir, wait_for};
use testbed::{Family, NameServer, Netns, Topology};

const FAM: Family = Family::V4;
const PORT: u16 = 8080;
/// New connections per algorithm.
const N: usize = 200;

/// A server that answers each connection with its name and then holds it
/// open until the client closes it (then closes its side).
struct Holder {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Holder {
    fn start(ns: &Netns, addr: SocketAddr, name: &str) -> Result<Self> {
        let listener = ns.enter(|| TcpListener::bind(addr))??;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, name) = (stop.clone(), format!("{name}\n"));
        let thread = thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let name = name.clone();
                        thread::spawn(move || {
                            let _ = s.set_nonblocking(false);
                            let _ = s.write_all(name.as_bytes());
                            // Until the client closes (or resets).
                            let mut sink = Vec::new();
                            let _ = s.read_to_end(&mut sink);
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn backend(i: usize) -> SocketAddr {
    SocketAddr::new(FAM.backend(i), PORT)
}

fn vip() -> SocketAddr {
    SocketAddr::new(FAM.vip(), 80)
}

fn config(pin_dir: &Path, algorithm: &str, timeouts: &str) -> String {
    let mut text = sluice_tests::interfaces_yaml(2);
    text += &format!(
        "pinning:\n  directory: {}\n{timeouts}services:\n  - name: web\n    vip: \"{}\"\n    port: 80\n    protocol: tcp\n    algorithm: {algorithm}\n    backends:\n",
        pin_dir.display(),
        FAM.vip()
    );
    for i in 0..2 {
        text += &format!("      - address: \"{}\"\n", backend(i));
    }
    text
}

struct Bed {
    topo: Topology,
    _servers: (Holder, NameServer),
    cfg: PathBuf,
    pin_dir: PathBuf,
    agent: Agent,
    _bpffs: Bpffs,
    _dir: TempDir,
}

impl Bed {
    /// Rewrites the config and waits until the agent has applied it.
    fn reconfigure(&self, text: &str) -> Result<()> {
        let applied = || {
            self.agent
                .log_text()
                .matches("config change applied")
                .count()
        };
        let before = applied();
        std::fs::write(&self.cfg, text)?;
        self.agent.reload()?;
        wait_for("the config change", Duration::from_secs(10), || {
            Ok(applied() > before)
        })
    }

    /// The kernel's active counts of the first backend ids (all there are).
    fn active(&self) -> Result<Vec<i64>> {
        let path = self.pin_dir.join(format!(
            "layout-{}/maps/BACKEND_ACTIVE",
            agent_common::MAP_LAYOUT
        ));
        let map: aya::maps::Array<_, u64> = aya::maps::Array::try_from(aya::maps::Map::Array(
            aya::maps::MapData::from_pin(&path)
                .with_context(|| format!("opening {}", path.display()))?,
        ))?;
        (0..64)
            .map(|i| Ok(map.get(&i, 0)? as i64))
            .collect::<Result<_>>()
    }

    fn active_total(&self) -> Result<i64> {
        Ok(self.active()?.iter().sum())
    }
}

/// `n` new connections, one after another: each one's backend name;
/// those to the holding backend (`b0`) are kept open and returned, the
/// others closed by the server at once (and read to their end).
fn connections(topo: &Topology, n: usize, keep_all: bool) -> Result<(usize, Vec<TcpStream>)> {
    topo.client
        .enter(move || -> Result<(usize, Vec<TcpStream>)> {
            let (mut to_b0, mut kept) = (0, Vec::new());
            for i in 0..n {
                let mut s = TcpStream::connect_timeout(&vip(), Duration::from_secs(4))
                    .with_context(|| format!("connection {i}"))?;
                s.set_read_timeout(Some(Duration::from_secs(4)))?;
                s.write_all(b"hello\n")?;
                let mut line = String::new();
                BufReader::new(s.try_clone()?).read_line(&mut line)?;
                let name = line.split_whitespace().next().unwrap_or("").to_string();
                if name == "b0" {
                    to_b0 += 1;
                    kept.push(s);
                } else {
                    ensure!(name == "b1", "connection {i}: answer {line:?}");
                    if keep_all {
                        kept.push(s); // the server has closed its side
                    } else {
                        let mut rest = Vec::new();
                        let _ = s.read_to_end(&mut rest);
                    }
                }
            }
            Ok((to_b0, kept))
        })?
}

/// Closes connections with a RST (SO_LINGER 0).
fn reset(streams: Vec<TcpStream>) -> Result<()> {
    for s in streams {
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
    }
    Ok(())
}

#[test]
fn least_connections_spares_the_backend_that_holds_them_and_counts_leak_nothing() -> Result<()> {
    let topo = Topology::new("lconn", 2)?;
    let servers = (
        Holder::start(&topo.backends[0], backend(0), "b0")?,
        NameServer::start(&topo.backends[1], backend(1), "b1")?,
    );
    topo.warm_neighbours()?;
    let dir = TempDir::new("lconn")?;
    let bpffs = Bpffs::mount(&dir)?;
    let pin_dir = bpffs.0.join("node");
    let cfg = dir.path("sluice.yaml");
    std::fs::write(&cfg, config(&pin_dir, "maglev", ""))?;
    let agent = Agent::start(&topo.lb, &cfg, dir.path("agent.log"))?;
    let bed = Bed {
        topo,
        _servers: servers,
        cfg,
        pin_dir,
        agent,
        _bpffs: bpffs,
        _dir: dir,
    };

    // Maglev: the holding backend gets about half of the new connections.
    let (maglev_b0, held) = connections(&bed.topo, N, false)?;
    ensure!(bed.active_total()? == 0, "Maglev flows are not counted");
    drop(held);

    // Least connections: it gets few (each one it holds makes it the
    // busier of any pair).
    bed.reconfigure(&config(&bed.pin_dir, "least_connections", ""))?;
    let (lc_b0, held) = connections(&bed.topo, N, false)?;
    println!(
        "connections to the holding backend, of {N}: maglev {maglev_b0}, least_connections {lc_b0}"
    );
    ensure!(
        (N / 4..=3 * N / 4).contains(&maglev_b0),
        "maglev gave the holding backend {maglev_b0} of {N}"
    );
    ensure!(lc_b0 < N / 4, "least_connections gave it {lc_b0} of {N}");
    // `explain` says the choice is this node's, from live counts.
    let out = std::process::Command::new(sluice_tests::sluice_bin())
        .args([
            "explain",
            "10.0.1.2:40000",
            &format!("{}/tcp", vip()),
            "-o",
            "json",
        ])
        .arg("--config")
        .arg(&bed.cfg)
        .arg("--socket")
        .arg(sluice_tests::control_socket_of(&bed.cfg))
        .output()?;
    let e: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stderr).to_string())?;
    ensure!(e["decision"] == "least_connections", "{e}");
    ensure!(e["backend"].is_null(), "{e}");

    // The kernel's counts are the connections open now: the held ones.
    let held_n = held.len() as i64;
    wait_for("the counts to settle", Duration::from_secs(3), || {
        let active = bed.active()?;
        Ok(active.iter().sum::<i64>() == held_n && active.iter().all(|&n| n >= 0))
    })
    .with_context(|| format!("counts {:?}, {held_n} held", bed.active()))?;

    // Closed by FIN (both sides): back to zero.
    drop(held);
    wait_for("zero after FINs", Duration::from_secs(5), || {
        Ok(bed.active_total()? == 0)
    })
    .with_context(|| format!("counts {:?}", bed.active()))?;

    // Closed by RST: every connection kept open (the answering backend's
    // half-closed: still counted), then reset.
    let (_, kept) = connections(&bed.topo, 20, true)?;
    wait_for("20 counted", Duration::from_secs(3), || {
        Ok(bed.active_total()? == 20)
    })
    .with_context(|| format!("counts {:?}", bed.active()))?;
    reset(kept)?;
    wait_for("zero after RSTs", Duration::from_secs(5), || {
        Ok(bed.active_total()? == 0)
    })
    .with_context(|| format!("counts {:?}", bed.active()))?;

    // Ended by expiry: idle past short timeouts, the sweep removes the
    // flows and corrects the counts (the kernel never saw them close).
    let (_, kept) = connections(&bed.topo, 20, true)?;
    wait_for("20 counted", Duration::from_secs(3), || {
        Ok(bed.active_total()? == 20)
    })?;
    bed.reconfigure(&config(
        &bed.pin_dir,
        "least_connections",
        "conntrack:\n  timeouts:\n    tcp_established: 2\n    tcp_closing: 2\n",
    ))?;
    wait_for("zero after expiry", Duration::from_secs(20), || {
        Ok(bed.active_total()? == 0)
    })
    .with_context(|| format!("counts {:?}", bed.active()))?;
    // Their RSTs now find no flow: untracked, not counted.
    reset(kept)?;
    thread::sleep(Duration::from_millis(300));
    ensure!(bed.active_total()? == 0, "counts {:?}", bed.active()?);
    Ok(())
}
