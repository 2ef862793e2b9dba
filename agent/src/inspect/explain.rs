//! `sluice explain`: where one flow goes, and why. An existing entry in the
//! flow tables decides first (the kernel looks there first); otherwise the
//! kernel's Maglev choice is retraced step by step on the live table and
//! health words (`select::pick` in agent-ebpf), so the answer names the
//! slot, the ejected backends it skipped, and where a refused connect
//! would be retried.

use std::net::SocketAddr;

use agent_common::{
    AffinityKey, BackendState as Admission, FLOW_F_REVERSE, Flow, FlowKey, MAGLEV_MAX_PICKS,
    MAGLEV_MAX_WALK, NO_BACKEND, SERVICE_F_AFFINITY, SERVICE_F_LEAST_CONN, SERVICE_F_SOURCE_RANGES,
    Service, addr, hash,
};
use serde::{Deserialize, Serialize};

use super::{Tables, flows::FlowView};
use crate::{config::Protocol, reconcile::service_key_of, view::Snapshot};

/// What `explain` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Explanation {
    pub client: String,
    pub vip: String,
    pub protocol: String,
    /// The service at that VIP, port and protocol (None: not a service;
    /// the packets pass to the host untouched).
    pub service: Option<String>,
    /// `conntrack` (an established flow), `half_open` (a connect in
    /// progress), `affinity` (a new flow: the client's session affinity
    /// entry decides), `maglev` (a new flow: the table decides),
    /// `least_connections` (a new flow: this node's live counts decide,
    /// per connection; not retraced), `source_denied` (a new flow from a
    /// source outside the service's `allowed_sources`: dropped), `no_service`,
    /// `no_backend` (the service's table is empty), `family_mismatch` (an
    /// IPv4 client can't reach an IPv6 VIP, or the other way).
    pub decision: String,
    pub backend: Option<String>,
    /// The chosen backend's state (active, draining, ejected).
    pub backend_state: Option<String>,
    /// The existing flow, when one decides.
    pub flow: Option<FlowView>,
    /// The flow's hash and the service's table size.
    pub hash: Option<u32>,
    pub table_size: Option<u32>,
    /// The slots looked at, in order, for a new flow.
    pub probes: Vec<Probe>,
    /// Backends in no slot of the table: weight 0, or draining.
    pub not_in_table: Vec<String>,
    /// Where a refused (or unanswered) connect to the chosen backend is
    /// sent next, when the service retries.
    pub retry_backend: Option<String>,
    /// One line per fact, for people.
    pub why: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Probe {
    /// The rehash (0: the flow's own hash) or, past `MAGLEV_MAX_PICKS`,
    /// the walk's step.
    pub attempt: u32,
    pub slot: u32,
    pub backend: Option<String>,
    /// healthy, ejected (skipped), excluded (the backend that failed), empty.
    pub verdict: String,
}

/// One slot `pick` looked at: (attempt, slot, backend id, verdict).
pub type Step = (u32, u32, Option<u32>, &'static str);

enum Candidate {
    Healthy(u32),
    Ejected(u32),
    Excluded,
}

/// The kernel's `select::pick`, step by step: `slot` reads the live table,
/// `ejected` the health words. Returns the choice (backend id, attempt) and
/// every slot looked at.
pub fn pick(
    table_size: u32,
    slot: impl Fn(u32) -> Option<u32>,
    ejected: impl Fn(u32) -> bool,
    h: u32,
    exclude: u32,
    first_attempt: u32,
) -> (Option<(u32, u32)>, Vec<Step>) {
    let mut probes = Vec::new();
    if table_size == 0 {
        return (None, probes);
    }
    let candidate = |index: u32| -> Option<Candidate> {
        let id = slot(index)?;
        if id == NO_BACKEND {
            return None;
        }
        Some(if id == exclude {
            Candidate::Excluded
        } else if ejected(id) {
            Candidate::Ejected(id)
        } else {
            Candidate::Healthy(id)
        })
    };
    let mut fallback = None;
    let mut attempt = first_attempt;
    let mut index = 0;
    let look =
        |index: u32, attempt: u32, probes: &mut Vec<_>, fallback: &mut Option<_>| match candidate(
            index,
        ) {
            None => {
                probes.push((attempt, index, None, "empty"));
                Err(())
            }
            Some(Candidate::Healthy(id)) => {
                probes.push((attempt, index, Some(id), "healthy"));
                Ok(Some(id))
            }
            Some(Candidate::Ejected(id)) => {
                probes.push((attempt, index, Some(id), "ejected"));
                if fallback.is_none() {
                    *fallback = Some((id, attempt));
                }
                Ok(None)
            }
            Some(Candidate::Excluded) => {
                probes.push((attempt, index, Some(exclude), "excluded"));
                Ok(None)
            }
        };
    while attempt < first_attempt + MAGLEV_MAX_PICKS {
        let hh = if attempt == 0 {
            h
        } else {
            hash::rehash(h, attempt)
        };
        index = hh % table_size;
        match look(index, attempt, &mut probes, &mut fallback) {
            Err(()) => return (None, probes),
            Ok(Some(id)) => return (Some((id, attempt)), probes),
            Ok(None) => {}
        }
        attempt += 1;
    }
    for step in 1..=MAGLEV_MAX_WALK {
        match look(
            (index + step) % table_size,
            attempt,
            &mut probes,
            &mut fallback,
        ) {
            Err(()) => return (None, probes),
            Ok(Some(id)) => return (Some((id, attempt)), probes),
            Ok(None) => {}
        }
    }
    (fallback, probes)
}

/// Where the flow `client` → `vip` (`protocol`) goes.
pub fn explain(
    tables: &Tables,
    snapshot: &Snapshot,
    client: SocketAddr,
    vip: SocketAddr,
    protocol: Protocol,
) -> Explanation {
    let mut e = Explanation {
        client: client.to_string(),
        vip: vip.to_string(),
        protocol: protocol.as_str().to_string(),
        service: None,
        decision: "no_service".to_string(),
        backend: None,
        backend_state: None,
        flow: None,
        hash: None,
        table_size: None,
        probes: Vec::new(),
        not_in_table: Vec::new(),
        retry_backend: None,
        why: Vec::new(),
    };
    let name_of = |id: u32| super::backend_name(tables, snapshot, id);
    let state_of = |id: u32| super::backend_state_name(tables, snapshot, id);

    let service_key = service_key_of(vip.ip(), vip.port(), protocol);
    let Ok(service) = tables.services.get(&service_key, 0) else {
        e.why.push(format!(
            "no service at {vip}/{}: the packets pass to the host's stack untouched",
            protocol.as_str()
        ));
        return e;
    };
    let state = snapshot.service_by_id(service.id);
    e.service = Some(super::service_name(snapshot, service.id, vip, protocol));

    if client.is_ipv4() != vip.is_ipv4() {
        e.decision = "family_mismatch".to_string();
        e.why
            .push("the client and the VIP are of different address families".to_string());
        return e;
    }
    let key = flow_key(client, vip, protocol);
    for (table, map) in [
        ("conntrack", &tables.conntrack),
        ("half_open", &tables.half_open),
    ] {
        if let Ok(flow) = map.get(&key, 0)
            && flow.flags & FLOW_F_REVERSE == 0
        {
            e.decision = table.to_string();
            e.backend = Some(name_of(flow.backend_id));
            e.backend_state = Some(state_of(flow.backend_id));
            e.why.push(existing_flow_reason(table, &flow, &name_of));
            e.flow = Some(FlowView::new(table, &key, &flow, tables, snapshot));
            return e;
        }
    }

    if service.flags & SERVICE_F_SOURCE_RANGES != 0
        && !tables.source_allowed(service.id, client.ip())
    {
        e.decision = "source_denied".to_string();
        e.why.push(format!(
            "{} is in none of the service's allowed_sources: a new flow is dropped (source_denied)",
            client.ip()
        ));
        return e;
    }
    let affinity = service.flags & SERVICE_F_AFFINITY != 0;
    if affinity && let Some(id) = affinity_backend(tables, &service, &key, &mut e.why) {
        e.decision = "affinity".to_string();
        e.backend = Some(name_of(id));
        e.backend_state = Some(state_of(id));
        e.why.push(format!(
            "→ {} ({})",
            e.backend.as_deref().unwrap_or("?"),
            e.backend_state.as_deref().unwrap_or("?")
        ));
        return e;
    }
    // The kernel's `select::first_hash`.
    let h = if affinity {
        hash::client_hash(&key.src)
    } else {
        key.flow_hash()
    };
    e.hash = Some(h);
    e.table_size = Some(service.table_size);
    if let Some(state) = state {
        e.not_in_table = state
            .backends
            .iter()
            .filter(|b| b.draining())
            .map(|b| b.addr.to_string())
            .collect();
    }
    let slot = |i: u32| tables.maglev.get(&(service.table_offset + i), 0).ok();
    let ejected = |id: u32| tables.health(id).state() != Admission::Active;
    let (choice, probes) = pick(service.table_size, slot, ejected, h, NO_BACKEND, 0);
    e.probes = probes
        .iter()
        .map(|&(attempt, slot, id, verdict)| Probe {
            attempt,
            slot,
            backend: id.map(name_of),
            verdict: verdict.to_string(),
        })
        .collect();
    let Some((backend_id, attempt)) = choice else {
        e.decision = "no_backend".to_string();
        e.why.push(format!(
            "no flow yet; the service's table (size {}) has no backend: new connections are dropped (no_backend)",
            service.table_size
        ));
        return e;
    };
    if service.flags & SERVICE_F_LEAST_CONN != 0 {
        // Made per node, per connection, from live counts and a random
        // draw: not something to retrace.
        e.decision = "least_connections".to_string();
        e.why.push(format!(
            "no flow yet: algorithm least_connections: this node chooses per connection between the Maglev choice ({}, slot {} of {}) and the backend of a random slot, whichever has fewer active connections for its weight here (not consistent across nodes; not retraced)",
            name_of(backend_id),
            h % service.table_size,
            service.table_size
        ));
        return e;
    }
    e.decision = "maglev".to_string();
    e.backend = Some(name_of(backend_id));
    e.backend_state = Some(state_of(backend_id));
    let of = if affinity {
        " of the client's address (session affinity: one first choice for all its connections)"
    } else {
        ""
    };
    e.why.push(format!(
        "no flow yet: a new connection is placed by Maglev: hash{of} {h:#010x} → slot {} of {}",
        h % service.table_size,
        service.table_size
    ));
    for p in e.probes.iter().filter(|p| p.verdict == "ejected") {
        e.why.push(format!(
            "slot {} (attempt {}) holds {}, ejected: skipped",
            p.slot,
            p.attempt,
            p.backend.as_deref().unwrap_or("?")
        ));
    }
    if e.probes.last().is_some_and(|p| p.verdict == "ejected") {
        e.why.push(
            "every slot looked at holds an ejected backend: the first one takes it (fail open)"
                .to_string(),
        );
    }
    if !e.not_in_table.is_empty() {
        e.why.push(format!(
            "in no slot (draining or weight 0): {}",
            e.not_in_table.join(", ")
        ));
    }
    let chosen = e
        .probes
        .iter()
        .rev()
        .find(|p| p.backend == e.backend)
        .map(|p| match p.attempt {
            0 => format!("slot {}", p.slot),
            n => format!("slot {} (rehash {n})", p.slot),
        })
        .unwrap_or_default();
    e.why.push(format!(
        "→ {} ({}) in {chosen}",
        e.backend.as_deref().unwrap_or("?"),
        e.backend_state.as_deref().unwrap_or("?")
    ));
    let retries = tables.retries(service.id);
    let retry = retry_target(
        &service, retries, protocol, backend_id, attempt, h, &slot, &ejected,
    );
    e.retry_backend = retry.map(name_of);
    let retry_state = retry.map(state_of);
    match (&e.retry_backend, protocol) {
        (Some(next), Protocol::Tcp) => {
            let state = retry_state.unwrap_or_default();
            let fail_open = if state == "ejected" {
                ": every other choice is ejected, so one is tried (fail open)"
            } else {
                ""
            };
            e.why.push(format!(
                "if it refuses the connect (or doesn't answer), the client's SYN is sent to {next} ({state}) instead{fail_open}"
            ))
        }
        (None, Protocol::Tcp) if !retries => e
            .why
            .push("retry_on_refused is off: a refusal reaches the client".to_string()),
        _ => {}
    }
    e
}

/// The backend of the client's session affinity entry at `service`, if
/// the kernel's `affinity::backend` would use it (live, still the
/// service's backend, taking new connections); why not, into `why`.
fn affinity_backend(
    tables: &Tables,
    service: &Service,
    key: &FlowKey,
    why: &mut Vec<String>,
) -> Option<u32> {
    let akey = AffinityKey {
        service_id: service.id,
        family: key.family,
        _pad: [0; 3],
        client: key.src,
    };
    let Ok(entry) = tables.affinity.get(&akey, 0) else {
        why.push("no session affinity entry for this client: a new client".to_string());
        return None;
    };
    let age = crate::sweep::now_seconds().saturating_sub(entry.last_used_s);
    let timeout = service.affinity_timeout_s;
    let belongs = tables
        .backends
        .get(&entry.backend_id, 0)
        .is_ok_and(|b| b.service_id == service.id);
    let state = tables.health(entry.backend_id).state();
    if age > timeout {
        why.push(format!(
            "the client's session affinity entry expired ({age} s since its last new connection, timeout {timeout} s)"
        ));
        return None;
    }
    if !belongs || state != Admission::Active {
        why.push(format!(
            "the client's session affinity entry names backend #{} ({}), which takes no new connections: the client moves",
            entry.backend_id,
            if belongs { format!("{state:?}").to_lowercase() } else { "no longer this service's".to_string() }
        ));
        return None;
    }
    why.push(format!(
        "a new connection follows the client's session affinity entry (last new connection {age} s ago, timeout {timeout} s)"
    ));
    Some(entry.backend_id)
}

/// The backend a refused connect is retried on (the kernel's
/// `tcp_state::retry`: the pick from the next attempt, without the one
/// that failed).
#[expect(
    clippy::too_many_arguments,
    reason = "the kernel's pick's inputs, as they are"
)]
fn retry_target(
    service: &Service,
    retries: bool,
    protocol: Protocol,
    failed: u32,
    attempt: u32,
    h: u32,
    slot: &impl Fn(u32) -> Option<u32>,
    ejected: &impl Fn(u32) -> bool,
) -> Option<u32> {
    if protocol != Protocol::Tcp || !retries {
        return None;
    }
    let (next, _) = pick(service.table_size, slot, ejected, h, failed, attempt + 1);
    next.map(|(id, _)| id).filter(|&id| id != failed)
}

fn existing_flow_reason(table: &str, flow: &Flow, name_of: &impl Fn(u32) -> String) -> String {
    let retried = if flow.attempts > 0 {
        format!(
            " (after {} pick(s) past ejected or failed backends)",
            flow.attempts
        )
    } else {
        String::new()
    };
    match table {
        "conntrack" => format!(
            "an established flow: every packet of it goes to {}{retried}, whatever the table says now",
            name_of(flow.backend_id)
        ),
        _ => format!(
            "a connect in progress (half-open): its SYN went to {}{retried}",
            name_of(flow.backend_id)
        ),
    }
}

/// The key the kernel tracks a client's flow by.
pub fn flow_key(client: SocketAddr, vip: SocketAddr, protocol: Protocol) -> FlowKey {
    FlowKey {
        src: addr::words(client.ip()),
        dst: addr::words(vip.ip()),
        sport: client.port().to_be(),
        dport: vip.port().to_be(),
        proto: protocol.number(),
        family: addr::family(vip.ip()),
        _pad: 0,
    }
}

/// `VIP:PORT/PROTO` (`[fd00::1]:80/tcp`); the protocol defaults to tcp.
pub fn parse_frontend(text: &str) -> Result<(SocketAddr, Protocol), String> {
    let (addr, protocol) = match text.rsplit_once('/') {
        Some((a, "tcp")) => (a, Protocol::Tcp),
        Some((a, "udp")) => (a, Protocol::Udp),
        Some((_, p)) => return Err(format!("{text}: protocol {p:?} is not tcp or udp")),
        None => (text, Protocol::Tcp),
    };
    let addr = addr.parse().map_err(|_| {
        format!("{text}: expected VIP:PORT/PROTO (e.g. 10.0.0.1:80/tcp or [fd00::1]:80/udp)")
    })?;
    Ok((addr, protocol))
}

/// `CLIENT_IP:PORT`.
pub fn parse_client(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        format!("{text}: expected CLIENT_IP:PORT (e.g. 10.1.2.3:40000 or [fd00::7]:40000)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pick_takes_the_hash_slot_when_healthy() {
        let table = [1, 2, 3, 4, 5, 6, 7];
        let (choice, probes) = pick(
            7,
            |i| table.get(i as usize).copied(),
            |_| false,
            12,
            NO_BACKEND,
            0,
        );
        assert_eq!(choice, Some((table[12 % 7], 0)));
        assert_eq!(probes.len(), 1);
    }

    #[test]
    fn pick_skips_ejected_and_falls_open_when_all_are() {
        let table = [1, 2, 3, 4, 5, 6, 7];
        let slot = |i: u32| table.get(i as usize).copied();
        let h = 12;
        let first = table[(h % 7) as usize];
        let (choice, probes) = pick(7, slot, |id| id == first, h, NO_BACKEND, 0);
        let (id, _) = choice.unwrap();
        assert_ne!(id, first);
        assert_eq!(probes[0].3, "ejected");
        let (choice, probes) = pick(7, slot, |_| true, h, NO_BACKEND, 0);
        assert_eq!(choice.map(|c| c.0), Some(first));
        assert_eq!(probes.len() as u32, MAGLEV_MAX_PICKS + MAGLEV_MAX_WALK);
    }

    #[test]
    fn pick_stops_at_an_empty_slot() {
        let (choice, _) = pick(3, |_| Some(NO_BACKEND), |_| false, 1, NO_BACKEND, 0);
        assert_eq!(choice, None);
    }

    #[test]
    fn frontends_and_clients_parse_or_say_what_is_expected() {
        assert_eq!(
            parse_frontend("10.0.0.1:80/udp").unwrap(),
            ("10.0.0.1:80".parse().unwrap(), Protocol::Udp)
        );
        assert_eq!(parse_frontend("[fd00::1]:443").unwrap().1, Protocol::Tcp);
        assert!(
            parse_frontend("10.0.0.1:80/sctp")
                .unwrap_err()
                .contains("sctp")
        );
        assert!(
            parse_client("10.0.0.1")
                .unwrap_err()
                .contains("CLIENT_IP:PORT")
        );
    }
}
