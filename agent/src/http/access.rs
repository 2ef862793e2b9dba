//! Who may call the API. A connection made over loopback (both ends on a
//! loopback address: a process on this host, or in this pod's network
//! namespace, such as `kubectl port-forward`) may, as before. Any other may
//! only on a listener where the API is exposed, and only with the bearer
//! token. Metrics and health are not gated: they carry no client address.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    extract::Request,
    http::{StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};

use super::{ApiToken, is_loopback};

/// Where a request came from, put into each request by the server.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// Set on a listener where the API is exposed: the token it requires.
    pub exposed_with: Option<Arc<ApiToken>>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// The API is not served to this connection at all.
    NotHere,
    /// Exposed here, but the token is missing or wrong.
    Unauthorized,
}

impl ConnInfo {
    pub fn over_loopback(&self) -> bool {
        is_loopback(self.local.ip()) && is_loopback(self.peer.ip())
    }

    pub fn verdict(&self, authorization: Option<&header::HeaderValue>) -> Verdict {
        if self.over_loopback() {
            return Verdict::Allowed;
        }
        match &self.exposed_with {
            None => Verdict::NotHere,
            Some(token) if token.accepts(authorization) => Verdict::Allowed,
            Some(_) => Verdict::Unauthorized,
        }
    }
}

/// Middleware on the API's routes. A request without `ConnInfo` (not from
/// this module's server) is refused: the gate fails closed.
pub async fn api_gate(request: Request, next: Next) -> Response {
    let verdict = match request.extensions().get::<ConnInfo>() {
        Some(conn) => conn.verdict(request.headers().get(header::AUTHORIZATION)),
        None => Verdict::NotHere,
    };
    match verdict {
        Verdict::Allowed => next.run(request).await,
        Verdict::NotHere => (
            StatusCode::NOT_FOUND,
            "not found: the API is served on loopback (see `sluice run --api-listen`)\n",
        )
            .into_response(),
        Verdict::Unauthorized => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer realm=\"sluice\"")],
            "unauthorized: send Authorization: Bearer TOKEN (the token in the agent's --api-token-file)\n",
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(local: &str, peer: &str, token: Option<Arc<ApiToken>>) -> ConnInfo {
        ConnInfo {
            local: local.parse().unwrap(),
            peer: peer.parse().unwrap(),
            exposed_with: token,
        }
    }

    #[test]
    fn loopback_is_allowed_anywhere_and_others_only_where_exposed() {
        assert_eq!(
            conn("127.0.0.1:9464", "127.0.0.1:40000", None).verdict(None),
            Verdict::Allowed
        );
        assert_eq!(
            conn("[::ffff:127.0.0.1]:9464", "[::ffff:127.0.0.1]:40000", None).verdict(None),
            Verdict::Allowed
        );
        assert_eq!(
            conn("10.0.0.1:9464", "10.0.0.2:40000", None).verdict(None),
            Verdict::NotHere
        );
        // Both ends count: a local address alone is not proof.
        assert_eq!(
            conn("127.0.0.1:9464", "10.0.0.2:40000", None).verdict(None),
            Verdict::NotHere
        );
    }

    #[test]
    fn an_exposed_listener_wants_the_token() {
        let path = std::env::temp_dir().join(format!("sluice-access-test-{}", std::process::id()));
        std::fs::write(&path, "t0ken").unwrap();
        let token = Arc::new(ApiToken::load(&path).unwrap());
        let _ = std::fs::remove_file(&path);
        let c = conn("10.0.0.1:9464", "10.0.0.2:40000", Some(token));
        assert_eq!(c.verdict(None), Verdict::Unauthorized);
        let wrong = header::HeaderValue::from_static("Bearer t0kem");
        assert_eq!(c.verdict(Some(&wrong)), Verdict::Unauthorized);
        let right = header::HeaderValue::from_static("Bearer t0ken");
        assert_eq!(c.verdict(Some(&right)), Verdict::Allowed);
    }
}
