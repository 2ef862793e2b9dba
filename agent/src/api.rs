//! The HTTP endpoints: health, readiness, metrics and the services API.

use std::sync::{Arc, atomic::Ordering};

use std::convert::Infallible;

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{
        Html, IntoResponse,
        sse::{Event as SseEvent, KeepAlive, Sse},
    },
    routing::get,
};
use futures_util::StreamExt;
use prometheus::Registry;
use serde::Serialize;
use tokio_stream::wrappers::BroadcastStream;

use crate::state::{Shared, backend_state};

#[derive(Clone)]
struct AppState {
    shared: Arc<Shared>,
    registry: Registry,
}

pub fn router(shared: Arc<Shared>, registry: Registry) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/services", get(services))
        .route("/api/v1/events", get(events_stream))
        .route("/api/v1/events/recent", get(events_recent))
        .with_state(AppState { shared, registry })
}

async fn readyz(State(app): State<AppState>) -> impl IntoResponse {
    if app.shared.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: programs not attached or maps not yet written\n",
        )
    }
}

async fn metrics(State(app): State<AppState>) -> impl IntoResponse {
    // Reading per-CPU maps is a few syscalls per series: off the async threads.
    let registry = app.registry.clone();
    let body = tokio::task::spawn_blocking(move || crate::metrics::render(&registry))
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
    pub backends: Vec<BackendView>,
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
}

#[derive(Serialize)]
pub struct FailureView {
    pub refused: u64,
    pub timeout: u64,
    pub unreachable: u64,
}

pub fn services_view(shared: &Shared) -> ServicesResponse {
    let guard = shared.reconciler.lock().unwrap();
    let Some(rec) = guard.as_ref() else {
        return ServicesResponse { services: vec![] };
    };
    let services = rec
        .services
        .values()
        .map(|s| ServiceView {
            name: s.spec.name.clone(),
            vip: s.spec.vip.to_string(),
            port: s.spec.port,
            protocol: s.spec.protocol.as_str(),
            forwarding: if s.spec.snat_ip.is_some() {
                "snat"
            } else {
                "dnat"
            },
            backends: s
                .backends
                .iter()
                .map(|b| {
                    let st = rec.stats(false, b.id);
                    BackendView {
                        address: b.addr.to_string(),
                        weight: b.weight,
                        state: backend_state(rec, b),
                        connections_total: st.connections,
                        failures_total: st.failures_refused
                            + st.failures_timeout
                            + st.failures_unreachable,
                        failures: FailureView {
                            refused: st.failures_refused,
                            timeout: st.failures_timeout,
                            unreachable: st.failures_unreachable,
                        },
                        ejections_total: rec.health(b.id).ejections,
                        active_connections: st.opened.saturating_sub(st.closed),
                        packets_to_backend: st.packets_to_backend,
                        packets_to_client: st.packets_to_client,
                    }
                })
                .collect(),
        })
        .collect();
    ServicesResponse { services }
}

async fn services(State(app): State<AppState>) -> impl IntoResponse {
    let shared = app.shared.clone();
    match tokio::task::spawn_blocking(move || services_view(&shared)).await {
        Ok(view) => Json(view).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Live connection events as Server-Sent Events, one JSON object per event.
async fn events_stream(
    State(app): State<AppState>,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let stream =
        BroadcastStream::new(app.shared.events.subscribe()).filter_map(|event| async move {
            // A subscriber too slow for the feed skips what it missed.
            let event = event.ok()?;
            let json = serde_json::to_string(&*event).ok()?;
            Some(Ok(SseEvent::default().event(event.kind).data(json)))
        });
    Sse::new(stream).keep_alive(KeepAlive::default())
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

async fn index() -> Html<&'static str> {
    Html(concat!(
        "<!doctype html><title>Sluice</title><h1>Sluice ",
        env!("CARGO_PKG_VERSION"),
        "</h1><ul><li><a href=\"/metrics\">/metrics</a></li>",
        "<li><a href=\"/api/v1/services\">/api/v1/services</a></li>",
        "<li><a href=\"/readyz\">/readyz</a></li><li><a href=\"/healthz\">/healthz</a></li></ul>"
    ))
}
