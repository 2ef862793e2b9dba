//! Fitting the Kubernetes Services into the running maps. Any namespace
//! may create a Service with 65 ports or 5,000 endpoints; if the desired
//! state then exceeded `limits`, the reconciler would refuse it whole, and
//! every later change (of every Service) with it. Instead each Kubernetes
//! Service is taken whole or not at all, in a stable order that puts the
//! Services already taken first (a new Service can't push out one that
//! serves); one that doesn't fit is quarantined: left out (or kept in its
//! last version that fitted), logged, counted
//! (`sluice_discovery_quarantined_services`) and named in /readyz, while
//! the others keep updating.

use std::collections::{BTreeMap, HashSet};

use tracing::{info, warn};

use crate::{config::ServiceSpec, reconcile::service_key};

/// Service and backend slots of the maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub services: u32,
    pub backends: u32,
}

/// The Kubernetes Service (`NAMESPACE/NAME`) a Sluice service comes from
/// (its name is `NAMESPACE/NAME:PORT[@VIP]`).
pub fn owner(name: &str) -> &str {
    name.split_once(':').map_or(name, |(owner, _)| owner)
}

#[derive(Debug, Default)]
pub struct Fitted {
    /// The Kubernetes services taken, after `taken`.
    pub services: Vec<ServiceSpec>,
    /// Each Service taken, as taken.
    pub admitted: BTreeMap<String, Vec<ServiceSpec>>,
    /// Services that didn't fit, with why.
    pub quarantined: BTreeMap<String, String>,
}

/// What is used of the maps so far, and by which frontends and names.
struct Used {
    services: usize,
    backends: usize,
    /// Entries of `SOURCE_RANGES` (one per `allowed_sources` block).
    ranges: usize,
    keys: HashSet<agent_common::ServiceKey>,
    names: HashSet<String>,
}

impl Used {
    fn of(taken: &[ServiceSpec]) -> Self {
        let mut used = Self {
            services: 0,
            backends: 0,
            ranges: 0,
            keys: HashSet::new(),
            names: HashSet::new(),
        };
        used.add(taken);
        used
    }

    fn add(&mut self, services: &[ServiceSpec]) {
        for s in services {
            self.services += 1;
            self.backends += s.backends.len();
            self.ranges += ranges_of(s);
            self.keys.insert(service_key(s));
            self.names.insert(s.name.clone());
        }
    }

    /// `group` without the services whose frontend or name is taken (the
    /// config file's, or a Service's taken before): those stay theirs.
    fn free_part(&self, group: &[ServiceSpec]) -> Vec<ServiceSpec> {
        group
            .iter()
            .filter(|s| !self.keys.contains(&service_key(s)) && !self.names.contains(&s.name))
            .cloned()
            .collect()
    }

    /// Why `group` doesn't fit in what is left of `capacity`; None if it does.
    fn refuse(&self, group: &[ServiceSpec], capacity: Capacity) -> Option<String> {
        let services = group.len();
        let backends: usize = group.iter().map(|s| s.backends.len()).sum();
        let free_services = (capacity.services as usize).saturating_sub(self.services);
        let free_backends = (capacity.backends as usize).saturating_sub(self.backends);
        let ranges: usize = group.iter().map(ranges_of).sum();
        let free_ranges = (agent_common::MAX_SOURCE_RANGES as usize).saturating_sub(self.ranges);
        if ranges > free_ranges {
            return Some(format!(
                "needs {ranges} source-range entries (loadBalancerSourceRanges × ports × \
                 VIPs); {free_ranges} of the {} of SOURCE_RANGES are free",
                agent_common::MAX_SOURCE_RANGES
            ));
        }
        if services <= free_services && backends <= free_backends {
            return None;
        }
        Some(format!(
            "needs {services} service slots (ports × VIPs) and {backends} backend slots; \
             {free_services} of limits.max_services ({}) and {free_backends} of \
             limits.max_backends ({}) are free",
            capacity.services, capacity.backends
        ))
    }
}

/// The `SOURCE_RANGES` entries a service takes.
fn ranges_of(s: &ServiceSpec) -> usize {
    s.allowed_sources.as_ref().map_or(0, Vec::len)
}

/// Fits `found` (the Kubernetes services) into `capacity` after `taken`
/// (the config file's services), Service by Service: those in `before`
/// (taken last time) first, then the others, each in name order.
pub fn fit(
    taken: &[ServiceSpec],
    found: &[ServiceSpec],
    before: &BTreeMap<String, Vec<ServiceSpec>>,
    capacity: Capacity,
) -> Fitted {
    let mut groups: BTreeMap<&str, Vec<ServiceSpec>> = BTreeMap::new();
    for s in found {
        groups.entry(owner(&s.name)).or_default().push(s.clone());
    }
    let (old, new): (Vec<&str>, Vec<&str>) =
        groups.keys().partition(|name| before.contains_key(**name));
    let mut used = Used::of(taken);
    let mut fitted = Fitted::default();
    for name in old.into_iter().chain(new) {
        let group = used.free_part(&groups[name]);
        let Some(why) = used.refuse(&group, capacity) else {
            used.add(&group);
            fitted.services.extend(group.iter().cloned());
            fitted.admitted.insert(name.to_string(), group);
            continue;
        };
        // The version that fitted last time serves on, if it still fits.
        let last = before
            .get(name)
            .map(|last| used.free_part(last))
            .filter(|last| used.refuse(last, capacity).is_none());
        let why = match last {
            Some(last) => {
                used.add(&last);
                fitted.services.extend(last.iter().cloned());
                fitted.admitted.insert(name.to_string(), last);
                format!("{why}; its last version that fitted serves on")
            }
            None => format!("{why}; not balanced by Sluice"),
        };
        fitted.quarantined.insert(name.to_string(), why);
    }
    fitted
}

/// Logs Services newly quarantined (or for a new reason) and released.
pub fn log_changes(before: &BTreeMap<String, String>, now: &BTreeMap<String, String>) {
    for (service, why) in now {
        if before.get(service) != Some(why) {
            warn!(
                event = "quarantined",
                service,
                why,
                "kubernetes Service quarantined: it doesn't fit the maps; the other Services keep updating"
            );
        }
    }
    for service in before.keys().filter(|s| !now.contains_key(*s)) {
        info!(
            event = "released",
            service, "kubernetes Service no longer quarantined"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::config::Protocol;

    /// `ports` Sluice services of Service `owner`, each with `backends`.
    fn service(owner: &str, vip: u8, ports: u16, backends: u8) -> Vec<ServiceSpec> {
        (1..=ports)
            .map(|port| ServiceSpec {
                backends: (0..backends)
                    .map(|b| (SocketAddr::from(([10, 1, vip, b], 8080)), 1))
                    .collect(),
                ..ServiceSpec::new(
                    format!("{owner}:{port}"),
                    [10, 96, 0, vip].into(),
                    port,
                    Protocol::Tcp,
                )
            })
            .collect()
    }

    const CAPACITY: Capacity = Capacity {
        services: 64,
        backends: 4096,
    };

    fn names(fitted: &Fitted) -> Vec<&str> {
        fitted.admitted.keys().map(String::as_str).collect()
    }

    #[test]
    fn a_service_that_does_not_fit_is_quarantined_and_the_others_are_taken() {
        let file = service("file", 1, 1, 2);
        let found = [service("a/big", 2, 65, 1), service("b/web", 3, 2, 3)].concat();
        let fitted = fit(&file, &found, &BTreeMap::new(), CAPACITY);
        assert_eq!(names(&fitted), ["b/web"]);
        assert_eq!(fitted.services.len(), 2);
        assert_eq!(
            fitted.quarantined["a/big"],
            "needs 65 service slots (ports × VIPs) and 65 backend slots; 63 of \
             limits.max_services (64) and 4094 of limits.max_backends (4096) are free; \
             not balanced by Sluice"
        );
        // Backends count too.
        let found = [service("a/wide", 2, 1, 200), service("b/web", 3, 1, 3)].concat();
        let small = Capacity {
            services: 64,
            backends: 100,
        };
        let fitted = fit(&[], &found, &BTreeMap::new(), small);
        assert_eq!(names(&fitted), ["b/web"]);
        assert!(fitted.quarantined.contains_key("a/wide"));
    }

    #[test]
    fn services_taken_before_go_first_and_keep_their_last_fitting_version() {
        let small = Capacity {
            services: 4,
            backends: 4096,
        };
        // z/old was taken; a/new (sorted first) would push it out.
        let before = fit(&[], &service("z/old", 1, 3, 1), &BTreeMap::new(), small).admitted;
        let found = [service("a/new", 2, 3, 1), service("z/old", 1, 3, 1)].concat();
        let fitted = fit(&[], &found, &before, small);
        assert_eq!(names(&fitted), ["z/old"]);
        assert!(fitted.quarantined.contains_key("a/new"));
        // z/old grows past the limit: its last version serves on.
        let found = service("z/old", 1, 5, 1);
        let fitted = fit(&[], &found, &before, small);
        assert_eq!(fitted.admitted["z/old"].len(), 3);
        assert!(fitted.quarantined["z/old"].ends_with("its last version that fitted serves on"));
    }

    #[test]
    fn frontends_the_file_has_stay_the_files() {
        let file = service("file", 1, 1, 2);
        let mut clash = service("shop/web", 1, 2, 1);
        clash[0].port = file[0].port;
        let fitted = fit(&file, &clash, &BTreeMap::new(), CAPACITY);
        assert_eq!(fitted.services.len(), 1);
        assert_eq!(fitted.services[0].port, 2);
    }
}
