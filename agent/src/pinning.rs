//! Pinning the datapath under bpffs, so that it outlives the agent.
//!
//! Layout of a pin directory (one per agent instance):
//!
//! ```text
//! DIR/layout-N/maps/NAME         every map whose contents must survive
//! DIR/layout-N/links/IFACE@MODE  the program's link on each interface
//! DIR/layout-N/sock/PROGRAM      socket-level balancing's cgroup and tracepoint links
//! ```
//!
//! `N` is `agent_common::MAP_LAYOUT`, bumped whenever a shared type's layout
//! or meaning changes. A build never opens another layout's maps, so pinned
//! state is never silently reinterpreted: it refuses to start and says how
//! to replace the old datapath. Within a layout, each pinned map's key size,
//! value size and capacity are checked against the object before use.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};

use crate::config::AttachMode;

/// Maps pinned (and adopted by the next agent): those the registry marks
/// `pinned`.
pub fn pinned_maps() -> impl Iterator<Item = &'static str> {
    agent_common::registry::MAPS
        .iter()
        .filter(|m| m.pinned)
        .map(|m| m.name)
}

#[derive(Debug, Clone)]
pub struct PinDir {
    /// DIR/layout-N
    root: PathBuf,
}

impl PinDir {
    /// Checks that `dir` is on bpffs (mounting /sys/fs/bpf, mode 0700, if
    /// that is where it is and nothing is mounted there), private to root
    /// (it and its parents up to the mount: see `bpffs::check_private`),
    /// and holds no other layout. The pins go under its canonical path, the
    /// one checked.
    pub fn prepare(dir: &Path) -> Result<Self> {
        crate::bpffs::ensure_mounted(dir)?;
        let configured = dir;
        let dir = crate::bpffs::make_private_dir(dir, configured)?;
        let layout = format!("layout-{}", agent_common::MAP_LAYOUT);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("layout-") && name != layout && has_pins(&entry.path()) {
                    bail!(
                        "pin directory {} holds a datapath with map {name}, pinned by another \
                         version of Sluice; this build uses {layout} and will not reinterpret \
                         its maps. Run that version again, or replace the old datapath \
                         (dropping the connections it tracks) with `sluice cleanup --config FILE`",
                        dir.display()
                    );
                }
            }
        }
        let root = dir.join(layout);
        for sub in ["maps", "links", "sock"] {
            // Made 0700 if new; one left by an earlier run is checked too.
            crate::bpffs::make_private_dir(&root.join(sub), configured)?;
        }
        Ok(Self { root })
    }

    /// The datapath pinned under `dir` by this build's map layout, for
    /// reading only (the operator commands): nothing is made or checked.
    pub fn existing(dir: &Path) -> Result<Self> {
        let root = dir.join(format!("layout-{}", agent_common::MAP_LAYOUT));
        if !root.join("maps").is_dir() {
            bail!(
                "no datapath of map layout {} is pinned under {}",
                agent_common::MAP_LAYOUT,
                dir.display()
            );
        }
        Ok(Self { root })
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn map_path(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(name)
    }

    pub fn link_path(&self, interface: &str, mode: AttachMode) -> PathBuf {
        // bpffs refuses names with a dot.
        self.root.join("links").join(format!("{interface}@{mode}"))
    }

    /// Where the link of a socket-level balancing program is pinned.
    pub fn socket_link_path(&self, program: &str) -> PathBuf {
        self.root.join("sock").join(program)
    }

    /// The pinned link of `interface`, if any, and the mode it was made in.
    pub fn pinned_link(&self, interface: &str) -> Option<(AttachMode, PathBuf)> {
        [
            AttachMode::XdpNative,
            AttachMode::XdpGeneric,
            AttachMode::Tc,
        ]
        .into_iter()
        .map(|mode| (mode, self.link_path(interface, mode)))
        .find(|(_, path)| path.exists())
    }

    /// Every pinned link: (interface, path).
    pub fn pinned_links(&self) -> Result<Vec<(String, PathBuf)>> {
        let dir = self.root.join("links");
        let mut out = Vec::new();
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some((interface, _mode)) = name.rsplit_once('@') {
                out.push((interface.to_string(), entry.path()));
            }
        }
        Ok(out)
    }

    /// True when maps of an earlier agent are pinned here.
    pub fn has_maps(&self) -> bool {
        pinned_maps().any(|m| self.map_path(m).exists())
    }

    /// Each pinned map must match the object's definition (with the
    /// capacities the config sets): same key and value sizes, same capacity.
    pub fn check_maps(&self, object: &[u8], capacities: &[(&str, u32)]) -> Result<()> {
        let obj = aya_obj::Object::parse(object).context("parsing the eBPF object")?;
        for name in pinned_maps() {
            let path = self.map_path(name);
            if !path.exists() {
                continue;
            }
            let def = obj
                .maps
                .get(name)
                .ok_or_else(|| anyhow!("map {name} is missing from the eBPF object"))?;
            let pinned = aya::maps::MapInfo::from_pin(&path)
                .with_context(|| format!("opening pinned map {}", path.display()))?;
            let want_entries = capacities
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(def.max_entries(), |(_, c)| *c);
            let got = (
                pinned.key_size(),
                pinned.value_size(),
                pinned.max_entries(),
                pinned.map_flags(),
            );
            let want = (
                def.key_size(),
                def.value_size(),
                want_entries,
                def.map_flags(),
            );
            if got != want {
                bail!(
                    "pinned map {} does not fit this build and config: key size, value size, \
                     capacity and flags are {got:?}, expected {want:?}. A capacity change (conntrack, \
                     limits, maglev) needs the old datapath replaced: `sluice cleanup --config \
                     FILE` (drops the connections it tracks), then start again",
                    path.display()
                );
            }
        }
        Ok(())
    }
}

fn has_pins(dir: &Path) -> bool {
    ["maps", "links", "sock"].iter().any(|sub| {
        std::fs::read_dir(dir.join(sub)).is_ok_and(|mut entries| entries.next().is_some())
    })
}

/// `sluice cleanup`: removes every pin under `dir` (all layouts). The
/// programs detach and the maps are freed once nothing else holds them.
pub fn cleanup(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    let Ok(layouts) = std::fs::read_dir(dir) else {
        return Ok(0);
    };
    for layout in layouts.flatten() {
        for sub in ["links", "sock", "maps"] {
            let Ok(entries) = std::fs::read_dir(layout.path().join(sub)) else {
                continue;
            };
            for entry in entries.flatten() {
                std::fs::remove_file(entry.path())
                    .with_context(|| format!("removing {}", entry.path().display()))?;
                removed += 1;
            }
            let _ = std::fs::remove_dir(layout.path().join(sub));
        }
        let _ = std::fs::remove_dir(layout.path());
    }
    let _ = std::fs::remove_dir(dir);
    Ok(removed)
}
