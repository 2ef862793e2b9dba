//! Reading what the kernel counts: per-CPU statistics summed, backend health
//! words, latency histograms, event and reason counters. The reconciler
//! reads through its own map handles; the read side (`View`) holds
//! `Counters`, handles of its own on the same maps, so reading never waits
//! for the writer.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use agent_common::{BackendHealth, EventBudget, LatencyHistogram, ServiceStats, registry::map};
use aya::maps::{Array, IterableMap as _, Map, MapData, PerCpuArray};

use crate::datapath::{DatapathError, Maps, second_handle};

type StatsMap = PerCpuArray<MapData, ServiceStats>;

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

    /// Every backend's count, under one lock (a scrape reads them all).
    pub fn all(&self) -> BTreeMap<u32, u64> {
        self.0.lock().unwrap().clone()
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

/// A service's (`map` is `SERVICE_STATS`) or backend's counters, summed over
/// CPUs; a backend's `closed` includes the connections that ended silently.
pub fn stats(map: &StatsMap, ended: Option<&EndedSilently>, id: u32) -> ServiceStats {
    let mut sum = ServiceStats::default();
    if let Ok(values) = map.get(&id, 0) {
        for v in values.iter() {
            sum += v;
        }
    }
    if let Some(ended) = ended {
        sum.closed += ended.get(id);
    }
    sum
}

/// The kernel's view of a backend's health.
pub fn health(map: &Array<MapData, BackendHealth>, backend_id: u32) -> BackendHealth {
    map.get(&backend_id, 0).unwrap_or_default()
}

/// The connect latency histogram of a backend, summed over CPUs.
pub fn latency(map: &PerCpuArray<MapData, LatencyHistogram>, backend_id: u32) -> LatencyHistogram {
    let mut sum = LatencyHistogram::default();
    if let Ok(values) = map.get(&backend_id, 0) {
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

/// Summed per-CPU count of one `agent_common::reason` code.
pub fn reason_count(map: &PerCpuArray<MapData, u64>, code: u32) -> u64 {
    map.get(&code, 0).map(|v| v.iter().sum()).unwrap_or(0)
}

/// The read side's handles on the counting maps.
pub struct Counters {
    service_stats: StatsMap,
    backend_stats: StatsMap,
    reasons: PerCpuArray<MapData, u64>,
    backend_health: Array<MapData, BackendHealth>,
    backend_latency: PerCpuArray<MapData, LatencyHistogram>,
    event_budget: PerCpuArray<MapData, EventBudget>,
    pub ended_silently: EndedSilently,
}

impl Counters {
    /// Handles of its own on the maps `maps` holds; `ended_silently` is
    /// shared with the reconciler and the sweep.
    pub fn open(maps: &Maps, ended_silently: EndedSilently) -> Result<Self, DatapathError> {
        use Map::{Array as A, PerCpuArray as P};
        Ok(Self {
            service_stats: second_handle(&maps.service_stats, map::SERVICE_STATS, P)?,
            backend_stats: second_handle(&maps.backend_stats, map::BACKEND_STATS, P)?,
            reasons: second_handle(&maps.reasons, map::REASONS, P)?,
            backend_health: second_handle(&maps.backend_health, map::BACKEND_HEALTH, A)?,
            backend_latency: second_handle(&maps.backend_latency, map::BACKEND_LATENCY, P)?,
            event_budget: second_handle(&maps.event_budget, map::EVENT_BUDGET, P)?,
            ended_silently,
        })
    }

    /// Handles on the maps pinned in `maps_dir`, for the operator commands
    /// while the agent is down (connections that ended silently are the
    /// agent's count: none are known then).
    pub fn open_pinned(maps_dir: &std::path::Path) -> anyhow::Result<Self> {
        use crate::inspect::open_pinned as open;
        use Map::{Array as A, PerCpuArray as P};
        Ok(Self {
            service_stats: open(maps_dir, map::SERVICE_STATS, P)?,
            backend_stats: open(maps_dir, map::BACKEND_STATS, P)?,
            reasons: open(maps_dir, map::REASONS, P)?,
            backend_health: open(maps_dir, map::BACKEND_HEALTH, A)?,
            backend_latency: open(maps_dir, map::BACKEND_LATENCY, P)?,
            event_budget: open(maps_dir, map::EVENT_BUDGET, P)?,
            ended_silently: EndedSilently::default(),
        })
    }

    /// See `stats`.
    pub fn stats(&self, service: bool, id: u32) -> ServiceStats {
        if service {
            stats(&self.service_stats, None, id)
        } else {
            stats(&self.backend_stats, Some(&self.ended_silently), id)
        }
    }

    pub fn health(&self, backend_id: u32) -> BackendHealth {
        health(&self.backend_health, backend_id)
    }

    pub fn latency(&self, backend_id: u32) -> LatencyHistogram {
        latency(&self.backend_latency, backend_id)
    }

    pub fn reason_count(&self, code: u32) -> u64 {
        reason_count(&self.reasons, code)
    }

    /// Statistics, health and (`latency`) connect latency of backend ids
    /// `0..n`, each map read in one batch syscall: a scrape of 10,000
    /// backends costs three syscalls, not 30,000.
    pub fn backends_batch(&self, n: u32, latency: bool) -> std::io::Result<BackendsBatch> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let ended = self.ended_silently.all();
        let mut stats: Vec<ServiceStats> = sum_cpus(
            crate::batch::array_values(self.backend_stats.map(), n, cpus)?,
            cpus,
            |sum, v| *sum += v,
        );
        for (&id, &n) in &ended {
            if let Some(s) = stats.get_mut(id as usize) {
                s.closed += n;
            }
        }
        let health = crate::batch::array_values(self.backend_health.map(), n, 1)?;
        let latency = if latency {
            sum_cpus(
                crate::batch::array_values(self.backend_latency.map(), n, cpus)?,
                cpus,
                |sum: &mut LatencyHistogram, v| {
                    for (s, b) in sum.buckets.iter_mut().zip(&v.buckets) {
                        *s += b;
                    }
                    sum.count += v.count;
                    sum.sum_ns += v.sum_ns;
                },
            )
        } else {
            Vec::new()
        };
        Ok(BackendsBatch {
            stats,
            health,
            latency,
        })
    }

    /// Statistics of service ids `0..n`, in one batch syscall.
    pub fn services_batch(&self, n: u32) -> std::io::Result<Vec<ServiceStats>> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        Ok(sum_cpus(
            crate::batch::array_values(self.service_stats.map(), n, cpus)?,
            cpus,
            |sum, v| *sum += v,
        ))
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
}

/// Backend ids `0..n` as `Counters::backends_batch` read them (indexed by
/// id; `latency` is empty when not asked for).
pub struct BackendsBatch {
    pub stats: Vec<ServiceStats>,
    pub health: Vec<BackendHealth>,
    pub latency: Vec<LatencyHistogram>,
}

/// Per-CPU values (`cpus` per id, as the kernel lays them out) summed per id.
fn sum_cpus<V: Default + Copy>(values: Vec<V>, cpus: usize, add: impl Fn(&mut V, &V)) -> Vec<V> {
    values
        .chunks_exact(cpus)
        .map(|per_cpu| {
            let mut sum = V::default();
            for v in per_cpu {
                add(&mut sum, v);
            }
            sum
        })
        .collect()
}

/// The `q` quantile of a connect latency histogram, in seconds, as
/// Prometheus' `histogram_quantile` estimates it (linear within the bucket
/// it falls in); None before any connect. Connects slower than the last
/// bucket count at its bound.
pub fn latency_quantile(h: &LatencyHistogram, q: f64) -> Option<f64> {
    if h.count == 0 {
        return None;
    }
    let rank = q * h.count as f64;
    let mut below = 0u64;
    let mut lower = 0.0;
    for (i, &n) in h.buckets.iter().enumerate() {
        let upper = (agent_common::LATENCY_BASE_NS << i) as f64 / 1e9;
        if n > 0 && (below + n) as f64 >= rank {
            let into = (rank - below as f64) / n as f64;
            return Some(lower + (upper - lower) * into.clamp(0.0, 1.0));
        }
        below += n;
        lower = upper;
    }
    Some(lower)
}

#[cfg(test)]
mod quantile_tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_the_bucket() {
        let mut h = LatencyHistogram::default();
        assert_eq!(latency_quantile(&h, 0.5), None);
        // 10 connects in the first bucket (0 .. 8 µs), 10 in the third (16 .. 32 µs).
        h.buckets[0] = 10;
        h.buckets[2] = 10;
        h.count = 20;
        let p50 = latency_quantile(&h, 0.5).unwrap();
        assert!((p50 - 8e-6).abs() < 1e-12, "{p50}");
        let p99 = latency_quantile(&h, 0.99).unwrap();
        assert!(p99 > 16e-6 && p99 <= 32e-6, "{p99}");
    }
}
