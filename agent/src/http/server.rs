//! Accepting and serving connections: hyper's HTTP/1 server with its header
//! read timeout and head size limit, under the connection cap of `slots`.

use std::{convert::Infallible, sync::Arc, time::Duration, time::Instant};

use anyhow::{Context, Result};
use axum::{Router, body::Body, extract::Request, http::header};
use http_body_util::BodyExt;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::watch,
    task::JoinSet,
};
use tower::ServiceExt;
use tracing::{debug, info, warn};

use super::{Listener, Load, Options, access::ConnInfo, slots::Slots};

/// After SIGTERM, how long open requests get to finish before their
/// connections are dropped (event streams never finish by themselves).
/// The contract gives the whole agent 5 s to exit.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// After an accept error that is not about one connection (out of
/// descriptors, say), the pause before the next accept, so the loop
/// doesn't spin or flood the log.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Connections the kernel completes and queues before the agent accepts
/// them. tokio's `bind` asks for 128; a burst beyond the queue (a
/// flood, or a scrape arriving during one) has its SYNs dropped and
/// retried a second later, so the queue is as long as a default
/// `somaxconn` (4,096) allows without being near it.
const ACCEPT_BACKLOG: u32 = 1024;

/// How long accepting waits for a connection told to make room to close.
/// Its task only has to drop it, but a burst of accepts would otherwise
/// outrun those tasks and hold cap + burst descriptors; this ties the
/// accept rate to the close rate. Bounded, in case the runtime is busy.
const EVICTION_WAIT: Duration = Duration::from_millis(100);

/// The running listeners.
pub struct Server {
    stop: watch::Sender<bool>,
    loops: JoinSet<()>,
}

impl Server {
    /// Binds every listener of `options` (an address that can't be bound is
    /// an error naming it) and serves `router` on each.
    pub async fn start(options: &Options, router: Router, load: Arc<Load>) -> Result<Self> {
        let (stop, stopping) = watch::channel(false);
        let mut loops = JoinSet::new();
        for plan in options.listeners() {
            let listener =
                bind(plan.addr).with_context(|| format!("listening on {}", plan.addr))?;
            let token = plan.api_exposed.then(|| options.token.clone()).flatten();
            info!(
                listen = %plan.addr,
                api = if plan.api_exposed {
                    "loopback connections, and others with the bearer token"
                } else {
                    "loopback connections only"
                },
                "serving /metrics, /healthz, /readyz and the API (/api/v1/*, events, the dashboard)"
            );
            let slots = Slots::new(options.max_connections.get(), load.clone());
            loops.spawn(accept_loop(
                listener,
                plan,
                token,
                slots,
                router.clone(),
                load.clone(),
                stopping.clone(),
            ));
        }
        if let Some(token) = &options.token {
            token.spawn_reload(stopping);
        }
        Ok(Self { stop, loops })
    }

    /// Stops accepting; open requests get `SHUTDOWN_GRACE` to finish.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Stops, and waits until every listener and connection is gone (at
    /// most `SHUTDOWN_GRACE` and a little).
    pub async fn stopped(mut self) {
        self.stop();
        while self.loops.join_next().await.is_some() {}
    }
}

fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // As `TcpListener::bind`: a restarted agent rebinds at once, whatever
    // connections of the last one are in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

async fn accept_loop(
    listener: TcpListener,
    plan: Listener,
    token: Option<Arc<super::ApiToken>>,
    slots: Arc<Slots>,
    router: Router,
    load: Arc<Load>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stopping.changed() => break,
            // Reaps finished connections' tasks as they end.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // At the cap with every connection busy: closed at once.
                    let Some(admitted) = slots.admit(Instant::now()) else { continue };
                    let Ok(local) = stream.local_addr() else { continue };
                    let conn = ConnInfo { local, peer, exposed_with: token.clone() };
                    connections.spawn(serve_connection(
                        stream, conn, admitted.slot, router.clone(), load.clone(), stopping.clone(),
                    ));
                    if let Some(evicted) = admitted.evicted
                        && tokio::time::timeout(EVICTION_WAIT, evicted.closed()).await.is_err()
                    {
                        debug!("an evicted connection is still closing; accepting on");
                    }
                }
                Err(e) if is_per_connection(&e) => debug!(error = %e, "accept"),
                Err(e) => {
                    warn!(listen = %plan.addr, error = %e, "accept failed; pausing");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
        }
    }
    drop(listener);
    // The connections saw `stopping` too and are finishing their requests.
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    connections.shutdown().await;
}

/// Errors about the one connection being accepted (it was reset before
/// accept got to it): the next accept is fine.
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted
    )
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    conn: ConnInfo,
    slot: super::slots::Slot,
    router: Router,
    load: Arc<Load>,
    mut stopping: watch::Receiver<bool>,
) {
    let activity = slot.conn.clone();
    let service = hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
        request.extensions_mut().insert(conn.clone());
        let busy = activity.begin(Instant::now());
        let router = router.clone();
        async move {
            let response = router
                .oneshot(request.map(Body::new))
                .await
                .unwrap_or_else(|never: Infallible| match never {});
            let streams = response
                .headers()
                .get(header::CONTENT_TYPE)
                .is_some_and(|t| t.as_bytes().starts_with(b"text/event-stream"));
            if streams {
                busy.streaming();
            }
            // Busy until the body is written (or the client goes).
            Ok::<_, Infallible>(response.map(|body| {
                body.map_frame(move |frame| {
                    let _in_flight = &busy;
                    frame
                })
            }))
        }
    });
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(super::HEADER_READ_TIMEOUT)
        .max_header_size(super::MAX_REQUEST_HEAD_BYTES)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(served);
    let result = tokio::select! {
        result = served.as_mut() => result,
        // Dropping the connection closes its socket.
        _ = slot.conn.evicted() => return,
        _ = stopping.changed() => {
            served.as_mut().graceful_shutdown();
            served.await
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            load.header_timeouts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        debug!(error = %e, "HTTP connection ended");
    }
}
