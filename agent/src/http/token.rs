//! The bearer token an exposed API requires, read from a file (a
//! Kubernetes Secret volume, say). The file is read again when it changes,
//! so a token is rotated without a restart; a file that becomes unreadable
//! or empty keeps the last good token (and says so in the log).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use axum::http::HeaderValue;
use tracing::{info, warn};

/// How often the token file is checked for a new token.
pub const RELOAD_POLL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("--api-token-file {path}: can't read it: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("--api-token-file {path}: the file is empty; it must hold the bearer token")]
    Empty { path: String },
    #[error(
        "--api-token-file {path}: the token must be one line of printable ASCII without spaces (byte {offset} is 0x{byte:02x})"
    )]
    Invalid {
        path: String,
        offset: usize,
        byte: u8,
    },
}

pub struct ApiToken {
    path: PathBuf,
    secret: ArcSwap<Box<[u8]>>,
}

// The secret stays out of logs and panics.
impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiToken")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ApiToken {
    pub fn load(path: &Path) -> Result<Self, TokenError> {
        Ok(Self {
            path: path.to_path_buf(),
            secret: ArcSwap::from_pointee(read(path)?),
        })
    }

    /// Whether `authorization` is `Bearer <the token>`. The token is
    /// compared in constant time (for tokens of its length), so response
    /// times don't tell how much of a guess was right.
    pub fn accepts(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some(presented) = authorization.and_then(|v| bearer(v.as_bytes())) else {
            return false;
        };
        constant_time_eq(presented, &self.secret.load())
    }

    /// Follows the file until `stop` says so.
    pub fn spawn_reload(self: &Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let token = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(RELOAD_POLL);
            let mut last_error = None;
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = stop.changed() => return,
                }
                match read(&token.path) {
                    Ok(secret) => {
                        last_error = None;
                        if **token.secret.load() != secret {
                            token.secret.store(Arc::new(secret));
                            info!(file = %token.path.display(), "API token file changed: the new token is in use");
                        }
                    }
                    Err(e) => {
                        let why = e.to_string();
                        if last_error.as_ref() != Some(&why) {
                            warn!(
                                error = why,
                                "API token file unusable; the last good token stays in use"
                            );
                        }
                        last_error = Some(why);
                    }
                }
            }
        });
    }
}

/// The token in a file: surrounding whitespace (the newline `echo` or an
/// editor adds) is not part of it.
fn read(path: &Path) -> Result<Box<[u8]>, TokenError> {
    let name = || path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| TokenError::Read {
        path: name(),
        source,
    })?;
    let token = bytes.trim_ascii();
    if token.is_empty() {
        return Err(TokenError::Empty { path: name() });
    }
    // What a header can carry after "Bearer ": visible ASCII.
    if let Some(offset) = token.iter().position(|b| !b.is_ascii_graphic()) {
        return Err(TokenError::Invalid {
            path: name(),
            offset,
            byte: token[offset],
        });
    }
    Ok(token.into())
}

/// The credentials of an `Authorization: Bearer <token>` header (the scheme
/// is case-insensitive, RFC 9110).
fn bearer(header: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = header.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
}

/// Equal bytes, in time that depends on the lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the compiler from turning the fold into an early-exit compare.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token file under the system temp dir, removed on drop.
    struct TempFile(PathBuf);

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn token_file(text: &[u8]) -> TempFile {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "sluice-token-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, text).unwrap();
        TempFile(path)
    }

    fn header(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn accepts_the_token_and_nothing_else() {
        let file = token_file(b"s3cret-token\n");
        let token = ApiToken::load(&file.0).unwrap();
        assert!(token.accepts(Some(&header("Bearer s3cret-token"))));
        assert!(token.accepts(Some(&header("bearer s3cret-token"))));
        for wrong in [
            "Bearer s3cret-tokem",
            "Bearer s3cret-token2",
            "Bearer s3cret",
            "Bearer ",
            "Basic s3cret-token",
            "s3cret-token",
            "",
        ] {
            assert!(!token.accepts(Some(&header(wrong))), "{wrong:?}");
        }
        assert!(!token.accepts(None));
    }

    #[test]
    fn unusable_files_are_refused_with_the_file_named() {
        let empty = token_file(b" \n\t\n");
        let err = ApiToken::load(&empty.0).unwrap_err();
        assert!(matches!(err, TokenError::Empty { .. }), "{err}");
        assert!(err.to_string().contains(&empty.0.display().to_string()));

        let spaced = token_file(b"two words\n");
        let err = ApiToken::load(&spaced.0).unwrap_err();
        assert!(
            matches!(
                err,
                TokenError::Invalid {
                    offset: 3,
                    byte: b' ',
                    ..
                }
            ),
            "{err}"
        );

        let missing = std::env::temp_dir().join("sluice-token-test-no-such-file");
        let err = ApiToken::load(&missing).unwrap_err();
        assert!(matches!(err, TokenError::Read { .. }), "{err}");
        assert!(err.to_string().contains("can't read"), "{err}");
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
    }
}
