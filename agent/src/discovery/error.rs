//! Why a provider failed, or why its answer was refused. The text is what
//! the provider's status (`error`), /readyz and the logs show.
//!
//! Each variant's text already includes its cause, so none is marked as an
//! error `source` (a chain printer would repeat it): the fields holding a
//! cause are named `error`, not `source`.

use hickory_resolver::net::NetError;
use serde_json::Value;

use crate::config::BackendError;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The DNS resolver could not be set up (e.g. an unreadable resolv.conf).
    #[error("DNS resolver: {0}")]
    DnsResolver(NetError),
    /// Resolving the service's DNS name failed.
    #[error("{name}: {error}")]
    Dns { name: String, error: Box<DnsError> },
    /// A session with an etcd endpoint ended.
    #[error("etcd {endpoint}: {error}")]
    Etcd { endpoint: String, error: EtcdError },
    /// An etcd key whose value is not a backend.
    #[error(
        "key {key}: value {value:?} is not {{\"address\": \"IP:PORT\", \"weight\": N}}: {error}"
    )]
    EtcdValue {
        key: String,
        value: String,
        error: serde_json::Error,
    },
    /// An etcd key whose value is larger than any backend's.
    #[error("key {key}: value of {bytes} bytes, over the {limit}-byte limit of a backend value")]
    EtcdValueTooLarge {
        key: String,
        bytes: usize,
        limit: usize,
    },
    /// An etcd key whose backend address is not one.
    #[error("key {key}: address {address:?} is not IP:PORT")]
    EtcdAddress { key: String, address: String },
    /// The Kubernetes client could not be set up.
    #[error("Kubernetes client: {0}")]
    KubeClient(KubeClientError),
    /// Watching a kind of Kubernetes object (`services`, `endpointslices`)
    /// failed.
    #[error("watching {what}: {error}")]
    KubeWatch {
        what: &'static str,
        error: kube::runtime::watcher::Error,
    },
    /// A provider's answer that doesn't fit its service.
    #[error("answer refused: {0}")]
    Refused(BackendError),
}

/// Why resolving a DNS name failed.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error(transparent)]
    Lookup(NetError),
    /// The addresses of an SRV record's target.
    #[error("SRV target {target}: {error}")]
    SrvTarget { target: String, error: NetError },
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
    StreamBroke(hyper::Error),
    #[error("the watch sent invalid JSON: {0}")]
    InvalidJson(serde_json::Error),
    #[error("the watch failed: {0}")]
    WatchFailed(Value),
    /// The watch can't resume from `revision`: the prefix is listed again.
    #[error("revision {revision} was compacted (oldest kept {oldest}); listing again")]
    Compacted { revision: i64, oldest: i64 },
    #[error("the watch was canceled: {0}")]
    Canceled(Value),
    /// More than a cap allows (see etcd.rs): listed again after a backoff.
    #[error("{what} is over the {limit}-byte limit")]
    TooLarge { what: String, limit: usize },
}

/// Why the Kubernetes client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum KubeClientError {
    #[error("api_server {url:?}: {error}")]
    ApiServer {
        url: String,
        error: hyper::http::uri::InvalidUri,
    },
    #[error(transparent)]
    Kube(kube::Error),
}
