//! The DSR row: a response-heavy workload (keep-alive requests for a
//! 100 KB response from nginx) through Sluice with direct server return,
//! L2 and tunnelled (IPIP, unwrapped by `sluice backend-decap`), against
//! Sluice dnat, interleaved round by round.
//!
//! DSR needs client, LB and backends on one L2 segment (`testbed::Segment`):
//! the backends answer the client directly, with the VIP (on their
//! loopback) as source. For dnat the LB must be on the replies' path: while
//! that mode runs, each backend routes the client's address via the LB
//! (what a dnat deployment's backends do through their default gateway).
//! The LB's CPU is read as in the main table (see cpu.rs).

use std::{net::SocketAddr, path::PathBuf, process::Child};

use anyhow::{Context, Result, bail, ensure};
use sluice_tests::{Agent, Daemon, TempDir, sluice_bin, wait_for};
use testbed::{Family, Netns, Segment};

use crate::{
    Args, Measured,
    cpu::{self, LB_CPU, LOAD_CPU, pin},
    load::{self, Http},
    median, metered, ratio_text, servers,
};

const PORT: u16 = 80;
/// The response body's size.
const BODY_BYTES: usize = 100 * 1024;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum DsrMode {
    Dnat,
    L2,
    Ipip,
}

impl DsrMode {
    fn label(self) -> &'static str {
        match self {
            DsrMode::Dnat => "Sluice dnat",
            DsrMode::L2 => "Sluice DSR (L2)",
            DsrMode::Ipip => "Sluice DSR (IPIP)",
        }
    }
}

struct Row {
    mode: DsrMode,
    rounds: Vec<Measured<Http>>,
}

/// Runs the DSR comparison and prints its table.
pub fn run(args: &Args) -> Result<()> {
    let seg = Segment::new("bd", 2)?;
    let dir = TempDir::new("bd")?;
    seg.client
        .exec(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"])?;
    cpu::rps(&seg.lb, LB_CPU)?;
    for ns in [&seg.client, &seg.switch].into_iter().chain(&seg.backends) {
        cpu::rps(ns, LOAD_CPU)?;
    }
    let _nginx = nginx(&seg, &dir)?;
    seg.warm_neighbours()?;
    let mut rows: Vec<Row> = [DsrMode::Dnat, DsrMode::L2, DsrMode::Ipip]
        .into_iter()
        .map(|mode| Row {
            mode,
            rounds: Vec::new(),
        })
        .collect();
    for round in 0..args.rounds {
        for row in &mut rows {
            eprintln!("round {}/{}: {}", round + 1, args.rounds, row.mode.label());
            let m = measure(&seg, &dir, row.mode, args).with_context(|| row.mode.label())?;
            row.rounds.push(m);
        }
    }
    report(&rows, args);
    Ok(())
}

/// nginx on every backend, on port 80 of all its addresses (its own, for
/// dnat; the VIP on its loopback, for DSR), answering `/` with 100 KB.
fn nginx(seg: &Segment, dir: &TempDir) -> Result<Vec<Daemon>> {
    let mut daemons = Vec::new();
    for (i, ns) in seg.backends.iter().enumerate() {
        let root = dir.path(&format!("www-{i}"));
        std::fs::create_dir_all(&root)?;
        std::fs::write(root.join("index.html"), vec![b'x'; BODY_BYTES])?;
        let server = format!(
            "listen {PORT} backlog=4096;\n    listen [::]:{PORT} backlog=4096;\n    root {};",
            root.display()
        );
        let d = servers::nginx(
            ns,
            dir,
            &format!("dsr-nginx-{i}"),
            &server,
            SocketAddr::new("0.0.0.0".parse()?, PORT),
        )?;
        daemons.push(d);
    }
    Ok(daemons)
}

fn config(seg: &Segment, mode: DsrMode) -> String {
    let f = Family::V4;
    let mut text = format!(
        "interfaces:\n  - name: eth0\nservices:\n  - name: web\n    vip: \"{}\"\n    port: {PORT}\n    protocol: tcp\n",
        f.segment_vip()
    );
    text += match mode {
        DsrMode::Dnat => String::new(),
        DsrMode::L2 => "    forwarding: dsr\n".into(),
        DsrMode::Ipip => format!(
            "    forwarding: dsr\n    dsr: {{encapsulation: ipip}}\n    snat_ip: \"{}\"\n",
            f.segment_lb()
        ),
    }
    .as_str();
    text += "    backends:\n";
    for i in 0..seg.backends.len() {
        text += &format!("      - address: \"{}:{PORT}\"\n", f.segment_backend(i));
    }
    text
}

/// What one mode needs besides the agent, undone on drop: the dnat
/// backends' route to the client via the LB, the IPIP backends' decap.
struct Extras<'a> {
    seg: &'a Segment,
    routes: bool,
    decaps: Vec<Child>,
}

impl Drop for Extras<'_> {
    fn drop(&mut self) {
        for mut d in self.decaps.drain(..) {
            // SAFETY: signalling the child started here, by its PID: it
            // detaches on SIGTERM.
            unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
            let _ = d.wait();
        }
        if self.routes {
            let client = format!("{}/32", Family::V4.segment_client());
            for b in &self.seg.backends {
                let _ = b.exec(&["ip", "route", "del", &client]);
            }
        }
    }
}

fn extras<'a>(seg: &'a Segment, dir: &TempDir, mode: DsrMode) -> Result<Extras<'a>> {
    let mut e = Extras {
        seg,
        routes: false,
        decaps: Vec::new(),
    };
    match mode {
        DsrMode::Dnat => {
            let client = format!("{}/32", Family::V4.segment_client());
            let lb = Family::V4.segment_lb().to_string();
            e.routes = true;
            for b in &seg.backends {
                b.exec(&["ip", "route", "add", &client, "via", &lb])?;
            }
        }
        DsrMode::L2 => {}
        DsrMode::Ipip => {
            for (i, b) in seg.backends.iter().enumerate() {
                e.decaps
                    .push(decap(b, dir.path(&format!("decap-{i}.log")))?);
            }
        }
    }
    Ok(e)
}

fn decap(ns: &Netns, log: PathBuf) -> Result<Child> {
    let out = std::fs::File::create(&log)?;
    let vip = Family::V4.segment_vip().to_string();
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(sluice_bin())
        .args(["backend-decap", "--interface", "eth0", "--vip", &vip])
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("starting sluice backend-decap")?;
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    let attached = wait_for(
        "backend-decap to attach",
        std::time::Duration::from_secs(20),
        || {
            if let Some(status) = child.try_wait()? {
                bail!("backend-decap exited with {status}: {}", text());
            }
            Ok(text().contains("attached"))
        },
    );
    if let Err(e) = attached {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    Ok(child)
}

fn measure(seg: &Segment, dir: &TempDir, mode: DsrMode, args: &Args) -> Result<Measured<Http>> {
    let background = cpu::background(1.0)?;
    let _extras = extras(seg, dir, mode)?;
    let path = dir.path("dsr-sluice.yaml");
    std::fs::write(&path, config(seg, mode))?;
    let mut agent = Agent::start(&seg.lb, &path, dir.path(&format!("dsr-agent-{mode:?}.log")))?;
    pin(agent.pid(), LB_CPU)?;
    let target = SocketAddr::new(Family::V4.segment_vip(), PORT);
    load::wrk(&seg.client, target, false, 1, args.connections)?;
    let m = metered(
        &[agent.pid()],
        background,
        |h: &Http| h.requests,
        || load::wrk(&seg.client, target, false, args.seconds, args.connections),
    )?;
    agent.stop()?;
    ensure!(
        m.load.requests > 0,
        "{}: no request completed",
        mode.label()
    );
    Ok(m)
}

fn report(rows: &[Row], args: &Args) {
    println!(
        "\nDSR: client, LB and 2 nginx backends on one bridge; keep-alive GET of a {} KB \
         response, wrk -t1 -c{} for {} s; {} interleaved rounds; × dnat: the same round's \
         ratio, median (min–max)\n",
        BODY_BYTES / 1024,
        args.connections,
        args.seconds,
        args.rounds
    );
    println!(
        "{:<20} {:>10} {:>8} {:>8} {:>7} {:>7} {:>20} {:>20}",
        "mode", "req/s", "p50 ms", "p99 ms", "LB µs", "errors", "× dnat rate", "× dnat LB CPU"
    );
    let base = &rows[0];
    for row in rows {
        let m = |f: fn(&Measured<Http>) -> f64| median(row.rounds.iter().map(f));
        let ratio = |f: fn(&Measured<Http>) -> f64| -> Vec<f64> {
            row.rounds
                .iter()
                .zip(&base.rounds)
                .map(|(r, b)| f(r) / f(b))
                .collect()
        };
        let errors: u64 = row.rounds.iter().map(|r| r.load.errors).sum();
        println!(
            "{:<20} {:>10.0} {:>8.3} {:>8.3} {:>7.1} {:>7} {:>20} {:>20}",
            row.mode.label(),
            m(|x| x.load.per_second),
            m(|x| x.load.p50_ms),
            m(|x| x.load.p99_ms),
            m(|x| x.lb_us_per_request),
            errors,
            ratio_text(&ratio(|x| x.load.per_second)),
            ratio_text(&ratio(|x| x.lb_us_per_request)),
        );
    }
}
