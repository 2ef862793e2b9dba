//! What the HTTP handlers, the metrics collector and the reconcile loop share.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64},
    },
};

use crate::{
    config::AttachMode,
    reconcile::{BackendState, Reconciler},
};

#[derive(Default)]
pub struct Shared {
    /// None until the programs are loaded.
    pub reconciler: Mutex<Option<Reconciler>>,
    pub attachments: Mutex<BTreeMap<String, AttachMode>>,
    pub conntrack_capacity: Mutex<u32>,
    /// Every program attached and the maps hold the configured state.
    pub ready: AtomicBool,
    /// Entries in the conntrack map, counted in the background.
    pub conntrack_entries: AtomicU64,
    /// Set at shutdown: background work stops.
    pub stopping: AtomicBool,
    pub events: crate::events::EventLog,
}

/// A backend's state as the API and metrics name it.
pub fn backend_state(rec: &Reconciler, backend: &BackendState) -> &'static str {
    if rec.health(backend.id).ejected == 1 {
        "ejected"
    } else if backend.weight == 0 {
        "draining"
    } else {
        "active"
    }
}
