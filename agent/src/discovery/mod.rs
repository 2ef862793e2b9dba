//! Discovery: where a service's backends come from when the config file
//! doesn't list them.
//!
//! Every provider is a task that sends `Report`s (a full backend set, or a
//! failure) for one service into the agent's channel. The `Hub` keeps each
//! service's last good set and its provider's health; `Hub::desired` merges
//! them with the config into the one desired state the reconciler applies.
//! A provider that fails, or sends what can't be used, never changes the
//! desired state: its service keeps the last good set. A Kubernetes provider
//! fits the same shape (one task, reports for every service it watches).
//!
//! Kubernetes Services come from anyone who may create one, so one that
//! doesn't fit the running maps is quarantined (`quarantine`) instead of
//! making every later change fail to apply.

mod dns;
mod error;
mod etcd;
#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod fuzz_dns;
pub mod kubernetes;
mod quarantine;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    time::SystemTime,
};

use tokio::{sync::mpsc, task::AbortHandle};
use tracing::{info, warn};

pub use self::error::{DiscoveryError, DnsError, EtcdError, KubeClientError};
use self::quarantine::{Capacity, fit};
use crate::config::{
    BackendError, DiscoverySpec, Kubernetes, ServiceSpec, Source, Validated, backend,
};

/// The `Report::service` of the Kubernetes provider, which reports whole
/// services rather than one service's backends.
pub const KUBERNETES: &str = "(kubernetes)";
/// Provider name of services that come from Kubernetes.
const KUBERNETES_PROVIDER: &str = "kubernetes";

/// A backend as a provider reports it: address and weight.
pub type Backends = Vec<(SocketAddr, u32)>;

/// What a provider found.
#[derive(Debug)]
pub enum Outcome {
    /// The complete current set (not a delta).
    Backends(Backends),
    /// The source could not be read, or said something unusable.
    Failed(DiscoveryError),
    /// Whole services with their backends (Kubernetes): the complete set.
    Services(Vec<ServiceSpec>),
}

#[derive(Debug)]
pub struct Report {
    pub service: String,
    /// Which provider instance sent it: reports of a replaced one are stale.
    pub generation: u64,
    pub outcome: Outcome,
}

/// Where a provider sends its reports.
#[derive(Clone)]
pub struct Reporter {
    service: String,
    generation: u64,
    tx: mpsc::Sender<Report>,
}

impl Reporter {
    /// Sends a report; false once the agent has stopped listening.
    pub async fn send(&self, outcome: Outcome) -> bool {
        self.tx
            .send(Report {
                service: self.service.clone(),
                generation: self.generation,
                outcome,
            })
            .await
            .is_ok()
    }
}

/// A provider's health and its service's last good set, as the API, the
/// metrics and /readyz show them.
#[derive(Debug, Clone)]
pub struct Status {
    pub provider: &'static str,
    pub generation: u64,
    pub healthy: bool,
    /// Why it is unhealthy (None while healthy).
    pub error: Option<String>,
    /// The last good set; None until the provider first succeeded.
    pub backends: Option<Backends>,
    /// The set before the last change, until that change is applied.
    pub previous: Option<Backends>,
    pub last_success: Option<SystemTime>,
    /// An update that would have emptied the service, held back.
    pub held_back: bool,
    pub updates_applied: u64,
    pub updates_held_back: u64,
    pub failures: u64,
}

impl Status {
    /// A failed or refused answer: counted, logged when it is news.
    fn failed(&mut self, service: &str, why: DiscoveryError) {
        let why = why.to_string();
        self.failures += 1;
        if self.healthy || self.error.as_deref() != Some(why.as_str()) {
            warn!(
                service,
                provider = self.provider,
                error = why,
                "discovery failing; the last good set keeps serving"
            );
        }
        self.healthy = false;
        self.error = Some(why);
    }

    /// A usable answer of `found` backends or services.
    fn answered(&mut self, service: &str, found: usize) {
        if !self.healthy {
            info!(
                service,
                provider = self.provider,
                found,
                "discovery healthy"
            );
        }
        self.healthy = true;
        self.error = None;
        self.last_success = Some(SystemTime::now());
    }

    fn starting(provider: &'static str) -> Self {
        Self {
            provider,
            generation: 0,
            healthy: false,
            error: Some("no answer yet".into()),
            backends: None,
            previous: None,
            last_success: None,
            held_back: false,
            updates_applied: 0,
            updates_held_back: 0,
            failures: 0,
        }
    }
}

/// Running providers and what they reported.
#[derive(Default)]
pub struct Hub {
    pub statuses: BTreeMap<String, Status>,
    running: BTreeMap<String, (DiscoverySpec, AbortHandle)>,
    next_generation: u64,
    kubernetes: Option<KubeState>,
    /// The Kubernetes services while a config without Kubernetes is not
    /// yet applied.
    kube_stash: Option<Vec<ServiceSpec>>,
    /// What the running maps hold (set at start); None: the config's
    /// `limits`.
    capacity: Option<Capacity>,
}

/// The Kubernetes provider and the services it last reported. Its health
/// is the status named `KUBERNETES`; each of its services' statuses copies it.
struct KubeState {
    spec: Kubernetes,
    generation: u64,
    handle: AbortHandle,
    /// None until the first complete answer.
    services: Option<Vec<ServiceSpec>>,
    /// The services before the last change, until that change is applied.
    previous: Option<Vec<ServiceSpec>>,
    /// Each Kubernetes Service (`NAMESPACE/NAME`) as last taken into the
    /// desired state: it goes first at the next fitting, and serves on in
    /// this version while a newer one doesn't fit.
    admitted: BTreeMap<String, Vec<ServiceSpec>>,
    /// Kubernetes Services that don't fit the maps, with why.
    quarantined: BTreeMap<String, String>,
}

impl Hub {
    /// The running maps' capacity: Kubernetes Services are fitted into it.
    pub fn set_capacity(&mut self, services: u32, backends: u32) {
        self.capacity = Some(Capacity { services, backends });
    }

    /// Starts, restarts (when their source changed) and stops providers so
    /// that exactly the config's discovery services have one. A restarted
    /// provider's service keeps its last good set until the new one reports.
    /// Statuses of services that left the config stay until `prune` (after
    /// the config is applied): if it can't be, `sync` back to the old one
    /// finds their last good sets.
    pub fn sync(&mut self, config: &Validated, tx: &mpsc::Sender<Report>) {
        let wanted: BTreeMap<&str, &DiscoverySpec> = config
            .services
            .iter()
            .filter_map(|s| s.discovery.as_ref().map(|d| (s.name.as_str(), d)))
            .collect();
        let vip = |name: &str| {
            config
                .services
                .iter()
                .find(|s| s.name == name)
                .map(|s| s.vip)
        };
        self.running.retain(|name, (spec, handle)| {
            let keep = wanted.get(name.as_str()) == Some(&&*spec);
            if !keep {
                handle.abort();
            }
            keep
        });
        self.sync_kubernetes(config.raw.kubernetes.as_ref(), tx);
        for (name, spec) in wanted {
            if self.running.contains_key(name) {
                continue;
            }
            let reporter = self.reporter(name, tx);
            let handle = match &spec.source {
                Source::Dns { .. } => {
                    let Some(vip) = vip(name) else { continue };
                    tokio::spawn(dns::run(spec.source.clone(), vip, reporter))
                }
                Source::Etcd { .. } => tokio::spawn(etcd::run(spec.source.clone(), reporter)),
            }
            .abort_handle();
            info!(
                service = name,
                provider = spec.source.kind(),
                "discovery started"
            );
            let status = self
                .statuses
                .entry(name.to_string())
                .or_insert_with(|| Status::starting(spec.source.kind()));
            status.provider = spec.source.kind();
            status.generation = self.next_generation;
            self.running
                .insert(name.to_string(), (spec.clone(), handle));
        }
    }

    /// A new provider instance's reporter: a new generation, so reports of
    /// the instance it replaces are ignored.
    fn reporter(&mut self, service: &str, tx: &mpsc::Sender<Report>) -> Reporter {
        self.next_generation += 1;
        Reporter {
            service: service.to_string(),
            generation: self.next_generation,
            tx: tx.clone(),
        }
    }

    fn sync_kubernetes(&mut self, wanted: Option<&Kubernetes>, tx: &mpsc::Sender<Report>) {
        if self.kubernetes.as_ref().map(|k| &k.spec) == wanted {
            return;
        }
        let last = self
            .kubernetes
            .take()
            .and_then(|k| {
                k.handle.abort();
                k.services
            })
            .or_else(|| self.kube_stash.take());
        let Some(spec) = wanted else {
            // Kept until the config without Kubernetes is applied (`prune`):
            // if it can't be, the provider restarts with these.
            self.kube_stash = last;
            return;
        };
        let reporter = self.reporter(KUBERNETES, tx);
        let handle = tokio::spawn(kubernetes::run(spec.clone(), reporter)).abort_handle();
        info!(provider = KUBERNETES_PROVIDER, "discovery started");
        self.kubernetes = Some(KubeState {
            spec: spec.clone(),
            generation: self.next_generation,
            handle,
            // A restarted provider's services keep serving until it answers.
            services: last,
            previous: None,
            admitted: BTreeMap::new(),
            quarantined: BTreeMap::new(),
        });
        // The provider's own health, before any service is known (broken
        // RBAC, no API server): shown in /readyz and the metrics.
        self.statuses
            .entry(KUBERNETES.to_string())
            .or_insert_with(|| Status::starting(KUBERNETES_PROVIDER));
    }

    fn accept_kubernetes(&mut self, report: Report) -> bool {
        let Some(k) = self.kubernetes.as_mut() else {
            return false;
        };
        if k.generation != report.generation {
            return false;
        }
        let provider = self
            .statuses
            .entry(KUBERNETES.to_string())
            .or_insert_with(|| Status::starting(KUBERNETES_PROVIDER));
        let changed = match report.outcome {
            Outcome::Failed(why) => {
                provider.failed(KUBERNETES, why);
                false
            }
            Outcome::Services(services) => {
                provider.answered(KUBERNETES, services.len());
                let changed = k.services.as_ref() != Some(&services);
                if changed {
                    provider.updates_applied += 1;
                    info!(
                        provider = KUBERNETES_PROVIDER,
                        services = services.len(),
                        "discovered services changed"
                    );
                    k.previous = k.services.replace(services);
                }
                changed
            }
            Outcome::Backends(_) => false,
        };
        self.copy_kubernetes_statuses();
        changed
    }

    /// Each Kubernetes service's status: the provider's, with its backends
    /// (as taken into the desired state, once fitted).
    fn copy_kubernetes_statuses(&mut self) {
        let (Some(k), Some(provider)) = (&self.kubernetes, self.statuses.get(KUBERNETES)) else {
            return;
        };
        let provider = provider.clone();
        let services: Vec<ServiceSpec> = if k.admitted.is_empty() && k.quarantined.is_empty() {
            k.services.clone().unwrap_or_default()
        } else {
            k.admitted.values().flatten().cloned().collect()
        };
        self.statuses.retain(|name, s| {
            s.provider != KUBERNETES_PROVIDER
                || name == KUBERNETES
                || services.iter().any(|x| &x.name == name)
        });
        for svc in services {
            let backends = Some(svc.backends);
            self.statuses.insert(
                svc.name,
                Status {
                    backends,
                    ..provider.clone()
                },
            );
        }
    }

    /// Forgets the statuses of services `config` (now applied) doesn't have.
    pub fn prune(&mut self, config: &Validated) {
        if config.raw.kubernetes.is_none() {
            self.kube_stash = None;
        }
        self.statuses.retain(|name, s| {
            if s.provider == KUBERNETES_PROVIDER {
                return config.raw.kubernetes.is_some();
            }
            config
                .services
                .iter()
                .any(|c| &c.name == name && c.discovery.is_some())
        });
    }

    /// An accepted set that could not be applied (e.g. over the maps'
    /// capacity) is taken back: the service keeps the set that serves.
    pub fn revert(&mut self, service: &str, why: &str) {
        if service == KUBERNETES {
            if let Some(k) = self.kubernetes.as_mut()
                && let Some(previous) = k.previous.take()
            {
                k.services = Some(previous);
                if let Some(provider) = self.statuses.get_mut(KUBERNETES) {
                    provider.healthy = false;
                    provider.error = Some(format!("not applied: {why}"));
                }
                self.copy_kubernetes_statuses();
            }
            return;
        }
        if let Some(status) = self.statuses.get_mut(service)
            && let Some(previous) = status.previous.take()
        {
            status.backends = Some(previous);
            status.healthy = false;
            status.error = Some(format!("not applied: {why}"));
        }
    }

    /// Starts the Kubernetes provider off with the services a pinned
    /// datapath still had (when Kubernetes is configured).
    pub fn seed_kubernetes(&mut self, services: Vec<ServiceSpec>) {
        if let Some(k) = self.kubernetes.as_mut()
            && k.services.is_none()
            && !services.is_empty()
        {
            k.services = Some(services);
        }
    }

    /// Starts a service off with the backends an earlier agent left in
    /// pinned maps, until its provider answers: a restart empties nothing.
    pub fn seed(&mut self, service: &str, backends: &[(SocketAddr, u32)]) {
        if let Some(status) = self.statuses.get_mut(service)
            && status.backends.is_none()
            && !backends.is_empty()
        {
            let mut set: Backends = backends.to_vec();
            set.sort();
            status.backends = Some(set);
        }
    }

    /// Takes a report in. Returns true when the desired state changed.
    pub fn accept(&mut self, report: Report, config: &Validated) -> bool {
        if report.service == KUBERNETES {
            return self.accept_kubernetes(report);
        }
        let Some(status) = self.statuses.get_mut(&report.service) else {
            return false;
        };
        if status.generation != report.generation {
            return false; // from a provider that was replaced
        }
        let Some(spec) = config.services.iter().find(|s| s.name == report.service) else {
            return false;
        };
        let allow_empty = spec.discovery.as_ref().is_some_and(|d| d.allow_empty);
        let backends = match report.outcome {
            Outcome::Failed(why) => {
                status.failed(&report.service, why);
                return false;
            }
            Outcome::Services(_) => return false,
            Outcome::Backends(found) => match check_backends(spec, found) {
                Ok(backends) => backends,
                Err(why) => {
                    status.failed(&report.service, DiscoveryError::Refused(why));
                    return false;
                }
            },
        };
        status.answered(&report.service, backends.len());
        let had_backends = status.backends.as_ref().is_some_and(|b| !b.is_empty());
        if backends.is_empty() && had_backends && !allow_empty {
            if !status.held_back {
                warn!(
                    service = report.service,
                    provider = status.provider,
                    "discovery says the service has no backends; held back (discovery.allow_empty: true applies such updates)"
                );
            }
            status.held_back = true;
            status.updates_held_back += 1;
            return false;
        }
        status.held_back = false;
        if status.backends.as_ref() == Some(&backends) {
            return false;
        }
        info!(
            service = report.service,
            provider = status.provider,
            backends = backends.len(),
            "discovered backends changed"
        );
        status.previous = status.backends.replace(backends);
        status.updates_applied += 1;
        true
    }

    /// The config's services, each discovery service with its last good
    /// set, then the Kubernetes services that fit the maps (a frontend the
    /// file already has stays the file's; a Kubernetes Service that doesn't
    /// fit is quarantined, see `quarantine`).
    pub fn desired(&mut self, config: &Validated) -> Vec<ServiceSpec> {
        let out: Vec<ServiceSpec> = config
            .services
            .iter()
            .map(|spec| {
                let mut spec = spec.clone();
                if spec.discovery.is_some() {
                    spec.backends = self
                        .statuses
                        .get(&spec.name)
                        .and_then(|s| s.backends.clone())
                        .unwrap_or_default();
                }
                spec
            })
            .collect();
        // NodePorts and traffic policies, with the node's addresses as
        // they are now.
        let mut out = crate::nodeport::expand(out, &crate::nodeport::Here::of(&config.raw.node));
        let capacity = self.capacity.unwrap_or(Capacity {
            services: config.raw.limits.max_services,
            backends: config.raw.limits.max_backends,
        });
        let Some(k) = self.kubernetes.as_mut() else {
            return out;
        };
        let Some(services) = k.services.as_ref() else {
            return out;
        };
        let fitted = fit(&out, services, &k.admitted, capacity);
        quarantine::log_changes(&k.quarantined, &fitted.quarantined);
        k.admitted = fitted.admitted;
        k.quarantined = fitted.quarantined;
        out.extend(fitted.services);
        self.copy_kubernetes_statuses();
        out
    }

    /// Kubernetes Services (`NAMESPACE/NAME`) quarantined, with why; None
    /// without Kubernetes.
    pub fn quarantined(&self) -> Option<&BTreeMap<String, String>> {
        self.kubernetes.as_ref().map(|k| &k.quarantined)
    }

    /// What readers (metrics, API, /readyz) see of the hub.
    pub fn view(&self) -> HubView {
        HubView {
            statuses: self.statuses.clone(),
            quarantined: self.quarantined().cloned(),
        }
    }

    pub fn stop(&mut self) {
        for (_, (_, handle)) in std::mem::take(&mut self.running) {
            handle.abort();
        }
        if let Some(k) = self.kubernetes.take() {
            k.handle.abort();
        }
    }
}

/// A discovered set must fit its service like a configured one (the
/// config's own backend check: same family as the VIP, a real address and
/// port, a weight in range); an address found twice counts once.
fn check_backends(spec: &ServiceSpec, found: Backends) -> Result<Backends, BackendError> {
    let mut seen = HashSet::new();
    let mut backends = Vec::with_capacity(found.len());
    for (addr, weight) in found {
        backend(addr, weight, spec.vip)?;
        if seen.insert(addr) {
            backends.push((addr, weight));
        }
    }
    // A stable order: the same set never looks like a change.
    backends.sort();
    Ok(backends)
}

/// A copy of the hub's statuses and quarantine, published for readers.
#[derive(Debug, Clone, Default)]
pub struct HubView {
    /// By service name.
    pub statuses: BTreeMap<String, Status>,
    /// Kubernetes Services (`NAMESPACE/NAME`) quarantined, with why; None
    /// without Kubernetes.
    pub quarantined: Option<BTreeMap<String, String>>,
}

impl HubView {
    /// Services whose provider is unhealthy, with the reason, and the
    /// quarantined Kubernetes Services.
    pub fn unhealthy(&self) -> Vec<(String, &'static str, String)> {
        let quarantined = self.quarantined.iter().flatten();
        self.statuses
            .iter()
            .filter(|(_, s)| !s.healthy)
            .map(|(name, s)| {
                (
                    name.clone(),
                    s.provider,
                    s.error.clone().unwrap_or_default(),
                )
            })
            .chain(quarantined.map(|(name, why)| {
                (
                    name.clone(),
                    KUBERNETES_PROVIDER,
                    format!("quarantined: {why}"),
                )
            }))
            .collect()
    }
}
