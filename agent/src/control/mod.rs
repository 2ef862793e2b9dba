//! The operator interface on the node: a Unix socket only root (and the
//! agent's own user) can open, serving the API and taking runtime
//! overrides; and the client the `sluice` commands use to talk to it.

pub mod client;
pub mod overrides;
pub mod socket;

/// An override change for the reconcile loop, and where its answer goes.
pub struct Request {
    pub change: overrides::Change,
    pub reply: tokio::sync::oneshot::Sender<Result<overrides::Entry, String>>,
}

/// `sluice run`'s flags that override the config's `control` paths (for
/// several agents on one host, e.g. tests).
#[derive(Debug, Clone, Default)]
pub struct PathFlags {
    pub socket: Option<std::path::PathBuf>,
    pub state_directory: Option<std::path::PathBuf>,
}

impl PathFlags {
    pub fn socket(&self, config: &crate::config::Control) -> std::path::PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| config.socket.clone().into())
    }

    pub fn state_directory(&self, config: &crate::config::Control) -> std::path::PathBuf {
        self.state_directory
            .clone()
            .unwrap_or_else(|| config.state_directory.clone().into())
    }
}
