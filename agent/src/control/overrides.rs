//! Runtime overrides: `sluice drain`, `sluice undrain` and `sluice weight`
//! put a backend's admission on top of what the config file or discovery
//! says, until cleared. They are kept in a file of the state directory
//! (written whole and renamed into place) so a restarted agent applies them
//! again, and a backend that leaves and comes back (discovery) gets its
//! override back.

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::config::{MAX_WEIGHT, ServiceSpec};

/// The file, under `control.state_directory`.
pub const FILE_NAME: &str = "overrides.json";

/// One backend's override. Drained wins over a weight: the weight applies
/// again once undrained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Override {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drain: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

impl Override {
    fn is_empty(&self) -> bool {
        !self.drain && self.weight.is_none()
    }

    /// The weight a backend configured with `configured` gets.
    pub fn weight(&self, configured: u32) -> u32 {
        if self.drain {
            0
        } else {
            self.weight.unwrap_or(configured)
        }
    }
}

/// A change an operator asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    Drain,
    Undrain,
    Weight { weight: u32 },
    ClearWeight,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub service: String,
    pub backend: SocketAddr,
    #[serde(flatten)]
    pub action: Action,
}

/// One override as listed (`GET /api/v1/overrides`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub service: String,
    pub backend: SocketAddr,
    #[serde(flatten)]
    pub value: Override,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    by_service: BTreeMap<String, BTreeMap<SocketAddr, Override>>,
    /// Where they are kept; None: not kept (tests of the logic).
    file: Option<PathBuf>,
}

#[derive(Serialize, Deserialize)]
struct FileFormat {
    version: u32,
    overrides: Vec<Entry>,
}

impl Overrides {
    /// The overrides kept in `state_directory` (none if it has no file yet).
    /// A file that can't be read or parsed refuses start-up: starting
    /// without it would quietly send traffic to backends an operator drained.
    pub fn load(state_directory: &Path) -> Result<Self> {
        let file = state_directory.join(FILE_NAME);
        let mut out = Self {
            by_service: BTreeMap::new(),
            file: Some(file.clone()),
        };
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => {
                return Err(e).with_context(|| format!("reading overrides {}", file.display()));
            }
        };
        let parsed: FileFormat = serde_json::from_str(&text).with_context(|| {
            format!(
                "overrides {} is not valid (fix or remove it; `sluice drain/weight --clear` rewrite it)",
                file.display()
            )
        })?;
        if parsed.version != 1 {
            bail!(
                "overrides {}: version {} is not 1",
                file.display(),
                parsed.version
            );
        }
        for e in parsed.overrides {
            out.by_service
                .entry(e.service)
                .or_default()
                .insert(e.backend, e.value);
        }
        Ok(out)
    }

    pub fn entries(&self) -> Vec<Entry> {
        self.by_service
            .iter()
            .flat_map(|(service, backends)| {
                backends.iter().map(|(backend, value)| Entry {
                    service: service.clone(),
                    backend: *backend,
                    value: *value,
                })
            })
            .collect()
    }

    pub fn get(&self, service: &str, backend: &SocketAddr) -> Option<Override> {
        self.by_service.get(service)?.get(backend).copied()
    }

    pub fn len(&self) -> usize {
        self.by_service.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies `change`, checked against `desired` (the services as config
    /// and discovery have them now): the service and backend must exist.
    /// Returns the backend's override after the change; nothing changes on
    /// an error.
    pub fn change(&mut self, change: &Change, desired: &[ServiceSpec]) -> Result<Override> {
        let Some(service) = desired.iter().find(|s| s.name == change.service) else {
            let names: Vec<&str> = desired.iter().map(|s| s.name.as_str()).collect();
            bail!(
                "no service {:?} (services: {})",
                change.service,
                names.join(", ")
            );
        };
        if !service.backends.iter().any(|(a, _)| *a == change.backend) {
            let addrs: Vec<String> = service
                .backends
                .iter()
                .map(|(a, _)| a.to_string())
                .collect();
            bail!(
                "service {} has no backend {} (backends: {})",
                service.name,
                change.backend,
                addrs.join(", ")
            );
        }
        let mut next = self
            .get(&change.service, &change.backend)
            .unwrap_or_default();
        match change.action {
            Action::Drain => next.drain = true,
            Action::Undrain => next.drain = false,
            Action::Weight { weight } if weight > MAX_WEIGHT => {
                bail!("weight {weight} is over the maximum {MAX_WEIGHT}")
            }
            Action::Weight { weight } => next.weight = Some(weight),
            Action::ClearWeight => next.weight = None,
        }
        let mut updated = self.clone();
        let backends = updated
            .by_service
            .entry(change.service.clone())
            .or_default();
        if next.is_empty() {
            backends.remove(&change.backend);
        } else {
            backends.insert(change.backend, next);
        }
        updated.by_service.retain(|_, b| !b.is_empty());
        updated.save()?;
        *self = updated;
        Ok(next)
    }

    /// The weights of `desired` with the overrides applied.
    pub fn apply(&self, desired: &mut [ServiceSpec]) {
        for service in desired {
            // A config file service's NodePort entries (`web@192.0.2.10:30080`,
            // see `nodeport`) follow the service's overrides; their own
            // come first. (Config names have no '@' or '/'; Kubernetes
            // names, which have a '/', keep theirs per entry.)
            let base = match service.name.split_once('@') {
                Some((base, _)) if !service.name.contains('/') => self.by_service.get(base),
                _ => None,
            };
            let own = self.by_service.get(&service.name);
            if own.is_none() && base.is_none() {
                continue;
            }
            for (addr, weight) in &mut service.backends {
                if let Some(o) = own
                    .and_then(|o| o.get(addr))
                    .or_else(|| base.and_then(|o| o.get(addr)))
                {
                    *weight = o.weight(*weight);
                }
            }
        }
    }

    /// `save` for a rollback: a failure is logged (the in-memory state is
    /// what serves).
    pub fn save_quietly(&self) {
        if let Err(e) = self.save() {
            tracing::error!(error = format!("{e:#}"), "overrides not written back");
        }
    }

    /// Writes the file whole, then renames it into place: a crash leaves
    /// the old file or the new one, never half of one.
    fn save(&self) -> Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let dir = file
            .parent()
            .context("overrides file without a directory")?;
        create_private_dir(dir)?;
        let text = serde_json::to_string_pretty(&FileFormat {
            version: 1,
            overrides: self.entries(),
        })?;
        use std::os::unix::fs::OpenOptionsExt as _;
        let tmp = file.with_extension("json.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, file).with_context(|| format!("replacing {}", file.display()))
    }
}

/// `dir` and its missing parents, made 0700.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Protocol;

    fn spec(backends: &[(&str, u32)]) -> ServiceSpec {
        ServiceSpec {
            backends: backends
                .iter()
                .map(|(a, w)| (a.parse().unwrap(), *w))
                .collect(),
            ..ServiceSpec::new("web".into(), "10.0.0.1".parse().unwrap(), 80, Protocol::Tcp)
        }
    }

    fn change(backend: &str, action: Action) -> Change {
        Change {
            service: "web".into(),
            backend: backend.parse().unwrap(),
            action,
        }
    }

    #[test]
    fn drain_wins_over_weight_and_both_clear() {
        let desired = [spec(&[("10.0.1.1:80", 3), ("10.0.1.2:80", 1)])];
        let mut o = Overrides::default();
        o.change(
            &change("10.0.1.1:80", Action::Weight { weight: 7 }),
            &desired,
        )
        .unwrap();
        o.change(&change("10.0.1.1:80", Action::Drain), &desired)
            .unwrap();
        let mut applied = desired.clone();
        o.apply(&mut applied);
        assert_eq!(applied[0].backends[0].1, 0);
        assert_eq!(applied[0].backends[1].1, 1);
        o.change(&change("10.0.1.1:80", Action::Undrain), &desired)
            .unwrap();
        let mut applied = desired.clone();
        o.apply(&mut applied);
        assert_eq!(applied[0].backends[0].1, 7);
        o.change(&change("10.0.1.1:80", Action::ClearWeight), &desired)
            .unwrap();
        assert!(o.is_empty());
    }

    #[test]
    fn a_services_node_port_entries_follow_its_overrides() {
        let desired = [spec(&[("10.0.1.1:80", 1), ("10.0.1.2:80", 1)])];
        let mut o = Overrides::default();
        o.change(&change("10.0.1.1:80", Action::Drain), &desired)
            .unwrap();
        let mut entry = desired[0].clone();
        entry.name = "web@192.0.2.10:30080".into();
        let mut other = desired[0].clone();
        other.name = "web2@192.0.2.10:30081".into();
        let mut applied = [desired[0].clone(), entry, other];
        o.apply(&mut applied);
        assert_eq!(applied[0].backends[0].1, 0);
        assert_eq!(applied[1].backends[0].1, 0, "the NodePort entry of web");
        assert_eq!(applied[2].backends[0].1, 1, "another service's entry");
    }

    #[test]
    fn unknown_service_backend_or_weight_is_refused_and_changes_nothing() {
        let desired = [spec(&[("10.0.1.1:80", 1)])];
        let mut o = Overrides::default();
        let mut other = change("10.0.1.1:80", Action::Drain);
        other.service = "api".into();
        assert!(
            o.change(&other, &desired)
                .unwrap_err()
                .to_string()
                .contains("no service \"api\"")
        );
        let err = o
            .change(&change("10.0.9.9:80", Action::Drain), &desired)
            .unwrap_err();
        assert!(err.to_string().contains("no backend 10.0.9.9:80"), "{err}");
        let err = o
            .change(
                &change("10.0.1.1:80", Action::Weight { weight: 5000 }),
                &desired,
            )
            .unwrap_err();
        assert!(err.to_string().contains("5000"), "{err}");
        assert!(o.is_empty());
    }

    #[test]
    fn kept_in_a_file_and_read_back() {
        let dir = std::env::temp_dir().join(format!("sluice-overrides-{}", std::process::id()));
        let desired = [spec(&[("10.0.1.1:80", 1)])];
        let mut o = Overrides::load(&dir).unwrap();
        o.change(&change("10.0.1.1:80", Action::Drain), &desired)
            .unwrap();
        let back = Overrides::load(&dir).unwrap();
        assert_eq!(back.entries(), o.entries());
        std::fs::write(dir.join(FILE_NAME), "{not json").unwrap();
        let err = Overrides::load(&dir).unwrap_err();
        assert!(format!("{err:#}").contains(FILE_NAME), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
