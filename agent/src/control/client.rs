//! The `sluice` commands' side of the control socket: HTTP/1.1 requests
//! over the Unix socket, answers as typed JSON.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, StatusCode, body::Incoming};
use hyper_util::rt::TokioIo;
use serde::{Serialize, de::DeserializeOwned};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nobody listens there (or it can't be opened): the agent is down,
    /// or this is not root.
    #[error("no agent answers on {socket}: {source}")]
    Unreachable {
        socket: String,
        source: std::io::Error,
    },
    /// The agent answered with an error.
    #[error("{message}")]
    Refused { status: StatusCode, message: String },
    #[error("talking to the agent on {socket}: {message}")]
    Protocol { socket: String, message: String },
}

pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
        }
    }

    fn protocol(&self, e: impl std::fmt::Display) -> ClientError {
        ClientError::Protocol {
            socket: self.socket.display().to_string(),
            message: e.to_string(),
        }
    }

    async fn send(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Unreachable {
                    socket: self.socket.display().to_string(),
                    source,
                })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.protocol(e))?;
        tokio::spawn(connection);
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| self.protocol(e))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| self.protocol(e))?;
        Err(ClientError::Refused {
            status,
            message: String::from_utf8_lossy(&body.to_bytes()).trim().to_string(),
        })
    }

    fn request(method: &str, path: &str, body: Bytes) -> Request<Full<Bytes>> {
        Request::builder()
            .method(method)
            .uri(path)
            // The socket is the authority; hyper needs one for HTTP/1.1.
            .header(hyper::header::HOST, "sluice")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .expect("a request built from a valid method and path")
    }

    async fn json<T: DeserializeOwned>(
        &self,
        response: hyper::Response<Incoming>,
    ) -> Result<T, ClientError> {
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| self.protocol(e))?;
        serde_json::from_slice(&body.to_bytes()).map_err(|e| self.protocol(e))
    }

    /// GET `path` (with its query), answered as `T`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let response = self.send(Self::request("GET", path, Bytes::new())).await?;
        self.json(response).await
    }

    /// POST `body` as JSON to `path`, answered as `T`.
    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| self.protocol(e))?;
        let response = self.send(Self::request("POST", path, body.into())).await?;
        self.json(response).await
    }

    /// Opens an event stream (Server-Sent Events): once this returns, the
    /// agent sends every event from now on.
    pub async fn subscribe(&self, path: &str) -> Result<Subscription<'_>, ClientError> {
        let response = self.send(Self::request("GET", path, Bytes::new())).await?;
        Ok(Subscription {
            client: self,
            body: response.into_body(),
            pending: String::new(),
        })
    }
}

/// An open event stream.
pub struct Subscription<'a> {
    client: &'a Client,
    body: Incoming,
    pending: String,
}

impl Subscription<'_> {
    /// The next event's data; None when the agent ends the stream.
    pub async fn next(&mut self) -> Result<Option<String>, ClientError> {
        loop {
            // Events end with a blank line; keep-alive comments start with ':'.
            while let Some(end) = self.pending.find("\n\n") {
                let event: String = self.pending.drain(..end + 2).collect();
                if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data:")) {
                    return Ok(Some(data.trim_start().to_string()));
                }
            }
            let Some(frame) = self.body.frame().await else {
                return Ok(None);
            };
            let frame = frame.map_err(|e| self.client.protocol(e))?;
            if let Some(chunk) = frame.data_ref() {
                self.pending.push_str(&String::from_utf8_lossy(chunk));
            }
        }
    }
}
