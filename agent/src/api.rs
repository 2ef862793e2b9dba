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
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
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
    /// Where override changes go (the reconcile loop); only the control
    /// socket's router has it.
    control: Option<mpsc::Sender<crate::control::Request>>,
}

/// Every path the agent serves, over HTTP and on the control socket. The
/// routers below register these constants and no other path:
/// docs/openapi.yaml describes each, and tests/tests/openapi.rs holds this
/// list and the description's paths equal.
pub mod path {
    pub const HEALTHZ: &str = "/healthz";
    pub const READYZ: &str = "/readyz";
    pub const METRICS: &str = "/metrics";
    pub const DASHBOARD_PAGE: &str = "/";
    pub const STATUS: &str = "/api/v1/status";
    pub const SERVICES: &str = "/api/v1/services";
    pub const CONNTRACK: &str = "/api/v1/conntrack";
    pub const EXPLAIN: &str = "/api/v1/explain";
    pub const EVENTS: &str = "/api/v1/events";
    pub const EVENTS_RECENT: &str = "/api/v1/events/recent";
    pub const DASHBOARD: &str = "/api/v1/dashboard";
    pub const OVERRIDES: &str = "/api/v1/overrides";
}

/// The paths of `path`, all of them.
pub const ROUTES: &[&str] = &[
    path::HEALTHZ,
    path::READYZ,
    path::METRICS,
    path::DASHBOARD_PAGE,
    path::STATUS,
    path::SERVICES,
    path::CONNTRACK,
    path::EXPLAIN,
    path::EVENTS,
    path::EVENTS_RECENT,
    path::DASHBOARD,
    path::OVERRIDES,
];

/// The read endpoints of the API, served over HTTP (behind the gate) and
/// on the control socket.
fn api_routes() -> Router<AppState> {
    Router::new()
        .route(path::DASHBOARD_PAGE, get(index))
        .route(path::STATUS, get(status))
        .route(path::SERVICES, get(services))
        .route(path::CONNTRACK, get(conntrack))
        .route(path::EXPLAIN, get(explain))
        .route(path::EVENTS, get(events_stream))
        .route(path::EVENTS_RECENT, get(events_recent))
        .route(path::DASHBOARD, get(dashboard_data))
}

fn health_routes() -> Router<AppState> {
    Router::new()
        .route(path::HEALTHZ, get(|| async { "ok\n" }))
        .route(path::READYZ, get(readyz))
        .route(path::METRICS, get(metrics))
}

/// Every HTTP endpoint. The API's (everything but metrics and health: they
/// show backend addresses and clients' addresses) pass
/// `http::access::api_gate`. Overrides are read-only here: they change only
/// through the root-only control socket.
pub fn router(shared: Arc<Shared>, registry: Registry) -> Router {
    let api = api_routes()
        .route(path::OVERRIDES, get(list_overrides))
        .route_layer(middleware::from_fn(crate::http::access::api_gate));
    health_routes().merge(api).with_state(AppState {
        shared,
        registry,
        control: None,
    })
}

/// The control socket's endpoints: the API, and override changes. Only
/// root (or the agent's own user) can connect, so no gate.
pub fn control_router(
    shared: Arc<Shared>,
    registry: Registry,
    control: mpsc::Sender<crate::control::Request>,
) -> Router {
    health_routes()
        .merge(api_routes())
        .route(path::OVERRIDES, get(list_overrides).post(change_override))
        .with_state(AppState {
            shared,
            registry,
            control: Some(control),
        })
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
    // Reading the maps is syscalls, formatting tens of megabytes takes a
    // while: off the async threads, streamed as it is written. The channel
    // holds a few chunks: a slow reader slows the writer instead of the
    // agent buffering the whole text.
    let (registry, shared) = (app.registry.clone(), app.shared.clone());
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::convert::Infallible>>(4);
    tokio::task::spawn_blocking(move || {
        let mut send = |chunk: String| tx.blocking_send(Ok(chunk.into())).is_ok();
        crate::metrics::render_chunks(&registry, &shared, &mut send);
    });
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ServicesResponse {
    pub services: Vec<ServiceView>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ServiceView {
    pub name: String,
    pub vip: String,
    pub port: u16,
    pub protocol: String,
    pub forwarding: String,
    /// With `forwarding: dsr`: `none` (L2) or `ipip`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dsr_encapsulation: Option<String>,
    /// `maglev` or `least_connections`.
    pub algorithm: String,
    /// Session affinity by client address: its timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity_timeout_seconds: Option<u32>,
    /// New flows are admitted only from these blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_sources: Option<Vec<String>>,
    pub connections_total: u64,
    pub retries_total: u64,
    pub fail_open_total: u64,
    pub backends: Vec<BackendView>,
    /// Present for services whose backends come from discovery.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discovery: Option<DiscoveryView>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DiscoveryView {
    pub provider: String,
    pub healthy: bool,
    pub error: Option<String>,
    /// An update that would have emptied the service is held back.
    pub held_back: bool,
    pub last_success_unix_seconds: Option<u64>,
    pub updates_applied: u64,
    pub failures: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BackendView {
    pub address: String,
    /// The weight in force (an override's, if any).
    pub weight: u32,
    pub state: String,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_remaining_seconds: Option<u64>,
    /// Connect latency quantiles measured in the kernel (TCP, once a
    /// connect was seen), in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_p50_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_p99_ms: Option<f64>,
    /// A runtime override (`sluice drain` / `sluice weight`) in force.
    #[serde(default, rename = "override", skip_serializing_if = "Option::is_none")]
    pub override_: Option<crate::control::overrides::Override>,
    /// A Kubernetes backend's pod: its namespace and name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FailureView {
    pub refused: u64,
    pub timeout: u64,
    pub unreachable: u64,
}

pub fn services_view(shared: &Shared) -> ServicesResponse {
    let services = match shared.view.get() {
        Some(view) => service_views(
            Some(&shared.discovery.view()),
            Some(&shared.overrides.lock().unwrap().clone()),
            &view.counters,
            &view.snapshot(),
        ),
        None => vec![],
    };
    ServicesResponse { services }
}

/// The services of one snapshot, with their counters now. `discovery` and
/// `overrides` are the agent's (None when read from pinned maps).
pub fn service_views(
    discovery: Option<&crate::discovery::HubView>,
    overrides: Option<&crate::control::overrides::Overrides>,
    counters: &Counters,
    snapshot: &Snapshot,
) -> Vec<ServiceView> {
    let now = std::time::Instant::now();
    snapshot
        .services
        .values()
        .map(|s| {
            let totals = counters.stats(true, s.id);
            let tcp = s.spec.protocol == crate::config::Protocol::Tcp;
            ServiceView {
                name: s.spec.name.clone(),
                vip: s.spec.vip.to_string(),
                port: s.spec.port,
                protocol: s.spec.protocol.as_str().to_string(),
                forwarding: if s.spec.dsr.is_some() {
                    "dsr"
                } else if s.spec.snat_ip.is_some() {
                    "snat"
                } else {
                    "dnat"
                }
                .to_string(),
                dsr_encapsulation: s.spec.dsr.map(|e| e.as_str().to_string()),
                algorithm: s.spec.algorithm.as_str().to_string(),
                affinity_timeout_seconds: s.spec.affinity_timeout,
                allowed_sources: s
                    .spec
                    .allowed_sources
                    .as_ref()
                    .map(|list| list.iter().map(ToString::to_string).collect()),
                connections_total: totals.connections,
                retries_total: totals.retries,
                fail_open_total: totals.fail_open,
                backends: s
                    .backends
                    .iter()
                    .map(|b| {
                        let st = counters.stats(false, b.id);
                        let health = counters.health(b.id);
                        let latency = tcp.then(|| counters.latency(b.id));
                        let quantile = |q| {
                            latency
                                .as_ref()
                                .and_then(|h| crate::counters::latency_quantile(h, q))
                                .map(|s| (s * 1e6).round() / 1e3)
                        };
                        BackendView {
                            address: b.addr.to_string(),
                            weight: b.weight,
                            state: backend_state(&health, b.draining()).to_string(),
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
                                .filter(|_| discovery.is_some())
                                .map(|d| d.saturating_duration_since(now).as_secs()),
                            latency_p50_ms: quantile(0.5),
                            latency_p99_ms: quantile(0.99),
                            override_: overrides.and_then(|o| o.get(&s.spec.name, &b.addr)),
                            namespace: b.pod.as_ref().map(|p| p.namespace.clone()),
                            pod: b.pod.as_ref().map(|p| p.name.clone()),
                        }
                    })
                    .collect(),
                discovery: discovery
                    .and_then(|d| d.statuses.get(&s.spec.name))
                    .map(|d| DiscoveryView {
                        provider: d.provider.to_string(),
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
/// Which events a stream carries (`sluice events --service S --kind K`).
#[derive(Debug, Default, Deserialize)]
pub struct EventFilter {
    pub service: Option<String>,
    pub kind: Option<String>,
}

impl EventFilter {
    fn admits(&self, event: &crate::events::EventView) -> bool {
        self.service.as_ref().is_none_or(|s| *s == event.service)
            && self.kind.as_ref().is_none_or(|k| k == event.kind)
    }
}

async fn events_stream(State(app): State<AppState>, Query(filter): Query<EventFilter>) -> Response {
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
        let admitted = event.as_ref().is_ok_and(|e| filter.admits(e));
        async move {
            // A subscriber too slow for the feed skips what it missed.
            let event = event.ok().filter(|_| admitted)?;
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
    #[serde(flatten)]
    filter: EventFilter,
}

/// The newest kept events that pass the filter (default 200, at most all
/// kept), oldest first.
async fn events_recent(
    State(app): State<AppState>,
    Query(q): Query<RecentQuery>,
) -> impl IntoResponse {
    let n = q.limit.unwrap_or(200).min(crate::events::KEEP);
    let mut events: Vec<crate::events::EventView> = app
        .shared
        .events
        .recent(crate::events::KEEP)
        .iter()
        .filter(|e| q.filter.admits(e))
        .map(|e| (**e).clone())
        .collect();
    events.drain(..events.len().saturating_sub(n));
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
        services = service_views(
            Some(&shared.discovery.view()),
            Some(&shared.overrides.lock().unwrap().clone()),
            counters,
            &snapshot,
        );
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

/// `sluice status`.
pub fn status_view(shared: &Shared) -> crate::inspect::status::StatusView {
    use crate::inspect::status::{Attachment, ConntrackStatus, DiscoveryStatus, base};
    let Some(view) = shared.view.get() else {
        // Not loaded yet: only what the process knows.
        let mut s = crate::inspect::status::StatusView::empty("agent");
        s.ready = Some(false);
        s.pid = Some(std::process::id());
        return s;
    };
    let mut status = base(&view.counters, &view.snapshot(), "agent");
    status.ready = Some(shared.ready.load(Ordering::SeqCst));
    status.pid = Some(std::process::id());
    status.uptime_seconds = Some(shared.started.elapsed().as_secs());
    status.pin_directory = shared.pin_directory.clone();
    status.attachments = shared
        .attachments
        .lock()
        .unwrap()
        .iter()
        .map(|(interface, mode)| Attachment {
            interface: interface.clone(),
            mode: mode.to_string(),
        })
        .collect();
    status.overrides = shared.overrides.lock().unwrap().len();
    status.discovery = shared
        .discovery
        .view()
        .statuses
        .iter()
        .map(|(service, d)| DiscoveryStatus {
            service: service.clone(),
            provider: d.provider.to_string(),
            healthy: d.healthy,
            held_back: d.held_back,
            error: d.error.clone(),
        })
        .collect();
    status.conntrack = ConntrackStatus {
        entries: shared.conntrack_entries.load(Ordering::Relaxed),
        capacity: shared.conntrack_capacity.load(Ordering::Relaxed),
        half_open_entries: shared.half_open_entries.load(Ordering::Relaxed),
        half_open_capacity: shared.half_open_capacity.load(Ordering::Relaxed),
    };
    status
}

async fn status(State(app): State<AppState>) -> impl IntoResponse {
    let shared = app.shared.clone();
    match tokio::task::spawn_blocking(move || status_view(&shared)).await {
        Ok(view) => Json(view).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// `sluice conntrack`'s answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct FlowsResponse {
    pub flows: Vec<crate::inspect::flows::FlowView>,
    /// Flows that answered the filter, listed or not (`limit`).
    pub matched: u64,
}

async fn conntrack(
    State(app): State<AppState>,
    Query(filter): Query<crate::inspect::flows::FlowFilter>,
) -> Response {
    let Some(view) = app.shared.view.get().cloned() else {
        return not_loaded();
    };
    let answer = tokio::task::spawn_blocking(move || {
        let (flows, matched) = crate::inspect::flows::list(&view.tables, &view.snapshot(), &filter);
        FlowsResponse { flows, matched }
    })
    .await;
    match answer {
        Ok(a) => Json(a).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct ExplainQuery {
    /// CLIENT_IP:PORT
    client: String,
    /// VIP:PORT/PROTO
    frontend: String,
}

async fn explain(State(app): State<AppState>, Query(q): Query<ExplainQuery>) -> Response {
    use crate::inspect::explain::{explain, parse_client, parse_frontend};
    let (client, (vip, protocol)) = match (parse_client(&q.client), parse_frontend(&q.frontend)) {
        (Ok(c), Ok(f)) => (c, f),
        (Err(e), _) | (_, Err(e)) => return (StatusCode::BAD_REQUEST, e).into_response(),
    };
    let Some(view) = app.shared.view.get().cloned() else {
        return not_loaded();
    };
    match tokio::task::spawn_blocking(move || {
        explain(&view.tables, &view.snapshot(), client, vip, protocol)
    })
    .await
    {
        Ok(a) => Json(a).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn not_loaded() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "the datapath is not loaded yet\n".to_string(),
    )
        .into_response()
}

async fn list_overrides(State(app): State<AppState>) -> impl IntoResponse {
    Json(app.shared.overrides.lock().unwrap().entries())
}

/// Hands the change to the reconcile loop (the one writer) and waits for
/// its answer: applied to the maps and kept, or refused with the reason.
async fn change_override(
    State(app): State<AppState>,
    Json(change): Json<crate::control::overrides::Change>,
) -> Response {
    let Some(control) = app.control else {
        return (
            StatusCode::FORBIDDEN,
            "overrides change only over the control socket\n",
        )
            .into_response();
    };
    let (reply, answer) = oneshot::channel();
    if control
        .send(crate::control::Request { change, reply })
        .await
        .is_err()
    {
        return (StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping\n").into_response();
    }
    match answer.await {
        Ok(Ok(entry)) => Json(entry).into_response(),
        Ok(Err(why)) => (StatusCode::UNPROCESSABLE_ENTITY, format!("{why}\n")).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping\n").into_response(),
    }
}
