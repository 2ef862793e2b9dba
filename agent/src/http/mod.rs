//! The HTTP listeners: which endpoints each address serves to whom, and the
//! limits that keep a flood of connections from costing the agent more than
//! a bounded number of descriptors and bytes.
//!
//! `/metrics`, `/healthz` and `/readyz` are served on every listener to
//! anyone: they may be exposed on a node or pod address. The API
//! (`/api/v1/*`, the event stream, the dashboard) is served to connections
//! made over loopback and, on a listener where it is exposed, to requests
//! that carry the bearer token (see `access`).

pub mod access;
mod server;
pub mod slots;
pub mod token;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    num::NonZeroUsize,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use server::Server;
pub use token::{ApiToken, TokenError};

/// How long a client may take to send a request's head, counted from when
/// the connection starts waiting for one: at accept, and again after each
/// response on a kept-alive connection. It is therefore also the keep-alive
/// idle timeout (hyper arms one timer for both). Scrapers, probes and curl
/// send the head in their first packet; 10 s leaves room for a slow link
/// and bounds how long a connection that dribbles its head (slowloris) or
/// sends nothing holds a slot.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Open connections per listener. Prometheus, the kubelet's probes and a
/// few dashboards need fewer than ten; 256 leaves room for bursts while
/// keeping the agent's descriptors (it also needs them for maps, links and
/// netlink) far below a common `nofile` limit of 1,024, and its buffers
/// near a few MiB.
pub const MAX_CONNECTIONS: usize = 256;

/// Open event streams (`/api/v1/events`), all listeners together. Each
/// subscriber buffers up to 1,024 events for a slow reader, and a stream's
/// connection is never evicted (see `slots`), so they are capped well
/// below `MAX_CONNECTIONS`.
pub const MAX_EVENT_STREAMS: usize = 32;

/// The largest request head (request line and headers). The API takes
/// short GETs; a client that sends more gets 431 instead of growing a
/// buffer per connection.
pub const MAX_REQUEST_HEAD_BYTES: usize = 16 * 1024;

/// How the HTTP side is set up: resolved from `sluice run`'s flags.
#[derive(Debug, Clone)]
pub struct Options {
    /// `/metrics`, `/healthz`, `/readyz` (and the API if it is on loopback).
    pub listen: SocketAddr,
    /// Where the API is served.
    pub api_listen: SocketAddr,
    /// The bearer token an exposed API requires.
    pub token: Option<Arc<ApiToken>>,
    pub max_connections: NonZeroUsize,
    pub max_event_streams: NonZeroUsize,
}

/// Why the HTTP side can't start as asked. `sluice run` exits 2 on these,
/// as on a bad config: nothing is attached.
#[derive(Debug, thiserror::Error)]
pub enum ExposureError {
    #[error(
        "--api-listen {addr} serves the API beyond loopback, so it needs a bearer token: give --api-token-file FILE (or SLUICE_API_TOKEN_FILE) holding the token clients must send"
    )]
    NoToken { addr: SocketAddr },
    #[error(transparent)]
    Token(#[from] TokenError),
}

/// One address to bind, and whether the API is exposed there (served to
/// connections from beyond loopback that carry the token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    pub addr: SocketAddr,
    pub api_exposed: bool,
}

impl Options {
    /// `api_listen` None: the API stays on loopback, on `listen` itself
    /// when that is a loopback address, else on the same port of the
    /// loopback address of `listen`'s family. A token file, when given, is
    /// read now: an unreadable or empty one is refused even where it would
    /// not be needed, since it says the operator meant to use one.
    pub fn new(
        listen: SocketAddr,
        api_listen: Option<SocketAddr>,
        token_file: Option<&Path>,
        max_connections: NonZeroUsize,
        max_event_streams: NonZeroUsize,
    ) -> Result<Self, ExposureError> {
        let api_listen = api_listen.unwrap_or_else(|| default_api_listen(listen));
        let token = token_file.map(ApiToken::load).transpose()?.map(Arc::new);
        let options = Self {
            listen,
            api_listen,
            token,
            max_connections,
            max_event_streams,
        };
        if options.token.is_none() && options.listeners().iter().any(|l| l.api_exposed) {
            return Err(ExposureError::NoToken { addr: api_listen });
        }
        Ok(options)
    }

    /// The addresses to bind: one when `listen` covers the API's address
    /// (the same address, or a wildcard on the same port, which includes
    /// loopback), else `listen` and `api_listen`.
    pub fn listeners(&self) -> Vec<Listener> {
        let api_exposed = !is_loopback(self.api_listen.ip());
        let covered = self.api_listen == self.listen
            || (self.listen.ip().is_unspecified()
                && self.listen.port() == self.api_listen.port()
                && !api_exposed);
        if covered {
            vec![Listener {
                addr: self.listen,
                api_exposed,
            }]
        } else {
            vec![
                Listener {
                    addr: self.listen,
                    api_exposed: false,
                },
                Listener {
                    addr: self.api_listen,
                    api_exposed,
                },
            ]
        }
    }
}

/// A listen address: `IP:PORT`, `[IPv6]:PORT`, or also `[IPv4]:PORT`, so
/// that a manifest can write `[$(POD_IP)]:9464` for a pod of either family.
pub fn parse_listen_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let bracketed = text
        .strip_prefix('[')
        .and_then(|rest| rest.split_once("]:"))
        .and_then(|(ip, port)| Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?)));
    bracketed.ok_or_else(|| format!("{text:?} is not IP:PORT, [IPv6]:PORT or [IPv4]:PORT"))
}

fn default_api_listen(listen: SocketAddr) -> SocketAddr {
    if is_loopback(listen.ip()) {
        return listen;
    }
    let loopback: IpAddr = match listen {
        SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
        SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
    };
    SocketAddr::new(loopback, listen.port())
}

/// Loopback, also as an IPv4-mapped IPv6 address (what a dual-stack `[::]`
/// listener sees for 127.0.0.1).
pub fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// What the HTTP server is carrying and what it turned away, for metrics,
/// and the places among the capped event streams.
pub struct Load {
    pub open_connections: AtomicU64,
    /// Closed because the request head did not arrive in time.
    pub header_timeouts: AtomicU64,
    /// Closed to make room for a new connection (see `slots`).
    pub evicted: AtomicU64,
    /// Turned away at accept: every connection was busy.
    pub refused: AtomicU64,
    pub event_streams_refused: AtomicU64,
    event_streams: Arc<Semaphore>,
    pub max_event_streams: usize,
}

impl Default for Load {
    fn default() -> Self {
        Self::new(MAX_EVENT_STREAMS)
    }
}

impl Load {
    pub fn new(max_event_streams: usize) -> Self {
        Self {
            open_connections: AtomicU64::new(0),
            header_timeouts: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            event_streams_refused: AtomicU64::new(0),
            event_streams: Arc::new(Semaphore::new(max_event_streams)),
            max_event_streams,
        }
    }

    /// A place for one more event stream, held until the stream ends; None
    /// (and counted) when all are taken.
    pub fn open_event_stream(&self) -> Option<OwnedSemaphorePermit> {
        let place = self.event_streams.clone().try_acquire_owned().ok();
        if place.is_none() {
            self.event_streams_refused.fetch_add(1, Ordering::Relaxed);
        }
        place
    }

    pub fn event_streams_open(&self) -> usize {
        self.max_event_streams - self.event_streams.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn options(listen: &str, api: Option<&str>) -> Result<Options, ExposureError> {
        let n = NonZeroUsize::new(8).unwrap();
        Options::new(addr(listen), api.map(addr), None, n, n)
    }

    fn plan(listen: &str, api: Option<&str>) -> Vec<(SocketAddr, bool)> {
        options(listen, api)
            .unwrap()
            .listeners()
            .iter()
            .map(|l| (l.addr, l.api_exposed))
            .collect()
    }

    #[test]
    fn the_default_serves_everything_on_one_loopback_listener() {
        assert_eq!(
            plan("127.0.0.1:9464", None),
            [(addr("127.0.0.1:9464"), false)]
        );
        assert_eq!(plan("[::1]:9464", None), [(addr("[::1]:9464"), false)]);
    }

    #[test]
    fn a_pod_address_gets_metrics_and_loopback_gets_the_api() {
        assert_eq!(
            plan("10.1.2.3:9464", None),
            [
                (addr("10.1.2.3:9464"), false),
                (addr("127.0.0.1:9464"), false)
            ]
        );
        assert_eq!(
            plan("[fd00::3]:9464", None),
            [(addr("[fd00::3]:9464"), false), (addr("[::1]:9464"), false)]
        );
    }

    #[test]
    fn a_wildcard_listener_already_covers_the_loopback_api() {
        assert_eq!(plan("0.0.0.0:9464", None), [(addr("0.0.0.0:9464"), false)]);
        assert_eq!(plan("[::]:9464", None), [(addr("[::]:9464"), false)]);
        // Another port: a listener of its own.
        assert_eq!(
            plan("0.0.0.0:9464", Some("127.0.0.1:9465")),
            [
                (addr("0.0.0.0:9464"), false),
                (addr("127.0.0.1:9465"), false)
            ]
        );
    }

    #[test]
    fn an_exposed_api_needs_a_token() {
        for (listen, api) in [
            ("0.0.0.0:9464", Some("0.0.0.0:9464")),
            ("10.1.2.3:9464", Some("10.1.2.3:9465")),
            ("127.0.0.1:9464", Some("[::]:9465")),
        ] {
            let err = options(listen, api).unwrap_err();
            assert!(
                matches!(err, ExposureError::NoToken { .. }),
                "{listen} {api:?}: {err}"
            );
            assert!(err.to_string().contains("--api-token-file"), "{err}");
        }
    }

    #[test]
    fn listen_addresses_may_bracket_either_family() {
        for (text, want) in [
            ("10.1.2.3:9464", "10.1.2.3:9464"),
            ("[10.1.2.3]:9464", "10.1.2.3:9464"),
            ("[fd00::3]:9464", "[fd00::3]:9464"),
        ] {
            assert_eq!(parse_listen_addr(text), Ok(addr(want)), "{text}");
        }
        for bad in [
            "10.1.2.3",
            "fd00::3:9464",
            "[10.1.2.3]",
            "[10.1.2.3]:x",
            "[$(POD_IP)]:9464",
        ] {
            let err = parse_listen_addr(bad).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn mapped_loopback_is_loopback() {
        assert!(is_loopback("::ffff:127.0.0.1".parse().unwrap()));
        assert!(is_loopback("127.9.9.9".parse().unwrap()));
        assert!(!is_loopback("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!is_loopback("0.0.0.0".parse().unwrap()));
    }

    #[test]
    fn event_stream_places_are_capped_and_given_back() {
        let load = Load::new(2);
        let a = load.open_event_stream().unwrap();
        let _b = load.open_event_stream().unwrap();
        assert!(load.open_event_stream().is_none());
        assert_eq!(load.event_streams_refused.load(Ordering::Relaxed), 1);
        assert_eq!(load.event_streams_open(), 2);
        drop(a);
        assert!(load.open_event_stream().is_some());
    }
}
