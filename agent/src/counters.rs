//! Reading what the kernel counts: per-CPU statistics summed, backend health
//! words, latency histograms, event and reason counters. Each reader (the
//! reconcile loop, the read side) holds handles of its own on the same maps,
//! so reading never waits for a writer.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use agent_common::{BackendHealth, EventBudget, LatencyHistogram, ServiceStats};
use aya::maps::{Array, IterableMap, Map, MapData, PerCpuArray};

use crate::datapath::{DatapathError, Maps};

/// Backend id → established connections that ended without a FIN or RST
/// (expired idle by the conntrack sweep, or evicted from a full map): they
/// count as closed. Kept here, not in a map: the sweep finds them, the
/// reconciler forgets an id when it gives it to a new backend.
#[derive(Clone, Default)]
pub struct EndedSilently(Arc<Mutex<BTreeMap<u32, u64>>>);

impl EndedSilently {
    pub fn add(&self, backend_id: u32, connections: u64) {
        *self.0.lock().unwrap().entry(backend_id).or_default() += connections;
    }

    pub fn forget(&self, backend_id: u32) {
        self.0.lock().unwrap().remove(&backend_id);
    }

    fn get(&self, backend_id: u32) -> u64 {
        self.0
            .lock()
            .unwrap()
            .get(&backend_id)
            .copied()
            .unwrap_or(0)
    }
}

/// Read-only handles on the counting maps.
pub struct Counters {
    service_stats: PerCpuArray<MapData, ServiceStats>,
    backend_stats: PerCpuArray<MapData, ServiceStats>,
    reasons: PerCpuArray<MapData, u64>,
    backend_health: Array<MapData, BackendHealth>,
    backend_latency: PerCpuArray<MapData, LatencyHistogram>,
    event_budget: PerCpuArray<MapData, EventBudget>,
    pub ended_silently: EndedSilently,
}

/// A second handle on the map behind `map` (a new fd, by the map's id).
fn reopen<K: aya::Pod, V, T>(
    map: &impl IterableMap<K, V>,
    wrap: fn(MapData) -> Map,
) -> Result<T, DatapathError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let id = map
        .map()
        .info()
        .map_err(DatapathError::map("(by handle)"))?
        .id();
    let data = MapData::from_id(id).map_err(DatapathError::map(&format!("id {id}")))?;
    T::try_from(wrap(data)).map_err(DatapathError::map(&format!("id {id}")))
}

impl Counters {
    /// Handles of its own on the maps `maps` holds; `ended_silently` is
    /// shared with whoever else counts them.
    pub fn open(maps: &Maps, ended_silently: EndedSilently) -> Result<Self, DatapathError> {
        Ok(Self {
            service_stats: reopen(&maps.service_stats, Map::PerCpuArray)?,
            backend_stats: reopen(&maps.backend_stats, Map::PerCpuArray)?,
            reasons: reopen(&maps.reasons, Map::PerCpuArray)?,
            backend_health: reopen(&maps.backend_health, Map::Array)?,
            backend_latency: reopen(&maps.backend_latency, Map::PerCpuArray)?,
            event_budget: reopen(&maps.event_budget, Map::PerCpuArray)?,
            ended_silently,
        })
    }

    /// Per-CPU counters summed (a backend's `closed` includes the
    /// connections that ended silently).
    pub fn stats(&self, service: bool, id: u32) -> ServiceStats {
        let map = if service {
            &self.service_stats
        } else {
            &self.backend_stats
        };
        let mut sum = ServiceStats::default();
        if let Ok(values) = map.get(&id, 0) {
            for v in values.iter() {
                sum += v;
            }
        }
        if !service {
            sum.closed += self.ended_silently.get(id);
        }
        sum
    }

    /// The kernel's view of a backend's health.
    pub fn health(&self, backend_id: u32) -> BackendHealth {
        self.backend_health.get(&backend_id, 0).unwrap_or_default()
    }

    /// The connect latency histogram of a backend, summed over CPUs.
    pub fn latency(&self, backend_id: u32) -> LatencyHistogram {
        let mut sum = LatencyHistogram::default();
        if let Ok(values) = self.backend_latency.get(&backend_id, 0) {
            for v in values.iter() {
                for (s, b) in sum.buckets.iter_mut().zip(&v.buckets) {
                    *s += b;
                }
                sum.count += v.count;
                sum.sum_ns += v.sum_ns;
            }
        }
        sum
    }

    /// Connection events (sent, dropped by the rate limit or a full ring).
    pub fn event_counts(&self) -> (u64, u64) {
        self.event_budget
            .get(&0, 0)
            .map(|v| {
                v.iter()
                    .fold((0, 0), |(s, d), b| (s + b.sent, d + b.dropped))
            })
            .unwrap_or((0, 0))
    }

    /// Summed per-CPU count of one `agent_common::reason` code.
    pub fn reason_count(&self, code: u32) -> u64 {
        self.reasons
            .get(&code, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }
}
