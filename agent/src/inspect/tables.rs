//! Read handles on the maps that say where a flow goes: the services, their
//! Maglev tables, the backends' addresses and health, and both flow tables.
//! The running agent opens them on its own maps; the operator commands open
//! them on the pinned maps when the agent is down (as bpftool does).

use std::path::Path;

use agent_common::{
    AffinityEntry, AffinityKey, Backend, BackendHealth, Flow, FlowKey, SERVICE_F_RETRY,
    SOURCE_RANGE_FIXED_BITS, Service, ServiceKey, ServicePolicy, SourceRange, addr, registry::map,
};
use anyhow::{Context, Result};
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, lpm_trie::Key};

use crate::datapath::{Maps, second_handle};

pub struct Tables {
    pub services: HashMap<MapData, ServiceKey, Service>,
    pub backends: Array<MapData, Backend>,
    pub maglev: Array<MapData, u32>,
    pub health: Array<MapData, BackendHealth>,
    /// Each service's failure policy (whether refused connects are retried).
    pub policy: Array<MapData, ServicePolicy>,
    /// Established flows.
    pub conntrack: HashMap<MapData, FlowKey, Flow>,
    /// TCP connects until the client acknowledges the SYN-ACK.
    pub half_open: HashMap<MapData, FlowKey, Flow>,
    /// Session affinity entries.
    pub affinity: HashMap<MapData, AffinityKey, AffinityEntry>,
    /// The `allowed_sources` blocks of the services that have them.
    pub source_ranges: LpmTrie<MapData, SourceRange, u32>,
}

impl Tables {
    /// Handles of their own on the agent's maps.
    pub fn open(maps: &Maps) -> Result<Self> {
        Ok(Self {
            services: second_handle(&maps.services, map::SERVICES, Map::HashMap)?,
            backends: second_handle(&maps.backends, map::BACKENDS, Map::Array)?,
            maglev: maps.maglev.reader()?,
            health: second_handle(&maps.backend_health, map::BACKEND_HEALTH, Map::Array)?,
            policy: second_handle(&maps.service_policy, map::SERVICE_POLICY, Map::Array)?,
            conntrack: second_handle(&maps.conntrack, map::CONNTRACK, Map::LruHashMap)?,
            half_open: second_handle(&maps.half_open, map::HALF_OPEN, Map::LruHashMap)?,
            affinity: second_handle(&maps.affinity, map::AFFINITY, Map::LruHashMap)?,
            source_ranges: second_handle(&maps.source_ranges, map::SOURCE_RANGES, Map::LpmTrie)?,
        })
    }

    /// Handles on the maps pinned in `maps_dir` (a pin directory's
    /// `layout-N/maps`).
    pub fn open_pinned(maps_dir: &Path) -> Result<Self> {
        Ok(Self {
            services: open_pinned(maps_dir, map::SERVICES, Map::HashMap)?,
            backends: open_pinned(maps_dir, map::BACKENDS, Map::Array)?,
            maglev: open_pinned(maps_dir, map::MAGLEV, Map::Array)?,
            health: open_pinned(maps_dir, map::BACKEND_HEALTH, Map::Array)?,
            policy: open_pinned(maps_dir, map::SERVICE_POLICY, Map::Array)?,
            conntrack: open_pinned(maps_dir, map::CONNTRACK, Map::LruHashMap)?,
            half_open: open_pinned(maps_dir, map::HALF_OPEN, Map::LruHashMap)?,
            affinity: open_pinned(maps_dir, map::AFFINITY, Map::LruHashMap)?,
            source_ranges: open_pinned(maps_dir, map::SOURCE_RANGES, Map::LpmTrie)?,
        })
    }

    /// Whether a new flow of service `service_id` from `client` is
    /// admitted by its `allowed_sources` (as the kernel's
    /// `service::source_allowed` looks it up).
    pub fn source_allowed(&self, service_id: u32, client: std::net::IpAddr) -> bool {
        let full = SOURCE_RANGE_FIXED_BITS + if client.is_ipv4() { 32 } else { 128 };
        let key = Key::new(
            full,
            SourceRange {
                service_id,
                family: addr::family(client),
                _pad: [0; 3],
                addr: addr::words(client),
            },
        );
        self.source_ranges.get(&key, 0).is_ok()
    }

    pub fn health(&self, backend_id: u32) -> BackendHealth {
        self.health.get(&backend_id, 0).unwrap_or_default()
    }

    /// Whether the service retries a refused or unanswered connect on
    /// another backend (`failure.retry_on_refused`).
    pub fn retries(&self, service_id: u32) -> bool {
        self.policy
            .get(&service_id, 0)
            .is_ok_and(|p| p.flags & SERVICE_F_RETRY != 0)
    }
}

/// The map pinned at `dir/name`, as `T` (`wrap` is its kind).
pub fn open_pinned<T>(dir: &Path, name: &str, wrap: fn(MapData) -> Map) -> Result<T>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let path = dir.join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening the pinned map {}", path.display()))?;
    T::try_from(wrap(data)).with_context(|| format!("pinned map {}", path.display()))
}
