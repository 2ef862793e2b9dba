//! A service's discovery source: exactly one of DNS and etcd, with settings
//! that fit the service.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use super::{Refusal, min_and_max, refuse};
use crate::config::{Discovery, DiscoverySpec, DnsDiscovery, DnsRecord, EtcdDiscovery, Source};

/// A service's discovery source, under `at` (`services[i].discovery`).
pub(super) fn discovery(
    d: &Discovery,
    vip: IpAddr,
    has_static_backends: bool,
    at: &str,
) -> Result<DiscoverySpec, Refusal> {
    if has_static_backends {
        return Err(refuse(
            at,
            "dns/etcd",
            "a service takes its backends from `backends` or from `discovery`, not both",
        ));
    }
    let source = match (&d.dns, &d.etcd) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(refuse(at, "{}", "name exactly one source: dns or etcd"));
        }
        (Some(dns), None) => dns_source(dns, vip, &format!("{at}.dns"))?,
        (None, Some(etcd)) => etcd_source(etcd, &format!("{at}.etcd"))?,
    };
    Ok(DiscoverySpec {
        source,
        allow_empty: d.allow_empty,
    })
}

fn dns_source(dns: &DnsDiscovery, vip: IpAddr, at: &str) -> Result<Source, Refusal> {
    let field = |name: &str| format!("{at}.{name}");
    if dns.name.is_empty() || dns.name.len() > 253 || dns.name.contains(char::is_whitespace) {
        return Err(refuse(field("name"), &dns.name, "not a DNS name"));
    }
    match (dns.record, dns.port) {
        (DnsRecord::Srv, Some(port)) => {
            return Err(refuse(
                field("port"),
                port,
                "SRV records carry the port: leave it out",
            ));
        }
        (DnsRecord::A | DnsRecord::Aaaa, None | Some(0)) => {
            return Err(refuse(
                field("port"),
                dns.port.unwrap_or(0),
                "required (1 to 65535) with type a or aaaa",
            ));
        }
        (DnsRecord::A, _) if !vip.is_ipv4() => {
            return Err(refuse(
                field("type"),
                "a",
                "an IPv6 service needs type aaaa",
            ));
        }
        (DnsRecord::Aaaa, _) if vip.is_ipv4() => {
            return Err(refuse(
                field("type"),
                "aaaa",
                "an IPv4 service needs type a",
            ));
        }
        _ => {}
    }
    let server = match &dns.server {
        None => None,
        Some(text) => Some(
            text.parse::<SocketAddr>()
                .or_else(|_| text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                .map_err(|_| refuse(field("server"), text, "expected IP or IP:PORT"))?,
        ),
    };
    min_and_max(
        at,
        "dns",
        ("min_interval_seconds", dns.min_interval_seconds),
        ("max_interval_seconds", dns.max_interval_seconds),
    )?;
    Ok(Source::Dns {
        name: dns.name.clone(),
        record: dns.record,
        port: dns.port,
        server,
        min_interval: Duration::from_secs(dns.min_interval_seconds.into()),
        max_interval: Duration::from_secs(dns.max_interval_seconds.into()),
    })
}

fn etcd_source(etcd: &EtcdDiscovery, at: &str) -> Result<Source, Refusal> {
    if etcd.endpoints.is_empty() {
        return Err(refuse(
            format!("{at}.endpoints"),
            "[]",
            "at least one endpoint is needed",
        ));
    }
    for (k, url) in etcd.endpoints.iter().enumerate() {
        let rest = url.strip_prefix("http://").unwrap_or("");
        if rest.is_empty() || rest.contains(['/', '?', '#', ' ']) {
            return Err(refuse(
                format!("{at}.endpoints[{k}]"),
                url,
                "expected http://HOST:PORT (TLS is not supported yet)",
            ));
        }
    }
    if etcd.prefix.is_empty() {
        return Err(refuse(format!("{at}.prefix"), "\"\"", "must not be empty"));
    }
    Ok(Source::Etcd {
        endpoints: etcd.endpoints.clone(),
        prefix: etcd.prefix.clone(),
    })
}
