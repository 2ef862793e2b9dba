//! Kernel settings the datapath relies on, set while the agent runs and put
//! back as they were when it stops.

use anyhow::{Context, Result};
use tracing::info;

use crate::config::Validated;

#[derive(Default)]
pub struct Sysctls {
    /// Path and the value it had before the agent changed it, in the order
    /// changed: restored in reverse, since `ipv6/conf/all` writes through to
    /// every interface.
    saved: Vec<(String, String)>,
}

impl Sysctls {
    /// Settings the datapath needs on each interface it is attached to:
    ///
    /// - `forwarding` (IPv4 and IPv6): the FIB lookup of the kernel programs
    ///   answers "forwarding disabled" without it, and the kernel forwards
    ///   the packets it is handed (a next hop with no neighbour entry yet).
    /// - `accept_local`, in snat mode: such a packet handed to the kernel,
    ///   already rewritten, has this host's SNAT address as its source, which
    ///   IPv4 drops as a martian unless it is set. (IPv6 has no such check.)
    pub fn apply(&mut self, cfg: &Validated, interfaces: &[String]) -> Result<()> {
        let snat_v4 = cfg
            .services
            .iter()
            .any(|s| s.snat_ip.is_some_and(|ip| ip.is_ipv4()));
        if !interfaces.is_empty() {
            // IPv6 forwards a packet the kernel is handed only when forwarding
            // is on for all interfaces, not just for the one it arrived on.
            let path = "/proc/sys/net/ipv6/conf/all/forwarding";
            self.set(
                path,
                "1",
                "the kernel forwards IPv6 packets the datapath hands it",
            )?;
        }
        for iface in interfaces {
            for family in ["ipv4", "ipv6"] {
                let path = format!("/proc/sys/net/{family}/conf/{iface}/forwarding");
                self.set(&path, "1", "the datapath forwards on this interface")?;
            }
            if snat_v4 {
                let path = format!("/proc/sys/net/ipv4/conf/{iface}/accept_local");
                self.set(&path, "1", "the snat slow path")?;
            }
        }
        Ok(())
    }

    /// Forgets what was changed: a pinned datapath keeps running after the
    /// agent exits and still needs these settings.
    pub fn keep(&mut self) {
        self.saved.clear();
    }

    fn set(&mut self, path: &str, value: &str, why: &str) -> Result<()> {
        let old = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        let old = old.trim().to_string();
        if old == value {
            return Ok(());
        }
        std::fs::write(path, value).with_context(|| format!("writing {value} to {path}"))?;
        info!(path, old = %old, new = value, why, "kernel setting changed");
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

impl Drop for Sysctls {
    fn drop(&mut self) {
        self.restore();
    }
}
