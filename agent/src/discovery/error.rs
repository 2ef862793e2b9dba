//! Why a provider failed, or why its answer was refused. The text is what
//! the provider's status (`error`), /readyz and the logs show.

use hickory_resolver::net::NetError;
use serde_json::Value;

use crate::config::validate::BackendError;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The DNS resolver could not be set up (e.g. an unreadable resolv.conf).
    #[error("DNS resolver: {0}")]
    DnsResolver(#[source] NetError),
    /// Resolving the service's DNS name failed.
    #[error("{name}: {source}")]
    Dns { name: String, source: Box<DnsError> },
    /// A session with an etcd endpoint ended.
    #[error("etcd {endpoint}: {source}")]
    Etcd { endpoint: String, source: EtcdError },
    /// An etcd key whose value is not a backend.
    #[error(
        "key {key}: value {value:?} is not {{\"address\": \"IP:PORT\", \"weight\": N}}: {source}"
    )]
    EtcdValue {
        key: String,
        value: String,
        source: serde_json::Error,
    },
    /// An etcd key whose backend address is not one.
    #[error("key {key}: address {address:?} is not IP:PORT")]
    EtcdAddress { key: String, address: String },
    /// The Kubernetes client could not be set up.
    #[error("Kubernetes client: {0}")]
    KubeClient(#[source] KubeClientError),
    /// Watching a kind of Kubernetes object (`services`, `endpointslices`)
    /// failed.
    #[error("watching {what}: {source}")]
    KubeWatch {
        what: &'static str,
        source: kube::runtime::watcher::Error,
    },
    /// A provider's answer that doesn't fit its service.
    #[error("answer refused: {source}")]
    Refused {
        service: String,
        source: BackendError,
    },
}

/// Why resolving a DNS name failed.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error(transparent)]
    Lookup(NetError),
    /// The addresses of an SRV record's target.
    #[error("SRV target {target}: {source}")]
    SrvTarget { target: String, source: NetError },
}

/// Why a session with an etcd endpoint ended.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("listing the prefix: {0}")]
    List(String),
    #[error("no snapshot")]
    NoSnapshot,
    #[error("starting the watch: {0}")]
    StartWatch(String),
    #[error("the watch stream ended")]
    StreamEnded,
    #[error("the watch stream broke: {0}")]
    StreamBroke(#[source] hyper::Error),
    #[error("the watch sent invalid JSON: {0}")]
    InvalidJson(#[source] serde_json::Error),
    #[error("the watch failed: {0}")]
    WatchFailed(Value),
    /// The watch can't resume from `revision`: the prefix is listed again.
    #[error("revision {revision} was compacted (oldest kept {oldest}); listing again")]
    Compacted { revision: i64, oldest: i64 },
    #[error("the watch was canceled: {0}")]
    Canceled(Value),
}

/// Why the Kubernetes client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum KubeClientError {
    #[error("api_server {url:?}: {source}")]
    ApiServer {
        url: String,
        source: hyper::http::uri::InvalidUri,
    },
    #[error(transparent)]
    Kube(kube::Error),
}
