//! The services' `allowed_sources` in the kernel's `SOURCE_RANGES` trie:
//! one entry per block, keyed by service id, family and block (see
//! `agent_common::SourceRange`). A service's new blocks are written before
//! its entry says it is restricted, and its old ones removed after, so a
//! change never denies a source that both the old and new lists allow.

use std::collections::BTreeSet;

use agent_common::{SOURCE_RANGE_FIXED_BITS, SourceRange, addr};
use anyhow::{Context, Result};
use aya::maps::{LpmTrie, MapData, lpm_trie::Key};
use tracing::warn;

use crate::config::ServiceSpec;

/// An entry of the trie: (prefix length, data), as `Key` holds it.
pub type Entry = (u32, SourceRange);

/// The entries `spec` needs as service `id`. Blocks of the other family
/// than the VIP's are left out: no packet to the VIP can match them.
pub fn wanted(id: u32, spec: &ServiceSpec) -> BTreeSet<Entry> {
    spec.allowed_sources
        .iter()
        .flatten()
        .filter(|c| c.network().is_ipv4() == spec.vip.is_ipv4())
        .map(|c| {
            (
                SOURCE_RANGE_FIXED_BITS + u32::from(c.prefix()),
                SourceRange {
                    service_id: id,
                    family: addr::family(c.network()),
                    _pad: [0; 3],
                    addr: addr::words(c.network()),
                },
            )
        })
        .collect()
}

/// What the trie holds (read once at start: a pinned trie carries the
/// entries of the agent before).
pub fn read(trie: &LpmTrie<MapData, SourceRange, u32>) -> BTreeSet<Entry> {
    trie.keys()
        .filter_map(|k| k.ok())
        .map(|k| (k.prefix_len(), k.data()))
        .collect()
}

pub fn insert(
    trie: &mut LpmTrie<MapData, SourceRange, u32>,
    written: &mut BTreeSet<Entry>,
    entry: Entry,
) -> Result<()> {
    trie.insert(&Key::new(entry.0, entry.1), 1, 0)
        .with_context(|| {
            format!(
                "writing source range {} of service #{}",
                show(&entry),
                entry.1.service_id
            )
        })?;
    written.insert(entry);
    Ok(())
}

/// Removes the entries `written` has for which `stale` holds. A failure
/// is logged and the entry kept (tried again at the next apply): it can
/// only allow a source the service's flag no longer asks about, or one of
/// a service id that has none.
pub fn remove_where(
    trie: &mut LpmTrie<MapData, SourceRange, u32>,
    written: &mut BTreeSet<Entry>,
    stale: impl Fn(&Entry) -> bool,
) {
    let gone: Vec<Entry> = written.iter().filter(|e| stale(e)).copied().collect();
    for entry in gone {
        match trie.remove(&Key::new(entry.0, entry.1)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {
                written.remove(&entry);
            }
            Err(e) => {
                warn!(range = show(&entry), service_id = entry.1.service_id, error = %e, "removing a source range")
            }
        }
    }
}

/// `10.0.0.0/8` for logs.
fn show((prefix_len, r): &Entry) -> String {
    let ip = addr::words_ip(r.addr, r.family == agent_common::FAMILY_V4);
    format!(
        "{ip}/{}",
        prefix_len.saturating_sub(SOURCE_RANGE_FIXED_BITS)
    )
}
