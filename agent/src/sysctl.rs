//! Kernel settings the datapath relies on, set while the agent runs and put
//! back as they were when it stops.
//!
//! Where /proc/sys is read-only (a Kubernetes pod, even on the host
//! network), a setting that already has the value needed is fine; one that
//! doesn't, and that a configured service needs, refuses start-up (or the
//! config change) naming the setting, its value, the value needed and how
//! to set it on the node. One no configured service needs yet (IPv6
//! forwarding with IPv4 services only; Kubernetes services, which are found
//! later) is a warning.

use anyhow::{Context, Result};
use tracing::{info, warn};

use crate::{config::Validated, refusal::Refusal};

#[derive(Default)]
pub struct Sysctls {
    /// Path and the value it had before the agent changed it, in the order
    /// changed: restored in reverse, since `ipv6/conf/all` writes through to
    /// every interface.
    saved: Vec<(String, String)>,
}

/// One setting the datapath wants.
struct Want<'a> {
    /// Under /proc/sys.
    path: String,
    value: &'a str,
    why: &'a str,
    /// A configured service needs it: refuse when it can't be had.
    needed: bool,
    /// Another setting that, at `value`, has the same effect (the kernel
    /// ORs `conf/all` and the interface's for some settings).
    or_path: Option<&'a str>,
    /// The setting to tell an operator to set: one that covers every
    /// interface, present and future.
    advice: &'a str,
}

impl Sysctls {
    /// Settings the datapath needs on each interface it is attached to:
    ///
    /// - `forwarding` (IPv4 and IPv6): the FIB lookup of the kernel programs
    ///   answers "forwarding disabled" without it, and the kernel forwards
    ///   the packets it is handed (a next hop with no neighbour entry yet).
    /// - `accept_local`, in snat mode (and for NodePorts with the cluster
    ///   policy): such a packet handed to the kernel,
    ///   already rewritten, has this host's SNAT address as its source, which
    ///   IPv4 drops as a martian unless it is set. (IPv6 has no such check.)
    pub fn apply(&mut self, cfg: &Validated, interfaces: &[String]) -> Result<()> {
        let v4 = cfg.services.iter().any(|s| s.vip.is_ipv4());
        let v6 = cfg.services.iter().any(|s| s.vip.is_ipv6());
        // A NodePort with `external_traffic_policy: cluster` SNATs to the
        // node's own addresses towards other nodes' backends: the same slow
        // path. (A DSR tunnel's `snat_ip` is an outer source the kernel
        // never sees as a packet's source: no need there.)
        let snat_v4 = cfg.services.iter().any(|s| {
            (s.dsr.is_none() && s.snat_ip.is_some_and(|ip| ip.is_ipv4()))
                || (s.node_port.is_some() && !s.local_only && s.vip.is_ipv4())
        }) || cfg
            .raw
            .kubernetes
            .as_ref()
            .is_some_and(|k| k.addresses.contains(&crate::config::KubeAddress::NodePorts));
        if !interfaces.is_empty() {
            // IPv6 forwards a packet the kernel is handed only when forwarding
            // is on for all interfaces, not just for the one it arrived on.
            self.set(Want {
                path: "/proc/sys/net/ipv6/conf/all/forwarding".into(),
                value: "1",
                why: "the kernel forwards IPv6 packets the datapath hands it",
                needed: v6,
                or_path: None,
                advice: "net.ipv6.conf.all.forwarding",
            })?;
        }
        for iface in interfaces {
            // ip_forward and ipv6 `all` write through to every interface.
            for (family, needed, advice) in [
                ("ipv4", v4, "net.ipv4.ip_forward"),
                ("ipv6", v6, "net.ipv6.conf.all.forwarding"),
            ] {
                self.set(Want {
                    path: format!("/proc/sys/net/{family}/conf/{iface}/forwarding"),
                    value: "1",
                    why: "the datapath forwards on this interface",
                    needed,
                    or_path: None,
                    advice,
                })?;
            }
            if snat_v4 {
                // The kernel checks accept_local of `all` OR the interface's.
                self.set(Want {
                    path: format!("/proc/sys/net/ipv4/conf/{iface}/accept_local"),
                    value: "1",
                    why: "the snat slow path",
                    needed: true,
                    or_path: Some("/proc/sys/net/ipv4/conf/all/accept_local"),
                    advice: "net.ipv4.conf.all.accept_local",
                })?;
            }
        }
        Ok(())
    }

    /// Forgets what was changed: a pinned datapath keeps running after the
    /// agent exits and still needs these settings.
    pub fn keep(&mut self) {
        self.saved.clear();
    }

    fn set(&mut self, want: Want) -> Result<()> {
        let path = want.path.as_str();
        let old = read(path)?;
        if old == want.value {
            return Ok(());
        }
        if let Some(or_path) = want.or_path
            && read(or_path)? == want.value
        {
            return Ok(());
        }
        if let Err(e) = std::fs::write(path, want.value) {
            let name = want.advice;
            let how = format!(
                "set {name}={} on the node (sysctl -w {name}={}, and in /etc/sysctl.d/ to keep \
                 it), or from a privileged init container",
                want.value, want.value
            );
            if want.needed {
                return Err(Refusal(format!(
                    "kernel setting {} is {old}, Sluice needs {} ({}), and can't set it: \
                     writing {path}: {e}; {how}",
                    sysctl_name(path),
                    want.value,
                    want.why
                ))
                .into());
            }
            warn!(
                setting = sysctl_name(path),
                value = old,
                needed = want.value,
                error = %e,
                "kernel setting can't be set; no configured service needs it yet, but services \
                 of its family found later won't forward until it is: {how}"
            );
            return Ok(());
        }
        info!(path, old = %old, new = want.value, why = want.why, "kernel setting changed");
        if !self.saved.iter().any(|(p, _)| p == path) {
            self.saved.push((path.to_string(), old));
        }
        Ok(())
    }

    /// Puts back every setting this agent changed.
    pub fn restore(&mut self) {
        for (path, old) in std::mem::take(&mut self.saved).into_iter().rev() {
            if std::fs::write(&path, &old).is_ok() {
                info!(path, value = %old, "kernel setting restored");
            }
        }
    }
}

fn read(path: &str) -> Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("reading {path}"))?
        .trim()
        .to_string())
}

/// The sysctl(8) name of a /proc/sys path: `/` between the parts becomes
/// `.`, and a `.` inside a part (an interface name such as `eth0.100`)
/// becomes `/`.
fn sysctl_name(path: &str) -> String {
    path.trim_start_matches("/proc/sys/")
        .split('/')
        .map(|part| part.replace('.', "/"))
        .collect::<Vec<_>>()
        .join(".")
}

impl Drop for Sysctls {
    fn drop(&mut self) {
        self.restore();
    }
}

#[cfg(test)]
mod tests {
    use super::sysctl_name;

    #[test]
    fn sysctl_names_are_those_sysctl_takes() {
        assert_eq!(
            sysctl_name("/proc/sys/net/ipv4/conf/all/accept_local"),
            "net.ipv4.conf.all.accept_local"
        );
        assert_eq!(
            sysctl_name("/proc/sys/net/ipv4/conf/eth0.100/forwarding"),
            "net.ipv4.conf.eth0/100.forwarding"
        );
    }
}
