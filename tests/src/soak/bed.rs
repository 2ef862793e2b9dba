//! The soak's test bed: the client ⇄ LB ⇄ four backends topology, the
//! backends' servers, the services and the config file the soak rewrites,
//! and the dnsmasq whose hosts file it rewrites.
//!
//! Every DNAT service has a backend port of its own: the client's kernel may
//! give one source port to connections towards two VIPs at once, and two
//! DNAT services to the same backend address and port would then make one
//! 4-tuple on the backend.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use testbed::{Family, NameServer, Topology};

use crate::{Bpffs, Daemon, TempDir, start_push_server, wait_for};

pub const BACKENDS: usize = 4;
/// `churn` (TCP), `udp` and `steady-snat` (SNAT: the backend sees the LB's
/// address, so no 4-tuple can meet a DNAT service's) on IPv4; `web6` on IPv6.
const CHURN_PORT: u16 = 8080;
const STEADY_PORT: u16 = 8081;
const DNS_PORT: u16 = 8082;
const PUSH_PORT: u16 = 9090;
/// How often the push servers speak on their own.
pub const PUSH_EVERY: Duration = Duration::from_secs(2);
/// The name the `dns` service resolves (A records from dnsmasq's hosts file).
const DNS_NAME: &str = "web.soak.test";
const DNS_SERVER: &str = "127.0.0.1:5353";

fn vip(last: u8) -> IpAddr {
    Ipv4Addr::new(10, 100, 0, last).into()
}

/// Where each kind of traffic goes.
#[derive(Clone, Copy, Debug)]
pub struct Targets {
    /// `churn`: backends added, removed and reweighted by config churn.
    pub churn: SocketAddr,
    /// `udp`: the same backend set as `churn`, over UDP.
    pub udp: SocketAddr,
    /// `steady`: every backend, only weights churn (its idle connections
    /// must live through the whole soak).
    pub steady: SocketAddr,
    /// `steady-snat`: as `steady`, forwarded with SNAT.
    pub snat: SocketAddr,
    /// `push`: server-first backends, as `steady`.
    pub push: SocketAddr,
    /// `dns`: backends from DNS discovery, churned through dnsmasq.
    pub dns: SocketAddr,
    /// `web6`: IPv6, as `steady`.
    pub v6: SocketAddr,
}

impl Targets {
    pub fn new() -> Self {
        Self {
            churn: SocketAddr::new(vip(1), 80),
            udp: SocketAddr::new(vip(1), 53),
            steady: SocketAddr::new(vip(1), 81),
            snat: SocketAddr::new(vip(2), 80),
            push: SocketAddr::new(vip(1), 90),
            dns: SocketAddr::new(vip(3), 80),
            v6: SocketAddr::new(Family::V6.vip(), 80),
        }
    }
}

impl Default for Targets {
    fn default() -> Self {
        Self::new()
    }
}

/// What config churn changes: the backends of `churn` and `udp` (index →
/// weight, never empty) and the weights of every backend of the steady
/// services (never 0: their idle connections must stay).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Churned {
    pub churn: BTreeMap<usize, u32>,
    pub steady_weights: [u32; BACKENDS],
}

impl Churned {
    pub fn initial() -> Self {
        Self {
            churn: (0..BACKENDS).map(|i| (i, 1)).collect(),
            steady_weights: [1; BACKENDS],
        }
    }
}

/// The API's view of one backend the soak expects: (address, weight).
pub type Expected = BTreeSet<(String, u32)>;

/// `churn`'s backends as the API should list them active.
pub fn expected_churn(c: &Churned) -> Expected {
    c.churn
        .iter()
        .map(|(&i, &w)| (backend(Family::V4, i, CHURN_PORT).to_string(), w))
        .collect()
}

/// `steady`'s backends as the API should list them active.
pub fn expected_steady(c: &Churned) -> Expected {
    (0..BACKENDS)
        .map(|i| {
            (
                backend(Family::V4, i, STEADY_PORT).to_string(),
                c.steady_weights[i],
            )
        })
        .collect()
}

/// `dns`'s backends as the API should list them active (weight 1 each).
pub fn expected_dns(set: &BTreeSet<usize>) -> Expected {
    set.iter()
        .map(|&i| (backend(Family::V4, i, DNS_PORT).to_string(), 1))
        .collect()
}

fn backend(family: Family, i: usize, port: u16) -> SocketAddr {
    SocketAddr::new(family.backend(i), port)
}

/// The config file: every service, pinned under `pin_dir`.
pub fn config_yaml(pin_dir: &Path, c: &Churned) -> String {
    let mut text = crate::interfaces_yaml(BACKENDS);
    text += &format!("pinning:\n  directory: {}\nservices:\n", pin_dir.display());
    let t = Targets::new();
    let weighted = |list: &mut String, family: Family, port: u16, weights: &[(usize, u32)]| {
        *list += "    backends:\n";
        for &(i, w) in weights {
            *list += &format!(
                "      - address: \"{}\"\n        weight: {w}\n",
                backend(family, i, port)
            );
        }
    };
    let churn: Vec<(usize, u32)> = c.churn.iter().map(|(&i, &w)| (i, w)).collect();
    let steady: Vec<(usize, u32)> = c.steady_weights.iter().copied().enumerate().collect();
    let head = |name: &str, vip: SocketAddr, protocol: &str| {
        format!(
            "  - name: {name}\n    vip: \"{}\"\n    port: {}\n    protocol: {protocol}\n",
            vip.ip(),
            vip.port()
        )
    };
    text += &head("churn", t.churn, "tcp");
    weighted(&mut text, Family::V4, CHURN_PORT, &churn);
    text += &head("udp", t.udp, "udp");
    weighted(&mut text, Family::V4, CHURN_PORT, &churn);
    text += &head("steady", t.steady, "tcp");
    weighted(&mut text, Family::V4, STEADY_PORT, &steady);
    text += &head("steady-snat", t.snat, "tcp");
    text += &format!(
        "    forwarding: snat\n    snat_ip: \"{}\"\n",
        Family::V4.snat()
    );
    weighted(&mut text, Family::V4, CHURN_PORT, &steady);
    text += &head("push", t.push, "tcp");
    weighted(&mut text, Family::V4, PUSH_PORT, &steady);
    text += &head("web6", t.v6, "tcp");
    weighted(&mut text, Family::V6, CHURN_PORT, &steady);
    text += &head("dns", t.dns, "tcp");
    text += &format!(
        "    discovery:\n      dns:\n        name: {DNS_NAME}\n        type: a\n        port: {DNS_PORT}\n        server: {DNS_SERVER}\n        min_interval_seconds: 1\n"
    );
    text
}

/// dnsmasq's hosts file: one A record of `DNS_NAME` per backend in `set`.
pub fn hosts_file(set: &BTreeSet<usize>) -> String {
    set.iter()
        .map(|&i| format!("{} {DNS_NAME}\n", Family::V4.backend(i)))
        .collect()
}

/// Writes `text` to `path` as a config manager would: a new file renamed
/// into place, so no reader ever sees half of it.
pub fn replace_file(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Everything the soak runs on. Fields drop in order: the servers and
/// dnsmasq go before the pins' bpffs, and the namespaces last.
pub struct Bed {
    pub dns: Daemon,
    /// Held for their Drop: the servers stop, the bpffs is unmounted.
    _servers: Vec<NameServer>,
    _bpffs: Bpffs,
    pub dir: TempDir,
    pub topo: Topology,
    pub config: PathBuf,
    pub hosts: PathBuf,
    pub pin_dir: PathBuf,
}

impl Bed {
    /// Builds the topology, starts every backend's servers (their threads
    /// end with `stop`), mounts a private bpffs, writes the first config and
    /// hosts file, and starts dnsmasq.
    pub fn new(
        c: &Churned,
        dns_set: &BTreeSet<usize>,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<Self> {
        let topo = Topology::new("sk", BACKENDS)?;
        let mut servers = Vec::new();
        for (i, ns) in topo.backends.iter().enumerate() {
            let name = format!("b{i}");
            for (family, port) in [
                (Family::V4, CHURN_PORT),
                (Family::V4, STEADY_PORT),
                (Family::V4, DNS_PORT),
                (Family::V6, CHURN_PORT),
            ] {
                servers.push(NameServer::start(ns, backend(family, i, port), &name)?);
            }
            start_push_server(
                ns,
                backend(Family::V4, i, PUSH_PORT),
                PUSH_EVERY,
                stop.clone(),
            )?;
        }
        topo.warm_neighbours()?;
        crate::flood::route_sources(&topo)?;
        let dir = TempDir::new("soak")?;
        let bpffs = Bpffs::mount_with(&dir, &["mode=0700"])?;
        let pin_dir = bpffs.0.join("soak");
        let config = dir.path("sluice.yaml");
        replace_file(&config, &config_yaml(&pin_dir, c))?;
        let hosts = dir.path("hosts");
        replace_file(&hosts, &hosts_file(dns_set))?;
        let dns = start_dnsmasq(&topo, &dir, &hosts)?;
        Ok(Self {
            dns,
            _servers: servers,
            _bpffs: bpffs,
            dir,
            topo,
            config,
            hosts,
            pin_dir,
        })
    }
}

/// dnsmasq in the LB's namespace on `DNS_SERVER`, answering `DNS_NAME` from
/// `hosts` (read again on SIGHUP) with a 2 s TTL, authoritative for
/// `soak.test`.
fn start_dnsmasq(topo: &Topology, dir: &TempDir, hosts: &Path) -> Result<Daemon> {
    let (address, port) = DNS_SERVER.split_once(':').expect("address:port");
    let args: Vec<String> = vec![
        "--keep-in-foreground".into(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        "--no-poll".into(),
        "--user=root".into(),
        format!("--port={port}"),
        format!("--listen-address={address}"),
        "--bind-interfaces".into(),
        "--local-ttl=2".into(),
        "--local=/soak.test/".into(),
        "--log-facility=-".into(),
        "--pid-file=".into(),
        format!("--addn-hosts={}", hosts.display()),
    ];
    let d = Daemon::start(&topo.lb, "dnsmasq", &args, dir.path("dnsmasq.log"))?;
    wait_for("dnsmasq to answer", Duration::from_secs(10), || {
        Ok(std::process::Command::new("ip")
            .args(["netns", "exec", &topo.lb.name])
            .args(["dig", "+short", "+time=1", "+tries=1", "-p", port])
            .args([&format!("@{address}"), DNS_NAME, "A"])
            .output()
            .is_ok_and(|o| o.status.success() && !o.stdout.is_empty()))
    })
    .with_context(|| d.log_text())?;
    Ok(d)
}
