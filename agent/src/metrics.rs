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

use crate::{
    config::{PodRef, Protocol},
    state::Shared,
};

/// The agent's own metrics.
pub fn registry() -> prometheus::Result<Registry> {
    let registry = Registry::new();
    let build_info = IntGaugeVec::new(
        Opts::new(
            "sluice_build_info",
            "Always 1; labels say which build runs.",
        ),
        &["version", "commit", "map_layout"],
    )?;
    build_info
        .with_label_values(&[
            crate::build_info::VERSION,
            crate::build_info::COMMIT,
            &crate::build_info::MAP_LAYOUT.to_string(),
        ])
        .set(1);
    registry.register(Box::new(build_info))?;
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    Ok(registry)
}

/// The whole exposition: the registry's metrics, then the datapath's.
pub fn render(registry: &Registry, shared: &Shared) -> String {
    let mut all = String::new();
    let mut collect = |chunk: String| {
        all.push_str(&chunk);
        true
    };
    render_chunks(registry, shared, &mut collect);
    all
}

/// The exposition in chunks of about `CHUNK` bytes, each handed to `send`
/// as soon as it is written (false from `send`: nobody reads any more, the
/// rest is not written). A scrape of 10,000 backends is tens of megabytes:
/// streamed, the first bytes leave while the rest is formatted, and the
/// agent never holds the whole text.
pub fn render_chunks(registry: &Registry, shared: &Shared, send: &mut dyn FnMut(String) -> bool) {
    let mut out = Out {
        buf: String::with_capacity(CHUNK + 4096),
        send,
        open: true,
    };
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = encoder.encode_utf8(&registry.gather(), &mut out.buf) {
        tracing::warn!(error = %e, "encoding metrics");
    }
    render_datapath(shared, &mut out);
    if out.open && !out.buf.is_empty() {
        (out.send)(std::mem::take(&mut out.buf));
    }
}

/// Bytes per chunk of a streamed exposition.
const CHUNK: usize = 256 << 10;

/// The exposition being written: a buffer that is handed on whenever it
/// holds a chunk (`flush`, called between lines).
struct Out<'a> {
    buf: String,
    send: &'a mut dyn FnMut(String) -> bool,
    /// False once `send` said nobody reads: lines are then dropped.
    open: bool,
}

impl Out<'_> {
    fn flush(&mut self) {
        if self.buf.len() < CHUNK {
            return;
        }
        let full = std::mem::replace(&mut self.buf, String::with_capacity(CHUNK + 4096));
        if self.open {
            self.open = (self.send)(full);
        }
    }
}

impl std::ops::Deref for Out<'_> {
    type Target = String;
    fn deref(&self) -> &String {
        &self.buf
    }
}

impl std::ops::DerefMut for Out<'_> {
    fn deref_mut(&mut self) -> &mut String {
        &mut self.buf
    }
}

/// A sample's value, written without `format!` machinery (integers are
/// most of a scrape's text).
trait Value: Copy {
    fn put(self, out: &mut String);
}

macro_rules! integer_value {
    ($($t:ty),*) => {$(
        impl Value for $t {
            fn put(self, out: &mut String) {
                out.push_str(itoa::Buffer::new().format(self));
            }
        }
    )*};
}
integer_value!(i32, u8, u16, u32, u64, usize);

impl Value for f64 {
    fn put(self, out: &mut String) {
        let _ = write!(out, "{self}");
    }
}

/// One backend's numbers, read once per scrape.
struct BackendRow {
    /// `service="…",backend="…"` and, for a Kubernetes backend,
    /// `,namespace="…",pod="…"`: written once, used by every series.
    labels: String,
    stats: ServiceStats,
    state: &'static str,
    ejections: u32,
    /// None: a UDP backend, or its service's histogram is turned off.
    latency: Option<LatencyHistogram>,
    /// A runtime override in force (`sluice drain`, `sluice weight`).
    overridden: Option<crate::control::overrides::Override>,
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn render_datapath(shared: &Shared, out: &mut Out) {
    let Some(view) = shared.view.get() else {
        return;
    };
    let snapshot = view.snapshot();
    let counters = &view.counters;
    let histograms = shared.metrics.lock().unwrap().backend_latency_histogram;
    let overrides = shared.overrides.lock().unwrap().clone();

    // Which services export latency (only TCP has a connect to time).
    let with_latency = |service: &crate::reconcile::ServiceState| {
        service.spec.protocol == Protocol::Tcp
            && service.spec.backend_latency_histogram.unwrap_or(histograms)
    };
    // Every map read once, by batch: ids are small and dense.
    let ids = |ids: &mut dyn Iterator<Item = u32>| ids.max().map_or(0, |m| m + 1);
    let backend_ids = ids(&mut snapshot
        .services
        .values()
        .flat_map(|s| s.backends.iter().map(|b| b.id)));
    let service_ids = ids(&mut snapshot.services.values().map(|s| s.id));
    let any_latency = snapshot.services.values().any(with_latency);
    let batch = counters
        .backends_batch(backend_ids, any_latency)
        .and_then(|b| Ok((b, counters.services_batch(service_ids)?)))
        .inspect_err(
            |e| tracing::warn!(error = %e, "batch read of the counters; reading one by one"),
        )
        .ok();
    let (backend_stats, health_of, latency_of, service_stats) = match &batch {
        Some((b, s)) => (
            Some(&b.stats[..]),
            Some(&b.health[..]),
            Some(&b.latency[..]),
            Some(&s[..]),
        ),
        None => (None, None, None, None),
    };
    fn pick<T: Copy>(v: Option<&[T]>, id: u32) -> Option<T> {
        v.and_then(|v| v.get(id as usize).copied())
    }

    let mut services = Vec::with_capacity(snapshot.services.len());
    let mut rows = Vec::new();
    for service in snapshot.services.values() {
        let name = &service.spec.name;
        let stats =
            pick(service_stats, service.id).unwrap_or_else(|| counters.stats(true, service.id));
        services.push((name.as_str(), stats));
        let histogram = with_latency(service);
        for b in &service.backends {
            let health = pick(health_of, b.id).unwrap_or_else(|| counters.health(b.id));
            rows.push(BackendRow {
                labels: backend_labels(name, &b.addr.to_string(), b.pod.as_ref()),
                stats: pick(backend_stats, b.id).unwrap_or_else(|| counters.stats(false, b.id)),
                state: crate::state::backend_state(&health, b.draining()),
                ejections: health.ejections,
                latency: histogram
                    .then(|| pick(latency_of, b.id).unwrap_or_else(|| counters.latency(b.id))),
                overridden: overrides.get(name, &b.addr),
            });
        }
    }
    let reasons: Vec<(&'static str, bool, u64)> = agent_common::reason::ALL
        .iter()
        .enumerate()
        .map(|(code, r)| (r.name, r.dropped, counters.reason_count(code as u32)))
        .collect();
    let (events_sent, events_dropped) = counters.event_counts();

    // Per service.
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
        (
            "sluice_service_new_flows_over_budget_total",
            "New flows dropped because the service's per-CPU budget of new flows per second (limits.new_flows_per_second) was spent.",
            |s| s.over_budget,
        ),
        (
            "sluice_service_untrusted_signals_total",
            "ICMP errors, RSTs and SYN-ACKs about the service's flows that were not trusted as a backend's answer to a SYN (forged, from the clients' side, not acknowledging the SYN, a code that doesn't mean down): counted neither for nor against a backend.",
            |s| s.untrusted_signals,
        ),
    ] {
        family(out, name, "counter", help);
        for (s, st) in &services {
            out.flush();
            sample(out, name, &[("service", s)], value(st));
        }
    }
    for (name, help, packets) in [
        (
            "sluice_service_packets_total",
            "Packets forwarded for a service, by direction.",
            true,
        ),
        (
            "sluice_service_bytes_total",
            "Bytes (Ethernet frames) forwarded for a service, by direction.",
            false,
        ),
    ] {
        family(out, name, "counter", help);
        for (s, st) in &services {
            out.flush();
            for (direction, n) in directions(st, packets) {
                sample(out, name, &[("service", s), ("direction", direction)], n);
            }
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
        out.flush();
        r.sample(
            out,
            "sluice_backend_connections_total",
            None,
            r.stats.connections,
        );
    }
    for (name, help, packets) in [
        (
            "sluice_backend_packets_total",
            "Packets forwarded to or from a backend, by direction.",
            true,
        ),
        (
            "sluice_backend_bytes_total",
            "Bytes forwarded to or from a backend, by direction.",
            false,
        ),
    ] {
        family(out, name, "counter", help);
        for r in &rows {
            out.flush();
            for (direction, n) in directions(&r.stats, packets) {
                r.sample(out, name, Some(("direction", direction)), n);
            }
        }
    }
    family(
        out,
        "sluice_backend_state",
        "gauge",
        "1 for the backend's current state (active, draining, ejected).",
    );
    for r in &rows {
        out.flush();
        for state in crate::state::BACKEND_STATES {
            r.sample(
                out,
                "sluice_backend_state",
                Some(("state", state)),
                u8::from(state == r.state),
            );
        }
    }
    family(
        out,
        "sluice_backend_override",
        "gauge",
        "A runtime override in force (sluice drain / sluice weight): kind drain is 1, kind weight is the weight set. No series: none.",
    );
    for r in &rows {
        out.flush();
        let Some(o) = r.overridden else { continue };
        if o.drain {
            r.sample(out, "sluice_backend_override", Some(("kind", "drain")), 1);
        }
        if let Some(w) = o.weight {
            r.sample(out, "sluice_backend_override", Some(("kind", "weight")), w);
        }
    }
    family(
        out,
        "sluice_backend_failures_total",
        "counter",
        "Failed connects seen in the traffic: refused (RST to a SYN), timeout (SYN retransmitted past the connect timeout), unreachable (ICMP).",
    );
    for r in &rows {
        out.flush();
        for (reason, n) in [
            ("refused", r.stats.failures_refused),
            ("timeout", r.stats.failures_timeout),
            ("unreachable", r.stats.failures_unreachable),
        ] {
            r.sample(
                out,
                "sluice_backend_failures_total",
                Some(("reason", reason)),
                n,
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
        out.flush();
        r.sample(out, "sluice_backend_ejections_total", None, r.ejections);
    }
    family(
        out,
        "sluice_backend_active_connections",
        "gauge",
        "TCP connections established to the backend and not yet closed by FIN or RST.",
    );
    for r in &rows {
        out.flush();
        let active = r.stats.opened.saturating_sub(r.stats.closed);
        r.sample(out, "sluice_backend_active_connections", None, active);
    }
    render_latency(&rows, out);

    // Datapath-wide.
    for (name, help, dropped) in [
        (
            "sluice_drops_total",
            "Packets for a service or from a backend that the datapath dropped, by reason.",
            true,
        ),
        (
            "sluice_passed_total",
            "Packets the datapath handed to the kernel stack instead of forwarding, by reason.",
            false,
        ),
    ] {
        family(out, name, "counter", help);
        for (reason, _, n) in reasons.iter().filter(|r| r.1 == dropped) {
            sample(out, name, &[("reason", reason)], *n);
        }
    }
    family(
        out,
        "sluice_events_total",
        "counter",
        "Connection events from the datapath: sent to the agent, or dropped by the per-CPU rate limit or a full ring buffer.",
    );
    sample(
        out,
        "sluice_events_total",
        &[("outcome", "sent")],
        events_sent,
    );
    sample(
        out,
        "sluice_events_total",
        &[("outcome", "dropped")],
        events_dropped,
    );
    family(
        out,
        "sluice_conntrack_entries",
        "gauge",
        "Entries in the conntrack map (two per connection), counted by the sweep every few seconds.",
    );
    sample(
        out,
        "sluice_conntrack_entries",
        &[],
        shared.conntrack_entries.load(Ordering::Relaxed),
    );
    // A family of its own, so that sluice_conntrack_entries stays one
    // series that divides by the capacity.
    family(
        out,
        "sluice_conntrack_entries_by_state",
        "gauge",
        "Conntrack entries by flow state: syn_sent, established, closing (one FIN), time_wait (both FINs or a RST), udp, orphan (a reply entry whose flow was evicted).",
    );
    let states = shared.conntrack_states.lock().unwrap().clone();
    for state in crate::sweep::FlowState::ALL {
        sample(
            out,
            "sluice_conntrack_entries_by_state",
            &[("state", state.name())],
            states.get(&state).copied().unwrap_or(0),
        );
    }
    family(
        out,
        "sluice_conntrack_capacity",
        "gauge",
        "Capacity of the conntrack map.",
    );
    sample(
        out,
        "sluice_conntrack_capacity",
        &[],
        shared.conntrack_capacity.load(Ordering::Relaxed),
    );
    for (name, help, value) in [
        (
            "sluice_conntrack_half_open_entries",
            "Entries in the half-open table: TCP connects from the client's SYN until it acknowledges the SYN-ACK (two per connect). A SYN flood fills this table, not the conntrack map.",
            shared.half_open_entries.load(Ordering::Relaxed),
        ),
        (
            "sluice_conntrack_half_open_capacity",
            "Capacity of the half-open table (conntrack.half_open_max_entries).",
            u64::from(shared.half_open_capacity.load(Ordering::Relaxed)),
        ),
    ] {
        family(out, name, "gauge", help);
        sample(out, name, &[], value);
    }
    family(
        out,
        "sluice_interface_attached",
        "gauge",
        "1 for the mode the datapath got on each interface.",
    );
    for (interface, mode) in shared.attachments.lock().unwrap().iter() {
        let mode = mode.to_string();
        sample(
            out,
            "sluice_interface_attached",
            &[("interface", interface), ("mode", &mode)],
            1,
        );
    }
    family(
        out,
        "sluice_ready",
        "gauge",
        "1 when every program is attached and the maps hold the configured state (as /readyz).",
    );
    sample(
        out,
        "sluice_ready",
        &[],
        u8::from(shared.ready.load(Ordering::SeqCst)),
    );
    render_discovery(shared, out);
    render_http(&shared.http, out);
}

/// The connect latency histograms of the backends that export one (the
/// family is left out when none does).
fn render_latency(rows: &[BackendRow], out: &mut Out) {
    const LATENCY: &str = "sluice_backend_connect_latency_seconds";
    if rows.iter().all(|r| r.latency.is_none()) {
        return;
    }
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
    let bucket = "sluice_backend_connect_latency_seconds_bucket";
    for r in rows {
        out.flush();
        let Some(h) = &r.latency else { continue };
        // The kernel's log-scale buckets (each 2× the last, from 8 µs), cumulative.
        let mut cumulative = 0;
        for (le, n) in bounds.iter().zip(&h.buckets) {
            cumulative += n;
            r.sample(out, bucket, Some(("le", le)), cumulative);
        }
        r.sample(out, bucket, Some(("le", "+Inf")), h.count);
        r.sample(
            out,
            "sluice_backend_connect_latency_seconds_sum",
            None,
            h.sum_ns as f64 / 1e9,
        );
        r.sample(
            out,
            "sluice_backend_connect_latency_seconds_count",
            None,
            h.count,
        );
    }
}

/// The HTTP server's own load: what a flood of connections shows as.
fn render_http(load: &crate::http::Load, out: &mut String) {
    family(
        out,
        "sluice_http_connections",
        "gauge",
        "Open HTTP connections, all listeners.",
    );
    sample(
        out,
        "sluice_http_connections",
        &[],
        load.open_connections.load(Ordering::Relaxed),
    );
    family(
        out,
        "sluice_http_connections_dropped_total",
        "counter",
        "HTTP connections the agent closed: header_timeout (no complete request head in time, or idle that long), evicted (an idle connection's slot given to a new one at the cap), refused (at the cap with every connection busy).",
    );
    for (reason, n) in [
        ("header_timeout", &load.header_timeouts),
        ("evicted", &load.evicted),
        ("refused", &load.refused),
    ] {
        sample(
            out,
            "sluice_http_connections_dropped_total",
            &[("reason", reason)],
            n.load(Ordering::Relaxed),
        );
    }
    family(
        out,
        "sluice_http_event_streams",
        "gauge",
        "Open event streams (/api/v1/events).",
    );
    sample(
        out,
        "sluice_http_event_streams",
        &[],
        load.event_streams_open(),
    );
    family(
        out,
        "sluice_http_event_streams_refused_total",
        "counter",
        "Event stream requests answered 503: the cap was reached.",
    );
    sample(
        out,
        "sluice_http_event_streams_refused_total",
        &[],
        load.event_streams_refused.load(Ordering::Relaxed),
    );
}

fn render_discovery(shared: &Shared, out: &mut Out) {
    let statuses = shared.discovery.view();
    let families: [(&str, &str, &str); 5] = [
        (
            "sluice_discovery_healthy",
            "gauge",
            "1 while the service's discovery provider answers usable sets (0: its last good set serves).",
        ),
        (
            "sluice_discovery_backends",
            "gauge",
            "Backends in the service's last good discovered set.",
        ),
        (
            "sluice_discovery_held_back",
            "gauge",
            "1 while an update that would empty the service is held back.",
        ),
        (
            "sluice_discovery_updates_total",
            "counter",
            "Discovered sets by what became of them: applied, held_back (would empty the service), failed (source unreachable or unusable).",
        ),
        (
            "sluice_discovery_last_success_timestamp_seconds",
            "gauge",
            "When the provider last answered a usable set (Unix time).",
        ),
    ];
    for (name, kind, help) in families {
        family(out, name, kind, help);
        for (service, st) in statuses.statuses.iter() {
            out.flush();
            let labels = [("service", service.as_str()), ("provider", st.provider)];
            match name {
                "sluice_discovery_healthy" => sample(out, name, &labels, u8::from(st.healthy)),
                "sluice_discovery_backends" => {
                    sample(out, name, &labels, st.backends.as_ref().map_or(0, Vec::len))
                }
                "sluice_discovery_held_back" => sample(out, name, &labels, u8::from(st.held_back)),
                "sluice_discovery_updates_total" => {
                    for (result, n) in [
                        ("applied", st.updates_applied),
                        ("held_back", st.updates_held_back),
                        ("failed", st.failures),
                    ] {
                        let l = [labels[0], labels[1], ("result", result)];
                        sample(out, name, &l, n);
                    }
                }
                _ => sample(
                    out,
                    name,
                    &labels,
                    st.last_success
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_secs()),
                ),
            }
        }
    }
    // Named in /readyz and the log; the count is what alerts look at.
    if let Some(quarantined) = &statuses.quarantined {
        let name = "sluice_discovery_quarantined_services";
        family(
            out,
            name,
            "gauge",
            "Kubernetes Services left out (or kept in their last version) because they don't fit the maps' limits.",
        );
        sample(out, name, &[("provider", "kubernetes")], quarantined.len());
    }
}

/// One sample line: `name{k="v",…} value`. Label values here are service
/// names, addresses, interface names and fixed words: nothing to escape.
fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl Value) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            label(out, k, v);
        }
        out.push('}');
    }
    out.push(' ');
    value.put(out);
    out.push('\n');
}

/// `k="v"`.
fn label(out: &mut String, k: &str, v: &str) {
    out.push_str(k);
    out.push_str("=\"");
    out.push_str(v);
    out.push('"');
}

/// (direction, count) pairs of a service's or backend's packets or bytes.
fn directions(s: &ServiceStats, packets: bool) -> [(&'static str, u64); 2] {
    if packets {
        [
            ("to_backend", s.packets_to_backend),
            ("to_client", s.packets_to_client),
        ]
    } else {
        [
            ("to_backend", s.bytes_to_backend),
            ("to_client", s.bytes_to_client),
        ]
    }
}

impl BackendRow {
    /// One of the backend's sample lines, with its labels and `extra`.
    fn sample(&self, out: &mut String, name: &str, extra: Option<(&str, &str)>, value: impl Value) {
        out.push_str(name);
        out.push('{');
        out.push_str(&self.labels);
        if let Some((k, v)) = extra {
            out.push(',');
            label(out, k, v);
        }
        out.push_str("} ");
        value.put(out);
        out.push('\n');
    }
}

/// A backend's labels: `service` and `backend`, and a Kubernetes backend's
/// `namespace` and `pod` (absent, which Prometheus reads as empty, for
/// others: their series are as they were).
fn backend_labels(service: &str, backend: &str, pod: Option<&PodRef>) -> String {
    let mut labels = format!("service=\"{service}\",backend=\"{backend}\"");
    if let Some(pod) = pod {
        let _ = write!(
            labels,
            ",namespace=\"{}\",pod=\"{}\"",
            escaped(&pod.namespace),
            escaped(&pod.name)
        );
    }
    labels
}

/// A label value as the text format needs it. Names the API server sends
/// are DNS labels, but the labels must stay well-formed whatever it sends.
fn escaped(value: &str) -> std::borrow::Cow<'_, str> {
    if value.contains(['\\', '"', '\n']) {
        value
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
            .into()
    } else {
        value.into()
    }
}
