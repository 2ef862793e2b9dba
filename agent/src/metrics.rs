//! Prometheus metrics. The kernel counts in per-CPU maps; this collector reads
//! and sums them at scrape time (the datapath never waits on a scrape).

use std::sync::{Arc, Mutex};

use prometheus::{
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    core::{Collector, Desc},
    proto::MetricFamily,
};

use crate::state::Shared;

pub struct DatapathCollector {
    shared: Arc<Shared>,
    service_packets: IntCounterVec,
    service_bytes: IntCounterVec,
    service_connections: IntCounterVec,
    backend_connections: IntCounterVec,
    backend_packets: IntCounterVec,
    backend_bytes: IntCounterVec,
    backend_state: IntGaugeVec,
    drops: IntCounterVec,
    passed: IntCounterVec,
    conntrack_entries: IntGauge,
    conntrack_capacity: IntGauge,
    attach_mode: IntGaugeVec,
    /// Held while one scrape resets and refills the vectors.
    scrape: Mutex<()>,
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition")
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric definition")
}

impl DatapathCollector {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            service_packets: counter(
                "sluice_service_packets_total",
                "Packets forwarded for a service, by direction.",
                &["service", "direction"],
            ),
            service_bytes: counter(
                "sluice_service_bytes_total",
                "Bytes (Ethernet frames) forwarded for a service, by direction.",
                &["service", "direction"],
            ),
            service_connections: counter(
                "sluice_service_connections_total",
                "New connections (TCP SYN, first UDP datagram) to a service.",
                &["service"],
            ),
            backend_connections: counter(
                "sluice_backend_connections_total",
                "New connections sent to a backend.",
                &["service", "backend"],
            ),
            backend_packets: counter(
                "sluice_backend_packets_total",
                "Packets forwarded to or from a backend, by direction.",
                &["service", "backend", "direction"],
            ),
            backend_bytes: counter(
                "sluice_backend_bytes_total",
                "Bytes forwarded to or from a backend, by direction.",
                &["service", "backend", "direction"],
            ),
            backend_state: gauge_vec(
                "sluice_backend_state",
                "1 for the backend's current state (active, draining, ejected).",
                &["service", "backend", "state"],
            ),
            drops: counter(
                "sluice_drops_total",
                "Packets for a service or from a backend that the datapath dropped, by reason.",
                &["reason"],
            ),
            passed: counter(
                "sluice_passed_total",
                "Packets the datapath handed to the kernel stack instead of forwarding, by reason.",
                &["reason"],
            ),
            conntrack_entries: IntGauge::new(
                "sluice_conntrack_entries",
                "Entries in the conntrack map (two per connection).",
            )
            .expect("static metric definition"),
            conntrack_capacity: IntGauge::new(
                "sluice_conntrack_capacity",
                "Capacity of the conntrack map.",
            )
            .expect("static metric definition"),
            attach_mode: gauge_vec(
                "sluice_interface_attached",
                "1 for the mode the datapath got on each interface.",
                &["interface", "mode"],
            ),
            scrape: Mutex::new(()),
        }
    }

    fn parts(&self) -> Vec<&dyn Collector> {
        vec![
            &self.service_packets,
            &self.service_bytes,
            &self.service_connections,
            &self.backend_connections,
            &self.backend_packets,
            &self.backend_bytes,
            &self.backend_state,
            &self.drops,
            &self.passed,
            &self.conntrack_entries,
            &self.conntrack_capacity,
            &self.attach_mode,
        ]
    }

    fn refresh(&self) {
        for v in [
            &self.service_packets,
            &self.service_bytes,
            &self.service_connections,
            &self.backend_connections,
            &self.backend_packets,
            &self.backend_bytes,
            &self.drops,
            &self.passed,
        ] {
            v.reset();
        }
        self.backend_state.reset();
        self.attach_mode.reset();

        for (interface, mode) in self.shared.attachments.lock().unwrap().iter() {
            self.attach_mode
                .with_label_values(&[interface.as_str(), &mode.to_string()])
                .set(1);
        }
        self.conntrack_capacity
            .set(i64::from(*self.shared.conntrack_capacity.lock().unwrap()));

        let guard = self.shared.reconciler.lock().unwrap();
        let Some(rec) = guard.as_ref() else {
            return;
        };
        for service in rec.services.values() {
            let name = service.spec.name.as_str();
            let s = rec.stats(true, service.id);
            self.service_connections
                .with_label_values(&[name])
                .inc_by(s.connections);
            for (dir, packets, bytes) in [
                ("to_backend", s.packets_to_backend, s.bytes_to_backend),
                ("to_client", s.packets_to_client, s.bytes_to_client),
            ] {
                self.service_packets
                    .with_label_values(&[name, dir])
                    .inc_by(packets);
                self.service_bytes
                    .with_label_values(&[name, dir])
                    .inc_by(bytes);
            }
            for b in &service.backends {
                let addr = b.addr.to_string();
                let st = rec.stats(false, b.id);
                self.backend_connections
                    .with_label_values(&[name, &addr])
                    .inc_by(st.connections);
                for (dir, packets, bytes) in [
                    ("to_backend", st.packets_to_backend, st.bytes_to_backend),
                    ("to_client", st.packets_to_client, st.bytes_to_client),
                ] {
                    self.backend_packets
                        .with_label_values(&[name, &addr, dir])
                        .inc_by(packets);
                    self.backend_bytes
                        .with_label_values(&[name, &addr, dir])
                        .inc_by(bytes);
                }
                let current = crate::state::backend_state(b);
                for state in ["active", "draining", "ejected"] {
                    self.backend_state
                        .with_label_values(&[name, &addr, state])
                        .set(i64::from(state == current));
                }
            }
        }
        for (code, reason) in agent_common::reason::ALL.iter().enumerate() {
            let n = rec.reason_count(code as u32);
            let vec = if reason.dropped {
                &self.drops
            } else {
                &self.passed
            };
            vec.with_label_values(&[reason.name]).inc_by(n);
        }
        self.conntrack_entries
            .set(rec.conntrack_entries().min(i64::MAX as u64) as i64);
    }
}

impl Collector for DatapathCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.parts().into_iter().flat_map(|c| c.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _one_at_a_time = self.scrape.lock().unwrap();
        self.refresh();
        self.parts().into_iter().flat_map(|c| c.collect()).collect()
    }
}

/// The agent's registry: datapath metrics, build info, process metrics.
pub fn registry(shared: Arc<Shared>) -> prometheus::Result<Registry> {
    let registry = Registry::new();
    let build_info = IntGaugeVec::new(
        Opts::new(
            "sluice_build_info",
            "Always 1; labels say which build runs.",
        ),
        &["version"],
    )?;
    build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
    registry.register(Box::new(build_info))?;
    registry.register(Box::new(DatapathCollector::new(shared)))?;
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    Ok(registry)
}

pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = encoder.encode_utf8(&registry.gather(), &mut out) {
        tracing::warn!(error = %e, "encoding metrics");
    }
    out
}
