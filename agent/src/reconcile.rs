//! Desired services → kernel maps, with the fewest writes and an order that
//! never lets a packet see a half-made state:
//!
//! 1. backends are written before any table points at them;
//! 2. a changed Maglev table is written into the service's idle half, then the
//!    service entry flips to it in one map update;
//! 3. service prefilter bits are set before a service appears and cleared only
//!    after it is gone; backend bits are never cleared while the agent runs, so
//!    replies of connections to a removed backend are still reverse-NATed.

use std::{
    collections::{BTreeMap, VecDeque},
    net::{IpAddr, SocketAddr},
    time::Instant,
};

// The kernel's word for a backend's state (`BackendState` here is the
// reconciler's record of a backend).
use agent_common::BackendState as Admission;
use agent_common::{
    Backend, BackendFib, BackendHealth, FAMILY_V4, FAMILY_V6, FibCache, FlowKey, LatencyHistogram,
    NO_BACKEND, Prefilter, SERVICE_F_RETRY, SERVICE_F_SNAT, Service, ServiceKey, ServicePolicy,
    ServiceStats, hash::prefilter_bit, prefilter,
};
use anyhow::{Context, Result, anyhow, bail};
use aya::maps::PerCpuValues;
use tracing::{info, warn};

use crate::{
    config::ServiceSpec,
    counters::{Counters, EndedSilently},
    datapath::Maps,
    maglev,
};

/// Address words as the kernel keeps them: network byte order, IPv4 in word 0.
pub fn addr_words(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
    }
}

/// The service bitmaps for `desired`: (VIP, port, protocol) and VIP alone.
fn service_filters(desired: &[ServiceSpec]) -> (Prefilter, Prefilter) {
    let (mut frontends, mut addrs) = (Prefilter::default(), Prefilter::default());
    for spec in desired {
        let key = service_key(spec);
        frontends.set(prefilter_bit(&key.addr, key.port, key.proto));
        addrs.set(prefilter_bit(&key.addr, 0, 0));
    }
    (frontends, addrs)
}

fn union(a: &Prefilter, b: &Prefilter) -> Prefilter {
    let mut out = *a;
    for (word, other) in out.words.iter_mut().zip(&b.words) {
        *word |= other;
    }
    out
}

fn write_filter(maps: &mut Maps, slot: u32, filter: &Prefilter) -> Result<()> {
    maps.prefilter
        .set(slot, filter, 0)
        .with_context(|| format!("writing prefilter slot {slot}"))
}

pub fn family(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 }
}

pub fn service_key(spec: &ServiceSpec) -> ServiceKey {
    ServiceKey {
        addr: addr_words(spec.vip),
        port: spec.port.to_be(),
        proto: spec.protocol.number(),
        family: family(spec.vip),
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
    /// Which half of this service's table region is live (0 or 1).
    pub live_half: u32,
    /// The live table, as backend ids (shared: snapshots of the state
    /// for the read side copy it often).
    pub table: std::sync::Arc<Vec<u32>>,
}

/// The inverse of `addr_words`.
fn words_ip(words: [u32; 4], v4: bool) -> IpAddr {
    if v4 {
        return IpAddr::from(words[0].to_ne_bytes());
    }
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    IpAddr::from(o)
}

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

/// A pinned service the config no longer has, for its removal.
fn orphan_spec(key: &ServiceKey) -> ServiceSpec {
    let vip = words_ip(key.addr, key.family == FAMILY_V4);
    let protocol = if key.proto == agent_common::PROTO_UDP {
        crate::config::Protocol::Udp
    } else {
        crate::config::Protocol::Tcp
    };
    let port = u16::from_be(key.port);
    ServiceSpec {
        name: format!("{ORPHAN_PREFIX}{vip} {port}/{}", protocol.as_str()),
        vip,
        port,
        protocol,
        snat_ip: None,
        backends: Vec::new(),
        failure: Default::default(),
        discovery: None,
        drain_timeout: std::time::Duration::ZERO,
    }
}

/// A pool of small integer ids; freed ids are reused last, so stale
/// conntrack entries rarely point at a reused id.
struct Ids {
    next: u32,
    limit: u32,
    free: VecDeque<u32>,
    what: &'static str,
}

impl Ids {
    fn new(limit: u32, what: &'static str) -> Self {
        Self {
            next: 0,
            limit,
            free: VecDeque::new(),
            what,
        }
    }
    fn take(&mut self) -> Result<u32> {
        if self.next < self.limit {
            self.next += 1;
            return Ok(self.next - 1);
        }
        self.free
            .pop_front()
            .ok_or_else(|| anyhow!("no free {} slot (limit {})", self.what, self.limit))
    }
    /// Marks `used` as taken (adopted from pinned maps).
    fn adopt(&mut self, used: &[u32]) {
        self.next = used.iter().map(|&id| id + 1).max().unwrap_or(0);
        self.free = (0..self.next).filter(|id| !used.contains(id)).collect();
    }
    fn give(&mut self, id: u32) {
        self.free.push_back(id);
    }
    fn available(&self) -> u32 {
        self.limit - self.next + self.free.len() as u32
    }
}

pub struct Reconciler {
    pub maps: Maps,
    table_size: u32,
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
    /// The reconciler's own read handles (drains wait on counters, the
    /// readmitter on health words).
    counters: Counters,
}

impl Reconciler {
    pub fn new(maps: Maps, table_size: u32, max_services: u32, max_backends: u32) -> Result<Self> {
        let nr_cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
        let counters = Counters::open(&maps, EndedSilently::default())?;
        Ok(Self {
            maps,
            table_size,
            nr_cpus,
            services: BTreeMap::new(),
            service_ids: Ids::new(max_services, "service"),
            backend_ids: Ids::new(max_backends, "backend"),
            backend_filter: Prefilter::default(),
            backend_addr_filter: Prefilter::default(),
            service_filter: Prefilter::default(),
            service_addr_filter: Prefilter::default(),
            ending: Vec::new(),
            counters,
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
            self.finish_drains(None)?;
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
        Ok(())
    }

    /// Backends in `desired` that have no id yet.
    /// Takes over the state an earlier agent left in pinned maps: services
    /// (matched to the config by VIP, port and protocol) keep their ids,
    /// tables and counters, backends keep theirs. Adopted services the config
    /// no longer has are removed by the next `apply`; adopted backends it no
    /// longer lists drain. Returns, per config service, the backends found
    /// (discovery services serve them until their provider answers).
    pub fn adopt(&mut self, config: &[ServiceSpec]) -> Result<Adopted> {
        let pinned: Vec<(ServiceKey, Service)> =
            self.maps.services.iter().filter_map(Result::ok).collect();
        let family_of: std::collections::HashMap<u32, u8> =
            pinned.iter().map(|(k, v)| (v.id, k.family)).collect();
        // Per service id: (backend id, address, weight, draining).
        let mut by_service: BTreeMap<u32, Vec<(u32, SocketAddr, u32, bool)>> = BTreeMap::new();
        let mut backend_ids = Vec::new();
        for id in 0..self.backend_ids.limit {
            let Ok(b) = self.maps.backends.get(&id, 0) else {
                continue;
            };
            if b.port == 0 || self.health(id).state() == Admission::Removed {
                continue; // never used, or removed
            }
            let v4 = family_of.get(&b.service_id) == Some(&FAMILY_V4);
            let ip = words_ip(b.addr, v4);
            by_service.entry(b.service_id).or_default().push((
                id,
                SocketAddr::new(ip, u16::from_be(b.port)),
                u32::from(b.weight),
                self.health(id).state() == Admission::Draining,
            ));
            backend_ids.push(id);
        }
        let mut found = BTreeMap::new();
        let mut orphans = Vec::new();
        let mut service_ids = Vec::new();
        for (key, value) in &pinned {
            service_ids.push(value.id);
            let spec = match config.iter().find(|s| service_key(s) == *key) {
                Some(spec) => spec.clone(),
                None => orphan_spec(key),
            };
            let backends: Vec<BackendState> = by_service
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
                })
                .collect();
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
            let live_half = u32::from(value.table_offset != self.table_offset(value.id, 0));
            self.services.insert(
                spec.name.clone(),
                ServiceState {
                    id: value.id,
                    spec,
                    backends,
                    live_half,
                    // Unknown: the first apply writes the idle half and flips.
                    table: Default::default(),
                },
            );
        }
        // Backends of services that are gone: their ids stay taken until
        // marked removed here.
        for (_, orphans) in by_service {
            for (id, ..) in orphans {
                let removed = BackendHealth {
                    ejected: Admission::Removed as u32,
                    ..BackendHealth::default()
                };
                let _ = self.maps.backend_health.set(id, removed, 0);
                backend_ids.retain(|&x| x != id);
            }
        }
        self.service_ids.adopt(&service_ids);
        self.backend_ids.adopt(&backend_ids);
        // The bits already set stay set: replies of adopted flows to any
        // backend must still be recognised.
        let read = |slot| self.maps.prefilter.get(&slot, 0).unwrap_or_default();
        self.backend_filter = read(prefilter::BACKEND);
        self.backend_addr_filter = read(prefilter::BACKEND_ADDR);
        self.service_filter = read(prefilter::SERVICE);
        self.service_addr_filter = read(prefilter::SERVICE_ADDR);
        info!(
            services = service_ids.len(),
            backends = backend_ids.len(),
            "adopted the pinned datapath"
        );
        Ok(Adopted { found, orphans })
    }

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

        // Now that removed services are out of the map, drop their bits.
        self.write_filter(prefilter::SERVICE, &wanted)?;
        self.write_filter(prefilter::SERVICE_ADDR, &wanted_addr)?;
        self.service_filter = wanted;
        self.service_addr_filter = wanted_addr;
        Ok(())
    }

    fn write_filter(&mut self, slot: u32, filter: &Prefilter) -> Result<()> {
        write_filter(&mut self.maps, slot, filter)
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
        self.service_ids.give(state.id);
        info!(service = name, "service removed");
        Ok(())
    }

    fn upsert_service(&mut self, spec: &ServiceSpec) -> Result<()> {
        // The old state stays recorded until the new one is in place.
        let existing = self.services.get(&spec.name).cloned();
        let is_new = existing.is_none();
        let (id, mut old_backends, live_half, old_table) = match existing {
            Some(s) => (s.id, s.backends, s.live_half, s.table),
            None => {
                let id = self.service_ids.take()?;
                self.zero_stats(true, id)?;
                (id, Vec::new(), 1, Default::default())
            }
        };

        // 1. Backends, reusing ids of backends that stay.
        let mut added = false;
        let mut backends = Vec::with_capacity(spec.backends.len());
        for &(addr, weight) in &spec.backends {
            let state = match old_backends.iter().position(|b| b.addr == addr) {
                Some(i) => {
                    let mut b = old_backends.swap_remove(i);
                    if b.weight != weight {
                        b.weight = weight;
                        self.write_backend(b.id, addr, weight, id)?;
                    }
                    if b.drain_deadline.take().is_some() {
                        info!(service = spec.name, backend = %addr, "backend back; drain ended");
                    }
                    b
                }
                None => {
                    added = true;
                    let backend_id = self.backend_ids.take()?;
                    self.write_new_backend(backend_id, addr, weight, spec.protocol.number(), id)?;
                    BackendState {
                        id: backend_id,
                        addr,
                        weight,
                        drain_deadline: None,
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
            flags: if f.retry_on_refused {
                SERVICE_F_RETRY
            } else {
                0
            },
            _pad: 0,
        };
        self.maps
            .service_policy
            .set(id, policy, 0)
            .context("writing the failure policy")?;

        // 3. The table, into the idle half, only when it changed.
        let weights: Vec<(SocketAddr, u32)> = backends.iter().map(|b| (b.addr, b.weight)).collect();
        debug_assert!(backends.iter().all(|b| b.drain_deadline.is_none()));
        let table: Vec<u32> = maglev::build(&weights, self.table_size)
            .into_iter()
            .map(|i| {
                if i == maglev::EMPTY {
                    NO_BACKEND
                } else {
                    backends[i as usize].id
                }
            })
            .collect();
        let half = if table != *old_table {
            let half = 1 - live_half;
            let base = self.table_offset(id, half);
            self.maps
                .maglev
                .write(base, &table)
                .with_context(|| format!("writing the Maglev table at slot {base}"))?;
            half
        } else {
            live_half
        };

        // 4. The service entry: one atomic update flips to the new table.
        let value = Service {
            id,
            table_offset: self.table_offset(id, half),
            table_size: self.table_size,
            flags: if spec.snat_ip.is_some() {
                SERVICE_F_SNAT
            } else {
                0
            },
            snat_addr: spec.snat_ip.map(addr_words).unwrap_or_default(),
        };
        self.maps
            .services
            .insert(service_key(spec), value, 0)
            .context("writing the service entry")?;

        // 5. Backends no longer listed: no table points at them now. They
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
                live_half: half,
                table: std::sync::Arc::new(table),
            },
        );
        Ok(())
    }

    /// The kernel's health word says whether new connections may use the
    /// backend; draining ones must not (a reused 5-tuple re-picks).
    fn mark_draining(&mut self, b: &BackendState) -> Result<()> {
        let mut health = self.health(b.id);
        let want = if b.draining() {
            if health.state() == Admission::Ejected {
                return Ok(()); // ejected already: no new connections either
            }
            Admission::Draining
        } else if health.state() == Admission::Draining {
            Admission::Active
        } else {
            return Ok(());
        };
        if health.state() != want {
            health.set_state(want);
            self.maps
                .backend_health
                .set(b.id, health, 0)
                .with_context(|| format!("writing the health of backend {}", b.addr))?;
        }
        Ok(())
    }

    /// Ends the backends queued in `ending`: marked removed (a reused
    /// 5-tuple re-picks), their remaining conntrack entries deleted in one
    /// walk (the next packet of such a connection starts over and is reset
    /// by whichever backend it reaches), then their ids freed: no flow and
    /// no table points at a freed id.
    fn end_backends(&mut self) {
        if self.ending.is_empty() {
            return;
        }
        let ending = std::mem::take(&mut self.ending);
        let removed = BackendHealth {
            ejected: Admission::Removed as u32,
            ..BackendHealth::default()
        };
        for (_, b) in &ending {
            let _ = self.maps.backend_health.set(b.id, removed, 0);
        }
        let ids: std::collections::HashSet<u32> = ending.iter().map(|(_, b)| b.id).collect();
        let doomed: Vec<(FlowKey, u32)> = self
            .maps
            .conntrack
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, flow)| ids.contains(&flow.backend_id))
            .map(|(key, flow)| (key, flow.backend_id))
            .collect();
        let mut closed: BTreeMap<u32, usize> = BTreeMap::new();
        for (key, id) in &doomed {
            if self.maps.conntrack.remove(key).is_ok() {
                *closed.entry(*id).or_default() += 1;
            }
        }
        // Sockets the socket-level balancer sent there stop being followed
        // (they stay connected to the backend directly; their id is reused).
        let followed: Vec<u64> = self
            .maps
            .sock_connects
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, c)| ids.contains(&c.backend_id))
            .map(|(sk, _)| sk)
            .collect();
        for sk in followed {
            let _ = self.maps.sock_connects.remove(&sk);
        }
        for (service, b) in ending {
            let flows = closed.get(&b.id).copied().unwrap_or(0);
            info!(service, backend = %b.addr, flows_closed = flows, "backend removed");
            self.backend_ids.give(b.id);
        }
        if let Err(e) = self.rebuild_backend_filters() {
            tracing::warn!(error = format!("{e:#}"), "backend prefilter not rebuilt");
        }
    }

    /// The backend prefilters as the backends still in a service make them:
    /// the bits of backends that are gone are cleared, so their address's
    /// traffic no longer takes the slow path (nor is counted as Sluice's).
    fn rebuild_backend_filters(&mut self) -> Result<()> {
        let (mut ports, mut addrs) = (Prefilter::default(), Prefilter::default());
        for state in self.services.values() {
            let proto = state.spec.protocol.number();
            for b in &state.backends {
                let words = addr_words(b.addr.ip());
                ports.set(prefilter_bit(&words, b.addr.port().to_be(), proto));
                addrs.set(prefilter_bit(&words, 0, 0));
            }
        }
        self.write_filter(prefilter::BACKEND, &ports)?;
        self.write_filter(prefilter::BACKEND_ADDR, &addrs)?;
        self.backend_filter = ports;
        self.backend_addr_filter = addrs;
        Ok(())
    }

    /// Ends drains that are over: no connection left, or the drain time
    /// passed (then its remaining flows are closed). `now` None ends every
    /// drain at once.
    pub fn finish_drains(&mut self, now: Option<Instant>) -> Result<()> {
        let mut done = Vec::new();
        for (name, state) in &self.services {
            for b in &state.backends {
                let Some(deadline) = b.drain_deadline else {
                    continue;
                };
                let timed_out = now.is_none_or(|now| now >= deadline);
                // TCP connections are counted open and closed; UDP flows
                // have no close, so they drain until the timeout.
                let idle = state.spec.protocol == crate::config::Protocol::Tcp && {
                    let st = self.stats(false, b.id);
                    st.opened <= st.closed
                };
                if idle || timed_out {
                    done.push((name.clone(), b.clone()));
                }
            }
        }
        for (name, b) in done {
            if let Some(state) = self.services.get_mut(&name) {
                state.backends.retain(|x| x.id != b.id);
            }
            self.ending.push((name, b));
        }
        self.end_backends();
        Ok(())
    }

    fn write_backend(
        &mut self,
        id: u32,
        addr: SocketAddr,
        weight: u32,
        service_id: u32,
    ) -> Result<()> {
        let backend = Backend {
            addr: addr_words(addr.ip()),
            port: addr.port().to_be(),
            weight: weight as u16, // ≤ MAX_WEIGHT
            service_id,
        };
        self.maps
            .backends
            .set(id, backend, 0)
            .with_context(|| format!("writing backend {addr}"))
    }

    /// Everything the kernel keeps per backend, for a new or reused id.
    fn write_new_backend(
        &mut self,
        id: u32,
        addr: SocketAddr,
        weight: u32,
        proto: u8,
        service_id: u32,
    ) -> Result<()> {
        let words = addr_words(addr.ip());
        self.write_backend(id, addr, weight, service_id)?;
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
        let zeros = PerCpuValues::try_from(vec![LatencyHistogram::default(); self.nr_cpus])
            .context("building per-CPU zeros")?;
        self.maps
            .backend_latency
            .set(id, zeros, 0)
            .with_context(|| format!("clearing the latency histogram of backend {addr}"))?;
        self.zero_stats(false, id)?;
        self.counters.ended_silently.forget(id);
        self.backend_filter
            .set(prefilter_bit(&words, addr.port().to_be(), proto));
        self.backend_addr_filter.set(prefilter_bit(&words, 0, 0));
        Ok(())
    }

    fn table_offset(&self, service_id: u32, half: u32) -> u32 {
        (service_id * 2 + half) * self.table_size
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
        Ok(Counters::open(
            &self.maps,
            self.counters.ended_silently.clone(),
        )?)
    }

    /// Per-CPU counters summed (see `Counters::stats`).
    pub fn stats(&self, service: bool, id: u32) -> ServiceStats {
        self.counters.stats(service, id)
    }

    /// The kernel's view of a backend's health.
    pub fn health(&self, backend_id: u32) -> BackendHealth {
        self.counters.health(backend_id)
    }

    /// Ends an ejection: the backend takes new connections again, its
    /// failure streak starts over. `ejections` and `ejected_ns` stay.
    pub fn readmit(&mut self, backend_id: u32) -> Result<()> {
        let mut health = self.health(backend_id);
        if health.state() != Admission::Ejected {
            return Ok(()); // drained or removed meanwhile
        }
        // A backend that started draining while ejected stays out.
        let draining = self
            .services
            .values()
            .flat_map(|s| &s.backends)
            .any(|b| b.id == backend_id && b.draining());
        health.set_state(if draining {
            Admission::Draining
        } else {
            Admission::Active
        });
        health.consecutive_failures = 0;
        self.maps
            .backend_health
            .set(backend_id, health, 0)
            .context("writing backend health")
    }

    /// Writes each service's count of ejected backends, which the kernel's
    /// ejection cap reads (the kernel adds one per ejection; this corrects
    /// it after readmissions).
    pub fn recount_ejected(&mut self) -> Result<()> {
        let counts: Vec<(u32, u32)> = self
            .services
            .values()
            .map(|s| {
                let n = s
                    .backends
                    .iter()
                    .filter(|b| self.health(b.id).state() == Admission::Ejected)
                    .count() as u32;
                (s.id, n)
            })
            .collect();
        for (id, n) in counts {
            self.maps
                .service_ejected
                .set(id, n, 0)
                .context("writing the ejected count")?;
        }
        Ok(())
    }

    /// The connect latency histogram of a backend, summed over CPUs.
    pub fn latency(&self, backend_id: u32) -> LatencyHistogram {
        self.counters.latency(backend_id)
    }

    /// Summed per-CPU count of one `agent_common::reason` code.
    pub fn reason_count(&self, code: u32) -> u64 {
        self.counters.reason_count(code)
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
