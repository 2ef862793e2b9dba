//! `sluice status`: the agent and its datapath on one page.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{counters::Counters, view::Snapshot};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusView {
    pub version: String,
    pub commit: String,
    pub map_layout: u32,
    /// `agent` (the running agent answered) or `pinned maps` (it is down:
    /// read from the pinned datapath).
    pub source: String,
    /// Every program attached and the maps written (None: agent down).
    pub ready: Option<bool>,
    pub pid: Option<u32>,
    pub uptime_seconds: Option<u64>,
    pub pin_directory: Option<String>,
    pub attachments: Vec<Attachment>,
    pub services: usize,
    pub backends: usize,
    pub ejected_backends: usize,
    pub draining_backends: usize,
    pub overrides: usize,
    pub discovery: Vec<DiscoveryStatus>,
    pub conntrack: ConntrackStatus,
    /// Packets dropped, by reason (every reason, zeros included).
    pub drops: BTreeMap<String, u64>,
    /// Packets passed to the host's stack untouched, by reason.
    pub passed: BTreeMap<String, u64>,
    pub events: EventStatus,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attachment {
    pub interface: String,
    pub mode: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiscoveryStatus {
    pub service: String,
    pub provider: String,
    pub healthy: bool,
    /// An update that would have emptied the service is held back.
    pub held_back: bool,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConntrackStatus {
    pub entries: u64,
    pub capacity: u32,
    pub half_open_entries: u64,
    pub half_open_capacity: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EventStatus {
    pub sent: u64,
    /// Dropped by the kernel's rate limit or a full ring.
    pub dropped: u64,
}

impl StatusView {
    /// This build, with nothing known yet about the datapath.
    pub fn empty(source: &str) -> Self {
        Self {
            version: crate::build_info::VERSION.to_string(),
            commit: crate::build_info::COMMIT.to_string(),
            map_layout: crate::build_info::MAP_LAYOUT,
            source: source.to_string(),
            ready: None,
            pid: None,
            uptime_seconds: None,
            pin_directory: None,
            attachments: Vec::new(),
            services: 0,
            backends: 0,
            ejected_backends: 0,
            draining_backends: 0,
            overrides: 0,
            discovery: Vec::new(),
            conntrack: ConntrackStatus::default(),
            drops: BTreeMap::new(),
            passed: BTreeMap::new(),
            events: EventStatus::default(),
        }
    }
}

/// What both sources fill in the same way: counts from the snapshot and
/// the kernel's counters.
pub fn base(counters: &Counters, snapshot: &Snapshot, source: &str) -> StatusView {
    let mut status = StatusView::empty(source);
    for (code, reason) in agent_common::reason::ALL.iter().enumerate() {
        let n = counters.reason_count(code as u32);
        let into = if reason.dropped {
            &mut status.drops
        } else {
            &mut status.passed
        };
        into.insert(reason.name.to_string(), n);
    }
    let backends: Vec<_> = snapshot
        .services
        .values()
        .flat_map(|s| s.backends.iter())
        .collect();
    status.services = snapshot.services.len();
    status.backends = backends.len();
    status.ejected_backends = backends
        .iter()
        .filter(|b| counters.health(b.id).state() == agent_common::BackendState::Ejected)
        .count();
    status.draining_backends = backends.iter().filter(|b| b.draining()).count();
    let (sent, dropped) = counters.event_counts();
    status.events = EventStatus { sent, dropped };
    status
}
