//! DNS discovery: SRV records (target, port, weight), or A/AAAA records with
//! a configured port. Re-resolved when the answer's TTL runs out, clamped to
//! [min_interval, max_interval]; after a failure, retried every min_interval.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use hickory_resolver::{
    TokioResolver,
    config::{NameServerConfig, ResolverConfig},
    net::{NetError, runtime::TokioRuntimeProvider},
    proto::rr::{RData, RecordType},
};

use super::{Backends, DiscoveryError, DnsError, Outcome, Reporter};
use crate::config::{DnsRecord, MAX_WEIGHT, Source};

/// One query's limit; a server that doesn't answer in time is a failure.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// `v4`: the service's family; SRV targets' addresses of the other family
/// are left out (a dual-stack target serves both kinds of service).
pub async fn run(source: Source, v4: bool, reporter: Reporter) {
    let Source::Dns {
        name,
        record,
        port,
        server,
        min_interval,
        max_interval,
    } = source
    else {
        return;
    };
    let resolver = loop {
        match resolver(server) {
            Ok(r) => break r,
            // E.g. an unreadable resolv.conf: report, and try again.
            Err(e) => {
                if !reporter
                    .send(Outcome::Failed(DiscoveryError::DnsResolver(e)))
                    .await
                {
                    return;
                }
                tokio::time::sleep(min_interval).await;
            }
        }
    };
    loop {
        let (outcome, wait) = match resolve(&resolver, &name, record, port, v4).await {
            Ok((backends, ttl)) => (
                Outcome::Backends(backends),
                ttl.clamp(min_interval, max_interval),
            ),
            Err(error) => {
                let name = name.clone();
                let error = Box::new(error);
                let error = DiscoveryError::Dns { name, error };
                (Outcome::Failed(error), min_interval)
            }
        };
        if !reporter.send(outcome).await {
            return;
        }
        tokio::time::sleep(wait).await;
    }
}

fn resolver(server: Option<SocketAddr>) -> Result<TokioResolver, NetError> {
    let mut builder = match server {
        Some(addr) => {
            let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
            for c in &mut ns.connections {
                c.port = addr.port();
            }
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![ns]),
                TokioRuntimeProvider::default(),
            )
        }
        None => TokioResolver::builder_tokio()?,
    };
    let options = builder.options_mut();
    // Each resolution asks the server: the interval is ours to pace (TTL,
    // floor, ceiling), not a cache's.
    options.cache_size = 0;
    options.timeout = QUERY_TIMEOUT;
    options.attempts = 1;
    // Both families: the service's is picked from the answer.
    options.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
    builder.build()
}

/// The backends and the TTL of the answer (the smallest of its records).
async fn resolve(
    resolver: &TokioResolver,
    name: &str,
    record: DnsRecord,
    port: Option<u16>,
    v4: bool,
) -> Result<(Backends, Duration), DnsError> {
    let mut ttl = u32::MAX;
    let mut backends = Vec::new();
    match record {
        DnsRecord::Srv => {
            let lookup = match resolver.lookup(name, RecordType::SRV).await {
                Ok(lookup) => lookup,
                // The name exists no more, or has no such records: DNS says
                // "no backends" (held back unless allow_empty).
                Err(e) if e.is_no_records_found() => return Ok((Vec::new(), Duration::ZERO)),
                Err(e) => return Err(DnsError::Lookup(e)),
            };
            let srvs: Vec<_> = lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::SRV(srv) => Some((r.ttl, srv.clone())),
                    _ => None,
                })
                .collect();
            // Only the most preferred priority serves; the others are
            // fallbacks in SRV's sense.
            let best = srvs.iter().map(|(_, s)| s.priority).min();
            for (record_ttl, srv) in srvs.iter().filter(|(_, s)| Some(s.priority) == best) {
                ttl = ttl.min(*record_ttl);
                let target = srv.target.to_ascii();
                let addrs = resolver.lookup_ip(target.as_str()).await.map_err(|error| {
                    DnsError::SrvTarget {
                        target: target.clone(),
                        error,
                    }
                })?;
                // SRV weight 0 means "rarely", not "never": it gets the
                // smallest share Sluice has.
                let weight = u32::from(srv.weight).clamp(1, MAX_WEIGHT);
                for ip in addrs.iter().filter(|ip| ip.is_ipv4() == v4) {
                    backends.push((SocketAddr::new(ip, srv.port), weight));
                }
                if let Some(min) = addrs.as_lookup().answers().iter().map(|r| r.ttl).min() {
                    ttl = ttl.min(min);
                }
            }
        }
        DnsRecord::A | DnsRecord::Aaaa => {
            let kind = if record == DnsRecord::A {
                RecordType::A
            } else {
                RecordType::AAAA
            };
            let lookup = match resolver.lookup(name, kind).await {
                Ok(lookup) => lookup,
                Err(e) if e.is_no_records_found() => return Ok((Vec::new(), Duration::ZERO)),
                Err(e) => return Err(DnsError::Lookup(e)),
            };
            for r in lookup.answers() {
                let ip: IpAddr = match &r.data {
                    RData::A(a) => a.0.into(),
                    RData::AAAA(a) => a.0.into(),
                    _ => continue,
                };
                ttl = ttl.min(r.ttl);
                backends.push((SocketAddr::new(ip, port.unwrap_or(0)), 1));
            }
        }
    }
    let ttl = if ttl == u32::MAX { 0 } else { ttl };
    Ok((backends, Duration::from_secs(ttl.into())))
}
