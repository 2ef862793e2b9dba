//! Reading a pinned datapath without its agent (`sluice status` and the
//! other read commands while the agent is down, as bpftool reads maps):
//! services are named from the config file where it has them.

use std::{collections::BTreeMap, path::Path, time::Instant};

use agent_common::{Service, ServiceKey};
use anyhow::Result;

use super::Tables;
use crate::{
    config::ServiceSpec,
    counters::Counters,
    pinning::PinDir,
    reconcile::{BackendState, ServiceState, orphan_spec, pinned_backends, service_key},
    view::Snapshot,
};

/// What is pinned under one pin directory.
pub struct Pinned {
    pub dir: PinDir,
    pub tables: Tables,
    pub counters: Counters,
    pub snapshot: Snapshot,
    /// (interface, attach mode) of each pinned link.
    pub links: Vec<(String, String)>,
}

/// Opens the datapath pinned under `directory` (a config's
/// `pinning.directory`), naming its services after `config`'s.
pub fn open(directory: &Path, config: &[ServiceSpec]) -> Result<Pinned> {
    let dir = PinDir::existing(directory)?;
    let tables = Tables::open_pinned(&dir.maps_dir())?;
    let counters = Counters::open_pinned(&dir.maps_dir())?;
    let snapshot = snapshot(&tables, config);
    let links = dir
        .pinned_links()
        .unwrap_or_default()
        .into_iter()
        .map(|(interface, path)| {
            let mode = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.rsplit_once('@'))
                .map(|(_, mode)| mode.to_string())
                .unwrap_or_default();
            (interface, mode)
        })
        .collect();
    Ok(Pinned {
        dir,
        tables,
        counters,
        snapshot,
        links,
    })
}

/// The services and backends the pinned maps hold, as the agent's
/// snapshot would show them.
fn snapshot(tables: &Tables, config: &[ServiceSpec]) -> Snapshot {
    let pinned: Vec<(ServiceKey, Service)> =
        tables.services.iter().filter_map(Result::ok).collect();
    let family_of = pinned.iter().map(|(k, v)| (v.id, k.family)).collect();
    let mut by_service = pinned_backends(
        &tables.backends,
        |id| tables.health(id),
        &family_of,
        tables.backends.len(),
    );
    let mut services = BTreeMap::new();
    for (key, value) in &pinned {
        let spec = match config.iter().find(|s| service_key(s) == *key) {
            Some(spec) => spec.clone(),
            None => orphan_spec(key),
        };
        let backends = by_service
            .remove(&value.id)
            .unwrap_or_default()
            .into_iter()
            .map(|(id, addr, weight, draining)| BackendState {
                id,
                addr,
                weight,
                // Draining shows as such; when it ends is the agent's.
                drain_deadline: draining.then(Instant::now),
                // Pods are discovery's; the pinned maps don't keep them.
                pod: None,
            })
            .collect();
        services.insert(
            spec.name.clone(),
            ServiceState {
                id: value.id,
                spec,
                backends,
                live_half: 0,
                table: Default::default(),
            },
        );
    }
    Snapshot { services }
}

impl Pinned {
    /// `sluice status` from the pinned maps: no readiness, discovery or
    /// overrides (the agent's), the rest as the agent would show it.
    pub fn status(&self, directory: &Path) -> super::status::StatusView {
        use aya::maps::IterableMap as _;
        let mut status = super::status::base(&self.counters, &self.snapshot, "pinned maps");
        status.pin_directory = Some(directory.display().to_string());
        status.attachments = self
            .links
            .iter()
            .map(|(interface, mode)| super::status::Attachment {
                interface: interface.clone(),
                mode: mode.clone(),
            })
            .collect();
        let capacity = |m: &aya::maps::MapData| m.info().map(|i| i.max_entries()).unwrap_or(0);
        status.conntrack = super::status::ConntrackStatus {
            entries: self.tables.conntrack.keys().count() as u64,
            capacity: capacity(self.tables.conntrack.map()),
            half_open_entries: self.tables.half_open.keys().count() as u64,
            half_open_capacity: capacity(self.tables.half_open.map()),
        };
        status
    }
}
