//! DNS discovery: SRV records (target, port, weight), or A/AAAA records with
//! a configured port. Re-resolved when the answer's TTL runs out, clamped to
//! [min_interval, max_interval]; after a failure, retried every min_interval.
//!
//! What one answer may bring is bounded: at most `MAX_RECORDS` backends (the
//! first by address, the same on every node), and a bad SRV target (one
//! that doesn't exist, or whose address fails the config's backend check)
//! skips only itself. Each such note is logged when it is news.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use hickory_resolver::{
    TokioResolver,
    config::{NameServerConfig, ResolverConfig},
    net::{NetError, runtime::TokioRuntimeProvider},
    proto::rr::{RData, RecordType},
};

use tracing::warn;

use super::{Backends, DiscoveryError, DnsError, Outcome, Reporter};
use crate::config::{DnsRecord, MAX_WEIGHT, Source, backend};

/// One query's limit; a server that doesn't answer in time is a failure.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// The most backends one answer gives (SRV targets' addresses, or A/AAAA
/// records): more than a service's DNS can sensibly carry (a 64 KiB TCP
/// answer holds about 1,500 SRV records) and each SRV target costs a query.
pub const MAX_RECORDS: usize = 512;

/// `vip`: the service's; SRV targets' addresses of the other family are
/// left out (a dual-stack target serves both kinds of service).
pub async fn run(source: Source, vip: IpAddr, reporter: Reporter) {
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
    let mut notes = BTreeSet::new();
    loop {
        let (outcome, wait) = match resolve(&resolver, &name, record, port, vip).await {
            Ok(answer) => {
                for note in answer.notes.difference(&notes) {
                    warn!(
                        service = reporter.service,
                        name, note, "DNS answer: partly used"
                    );
                }
                notes = answer.notes;
                (
                    Outcome::Backends(answer.backends),
                    answer.ttl.clamp(min_interval, max_interval),
                )
            }
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

/// A usable answer.
struct Answer {
    backends: Backends,
    /// The smallest TTL of its records.
    ttl: Duration,
    /// What of it was left out, and why.
    notes: BTreeSet<String>,
}

/// Resolves `name` into the backends of a service at `vip`.
async fn resolve(
    resolver: &TokioResolver,
    name: &str,
    record: DnsRecord,
    port: Option<u16>,
    vip: IpAddr,
) -> Result<Answer, DnsError> {
    let mut ttl = u32::MAX;
    // (address, weight, where it came from)
    let mut found: Vec<(SocketAddr, u32, String)> = Vec::new();
    let mut notes = BTreeSet::new();
    match record {
        DnsRecord::Srv => {
            let lookup = match resolver.lookup(name, RecordType::SRV).await {
                Ok(lookup) => lookup,
                // The name exists no more, or has no such records: DNS says
                // "no backends" (held back unless allow_empty).
                Err(e) if e.is_no_records_found() => return Ok(Answer::empty()),
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
            let mut chosen: Vec<_> = srvs
                .iter()
                .filter(|(_, s)| Some(s.priority) == best)
                .map(|(ttl, s)| (*ttl, s.target.to_ascii(), s.port, s.weight))
                .collect();
            // Every node queries the targets in the same order, so a cap
            // keeps the same ones everywhere.
            chosen.sort_by(|a, b| (&a.1, a.2).cmp(&(&b.1, b.2)));
            chosen.dedup_by(|a, b| (&a.1, a.2) == (&b.1, b.2));
            if chosen.len() > MAX_RECORDS {
                notes.insert(format!(
                    "{} SRV records; the first {MAX_RECORDS} by target are used",
                    chosen.len()
                ));
                chosen.truncate(MAX_RECORDS);
            }
            for (record_ttl, target, srv_port, srv_weight) in chosen {
                ttl = ttl.min(record_ttl);
                let addrs = match resolver.lookup_ip(target.as_str()).await {
                    Ok(addrs) => addrs,
                    // A target that doesn't exist (or has no address): that
                    // target is bad, the answer is not.
                    Err(error) if error.is_no_records_found() => {
                        notes.insert(format!("SRV target {target}: {error}; skipped"));
                        continue;
                    }
                    // A timeout or a server failure: the answer can't be
                    // trusted whole; the last good set stays.
                    Err(error) => return Err(DnsError::SrvTarget { target, error }),
                };
                // SRV weight 0 means "rarely", not "never": it gets the
                // smallest share Sluice has.
                let weight = u32::from(srv_weight).clamp(1, MAX_WEIGHT);
                for ip in addrs.iter().filter(|ip| ip.is_ipv4() == vip.is_ipv4()) {
                    found.push((
                        SocketAddr::new(ip, srv_port),
                        weight,
                        format!("SRV target {target}"),
                    ));
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
                Err(e) if e.is_no_records_found() => return Ok(Answer::empty()),
                Err(e) => return Err(DnsError::Lookup(e)),
            };
            for r in lookup.answers() {
                let ip: IpAddr = match &r.data {
                    RData::A(a) => a.0.into(),
                    RData::AAAA(a) => a.0.into(),
                    _ => continue,
                };
                ttl = ttl.min(r.ttl);
                let addr = SocketAddr::new(ip, port.unwrap_or(0));
                found.push((addr, 1, format!("{kind} record")));
            }
        }
    }
    let backends = checked(found, vip, &mut notes);
    let ttl = if ttl == u32::MAX { 0 } else { ttl };
    Ok(Answer {
        backends,
        ttl: Duration::from_secs(ttl.into()),
        notes,
    })
}

impl Answer {
    fn empty() -> Self {
        Self {
            backends: Vec::new(),
            ttl: Duration::ZERO,
            notes: BTreeSet::new(),
        }
    }
}

/// The addresses that pass the config's backend check (the others are
/// noted and skipped), at most `MAX_RECORDS` of them, lowest first.
fn checked(
    mut found: Vec<(SocketAddr, u32, String)>,
    vip: IpAddr,
    notes: &mut BTreeSet<String>,
) -> Backends {
    found.sort();
    found.dedup_by_key(|(addr, _, _)| *addr);
    let mut backends = Vec::new();
    for (addr, weight, origin) in found {
        if let Err(why) = backend(addr, weight, vip) {
            notes.insert(format!("{origin}: {why}; skipped"));
            continue;
        }
        backends.push((addr, weight));
    }
    if backends.len() > MAX_RECORDS {
        notes.insert(format!(
            "{} backends; the first {MAX_RECORDS} by address are used",
            backends.len()
        ));
        backends.truncate(MAX_RECORDS);
    }
    backends
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_addresses_are_skipped_and_answers_capped() {
        let vip: IpAddr = "10.0.0.1".parse().unwrap();
        let mut found: Vec<(SocketAddr, u32, String)> = (0..600u32)
            .map(|i| {
                let ip = std::net::Ipv4Addr::from(0x0a02_0000 + i);
                (SocketAddr::new(ip.into(), 80), 1, "A record".to_string())
            })
            .collect();
        found.push(("127.0.0.1:80".parse().unwrap(), 1, "SRV target lo.".into()));
        let mut notes = BTreeSet::new();
        let backends = checked(found, vip, &mut notes);
        assert_eq!(backends.len(), MAX_RECORDS);
        assert_eq!(backends[0].0, "10.2.0.0:80".parse().unwrap());
        let notes: Vec<&str> = notes.iter().map(String::as_str).collect();
        assert_eq!(
            notes,
            [
                "600 backends; the first 512 by address are used",
                "SRV target lo.: backend 127.0.0.1:80: a loopback address can't be a backend; skipped",
            ]
        );
    }
}
