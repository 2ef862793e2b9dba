//! The HTTP endpoints: health, readiness, metrics and the services API.
//! Handlers read the published snapshots (`view`, `discovery.view()`) and
//! the kernel's counters: none takes a lock the reconcile loop holds.

use std::sync::{Arc, atomic::Ordering};

use std::convert::Infallible;

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{StatusCode, header},
    middleware,
    response::{
        Html, IntoResponse, Response,
        sse::{Event as SseEvent, KeepAlive, Sse},
    },
    routing::get,
};
use futures_util::StreamExt;
use prometheus::Registry;
use serde::Serialize;
use tokio_stream::wrappers::BroadcastStream;

use crate::{
    counters::Counters,
    state::{Shared, backend_state},
    view::Snapshot,
};

#[derive(Clone)]
struct AppState {
    shared: Arc<Shared>,
    registry: Registry,
}

/// Every endpoint. The API's (everything but metrics and health: they show
/// backend addresses and clients' addresses) pass `http::access::api_gate`.
pub fn router(shared: Arc<Shared>, registry: Registry) -> Router {
    let api = Router::new()
        .route("/", get(index))
        .route("/api/v1/services", get(services))
        .route("/api/v1/events", get(events_stream))
        .route("/api/v1/events/recent", get(events_recent))
        .route("/api/v1/dashboard", get(dashboard_data))
        .route_layer(middleware::from_fn(crate::http::access::api_gate));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(api)
        .with_state(AppState { shared, registry })
}

/// 200 once attached and written. A failing discovery provider doesn't
/// make the agent unready (its service keeps serving the last good set);
/// it is named in the body.
async fn readyz(State(app): State<AppState>) -> impl IntoResponse {
    if !app.shared.ready.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: programs not attached or maps not yet written\n".to_string(),
        );
    }
    let mut body = "ready\n".to_string();
    for (service, provider, error) in app.shared.discovery.view().unhealthy() {
        body += &format!(
            "discovery unhealthy: service {service}: {provider}: {error} (the last good backends keep serving)\n"
        );
    }
    (StatusCode::OK, body)
}

async fn metrics(State(app): State<AppState>) -> impl IntoResponse {
    // Reading per-CPU maps is a few syscalls per series: off the async threads.
    let (registry, shared) = (app.registry.clone(), app.shared.clone());
    let body = tokio::task::spawn_blocking(move || crate::metrics::render(&registry, &shared))
        .await
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

#[derive(Serialize)]
pub struct ServicesResponse {
    pub services: Vec<ServiceView>,
}

#[derive(Serialize)]
pub struct ServiceView {
    pub name: String,
    pub vip: String,
    pub port: u16,
    pub protocol: &'static str,
    pub forwarding: &'static str,
    pub connections_total: u64,
    pub retries_total: u64,
    pub fail_open_total: u64,
    pub backends: Vec<BackendView>,
    /// Present for services whose backends come from discovery.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discovery: Option<DiscoveryView>,
}

#[derive(Serialize)]
pub struct DiscoveryView {
    pub provider: &'static str,
    pub healthy: bool,
    pub error: Option<String>,
    /// An update that would have emptied the service is held back.
    pub held_back: bool,
    pub last_success_unix_seconds: Option<u64>,
    pub updates_applied: u64,
    pub failures: u64,
}

#[derive(Serialize)]
pub struct BackendView {
    pub address: String,
    pub weight: u32,
    pub state: &'static str,
    pub connections_total: u64,
    pub failures_total: u64,
    pub failures: FailureView,
    pub ejections_total: u32,
    pub active_connections: u64,
    pub packets_to_backend: u64,
    pub packets_to_client: u64,
    pub bytes_to_backend: u64,
    pub bytes_to_client: u64,
    /// Seconds until a draining backend's remaining connections are closed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_remaining_seconds: Option<u64>,
    /// A Kubernetes backend's pod: its namespace and name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

#[derive(Serialize)]
pub struct FailureView {
    pub refused: u64,
    pub timeout: u64,
    pub unreachable: u64,
}

pub fn services_view(shared: &Shared) -> ServicesResponse {
    let services = match shared.view.get() {
        Some(view) => service_views(shared, &view.counters, &view.snapshot()),
        None => vec![],
    };
    ServicesResponse { services }
}

/// The services of one snapshot, with their counters now.
fn service_views(shared: &Shared, counters: &Counters, snapshot: &Snapshot) -> Vec<ServiceView> {
    let discovery = shared.discovery.view();
    let now = std::time::Instant::now();
    snapshot
        .services
        .values()
        .map(|s| {
            let totals = counters.stats(true, s.id);
            ServiceView {
                name: s.spec.name.clone(),
                vip: s.spec.vip.to_string(),
                port: s.spec.port,
                protocol: s.spec.protocol.as_str(),
                forwarding: if s.spec.snat_ip.is_some() {
                    "snat"
                } else {
                    "dnat"
                },
                connections_total: totals.connections,
                retries_total: totals.retries,
                fail_open_total: totals.fail_open,
                backends: s
                    .backends
                    .iter()
                    .map(|b| {
                        let st = counters.stats(false, b.id);
                        let health = counters.health(b.id);
                        BackendView {
                            address: b.addr.to_string(),
                            weight: b.weight,
                            state: backend_state(&health, b.draining()),
                            connections_total: st.connections,
                            failures_total: st.failures_refused
                                + st.failures_timeout
                                + st.failures_unreachable,
                            failures: FailureView {
                                refused: st.failures_refused,
                                timeout: st.failures_timeout,
                                unreachable: st.failures_unreachable,
                            },
                            ejections_total: health.ejections,
                            active_connections: st.opened.saturating_sub(st.closed),
                            packets_to_backend: st.packets_to_backend,
                            packets_to_client: st.packets_to_client,
                            bytes_to_backend: st.bytes_to_backend,
                            bytes_to_client: st.bytes_to_client,
                            drain_remaining_seconds: b
                                .drain_deadline
                                .map(|d| d.saturating_duration_since(now).as_secs()),
                            namespace: b.pod.as_ref().map(|p| p.namespace.clone()),
                            pod: b.pod.as_ref().map(|p| p.name.clone()),
                        }
                    })
                    .collect(),
                discovery: discovery.statuses.get(&s.spec.name).map(|d| DiscoveryView {
                    provider: d.provider,
                    healthy: d.healthy,
                    error: d.error.clone(),
                    held_back: d.held_back,
                    last_success_unix_seconds: d.last_success.and_then(|t| {
                        t.duration_since(std::time::UNIX_EPOCH)
                            .ok()
                            .map(|d| d.as_secs())
                    }),
                    updates_applied: d.updates_applied,
                    failures: d.failures,
                }),
            }
        })
        .collect()
}

async fn services(State(app): State<AppState>) -> impl IntoResponse {
    let shared = app.shared.clone();
    match tokio::task::spawn_blocking(move || services_view(&shared)).await {
        Ok(view) => Json(view).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Live connection events as Server-Sent Events, one JSON object per event.
/// At most `--max-event-streams` at a time: 503 beyond.
async fn events_stream(State(app): State<AppState>) -> Response {
    let Some(place) = app.shared.http.open_event_stream() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "10")],
            format!(
                "too many event streams open (at most {}); try again later\n",
                app.shared.http.max_event_streams
            ),
        )
            .into_response();
    };
    let stream = BroadcastStream::new(app.shared.events.subscribe()).filter_map(move |event| {
        // Held for as long as the stream lasts: the client's place.
        let _place = &place;
        async move {
            // A subscriber too slow for the feed skips what it missed.
            let event = event.ok()?;
            let json = serde_json::to_string(&*event).ok()?;
            Some(Ok::<_, Infallible>(
                SseEvent::default().event(event.kind).data(json),
            ))
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[derive(serde::Deserialize)]
struct RecentQuery {
    limit: Option<usize>,
}

/// The newest kept events (default 200, at most all kept), oldest first.
async fn events_recent(
    State(app): State<AppState>,
    Query(q): Query<RecentQuery>,
) -> impl IntoResponse {
    let n = q.limit.unwrap_or(200).min(crate::events::KEEP);
    let events: Vec<crate::events::EventView> = app
        .shared
        .events
        .recent(n)
        .iter()
        .map(|e| (**e).clone())
        .collect();
    Json(events)
}

/// The live dashboard: one self-contained page (no external assets).
async fn index() -> Html<&'static str> {
    Html(include_str!("dashboard/index.html"))
}

#[derive(Serialize)]
struct LatencyView {
    service: String,
    backend: String,
    /// Upper bounds of the buckets, in seconds.
    bounds_s: Vec<f64>,
    /// Connections per bucket (not cumulative).
    counts: Vec<u64>,
    count: u64,
    sum_s: f64,
}

#[derive(Serialize)]
struct DashboardView {
    version: &'static str,
    ready: bool,
    services: Vec<ServiceView>,
    latency: Vec<LatencyView>,
    conntrack_entries: u64,
    conntrack_capacity: u32,
    drops: std::collections::BTreeMap<&'static str, u64>,
    passed: std::collections::BTreeMap<&'static str, u64>,
    attached: std::collections::BTreeMap<String, String>,
}

fn dashboard_view(shared: &Shared) -> DashboardView {
    let mut services = Vec::new();
    let mut latency = Vec::new();
    let (mut drops, mut passed) = (Default::default(), Default::default());
    if let Some(view) = shared.view.get() {
        // One snapshot for the whole response.
        let snapshot = view.snapshot();
        let counters = &view.counters;
        services = service_views(shared, counters, &snapshot);
        let bounds_s: Vec<f64> = (0..agent_common::LATENCY_BUCKETS)
            .map(|i| (agent_common::LATENCY_BASE_NS << i) as f64 / 1e9)
            .collect();
        for s in snapshot.services.values() {
            if s.spec.protocol != crate::config::Protocol::Tcp {
                continue;
            }
            for b in &s.backends {
                let h = counters.latency(b.id);
                latency.push(LatencyView {
                    service: s.spec.name.clone(),
                    backend: b.addr.to_string(),
                    bounds_s: bounds_s.clone(),
                    counts: h.buckets.to_vec(),
                    count: h.count,
                    sum_s: h.sum_ns as f64 / 1e9,
                });
            }
        }
        let (d, p): (
            &mut std::collections::BTreeMap<_, _>,
            &mut std::collections::BTreeMap<_, _>,
        ) = (&mut drops, &mut passed);
        for (code, reason) in agent_common::reason::ALL.iter().enumerate() {
            let n = counters.reason_count(code as u32);
            if reason.dropped {
                d.insert(reason.name, n)
            } else {
                p.insert(reason.name, n)
            };
        }
    }
    DashboardView {
        version: env!("CARGO_PKG_VERSION"),
        ready: shared.ready.load(Ordering::SeqCst),
        services,
        latency,
        conntrack_entries: shared.conntrack_entries.load(Ordering::Relaxed),
        conntrack_capacity: shared.conntrack_capacity.load(Ordering::Relaxed),
        drops,
        passed,
        attached: shared
            .attachments
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect(),
    }
}

/// Everything the dashboard draws, in one request.
async fn dashboard_data(State(app): State<AppState>) -> impl IntoResponse {
    let shared = app.shared.clone();
    match tokio::task::spawn_blocking(move || dashboard_view(&shared)).await {
        Ok(view) => Json(view).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
