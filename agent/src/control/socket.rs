//! The control socket's listener. The socket file is made 0600 in a
//! directory made 0700, and every connection's peer credentials are
//! checked as well: the socket can drain backends, so a mode changed by
//! hand must not open it to other users.

use std::{
    io,
    os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

/// The listening control socket; `stop` closes it and removes its file.
pub struct ControlSocket {
    path: PathBuf,
    /// The file's inode when bound: a later agent may have replaced it
    /// (see `bind`), and then the file is that agent's to remove.
    inode: u64,
    task: tokio::task::JoinHandle<()>,
}

/// Connections from root or from the agent's own user; others are closed
/// at accept.
struct RootOnly {
    listener: UnixListener,
    own_uid: u32,
}

impl axum::serve::Listener for RootOnly {
    type Io = UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.listener.accept().await {
                Ok((stream, addr)) => match stream.peer_cred() {
                    Ok(cred) if cred.uid() == 0 || cred.uid() == self.own_uid => {
                        return (stream, addr);
                    }
                    Ok(cred) => warn!(
                        uid = cred.uid(),
                        pid = cred.pid(),
                        "control socket: closed a connection from a user other than root"
                    ),
                    Err(e) => warn!(error = %e, "control socket: peer credentials unreadable"),
                },
                // Out of descriptors and the like: wait rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

impl ControlSocket {
    /// Binds `path` and serves `router` on it.
    pub async fn start(path: &Path, router: axum::Router) -> Result<Self> {
        let listener = bind(path).await?;
        let inode = std::fs::metadata(path)
            .with_context(|| format!("control socket {}", path.display()))?
            .ino();
        // SAFETY: geteuid has no preconditions and can't fail.
        let own_uid = unsafe { libc::geteuid() };
        let serve = axum::serve(RootOnly { listener, own_uid }, router);
        let task = tokio::spawn(async move {
            let _ = serve.await;
        });
        info!(socket = %path.display(), "control socket listening (root only)");
        Ok(Self {
            path: path.to_path_buf(),
            inode,
            task,
        })
    }

    /// Stops accepting and removes the socket file, if it is still ours.
    pub fn stop(self) {
        self.task.abort();
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A socket file left by an agent that is gone is replaced. One that an
/// agent still answers on is replaced too, with a warning: the newest agent
/// on a node (a restart that overlaps, an upgrade) is the one to talk to.
async fn bind(path: &Path) -> Result<UnixListener> {
    let dir = path
        .parent()
        .with_context(|| format!("control socket {} has no directory", path.display()))?;
    if !dir.exists() {
        super::overrides::create_private_dir(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).await.is_ok() {
                warn!(socket = %path.display(), "another agent answers on the control socket; this one takes it over");
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing the old control socket {}", path.display()))?;
        }
        Ok(_) => bail!(
            "control.socket {} exists and is not a socket: remove it or choose another path",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("control socket {}", path.display())),
    }
    // Made 0600 right after bind; a connection in between is still
    // checked by its credentials (`RootOnly`).
    let listener = UnixListener::bind(path).with_context(|| {
        format!(
            "binding the control socket {} (control.socket, or --control-socket): it needs a writable directory",
            path.display()
        )
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("control socket {}", path.display()))?;
    Ok(listener)
}
