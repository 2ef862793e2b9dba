//! Desired services → kernel maps, with the fewest writes and an order that
//! never lets a packet see a half-made state:
//!
//! 1. backends are written before any table points at them;
//! 2. a changed Maglev table is written into a free region of the slot pool
//!    (`slots`), then the service entry flips to it in one map update, and
//!    the old region is retired (reused only after a quarantine);
//! 3. service prefilter bits are set before a service appears and cleared only
//!    after it is gone; a backend's bits are cleared only after its flows are
//!    deleted (`end_backends`), so replies of its connections are
//!    reverse-NATed as long as they are tracked.

use std::{collections::BTreeMap, net::SocketAddr, time::Instant};

use agent_common::{
    BACKEND_F_REMOTE, Backend, BackendFib, BackendHealth, FibCache, LatencyHistogram, NO_BACKEND,
    Prefilter, SERVICE_F_AFFINITY, SERVICE_F_DSR_L2, SERVICE_F_DSR_TUNNEL, SERVICE_F_LEAST_CONN,
    SERVICE_F_RETRY, SERVICE_F_SNAT, SERVICE_F_SNAT_REMOTE, SERVICE_F_SOURCE_RANGES, Service,
    ServiceKey, ServicePolicy, ServiceStats, prefilter,
};
use anyhow::{Context, Result, anyhow, bail};
use aya::maps::PerCpuValues;
use tracing::{info, warn};

mod adopt;
mod drain;
mod filters;
mod ids;
mod ranges;
pub mod slots;

pub use adopt::{Adopted, PinnedBackend, PinnedService, PinnedState, read_pinned};
use agent_common::addr::{self, family};
use filters::{service_filters, union, write_filter};
use ids::Ids;
use slots::Slots;

use crate::{
    config::{Algorithm, Encapsulation, PodRef, Protocol, ServiceSpec},
    counters::{self, Counters, EndedSilently},
    datapath::Maps,
    maglev,
};

pub fn service_key(spec: &ServiceSpec) -> ServiceKey {
    service_key_of(spec.vip, spec.port, spec.protocol)
}

/// The `SERVICES` key of a frontend.
pub fn service_key_of(vip: std::net::IpAddr, port: u16, protocol: Protocol) -> ServiceKey {
    ServiceKey {
        addr: addr::words(vip),
        port: port.to_be(),
        proto: protocol.number(),
        family: family(vip),
    }
}

#[derive(Debug, Clone)]
pub struct BackendState {
    pub id: u32,
    pub addr: SocketAddr,
    pub weight: u32,
    /// Set while a backend that left the desired state drains: its
    /// established connections continue until they close or this passes.
    pub drain_deadline: Option<Instant>,
    /// Its pod (Kubernetes), kept while it drains: its series keep their
    /// labels to the end.
    pub pod: Option<PodRef>,
    /// `BACKEND_F_REMOTE` as written (None: not known, adopted from pinned
    /// maps; the next apply writes it).
    pub remote: Option<bool>,
}

impl BackendState {
    /// Takes no new connections: removed and draining, or weight 0.
    pub fn draining(&self) -> bool {
        self.weight == 0 || self.drain_deadline.is_some()
    }
}

#[derive(Debug, Clone)]
pub struct ServiceState {
    pub id: u32,
    pub spec: ServiceSpec,
    pub backends: Vec<BackendState>,
    /// First slot of the live table in `MAGLEV` (None: none written yet).
    pub table_offset: Option<u32>,
    /// The live table, as backend ids (shared: snapshots of the state
    /// for the read side copy it often).
    pub table: std::sync::Arc<Vec<u32>>,
}

pub struct Reconciler {
    maps: Maps,
    /// `maglev.table_size`: the largest table a service gets.
    table_size: u32,
    /// Regions of the MAGLEV array, one per service's live table.
    slots: Slots,
    nr_cpus: usize,
    pub services: BTreeMap<String, ServiceState>,
    service_ids: Ids,
    backend_ids: Ids,
    backend_filter: Prefilter,
    backend_addr_filter: Prefilter,
    service_filter: Prefilter,
    service_addr_filter: Prefilter,
    /// Backends out of every table whose flows are still to be deleted
    /// before their ids may be reused (see `end_backends`).
    ending: Vec<(String, BackendState)>,
    /// Connections that ended silently (the sweep counts them; drains and
    /// the read side read them).
    ended_silently: EndedSilently,
    /// `limits.new_flows_per_second`, written into every service's policy.
    new_flows_per_second: u32,
    /// `dsr_no_neighbour` drops seen at the last `resolve_dsr_neighbours`.
    dsr_neighbour_misses: u64,
    /// What `SOURCE_RANGES` holds (see `ranges`).
    source_ranges: std::collections::BTreeSet<ranges::Entry>,
}

impl Reconciler {
    /// Sets `limits.new_flows_per_second`; the next `apply` writes it.
    pub fn set_new_flows_per_second(&mut self, n: u32) {
        self.new_flows_per_second = n;
    }

    pub fn new(maps: Maps, table_size: u32, max_services: u32, max_backends: u32) -> Result<Self> {
        let nr_cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
        let slots = Slots::new(maps.maglev.slots());
        let source_ranges = ranges::read(&maps.source_ranges);
        Ok(Self {
            source_ranges,
            maps,
            table_size,
            slots,
            nr_cpus,
            services: BTreeMap::new(),
            service_ids: Ids::new(max_services, "service"),
            backend_ids: Ids::new(max_backends, "backend"),
            backend_filter: Prefilter::default(),
            backend_addr_filter: Prefilter::default(),
            new_flows_per_second: crate::config::DEFAULT_NEW_FLOWS_PER_SECOND,
            dsr_neighbour_misses: 0,
            service_filter: Prefilter::default(),
            service_addr_filter: Prefilter::default(),
            ending: Vec::new(),
            ended_silently: EndedSilently::default(),
        })
    }

    /// Makes the kernel maps hold exactly `desired`. Refuses, before
    /// changing anything, what the running maps can't hold.
    pub fn apply(&mut self, desired: &[ServiceSpec]) -> Result<()> {
        self.check_capacity(desired)?;
        // A backend's id is freed only after no table points at it, so new
        // backends need free ids while the old ones still hold theirs. When
        // that doesn't fit, drop the leaving backends first.
        let new_backends = self.new_backend_count(desired);
        if new_backends > self.backend_ids.available() {
            // Draining backends hold ids: end their drains first.
            self.finish_drains(None);
        }
        if new_backends > self.backend_ids.available() {
            let staying: Vec<ServiceSpec> = desired
                .iter()
                .map(|spec| {
                    let old = self.services.get(&spec.name);
                    let known = |addr: &SocketAddr| {
                        old.is_some_and(|o| o.backends.iter().any(|b| b.addr == *addr))
                    };
                    if spec.backends.iter().all(|(addr, _)| known(addr)) {
                        return spec.clone(); // nothing new: unchanged by this pass
                    }
                    let mut spec = spec.clone();
                    spec.drain_timeout = std::time::Duration::ZERO;
                    spec.backends.retain(|(addr, _)| known(addr));
                    spec
                })
                .collect();
            let staying = self.apply_once(&staying);
            self.end_backends();
            staying?;
        }
        let applied = self.apply_once(desired);
        self.end_backends();
        applied
    }

    fn check_capacity(&self, desired: &[ServiceSpec]) -> Result<()> {
        if desired.len() > self.service_ids.limit as usize {
            bail!(
                "{} services, but the running maps hold {} (limits.max_services at start)",
                desired.len(),
                self.service_ids.limit
            );
        }
        let backends: usize = desired.iter().map(|s| s.backends.len()).sum();
        if backends > self.backend_ids.limit as usize {
            bail!(
                "{backends} backends, but the running maps hold {} (limits.max_backends at start)",
                self.backend_ids.limit
            );
        }
        // Every table fitting at once; replaced tables wait out their
        // quarantine in the pool's headroom (or the apply waits for them).
        let needed: u64 = desired
            .iter()
            .map(|s| u64::from(slots::block_for(self.table_size_for(s))))
            .sum();
        if needed > u64::from(self.slots.capacity()) {
            bail!(
                "the services' Maglev tables need {needed} slots, but the running MAGLEV array holds {} (sized by limits.max_services and limits.max_backends at start)",
                self.slots.capacity()
            );
        }
        Ok(())
    }

    /// The size of `spec`'s table: by its backend count, up to
    /// `maglev.table_size`.
    fn table_size_for(&self, spec: &ServiceSpec) -> u32 {
        slots::table_size_for(spec.backends.len(), self.table_size)
    }

    /// Backends in `desired` that have no id yet.
    fn new_backend_count(&self, desired: &[ServiceSpec]) -> u32 {
        desired
            .iter()
            .map(|spec| {
                let old = self.services.get(&spec.name);
                spec.backends
                    .iter()
                    .filter(|(addr, _)| {
                        !old.is_some_and(|o| {
                            service_key(&o.spec) == service_key(spec)
                                && o.backends.iter().any(|b| b.addr == *addr)
                        })
                    })
                    .count() as u32
            })
            .sum()
    }

    fn apply_once(&mut self, desired: &[ServiceSpec]) -> Result<()> {
        // Prefilter bits for services about to exist are set first (the old
        // bits stay until the old services are gone).
        let (wanted, wanted_addr) = service_filters(desired);
        let (union, union_addr) = (
            union(&self.service_filter, &wanted),
            union(&self.service_addr_filter, &wanted_addr),
        );
        self.write_filter(prefilter::SERVICE, &union)?;
        self.write_filter(prefilter::SERVICE_ADDR, &union_addr)?;

        // A service known under another name with the same frontend (VIP,
        // port, protocol) is renamed, not replaced: its id, table, counters
        // and connections carry over (adopted services get their names so).
        let renames: Vec<(String, String)> = desired
            .iter()
            .filter(|d| !self.services.contains_key(&d.name))
            .filter_map(|d| {
                self.services
                    .iter()
                    .find(|(name, state)| {
                        service_key(&state.spec) == service_key(d)
                            && !desired.iter().any(|x| &x.name == *name)
                    })
                    .map(|(name, _)| (name.clone(), d.name.clone()))
            })
            .collect();
        for (from, to) in renames {
            if let Some(state) = self.services.remove(&from) {
                info!(from, to, "service renamed");
                self.services.insert(to, state);
            }
        }

        // Services that are gone, or whose frontend changed, go first so that
        // their ids and slots are free for the rest.
        let stale: Vec<String> = self
            .services
            .iter()
            .filter(|(name, state)| {
                desired
                    .iter()
                    .find(|d| &d.name == *name)
                    .is_none_or(|d| service_key(d) != service_key(&state.spec))
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            self.remove_service(&name)?;
        }
        for spec in desired {
            // Unchanged services cost nothing: a churn update touches only
            // what changed. (An adopted service has no known table yet.)
            if self
                .services
                .get(&spec.name)
                .is_some_and(|s| s.spec == *spec && !s.table.is_empty())
            {
                continue;
            }
            self.upsert_service(spec)
                .with_context(|| format!("service {}", spec.name))?;
        }

        // Source ranges of service ids no service has (removed, or left in
        // a pinned trie by the agent before).
        let live: std::collections::HashSet<u32> = self.services.values().map(|s| s.id).collect();
        ranges::remove_where(
            &mut self.maps.source_ranges,
            &mut self.source_ranges,
            |(_, r)| !live.contains(&r.service_id),
        );

        // Now that removed services are out of the map, drop their bits.
        self.write_filter(prefilter::SERVICE, &wanted)?;
        self.write_filter(prefilter::SERVICE_ADDR, &wanted_addr)?;
        self.service_filter = wanted;
        self.service_addr_filter = wanted_addr;
        Ok(())
    }

    fn remove_service(&mut self, name: &str) -> Result<()> {
        let Some(state) = self.services.remove(name) else {
            return Ok(());
        };
        let key = service_key(&state.spec);
        match self.maps.services.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(e).with_context(|| format!("removing service {name}")),
        }
        for b in state.backends {
            self.ending.push((name.to_string(), b));
        }
        if let Some(offset) = state.table_offset {
            self.slots.retire(offset);
        }
        // Before its id can be reused: a new service must not inherit them.
        ranges::remove_where(
            &mut self.maps.source_ranges,
            &mut self.source_ranges,
            |(_, r)| r.service_id == state.id,
        );
        // Whatever the spec says now: affinity may have been switched off
        // before the removal, and an adopted orphan's spec doesn't know.
        self.forget_affinity(state.id);
        self.service_ids.give(state.id);
        info!(service = name, "service removed");
        Ok(())
    }

    /// Deletes the session affinity entries of service `id`, which is being
    /// removed. The kernel would not follow a stale entry to a backend of
    /// another service (the key holds the service id, and an entry is
    /// used only while `BACKENDS[backend].service_id` is that service's),
    /// but a new service given this id, with a backend given the old
    /// entry's backend id, would take the old clients there: not Maglev's
    /// choice, and unlike every other node. One walk of the table (a
    /// service removal is rare); an entry the walk misses only costs that.
    fn forget_affinity(&mut self, id: u32) {
        let stale: Vec<agent_common::AffinityKey> = self
            .maps
            .affinity
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.service_id == id)
            .collect();
        for key in &stale {
            let _ = self.maps.affinity.remove(key);
        }
        if !stale.is_empty() {
            info!(
                service_id = id,
                entries = stale.len(),
                "session affinity entries of a removed service deleted"
            );
        }
    }

    fn upsert_service(&mut self, spec: &ServiceSpec) -> Result<()> {
        // The old state stays recorded until the new one is in place.
        let existing = self.services.get(&spec.name).cloned();
        let is_new = existing.is_none();
        let (id, mut old_backends, old_offset, old_table) = match existing {
            Some(s) => (s.id, s.backends, s.table_offset, s.table),
            None => {
                let id = self.service_ids.take()?;
                self.zero_stats(true, id)?;
                (id, Vec::new(), None, Default::default())
            }
        };

        // 1. Backends, reusing ids of backends that stay.
        let mut added = false;
        let mut backends = Vec::with_capacity(spec.backends.len());
        for &(addr, weight) in &spec.backends {
            let state = match old_backends.iter().position(|b| b.addr == addr) {
                Some(i) => {
                    let mut b = old_backends.swap_remove(i);
                    let remote = spec.remote_backends.contains(&addr);
                    if b.weight != weight || b.remote != Some(remote) {
                        b.weight = weight;
                        b.remote = Some(remote);
                        self.write_backend(b.id, addr, weight, id, remote)?;
                    }
                    if b.drain_deadline.take().is_some() {
                        info!(service = spec.name, backend = %addr, "backend back; drain ended");
                    }
                    b.pod = spec.pods.get(&addr).cloned();
                    b
                }
                None => {
                    added = true;
                    if spec.dsr.is_some() {
                        crate::neighbour::solicit(addr.ip());
                    }
                    let backend_id = self.backend_ids.take()?;
                    let remote = spec.remote_backends.contains(&addr);
                    self.write_new_backend(
                        backend_id,
                        addr,
                        weight,
                        (spec.protocol.number(), id),
                        remote,
                    )?;
                    BackendState {
                        id: backend_id,
                        addr,
                        weight,
                        drain_deadline: None,
                        pod: spec.pods.get(&addr).cloned(),
                        remote: Some(remote),
                    }
                }
            };
            self.mark_draining(&state)?;
            backends.push(state);
        }
        if added {
            write_filter(&mut self.maps, prefilter::BACKEND, &self.backend_filter)?;
            write_filter(
                &mut self.maps,
                prefilter::BACKEND_ADDR,
                &self.backend_addr_filter,
            )?;
        }

        // 2. The failure policy, before the service entry can be used.
        let active = backends.iter().filter(|b| b.weight > 0).count() as u32;
        let f = &spec.failure;
        let policy = ServicePolicy {
            consecutive_failures: f.consecutive_failures,
            max_ejected: active * f.max_ejected_percent / 100,
            connect_timeout_ns: u64::from(f.connect_timeout_ms) * 1_000_000,
            // The LB never sees a DSR backend's refusal: nothing to retry on.
            flags: if f.retry_on_refused && spec.dsr.is_none() {
                SERVICE_F_RETRY
            } else {
                0
            },
            min_distinct_clients: f.min_distinct_clients,
            new_flows_per_second: self.new_flows_per_second,
            _pad: 0,
        };
        self.maps
            .service_policy
            .set(id, policy, 0)
            .context("writing the failure policy")?;

        // 3. The table, into a free region, only when it changed. Its size
        // follows the backend count, so every node sizes it alike.
        let weights: Vec<(SocketAddr, u32)> = backends.iter().map(|b| (b.addr, b.weight)).collect();
        debug_assert!(backends.iter().all(|b| b.drain_deadline.is_none()));
        let size = self.table_size_for(spec);
        let table: Vec<u32> = maglev::build(&weights, size)
            .into_iter()
            .map(|i| {
                if i == maglev::EMPTY {
                    NO_BACKEND
                } else {
                    backends[i as usize].id
                }
            })
            .collect();
        let (offset, replaced) = match old_offset {
            Some(offset) if table == *old_table => (offset, None),
            _ => {
                let offset = self.slots.alloc(size).with_context(|| {
                    format!(
                        "no free region of {} slots in the MAGLEV array for a table of {size} ({} of {} slots in use)",
                        slots::block_for(size),
                        self.slots.in_use(),
                        self.slots.capacity()
                    )
                })?;
                if let Err(e) = self.maps.maglev.write(offset, &table) {
                    self.slots.retire(offset);
                    return Err(e)
                        .with_context(|| format!("writing the Maglev table at slot {offset}"));
                }
                (offset, old_offset)
            }
        };

        // 4. Source ranges the service gains, before its entry can ask.
        let wanted_ranges = ranges::wanted(id, spec);
        for entry in wanted_ranges.difference(&self.source_ranges.clone()) {
            if let Err(e) = ranges::insert(
                &mut self.maps.source_ranges,
                &mut self.source_ranges,
                *entry,
            ) {
                if offset != old_offset.unwrap_or(u32::MAX) {
                    self.slots.retire(offset);
                }
                return Err(e);
            }
        }

        // 5. The service entry: one atomic update flips to the new table.
        // With IPIP DSR, `snat_ip` is the tunnel's outer source, not SNAT.
        let mut flags = match spec.dsr {
            Some(Encapsulation::None) => SERVICE_F_DSR_L2,
            Some(Encapsulation::Ipip) => SERVICE_F_DSR_TUNNEL,
            None if spec.snat_ip.is_some() => SERVICE_F_SNAT,
            None => 0,
        };
        if spec.allowed_sources.is_some() {
            flags |= SERVICE_F_SOURCE_RANGES;
        }
        if spec.snat_ip.is_none() && spec.snat_remote.is_some() {
            flags |= SERVICE_F_SNAT_REMOTE;
        }
        let value = Service {
            id,
            table_offset: offset,
            table_size: size,
            flags: flags
                | if spec.affinity_timeout.is_some() {
                    SERVICE_F_AFFINITY
                } else {
                    0
                }
                | match spec.algorithm {
                    Algorithm::Maglev => 0,
                    Algorithm::LeastConnections => SERVICE_F_LEAST_CONN,
                },
            snat_addr: spec
                .snat_ip
                .or(spec.snat_remote)
                .map(addr::words)
                .unwrap_or_default(),
            affinity_timeout_s: spec.affinity_timeout.unwrap_or(0),
            _pad: 0,
        };
        if let Err(e) = self.maps.services.insert(service_key(spec), value, 0) {
            if offset != old_offset.unwrap_or(u32::MAX) {
                self.slots.retire(offset);
            }
            return Err(e).context("writing the service entry");
        }
        // No new packet reads the old table now; one in flight may still.
        if let Some(old) = replaced {
            self.slots.retire(old);
        }
        // Ranges it lost: its entry no longer admits by them.
        ranges::remove_where(
            &mut self.maps.source_ranges,
            &mut self.source_ranges,
            |(prefix, r)| r.service_id == id && !wanted_ranges.contains(&(*prefix, *r)),
        );

        // 6. Backends no longer listed: no table points at them now. They
        // drain (established connections continue; a reused 5-tuple
        // re-picks), or with no drain time go at once.
        for mut b in old_backends {
            if b.drain_deadline.is_none() {
                if spec.drain_timeout.is_zero() {
                    self.ending.push((spec.name.clone(), b));
                    continue;
                }
                b.drain_deadline = Some(Instant::now() + spec.drain_timeout);
                info!(service = spec.name, backend = %b.addr, drain_timeout_s = spec.drain_timeout.as_secs(), "backend draining");
            }
            // The new table is live: failing here must not lose the state
            // recorded below (a retry would write into the live half).
            if let Err(e) = self.mark_draining(&b) {
                warn!(service = spec.name, backend = %b.addr, error = format!("{e:#}"), "marking a backend draining");
            }
            backends.push(b);
        }
        if is_new {
            info!(service = spec.name, vip = %spec.vip, port = spec.port, protocol = spec.protocol.as_str(), backends = backends.len(), "service added");
        }
        self.services.insert(
            spec.name.clone(),
            ServiceState {
                id,
                spec: spec.clone(),
                backends,
                table_offset: Some(offset),
                table: std::sync::Arc::new(table),
            },
        );
        Ok(())
    }

    fn write_backend(
        &mut self,
        id: u32,
        addr: SocketAddr,
        weight: u32,
        service_id: u32,
        remote: bool,
    ) -> Result<()> {
        let backend = Backend {
            addr: addr::words(addr.ip()),
            port: addr.port().to_be(),
            weight: weight as u16, // ≤ MAX_WEIGHT
            service_id,
            flags: if remote { BACKEND_F_REMOTE } else { 0 },
            _pad: 0,
        };
        self.maps
            .backends
            .set(id, backend, 0)
            .with_context(|| format!("writing backend {addr}"))
    }

    /// Everything the kernel keeps per backend, for a new or reused id.
    /// `(proto, service_id)`: the service's protocol and id.
    fn write_new_backend(
        &mut self,
        id: u32,
        addr: SocketAddr,
        weight: u32,
        (proto, service_id): (u8, u32),
        remote: bool,
    ) -> Result<()> {
        let words = addr::words(addr.ip());
        self.write_backend(id, addr, weight, service_id, remote)?;
        // A reused id must not inherit its last owner's next hop or health.
        let fib = BackendFib {
            dst: words,
            fib: FibCache::default(),
        };
        self.maps
            .backend_fib
            .set(id, fib, 0)
            .with_context(|| format!("clearing the FIB cache of backend {addr}"))?;
        self.maps
            .backend_health
            .set(id, BackendHealth::default(), 0)
            .with_context(|| format!("clearing the health of backend {addr}"))?;
        self.maps
            .backend_active
            .set(id, 0, 0)
            .with_context(|| format!("clearing the active count of backend {addr}"))?;
        let zeros = PerCpuValues::try_from(vec![LatencyHistogram::default(); self.nr_cpus])
            .context("building per-CPU zeros")?;
        self.maps
            .backend_latency
            .set(id, zeros, 0)
            .with_context(|| format!("clearing the latency histogram of backend {addr}"))?;
        self.zero_stats(false, id)?;
        self.ended_silently.forget(id);
        self.backend_filter
            .insert(&words, addr.port().to_be(), proto);
        self.backend_addr_filter.insert(&words, 0, 0);
        Ok(())
    }

    fn zero_stats(&mut self, service: bool, id: u32) -> Result<()> {
        let zeros = PerCpuValues::try_from(vec![ServiceStats::default(); self.nr_cpus])
            .context("building per-CPU zeros")?;
        let map = if service {
            &mut self.maps.service_stats
        } else {
            &mut self.maps.backend_stats
        };
        map.set(id, zeros, 0)
            .with_context(|| format!("clearing statistics slot {id}"))
    }

    /// Read handles of their own on the counting maps, for the read side
    /// (sharing the count of connections that ended silently).
    pub fn read_side(&self) -> Result<Counters> {
        Ok(Counters::open(&self.maps, self.ended_silently.clone())?)
    }

    /// Read handles of their own on the service, table and flow maps.
    pub fn read_tables(&self) -> Result<crate::inspect::Tables> {
        crate::inspect::Tables::open(&self.maps)
    }

    /// Per-CPU counters summed (see `counters::stats`).
    pub fn stats(&self, service: bool, id: u32) -> ServiceStats {
        if service {
            counters::stats(&self.maps.service_stats, None, id)
        } else {
            counters::stats(&self.maps.backend_stats, Some(&self.ended_silently), id)
        }
    }

    /// A client's session affinity entry, if any (for tests and tools).
    pub fn affinity_entry(
        &self,
        key: &agent_common::AffinityKey,
    ) -> Option<agent_common::AffinityEntry> {
        self.maps.affinity.get(key, 0).ok()
    }

    /// The kernel's view of a backend's health.
    pub fn health(&self, backend_id: u32) -> BackendHealth {
        counters::health(&self.maps.backend_health, backend_id)
    }

    /// The connect latency histogram of a backend, summed over CPUs.
    pub fn latency(&self, backend_id: u32) -> LatencyHistogram {
        counters::latency(&self.maps.backend_latency, backend_id)
    }

    /// Summed per-CPU count of one `agent_common::reason` code.
    pub fn reason_count(&self, code: u32) -> u64 {
        counters::reason_count(&self.maps.reasons, code)
    }

    /// When DSR packets were dropped for want of a backend's neighbour
    /// entry since the last call (`dsr_no_neighbour`), has the kernel
    /// resolve every DSR backend again (see `neighbour`).
    pub fn resolve_dsr_neighbours(&mut self) {
        let misses: u64 = self
            .maps
            .reasons
            .get(&agent_common::reason::DSR_NO_NEIGHBOUR, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0);
        if misses == self.dsr_neighbour_misses {
            return;
        }
        self.dsr_neighbour_misses = misses;
        for s in self.services.values().filter(|s| s.spec.dsr.is_some()) {
            for b in &s.backends {
                crate::neighbour::solicit(b.addr.ip());
            }
        }
    }

    /// Makes every flow's cached FIB result stale: the next packet of each
    /// flow does a fresh FIB lookup. Called on every rtnetlink change.
    pub fn bump_fib_generation(&mut self) -> Result<()> {
        let next = self
            .maps
            .fib_generation
            .get(&0, 0)
            .unwrap_or(0)
            .wrapping_add(1);
        self.maps
            .fib_generation
            .set(0, next, 0)
            .context("writing the FIB cache generation")
    }
}
