//! Prometheus metrics. The kernel counts in per-CPU maps; a scrape reads each
//! map once per service and backend, sums the CPUs, and writes the text
//! exposition directly (the datapath never waits on a scrape).
//!
//! The agent's own metrics (build info, process CPU, memory, descriptors) go
//! through the `prometheus` crate's registry. The datapath families don't:
//! with thousands of backends they are hundreds of thousands of series, and
//! building each through label vectors cost a second per scrape where writing
//! the lines costs milliseconds.

use std::{fmt::Write, sync::atomic::Ordering};

use agent_common::{LATENCY_BASE_NS, LatencyHistogram, ServiceStats};
use prometheus::{IntGaugeVec, Opts, Registry};

use crate::{config::Protocol, state::Shared};

/// The agent's own metrics.
pub fn registry() -> prometheus::Result<Registry> {
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
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    Ok(registry)
}

/// The whole exposition: the registry's metrics, then the datapath's.
pub fn render(registry: &Registry, shared: &Shared) -> String {
    let mut out = String::with_capacity(1 << 16);
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = encoder.encode_utf8(&registry.gather(), &mut out) {
        tracing::warn!(error = %e, "encoding metrics");
    }
    render_datapath(shared, &mut out);
    out
}

/// One backend's numbers, read once per scrape.
struct BackendRow {
    service: String,
    backend: String,
    stats: ServiceStats,
    state: &'static str,
    ejections: u32,
    latency: Option<LatencyHistogram>,
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn render_datapath(shared: &Shared, out: &mut String) {
    let guard = shared.reconciler.lock().unwrap();
    let Some(rec) = guard.as_ref() else {
        return;
    };

    // One pass over the maps.
    let mut services = Vec::new();
    let mut rows = Vec::new();
    for service in rec.services.values() {
        let name = &service.spec.name;
        services.push((name.clone(), rec.stats(true, service.id)));
        for b in &service.backends {
            rows.push(BackendRow {
                service: name.clone(),
                backend: b.addr.to_string(),
                stats: rec.stats(false, b.id),
                state: crate::state::backend_state(rec, b),
                ejections: rec.health(b.id).ejections,
                latency: (service.spec.protocol == Protocol::Tcp).then(|| rec.latency(b.id)),
            });
        }
    }
    let reasons: Vec<(&'static str, bool, u64)> = agent_common::reason::ALL
        .iter()
        .enumerate()
        .map(|(code, r)| (r.name, r.dropped, rec.reason_count(code as u32)))
        .collect();
    let (events_sent, events_dropped) = rec.event_counts();
    drop(guard);

    // Per service.
    family(
        out,
        "sluice_service_packets_total",
        "counter",
        "Packets forwarded for a service, by direction.",
    );
    for (s, st) in &services {
        let _ = writeln!(
            out,
            "sluice_service_packets_total{{service=\"{s}\",direction=\"to_backend\"}} {}",
            st.packets_to_backend
        );
        let _ = writeln!(
            out,
            "sluice_service_packets_total{{service=\"{s}\",direction=\"to_client\"}} {}",
            st.packets_to_client
        );
    }
    family(
        out,
        "sluice_service_bytes_total",
        "counter",
        "Bytes (Ethernet frames) forwarded for a service, by direction.",
    );
    for (s, st) in &services {
        let _ = writeln!(
            out,
            "sluice_service_bytes_total{{service=\"{s}\",direction=\"to_backend\"}} {}",
            st.bytes_to_backend
        );
        let _ = writeln!(
            out,
            "sluice_service_bytes_total{{service=\"{s}\",direction=\"to_client\"}} {}",
            st.bytes_to_client
        );
    }
    for (name, help, value) in [
        (
            "sluice_service_connections_total",
            "New connections (TCP SYN, first UDP datagram) to a service.",
            (|s: &ServiceStats| s.connections) as fn(&ServiceStats) -> u64,
        ),
        (
            "sluice_connection_retries_total",
            "Connects sent again to another backend after a refusal or timeout.",
            |s| s.retries,
        ),
        (
            "sluice_service_fail_open_total",
            "Failures that would have ejected a backend but for max_ejected_percent: the service fails open.",
            |s| s.fail_open,
        ),
    ] {
        family(out, name, "counter", help);
        for (s, st) in &services {
            let _ = writeln!(out, "{name}{{service=\"{s}\"}} {}", value(st));
        }
    }

    // Per backend.
    family(
        out,
        "sluice_backend_connections_total",
        "counter",
        "New connections sent to a backend.",
    );
    for r in &rows {
        let _ = writeln!(
            out,
            "sluice_backend_connections_total{{service=\"{}\",backend=\"{}\"}} {}",
            r.service, r.backend, r.stats.connections
        );
    }
    family(
        out,
        "sluice_backend_packets_total",
        "counter",
        "Packets forwarded to or from a backend, by direction.",
    );
    for r in &rows {
        let _ = writeln!(
            out,
            "sluice_backend_packets_total{{service=\"{}\",backend=\"{}\",direction=\"to_backend\"}} {}",
            r.service, r.backend, r.stats.packets_to_backend
        );
        let _ = writeln!(
            out,
            "sluice_backend_packets_total{{service=\"{}\",backend=\"{}\",direction=\"to_client\"}} {}",
            r.service, r.backend, r.stats.packets_to_client
        );
    }
    family(
        out,
        "sluice_backend_bytes_total",
        "counter",
        "Bytes forwarded to or from a backend, by direction.",
    );
    for r in &rows {
        let _ = writeln!(
            out,
            "sluice_backend_bytes_total{{service=\"{}\",backend=\"{}\",direction=\"to_backend\"}} {}",
            r.service, r.backend, r.stats.bytes_to_backend
        );
        let _ = writeln!(
            out,
            "sluice_backend_bytes_total{{service=\"{}\",backend=\"{}\",direction=\"to_client\"}} {}",
            r.service, r.backend, r.stats.bytes_to_client
        );
    }
    family(
        out,
        "sluice_backend_state",
        "gauge",
        "1 for the backend's current state (active, draining, ejected).",
    );
    for r in &rows {
        for state in ["active", "draining", "ejected"] {
            let _ = writeln!(
                out,
                "sluice_backend_state{{service=\"{}\",backend=\"{}\",state=\"{state}\"}} {}",
                r.service,
                r.backend,
                u8::from(state == r.state)
            );
        }
    }
    family(
        out,
        "sluice_backend_failures_total",
        "counter",
        "Failed connects seen in the traffic: refused (RST to a SYN), timeout (SYN retransmitted past the connect timeout), unreachable (ICMP).",
    );
    for r in &rows {
        for (reason, n) in [
            ("refused", r.stats.failures_refused),
            ("timeout", r.stats.failures_timeout),
            ("unreachable", r.stats.failures_unreachable),
        ] {
            let _ = writeln!(
                out,
                "sluice_backend_failures_total{{service=\"{}\",backend=\"{}\",reason=\"{reason}\"}} {n}",
                r.service, r.backend
            );
        }
    }
    family(
        out,
        "sluice_backend_ejections_total",
        "counter",
        "Times the datapath ejected the backend after consecutive failures.",
    );
    for r in &rows {
        let _ = writeln!(
            out,
            "sluice_backend_ejections_total{{service=\"{}\",backend=\"{}\"}} {}",
            r.service, r.backend, r.ejections
        );
    }
    family(
        out,
        "sluice_backend_active_connections",
        "gauge",
        "TCP connections established to the backend and not yet closed by FIN or RST.",
    );
    for r in &rows {
        let _ = writeln!(
            out,
            "sluice_backend_active_connections{{service=\"{}\",backend=\"{}\"}} {}",
            r.service,
            r.backend,
            r.stats.opened.saturating_sub(r.stats.closed)
        );
    }
    const LATENCY: &str = "sluice_backend_connect_latency_seconds";
    family(
        out,
        LATENCY,
        "histogram",
        "Time from the forwarded SYN to the backend's SYN-ACK, measured in the kernel.",
    );
    // Formatted once: formatting floats for every bucket line of every
    // backend was a large part of a scrape.
    let bounds: Vec<String> = (0..agent_common::LATENCY_BUCKETS)
        .map(|i| ((LATENCY_BASE_NS << i) as f64 / 1e9).to_string())
        .collect();
    for r in &rows {
        let Some(h) = &r.latency else { continue };
        // The kernel's log-scale buckets (each 2× the last, from 8 µs), cumulative.
        let mut cumulative = 0;
        for (le, n) in bounds.iter().zip(&h.buckets) {
            cumulative += n;
            let _ = writeln!(
                out,
                "{LATENCY}_bucket{{service=\"{}\",backend=\"{}\",le=\"{le}\"}} {cumulative}",
                r.service, r.backend
            );
        }
        let _ = writeln!(
            out,
            "{LATENCY}_bucket{{service=\"{}\",backend=\"{}\",le=\"+Inf\"}} {}",
            r.service, r.backend, h.count
        );
        let _ = writeln!(
            out,
            "{LATENCY}_sum{{service=\"{}\",backend=\"{}\"}} {}",
            r.service,
            r.backend,
            h.sum_ns as f64 / 1e9
        );
        let _ = writeln!(
            out,
            "{LATENCY}_count{{service=\"{}\",backend=\"{}\"}} {}",
            r.service, r.backend, h.count
        );
    }

    // Datapath-wide.
    family(
        out,
        "sluice_drops_total",
        "counter",
        "Packets for a service or from a backend that the datapath dropped, by reason.",
    );
    for (name, _, n) in reasons.iter().filter(|r| r.1) {
        let _ = writeln!(out, "sluice_drops_total{{reason=\"{name}\"}} {n}");
    }
    family(
        out,
        "sluice_passed_total",
        "counter",
        "Packets the datapath handed to the kernel stack instead of forwarding, by reason.",
    );
    for (name, _, n) in reasons.iter().filter(|r| !r.1) {
        let _ = writeln!(out, "sluice_passed_total{{reason=\"{name}\"}} {n}");
    }
    family(
        out,
        "sluice_events_total",
        "counter",
        "Connection events from the datapath: sent to the agent, or dropped by the per-CPU rate limit or a full ring buffer.",
    );
    let _ = writeln!(
        out,
        "sluice_events_total{{outcome=\"sent\"}} {events_sent}\nsluice_events_total{{outcome=\"dropped\"}} {events_dropped}"
    );
    family(
        out,
        "sluice_conntrack_entries",
        "gauge",
        "Entries in the conntrack map (two per connection), counted every few seconds.",
    );
    let _ = writeln!(
        out,
        "sluice_conntrack_entries {}",
        shared.conntrack_entries.load(Ordering::Relaxed)
    );
    family(
        out,
        "sluice_conntrack_capacity",
        "gauge",
        "Capacity of the conntrack map.",
    );
    let _ = writeln!(
        out,
        "sluice_conntrack_capacity {}",
        *shared.conntrack_capacity.lock().unwrap()
    );
    family(
        out,
        "sluice_interface_attached",
        "gauge",
        "1 for the mode the datapath got on each interface.",
    );
    for (interface, mode) in shared.attachments.lock().unwrap().iter() {
        let _ = writeln!(
            out,
            "sluice_interface_attached{{interface=\"{interface}\",mode=\"{mode}\"}} 1"
        );
    }
    family(
        out,
        "sluice_ready",
        "gauge",
        "1 when every program is attached and the maps hold the configured state (as /readyz).",
    );
    let _ = writeln!(
        out,
        "sluice_ready {}",
        u8::from(shared.ready.load(Ordering::SeqCst))
    );
}
