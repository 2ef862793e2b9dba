//! The read side of the agent. The reconcile loop is the one writer: it
//! owns the reconciler and, after each change, publishes an immutable
//! snapshot of what it applied here. Metrics, the API, the dashboard, the
//! event reader and the conntrack sweep read the snapshot and the kernel's
//! counters through map handles of their own: no reader waits for an apply,
//! and no apply waits for a scrape.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use arc_swap::ArcSwap;

use crate::{counters::Counters, inspect::Tables, reconcile::ServiceState};

/// What the reconcile loop last applied: services by name, their ids,
/// backends, addresses and drain states.
#[derive(Default)]
pub struct Snapshot {
    pub services: BTreeMap<String, ServiceState>,
    /// Service id → name, and backend id → (service id, index in its
    /// backends): records that carry only ids (events, at up to 10,000 a
    /// second) are named without a walk over thousands of services.
    service_names: HashMap<u32, String>,
    backends_by_id: HashMap<u32, (u32, usize)>,
}

impl Snapshot {
    pub fn new(services: BTreeMap<String, ServiceState>) -> Self {
        let mut service_names = HashMap::with_capacity(services.len());
        let mut backends_by_id = HashMap::new();
        for (name, s) in &services {
            service_names.insert(s.id, name.clone());
            for (i, b) in s.backends.iter().enumerate() {
                backends_by_id.insert(b.id, (s.id, i));
            }
        }
        Self {
            services,
            service_names,
            backends_by_id,
        }
    }

    /// The ids of every backend of every service (draining ones too).
    pub fn backend_ids(&self) -> Vec<u32> {
        self.services
            .values()
            .flat_map(|s| s.backends.iter().map(|b| b.id))
            .collect()
    }

    /// A backend by its id (draining ones too).
    pub fn backend_by_id(&self, id: u32) -> Option<&crate::reconcile::BackendState> {
        let &(service_id, i) = self.backends_by_id.get(&id)?;
        self.service_by_id(service_id)?.backends.get(i)
    }

    /// A service by its id, for records that carry only ids (events).
    pub fn service_by_id(&self, id: u32) -> Option<&ServiceState> {
        self.services.get(self.service_names.get(&id)?)
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
        self.snapshot.store(Arc::new(Snapshot::new(services)));
    }
}
