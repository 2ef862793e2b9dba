//! Connection events: read from the kernel's ring buffer, named (service,
//! backend), kept (the last `KEEP`) for the dashboard and streamed to
//! subscribers (`GET /api/v1/events`, Server-Sent Events).

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use agent_common::{Event, FAMILY_V4, addr::words_ip, event_kind, failure_reason};
use anyhow::{Result, anyhow};
use aya::maps::{MapData, RingBuf};
use serde::Serialize;
use tokio::sync::broadcast;

use crate::state::Shared;

/// Events kept in memory for the dashboard.
pub const KEEP: usize = 4096;

#[derive(Debug, Clone, Serialize)]
pub struct EventView {
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    pub protocol: &'static str,
    pub client: String,
    pub vip: String,
    pub service: String,
    pub backend: String,
    /// Connect latency (open), connection age (close).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<f64>,
}

/// The kept events and the live feed.
pub struct EventLog {
    recent: Mutex<VecDeque<Arc<EventView>>>,
    live: broadcast::Sender<Arc<EventView>>,
}

impl Default for EventLog {
    fn default() -> Self {
        Self {
            recent: Mutex::new(VecDeque::with_capacity(KEEP)),
            live: broadcast::channel(1024).0,
        }
    }
}

impl EventLog {
    pub fn push(&self, event: EventView) {
        let event = Arc::new(event);
        let mut recent = self.recent.lock().unwrap();
        if recent.len() == KEEP {
            recent.pop_front();
        }
        recent.push_back(event.clone());
        drop(recent);
        let _ = self.live.send(event);
    }

    /// The newest `n` kept events, oldest first.
    pub fn recent(&self, n: usize) -> Vec<Arc<EventView>> {
        let recent = self.recent.lock().unwrap();
        recent
            .iter()
            .skip(recent.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<EventView>> {
        self.live.subscribe()
    }
}

fn addr(words: [u32; 4], family: u8, port: u16) -> SocketAddr {
    SocketAddr::new(words_ip(words, family == FAMILY_V4), u16::from_be(port))
}

/// Nanoseconds to add to a kernel monotonic timestamp to get wall time.
fn monotonic_to_wall_ns() -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let mono = i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec);
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    wall - mono
}

fn view(e: &Event, shared: &Shared, offset: i128) -> EventView {
    // By id through the snapshot's index: events come at up to 10,000 a
    // second, and a node may have thousands of services.
    let snapshot = shared.view.get().map(|v| v.snapshot());
    let service = snapshot
        .as_ref()
        .and_then(|s| s.service_by_id(e.service_id))
        .map_or_else(|| format!("#{}", e.service_id), |s| s.spec.name.clone());
    let backend = snapshot
        .as_ref()
        .and_then(|s| s.backend_by_id(e.backend_id))
        .map_or_else(|| format!("#{}", e.backend_id), |b| b.addr.to_string());
    let kind = match e.kind {
        event_kind::OPEN => "open",
        event_kind::CLOSE => "close",
        event_kind::FAIL => "fail",
        event_kind::RETRY => "retry",
        event_kind::EJECT => "eject",
        _ => "unknown",
    };
    let reason = match e.reason {
        failure_reason::REFUSED => Some("refused"),
        failure_reason::TIMEOUT => Some("timeout"),
        failure_reason::UNREACHABLE => Some("unreachable"),
        _ => None,
    };
    let duration_ms = (matches!(e.kind, event_kind::OPEN | event_kind::CLOSE) && e.duration_ns > 0)
        .then(|| e.duration_ns as f64 / 1e6);
    EventView {
        time_ms: ((i128::from(e.ts_ns) + offset).max(0) / 1_000_000) as u64,
        kind,
        reason,
        protocol: if e.proto == agent_common::PROTO_TCP {
            "tcp"
        } else {
            "udp"
        },
        client: addr(e.client, e.family, e.client_port).to_string(),
        vip: addr(e.vip, e.family, e.vip_port).to_string(),
        service,
        backend,
        duration_ms,
    }
}

/// Reads the ring buffer until the agent stops.
pub fn spawn_reader(ring: RingBuf<MapData>, shared: Arc<Shared>) -> Result<()> {
    // SAFETY: the ring buffer owns its fd and the AsyncFd owns the ring
    // buffer, so the fd stays open and the same for the AsyncFd's whole life.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow!("watching the event ring buffer: {e}"))?;
    let offset = monotonic_to_wall_ns();
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if item.len() < std::mem::size_of::<Event>() {
                    continue;
                }
                // SAFETY: the kernel wrote an Event (repr(C), any bit pattern
                // valid) of at least this size; read_unaligned copies it out.
                let event: Event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                shared.events.push(view(&event, &shared, offset));
            }
            guard.clear_ready();
        }
    });
    Ok(())
}
