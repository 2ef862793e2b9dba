//! The YAML config file (see README "Configuration" and shared/contract.md).
//!
//! Parsing is in two steps: serde reads the raw shape (unknown fields are
//! refused, so a typo never silently means a default), then `validate` checks
//! what serde can't and resolves addresses. Every error names the field and
//! the value.

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config file {path}: {field}: invalid value {value:?}: {why}")]
    Invalid {
        path: String,
        field: String,
        value: String,
        why: String,
    },
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Interfaces where VIP traffic or backend replies arrive.
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub conntrack: Conntrack,
    #[serde(default)]
    pub maglev: Maglev,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub services: Vec<Service>,
    /// Pin the datapath under bpffs so it outlives the agent (see README
    /// "Hitless restarts and upgrades"). Absent: everything detaches on exit.
    #[serde(default)]
    pub pinning: Option<Pinning>,
    /// Services and backends from a Kubernetes API server (see README
    /// "Kubernetes").
    #[serde(default)]
    pub kubernetes: Option<Kubernetes>,
    /// Socket-level balancing for processes on this host (see README
    /// "Node-local clients").
    #[serde(default)]
    pub socket_lb: Option<SocketLb>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SocketLb {
    /// The cgroup (v2 directory) whose processes' sockets are balanced;
    /// its whole subtree is covered. The root (/sys/fs/cgroup) covers every
    /// pod and host process.
    pub cgroup: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Kubernetes {
    /// The API server's URL; default: the pod's service account, else
    /// KUBECONFIG or ~/.kube/config.
    #[serde(default)]
    pub api_server: Option<String>,
    /// Watch one namespace only; default: all.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Label selector of the Services Sluice takes over (the opt-in).
    #[serde(default = "default_service_selector")]
    pub service_selector: String,
    /// Which of a Service's addresses become VIPs.
    #[serde(default = "default_kube_addresses")]
    pub addresses: Vec<KubeAddress>,
    /// Failure handling of the Kubernetes services.
    #[serde(default)]
    pub failure: Failure,
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout_seconds: u32,
    /// This node's name, for Services whose traffic policy is `Local`;
    /// default: the `NODE_NAME` environment variable (the DaemonSet sets it
    /// from the downward API).
    #[serde(default)]
    pub node_name: Option<String>,
    /// This node's zone (its `topology.kubernetes.io/zone` label), for
    /// topology-aware routing by EndpointSlice hints; default: the
    /// `NODE_ZONE` environment variable. Without it, zone hints are ignored.
    #[serde(default)]
    pub zone: Option<String>,
}

impl Kubernetes {
    /// Where this node is, from the config or the environment.
    pub fn locality(&self) -> (Option<String>, Option<String>) {
        let from_env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        (
            self.node_name.clone().or_else(|| from_env("NODE_NAME")),
            self.zone.clone().or_else(|| from_env("NODE_ZONE")),
        )
    }
}

fn default_service_selector() -> String {
    "sluice.io/enabled=true".into()
}

fn default_kube_addresses() -> Vec<KubeAddress> {
    vec![KubeAddress::ClusterIp]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KubeAddress {
    ClusterIp,
    ExternalIps,
    LoadBalancer,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Pinning {
    /// One directory per agent instance, on bpffs
    /// (e.g. /sys/fs/bpf/sluice/NODE).
    pub directory: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    pub name: String,
    #[serde(default)]
    pub attach: AttachMode,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttachMode {
    /// XDP native, then XDP generic, then TC.
    #[default]
    Auto,
    XdpNative,
    XdpGeneric,
    Tc,
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::XdpNative => "xdp-native",
            Self::XdpGeneric => "xdp-generic",
            Self::Tc => "tc",
        })
    }
}

/// Longest conntrack idle timeout accepted, in seconds (30 days).
const MAX_CONNTRACK_TIMEOUT: u32 = 2_592_000;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Conntrack {
    /// Capacity of the conntrack LRU map. Each connection takes two entries
    /// (forward and reply direction).
    pub max_entries: u32,
    /// How long a flow may stay idle in each state before the agent's sweep
    /// removes it (both entries; an SNAT flow's port returns to the pool).
    pub timeouts: ConntrackTimeouts,
}

impl Default for Conntrack {
    fn default() -> Self {
        Self {
            max_entries: 262_144,
            timeouts: ConntrackTimeouts::default(),
        }
    }
}

/// Idle timeouts by flow state, in seconds. The defaults follow the
/// kernel's conntrack and Cilium: long for established TCP, short for a
/// closed connection (the 5-tuple's TIME_WAIT is the endpoints' business).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConntrackTimeouts {
    /// A SYN forwarded, no SYN-ACK yet (kernel: 120; Cilium: 60).
    pub tcp_syn_sent: u32,
    /// An established connection with no packets (Cilium: 21600, 6 h).
    pub tcp_established: u32,
    /// One side sent a FIN, the other not yet (kernel fin_wait/close_wait: 120/60).
    pub tcp_closing: u32,
    /// Both sides sent a FIN, or a RST: TIME_WAIT (Cilium: 10).
    pub tcp_time_wait: u32,
    /// A UDP flow with no datagrams either way (kernel: 30 unanswered, 120 stream).
    pub udp: u32,
}

impl Default for ConntrackTimeouts {
    fn default() -> Self {
        Self {
            tcp_syn_sent: 60,
            tcp_established: 21_600,
            tcp_closing: 60,
            tcp_time_wait: 10,
            udp: 60,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Maglev {
    /// Slots per service lookup table; a prime, at least 100× the largest
    /// backend count for even shares.
    pub table_size: u32,
}

impl Default for Maglev {
    fn default() -> Self {
        Self { table_size: 16_381 }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Service slots the kernel maps are sized for (fixed while running).
    pub max_services: u32,
    /// Backend slots, over all services (fixed while running).
    pub max_backends: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_services: 64,
            max_backends: 4096,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => agent_common::PROTO_TCP,
            Self::Udp => agent_common::PROTO_UDP,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// Destination NAT only: the LB is on the backends' return path.
    #[default]
    Dnat,
    /// Full NAT: backends see `snat_ip` as the source.
    Snat,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub vip: String,
    pub port: u16,
    pub protocol: Protocol,
    #[serde(default)]
    pub forwarding: Forwarding,
    #[serde(default)]
    pub snat_ip: Option<String>,
    #[serde(default)]
    pub backends: Vec<BackendSpec>,
    #[serde(default)]
    pub failure: Failure,
    /// Where the backends come from when not listed in `backends`.
    #[serde(default)]
    pub discovery: Option<Discovery>,
    /// How long a removed backend keeps its established connections.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout_seconds: u32,
}

fn default_drain_timeout() -> u32 {
    60
}

/// A discovery source for one service's backends (exactly one of them).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Discovery {
    #[serde(default)]
    pub dns: Option<DnsDiscovery>,
    #[serde(default)]
    pub etcd: Option<EtcdDiscovery>,
    /// Apply an update that leaves the service with no backend. Off by
    /// default: such an update is held back and logged, the last set serves.
    #[serde(default)]
    pub allow_empty: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DnsRecord {
    /// SRV records: target, port and weight from DNS.
    #[default]
    Srv,
    /// A records (IPv4 services), with the configured port.
    A,
    /// AAAA records (IPv6 services), with the configured port.
    Aaaa,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DnsDiscovery {
    pub name: String,
    #[serde(default, rename = "type")]
    pub record: DnsRecord,
    /// The backends' port with `type: a` or `aaaa`.
    #[serde(default)]
    pub port: Option<u16>,
    /// A name server (`IP` or `IP:PORT`); default: the system's resolv.conf.
    #[serde(default)]
    pub server: Option<String>,
    /// Re-resolved when the answer's TTL expires, but never more often
    /// than this (nor after a failure)...
    #[serde(default = "default_dns_min_interval")]
    pub min_interval_seconds: u32,
    /// ...and never less often than this.
    #[serde(default = "default_dns_max_interval")]
    pub max_interval_seconds: u32,
}

fn default_dns_min_interval() -> u32 {
    5
}
fn default_dns_max_interval() -> u32 {
    300
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdDiscovery {
    /// etcd v3 client URLs (`http://host:2379`), tried in turn.
    pub endpoints: Vec<String>,
    /// Every key under this prefix is one backend (value: JSON, see README).
    pub prefix: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    pub address: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// Failure handling: the kernel counts failures from the traffic and ejects;
/// the agent readmits. See README "Failure handling".
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Failure {
    /// Ejected after this many failed connects in a row.
    pub consecutive_failures: u32,
    /// Base ejection time; doubles on each repeated ejection.
    pub ejection_seconds: u32,
    /// Cap of the doubled ejection time.
    pub max_ejection_seconds: u32,
    /// Never eject more than this share of a service's backends.
    pub max_ejected_percent: u32,
    /// A refused or unanswered SYN is retried on another backend.
    pub retry_on_refused: bool,
    /// A client SYN retransmitted this long after the forwarded one, with no
    /// answer from the backend, is a timeout failure.
    pub connect_timeout_ms: u32,
    /// Readmit (TCP) only after a TCP connect to the backend succeeds.
    pub probe: bool,
}

impl Default for Failure {
    fn default() -> Self {
        Self {
            consecutive_failures: 3,
            ejection_seconds: 10,
            max_ejection_seconds: 300,
            max_ejected_percent: 50,
            retry_on_refused: true,
            connect_timeout_ms: 500,
            probe: true,
        }
    }
}

/// A service after validation, addresses parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub snat_ip: Option<IpAddr>,
    pub backends: Vec<(SocketAddr, u32)>,
    pub failure: Failure,
    /// None: the backends are the file's.
    pub discovery: Option<DiscoverySpec>,
    pub drain_timeout: std::time::Duration,
}

/// A discovery source after validation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    Dns {
        name: String,
        record: DnsRecord,
        port: Option<u16>,
        server: Option<SocketAddr>,
        min_interval: std::time::Duration,
        max_interval: std::time::Duration,
    },
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
    },
}

impl Source {
    /// A short name for logs, metrics and the API: `dns` or `etcd`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Dns { .. } => "dns",
            Self::Etcd { .. } => "etcd",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DiscoverySpec {
    pub source: Source,
    pub allow_empty: bool,
}

/// A config after validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    pub raw: Config,
    pub services: Vec<ServiceSpec>,
}

/// The largest weight accepted; keeps Maglev's round count bounded.
pub const MAX_WEIGHT: u32 = 1000;

pub fn load(path: &Path) -> Result<Validated, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

pub fn parse(text: &str, path: &str) -> Result<Validated, ConfigError> {
    let raw: Config = serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_string(),
        message: e.to_string(),
    })?;
    validate(raw, path)
}

fn validate(raw: Config, path: &str) -> Result<Validated, ConfigError> {
    let invalid = |field: String, value: &dyn fmt::Display, why: &str| ConfigError::Invalid {
        path: path.to_string(),
        field,
        value: value.to_string(),
        why: why.to_string(),
    };

    if raw.interfaces.is_empty() {
        return Err(invalid(
            "interfaces".into(),
            &"[]",
            "at least one interface is needed",
        ));
    }
    let mut names = HashSet::new();
    for (i, iface) in raw.interfaces.iter().enumerate() {
        if iface.name.is_empty() || iface.name.len() > 15 || iface.name.contains('/') {
            return Err(invalid(
                format!("interfaces[{i}].name"),
                &iface.name,
                "not a Linux interface name (1 to 15 characters, no '/')",
            ));
        }
        if !names.insert(&iface.name) {
            return Err(invalid(
                format!("interfaces[{i}].name"),
                &iface.name,
                "listed twice",
            ));
        }
    }
    if let Some(p) = &raw.pinning
        && (!p.directory.starts_with('/') || p.directory.len() < 2)
    {
        return Err(invalid(
            "pinning.directory".into(),
            &p.directory,
            "must be an absolute path on bpffs (e.g. /sys/fs/bpf/sluice/node-1)",
        ));
    }
    if let Some(k) = &raw.kubernetes {
        if let Some(url) = &k.api_server
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(invalid(
                "kubernetes.api_server".into(),
                url,
                "expected an http:// or https:// URL",
            ));
        }
        if k.service_selector.trim().is_empty() {
            return Err(invalid(
                "kubernetes.service_selector".into(),
                &"\"\"",
                "an empty selector would take over every Service: name a label (e.g. sluice.io/enabled=true)",
            ));
        }
        if k.addresses.is_empty() {
            return Err(invalid(
                "kubernetes.addresses".into(),
                &"[]",
                "name at least one of cluster_ip, external_ips, load_balancer",
            ));
        }
        validate_failure(&k.failure, &|name| format!("kubernetes.failure.{name}"))
            .map_err(|(f, value, why)| invalid(f, &value, &why))?;
        if k.drain_timeout_seconds > 86_400 {
            return Err(invalid(
                "kubernetes.drain_timeout_seconds".into(),
                &k.drain_timeout_seconds,
                "must be 0 to 86400",
            ));
        }
    }
    if raw.conntrack.max_entries < 1024 {
        return Err(invalid(
            "conntrack.max_entries".into(),
            &raw.conntrack.max_entries,
            "must be at least 1024",
        ));
    }
    let t = &raw.conntrack.timeouts;
    for (name, value) in [
        ("tcp_syn_sent", t.tcp_syn_sent),
        ("tcp_established", t.tcp_established),
        ("tcp_closing", t.tcp_closing),
        ("tcp_time_wait", t.tcp_time_wait),
        ("udp", t.udp),
    ] {
        if !(1..=MAX_CONNTRACK_TIMEOUT).contains(&value) {
            return Err(invalid(
                format!("conntrack.timeouts.{name}"),
                &value,
                "must be 1 to 2592000 seconds (30 days)",
            ));
        }
    }
    let m = raw.maglev.table_size;
    if !(251..=1_000_003).contains(&m) || !is_prime(m) {
        return Err(invalid(
            "maglev.table_size".into(),
            &m,
            "must be a prime between 251 and 1000003 (e.g. 16381 or 65537)",
        ));
    }
    if raw.limits.max_services == 0 || raw.limits.max_services > 65_536 {
        return Err(invalid(
            "limits.max_services".into(),
            &raw.limits.max_services,
            "must be between 1 and 65536",
        ));
    }
    let table_slots = u64::from(raw.limits.max_services) * 2 * u64::from(m);
    if table_slots > u64::from(u32::MAX / 4) {
        return Err(invalid(
            "limits.max_services".into(),
            &raw.limits.max_services,
            "times 2 × maglev.table_size exceeds the kernel's array size limit",
        ));
    }
    if raw.limits.max_backends == 0 || raw.limits.max_backends > 1 << 20 {
        return Err(invalid(
            "limits.max_backends".into(),
            &raw.limits.max_backends,
            "must be between 1 and 1048576",
        ));
    }
    if raw.services.len() > raw.limits.max_services as usize {
        return Err(invalid(
            "services".into(),
            &format!("{} services", raw.services.len()),
            &format!(
                "more than limits.max_services ({})",
                raw.limits.max_services
            ),
        ));
    }

    let mut services = Vec::with_capacity(raw.services.len());
    let mut service_names = HashSet::new();
    let mut frontends = HashSet::new();
    let mut backend_total = 0usize;
    for (i, s) in raw.services.iter().enumerate() {
        let field = |name: &str| format!("services[{i}].{name}");
        if s.name.is_empty()
            || !s
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(invalid(
                field("name"),
                &s.name,
                "use letters, digits, '-', '_' and '.'",
            ));
        }
        if !service_names.insert(s.name.clone()) {
            return Err(invalid(
                field("name"),
                &s.name,
                "two services have this name",
            ));
        }
        let vip: IpAddr = s
            .vip
            .parse()
            .map_err(|_| invalid(field("vip"), &s.vip, "not an IPv4 or IPv6 address"))?;
        if vip.is_unspecified() || vip.is_multicast() {
            return Err(invalid(field("vip"), &s.vip, "must be a unicast address"));
        }
        if s.port == 0 {
            return Err(invalid(field("port"), &s.port, "must be 1 to 65535"));
        }
        if !frontends.insert((vip, s.port, s.protocol)) {
            return Err(invalid(
                field("vip"),
                &s.vip,
                "another service has the same VIP, port and protocol",
            ));
        }
        let snat_ip = match (s.forwarding, &s.snat_ip) {
            (Forwarding::Snat, None) => {
                return Err(invalid(
                    field("snat_ip"),
                    &"(missing)",
                    "required with forwarding: snat",
                ));
            }
            (Forwarding::Snat, Some(text)) => {
                let ip: IpAddr = text
                    .parse()
                    .map_err(|_| invalid(field("snat_ip"), text, "not an IP address"))?;
                if ip.is_ipv4() != vip.is_ipv4() {
                    return Err(invalid(
                        field("snat_ip"),
                        text,
                        "must be of the same family as the VIP",
                    ));
                }
                Some(ip)
            }
            (Forwarding::Dnat, Some(text)) => {
                return Err(invalid(
                    field("snat_ip"),
                    text,
                    "only used with forwarding: snat",
                ));
            }
            (Forwarding::Dnat, None) => None,
        };
        let mut backends = Vec::with_capacity(s.backends.len());
        let mut seen = HashSet::new();
        for (j, b) in s.backends.iter().enumerate() {
            let bfield = |name: &str| format!("services[{i}].backends[{j}].{name}");
            let addr: SocketAddr = b.address.parse().map_err(|_| {
                invalid(
                    bfield("address"),
                    &b.address,
                    "expected IP:PORT, or [IPv6]:PORT",
                )
            })?;
            if addr.is_ipv4() != vip.is_ipv4() {
                return Err(invalid(
                    bfield("address"),
                    &b.address,
                    "must be of the same family as the service's VIP",
                ));
            }
            if addr.port() == 0 || addr.ip().is_unspecified() || addr.ip().is_multicast() {
                return Err(invalid(
                    bfield("address"),
                    &b.address,
                    "needs a unicast address and a non-zero port",
                ));
            }
            if !seen.insert(addr) {
                return Err(invalid(bfield("address"), &b.address, "listed twice"));
            }
            if b.weight > MAX_WEIGHT {
                return Err(invalid(
                    bfield("weight"),
                    &b.weight,
                    &format!("must be 0 (drain) to {MAX_WEIGHT}"),
                ));
            }
            backends.push((addr, b.weight));
        }
        backend_total += backends.len();
        validate_failure(&s.failure, &|name| field(&format!("failure.{name}")))
            .map_err(|(f, value, why)| invalid(f, &value, &why))?;
        let discovery = match &s.discovery {
            None => None,
            Some(d) => Some(
                validate_discovery(d, vip, !s.backends.is_empty(), &|name| {
                    if name.is_empty() {
                        field("discovery")
                    } else {
                        field(&format!("discovery.{name}"))
                    }
                })
                .map_err(|(f, value, why)| invalid(f, &value, &why))?,
            ),
        };
        if s.drain_timeout_seconds > 86_400 {
            return Err(invalid(
                field("drain_timeout_seconds"),
                &s.drain_timeout_seconds,
                "must be 0 to 86400",
            ));
        }
        services.push(ServiceSpec {
            name: s.name.clone(),
            vip,
            port: s.port,
            protocol: s.protocol,
            snat_ip,
            backends,
            failure: s.failure.clone(),
            discovery,
            drain_timeout: std::time::Duration::from_secs(s.drain_timeout_seconds.into()),
        });
    }
    if backend_total > raw.limits.max_backends as usize {
        return Err(invalid(
            "services".into(),
            &format!("{backend_total} backends"),
            &format!(
                "more than limits.max_backends ({})",
                raw.limits.max_backends
            ),
        ));
    }
    Ok(Validated { raw, services })
}

/// (field, value, why) of a refused setting.
type Refusal = (String, String, String);

fn validate_failure(f: &Failure, field: &dyn Fn(&str) -> String) -> Result<(), Refusal> {
    let refuse =
        |name: &str, value: u32, why: &str| Err((field(name), value.to_string(), why.to_string()));
    if f.consecutive_failures == 0 {
        return refuse(
            "consecutive_failures",
            f.consecutive_failures,
            "must be at least 1",
        );
    }
    if f.ejection_seconds == 0 {
        return refuse("ejection_seconds", f.ejection_seconds, "must be at least 1");
    }
    if f.max_ejection_seconds < f.ejection_seconds {
        return refuse(
            "max_ejection_seconds",
            f.max_ejection_seconds,
            "must be at least failure.ejection_seconds",
        );
    }
    if !(10..=60_000).contains(&f.connect_timeout_ms) {
        return refuse(
            "connect_timeout_ms",
            f.connect_timeout_ms,
            "must be 10 to 60000",
        );
    }
    if f.max_ejected_percent > 100 {
        return refuse(
            "max_ejected_percent",
            f.max_ejected_percent,
            "must be 0 to 100",
        );
    }
    Ok(())
}

fn validate_discovery(
    d: &Discovery,
    vip: IpAddr,
    has_static_backends: bool,
    field: &dyn Fn(&str) -> String,
) -> Result<DiscoverySpec, Refusal> {
    fn refuse<T>(
        field: &dyn Fn(&str) -> String,
        name: &str,
        value: &dyn fmt::Display,
        why: &str,
    ) -> Result<T, Refusal> {
        Err((field(name), value.to_string(), why.to_string()))
    }
    let refuse = |name: &str, value: &dyn fmt::Display, why: &str| refuse(field, name, value, why);
    if has_static_backends {
        return refuse(
            "",
            &"dns/etcd",
            "a service takes its backends from `backends` or from `discovery`, not both",
        );
    }
    let source = match (&d.dns, &d.etcd) {
        (Some(_), Some(_)) | (None, None) => {
            return refuse("", &"{}", "name exactly one source: dns or etcd");
        }
        (Some(dns), None) => {
            if dns.name.is_empty() || dns.name.len() > 253 || dns.name.contains(char::is_whitespace)
            {
                return refuse("dns.name", &dns.name, "not a DNS name");
            }
            match (dns.record, dns.port) {
                (DnsRecord::Srv, Some(port)) => {
                    return refuse(
                        "dns.port",
                        &port,
                        "SRV records carry the port: leave it out",
                    );
                }
                (DnsRecord::A | DnsRecord::Aaaa, None | Some(0)) => {
                    return refuse(
                        "dns.port",
                        &dns.port.unwrap_or(0),
                        "required (1 to 65535) with type a or aaaa",
                    );
                }
                (DnsRecord::A, _) if !vip.is_ipv4() => {
                    return refuse("dns.type", &"a", "an IPv6 service needs type aaaa");
                }
                (DnsRecord::Aaaa, _) if vip.is_ipv4() => {
                    return refuse("dns.type", &"aaaa", "an IPv4 service needs type a");
                }
                _ => {}
            }
            let server = match &dns.server {
                None => None,
                Some(text) => Some(
                    text.parse::<SocketAddr>()
                        .or_else(|_| text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                        .map_err(|_| {
                            (
                                field("dns.server"),
                                text.clone(),
                                "expected IP or IP:PORT".to_string(),
                            )
                        })?,
                ),
            };
            if dns.min_interval_seconds == 0 {
                return refuse(
                    "dns.min_interval_seconds",
                    &dns.min_interval_seconds,
                    "must be at least 1",
                );
            }
            if dns.max_interval_seconds < dns.min_interval_seconds {
                return refuse(
                    "dns.max_interval_seconds",
                    &dns.max_interval_seconds,
                    "must be at least dns.min_interval_seconds",
                );
            }
            Source::Dns {
                name: dns.name.clone(),
                record: dns.record,
                port: dns.port,
                server,
                min_interval: std::time::Duration::from_secs(dns.min_interval_seconds.into()),
                max_interval: std::time::Duration::from_secs(dns.max_interval_seconds.into()),
            }
        }
        (None, Some(etcd)) => {
            if etcd.endpoints.is_empty() {
                return refuse("etcd.endpoints", &"[]", "at least one endpoint is needed");
            }
            for (k, url) in etcd.endpoints.iter().enumerate() {
                let rest = url.strip_prefix("http://").unwrap_or("");
                if rest.is_empty() || rest.contains(['/', '?', '#', ' ']) {
                    return refuse(
                        &format!("etcd.endpoints[{k}]"),
                        url,
                        "expected http://HOST:PORT (TLS is not supported yet)",
                    );
                }
            }
            if etcd.prefix.is_empty() {
                return refuse("etcd.prefix", &"\"\"", "must not be empty");
            }
            Source::Etcd {
                endpoints: etcd.endpoints.clone(),
                prefix: etcd.prefix.clone(),
            }
        }
    };
    Ok(DiscoverySpec {
        source,
        allow_empty: d.allow_empty,
    })
}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
interfaces:
  - name: lb0
services:
  - name: web
    vip: 10.0.0.1
    port: 80
    protocol: tcp
    backends:
      - address: 10.0.1.1:8080
      - address: 10.0.1.2:8080
        weight: 3
"#;

    fn error_of(text: &str) -> String {
        parse(text, "c.yaml").unwrap_err().to_string()
    }

    const DISCOVERED: &str = r#"
interfaces:
  - name: lb0
services:
  - name: web
    vip: 10.0.0.1
    port: 80
    protocol: tcp
    discovery:
      dns:
        name: _http._tcp.web.example
"#;

    #[test]
    fn discovery_parses_with_defaults() {
        let v = parse(DISCOVERED, "c.yaml").unwrap();
        let d = v.services[0].discovery.as_ref().unwrap();
        assert!(!d.allow_empty);
        match &d.source {
            Source::Dns {
                record,
                port,
                server,
                min_interval,
                max_interval,
                ..
            } => {
                assert_eq!(*record, DnsRecord::Srv);
                assert_eq!((*port, *server), (None, None));
                assert_eq!(min_interval.as_secs(), 5);
                assert_eq!(max_interval.as_secs(), 300);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(v.services[0].drain_timeout.as_secs(), 60);
    }

    #[test]
    fn discovery_errors_name_field_and_value() {
        let cases = [
            // Both sources, or neither.
            (
                "        name: _http._tcp.web.example\n",
                "        name: _http._tcp.web.example\n      etcd:\n        endpoints: [http://e:2379]\n        prefix: /x/\n",
                "services[0].discovery",
            ),
            // A/AAAA need a port; SRV has its own.
            (
                "        name: _http._tcp.web.example\n",
                "        name: web.example\n        type: a\n",
                "services[0].discovery.dns.port",
            ),
            (
                "        name: _http._tcp.web.example\n",
                "        name: web.example\n        type: srv\n        port: 80\n",
                "services[0].discovery.dns.port",
            ),
            // The record type must fit the VIP's family.
            (
                "        name: _http._tcp.web.example\n",
                "        name: web.example\n        type: aaaa\n        port: 80\n",
                "services[0].discovery.dns.type",
            ),
            (
                "        name: _http._tcp.web.example\n",
                "        name: x\n        server: nameserver\n",
                "services[0].discovery.dns.server",
            ),
            (
                "        name: _http._tcp.web.example\n",
                "        name: x\n        min_interval_seconds: 10\n        max_interval_seconds: 5\n",
                "services[0].discovery.dns.max_interval_seconds",
            ),
        ];
        for (from, to, field) in cases {
            let e = error_of(&DISCOVERED.replace(from, to));
            assert!(e.contains(field), "{field}: {e}");
        }
        let e = error_of(&DISCOVERED.replace(
            "      dns:\n        name: _http._tcp.web.example\n",
            "      etcd:\n        endpoints: [\"https://e:2379\"]\n        prefix: /x/\n",
        ));
        assert!(
            e.contains("services[0].discovery.etcd.endpoints[0]") && e.contains("https://e:2379"),
            "{e}"
        );
        // Static backends and discovery together.
        let e = error_of(&DISCOVERED.replace(
            "    discovery:",
            "    backends:\n      - address: 10.0.1.1:80\n    discovery:",
        ));
        assert!(e.contains("services[0].discovery"), "{e}");
        let e = error_of(&format!("{GOOD}pinning:\n  directory: relative/dir\n"));
        assert!(
            e.contains("pinning.directory") && e.contains("relative/dir"),
            "{e}"
        );
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let v = parse(GOOD, "c.yaml").unwrap();
        assert_eq!(v.services[0].backends[0].1, 1);
        assert_eq!(v.services[0].backends[1].1, 3);
        assert_eq!(v.raw.conntrack.max_entries, 262_144);
        assert_eq!(v.raw.interfaces[0].attach, AttachMode::Auto);
        assert!(v.services[0].failure.retry_on_refused);
    }

    #[test]
    fn errors_name_field_and_value() {
        let e = error_of(&GOOD.replace("10.0.1.2:8080", "10.0.1.2"));
        assert!(e.contains("services[0].backends[1].address"), "{e}");
        assert!(e.contains("\"10.0.1.2\""), "{e}");

        let e = error_of(&GOOD.replace("vip: 10.0.0.1", "vip: nope"));
        assert!(e.contains("services[0].vip") && e.contains("nope"), "{e}");

        let e = error_of(&GOOD.replace("10.0.1.1:8080", "\"[fd00::1]:80\""));
        assert!(e.contains("same family"), "{e}");

        let e = error_of(&GOOD.replace("port: 80", "port: 70000"));
        assert!(e.contains("port") && e.contains("70000"), "{e}");

        let e = error_of(&GOOD.replace("protocol: tcp", "protocol: sctp"));
        assert!(e.contains("protocol") && e.contains("sctp"), "{e}");

        let e = error_of(&GOOD.replace("protocol: tcp", "protocol: tcp\n    forwarding: snat"));
        assert!(e.contains("snat_ip"), "{e}");

        let e = error_of(&format!("{GOOD}maglev:\n  table_size: 1000\n"));
        assert!(e.contains("maglev.table_size") && e.contains("1000"), "{e}");

        let e = error_of(&GOOD.replace("weight: 3", "wieght: 3"));
        assert!(e.contains("wieght"), "{e}");
    }

    #[test]
    fn primes() {
        assert!(is_prime(16_381) && is_prime(65_537) && is_prime(251));
        assert!(!is_prime(16_383) && !is_prime(1) && !is_prime(65_536));
    }
}
