//! Readmission of ejected backends. The kernel ejects a backend on the
//! packet that completes its failure streak; the agent notices, logs it, and
//! readmits it after the ejection time, which doubles on each ejection that
//! follows a readmission closely (as outlier detection in service meshes
//! does), up to a cap. With `probe`, a TCP backend is readmitted only once a
//! connect to it succeeds; a failed probe counts as another ejection.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    time::{Duration, Instant},
};

use tracing::{info, warn};

use crate::{config::Protocol, reconcile::Reconciler, writer::Writer};

/// How often the kernel's health words are read (one map read per backend).
pub const POLL: Duration = Duration::from_millis(500);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Tracked {
    /// Set while the backend is ejected: when it may come back.
    until: Option<Instant>,
    /// Ejections in a row (each one soon after the last readmission).
    streak: u32,
    readmitted_at: Option<Instant>,
}

#[derive(Default)]
pub struct Readmitter {
    tracked: HashMap<(String, SocketAddr), Tracked>,
}

/// A backend due for readmission.
struct Due {
    service: String,
    addr: SocketAddr,
    backend_id: u32,
    probe: bool,
}

fn ejection_time(base: u32, cap: u32, streak: u32) -> Duration {
    let factor = 1u64 << streak.saturating_sub(1).min(20);
    Duration::from_secs((u64::from(base) * factor).min(u64::from(cap)))
}

impl Readmitter {
    /// One round: note new ejections, readmit those whose time is up.
    pub async fn tick(&mut self, writer: &mut Writer) {
        let now = Instant::now();
        let due = self.scan(writer.reconciler(), now);
        for d in due {
            let passed = !d.probe || probe(d.addr).await;
            let Some(service) = writer.reconciler().services.get(&d.service) else {
                continue;
            };
            let failure = service.spec.failure.clone();
            let entry = self.tracked.entry((d.service.clone(), d.addr)).or_default();
            if passed {
                if let Err(e) = writer.readmit(d.backend_id) {
                    warn!(service = d.service, backend = %d.addr, error = format!("{e:#}"), "readmission failed");
                    continue;
                }
                entry.until = None;
                entry.readmitted_at = Some(now);
                info!(service = d.service, backend = %d.addr, event = "readmitted", "backend readmitted");
            } else {
                entry.streak += 1;
                let wait = ejection_time(
                    failure.ejection_seconds,
                    failure.max_ejection_seconds,
                    entry.streak,
                );
                entry.until = Some(now + wait);
                warn!(service = d.service, backend = %d.addr, event = "probe_failed", ejected_for_s = wait.as_secs(), "readmission probe failed; still ejected");
            }
        }
        if let Err(e) = writer.recount_ejected() {
            warn!(error = format!("{e:#}"), "updating ejected counts");
        }
    }

    fn scan(&mut self, rec: &Reconciler, now: Instant) -> Vec<Due> {
        let mut due = Vec::new();
        let mut seen = HashSet::new();
        for service in rec.services.values() {
            let f = &service.spec.failure;
            for b in &service.backends {
                let key = (service.spec.name.clone(), b.addr);
                seen.insert(key.clone());
                let health = rec.health(b.id);
                let entry = self.tracked.entry(key).or_default();
                if health.state() != agent_common::BackendState::Ejected {
                    entry.until = None;
                    continue;
                }
                match entry.until {
                    None => {
                        // Newly ejected by the kernel. A streak continues when
                        // the last readmission was recent.
                        let recent = entry.readmitted_at.is_some_and(|t| {
                            now.duration_since(t)
                                < Duration::from_secs(f.max_ejection_seconds.into())
                        });
                        entry.streak = if recent { entry.streak + 1 } else { 1 };
                        let wait =
                            ejection_time(f.ejection_seconds, f.max_ejection_seconds, entry.streak);
                        entry.until = Some(now + wait);
                        warn!(
                            service = service.spec.name,
                            backend = %b.addr,
                            event = "ejected",
                            consecutive_failures = health.consecutive_failures,
                            ejections = health.ejections,
                            ejected_for_s = wait.as_secs(),
                            "backend ejected by the datapath"
                        );
                    }
                    Some(until) if now >= until => due.push(Due {
                        service: service.spec.name.clone(),
                        addr: b.addr,
                        backend_id: b.id,
                        probe: f.probe && service.spec.protocol == Protocol::Tcp,
                    }),
                    Some(_) => {}
                }
            }
        }
        self.tracked.retain(|k, _| seen.contains(k));
        due
    }
}

/// A TCP connect from the agent to the backend.
async fn probe(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejection_time_doubles_up_to_the_cap() {
        let t: Vec<u64> = (1..=6)
            .map(|s| ejection_time(10, 100, s).as_secs())
            .collect();
        assert_eq!(t, [10, 20, 40, 80, 100, 100]);
    }
}
