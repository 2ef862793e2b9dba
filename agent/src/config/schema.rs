//! The YAML shape serde reads (unknown fields are refused, so a typo never
//! silently means a default), with its defaults.

use std::fmt;

use serde::{Deserialize, Serialize};

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
    #[serde(default, deserialize_with = "null_as_empty")]
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
    /// Where the operator commands reach the agent, and where its runtime
    /// overrides are kept (see README "Operating").
    #[serde(default)]
    pub control: Control,
    /// What the agent exports to Prometheus (docs/metrics.md). Applies live.
    #[serde(default)]
    pub metrics: Metrics,
    /// This node: its name (for backends' `node` and traffic policies) and
    /// the addresses its NodePorts listen on.
    #[serde(default)]
    pub node: Node,
}

/// This node (see docs/configuration.md, `node`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Node {
    /// Default: the `NODE_NAME` environment variable, else the hostname.
    pub name: Option<String>,
    /// Where NodePorts listen. Default: every address of the host's
    /// interfaces but loopback, link-local, multicast and unspecified ones
    /// (and kube-proxy's `kube-ipvs0`), read at each apply.
    pub addresses: Option<Vec<String>>,
}

/// `external_traffic_policy` (Kubernetes' `externalTrafficPolicy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TrafficPolicy {
    /// Every backend; those on other nodes (or of no known node) through a
    /// NodePort are SNATed to the node address the packet arrived on.
    #[default]
    Cluster,
    /// This node's backends only; the client's address is kept.
    Local,
}

/// The operator interface on this host (restart-time settings).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Control {
    /// The Unix socket `sluice status`, `services`, `drain` ... talk to;
    /// made mode 0600, root's (and the agent's user's) only.
    pub socket: String,
    /// Where runtime overrides (`sluice drain`, `sluice weight`) are kept
    /// so that they survive restarts: a directory of the host's, not tmpfs.
    pub state_directory: String,
}

pub const DEFAULT_CONTROL_SOCKET: &str = "/run/sluice/sluice.sock";
pub const DEFAULT_STATE_DIRECTORY: &str = "/var/lib/sluice";

impl Default for Control {
    fn default() -> Self {
        Self {
            socket: DEFAULT_CONTROL_SOCKET.to_string(),
            state_directory: DEFAULT_STATE_DIRECTORY.to_string(),
        }
    }
}

/// The series the agent exports, where they can be turned down (each
/// setting's cost per backend is in docs/metrics.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    /// `sluice_backend_connect_latency_seconds` for every TCP backend: 23 of
    /// the 36 series a TCP backend costs. Services may override it
    /// (`services[].metrics`, the Kubernetes annotation
    /// `sluice.io/backend-latency-histogram`). Off, the kernel still measures
    /// (the API and the CLI's p50/p99 keep working): only the export stops.
    pub backend_latency_histogram: bool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            backend_latency_histogram: true,
        }
    }
}

/// One service's metrics settings; unset: the global `metrics` setting.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceMetrics {
    #[serde(default)]
    pub backend_latency_histogram: Option<bool>,
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
    /// Watch one namespace only; default: all. (`namespaces` lists more.)
    #[serde(default)]
    pub namespace: Option<String>,
    /// The namespaces whose Services may opt in; set, only these count (a
    /// Service labelled in any other namespace is ignored and logged).
    /// Default: every namespace.
    #[serde(default)]
    pub namespaces: Option<Vec<String>>,
    /// Label selector of the Services Sluice takes over (the opt-in).
    #[serde(default = "default_service_selector")]
    pub service_selector: String,
    /// Which of a Service's addresses become VIPs.
    #[serde(default = "default_kube_addresses")]
    pub addresses: Vec<KubeAddress>,
    /// The blocks an externalIP or load-balancer ingress IP must be in to
    /// become a VIP (`192.0.2.0/24`, `2001:db8::/64`). Default: no such
    /// check. Either way this node's own addresses, the API server's, and
    /// loopback, link-local and metadata addresses are never taken.
    #[serde(default)]
    pub external_cidrs: Option<Vec<String>>,
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
    /// The namespaces whose Services count (`namespaces`, or the one
    /// `namespace`); None: every namespace.
    pub fn allowed_namespaces(&self) -> Option<Vec<String>> {
        self.namespaces
            .clone()
            .or_else(|| self.namespace.clone().map(|ns| vec![ns]))
    }

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
    /// The `nodePort` of `type: NodePort` and `LoadBalancer` Services, on
    /// the node's addresses.
    NodePorts,
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

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Conntrack {
    /// Capacity of the conntrack LRU map. Each connection takes two entries
    /// (forward and reply direction).
    pub max_entries: u32,
    /// Capacity of the half-open table: TCP connects between the client's
    /// SYN and its acknowledgement of the SYN-ACK (two entries each). A SYN
    /// flood churns this table, never the established flows'.
    pub half_open_max_entries: u32,
    /// How long a flow may stay idle in each state before the agent's sweep
    /// removes it (both entries; an SNAT flow's port returns to the pool).
    pub timeouts: ConntrackTimeouts,
    /// Capacity of the session affinity table: one entry per client of
    /// each service with `affinity` (an LRU: when full, the least recently
    /// used client's entry goes, and that client is placed by Maglev again).
    pub affinity_max_entries: u32,
}

impl Default for Conntrack {
    fn default() -> Self {
        Self {
            max_entries: 262_144,
            half_open_max_entries: 65_536,
            timeouts: ConntrackTimeouts::default(),
            affinity_max_entries: 65_536,
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
    /// The largest lookup table a service gets, in slots (a prime). A
    /// service's table holds 100 slots per backend (the smallest prime
    /// just below a power of two at least that, from 251), up to this.
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
    /// New flows each CPU may create per second for each service (0: no
    /// limit). More are dropped and counted (`new_flow_budget`): a flood
    /// can't take all of the CPU or the flow tables. Katran's LRU-miss
    /// limit is of this kind (125,000 per CPU).
    pub new_flows_per_second: u32,
}

/// Default `limits.new_flows_per_second`: far above what a CPU creates for
/// real clients, a bound on what a flood costs.
pub const DEFAULT_NEW_FLOWS_PER_SECOND: u32 = 200_000;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_services: 8192,
            max_backends: 16_384,
            new_flows_per_second: DEFAULT_NEW_FLOWS_PER_SECOND,
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
    /// Direct server return: the packet reaches the backend with the VIP
    /// as destination (L2 or tunnelled, see `dsr`), and the backend answers
    /// the client directly.
    Dsr,
}

/// How a `forwarding: dsr` service's packets reach the backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Encapsulation {
    /// L2 DSR: only the destination MAC changes (backends on the LB's segment).
    #[default]
    None,
    /// IPIP (IPv4 VIPs) or IP6IP6 (IPv6 VIPs), from `snat_ip` to the backend.
    Ipip,
}

impl Encapsulation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Ipip => "ipip",
        }
    }
}

/// The `dsr` options of a service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Dsr {
    #[serde(default)]
    pub encapsulation: Encapsulation,
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
    #[serde(default, deserialize_with = "null_as_empty")]
    pub backends: Vec<BackendSpec>,
    #[serde(default)]
    pub failure: Failure,
    /// Where the backends come from when not listed in `backends`.
    #[serde(default)]
    pub discovery: Option<Discovery>,
    /// How long a removed backend keeps its established connections.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout_seconds: u32,
    /// Overrides of the global `metrics` settings for this service.
    #[serde(default)]
    pub metrics: ServiceMetrics,
    /// With `forwarding: dsr`: how packets reach the backend.
    #[serde(default)]
    pub dsr: Option<Dsr>,
    /// Session affinity: a client's connections go to one backend.
    #[serde(default)]
    pub affinity: Option<Affinity>,
    /// How a new connection's backend is chosen.
    #[serde(default)]
    pub algorithm: Algorithm,
    /// New flows only from these blocks (`10.0.0.0/8`, `fd00::/8`; a bare
    /// address is a block of one). Absent or empty: from anywhere.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub allowed_sources: Vec<String>,
    /// Also listen on this port of every node address (`node.addresses`).
    #[serde(default)]
    pub node_port: Option<u16>,
    #[serde(default)]
    pub external_traffic_policy: TrafficPolicy,
}

/// `algorithm:` of a service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Consistent hashing: every node makes the same choice.
    #[default]
    Maglev,
    /// The less loaded (active connections for its weight) of two
    /// candidates, by this node's own counts: not consistent across nodes.
    LeastConnections,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Maglev => "maglev",
            Self::LeastConnections => "least_connections",
        }
    }
}

/// `affinity:` of a service (one kind: by client address).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Affinity {
    #[serde(default)]
    pub client_ip: Option<ClientIpAffinity>,
}

/// `affinity: {client_ip: {timeout_seconds: N}}`: every new connection of
/// a client address goes to the backend of its previous ones while the
/// client opened one within the last `timeout_seconds` and that backend
/// takes new connections (kube-proxy's `sessionAffinity: ClientIP`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientIpAffinity {
    #[serde(default = "default_affinity_timeout")]
    pub timeout_seconds: u32,
}

/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 h).
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10_800;
/// Kubernetes' maximum for it (one day).
pub const MAX_AFFINITY_TIMEOUT_SECONDS: u32 = 86_400;

fn default_affinity_timeout() -> u32 {
    DEFAULT_AFFINITY_TIMEOUT_SECONDS
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
    /// The node the backend runs on (compared with `node.name`).
    #[serde(default)]
    pub node: Option<String>,
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
    /// Connects from at least this many distinct client addresses (1 to 4)
    /// must have failed in the streak before an ejection: one client, hostile
    /// or behind its own firewall, can't eject a backend alone.
    pub min_distinct_clients: u32,
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
            min_distinct_clients: 2,
        }
    }
}

/// A list key written with nothing after it (`backends:`) is an empty list,
/// as YAML users write a service whose backends come later.
fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<Vec<T>>::deserialize(d).map(Option::unwrap_or_default)
}
