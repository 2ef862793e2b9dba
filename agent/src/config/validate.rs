//! Validation: what serde can't check, section by section. Every refusal
//! names the field (its path in the file) and the value as written.

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use super::{
    Affinity, BackendSpec, Config, ConfigError, Conntrack, Control, Encapsulation, Failure,
    Forwarding, Interface, KubeAddress, Kubernetes, Limits, Maglev, Node, Pinning, Protocol,
    Service, ServiceSpec, TrafficPolicy, Validated,
};

mod address;
mod source;

use super::MAX_AFFINITY_TIMEOUT_SECONDS;

pub use address::{Cidr, RefusedClass, refused_class};

/// Longest conntrack idle timeout accepted, in seconds (30 days).
const MAX_CONNTRACK_TIMEOUT: u32 = 2_592_000;

/// The largest weight accepted; keeps Maglev's round count bounded.
pub const MAX_WEIGHT: u32 = 1000;

/// A refused setting: the field, the value as written, and why.
struct Refusal {
    field: String,
    value: String,
    why: String,
}

/// The one way a refusal is built.
fn refuse(field: impl Into<String>, value: impl fmt::Display, why: impl Into<String>) -> Refusal {
    Refusal {
        field: field.into(),
        value: value.to_string(),
        why: why.into(),
    }
}

/// Checks `raw` and resolves its services; the first refusal is the error.
pub(super) fn validate(raw: Config, path: &str) -> Result<Validated, ConfigError> {
    match check(&raw) {
        Ok(services) => Ok(Validated { raw, services }),
        Err(Refusal { field, value, why }) => Err(ConfigError::Invalid {
            path: path.to_string(),
            field,
            value,
            why,
        }),
    }
}

/// The sections in the order they are checked (the first refusal wins).
fn check(raw: &Config) -> Result<Vec<ServiceSpec>, Refusal> {
    interfaces(&raw.interfaces)?;
    if let Some(p) = &raw.pinning {
        pinning(p)?;
    }
    if let Some(k) = &raw.kubernetes {
        kubernetes(k)?;
    }
    control(&raw.control)?;
    conntrack(&raw.conntrack)?;
    maglev_and_limits(&raw.maglev, &raw.limits, raw.services.len())?;
    let node_addresses = node(&raw.node)?;
    services(&raw.services, &raw.limits, &node_addresses)
}

/// `node`: a name if set, addresses that can be VIPs, each once. Returns
/// the configured addresses (empty: the host's, found at each apply).
fn node(n: &Node) -> Result<Vec<IpAddr>, Refusal> {
    if let Some(name) = &n.name
        && (name.trim().is_empty() || name.len() > 253)
    {
        return Err(refuse(
            "node.name",
            name,
            "a node name of 1 to 253 characters",
        ));
    }
    let mut out: Vec<IpAddr> = Vec::new();
    for (i, text) in n.addresses.iter().flatten().enumerate() {
        let field = format!("node.addresses[{i}]");
        let ip: IpAddr = text
            .parse()
            .map_err(|_| refuse(&field, text, "not an IPv4 or IPv6 address"))?;
        if let Some(class) = refused_class(ip) {
            return Err(refuse(
                &field,
                text,
                format!("{class} can't be a node address"),
            ));
        }
        if out.contains(&ip) {
            return Err(refuse(&field, text, "listed twice"));
        }
        out.push(ip);
    }
    if n.addresses.as_ref().is_some_and(Vec::is_empty) {
        return Err(refuse(
            "node.addresses",
            "[]",
            "name at least one address, or leave it out for every address of the host",
        ));
    }
    Ok(out)
}

fn interfaces(interfaces: &[Interface]) -> Result<(), Refusal> {
    if interfaces.is_empty() {
        return Err(refuse(
            "interfaces",
            "[]",
            "at least one interface is needed",
        ));
    }
    let mut names = HashSet::new();
    for (i, iface) in interfaces.iter().enumerate() {
        let field = format!("interfaces[{i}].name");
        if iface.name.is_empty() || iface.name.len() > 15 || iface.name.contains('/') {
            return Err(refuse(
                field,
                &iface.name,
                "not a Linux interface name (1 to 15 characters, no '/')",
            ));
        }
        if !names.insert(&iface.name) {
            return Err(refuse(field, &iface.name, "listed twice"));
        }
    }
    Ok(())
}

fn pinning(p: &Pinning) -> Result<(), Refusal> {
    if !p.directory.starts_with('/') || p.directory.len() < 2 {
        return Err(refuse(
            "pinning.directory",
            &p.directory,
            "must be an absolute path on bpffs (e.g. /sys/fs/bpf/sluice/node-1)",
        ));
    }
    Ok(())
}

fn control(c: &Control) -> Result<(), Refusal> {
    for (field, path) in [
        ("control.socket", &c.socket),
        ("control.state_directory", &c.state_directory),
    ] {
        if !path.starts_with('/') || path.len() < 2 {
            return Err(refuse(field, path, "must be an absolute path"));
        }
    }
    // sun_path holds 108 bytes with the terminating NUL.
    if c.socket.len() > 107 {
        return Err(refuse(
            "control.socket",
            &c.socket,
            "longer than a Unix socket path may be (107 bytes)",
        ));
    }
    Ok(())
}

fn kubernetes(k: &Kubernetes) -> Result<(), Refusal> {
    if let Some(url) = &k.api_server
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        return Err(refuse(
            "kubernetes.api_server",
            url,
            "expected an http:// or https:// URL",
        ));
    }
    if k.service_selector.trim().is_empty() {
        return Err(refuse(
            "kubernetes.service_selector",
            "\"\"",
            "an empty selector would take over every Service: name a label (e.g. sluice.io/enabled=true)",
        ));
    }
    if k.addresses.is_empty() {
        return Err(refuse(
            "kubernetes.addresses",
            "[]",
            "name at least one of cluster_ip, external_ips, load_balancer, node_ports",
        ));
    }
    if let Some(ns) = &k.namespace {
        namespace_name(ns, "kubernetes.namespace")?;
        if k.namespaces.is_some() {
            return Err(refuse(
                "kubernetes.namespace",
                ns,
                "set namespace or namespaces, not both (namespaces: [a, b] lists them all)",
            ));
        }
    }
    if let Some(list) = &k.namespaces {
        if list.is_empty() {
            return Err(refuse(
                "kubernetes.namespaces",
                "[]",
                "name at least one namespace, or leave it out for every namespace",
            ));
        }
        let mut seen = HashSet::new();
        for (i, ns) in list.iter().enumerate() {
            let field = format!("kubernetes.namespaces[{i}]");
            namespace_name(ns, &field)?;
            if !seen.insert(ns) {
                return Err(refuse(field, ns, "listed twice"));
            }
        }
    }
    if let Some(cidrs) = &k.external_cidrs {
        let external = k
            .addresses
            .iter()
            .any(|a| matches!(a, KubeAddress::ExternalIps | KubeAddress::LoadBalancer));
        if !external {
            return Err(refuse(
                "kubernetes.external_cidrs",
                cidrs.join(", "),
                "only used with addresses external_ips or load_balancer",
            ));
        }
        if cidrs.is_empty() {
            return Err(refuse(
                "kubernetes.external_cidrs",
                "[]",
                "allows no address: name a block, or drop external_ips and load_balancer from addresses",
            ));
        }
        for (i, text) in cidrs.iter().enumerate() {
            Cidr::parse(text)
                .map_err(|why| refuse(format!("kubernetes.external_cidrs[{i}]"), text, why))?;
        }
    }
    failure(&k.failure, "kubernetes.failure")?;
    drain_timeout(k.drain_timeout_seconds, "kubernetes.drain_timeout_seconds")?;
    Ok(())
}

/// A Kubernetes namespace name: a DNS label (RFC 1123).
fn namespace_name(ns: &str, field: &str) -> Result<(), Refusal> {
    let label = !ns.is_empty()
        && ns.len() <= 63
        && ns
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !ns.starts_with('-')
        && !ns.ends_with('-');
    if !label {
        return Err(refuse(
            field,
            ns,
            "not a namespace name (lowercase letters, digits and '-', at most 63)",
        ));
    }
    Ok(())
}

fn conntrack(c: &Conntrack) -> Result<(), Refusal> {
    if c.max_entries < 1024 {
        return Err(refuse(
            "conntrack.max_entries",
            c.max_entries,
            "must be at least 1024",
        ));
    }
    if c.affinity_max_entries < 1024 {
        return Err(refuse(
            "conntrack.affinity_max_entries",
            c.affinity_max_entries,
            "must be at least 1024",
        ));
    }
    if c.half_open_max_entries < 1024 {
        return Err(refuse(
            "conntrack.half_open_max_entries",
            c.half_open_max_entries,
            "must be at least 1024",
        ));
    }
    let t = &c.timeouts;
    for (name, value) in [
        ("tcp_syn_sent", t.tcp_syn_sent),
        ("tcp_established", t.tcp_established),
        ("tcp_closing", t.tcp_closing),
        ("tcp_time_wait", t.tcp_time_wait),
        ("udp", t.udp),
    ] {
        if !(1..=MAX_CONNTRACK_TIMEOUT).contains(&value) {
            return Err(refuse(
                format!("conntrack.timeouts.{name}"),
                value,
                "must be 1 to 2592000 seconds (30 days)",
            ));
        }
    }
    Ok(())
}

/// The Maglev table and the maps' capacity, for `services` services.
fn maglev_and_limits(maglev: &Maglev, limits: &Limits, services: usize) -> Result<(), Refusal> {
    let m = maglev.table_size;
    if !(251..=1_000_003).contains(&m) || !is_prime(m) {
        return Err(refuse(
            "maglev.table_size",
            m,
            "must be a prime between 251 and 1000003 (e.g. 16381 or 65537)",
        ));
    }
    if limits.max_services == 0 || limits.max_services > 65_536 {
        return Err(refuse(
            "limits.max_services",
            limits.max_services,
            "must be between 1 and 65536",
        ));
    }
    if limits.max_backends == 0 || limits.max_backends > 1 << 20 {
        return Err(refuse(
            "limits.max_backends",
            limits.max_backends,
            "must be between 1 and 1048576",
        ));
    }
    if services > limits.max_services as usize {
        return Err(refuse(
            "services",
            format!("{services} services"),
            format!("more than limits.max_services ({})", limits.max_services),
        ));
    }
    Ok(())
}

/// What the services before the one being checked have taken.
#[derive(Default)]
struct Taken {
    names: HashSet<String>,
    /// (VIP, port, protocol) → the service's name.
    frontends: std::collections::HashMap<(IpAddr, u16, Protocol), String>,
    /// (node port, protocol, IPv4) → the service's name. A node port is on
    /// the node addresses of its VIP's family: an IPv4 and an IPv6 service
    /// may share one (a dual-stack pair, as Kubernetes gives them).
    node_ports: std::collections::HashMap<(u16, Protocol, bool), String>,
    /// `node.addresses` as configured (empty: the host's, not known here).
    node_addresses: Vec<IpAddr>,
}

fn services(
    list: &[Service],
    limits: &Limits,
    node_addresses: &[IpAddr],
) -> Result<Vec<ServiceSpec>, Refusal> {
    let mut taken = Taken {
        node_addresses: node_addresses.to_vec(),
        ..Taken::default()
    };
    let services = list
        .iter()
        .enumerate()
        .map(|(i, s)| service(s, &format!("services[{i}]"), &mut taken))
        .collect::<Result<Vec<_>, _>>()?;
    // A NodePort entry per node address carries the service's ranges too.
    // (With the default node addresses, read at apply time, the apply
    // refuses what doesn't fit.)
    let entries = |s: &ServiceSpec| {
        1 + if s.node_port.is_some() {
            node_addresses
                .iter()
                .filter(|a| a.is_ipv4() == s.vip.is_ipv4())
                .count()
        } else {
            0
        }
    };
    let ranges: usize = services
        .iter()
        .map(|s| s.allowed_sources.as_ref().map_or(0, Vec::len) * entries(s))
        .sum();
    if ranges > agent_common::MAX_SOURCE_RANGES as usize {
        return Err(refuse(
            "services",
            format!("{ranges} allowed_sources entries"),
            format!(
                "more than the {} the kernel's SOURCE_RANGES map holds",
                agent_common::MAX_SOURCE_RANGES
            ),
        ));
    }
    let backend_total: usize = services.iter().map(|s| s.backends.len()).sum();
    if backend_total > limits.max_backends as usize {
        return Err(refuse(
            "services",
            format!("{backend_total} backends"),
            format!("more than limits.max_backends ({})", limits.max_backends),
        ));
    }
    Ok(services)
}

/// One service, whose fields are under `at` (`services[i]`).
fn service(s: &Service, at: &str, taken: &mut Taken) -> Result<ServiceSpec, Refusal> {
    let field = |name: &str| format!("{at}.{name}");
    if s.name.is_empty()
        || !s
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(refuse(
            field("name"),
            &s.name,
            "use letters, digits, '-', '_' and '.'",
        ));
    }
    if !taken.names.insert(s.name.clone()) {
        return Err(refuse(
            field("name"),
            &s.name,
            "two services have this name",
        ));
    }
    let vip: IpAddr = s
        .vip
        .parse()
        .map_err(|_| refuse(field("vip"), &s.vip, "not an IPv4 or IPv6 address"))?;
    if let Some(class) = refused_class(vip) {
        return Err(refuse(
            field("vip"),
            &s.vip,
            format!("{class} can't be a VIP"),
        ));
    }
    if s.port == 0 {
        return Err(refuse(field("port"), s.port, "must be 1 to 65535"));
    }
    if let Some(other) = taken.frontends.get(&(vip, s.port, s.protocol)) {
        return Err(refuse(
            field("vip"),
            &s.vip,
            format!("service {other} has the same VIP, port and protocol"),
        ));
    }
    if taken.node_addresses.contains(&vip)
        && let Some(other) = taken.node_ports.get(&(s.port, s.protocol, vip.is_ipv4()))
    {
        return Err(refuse(
            field("vip"),
            &s.vip,
            format!(
                "a node address, and service {other}'s node_port {}/{} is on it",
                s.port,
                s.protocol.as_str()
            ),
        ));
    }
    taken
        .frontends
        .insert((vip, s.port, s.protocol), s.name.clone());
    let node_port = node_port(s, vip, &field("node_port"), taken)?;
    let backend_nodes = backend_nodes(&s.backends, &field("backends"))?;
    let local_only = s.external_traffic_policy == TrafficPolicy::Local;
    if local_only && s.discovery.is_some() {
        return Err(refuse(
            field("external_traffic_policy"),
            "local",
            "needs the backends' nodes (backends[].node), which discovery doesn't give",
        ));
    }
    let snat_ip = snat_ip(s, vip, &field("snat_ip"))?;
    let dsr = dsr(s, &field("dsr"))?;
    let backends = static_backends(&s.backends, vip, &field("backends"))?;
    if dsr.is_some() {
        dsr_backend_ports(s, &backends, &field("backends"))?;
        // A NodePort entry SNATs towards other nodes' backends: DSR keeps
        // the client's address, so the two don't combine (yet).
        if let Some(port) = s.node_port {
            return Err(refuse(
                field("node_port"),
                port,
                "not available with forwarding: dsr (a NodePort reaches other nodes' backends by SNAT)",
            ));
        }
    }
    failure(&s.failure, &field("failure"))?;
    let discovery = match &s.discovery {
        None => None,
        Some(d) => Some(source::discovery(
            d,
            vip,
            !s.backends.is_empty(),
            &field("discovery"),
        )?),
    };
    let drain_timeout = drain_timeout(s.drain_timeout_seconds, field("drain_timeout_seconds"))?;
    let allowed_sources = allowed_sources(&s.allowed_sources, &field("allowed_sources"))?;
    let affinity_timeout = affinity(s.affinity.as_ref(), &field("affinity"))?;
    Ok(ServiceSpec {
        name: s.name.clone(),
        vip,
        port: s.port,
        protocol: s.protocol,
        snat_ip,
        backends,
        failure: s.failure.clone(),
        discovery,
        drain_timeout,
        backend_latency_histogram: s.metrics.backend_latency_histogram,
        pods: Default::default(),
        affinity_timeout,
        algorithm: s.algorithm,
        allowed_sources,
        node_port,
        local_only,
        backend_nodes,
        snat_remote: None,
        remote_backends: Default::default(),
        dsr,
    })
}

/// The `dsr` options: only with `forwarding: dsr` (where they default to L2).
fn dsr(s: &Service, field: &str) -> Result<Option<Encapsulation>, Refusal> {
    match (s.forwarding, s.dsr) {
        (Forwarding::Dsr, d) => Ok(Some(d.unwrap_or_default().encapsulation)),
        (_, Some(d)) => Err(refuse(
            field,
            format!("{{encapsulation: {}}}", d.encapsulation.as_str()),
            "only used with forwarding: dsr",
        )),
        (_, None) => Ok(None),
    }
}

/// DSR leaves the packet's destination port as the client sent it (the
/// backend answers from the VIP's port, to the client directly): a backend
/// must listen on the service's port.
fn dsr_backend_ports(s: &Service, backends: &[(SocketAddr, u32)], at: &str) -> Result<(), Refusal> {
    for (j, (addr, _)) in backends.iter().enumerate() {
        if addr.port() != s.port {
            return Err(refuse(
                format!("{at}[{j}].address"),
                &s.backends[j].address,
                format!(
                    "forwarding: dsr can't change the port: a backend must listen on the service's port ({})",
                    s.port
                ),
            ));
        }
    }
    Ok(())
}

/// `node_port` of service `s` (at `vip`) under `field`: not 0, and no other
/// service's node port or frontend on a node address with the same port and
/// protocol (both named).
fn node_port(
    s: &Service,
    vip: IpAddr,
    field: &str,
    taken: &mut Taken,
) -> Result<Option<u16>, Refusal> {
    let Some(port) = s.node_port else {
        return Ok(None);
    };
    if port == 0 {
        return Err(refuse(field, port, "must be 1 to 65535"));
    }
    if let Some(other) = taken.node_ports.get(&(port, s.protocol, vip.is_ipv4())) {
        return Err(refuse(
            field,
            port,
            format!(
                "service {other} has node_port {port}/{} too, of the same family (a node port is on every node address of its VIP's family)",
                s.protocol.as_str()
            ),
        ));
    }
    for addr in taken
        .node_addresses
        .iter()
        .filter(|a| a.is_ipv4() == vip.is_ipv4())
    {
        if let Some(other) = taken.frontends.get(&(*addr, port, s.protocol)) {
            return Err(refuse(
                field,
                port,
                format!(
                    "service {other} has {} as its VIP, port and protocol, a node address",
                    SocketAddr::new(*addr, port)
                ),
            ));
        }
    }
    taken
        .node_ports
        .insert((port, s.protocol, vip.is_ipv4()), s.name.clone());
    Ok(Some(port))
}

/// The backends' `node`, under `at` (`services[i].backends`).
fn backend_nodes(
    list: &[BackendSpec],
    at: &str,
) -> Result<std::collections::BTreeMap<SocketAddr, String>, Refusal> {
    let mut out = std::collections::BTreeMap::new();
    for (j, b) in list.iter().enumerate() {
        let Some(node) = &b.node else { continue };
        if node.trim().is_empty() || node.len() > 253 {
            return Err(refuse(
                format!("{at}[{j}].node"),
                node,
                "a node name of 1 to 253 characters",
            ));
        }
        // The address was checked by `static_backends`.
        if let Ok(addr) = b.address.parse::<SocketAddr>() {
            out.insert(addr, node.clone());
        }
    }
    Ok(out)
}

/// `allowed_sources` under `at`: blocks, each listed once; empty means no
/// restriction (as kube-proxy reads an empty `loadBalancerSourceRanges`).
fn allowed_sources(list: &[String], at: &str) -> Result<Option<Vec<Cidr>>, Refusal> {
    if list.is_empty() {
        return Ok(None);
    }
    let mut cidrs: Vec<Cidr> = Vec::with_capacity(list.len());
    for (i, text) in list.iter().enumerate() {
        let cidr = Cidr::parse(text).map_err(|why| refuse(format!("{at}[{i}]"), text, why))?;
        if cidrs.contains(&cidr) {
            return Err(refuse(format!("{at}[{i}]"), text, "listed twice"));
        }
        cidrs.push(cidr);
    }
    Ok(Some(cidrs))
}

/// A service's `affinity` (under `at`): its timeout in seconds, if any.
fn affinity(a: Option<&Affinity>, at: &str) -> Result<Option<u32>, Refusal> {
    let Some(a) = a else {
        return Ok(None);
    };
    let Some(client_ip) = &a.client_ip else {
        return Err(refuse(at, "{}", "name the kind of affinity: client_ip"));
    };
    let t = client_ip.timeout_seconds;
    if !(1..=MAX_AFFINITY_TIMEOUT_SECONDS).contains(&t) {
        return Err(refuse(
            format!("{at}.client_ip.timeout_seconds"),
            t,
            format!("must be 1 to {MAX_AFFINITY_TIMEOUT_SECONDS} (one day, as Kubernetes allows)"),
        ));
    }
    Ok(Some(t))
}

fn snat_ip(s: &Service, vip: IpAddr, field: &str) -> Result<Option<IpAddr>, Refusal> {
    // With IPIP DSR, `snat_ip` is the tunnel's outer source address: the
    // backend host's decap sees it, the client never does.
    let tunnel = s.forwarding == Forwarding::Dsr
        && s.dsr.unwrap_or_default().encapsulation == Encapsulation::Ipip;
    match (&s.snat_ip, s.forwarding == Forwarding::Snat || tunnel) {
        (None, true) if tunnel => Err(refuse(
            field,
            "(missing)",
            "required with dsr.encapsulation: ipip (the tunnel's outer source address)",
        )),
        (None, true) => Err(refuse(field, "(missing)", "required with forwarding: snat")),
        (Some(text), true) => {
            let ip: IpAddr = text
                .parse()
                .map_err(|_| refuse(field, text, "not an IP address"))?;
            if ip.is_ipv4() != vip.is_ipv4() {
                return Err(refuse(field, text, "must be of the same family as the VIP"));
            }
            if let Some(class) = refused_class(ip) {
                return Err(refuse(field, text, format!("{class} can't be snat_ip")));
            }
            Ok(Some(ip))
        }
        (Some(text), false) => Err(refuse(
            field,
            text,
            "only used with forwarding: snat, or dsr with dsr.encapsulation: ipip",
        )),
        (None, false) => Ok(None),
    }
}

fn drain_timeout(seconds: u32, field: impl Into<String>) -> Result<Duration, Refusal> {
    if seconds > 86_400 {
        return Err(refuse(field, seconds, "must be 0 to 86400"));
    }
    Ok(Duration::from_secs(seconds.into()))
}

/// Why an address and weight can't be a backend of a service. The text is
/// the one discovery shows ("answer refused: …"); the config file refuses
/// the same things in its own words, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    #[error("backend {addr}: not of the VIP's address family ({vip})")]
    Family { addr: SocketAddr, vip: IpAddr },
    #[error("backend {addr}: needs a non-zero port")]
    Port { addr: SocketAddr },
    /// Loopback, link-local, multicast, … (see `refused_class`).
    #[error("backend {addr}: {class} can't be a backend")]
    Class {
        addr: SocketAddr,
        class: RefusedClass,
    },
    #[error("backend {addr}: weight {weight} over the maximum {max}", max = MAX_WEIGHT)]
    Weight { addr: SocketAddr, weight: u32 },
}

/// A backend of a service at `vip`, configured or discovered: of the VIP's
/// family, an address of no refused class (`refused_class`: not loopback,
/// link-local, multicast, …), a non-zero port, a weight of at most
/// `MAX_WEIGHT` (0: draining). Checked in that order. An address listed
/// twice is the caller's business: the file refuses it, discovery merges.
pub fn backend(addr: SocketAddr, weight: u32, vip: IpAddr) -> Result<(), BackendError> {
    if addr.is_ipv4() != vip.is_ipv4() {
        return Err(BackendError::Family { addr, vip });
    }
    if let Some(class) = refused_class(addr.ip()) {
        return Err(BackendError::Class { addr, class });
    }
    if addr.port() == 0 {
        return Err(BackendError::Port { addr });
    }
    if weight > MAX_WEIGHT {
        return Err(BackendError::Weight { addr, weight });
    }
    Ok(())
}

/// The file's backends of a service at `vip`, under `at` (`services[i].backends`).
fn static_backends(
    list: &[BackendSpec],
    vip: IpAddr,
    at: &str,
) -> Result<Vec<(SocketAddr, u32)>, Refusal> {
    let mut backends = Vec::with_capacity(list.len());
    let mut seen = HashSet::new();
    for (j, b) in list.iter().enumerate() {
        let field = |name: &str| format!("{at}[{j}].{name}");
        let addr: SocketAddr = b.address.parse().map_err(|_| {
            refuse(
                field("address"),
                &b.address,
                "expected IP:PORT, or [IPv6]:PORT",
            )
        })?;
        // An address seen before passed the family and class checks, so
        // refusing it first keeps "listed twice" ahead of its weight.
        if !seen.insert(addr) {
            return Err(refuse(field("address"), &b.address, "listed twice"));
        }
        backend(addr, b.weight, vip).map_err(|e| match e {
            BackendError::Family { .. } => refuse(
                field("address"),
                &b.address,
                "must be of the same family as the service's VIP",
            ),
            BackendError::Class { class, .. } => refuse(
                field("address"),
                &b.address,
                format!("{class} can't be a backend"),
            ),
            BackendError::Port { .. } => {
                refuse(field("address"), &b.address, "needs a non-zero port")
            }
            BackendError::Weight { weight, .. } => refuse(
                field("weight"),
                weight,
                format!("must be 0 (drain) to {MAX_WEIGHT}"),
            ),
        })?;
        backends.push((addr, b.weight));
    }
    Ok(backends)
}

/// Failure handling, under `at` (`kubernetes.failure`, `services[i].failure`).
fn failure(f: &Failure, at: &str) -> Result<(), Refusal> {
    let field = |name: &str| format!("{at}.{name}");
    if f.consecutive_failures == 0 {
        return Err(refuse(
            field("consecutive_failures"),
            f.consecutive_failures,
            "must be at least 1",
        ));
    }
    min_and_max(
        at,
        "failure",
        ("ejection_seconds", f.ejection_seconds),
        ("max_ejection_seconds", f.max_ejection_seconds),
    )?;
    if !(10..=60_000).contains(&f.connect_timeout_ms) {
        return Err(refuse(
            field("connect_timeout_ms"),
            f.connect_timeout_ms,
            "must be 10 to 60000",
        ));
    }
    if f.max_ejected_percent > 100 {
        return Err(refuse(
            field("max_ejected_percent"),
            f.max_ejected_percent,
            "must be 0 to 100",
        ));
    }
    if !(1..=agent_common::FAILING_CLIENTS as u32).contains(&f.min_distinct_clients) {
        return Err(refuse(
            field("min_distinct_clients"),
            f.min_distinct_clients,
            format!("must be 1 to {}", agent_common::FAILING_CLIENTS),
        ));
    }
    Ok(())
}

/// A minimum and a maximum under `at`, each as (name, value): the minimum
/// is at least 1, the maximum at least the minimum (which the message names
/// under `section`, e.g. `failure.ejection_seconds`).
fn min_and_max(
    at: &str,
    section: &str,
    (min_name, min): (&str, u32),
    (max_name, max): (&str, u32),
) -> Result<(), Refusal> {
    if min == 0 {
        return Err(refuse(
            format!("{at}.{min_name}"),
            min,
            "must be at least 1",
        ));
    }
    if max < min {
        return Err(refuse(
            format!("{at}.{max_name}"),
            max,
            format!("must be at least {section}.{min_name}"),
        ));
    }
    Ok(())
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
