//! What the HTTP handlers, the metrics renderer, the background tasks and
//! the reconcile loop share. The reconciler is not here: the loop owns it
//! (`writer`), the others read `view`.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU32, AtomicU64},
    },
};

use agent_common::BackendHealth;

use crate::{
    config::AttachMode,
    discovery::Hub,
    published::{Publish, Published},
    view::View,
};

#[derive(Default)]
pub struct Shared {
    /// The read side; set once the programs are loaded.
    pub view: OnceLock<Arc<View>>,
    pub attachments: Mutex<BTreeMap<String, AttachMode>>,
    pub conntrack_capacity: AtomicU32,
    /// Every program attached and the maps hold the configured state.
    pub ready: AtomicBool,
    /// Entries in the conntrack map, counted by the background sweep.
    pub conntrack_entries: AtomicU64,
    /// Entries in the half-open table (connects being made), and its capacity.
    pub half_open_entries: AtomicU64,
    pub half_open_capacity: AtomicU32,
    /// The same, by flow state.
    pub conntrack_states: Mutex<crate::sweep::StateCounts>,
    /// Idle timeouts of the current config, for the sweep.
    pub conntrack_timeouts: Mutex<crate::config::ConntrackTimeouts>,
    /// The current config's `metrics` settings, for the metrics renderer.
    pub metrics: Mutex<crate::config::Metrics>,
    /// Set at shutdown: background work stops.
    pub stopping: AtomicBool,
    pub events: crate::events::EventLog,
    /// Discovery providers' health and last good sets. The reconcile loop
    /// locks it; readers (metrics, API, /readyz) see `discovery.view()`.
    pub discovery: Published<Hub>,
    /// The HTTP server's connections and event streams.
    pub http: Arc<crate::http::Load>,
    /// Runtime overrides (`sluice drain`, `sluice weight`); the reconcile
    /// loop changes them, the API and metrics show them.
    pub overrides: Mutex<crate::control::overrides::Overrides>,
    pub started: Started,
    /// The config's `pinning.directory`, for `sluice status`.
    pub pin_directory: Option<String>,
}

/// When the agent started.
pub struct Started(pub std::time::Instant);

impl Default for Started {
    fn default() -> Self {
        Self(std::time::Instant::now())
    }
}

impl Started {
    pub fn elapsed(&self) -> std::time::Duration {
        self.0.elapsed()
    }
}

/// What the readers of the hub need: the statuses, by service.
impl Publish for Hub {
    type View = crate::discovery::HubView;
    fn view(&self) -> Self::View {
        Hub::view(self)
    }
}

/// The states the API and metrics name, in the order metrics list them.
pub const BACKEND_STATES: [&str; 3] = ["active", "draining", "ejected"];

/// A backend's state as the API and metrics name it, from the kernel's
/// health word and whether the backend drains (removed, or weight 0).
pub fn backend_state(health: &BackendHealth, draining: bool) -> &'static str {
    if health.state() == agent_common::BackendState::Ejected {
        "ejected"
    } else if draining {
        "draining"
    } else {
        "active"
    }
}
