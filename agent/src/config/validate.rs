//! Validation: what serde can't check. Every refusal names the field and
//! the value.

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, SocketAddr},
};

use super::*;

/// Longest conntrack idle timeout accepted, in seconds (30 days).
const MAX_CONNTRACK_TIMEOUT: u32 = 2_592_000;

/// The largest weight accepted; keeps Maglev's round count bounded.
pub const MAX_WEIGHT: u32 = 1000;

pub(super) fn validate(raw: Config, path: &str) -> Result<Validated, ConfigError> {
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
