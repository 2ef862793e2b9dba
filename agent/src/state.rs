//! What the HTTP handlers, the metrics collector and the reconcile loop share.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64},
    },
};

use agent_common::BackendHealth;

use crate::{config::AttachMode, reconcile::Reconciler};

#[derive(Default)]
pub struct Shared {
    /// None until the programs are loaded.
    pub reconciler: Mutex<Option<Reconciler>>,
    pub attachments: Mutex<BTreeMap<String, AttachMode>>,
    pub conntrack_capacity: Mutex<u32>,
    /// Every program attached and the maps hold the configured state.
    pub ready: AtomicBool,
    /// Entries in the conntrack map, counted by the background sweep.
    pub conntrack_entries: AtomicU64,
    /// The same, by flow state.
    pub conntrack_states: Mutex<crate::sweep::StateCounts>,
    /// Idle timeouts of the current config, for the sweep.
    pub conntrack_timeouts: Mutex<crate::config::ConntrackTimeouts>,
    /// Set at shutdown: background work stops.
    pub stopping: AtomicBool,
    pub events: crate::events::EventLog,
    /// Discovery providers' health and last good sets.
    pub discovery: Mutex<crate::discovery::Hub>,
}

/// A backend's state as the API and metrics name it, from the kernel's
/// health word and the configured weight.
pub fn backend_state(health: &BackendHealth, draining: bool) -> &'static str {
    if health.state() == agent_common::BackendState::Ejected {
        "ejected"
    } else if draining {
        "draining"
    } else {
        "active"
    }
}
