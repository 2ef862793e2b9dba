//! NodePorts and traffic policies of the config file's services: where
//! this node is (`node`), and the extra service entries a `node_port`
//! makes, one per node address of the VIP's family, named
//! `SERVICE@ADDRESS:PORT` (`web@192.0.2.10:30080`, `web@[fd00::10]:30080`)
//! so that each has its own counters, as Kubernetes externalIPs have.
//!
//! `external_traffic_policy: local`: the VIP and its NodePort entries use
//! this node's backends only, the client's address kept. `cluster`: every
//! backend; through a NodePort entry, those on another node or of no known
//! node are reached with SNAT to the entry's own address (the node address
//! the packet arrived on), so their replies come back through this node,
//! while this node's backends see the client's address.

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
};

use tracing::warn;

use crate::config::{self, ServiceSpec, refused_class};

/// This node as NodePorts and traffic policies see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Here {
    pub name: Option<String>,
    pub addresses: Vec<IpAddr>,
}

impl Here {
    /// `node` of the config, its defaults filled in: the name from
    /// `NODE_NAME`, else the hostname; the addresses of the host's
    /// interfaces (`host_node_addresses`), read now.
    pub fn of(node: &config::Node) -> Self {
        let name = node
            .name
            .clone()
            .or_else(|| std::env::var("NODE_NAME").ok().filter(|v| !v.is_empty()))
            .or_else(hostname);
        let addresses = match &node.addresses {
            Some(list) => list.iter().filter_map(|a| a.parse().ok()).collect(),
            None => host_node_addresses(),
        };
        Self { name, addresses }
    }
}

fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    (!name.is_empty()).then_some(name)
}

/// The addresses NodePorts listen on by default: every address of the
/// host's interfaces except loopback (127.0.0.0/8, ::1), link-local
/// (169.254.0.0/16, fe80::/10), multicast, unspecified, broadcast and
/// cloud-metadata addresses (the classes no VIP may be), and those of
/// kube-proxy's `kube-ipvs0` (Service VIPs, not the node's), sorted.
pub fn host_node_addresses() -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = crate::discovery::kubernetes::host_addresses()
        .into_iter()
        .filter(|(device, ip)| device != "kube-ipvs0" && refused_class(*ip).is_none())
        .map(|(_, ip)| ip)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The config file's services with their traffic policies applied and
/// their NodePort entries added after them. An entry whose frontend
/// another service already has is left out and logged.
pub fn expand(services: Vec<ServiceSpec>, here: &Here) -> Vec<ServiceSpec> {
    let mut taken: HashSet<_> = services.iter().map(crate::reconcile::service_key).collect();
    let mut out = Vec::with_capacity(services.len());
    let mut entries = Vec::new();
    for mut spec in services {
        if spec.local_only {
            let nodes = std::mem::take(&mut spec.backend_nodes);
            spec.backends
                .retain(|(addr, _)| is_local(&nodes, addr, here));
            spec.backend_nodes = nodes;
        }
        if let Some(port) = spec.node_port {
            for addr in here
                .addresses
                .iter()
                .filter(|a| a.is_ipv4() == spec.vip.is_ipv4())
            {
                let entry = node_port_entry(&spec, *addr, port, here);
                if !taken.insert(crate::reconcile::service_key(&entry)) {
                    warn!(
                        service = spec.name,
                        node_port = %SocketAddr::new(*addr, port),
                        "node port not installed: another service has this address, port and protocol"
                    );
                    continue;
                }
                entries.push(entry);
            }
        }
        out.push(spec);
    }
    out.extend(entries);
    out
}

/// Whether `addr`, a backend whose node `nodes` may name, runs on this
/// node (a backend of no known node doesn't).
fn is_local(
    nodes: &std::collections::BTreeMap<SocketAddr, String>,
    addr: &SocketAddr,
    here: &Here,
) -> bool {
    here.name.is_some() && nodes.get(addr) == here.name.as_ref()
}

/// The entry of `spec`'s NodePort `port` on node address `addr` (its
/// backends already this node's with a Local policy).
pub fn node_port_entry(spec: &ServiceSpec, addr: IpAddr, port: u16, here: &Here) -> ServiceSpec {
    let mut entry = spec.clone();
    entry.name = format!("{}@{}", spec.name, SocketAddr::new(addr, port));
    entry.vip = addr;
    entry.port = port;
    entry.node_port = None;
    // The backends are resolved already; the provider reports under the
    // service's own name.
    entry.discovery = None;
    if !spec.local_only && spec.snat_ip.is_none() {
        entry.snat_remote = Some(addr);
        entry.remote_backends = spec
            .backends
            .iter()
            .map(|(a, _)| *a)
            .filter(|a| !is_local(&spec.backend_nodes, a, here))
            .collect();
    }
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services(text: &str) -> Vec<ServiceSpec> {
        crate::config::parse(text, "c.yaml").unwrap().services
    }

    const TEXT: &str = r#"
interfaces: [{name: lb0}]
services:
  - name: web
    vip: 10.0.0.1
    port: 80
    protocol: tcp
    node_port: 30080
    backends:
      - {address: 10.0.1.1:8080, node: node-a}
      - {address: 10.0.1.2:8080, node: node-b}
      - {address: 10.0.1.3:8080}
"#;

    fn here() -> Here {
        Here {
            name: Some("node-a".into()),
            addresses: vec![
                "192.0.2.10".parse().unwrap(),
                "2001:db8::10".parse().unwrap(),
            ],
        }
    }

    #[test]
    fn cluster_entries_snat_to_their_own_address_towards_other_nodes() {
        let out = expand(services(TEXT), &here());
        let names: Vec<&str> = out.iter().map(|s| s.name.as_str()).collect();
        // The IPv6 node address is not the VIP's family: no entry there.
        assert_eq!(names, ["web", "web@192.0.2.10:30080"]);
        let entry = &out[1];
        assert_eq!(
            (entry.vip, entry.port),
            ("192.0.2.10".parse().unwrap(), 30080)
        );
        assert_eq!(entry.backends.len(), 3);
        assert_eq!(entry.snat_remote, Some("192.0.2.10".parse().unwrap()));
        let remote: Vec<String> = entry
            .remote_backends
            .iter()
            .map(|a| a.to_string())
            .collect();
        // node-b's and the one of no known node; node-a's keeps the client.
        assert_eq!(remote, ["10.0.1.2:8080", "10.0.1.3:8080"]);
        assert_eq!(out[0].snat_remote, None, "the VIP itself is as configured");
    }

    #[test]
    fn local_entries_keep_this_nodes_backends_and_the_client_address() {
        let text = TEXT.replace(
            "node_port: 30080\n",
            "node_port: 30080\n    external_traffic_policy: local\n",
        );
        let out = expand(services(&text), &here());
        for s in &out {
            let backends: Vec<String> = s.backends.iter().map(|(a, _)| a.to_string()).collect();
            assert_eq!(backends, ["10.0.1.1:8080"], "{}", s.name);
            assert_eq!(s.snat_remote, None);
            assert!(s.remote_backends.is_empty());
        }
        // No name for this node: no backend is known to be local.
        let nameless = Here {
            name: None,
            ..here()
        };
        assert!(
            expand(services(&text), &nameless)
                .iter()
                .all(|s| s.backends.is_empty())
        );
    }

    #[test]
    fn a_node_port_on_another_services_frontend_is_left_out() {
        let text = TEXT.to_string()
            + "  - name: taken\n    vip: 192.0.2.10\n    port: 30080\n    protocol: tcp\n";
        // Validation knows no node address here (they are the host's).
        let out = expand(services(&text), &here());
        let names: Vec<&str> = out.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["web", "taken"]);
    }

    #[test]
    fn default_node_addresses_are_no_loopback_or_link_local() {
        for ip in host_node_addresses() {
            assert!(refused_class(ip).is_none(), "{ip}");
        }
    }
}
