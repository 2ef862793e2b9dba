//! What the LB namespace runs in each mode: nothing but routing (direct),
//! kube-proxy's iptables and nftables DNAT shapes, HAProxy in tcp mode, or
//! Sluice. Each mode is set up on the same topology and torn down again
//! (rules, addresses, processes, conntrack) before the next one starts.

use std::{
    net::{IpAddr, SocketAddr},
    process::{Command, Stdio},
};

use anyhow::{Context, Result};
use sluice_tests::{Agent, Daemon, TempDir};
use testbed::{Family, Topology};

use crate::{
    cpu::{LB_CPU, pin},
    servers::listening,
};

pub const HTTP_PORT: u16 = 80;
pub const UDP_PORT: u16 = 5001;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The client talks to backend 0 itself; the LB namespace only routes.
    Direct,
    /// kube-proxy's iptables mode: `statistic` random DNAT.
    Iptables,
    /// kube-proxy's nftables mode: a verdict map and `numgen` DNAT.
    Nftables,
    /// HAProxy 2.x, `mode tcp`, one thread (TCP only: no UDP).
    Haproxy,
    /// Sluice in this attach mode.
    Sluice(&'static str),
}

impl Mode {
    pub fn label(self) -> String {
        match self {
            Mode::Direct => "direct routing".into(),
            Mode::Iptables => "iptables DNAT".into(),
            Mode::Nftables => "nftables DNAT".into(),
            Mode::Haproxy => "HAProxy (tcp)".into(),
            Mode::Sluice(attach) => format!("Sluice {attach}"),
        }
    }

    /// Where the client sends: backend 0 for direct routing, else the VIP.
    pub fn target(self, port: u16) -> SocketAddr {
        let ip = match self {
            Mode::Direct => Family::V4.backend(0),
            _ => Family::V4.vip(),
        };
        SocketAddr::new(ip, port)
    }

    pub fn serves_udp(self) -> bool {
        self != Mode::Haproxy
    }

    /// Whether the LB namespace must forward as a router. HAProxy ends the
    /// connections itself, and Sluice sets up what it needs: both run with
    /// forwarding off, as the namespace was made.
    fn kernel_forwards(self) -> bool {
        matches!(self, Mode::Direct | Mode::Iptables | Mode::Nftables)
    }
}

/// A mode running in the LB namespace; `stop` (or drop) tears it down.
pub struct Running<'a> {
    topo: &'a Topology,
    mode: Mode,
    agent: Option<Agent>,
    haproxy: Option<Daemon>,
    /// `stop` ran (or the drop did): nothing left to remove.
    torn_down: bool,
}

impl Running<'_> {
    /// The LB's own processes (their CPU is the LB's).
    pub fn processes(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        if let Some(a) = &self.agent {
            pids.push(a.pid());
        }
        if let Some(h) = self.haproxy.as_ref().and_then(Daemon::pid) {
            pids.push(h);
        }
        pids
    }

    /// Stops the processes, removes the rules and the VIP, forgets the
    /// kernel's connection tracking, so the next mode starts clean.
    pub fn stop(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        self.torn_down = true;
        if let Some(mut agent) = self.agent.take() {
            agent.stop()?;
        }
        if let Some(mut h) = self.haproxy.take() {
            h.kill();
        }
        let lb = &self.topo.lb;
        match self.mode {
            Mode::Iptables => {
                lb.exec(&["iptables", "-t", "nat", "-F"])?;
                lb.exec(&["iptables", "-t", "nat", "-X"])?;
            }
            Mode::Nftables => lb.exec(&["nft", "delete", "table", "ip", "e2e"])?,
            Mode::Haproxy => lb.exec(&["ip", "addr", "del", &vip_host(), "dev", "lo"])?,
            _ => {}
        }
        forwarding(self.topo, false)?;
        // Entries of this mode's connections would otherwise meet the next
        // mode's (the same client ports, other translations).
        let _ = Command::new("ip")
            .args(["netns", "exec", &lb.name, "conntrack", "-F"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        Ok(())
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        // Also on a failure mid-mode: the rules and the VIP go too, not
        // only the processes.
        if !self.torn_down {
            let _ = self.teardown();
        }
    }
}

fn vip_host() -> String {
    format!("{}/32", Family::V4.vip())
}

fn forwarding(topo: &Topology, on: bool) -> Result<()> {
    let v = if on { "1" } else { "0" };
    topo.lb
        .exec(&["sysctl", "-qw", &format!("net.ipv4.ip_forward={v}")])
}

/// The VIP of the `i`th of the services configured besides the measured
/// one (`--services`): 10.101.0.1, 10.101.0.2, …
fn other_vip(i: usize) -> IpAddr {
    std::net::Ipv4Addr::new(10, 101, (i / 250) as u8, (i % 250 + 1) as u8).into()
}

/// Starts `mode` in the LB namespace, with the topology's backends behind
/// the VIP and `others` more TCP services configured before it (traffic
/// goes to the VIP only: what the others cost is the lookup). A Sluice
/// attach mode the agent refuses on this device is told apart by the
/// caller, from the log.
pub fn start<'a>(
    topo: &'a Topology,
    mode: Mode,
    others: usize,
    dir: &TempDir,
) -> Result<Running<'a>> {
    let mut running = Running {
        topo,
        mode,
        agent: None,
        haproxy: None,
        torn_down: false,
    };
    forwarding(topo, mode.kernel_forwards())?;
    let backends: Vec<IpAddr> = (0..topo.backends.len())
        .map(|i| Family::V4.backend(i))
        .collect();
    match mode {
        Mode::Direct => {}
        Mode::Iptables => iptables(topo, &backends, others, dir)?,
        Mode::Nftables => nftables(topo, &backends, others, dir)?,
        Mode::Haproxy => running.haproxy = Some(haproxy(topo, &backends, dir)?),
        Mode::Sluice(attach) => {
            let path = dir.path("sluice.yaml");
            std::fs::write(
                &path,
                sluice_config(topo.backends.len(), attach, &backends, others),
            )?;
            let log = dir.path(&format!("agent-{attach}.log"));
            let agent = Agent::start(&topo.lb, &path, log)?;
            pin(agent.pid(), LB_CPU)?;
            running.agent = Some(agent);
        }
    }
    Ok(running)
}

/// kube-proxy's iptables shape: services chain → service chain →
/// `statistic --mode random` to one endpoint chain per backend → DNAT.
fn iptables(topo: &Topology, backends: &[IpAddr], others: usize, dir: &TempDir) -> Result<()> {
    let vip = Family::V4.vip();
    let mut rules = String::from("*nat\n:E2E-SERVICES - [0:0]\n");
    for i in 0..others {
        rules += &format!(":E2E-OTHER-{i} - [0:0]\n");
    }
    for proto in ["tcp", "udp"] {
        rules += &format!(":E2E-SVC-{proto} - [0:0]\n");
        for i in 0..backends.len() {
            rules += &format!(":E2E-SEP-{proto}-{i} - [0:0]\n");
        }
    }
    rules += "-A PREROUTING -j E2E-SERVICES\n";
    // The other services first: a new connection to the VIP passes their
    // rules one by one, as kube-proxy's KUBE-SERVICES chain makes it.
    for i in 0..others {
        rules += &format!(
            "-A E2E-SERVICES -d {}/32 -p tcp --dport {HTTP_PORT} -j E2E-OTHER-{i}\n\
             -A E2E-OTHER-{i} -p tcp -j DNAT --to-destination {}:{HTTP_PORT}\n",
            other_vip(i),
            backends[0]
        );
    }
    for (proto, port) in [("tcp", HTTP_PORT), ("udp", UDP_PORT)] {
        rules +=
            &format!("-A E2E-SERVICES -d {vip}/32 -p {proto} --dport {port} -j E2E-SVC-{proto}\n");
        let n = backends.len();
        for (i, b) in backends.iter().enumerate() {
            // As kube-proxy: endpoint i of n taken with probability
            // 1/(n-i) among those not yet taken, the last one always.
            let pick = if i + 1 < n {
                format!(
                    "-m statistic --mode random --probability {:.11} ",
                    1.0 / (n - i) as f64
                )
            } else {
                String::new()
            };
            rules += &format!("-A E2E-SVC-{proto} {pick}-j E2E-SEP-{proto}-{i}\n");
            rules +=
                &format!("-A E2E-SEP-{proto}-{i} -p {proto} -j DNAT --to-destination {b}:{port}\n");
        }
    }
    rules += "COMMIT\n";
    let path = dir.path("iptables.rules");
    std::fs::write(&path, rules)?;
    let path = path.to_string_lossy().into_owned();
    topo.lb
        .exec(&["iptables-restore", "--noflush", &path])
        .context("loading the iptables DNAT rules (Debian package iptables)")
}

/// kube-proxy's nftables shape: a verdict map on address . protocol .
/// port to the service chain, `numgen random` to an endpoint chain, DNAT.
fn nftables(topo: &Topology, backends: &[IpAddr], others: usize, dir: &TempDir) -> Result<()> {
    let vip = Family::V4.vip();
    let n = backends.len();
    let other_elements: String = (0..others)
        .map(|i| format!(", {} . tcp . {HTTP_PORT} : goto other-{i}", other_vip(i)))
        .collect();
    let mut text = format!(
        "table ip e2e {{\n  map services {{\n    type ipv4_addr . inet_proto . inet_service : verdict\n    \
         elements = {{ {vip} . tcp . {HTTP_PORT} : goto svc-tcp, {vip} . udp . {UDP_PORT} : goto svc-udp{other_elements} }}\n  }}\n  \
         chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
         ip daddr . meta l4proto . th dport vmap @services\n  }}\n"
    );
    for (proto, port) in [("tcp", HTTP_PORT), ("udp", UDP_PORT)] {
        let arms: Vec<String> = (0..n)
            .map(|i| format!("{i} : goto sep-{proto}-{i}"))
            .collect();
        text += &format!(
            "  chain svc-{proto} {{\n    numgen random mod {n} vmap {{ {} }}\n  }}\n",
            arms.join(", ")
        );
        for (i, b) in backends.iter().enumerate() {
            text += &format!(
                "  chain sep-{proto}-{i} {{\n    meta l4proto {proto} dnat to {b}:{port}\n  }}\n"
            );
        }
    }
    for i in 0..others {
        text += &format!(
            "  chain other-{i} {{\n    meta l4proto tcp dnat to {}:{HTTP_PORT}\n  }}\n",
            backends[0]
        );
    }
    text += "}\n";
    let path = dir.path("e2e.nft");
    std::fs::write(&path, text)?;
    let path = path.to_string_lossy().into_owned();
    topo.lb
        .exec(&["nft", "-f", &path])
        .context("loading the nftables DNAT ruleset")
}

/// HAProxy on the VIP (an address of the LB namespace in this mode),
/// round robin over the backends, one thread pinned to the LB's CPU.
fn haproxy(topo: &Topology, backends: &[IpAddr], dir: &TempDir) -> Result<Daemon> {
    topo.lb
        .exec(&["ip", "addr", "add", &vip_host(), "dev", "lo"])?;
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("  server b{i} {b}:{HTTP_PORT}\n"))
        .collect();
    let vip = Family::V4.vip();
    // maxconn ≤ 9000: above that HAProxy wants more file descriptors than
    // the default limit gives it (field notes).
    let config = format!(
        "global\n  maxconn 9000\n  nbthread 1\n\
         defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n\
         frontend web\n  bind {vip}:{HTTP_PORT}\n  default_backend web\n\
         backend web\n  balance roundrobin\n{servers}"
    );
    let path = dir.path("haproxy.cfg");
    std::fs::write(&path, config)?;
    let args = [
        "-db".to_string(),
        "-f".into(),
        path.to_string_lossy().into(),
    ];
    let daemon = Daemon::start(&topo.lb, "haproxy", &args, dir.path("haproxy.log"))?;
    let pid = daemon.pid().context("haproxy exited at once")?;
    listening(&topo.lb, &daemon, "-Hltn", SocketAddr::new(vip, HTTP_PORT))?;
    pin(pid, LB_CPU)?;
    Ok(daemon)
}

fn sluice_config(interfaces: usize, attach: &str, backends: &[IpAddr], others: usize) -> String {
    let mut text = sluice_tests::interfaces_yaml_in(interfaces, Some(attach));
    text += "services:\n";
    for i in 0..others {
        text += &format!(
            "  - name: other-{i}\n    vip: \"{}\"\n    port: {HTTP_PORT}\n    protocol: tcp\n    \
             backends:\n      - address: \"{}:{HTTP_PORT}\"\n",
            other_vip(i),
            backends[0]
        );
    }
    for (name, proto, port) in [("web", "tcp", HTTP_PORT), ("echo", "udp", UDP_PORT)] {
        text += &format!(
            "  - name: {name}\n    vip: \"{}\"\n    port: {port}\n    protocol: {proto}\n    backends:\n",
            Family::V4.vip()
        );
        for b in backends {
            text += &format!("      - address: \"{b}:{port}\"\n");
        }
    }
    text
}
