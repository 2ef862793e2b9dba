//! The YAML config file (see README "Configuration").
//!
//! Parsing is in two steps: serde reads the raw shape (`schema`: unknown
//! fields are refused, so a typo never silently means a default), then
//! `validate` checks what serde can't and resolves addresses (`model`).
//! Every error names the field and the value.

mod model;
mod schema;
mod validate;
mod yaml;

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;

use std::path::Path;

pub use model::{DiscoverySpec, PodRef, ServiceSpec, Source};
pub use schema::{
    Affinity, Algorithm, AttachMode, BackendSpec, ClientIpAffinity, Config, Conntrack,
    ConntrackTimeouts, Control, Discovery, DnsDiscovery, DnsRecord, Dsr, Encapsulation,
    EtcdDiscovery, Failure, Forwarding, Interface, KubeAddress, Kubernetes, Limits, Maglev,
    Metrics, Node, Pinning, Protocol, Service, ServiceMetrics, SocketLb, TrafficPolicy,
};
pub use schema::{
    DEFAULT_AFFINITY_TIMEOUT_SECONDS, DEFAULT_CONTROL_SOCKET, DEFAULT_NEW_FLOWS_PER_SECOND,
    DEFAULT_STATE_DIRECTORY, MAX_AFFINITY_TIMEOUT_SECONDS,
};
pub use validate::{
    BackendError, Cidr, MAX_WEIGHT, RefusedClass, backend, is_prime, refused_class,
};

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

/// A config after validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    pub raw: Config,
    pub services: Vec<ServiceSpec>,
}

pub fn load(path: &Path) -> Result<Validated, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

pub fn parse(text: &str, path: &str) -> Result<Validated, ConfigError> {
    let raw: Config = yaml::config(text).map_err(|message| ConfigError::Parse {
        path: path.to_string(),
        message,
    })?;
    validate::validate(raw, path)
}
