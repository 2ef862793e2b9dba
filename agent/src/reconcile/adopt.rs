//! Taking over the state an earlier agent left in pinned maps (see
//! `pinning`): services keep their ids, live tables and counters, backends
//! theirs; what the config no longer has is removed or drained.

use std::{collections::BTreeMap, net::SocketAddr, time::Instant};

use agent_common::{
    BackendState as Admission, FAMILY_V4, Service, ServiceKey, addr::words_ip, prefilter,
};
use anyhow::Result;
use tracing::info;

use super::{BackendState, Reconciler, ServiceState, Slots, service_key};
use crate::config::ServiceSpec;

/// What a restarted agent found in pinned maps.
pub struct Adopted {
    /// Per config service, its backends (address, weight) that take new
    /// connections: discovery services serve them until their provider
    /// answers.
    pub found: BTreeMap<String, Vec<(SocketAddr, u32)>>,
    /// Services the config file doesn't have, with their backends: removed
    /// by the next apply, unless a provider (Kubernetes) takes them over
    /// (they are matched by frontend and renamed).
    pub orphans: Vec<ServiceSpec>,
}

const ORPHAN_PREFIX: &str = "(adopted) ";

/// A pinned backend: (backend id, address, weight, draining).
pub type PinnedBackend = (u32, SocketAddr, u32, bool);

/// The backends pinned maps hold, by service id: those ever written and
/// not removed. `family_of` gives each service id's address family.
fn pinned_backends(
    backends: &aya::maps::Array<aya::maps::MapData, agent_common::Backend>,
    health: impl Fn(u32) -> agent_common::BackendHealth,
    family_of: &std::collections::HashMap<u32, u8>,
    limit: u32,
) -> BTreeMap<u32, Vec<PinnedBackend>> {
    let mut by_service: BTreeMap<u32, Vec<PinnedBackend>> = BTreeMap::new();
    for id in 0..limit {
        let Ok(b) = backends.get(&id, 0) else {
            continue;
        };
        if b.port == 0 || health(id).state() == Admission::Removed {
            continue; // never used, or removed
        }
        // A backend whose service is gone has no family to go by (only
        // its log line shows the address): IPv4 keeps words 1-3 zero.
        let v4 = family_of
            .get(&b.service_id)
            .map_or(b.addr[1..] == [0; 3], |&f| f == FAMILY_V4);
        let ip = words_ip(b.addr, v4);
        by_service.entry(b.service_id).or_default().push((
            id,
            SocketAddr::new(ip, u16::from_be(b.port)),
            u32::from(b.weight),
            health(id).state() == Admission::Draining,
        ));
    }
    by_service
}

/// A service the pinned maps hold, matched to the config (or named as an
/// orphan), with its backends as the reconciler keeps them.
pub struct PinnedService {
    pub value: Service,
    pub spec: ServiceSpec,
    pub backends: Vec<BackendState>,
}

/// What pinned maps hold: their services, and the backends whose service
/// is gone (by service id).
pub struct PinnedState {
    pub services: Vec<PinnedService>,
    pub gone: BTreeMap<u32, Vec<PinnedBackend>>,
}

/// Reads the services and backends of pinned maps (`limit`: the backend
/// ids there can be), naming services after `config`'s by frontend.
pub fn read_pinned(
    services: &aya::maps::HashMap<aya::maps::MapData, ServiceKey, Service>,
    backends: &aya::maps::Array<aya::maps::MapData, agent_common::Backend>,
    health: impl Fn(u32) -> agent_common::BackendHealth,
    limit: u32,
    config: &[ServiceSpec],
) -> PinnedState {
    let pinned: Vec<(ServiceKey, Service)> = services.iter().filter_map(Result::ok).collect();
    let family_of: std::collections::HashMap<u32, u8> =
        pinned.iter().map(|(k, v)| (v.id, k.family)).collect();
    let mut by_service = pinned_backends(backends, health, &family_of, limit);
    let services = pinned
        .into_iter()
        .map(|(key, value)| {
            let spec = match config.iter().find(|s| service_key(s) == key) {
                Some(spec) => spec.clone(),
                None => orphan_spec(&key),
            };
            let backends = by_service
                .remove(&value.id)
                .unwrap_or_default()
                .into_iter()
                // A backend that was draining drains on (its time starts over).
                .map(|(id, addr, weight, draining)| BackendState {
                    id,
                    addr,
                    weight,
                    drain_deadline: (draining && weight > 0)
                        .then(|| Instant::now() + spec.drain_timeout),
                    pod: spec.pods.get(&addr).cloned(),
                    remote: None,
                })
                .collect();
            PinnedService {
                value,
                spec,
                backends,
            }
        })
        .collect();
    PinnedState {
        services,
        gone: by_service,
    }
}

/// A pinned service the config no longer has, for its removal.
fn orphan_spec(key: &ServiceKey) -> ServiceSpec {
    let vip = words_ip(key.addr, key.family == FAMILY_V4);
    let protocol = if key.proto == agent_common::PROTO_UDP {
        crate::config::Protocol::Udp
    } else {
        crate::config::Protocol::Tcp
    };
    let port = u16::from_be(key.port);
    ServiceSpec::new(
        format!("{ORPHAN_PREFIX}{vip} {port}/{}", protocol.as_str()),
        vip,
        port,
        protocol,
    )
}

impl Reconciler {
    /// Takes over the state an earlier agent left in pinned maps: services
    /// (matched to the config by VIP, port and protocol) keep their ids,
    /// tables and counters, backends keep theirs. Adopted services the config
    /// no longer has are removed by the next `apply`; adopted backends it no
    /// longer lists drain. Returns, per config service, the backends found
    /// (discovery services serve them until their provider answers).
    pub fn adopt(&mut self, config: &[ServiceSpec]) -> Result<Adopted> {
        let pinned = read_pinned(
            &self.maps.services,
            &self.maps.backends,
            |id| self.health(id),
            self.backend_ids.limit,
            config,
        );
        let backend_ids: Vec<u32> = pinned
            .services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.id))
            .chain(pinned.gone.values().flatten().map(|b| b.0))
            .collect();
        // The pinned services' live tables stay where they are until the
        // first apply replaces them.
        let regions: Vec<(u32, u32)> = pinned
            .services
            .iter()
            .map(|s| (s.value.table_offset, s.value.table_size))
            .filter(|&(_, size)| size > 0)
            .collect();
        self.slots = Slots::with_used(self.slots.capacity(), &regions)?;
        let mut found = BTreeMap::new();
        let mut orphans = Vec::new();
        let mut service_ids = Vec::new();
        for PinnedService {
            value,
            spec,
            backends,
        } in pinned.services
        {
            service_ids.push(value.id);
            found.insert(
                spec.name.clone(),
                backends
                    .iter()
                    .filter(|b| !b.draining())
                    .map(|b| (b.addr, b.weight))
                    .collect(),
            );
            if spec.name.starts_with(ORPHAN_PREFIX) {
                let mut orphan = spec.clone();
                orphan.backends = backends.iter().map(|b| (b.addr, b.weight)).collect();
                orphans.push(orphan);
            }
            self.services.insert(
                spec.name.clone(),
                ServiceState {
                    id: value.id,
                    spec,
                    backends,
                    table_offset: (value.table_size > 0).then_some(value.table_offset),
                    // Unknown: the first apply writes a new table and flips.
                    table: Default::default(),
                },
            );
        }
        // Backends of services that are gone end as removed backends do:
        // marked removed, their flows deleted, then their ids freed.
        for (service_id, gone) in pinned.gone {
            for (id, addr, weight, _) in gone {
                let name = format!("{ORPHAN_PREFIX}service #{service_id}");
                let backend = BackendState {
                    id,
                    addr,
                    weight,
                    drain_deadline: None,
                    pod: None,
                    remote: None,
                };
                self.ending.push((name, backend));
            }
        }
        self.service_ids.adopt(&service_ids);
        self.backend_ids.adopt(&backend_ids);
        // From the bits the pinned maps hold: replies of adopted flows must
        // be recognised until their backends' flows are gone.
        let read = |slot| self.maps.prefilter.get(&slot, 0).unwrap_or_default();
        self.backend_filter = read(prefilter::BACKEND);
        self.backend_addr_filter = read(prefilter::BACKEND_ADDR);
        self.service_filter = read(prefilter::SERVICE);
        self.service_addr_filter = read(prefilter::SERVICE_ADDR);
        info!(
            services = service_ids.len(),
            backends = backend_ids.len() - self.ending.len(),
            "adopted the pinned datapath"
        );
        self.end_backends();
        Ok(Adopted { found, orphans })
    }
}
