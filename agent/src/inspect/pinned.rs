//! Reading a pinned datapath without its agent (`sluice status` and the
//! other read commands while the agent is down, as bpftool reads maps):
//! services are named from the config file where it has them.

use std::path::Path;

use anyhow::Result;

use super::Tables;
use crate::{
    config::ServiceSpec,
    counters::Counters,
    pinning::PinDir,
    reconcile::{ServiceState, read_pinned},
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
    let pinned = read_pinned(
        &tables.services,
        &tables.backends,
        |id| tables.health(id),
        tables.backends.len(),
        config,
    );
    let services = pinned
        .services
        .into_iter()
        .map(|s| {
            let state = ServiceState {
                id: s.value.id,
                spec: s.spec,
                backends: s.backends,
                table_offset: Some(s.value.table_offset),
                table: Default::default(),
            };
            (state.spec.name.clone(), state)
        })
        .collect();
    Snapshot::new(services)
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
