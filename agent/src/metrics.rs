//! Prometheus metrics. The kernel counts in per-CPU maps; this collector reads
//! and sums them at scrape time (the datapath never waits on a scrape).

use std::sync::{Arc, Mutex, atomic::Ordering};

use agent_common::{LATENCY_BASE_NS, LATENCY_BUCKETS, LatencyHistogram};
use prometheus::{
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    core::{Collector, Desc},
    proto::{Bucket, Histogram, LabelPair, Metric, MetricFamily, MetricType},
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
    backend_failures: IntCounterVec,
    backend_ejections: IntCounterVec,
    backend_active: IntGaugeVec,
    retries: IntCounterVec,
    fail_open: IntCounterVec,
    latency_desc: Desc,
    events: IntCounterVec,
    drops: IntCounterVec,
    passed: IntCounterVec,
    conntrack_entries: IntGauge,
    conntrack_capacity: IntGauge,
    attach_mode: IntGaugeVec,
    ready: IntGauge,
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
            backend_failures: counter(
                "sluice_backend_failures_total",
                "Failed connects seen in the traffic: refused (RST to a SYN), timeout (SYN retransmitted past the connect timeout), unreachable (ICMP).",
                &["service", "backend", "reason"],
            ),
            backend_ejections: counter(
                "sluice_backend_ejections_total",
                "Times the datapath ejected the backend after consecutive failures.",
                &["service", "backend"],
            ),
            backend_active: gauge_vec(
                "sluice_backend_active_connections",
                "TCP connections established to the backend and not yet closed by FIN or RST.",
                &["service", "backend"],
            ),
            retries: counter(
                "sluice_connection_retries_total",
                "Connects sent again to another backend after a refusal or timeout.",
                &["service"],
            ),
            fail_open: counter(
                "sluice_service_fail_open_total",
                "Failures that would have ejected a backend but for max_ejected_percent: the service fails open.",
                &["service"],
            ),
            latency_desc: Desc::new(
                LATENCY.into(),
                "Time from the forwarded SYN to the backend's SYN-ACK, measured in the kernel."
                    .into(),
                vec!["service".into(), "backend".into()],
                Default::default(),
            )
            .expect("static metric definition"),
            events: counter(
                "sluice_events_total",
                "Connection events from the datapath: sent to the agent, or dropped by the per-CPU rate limit or a full ring buffer.",
                &["outcome"],
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
            ready: IntGauge::new(
                "sluice_ready",
                "1 when every program is attached and the maps hold the configured state (as /readyz).",
            )
            .expect("static metric definition"),
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
            &self.backend_failures,
            &self.backend_ejections,
            &self.backend_active,
            &self.retries,
            &self.fail_open,
            &self.events,
            &self.drops,
            &self.passed,
            &self.conntrack_entries,
            &self.conntrack_capacity,
            &self.attach_mode,
            &self.ready,
        ]
    }

    fn refresh(&self) -> Vec<Metric> {
        for v in [
            &self.service_packets,
            &self.service_bytes,
            &self.service_connections,
            &self.backend_connections,
            &self.backend_packets,
            &self.backend_bytes,
            &self.backend_failures,
            &self.backend_ejections,
            &self.retries,
            &self.fail_open,
            &self.events,
            &self.drops,
            &self.passed,
        ] {
            v.reset();
        }
        self.backend_state.reset();
        self.backend_active.reset();
        self.ready
            .set(i64::from(self.shared.ready.load(Ordering::SeqCst)));
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
            return Vec::new();
        };
        let mut latency = Vec::new();
        for service in rec.services.values() {
            let name = service.spec.name.as_str();
            let s = rec.stats(true, service.id);
            self.service_connections
                .with_label_values(&[name])
                .inc_by(s.connections);
            self.retries.with_label_values(&[name]).inc_by(s.retries);
            self.fail_open
                .with_label_values(&[name])
                .inc_by(s.fail_open);
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
                for (reason, n) in [
                    ("refused", st.failures_refused),
                    ("timeout", st.failures_timeout),
                    ("unreachable", st.failures_unreachable),
                ] {
                    self.backend_failures
                        .with_label_values(&[name, &addr, reason])
                        .inc_by(n);
                }
                self.backend_ejections
                    .with_label_values(&[name, &addr])
                    .inc_by(u64::from(rec.health(b.id).ejections));
                self.backend_active
                    .with_label_values(&[name, &addr])
                    .set(st.opened.saturating_sub(st.closed).min(i64::MAX as u64) as i64);
                if service.spec.protocol == crate::config::Protocol::Tcp {
                    latency.push(latency_metric(name, &addr, &rec.latency(b.id)));
                }
                let current = crate::state::backend_state(rec, b);
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
        let (sent, dropped) = rec.event_counts();
        self.events.with_label_values(&["sent"]).inc_by(sent);
        self.events.with_label_values(&["dropped"]).inc_by(dropped);
        let entries = self.shared.conntrack_entries.load(Ordering::Relaxed);
        self.conntrack_entries
            .set(entries.min(i64::MAX as u64) as i64);
        latency
    }
}

impl Collector for DatapathCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs: Vec<&Desc> = self.parts().into_iter().flat_map(|c| c.desc()).collect();
        descs.push(&self.latency_desc);
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _one_at_a_time = self.scrape.lock().unwrap();
        let latency = self.refresh();
        let mut families: Vec<MetricFamily> =
            self.parts().into_iter().flat_map(|c| c.collect()).collect();
        if !latency.is_empty() {
            let mut family = MetricFamily::default();
            family.set_name(LATENCY.into());
            family.set_help(self.latency_desc.help.clone());
            family.set_field_type(MetricType::HISTOGRAM);
            family.set_metric(latency);
            families.push(family);
        }
        families
    }
}

const LATENCY: &str = "sluice_backend_connect_latency_seconds";

/// One backend's connect latency as a Prometheus histogram: the kernel's
/// log-scale buckets (each 2× the last, from 8 µs) made cumulative.
fn latency_metric(service: &str, backend: &str, h: &LatencyHistogram) -> Metric {
    let mut buckets = Vec::with_capacity(LATENCY_BUCKETS);
    let mut cumulative = 0;
    for (i, n) in h.buckets.iter().enumerate() {
        cumulative += n;
        let mut b = Bucket::default();
        b.set_upper_bound((LATENCY_BASE_NS << i) as f64 / 1e9);
        b.set_cumulative_count(cumulative);
        buckets.push(b);
    }
    let mut hist = Histogram::default();
    hist.set_sample_count(h.count);
    hist.set_sample_sum(h.sum_ns as f64 / 1e9);
    hist.set_bucket(buckets);
    let mut metric = Metric::default();
    let label = |name: &str, value: &str| {
        let mut l = LabelPair::default();
        l.set_name(name.into());
        l.set_value(value.into());
        l
    };
    metric.set_label(vec![label("backend", backend), label("service", service)]);
    metric.set_histogram(hist);
    metric
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
