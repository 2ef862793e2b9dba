//! `sluice conntrack`: the live flows, named.

use std::net::SocketAddr;

use agent_common::{
    FAMILY_V4, FLOW_F_REVERSE, Flow, FlowKey, PROTO_UDP, SERVICE_F_SNAT, SERVICE_F_SNAT_REMOTE,
    addr,
};
use serde::{Deserialize, Serialize};

use super::Tables;
use crate::{
    config::ConntrackTimeouts,
    sweep::{FlowState, idle, now_seconds},
    view::Snapshot,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlowView {
    /// `conntrack` (established) or `half_open` (a connect in progress).
    pub table: String,
    pub service: String,
    pub backend: String,
    pub protocol: String,
    pub client: String,
    pub vip: String,
    /// The address and port the backend sees as the source (snat services).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snat: Option<String>,
    /// syn_sent, established, closing, time_wait, udp.
    pub state: String,
    /// Seconds since a packet of it was seen.
    pub idle_seconds: u32,
    /// Picks past ejected or failed backends it took.
    pub attempts: u8,
}

impl FlowView {
    pub fn new(
        table: &str,
        key: &FlowKey,
        flow: &Flow,
        tables: &Tables,
        snapshot: &Snapshot,
    ) -> Self {
        let v4 = key.family == FAMILY_V4;
        let at = |words: [u32; 4], port_be: u16| {
            SocketAddr::new(addr::words_ip(words, v4), u16::from_be(port_be))
        };
        let vip = at(key.dst, key.dport);
        let protocol = if key.proto == PROTO_UDP { "udp" } else { "tcp" };
        let service_flags = tables
            .services
            .get(
                &crate::reconcile::service_key_of(vip.ip(), vip.port(), protocol_of(key.proto)),
                0,
            )
            .map(|s| s.flags)
            .unwrap_or(0);
        let (state, _) = FlowState::of(key, flow, &ConntrackTimeouts::default());
        Self {
            table: table.to_string(),
            service: super::service_name(snapshot, flow.service_id, vip, protocol_of(key.proto)),
            backend: super::backend_name(tables, snapshot, flow.backend_id),
            protocol: protocol.to_string(),
            client: at(key.src, key.sport).to_string(),
            vip: vip.to_string(),
            // A NodePort entry SNATs its flows to remote backends only:
            // those whose source was rewritten.
            snat: (service_flags & SERVICE_F_SNAT != 0
                || (service_flags & SERVICE_F_SNAT_REMOTE != 0 && flow.new_src != key.src))
                .then(|| at(flow.new_src, flow.new_sport).to_string()),
            state: state.name().to_string(),
            idle_seconds: idle(now_seconds(), flow.last_seen),
            attempts: flow.attempts,
        }
    }
}

fn protocol_of(proto: u8) -> crate::config::Protocol {
    if proto == PROTO_UDP {
        crate::config::Protocol::Udp
    } else {
        crate::config::Protocol::Tcp
    }
}

/// Which flows `sluice conntrack` lists.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FlowFilter {
    pub service: Option<String>,
    pub backend: Option<String>,
    pub limit: Option<usize>,
}

/// Flows answering `filter` (forward entries only: one per connection),
/// half-open ones first; and how many answered in all.
pub fn list(tables: &Tables, snapshot: &Snapshot, filter: &FlowFilter) -> (Vec<FlowView>, u64) {
    let limit = filter.limit.unwrap_or(usize::MAX);
    let mut out = Vec::new();
    let mut matched = 0;
    for (table, map) in [
        ("half_open", &tables.half_open),
        ("conntrack", &tables.conntrack),
    ] {
        for (key, flow) in map.iter().filter_map(Result::ok) {
            if flow.flags & FLOW_F_REVERSE != 0 {
                continue;
            }
            let view = FlowView::new(table, &key, &flow, tables, snapshot);
            if filter.service.as_ref().is_some_and(|s| *s != view.service)
                || filter.backend.as_ref().is_some_and(|b| *b != view.backend)
            {
                continue;
            }
            matched += 1;
            if out.len() < limit {
                out.push(view);
            }
        }
    }
    (out, matched)
}
