//! What validation makes of the raw shape: services with their addresses
//! parsed and their discovery source resolved.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use super::{Cidr, DnsRecord, Failure, Protocol};

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
    /// The per-backend latency histogram is exported; None: as the global
    /// `metrics.backend_latency_histogram` says.
    pub backend_latency_histogram: Option<bool>,
    /// The pod behind each backend that has one (Kubernetes endpoints), for
    /// the metrics' and the API's `namespace` and `pod`.
    pub pods: BTreeMap<SocketAddr, PodRef>,
    /// Session affinity by client address: its timeout in seconds (1 to
    /// 86,400); None: no affinity.
    pub affinity_timeout: Option<u32>,
    /// How a new client's backend is chosen.
    pub algorithm: super::Algorithm,
    /// Direct server return, and how (None: `dnat` or `snat`). With
    /// `Encapsulation::Ipip`, `snat_ip` is the tunnel's outer source.
    pub dsr: Option<super::Encapsulation>,
    /// `allowed_sources`: None, no restriction; Some, new flows only from
    /// these blocks (Some(empty): from nowhere, which only Kubernetes makes,
    /// when every `loadBalancerSourceRanges` entry was invalid). Blocks of
    /// the other family than the VIP's never match.
    pub allowed_sources: Option<Vec<Cidr>>,
    /// `node_port`: the service is also on this port of every node address
    /// (`nodeport::expand` makes those entries).
    pub node_port: Option<u16>,
    /// `external_traffic_policy: local`: this node's backends only.
    pub local_only: bool,
    /// The node of each backend that names one (`backends[].node`, or an
    /// EndpointSlice endpoint's `nodeName`).
    pub backend_nodes: BTreeMap<SocketAddr, String>,
    /// A NodePort entry's node address with `external_traffic_policy:
    /// cluster`: flows to `remote_backends` are SNATed to it.
    pub snat_remote: Option<IpAddr>,
    /// Backends on another node or of no known node (see `snat_remote`).
    pub remote_backends: BTreeSet<SocketAddr>,
}

impl ServiceSpec {
    /// A service with no backends and every option at its default (DNAT,
    /// Maglev, no affinity, from anywhere, no NodePort, no drain time):
    /// what code that makes a service of its own starts from.
    pub fn new(name: String, vip: IpAddr, port: u16, protocol: Protocol) -> Self {
        Self {
            name,
            vip,
            port,
            protocol,
            snat_ip: None,
            backends: Vec::new(),
            failure: Failure::default(),
            discovery: None,
            drain_timeout: std::time::Duration::ZERO,
            backend_latency_histogram: None,
            pods: BTreeMap::new(),
            affinity_timeout: None,
            algorithm: Default::default(),
            dsr: None,
            allowed_sources: None,
            node_port: None,
            local_only: false,
            backend_nodes: BTreeMap::new(),
            snat_remote: None,
            remote_backends: BTreeSet::new(),
        }
    }
}

/// A Kubernetes pod, as an EndpointSlice endpoint's targetRef names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
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
