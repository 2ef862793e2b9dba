//! Kernel settings the datapath relies on, set while the agent runs and put
//! back as they were when it stops.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use tracing::info;

use crate::config::Validated;

#[derive(Default)]
pub struct Sysctls {
    /// Path → the value it had before the agent changed it.
    saved: BTreeMap<String, String>,
}

impl Sysctls {
    /// In snat mode the XDP program hands a packet whose next hop has no
    /// neighbour entry yet to the kernel, already rewritten: its source is
    /// then this host's SNAT address, which IPv4 drops as a martian unless
    /// `accept_local` is set on the interface it arrived on. (IPv6 has no
    /// such check.)
    pub fn apply(&mut self, cfg: &Validated) -> Result<()> {
        let snat_v4 = cfg
            .services
            .iter()
            .any(|s| s.snat_ip.is_some_and(|ip| ip.is_ipv4()));
        if !snat_v4 {
            return Ok(());
        }
        for iface in &cfg.raw.interfaces {
            let path = format!("/proc/sys/net/ipv4/conf/{}/accept_local", iface.name);
            self.set(&path, "1")?;
        }
        Ok(())
    }

    fn set(&mut self, path: &str, value: &str) -> Result<()> {
        let old = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        let old = old.trim().to_string();
        if old == value {
            return Ok(());
        }
        std::fs::write(path, value).with_context(|| format!("writing {value} to {path}"))?;
        info!(path, old = %old, new = value, "kernel setting changed for the snat slow path");
        self.saved.entry(path.to_string()).or_insert(old);
        Ok(())
    }

    /// Puts back every setting this agent changed.
    pub fn restore(&mut self) {
        for (path, old) in std::mem::take(&mut self.saved) {
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
