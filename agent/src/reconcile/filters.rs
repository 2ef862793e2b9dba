//! The prefilter bitmaps the agent keeps for the kernel (see
//! `agent_common::prefilter`): service bits set before a service appears and
//! cleared after it is gone; a backend's bits cleared only after its flows
//! are deleted (`end_backends`), so replies of its connections are
//! reverse-NATed while they are tracked.

use agent_common::{Prefilter, prefilter};
use anyhow::{Context, Result};

use super::{Reconciler, service_key};
use crate::{config::ServiceSpec, datapath::Maps};

/// The service bitmaps for `desired`: (VIP, port, protocol) and VIP alone.
pub(super) fn service_filters(desired: &[ServiceSpec]) -> (Prefilter, Prefilter) {
    let (mut frontends, mut addrs) = (Prefilter::default(), Prefilter::default());
    for spec in desired {
        let key = service_key(spec);
        frontends.insert(&key.addr, key.port, key.proto);
        addrs.insert(&key.addr, 0, 0);
    }
    (frontends, addrs)
}

pub(super) fn union(a: &Prefilter, b: &Prefilter) -> Prefilter {
    let mut out = *a;
    for (word, other) in out.words.iter_mut().zip(&b.words) {
        *word |= other;
    }
    out
}

pub(super) fn write_filter(maps: &mut Maps, slot: u32, filter: &Prefilter) -> Result<()> {
    maps.prefilter
        .set(slot, filter, 0)
        .with_context(|| format!("writing prefilter slot {slot}"))
}

impl Reconciler {
    pub(super) fn write_filter(&mut self, slot: u32, filter: &Prefilter) -> Result<()> {
        write_filter(&mut self.maps, slot, filter)
    }

    /// The backend prefilters as the backends still in a service make them:
    /// the bits of backends that are gone are cleared, so their address's
    /// traffic no longer takes the slow path (nor is counted as Sluice's).
    pub(super) fn rebuild_backend_filters(&mut self) -> Result<()> {
        let (mut ports, mut addrs) = (Prefilter::default(), Prefilter::default());
        for state in self.services.values() {
            let proto = state.spec.protocol.number();
            for b in &state.backends {
                let words = agent_common::addr::words(b.addr.ip());
                ports.insert(&words, b.addr.port().to_be(), proto);
                addrs.insert(&words, 0, 0);
            }
        }
        self.write_filter(prefilter::BACKEND, &ports)?;
        self.write_filter(prefilter::BACKEND_ADDR, &addrs)?;
        self.backend_filter = ports;
        self.backend_addr_filter = addrs;
        Ok(())
    }
}
