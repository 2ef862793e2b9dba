//! Backends on their way out: draining (no new connections, established
//! ones finish), ended (flows deleted, ids freed), and the kernel's
//! ejections ended by the readmitter.

use std::{collections::BTreeMap, time::Instant};

use agent_common::{BackendHealth, BackendState as Admission, FlowKey};
use anyhow::{Context, Result};
use tracing::info;

use super::{BackendState, Reconciler};

impl Reconciler {
    /// The kernel's health word says whether new connections may use the
    /// backend; draining ones must not (a reused 5-tuple re-picks).
    pub(super) fn mark_draining(&mut self, b: &BackendState) -> Result<()> {
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
    pub(super) fn end_backends(&mut self) {
        if self.ending.is_empty() {
            return;
        }
        let ending = std::mem::take(&mut self.ending);
        let mut removed = BackendHealth::default();
        removed.set_state(Admission::Removed);
        for (_, b) in &ending {
            let _ = self.maps.backend_health.set(b.id, removed, 0);
        }
        let ids: std::collections::HashSet<u32> = ending.iter().map(|(_, b)| b.id).collect();
        let doomed = |map: &aya::maps::HashMap<aya::maps::MapData, FlowKey, agent_common::Flow>| {
            map.iter()
                .filter_map(Result::ok)
                .filter(|(_, flow)| ids.contains(&flow.backend_id))
                .map(|(key, flow)| (key, flow.backend_id))
                .collect::<Vec<_>>()
        };
        let mut closed: BTreeMap<u32, usize> = BTreeMap::new();
        for (key, id) in doomed(&self.maps.conntrack) {
            if self.maps.conntrack.remove(&key).is_ok() {
                *closed.entry(id).or_default() += 1;
            }
        }
        // Connects being made to them start over too.
        for (key, _) in doomed(&self.maps.half_open) {
            let _ = self.maps.half_open.remove(&key);
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

    /// Ends drains that are over: no connection left, or the drain time
    /// passed (then its remaining flows are closed). `now` None ends every
    /// drain at once. Returns whether any ended.
    pub fn finish_drains(&mut self, now: Option<Instant>) -> bool {
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
        let ended = !done.is_empty();
        for (name, b) in done {
            if let Some(state) = self.services.get_mut(&name) {
                state.backends.retain(|x| x.id != b.id);
            }
            self.ending.push((name, b));
        }
        self.end_backends();
        ended
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
        health.restart_streak();
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
}
