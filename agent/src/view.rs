//! The read side of the agent. The reconcile loop is the one writer: it
//! owns the reconciler and, after each change, publishes an immutable
//! snapshot of what it applied here. Metrics, the API, the dashboard, the
//! event reader and the conntrack sweep read the snapshot and the kernel's
//! counters through map handles of their own: no reader waits for an apply,
//! and no apply waits for a scrape.

use std::{collections::BTreeMap, sync::Arc};

use arc_swap::ArcSwap;

use crate::{counters::Counters, inspect::Tables, reconcile::ServiceState};

/// What the reconcile loop last applied: services by name, their ids,
/// backends, addresses and drain states.
#[derive(Default)]
pub struct Snapshot {
    pub services: BTreeMap<String, ServiceState>,
}

impl Snapshot {
    /// The ids of every backend of every service (draining ones too).
    pub fn backend_ids(&self) -> Vec<u32> {
        self.services
            .values()
            .flat_map(|s| s.backends.iter().map(|b| b.id))
            .collect()
    }

    /// A backend by its id (draining ones too).
    pub fn backend_by_id(&self, id: u32) -> Option<&crate::reconcile::BackendState> {
        self.services
            .values()
            .flat_map(|s| s.backends.iter())
            .find(|b| b.id == id)
    }

    /// A service by its id, for records that carry only ids (events).
    pub fn service_by_id(&self, id: u32) -> Option<&ServiceState> {
        self.services.values().find(|s| s.id == id)
    }
}

pub struct View {
    snapshot: ArcSwap<Snapshot>,
    pub counters: Counters,
    /// Where flows go (`sluice conntrack`, `sluice explain`).
    pub tables: Tables,
}

impl View {
    pub fn new(counters: Counters, tables: Tables) -> Self {
        Self {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            counters,
            tables,
        }
    }

    /// The last published state; holding it never holds up the writer.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Called by the writer after each change.
    pub fn publish(&self, services: BTreeMap<String, ServiceState>) {
        self.snapshot.store(Arc::new(Snapshot { services }));
    }
}
