//! Attaching socket-level balancing: the cgroup sock_addr programs, the
//! socket release hook and the tracepoints that follow TCP connects.

use agent_common::registry::program as names;
use anyhow::{Context, Result};
use tracing::info;

use super::{Datapath, program};

impl Datapath {
    /// Socket-level balancing: the connect/sendmsg/recvmsg/getpeername
    /// programs on the cgroup at `cgroup`, and the socket state tracepoint
    /// that counts their connects' failures. Detached when the agent exits.
    pub fn attach_socket_lb(&mut self, cgroup: &std::path::Path) -> Result<()> {
        use aya::programs::{
            CgroupSock, CgroupSockAddr, RawTracePoint, links::CgroupAttachMode, links::FdLink,
        };
        let dir = std::fs::File::open(cgroup)
            .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        // With pinning, each new link is pinned in place of the last agent's
        // (attached first, so the hooks never go missing: for a moment both
        // run, and the second sees a backend, not a VIP).
        let pin = self.pins.is_some();
        let mut links: Vec<(&str, FdLink)> = Vec::new();
        for name in names::SOCKET {
            let p: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            super::verify(|| p.load())
                .with_context(|| format!("loading program {name} (kernel verifier)"))?;
            // A bpf_link attachment coexists with other programs on the cgroup
            // whatever the mode; the kernel refuses flags with links.
            let id = p
                .attach(&dir, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to cgroup {}", cgroup.display()))?;
            if pin {
                links.push((name, p.take_link(id)?.try_into()?));
            }
        }
        let release: &mut CgroupSock = program(&mut self.ebpf, names::SOCK_RELEASE)?;
        super::verify(|| release.load()).with_context(|| {
            format!("loading program {} (kernel verifier)", names::SOCK_RELEASE)
        })?;
        let id = release
            .attach(&dir, CgroupAttachMode::Single)
            .with_context(|| {
                format!(
                    "attaching {} to cgroup {}",
                    names::SOCK_RELEASE,
                    cgroup.display()
                )
            })?;
        if pin {
            links.push((names::SOCK_RELEASE, release.take_link(id)?.try_into()?));
        }
        for (name, tracepoint) in [
            (names::SOCK_STATE, "inet_sock_set_state"),
            (names::TCP_RESET, "tcp_receive_reset"),
        ] {
            let tp: &mut RawTracePoint = program(&mut self.ebpf, name)?;
            super::verify(|| tp.load())
                .with_context(|| format!("loading program {name} (kernel verifier)"))?;
            let id = tp
                .attach(tracepoint)
                .with_context(|| format!("attaching to the {tracepoint} tracepoint"))?;
            if pin {
                links.push((name, FdLink::from(tp.take_link(id)?)));
            }
        }
        if let Some(pins) = &self.pins {
            for (name, link) in links {
                let path = pins.socket_link_path(name);
                if path.exists() {
                    std::fs::remove_file(&path)
                        .with_context(|| format!("removing pin {}", path.display()))?;
                }
                // The pin holds the link from now on; our handle may go.
                link.pin(&path)
                    .with_context(|| format!("pinning {name} at {}", path.display()))?;
            }
        }
        info!(cgroup = %cgroup.display(), pinned = pin, "socket-level balancing attached");
        Ok(())
    }

    /// With pinning and no `socket_lb` in the config: the socket hooks an
    /// earlier agent pinned are removed.
    pub fn remove_pinned_socket_lb(&mut self) -> Result<()> {
        let Some(pins) = &self.pins else {
            return Ok(());
        };
        let mut removed = 0;
        for name in
            names::SOCKET
                .iter()
                .chain(&[names::SOCK_RELEASE, names::SOCK_STATE, names::TCP_RESET])
        {
            let path = pins.socket_link_path(name);
            if path.exists() {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing pin {}", path.display()))?;
                removed += 1;
            }
        }
        if removed > 0 {
            info!("pinned socket-level balancing removed: socket_lb is no longer configured");
        }
        Ok(())
    }
}
