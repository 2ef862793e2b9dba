//! The backends' servers: nginx answering HTTP with a few bytes (one
//! process, keep-alive without a request limit) and a sockperf UDP server,
//! in every backend's namespace, pinned to the load CPU.

use std::{net::SocketAddr, process::Command, time::Duration};

use anyhow::{Context, Result};
use sluice_tests::{Daemon, TempDir, wait_for};
use testbed::{Family, Netns, Topology};

use crate::{
    cpu::{LOAD_CPU, pin},
    modes::{HTTP_PORT, UDP_PORT},
};

pub struct Servers {
    _daemons: Vec<Daemon>,
}

pub fn start(topo: &Topology, dir: &TempDir) -> Result<Servers> {
    let mut daemons = Vec::new();
    for (i, ns) in topo.backends.iter().enumerate() {
        let ip = Family::V4.backend(i);
        let server = format!(
            "listen {ip}:{HTTP_PORT} backlog=4096;\n    location / {{ return 200 \"b{i}\\n\"; }}"
        );
        let nginx = nginx(
            ns,
            dir,
            &format!("nginx-{i}"),
            &server,
            SocketAddr::new(ip, HTTP_PORT),
        )?;
        daemons.push(nginx);

        let args: Vec<String> = ["server", "-i", &ip.to_string(), "-p", &UDP_PORT.to_string()]
            .map(String::from)
            .to_vec();
        let udp = Daemon::start(
            ns,
            "sockperf",
            &args,
            dir.path(&format!("sockperf-{i}.log")),
        )?;
        listening(ns, &udp, "-Hlun", SocketAddr::new(ip, UDP_PORT))?;
        pin(udp.pid().context("sockperf exited at once")?, LOAD_CPU)?;
        daemons.push(udp);
    }
    Ok(Servers { _daemons: daemons })
}

/// One nginx process in `ns` (its files in `dir`, named `name`): keep-alive
/// without a request limit, `server` the body of its one server block. It
/// is pinned to the load CPU once it listens on `listen`.
pub fn nginx(
    ns: &Netns,
    dir: &TempDir,
    name: &str,
    server: &str,
    listen: SocketAddr,
) -> Result<Daemon> {
    let conf = dir.path(&format!("{name}.conf"));
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\n\
             error_log {} warn;\npid {};\n\
             events {{ worker_connections 16384; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 100000000;\n  \
             server {{\n    {server}\n  }}\n}}\n",
            dir.path(&format!("{name}.error.log")).display(),
            dir.path(&format!("{name}.pid")).display(),
        ),
    )?;
    let args = ["-c".to_string(), conf.to_string_lossy().into()];
    let daemon = Daemon::start(ns, "nginx", &args, dir.path(&format!("{name}.out")))?;
    listening(ns, &daemon, "-Hltn", listen)?;
    pin(daemon.pid().context("nginx exited at once")?, LOAD_CPU)?;
    Ok(daemon)
}

/// Waits until `server` listens on `addr` in `ns` (`flags`: ss's, e.g.
/// `-Hltn` for TCP).
pub fn listening(ns: &Netns, server: &Daemon, flags: &str, addr: SocketAddr) -> Result<()> {
    let filter = format!("src = {addr}");
    wait_for(
        &format!("{} listening on {addr}", server.what),
        Duration::from_secs(5),
        || {
            let out = Command::new("ip")
                .args(["netns", "exec", &ns.name, "ss", flags, &filter])
                .output()
                .context("running ss (Debian package iproute2)")?;
            Ok(out.status.success() && !out.stdout.is_empty())
        },
    )
    .with_context(|| format!("{} log:\n{}", server.what, server.log_text()))
}
