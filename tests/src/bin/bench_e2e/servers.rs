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
        let conf = dir.path(&format!("nginx-{i}.conf"));
        let log = dir.path(&format!("nginx-{i}.error.log"));
        let pid_file = dir.path(&format!("nginx-{i}.pid"));
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\n\
                 error_log {} warn;\npid {};\n\
                 events {{ worker_connections 16384; }}\n\
                 http {{\n  access_log off;\n  keepalive_requests 100000000;\n  \
                 server {{\n    listen {ip}:{HTTP_PORT} backlog=4096;\n    \
                 location / {{ return 200 \"b{i}\\n\"; }}\n  }}\n}}\n",
                log.display(),
                pid_file.display()
            ),
        )?;
        let args = ["-c".to_string(), conf.to_string_lossy().into()];
        let nginx = Daemon::start(ns, "nginx", &args, dir.path(&format!("nginx-{i}.out")))?;
        listening(ns, &nginx, "-Hltn", SocketAddr::new(ip, HTTP_PORT))?;
        pin(nginx.pid().context("nginx exited at once")?, LOAD_CPU)?;
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
