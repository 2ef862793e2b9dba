//! Kubernetes discovery: Services (opted in by a label selector) and their
//! EndpointSlices, watched with kube-rs reflectors, become Sluice services.
//!
//! - VIPs: a Service's ClusterIPs, and (configurable) its externalIPs and
//!   LoadBalancer ingress IPs; one Sluice service per VIP and TCP/UDP port,
//!   named `NAMESPACE/NAME:PORT` (`…@VIP` for every VIP after the first).
//! - Backends: the endpoints of the Service's EndpointSlices of the VIP's
//!   family, on the slice port of the same name: `ready` → active,
//!   `serving && terminating` → draining (no new connections), anything else
//!   → removed (and drained by the reconciler).
//! - Weights: the Service annotation `sluice.io/weights`, a comma-separated
//!   list of `ADDRESS=WEIGHT` or `POD=WEIGHT` (default 1).
//! - Metrics: each backend's pod (the endpoint's targetRef) becomes its
//!   series' `namespace` and `pod` labels; the Service annotation
//!   `sluice.io/backend-latency-histogram: "true"|"false"` overrides the
//!   global `metrics.backend_latency_histogram`.
//! - Which endpoints a VIP uses, as kube-proxy chooses them: a `Local`
//!   traffic policy (`internalTrafficPolicy` for ClusterIPs,
//!   `externalTrafficPolicy` for external and LoadBalancer IPs) keeps this
//!   node's endpoints only; otherwise topology hints (`forNodes`, then
//!   `forZones`) narrow the set when every ready endpoint carries them and
//!   some name this node or zone. With no ready endpoint left, the serving
//!   terminating ones take new connections rather than none.
//!
//! - Trust (`trust`): Services of other namespaces than
//!   `kubernetes.namespaces`, VIPs a Service may not claim and endpoints that
//!   fail the config's backend check are skipped, each on its own, and
//!   logged once.
//!
//! The stores are complete only after every initial list; nothing is sent
//! before. A watch error (API server gone, 410 Gone, …) is reported and the
//! last sent set keeps serving; the watchers relist with backoff by
//! themselves.

pub(crate) mod trust;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use futures_util::StreamExt;
use k8s_openapi::api::{
    core::v1::{Service, ServiceSpec as KubeServiceSpec},
    discovery::v1::{Endpoint, EndpointSlice},
};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, reflector, reflector::Store, watcher},
};
use tracing::{info, warn};

pub use self::trust::{Skipped, Trust, host_addresses};
use super::{DiscoveryError, KubeClientError, Outcome, Reporter};
use crate::config::{
    Algorithm, Cidr, DEFAULT_AFFINITY_TIMEOUT_SECONDS, KubeAddress, Kubernetes,
    MAX_AFFINITY_TIMEOUT_SECONDS, MAX_WEIGHT, PodRef, Protocol, ServiceSpec, backend,
};

/// The Service annotation with per-endpoint weights.
pub const WEIGHTS_ANNOTATION: &str = "sluice.io/weights";
/// The Service annotation that turns its backends' latency histogram on or off.
pub const LATENCY_HISTOGRAM_ANNOTATION: &str = "sluice.io/backend-latency-histogram";
/// `maglev` (the default) or `least_connections`: the Service's `algorithm`.
pub const ALGORITHM_ANNOTATION: &str = "sluice.io/algorithm";
/// Events that arrive within this much of each other are applied together…
const SETTLE: Duration = Duration::from_millis(50);
/// …but a steady stream of events is applied at least this often.
const SETTLE_MAX: Duration = Duration::from_millis(500);
/// A watch error followed by this long without another one means the
/// watchers are back (they resume silently): the set is sent again.
const RECOVERED_AFTER: Duration = Duration::from_secs(10);

/// A watched kind of object: one list and watch per namespace in
/// `kubernetes.namespaces` (or one for all namespaces), each into a store
/// of its own.
type Watched<K> = Vec<Store<K>>;

pub async fn run(spec: Kubernetes, reporter: Reporter) {
    let (client, url) = loop {
        match client(&spec).await {
            Ok(c) => break c,
            Err(e) => {
                if !reporter
                    .send(Outcome::Failed(DiscoveryError::KubeClient(e)))
                    .await
                {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    };
    let mut trust = Trust::new(&spec, &trust::api_server_addresses(&url).await);
    warn_about_open_settings(&spec);
    // One list and watch per allowed namespace (RBAC may grant no more),
    // or one over every namespace.
    let scopes: Vec<Option<String>> = match spec.allowed_namespaces() {
        Some(list) => list.into_iter().map(Some).collect(),
        None => vec![None],
    };
    let mut service_stores: Watched<Service> = Vec::new();
    let mut slice_stores: Watched<EndpointSlice> = Vec::new();
    let mut streams = Vec::new();
    for ns in &scopes {
        let (services_api, slices_api): (Api<Service>, Api<EndpointSlice>) = match ns {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (Api::all(client.clone()), Api::all(client.clone())),
        };
        let (services, services_writer) = reflector::store();
        let (slices, slices_writer) = reflector::store();
        let n = streams.len();
        let service_events = reflector(
            services_writer,
            watcher(
                services_api,
                watcher::Config::default().labels(&spec.service_selector),
            ),
        )
        .default_backoff()
        .map(move |e| (n, e.map(|e| matches!(e, watcher::Event::InitDone))))
        .boxed();
        let slice_events = reflector(
            slices_writer,
            watcher(slices_api, watcher::Config::default()),
        )
        .default_backoff()
        .map(move |e| (n + 1, e.map(|e| matches!(e, watcher::Event::InitDone))))
        .boxed();
        streams.push(service_events);
        streams.push(slice_events);
        service_stores.push(services);
        slice_stores.push(slices);
    }
    let mut events = futures_util::stream::select_all(streams);
    let (node, zone) = spec.locality();
    if node.is_none() {
        warn!(
            "kubernetes: this node's name is unknown (set kubernetes.node_name or NODE_NAME); \
             Services with a Local traffic policy use every endpoint"
        );
    }
    let here = Locality {
        node: node.as_deref(),
        zone: zone.as_deref(),
        addresses: &[],
    };
    let node_ports = spec.addresses.contains(&KubeAddress::NodePorts);
    let mut listed = vec![false; 2 * scopes.len()];
    let mut skipped = BTreeSet::new();
    // Everything in the stores, by the rules: logged when what is skipped
    // changes.
    let mut compute = |trust: &mut Trust| {
        trust.set_host_addresses(&trust::host_addresses());
        let services: Vec<Arc<Service>> = service_stores.iter().flat_map(|s| s.state()).collect();
        let slices: Vec<Arc<EndpointSlice>> = slice_stores.iter().flat_map(|s| s.state()).collect();
        // NodePorts listen on the node's addresses as they are now.
        let addresses = if node_ports {
            crate::nodeport::host_node_addresses()
        } else {
            Vec::new()
        };
        let here = Locality {
            addresses: &addresses,
            ..here
        };
        let found = desired(&services, &slices, &spec, &here, trust);
        log_skipped(&skipped, &found.skipped);
        skipped = found.skipped;
        found.services
    };
    let mut failing = false;
    loop {
        let next = if failing {
            match tokio::time::timeout(RECOVERED_AFTER, events.next()).await {
                Ok(next) => next,
                Err(_) => {
                    // Quiet since the last error: the watches are up again
                    // (they resume without an event).
                    failing = false;
                    if listed.iter().all(|l| *l) {
                        let found = compute(&mut trust);
                        if !reporter.send(Outcome::Services(found)).await {
                            return;
                        }
                    }
                    continue;
                }
            }
        } else {
            events.next().await
        };
        let Some((which, event)) = next else { return };
        match event {
            Err(e) => {
                failing = true;
                let what = if which % 2 == 0 {
                    "services"
                } else {
                    "endpointslices"
                };
                let error = DiscoveryError::KubeWatch { what, error: e };
                if !reporter.send(Outcome::Failed(error)).await {
                    return;
                }
                continue;
            }
            Ok(init_done) => listed[which] |= init_done,
        }
        if !listed.iter().all(|l| *l) {
            continue;
        }
        // Let a burst of events land before computing the whole set once,
        // but apply a steady stream at least every SETTLE_MAX.
        let started = tokio::time::Instant::now();
        while started.elapsed() < SETTLE_MAX
            && let Ok(Some((which, event))) = tokio::time::timeout(SETTLE, events.next()).await
        {
            match event {
                Ok(init_done) => listed[which] |= init_done,
                Err(_) => failing = true,
            }
        }
        if failing {
            continue; // sent once the watchers are quiet again
        }
        let found = compute(&mut trust);
        if !reporter.send(Outcome::Services(found)).await {
            return;
        }
    }
}

/// Settings that leave the door open, said once at start.
fn warn_about_open_settings(spec: &Kubernetes) {
    if spec.allowed_namespaces().is_none() {
        warn!(
            selector = spec.service_selector,
            "kubernetes: a Service in any namespace can opt in with the selector's label; \
             kubernetes.namespaces limits it to the namespaces listed"
        );
    }
    let external = spec.addresses.iter().any(|a| *a != KubeAddress::ClusterIp);
    if external && spec.external_cidrs.is_none() {
        warn!(
            "kubernetes: any externalIP or load-balancer IP a Service names becomes a VIP \
             (never this node's, the API server's, loopback, link-local or metadata addresses); \
             kubernetes.external_cidrs limits them to the blocks listed"
        );
    }
}

/// Logs what is newly skipped, and what no longer is.
fn log_skipped(before: &BTreeSet<Skipped>, now: &BTreeSet<Skipped>) {
    for s in now.difference(before) {
        warn!(
            event = "skipped",
            service = s.service,
            what = s.what,
            why = s.why,
            "kubernetes: not taken"
        );
    }
    for s in before.difference(now) {
        info!(
            service = s.service,
            what = s.what,
            "kubernetes: no longer skipped"
        );
    }
}

/// The client, and the API server's URL it talks to.
async fn client(spec: &Kubernetes) -> Result<(Client, hyper::Uri), KubeClientError> {
    let config = match &spec.api_server {
        Some(url) => {
            let uri: hyper::Uri = url.parse().map_err(|error| KubeClientError::ApiServer {
                url: url.clone(),
                error,
            })?;
            // Keep the credentials (service account, kubeconfig) and change
            // only where they are presented.
            match kube::Config::infer().await {
                Ok(mut c) => {
                    c.cluster_url = uri;
                    c
                }
                Err(_) => kube::Config::new(uri),
            }
        }
        // In a pod: the service account; elsewhere KUBECONFIG / ~/.kube/config.
        None => kube::Config::infer()
            .await
            .map_err(|e| KubeClientError::Kube(kube::Error::InferConfig(e)))?,
    };
    let url = config.cluster_url.clone();
    let client = Client::try_from(config).map_err(KubeClientError::Kube)?;
    Ok((client, url))
}

/// Where this agent runs, for traffic policies and topology hints.
#[derive(Debug, Clone, Copy, Default)]
pub struct Locality<'a> {
    pub node: Option<&'a str>,
    pub zone: Option<&'a str>,
    /// Where NodePorts listen (`kubernetes.addresses: [node_ports]`).
    pub addresses: &'a [IpAddr],
}

/// What the stores make: the Sluice services, and what was not taken.
#[derive(Debug, Default)]
pub struct Found {
    pub services: Vec<ServiceSpec>,
    pub skipped: BTreeSet<Skipped>,
}

/// Every opted-in Service's Sluice services, from the two stores, by the
/// rules of `trust`.
pub fn desired(
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
    spec: &Kubernetes,
    here: &Locality,
    trust: &Trust,
) -> Found {
    let mut by_service: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices {
        let (Some(ns), Some(owner)) = (
            slice.metadata.namespace.as_deref(),
            slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kubernetes.io/service-name")),
        ) else {
            continue;
        };
        by_service
            .entry((ns, owner.as_str()))
            .or_default()
            .push(slice);
    }
    let mut found = Found::default();
    let mut sorted: Vec<&Arc<Service>> = services.iter().collect();
    sorted.sort_by_key(|s| (s.metadata.namespace.clone(), s.metadata.name.clone()));
    for svc in sorted {
        let (Some(ns), Some(name), Some(svc_spec)) = (
            svc.metadata.namespace.as_deref(),
            svc.metadata.name.as_deref(),
            svc.spec.as_ref(),
        ) else {
            continue;
        };
        let owner = format!("{ns}/{name}");
        let mut skip = |what: String, why: String| {
            found.skipped.insert(Skipped {
                service: owner.clone(),
                what,
                why,
            });
        };
        if !trust.namespace_allowed(ns) {
            skip(
                "Service".into(),
                format!("namespace {ns} is not in kubernetes.namespaces"),
            );
            continue;
        }
        let weights = weights(svc);
        let histogram = match annotation(svc, LATENCY_HISTOGRAM_ANNOTATION) {
            None => None,
            Some("true") => Some(true),
            Some("false") => Some(false),
            Some(other) => {
                skip(
                    format!("annotation {LATENCY_HISTOGRAM_ANNOTATION}"),
                    format!(
                        "{other:?}: expected \"true\" or \"false\" (the global metrics setting applies)"
                    ),
                );
                None
            }
        };
        let affinity_timeout = session_affinity(svc_spec, &mut skip);
        let algorithm = match annotation(svc, ALGORITHM_ANNOTATION) {
            None | Some("maglev") => Algorithm::Maglev,
            Some("least_connections") => Algorithm::LeastConnections,
            Some(other) => {
                skip(
                    format!("annotation {ALGORITHM_ANNOTATION}"),
                    format!(
                        "{other:?}: expected \"maglev\" or \"least_connections\" (maglev applies)"
                    ),
                );
                Algorithm::Maglev
            }
        };
        let local = |policy: &Option<String>| policy.as_deref() == Some("Local");
        let internal_local = local(&svc_spec.internal_traffic_policy);
        let external_local = local(&svc_spec.external_traffic_policy);
        let source_ranges = source_ranges(svc_spec, &mut skip);
        // Each VIP with whether its traffic policy is Local, and whether it
        // is a load-balancer IP (which `loadBalancerSourceRanges` limits,
        // as in kube-proxy: not the clusterIP, externalIPs or NodePorts).
        let mut vips: Vec<(IpAddr, bool, bool)> = Vec::new();
        let mut add = |kind: &str, text: &str, local_only: bool| {
            let Ok(ip) = text.parse::<IpAddr>() else {
                return; // "None" (headless), or not an address
            };
            if vips.iter().any(|(v, _, _)| *v == ip) {
                return;
            }
            match trust.refuse_vip(ip, kind != "clusterIP") {
                Some(why) => skip(format!("{kind} {ip}"), why),
                None => vips.push((ip, local_only, kind == LB_KIND)),
            }
        };
        if spec.addresses.contains(&KubeAddress::ClusterIp) {
            let ips = svc_spec
                .cluster_ips
                .clone()
                .or_else(|| svc_spec.cluster_ip.clone().map(|ip| vec![ip]))
                .unwrap_or_default();
            ips.iter()
                .for_each(|ip| add("clusterIP", ip, internal_local));
        }
        if spec.addresses.contains(&KubeAddress::ExternalIps) {
            svc_spec
                .external_ips
                .iter()
                .flatten()
                .for_each(|ip| add("externalIP", ip, external_local));
        }
        if spec.addresses.contains(&KubeAddress::LoadBalancer) {
            svc.status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref())
                .into_iter()
                .flatten()
                .filter_map(|i| i.ip.as_deref())
                .for_each(|ip| add(LB_KIND, ip, external_local));
        }
        // NodePorts: of `type: NodePort` and `LoadBalancer` Services (the
        // latter has none with `allocateLoadBalancerNodePorts: false`: its
        // ports then carry no nodePort), on node addresses of the
        // Service's families.
        let has_node_ports = matches!(
            svc_spec.type_.as_deref(),
            Some("NodePort") | Some("LoadBalancer")
        );
        let families: Vec<bool> = match &svc_spec.ip_families {
            Some(list) if !list.is_empty() => list.iter().map(|f| f == "IPv4").collect(),
            _ => vec![true, false],
        };
        let slices = by_service
            .get(&(ns, name))
            .map(Vec::as_slice)
            .unwrap_or_default();
        // What every Sluice service of this Service shares, whatever its
        // address and port.
        let common = |name: String, vip: IpAddr, port: u16, protocol: Protocol| ServiceSpec {
            failure: spec.failure.clone(),
            drain_timeout: Duration::from_secs(spec.drain_timeout_seconds.into()),
            backend_latency_histogram: histogram,
            affinity_timeout,
            algorithm,
            ..ServiceSpec::new(name, vip, port, protocol)
        };
        for port in svc_spec.ports.iter().flatten() {
            let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                _ => continue, // SCTP: not load-balanced by Sluice
            };
            let Ok(vip_port) = u16::try_from(port.port) else {
                continue;
            };
            let port_label = port
                .name
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| port.port.to_string());
            for (k, (vip, local_only, lb)) in vips.iter().enumerate() {
                let service_name = if k == 0 {
                    format!("{owner}:{port_label}")
                } else {
                    format!("{owner}:{port_label}@{vip}")
                };
                let (backends, pods, _) = backends(
                    slices,
                    port.name.as_deref(),
                    *vip,
                    &weights,
                    Scope {
                        here: *here,
                        local_only: *local_only,
                    },
                    &mut skip,
                );
                found.services.push(ServiceSpec {
                    backends,
                    pods,
                    allowed_sources: if *lb { source_ranges.clone() } else { None },
                    local_only: *local_only,
                    ..common(service_name, *vip, vip_port, protocol)
                });
            }
            // The NodePort, on each node address of the Service's families.
            let Some(node_port) = port
                .node_port
                .and_then(|p| u16::try_from(p).ok())
                .filter(|_| spec.addresses.contains(&KubeAddress::NodePorts) && has_node_ports)
            else {
                continue;
            };
            for addr in here
                .addresses
                .iter()
                .filter(|a| families.contains(&a.is_ipv4()))
            {
                let (backends, pods, nodes) = backends(
                    slices,
                    port.name.as_deref(),
                    *addr,
                    &weights,
                    Scope {
                        here: *here,
                        local_only: external_local,
                    },
                    &mut skip,
                );
                // Cluster: another node's endpoint (or one of no known
                // node, or every one when this node's name is unknown) is
                // SNATed to this address, so that its replies come back.
                let remote_backends = if external_local {
                    Default::default()
                } else {
                    backends
                        .iter()
                        .map(|(a, _)| *a)
                        .filter(|a| {
                            here.node.is_none() || nodes.get(a).map(String::as_str) != here.node
                        })
                        .collect()
                };
                found.services.push(ServiceSpec {
                    backends,
                    pods,
                    // As kube-proxy: loadBalancerSourceRanges don't apply
                    // to NodePorts.
                    allowed_sources: None,
                    local_only: external_local,
                    backend_nodes: nodes,
                    snat_remote: (!external_local).then_some(*addr),
                    remote_backends,
                    ..common(
                        format!("{owner}:{port_label}@{}", SocketAddr::new(*addr, node_port)),
                        *addr,
                        node_port,
                        protocol,
                    )
                });
            }
        }
    }
    found
}

/// What `add` calls a load-balancer ingress IP.
const LB_KIND: &str = "load-balancer IP";

/// `spec.loadBalancerSourceRanges` as `allowed_sources`: None when empty
/// (no restriction, as kube-proxy reads it). An entry that is no block is
/// skipped and reported; if none is left, the load-balancer IPs admit no
/// source at all (a typo must not open the service to everyone).
fn source_ranges(
    svc_spec: &KubeServiceSpec,
    skip: &mut impl FnMut(String, String),
) -> Option<Vec<Cidr>> {
    let listed = svc_spec.load_balancer_source_ranges.as_ref()?;
    if listed.is_empty() {
        return None;
    }
    let mut cidrs = Vec::new();
    for text in listed {
        match Cidr::parse_sloppy(text.trim()) {
            Ok(c) if !cidrs.contains(&c) => cidrs.push(c),
            Ok(_) => {}
            Err(why) => skip(format!("loadBalancerSourceRanges entry {text:?}"), why),
        }
    }
    Some(cidrs)
}

/// `sessionAffinity: ClientIP` and its timeout (`sessionAffinityConfig.
/// clientIP.timeoutSeconds`, default 10800, at most 86400 as the API server
/// allows): affinity on every VIP of the Service. A timeout out of range
/// (an API server that didn't check) is noted and the default used.
fn session_affinity(
    svc_spec: &k8s_openapi::api::core::v1::ServiceSpec,
    skip: &mut impl FnMut(String, String),
) -> Option<u32> {
    if svc_spec.session_affinity.as_deref() != Some("ClientIP") {
        return None;
    }
    let timeout = svc_spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    match timeout {
        None => Some(DEFAULT_AFFINITY_TIMEOUT_SECONDS),
        Some(t) if (1..=i64::from(MAX_AFFINITY_TIMEOUT_SECONDS)).contains(&i64::from(t)) => {
            Some(t as u32)
        }
        Some(t) => {
            skip(
                "sessionAffinityConfig.clientIP.timeoutSeconds".into(),
                format!(
                    "{t}: must be 1 to {MAX_AFFINITY_TIMEOUT_SECONDS} (the default, {DEFAULT_AFFINITY_TIMEOUT_SECONDS}, applies)"
                ),
            );
            Some(DEFAULT_AFFINITY_TIMEOUT_SECONDS)
        }
    }
}

fn annotation<'a>(svc: &'a Service, name: &str) -> Option<&'a str> {
    svc.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(name))
        .map(|v| v.trim())
}

/// `sluice.io/weights: "10.1.0.2=3, web-7d9f-abcde=2"`.
fn weights(svc: &Service) -> BTreeMap<String, u32> {
    annotation(svc, WEIGHTS_ANNOTATION)
        .map(|text| {
            text.split(',')
                .filter_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    Some((k.trim().to_string(), v.trim().parse().ok()?))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// What `backends` finds: (address, weight), the pods behind them, their
/// nodes.
type Endpoints = (
    Vec<(SocketAddr, u32)>,
    BTreeMap<SocketAddr, PodRef>,
    BTreeMap<SocketAddr, String>,
);

/// Which endpoints one VIP may send to.
#[derive(Debug, Clone, Copy)]
struct Scope<'a> {
    here: Locality<'a>,
    /// Its traffic policy is `Local`: this node's endpoints only.
    local_only: bool,
}

/// One endpoint of a Service port, before the choice.
struct Candidate<'a> {
    addr: SocketAddr,
    weight: u32,
    ready: bool,
    endpoint: &'a Endpoint,
    pod: Option<PodRef>,
}

/// The endpoints of `slices` for one Service port at `vip` (of its address
/// family), as `(address, weight)`; weight 0 = draining (established
/// connections only); the pods behind them; and their nodes (`nodeName`). An endpoint that fails the
/// config's backend check is left out and told to `skip` (what, why).
fn backends(
    slices: &[&EndpointSlice],
    port_name: Option<&str>,
    vip: IpAddr,
    weights: &BTreeMap<String, u32>,
    scope: Scope,
    skip: &mut impl FnMut(String, String),
) -> Endpoints {
    let family = if vip.is_ipv4() { "IPv4" } else { "IPv6" };
    let mut candidates: Vec<Candidate> = Vec::new();
    for slice in slices.iter().filter(|s| s.address_type == family) {
        let wanted = port_name.unwrap_or("");
        let Some(port) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or("") == wanted)
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.as_ref();
            // Unset conditions mean ready / serving (the API's convention).
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            if !(ready || serving && terminating) {
                continue; // not serving: removed
            }
            // The first address is the endpoint's (the others are legacy).
            let Some(ip) = endpoint
                .addresses
                .first()
                .and_then(|a| a.parse::<IpAddr>().ok())
            else {
                continue;
            };
            if scope.local_only
                && let Some(node) = scope.here.node
                && endpoint.node_name.as_deref() != Some(node)
            {
                continue; // another node's: not for a Local policy
            }
            let pod = endpoint.target_ref.as_ref().and_then(|r| r.name.as_deref());
            let weight = weights
                .get(&ip.to_string())
                .or_else(|| pod.and_then(|p| weights.get(p)))
                .copied()
                .unwrap_or(1)
                .clamp(1, MAX_WEIGHT);
            let addr = SocketAddr::new(ip, port);
            // Anyone who can write an EndpointSlice names its addresses:
            // they pass the check a configured backend passes.
            if let Err(why) = backend(addr, weight, vip) {
                skip(
                    format!("endpoint {}", pod.unwrap_or("(no pod)")),
                    why.to_string(),
                );
                continue;
            }
            candidates.push(Candidate {
                addr,
                weight,
                ready,
                endpoint,
                pod: pod_of(endpoint, slice),
            });
        }
    }
    let any_ready = candidates.iter().any(|c| c.ready);
    // Hints don't apply to a Local policy (already this node's endpoints).
    let hint = if any_ready && !scope.local_only {
        Hint::applying(&candidates, scope.here)
    } else {
        None
    };
    let mut out: Vec<(SocketAddr, u32)> = Vec::new();
    let mut pods = BTreeMap::new();
    let mut nodes = BTreeMap::new();
    for c in &candidates {
        let weight = if !any_ready {
            // Nothing ready: serving terminating endpoints take new
            // connections rather than none (as kube-proxy does).
            c.weight
        } else if !c.ready {
            0 // serving and terminating: draining
        } else if hint.is_some_and(|h| !h.keeps(c.endpoint)) {
            continue; // hinted to other nodes or zones: removed (drained)
        } else {
            c.weight
        };
        match out.iter_mut().find(|(a, _)| *a == c.addr) {
            Some(existing) => existing.1 = existing.1.max(weight),
            None => out.push((c.addr, weight)),
        }
        if let Some(pod) = c.pod.clone() {
            pods.entry(c.addr).or_insert(pod);
        }
        if let Some(node) = c.endpoint.node_name.clone() {
            nodes.entry(c.addr).or_insert(node);
        }
    }
    out.sort();
    (out, pods, nodes)
}

/// The pod an endpoint's targetRef names (its namespace defaults to the
/// slice's): none for an endpoint of something else, or of nothing.
fn pod_of(endpoint: &Endpoint, slice: &EndpointSlice) -> Option<PodRef> {
    let target = endpoint.target_ref.as_ref()?;
    if target.kind.as_deref().is_some_and(|k| k != "Pod") {
        return None;
    }
    Some(PodRef {
        namespace: target
            .namespace
            .clone()
            .or_else(|| slice.metadata.namespace.clone())?,
        name: target.name.clone()?,
    })
}

/// Topology hints that narrow a VIP's ready endpoints to those meant for
/// this node, or else this zone.
#[derive(Debug, Clone, Copy)]
enum Hint<'a> {
    Node(&'a str),
    Zone(&'a str),
}

impl Hint<'_> {
    fn keeps(self, e: &Endpoint) -> bool {
        let hints = e.hints.as_ref();
        match self {
            Hint::Node(node) => hints
                .and_then(|h| h.for_nodes.as_ref())
                .is_some_and(|n| n.iter().any(|n| n.name == node)),
            Hint::Zone(zone) => hints
                .and_then(|h| h.for_zones.as_ref())
                .is_some_and(|z| z.iter().any(|z| z.name == zone)),
        }
    }

    /// The hint that applies, if any: every ready endpoint carries zone
    /// hints (a partly hinted slice is being rewritten: kube-proxy ignores
    /// its hints too) and some ready endpoint names this node, or else
    /// this zone.
    fn applying<'a>(candidates: &[Candidate], here: Locality<'a>) -> Option<Hint<'a>> {
        let ready = candidates.iter().filter(|c| c.ready).map(|c| c.endpoint);
        let all_hinted = ready.clone().all(|e| {
            e.hints
                .as_ref()
                .and_then(|h| h.for_zones.as_ref())
                .is_some_and(|z| !z.is_empty())
        });
        if !all_hinted {
            return None;
        }
        let node = here.node.map(Hint::Node);
        let zone = here.zone.map(Hint::Zone);
        [node, zone]
            .into_iter()
            .flatten()
            .find(|hint| ready.clone().any(|e| hint.keeps(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Kubernetes {
        serde_saphyr::from_str("addresses: [cluster_ip, external_ips]").unwrap()
    }

    #[test]
    fn node_ports_of_node_port_and_load_balancer_services_follow_their_policy() {
        let service = |name: &str, type_: &str, policy: &str, allocate: Option<bool>| -> Service {
            let mut spec = serde_json::json!({
                "type": type_, "clusterIP": "10.96.0.10", "ipFamilies": ["IPv4"],
                "externalTrafficPolicy": policy,
                "ports": [{"name": "http", "port": 80, "nodePort": 30080},
                          {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}]
            });
            if allocate == Some(false) {
                // The API server then allocates none.
                spec["allocateLoadBalancerNodePorts"] = serde_json::json!(false);
                spec["ports"][0].as_object_mut().unwrap().remove("nodePort");
                spec["ports"][1].as_object_mut().unwrap().remove("nodePort");
            }
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "shop"}, "spec": spec
            }))
            .unwrap()
        };
        let slice = |name: &str| -> EndpointSlice {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("{name}-1"), "namespace": "shop",
                             "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080}, {"name": "dns", "port": 5353}],
                "endpoints": [
                    {"addresses": ["10.1.0.2"], "nodeName": "node-a"},
                    {"addresses": ["10.1.0.3"], "nodeName": "node-b"},
                    {"addresses": ["10.1.0.4"]}
                ]
            }))
            .unwrap()
        };
        let spec: Kubernetes =
            serde_saphyr::from_str("addresses: [cluster_ip, node_ports]").unwrap();
        let addresses: Vec<IpAddr> = vec![
            "192.0.2.10".parse().unwrap(),
            "2001:db8::10".parse().unwrap(),
        ];
        let here = Locality {
            node: Some("node-a"),
            zone: None,
            addresses: &addresses,
        };
        let services = [
            Arc::new(service("np", "NodePort", "Cluster", None)),
            Arc::new(service("lb", "LoadBalancer", "Local", None)),
            Arc::new(service("noalloc", "LoadBalancer", "Cluster", Some(false))),
            Arc::new(service("plain", "ClusterIP", "Cluster", None)),
        ];
        let slices = ["np", "lb", "noalloc", "plain"].map(|n| Arc::new(slice(n)));
        let out = desired(&services, &slices, &spec, &here, &Trust::default()).services;
        let find = |name: &str| out.iter().find(|s| s.name == name);
        let b = |a: &str| a.parse::<SocketAddr>().unwrap();
        // Cluster: every endpoint; node-b's and the one of no node SNATed
        // to the node address; UDP too; only the IPv4 node address.
        let np = find("shop/np:http@192.0.2.10:30080").expect("the NodePort entry");
        assert_eq!(
            (np.vip, np.port, np.protocol),
            ("192.0.2.10".parse().unwrap(), 30080, Protocol::Tcp)
        );
        assert_eq!(np.backends.len(), 3);
        assert_eq!(np.snat_remote, Some("192.0.2.10".parse().unwrap()));
        assert_eq!(
            np.remote_backends.iter().copied().collect::<Vec<_>>(),
            [b("10.1.0.3:8080"), b("10.1.0.4:8080")]
        );
        assert!(find("shop/np:dns@192.0.2.10:30053").is_some_and(|s| s.protocol == Protocol::Udp));
        assert!(
            out.iter().all(|s| s.vip.to_string() != "2001:db8::10"),
            "an IPv4-only Service"
        );
        // Local (a LoadBalancer's nodePort): this node's endpoint only, no SNAT.
        let lb = find("shop/lb:http@192.0.2.10:30080").expect("the LoadBalancer's NodePort");
        assert_eq!(lb.backends, [(b("10.1.0.2:8080"), 1)]);
        assert_eq!(lb.snat_remote, None);
        assert!(lb.remote_backends.is_empty());
        // No nodePorts allocated, or not a NodePort type: no entry.
        assert!(
            out.iter()
                .all(|s| !s.name.starts_with("shop/noalloc:http@"))
        );
        assert!(out.iter().all(|s| !s.name.starts_with("shop/plain:http@")));
        // Without node_ports in addresses: none at all.
        let spec: Kubernetes = serde_saphyr::from_str("addresses: [cluster_ip]").unwrap();
        let out = desired(&services, &slices, &spec, &here, &Trust::default()).services;
        assert!(
            out.iter().all(|s| !s.name.contains('@')),
            "{:?}",
            out.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
    }

    #[test]
    fn load_balancer_source_ranges_limit_only_the_load_balancer_ips() {
        let service = |ranges: serde_json::Value| -> Service {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"clusterIP": "10.96.0.10", "externalIPs": ["192.0.2.7"],
                         "loadBalancerSourceRanges": ranges,
                         "ports": [{"name": "http", "port": 80}]},
                "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.4"}]}}
            }))
            .unwrap()
        };
        let spec: Kubernetes =
            serde_saphyr::from_str("addresses: [cluster_ip, external_ips, load_balancer]").unwrap();
        let run = |svc: Service| {
            desired(
                &[Arc::new(svc)],
                &[],
                &spec,
                &Locality::default(),
                &Trust::default(),
            )
        };
        let found = run(service(serde_json::json!([
            "10.0.0.0/8",
            " 172.16.1.1/12",
            "nonsense"
        ])));
        let by_vip = |vip: &str| {
            found
                .services
                .iter()
                .find(|s| s.vip.to_string() == vip)
                .unwrap()
                .allowed_sources
                .clone()
        };
        let lb: Vec<String> = by_vip("198.51.100.4")
            .unwrap()
            .iter()
            .map(|c| c.to_string())
            .collect();
        // Host bits cleared as kube-proxy does; the bad entry skipped and told.
        assert_eq!(lb, ["10.0.0.0/8", "172.16.0.0/12"]);
        assert_eq!(by_vip("10.96.0.10"), None, "the clusterIP is not limited");
        assert_eq!(by_vip("192.0.2.7"), None, "externalIPs are not limited");
        assert!(
            found.skipped.iter().any(|s| s.what.contains("nonsense")),
            "{:?}",
            found.skipped
        );
        // Only bad entries: the load-balancer IP admits nobody (not everybody).
        let found = run(service(serde_json::json!(["nonsense"])));
        let lb = found
            .services
            .iter()
            .find(|s| s.vip.to_string() == "198.51.100.4")
            .unwrap();
        assert_eq!(lb.allowed_sources, Some(Vec::new()));
        // Empty: no restriction, as kube-proxy reads it.
        let found = run(service(serde_json::json!([])));
        assert!(found.services.iter().all(|s| s.allowed_sources.is_none()));
    }

    #[test]
    fn services_and_slices_become_sluice_services() {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop",
                         "annotations": {"sluice.io/weights": "10.1.0.3=4, web-c=2"}},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::10"],
                     "externalIPs": ["192.0.2.7"],
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"},
                               {"name": "dns", "port": 53, "protocol": "UDP"},
                               {"name": "sctp", "port": 9, "protocol": "SCTP"}]}
        }))
        .unwrap();
        let headless: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": {"clusterIP": "None", "ports": [{"port": 5432}]}
        }))
        .unwrap();
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}, {"name": "dns", "port": 5353}],
            "endpoints": [
                {"addresses": ["10.1.0.2"], "conditions": {"ready": true},
                 "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-a"}},
                {"addresses": ["10.1.0.3"], "targetRef": {"kind": "Node", "name": "n1"}},
                {"addresses": ["10.1.0.4"], "conditions": {"ready": false, "serving": true, "terminating": true},
                 "targetRef": {"name": "web-c"}},
                {"addresses": ["10.1.0.5"], "conditions": {"ready": false, "serving": false, "terminating": true}}
            ]
        }))
        .unwrap();
        let out = desired(
            &[Arc::new(svc), Arc::new(headless)],
            &[Arc::new(slice)],
            &spec(),
            &Locality::default(),
            &Trust::default(),
        )
        .services;
        let names: Vec<&str> = out.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "shop/web:http",
                "shop/web:http@fd00::10",
                "shop/web:http@192.0.2.7",
                "shop/web:dns",
                "shop/web:dns@fd00::10",
                "shop/web:dns@192.0.2.7"
            ]
        );
        let http = &out[0];
        assert_eq!((http.port, http.protocol), (80, Protocol::Tcp));
        let b = |a: &str| a.parse::<SocketAddr>().unwrap();
        // ready (explicit or unset) → active with its weight; serving and
        // terminating → weight 0 (draining); neither → left out.
        assert_eq!(
            http.backends,
            vec![
                (b("10.1.0.2:8080"), 1),
                (b("10.1.0.3:8080"), 4),
                (b("10.1.0.4:8080"), 0)
            ]
        );
        // Pods from the targetRefs (a namespace left out is the slice's);
        // a targetRef to something else than a pod names none.
        let pod = |name: &str| PodRef {
            namespace: "shop".into(),
            name: name.into(),
        };
        assert_eq!(
            http.pods,
            BTreeMap::from([
                (b("10.1.0.2:8080"), pod("web-a")),
                (b("10.1.0.4:8080"), pod("web-c"))
            ])
        );
        assert_eq!(http.backend_latency_histogram, None);
        assert_eq!(out[3].backends[0].0.port(), 5353);
        // The IPv6 VIP has no IPv6 slice: no backends, never IPv4 ones.
        assert!(out[1].backends.is_empty());
    }

    #[test]
    fn session_affinity_client_ip_applies_to_every_vip_of_the_service() {
        let svc = |extra: serde_json::Value| -> Arc<Service> {
            let mut spec = serde_json::json!({
                "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::10"],
                "externalIPs": ["192.0.2.7"], "ports": [{"port": 80}]
            });
            spec.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            Arc::new(
                serde_json::from_value(serde_json::json!({
                    "metadata": {"name": "web", "namespace": "shop"}, "spec": spec
                }))
                .unwrap(),
            )
        };
        let found = |extra: serde_json::Value| {
            desired(
                &[svc(extra)],
                &[],
                &spec(),
                &Locality::default(),
                &Trust::default(),
            )
        };
        let timeouts = |f: &Found| -> Vec<Option<u32>> {
            f.services.iter().map(|s| s.affinity_timeout).collect()
        };
        // None (the default) and explicit None: no affinity.
        assert_eq!(timeouts(&found(serde_json::json!({}))), [None; 3]);
        let none = found(serde_json::json!({"sessionAffinity": "None"}));
        assert_eq!(timeouts(&none), [None; 3]);
        // ClientIP without a config: Kubernetes' default, 3 hours.
        let default = found(serde_json::json!({"sessionAffinity": "ClientIP"}));
        assert_eq!(timeouts(&default), [Some(10_800); 3]);
        let set = found(serde_json::json!({
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}
        }));
        assert_eq!(timeouts(&set), [Some(60); 3]);
        assert!(set.skipped.is_empty());
        // Out of range (the API server refuses it; a mock might not): the
        // default applies, and the Service's status says why.
        // The algorithm, by annotation.
        let annotated = |value: &str| {
            let svc: Service = serde_json::from_value(serde_json::json!({
                "metadata": {"name": "web", "namespace": "shop",
                             "annotations": {ALGORITHM_ANNOTATION: value}},
                "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}
            }))
            .unwrap();
            desired(
                &[Arc::new(svc)],
                &[],
                &spec(),
                &Locality::default(),
                &Trust::default(),
            )
        };
        let lc = annotated("least_connections");
        assert_eq!(lc.services[0].algorithm, Algorithm::LeastConnections);
        let bad = annotated("fastest");
        assert_eq!(bad.services[0].algorithm, Algorithm::Maglev);
        assert_eq!(bad.skipped.len(), 1, "{:?}", bad.skipped);
        assert_eq!(set.services[0].algorithm, Algorithm::Maglev);
        for bad in [0, -5, 86_401] {
            let f = found(serde_json::json!({
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": bad}}
            }));
            assert_eq!(timeouts(&f), [Some(10_800); 3], "{bad}");
            let skipped: Vec<_> = f.skipped.iter().collect();
            assert_eq!(skipped.len(), 1, "{bad}: {skipped:?}");
            assert!(skipped[0].why.contains(&bad.to_string()), "{skipped:?}");
        }
    }

    #[test]
    fn the_latency_histogram_annotation_overrides_the_global_setting() {
        let svc = |value: &str| -> Arc<Service> {
            Arc::new(
                serde_json::from_value(serde_json::json!({
                    "metadata": {"name": "web", "namespace": "shop",
                                 "annotations": {LATENCY_HISTOGRAM_ANNOTATION: value}},
                    "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}
                }))
                .unwrap(),
            )
        };
        let found = |value: &str| {
            desired(
                &[svc(value)],
                &[],
                &spec(),
                &Locality::default(),
                &Trust::default(),
            )
        };
        assert_eq!(
            found("false").services[0].backend_latency_histogram,
            Some(false)
        );
        assert_eq!(
            found(" true ").services[0].backend_latency_histogram,
            Some(true)
        );
        // Anything else: the global setting, and said why.
        let other = found("off");
        assert_eq!(other.services[0].backend_latency_histogram, None);
        let skipped: Vec<String> = other.skipped.iter().map(|s| s.why.clone()).collect();
        assert_eq!(
            skipped,
            ["\"off\": expected \"true\" or \"false\" (the global metrics setting applies)"]
        );
    }

    /// One endpoint: (last octet, node, ready, zone hints, node hints).
    fn endpoint(
        i: u8,
        node: &str,
        ready: bool,
        zones: &[&str],
        nodes: &[&str],
    ) -> serde_json::Value {
        let mut e = serde_json::json!({
            "addresses": [format!("10.1.0.{i}")],
            "nodeName": node,
            "conditions": {"ready": ready, "serving": true, "terminating": !ready},
        });
        if !zones.is_empty() || !nodes.is_empty() {
            let zones: Vec<_> = zones
                .iter()
                .map(|z| serde_json::json!({"name": z}))
                .collect();
            let nodes: Vec<_> = nodes
                .iter()
                .map(|n| serde_json::json!({"name": n}))
                .collect();
            e["hints"] = serde_json::json!({"forZones": zones, "forNodes": nodes});
        }
        e
    }

    type Backends = Vec<(SocketAddr, u32)>;

    /// The backends of `api`'s ClusterIP and external IP, on node-a in zone-b.
    fn local_and_external(
        endpoints: &[serde_json::Value],
        node: Option<&str>,
    ) -> (Backends, Backends) {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "api", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.20", "externalIPs": ["192.0.2.8"],
                     "internalTrafficPolicy": "Local", "externalTrafficPolicy": "Cluster",
                     "ports": [{"port": 80}]}
        }))
        .unwrap();
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "api-1", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "api"}},
            "addressType": "IPv4",
            "ports": [{"port": 8080}],
            "endpoints": endpoints,
        }))
        .unwrap();
        let here = Locality {
            node,
            zone: Some("zone-b"),
            addresses: &[],
        };
        let out = desired(
            &[Arc::new(svc)],
            &[Arc::new(slice)],
            &spec(),
            &here,
            &Trust::default(),
        )
        .services;
        assert_eq!(out.len(), 2);
        (out[0].backends.clone(), out[1].backends.clone())
    }

    fn at(pairs: &[(u8, u32)]) -> Backends {
        pairs
            .iter()
            .map(|&(i, w)| (SocketAddr::from(([10, 1, 0, i], 8080)), w))
            .collect()
    }

    #[test]
    fn local_policy_keeps_this_nodes_endpoints() {
        let endpoints = [
            endpoint(1, "node-a", true, &["zone-a"], &[]),
            endpoint(2, "node-b", true, &["zone-b"], &[]),
            endpoint(3, "node-a", false, &[], &[]),
        ];
        let (cluster_ip, external) = local_and_external(&endpoints, Some("node-a"));
        // Local: node-a's endpoints only, the terminating one draining.
        assert_eq!(cluster_ip, at(&[(1, 1), (3, 0)]));
        // Cluster, every ready endpoint hinted: this zone's only.
        assert_eq!(external, at(&[(2, 1), (3, 0)]));
        // This node's name unknown: a Local policy can't be honoured, so
        // every endpoint rather than none.
        let (cluster_ip, _) = local_and_external(&endpoints, None);
        assert_eq!(cluster_ip, at(&[(1, 1), (2, 1), (3, 0)]));
    }

    #[test]
    fn serving_terminating_endpoints_take_over_when_none_is_ready() {
        let endpoints = [
            endpoint(2, "node-b", true, &[], &[]),
            endpoint(3, "node-a", false, &[], &[]),
        ];
        let (cluster_ip, external) = local_and_external(&endpoints, Some("node-a"));
        // Local: node-a has only a terminating endpoint: it takes new
        // connections rather than the Service dropping them.
        assert_eq!(cluster_ip, at(&[(3, 1)]));
        assert_eq!(external, at(&[(2, 1), (3, 0)]));
    }

    #[test]
    fn topology_hints_apply_only_when_complete_and_matching() {
        // One ready endpoint without hints: the slice is being rewritten,
        // hints are ignored.
        let partly = [
            endpoint(1, "node-a", true, &["zone-a"], &[]),
            endpoint(2, "node-b", true, &[], &[]),
        ];
        assert_eq!(
            local_and_external(&partly, Some("node-a")).1,
            at(&[(1, 1), (2, 1)])
        );
        // No endpoint hinted for this zone: all of them.
        let elsewhere = [
            endpoint(1, "node-a", true, &["zone-a"], &[]),
            endpoint(2, "node-c", true, &["zone-c"], &[]),
        ];
        assert_eq!(
            local_and_external(&elsewhere, Some("node-a")).1,
            at(&[(1, 1), (2, 1)])
        );
        // Node hints (PreferSameNode) come before zone hints.
        let same_node = [
            endpoint(1, "node-a", true, &["zone-a"], &["node-a"]),
            endpoint(2, "node-b", true, &["zone-b"], &["node-b"]),
        ];
        assert_eq!(
            local_and_external(&same_node, Some("node-a")).1,
            at(&[(1, 1)])
        );
        assert_eq!(
            local_and_external(&same_node, Some("node-x")).1,
            at(&[(2, 1)])
        );
    }

    /// A Service in `ns` with these externalIPs and endpoint addresses.
    fn claimed(ns: &str, external: &[&str], endpoints: &[&str]) -> (Service, EndpointSlice) {
        let svc = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": ns},
            "spec": {"clusterIP": "10.96.0.10", "externalIPs": external,
                     "ports": [{"port": 80}]}
        }))
        .unwrap();
        let endpoints: Vec<_> = endpoints
            .iter()
            .enumerate()
            .map(|(i, a)| serde_json::json!({"addresses": [a], "targetRef": {"name": format!("web-{i}")}}))
            .collect();
        let slice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": ns,
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"port": 8080}],
            "endpoints": endpoints,
        }))
        .unwrap();
        (svc, slice)
    }

    fn found(yaml: &str, svc: Service, slice: EndpointSlice) -> Found {
        let spec: Kubernetes = serde_saphyr::from_str(yaml).unwrap();
        let mut trust = Trust::new(&spec, &["10.0.0.10".parse().unwrap()]);
        trust.set_host_addresses(&[("eth0".into(), "10.0.1.1".parse().unwrap())]);
        desired(
            &[Arc::new(svc)],
            &[Arc::new(slice)],
            &spec,
            &Locality::default(),
            &trust,
        )
    }

    fn skipped(found: &Found) -> Vec<String> {
        found.skipped.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn services_of_other_namespaces_are_skipped() {
        let (svc, slice) = claimed("tenant", &[], &["10.1.0.2"]);
        let f = found("namespaces: [shop]", svc.clone(), slice.clone());
        assert!(f.services.is_empty());
        assert_eq!(
            skipped(&f),
            ["tenant/web: Service: namespace tenant is not in kubernetes.namespaces"]
        );
        // Unset: every namespace.
        assert_eq!(found("{}", svc, slice).services.len(), 1);
    }

    #[test]
    fn claimed_addresses_are_refused_one_by_one() {
        let (svc, slice) = claimed(
            "shop",
            &[
                "192.0.2.7",
                "10.0.1.1",
                "169.254.169.254",
                "10.0.0.10",
                "198.51.100.1",
            ],
            &["10.1.0.2", "127.0.0.1", "169.254.169.254", "10.1.0.3"],
        );
        let f = found(
            "addresses: [cluster_ip, external_ips]\nexternal_cidrs: [192.0.2.0/24, 10.0.0.0/8, 169.254.0.0/16]",
            svc,
            slice,
        );
        let vips: Vec<String> = f.services.iter().map(|s| s.vip.to_string()).collect();
        assert_eq!(vips, ["10.96.0.10", "192.0.2.7"]);
        let b = |a: &str| (a.parse::<SocketAddr>().unwrap(), 1);
        for s in &f.services {
            assert_eq!(s.backends, vec![b("10.1.0.2:8080"), b("10.1.0.3:8080")]);
        }
        assert_eq!(
            skipped(&f),
            [
                "shop/web: endpoint web-1: backend 127.0.0.1:8080: a loopback address can't be a backend",
                "shop/web: endpoint web-2: backend 169.254.169.254:8080: a cloud metadata address can't be a backend",
                "shop/web: externalIP 10.0.0.10: the API server's address can't be a VIP",
                "shop/web: externalIP 10.0.1.1: this node's address (on eth0) can't be a VIP",
                "shop/web: externalIP 169.254.169.254: a cloud metadata address can't be a VIP",
                "shop/web: externalIP 198.51.100.1: not inside kubernetes.external_cidrs",
            ]
        );
    }
}
