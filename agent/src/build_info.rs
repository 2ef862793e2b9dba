//! Which build this is: the version, the git commit it was built from
//! (agent/build.rs; "unknown" outside a git checkout) and the layout of the
//! pinned maps it reads and writes (an agent adopts only maps of its own
//! layout, so two builds of one layout can replace each other hitlessly).
//! Said by `sluice --version`, `sluice_build_info` and the API.

use std::sync::OnceLock;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const COMMIT: &str = env!("SLUICE_COMMIT");
pub const MAP_LAYOUT: u32 = agent_common::MAP_LAYOUT;

/// `0.1.0 (commit 1c39178a2b3c, map layout 3)`, for `--version`.
pub fn long_version() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| format!("{VERSION} (commit {COMMIT}, map layout {MAP_LAYOUT})"))
}
