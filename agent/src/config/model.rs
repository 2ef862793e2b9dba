//! What validation makes of the raw shape: services with their addresses
//! parsed and their discovery source resolved.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use super::{DnsRecord, Failure, Protocol};

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
